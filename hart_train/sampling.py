"""Sampling: the Python API behind `hart-sample` and the sample grids logged during training.

`load_pipeline(ckpt_dir)` rebuilds everything from a t2i checkpoint directory alone (its config.yaml,
model.safetensors and, by default, the EMA weights HART infers with), with the tokenizer and text
encoder from the local paths the config names. A LoRA checkpoint (hart_train.lora) holds adapters only:
its base is the run.init_from its config.yaml names, and the adapters run unmerged (peft's LoRA layers)
unless `merge_lora` folds them into the base weights first; both give the same images up to fp32 rounding. `sample_images` runs HART's sampler: CFG with the
linear ramp t = cfg*si/(S-1) and "(1+t)cond - t*uncond", top-k / top-p per scale, optional
`more_smooth`, the KV cache, and the 8-step residual diffusion on the last scale. Its random draws come
from a generator seeded with `seed`, or from the caller (`draws`, see `SampleDraws`) to replay a sample
drawn elsewhere. `schedule` (a bucket's `Bucket.schedule(patch_nums)`, None = the square schedule) samples
an aspect-ratio bucket: the last scale's h x w tokens give an image (downsample*h) x (downsample*w) px;
`Pipeline.schedule_for_aspect("16:9")` picks the nearest of the checkpoint's buckets (`t2i.buckets`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import yaml
from safetensors.torch import load_file

from data_tools.encode import load_tokenizer
from data_tools.text_encoder import TextEncoder, TextEncoderConfig
from hart_train import distributed as D
from hart_train import lora
from hart_train.models import HARTConfig, HARTForT2I, SampleDraws
from hart_train.models.buckets import Bucket, Schedule, bucket_for_aspect, stage_buckets, training_schedule
from hart_train.models.official_layout import load_official_state_dict
from tokenizer.autoencoder import HARTAutoEncoder


@dataclass
class Pipeline:
    model: HARTForT2I
    tokenizer: HARTAutoEncoder
    text_encoder: TextEncoder | None  # None when loaded without it (then sample from your own context)
    # the checkpoint's bucket set (`stage_buckets(t2i.buckets, patch_nums)`; the square bucket first by default)
    buckets: tuple[Bucket, ...] = ()

    def schedule_for_aspect(self, aspect: str | None) -> tuple[Bucket, Schedule | None]:
        """The bucket of `self.buckets` nearest `aspect` ("width:height", e.g. "16:9"; None: the square
        bucket S x S) and its `schedule` argument for `sample_images` (None for the square bucket: the square
        path bit for bit). A ValueError for a malformed aspect."""
        patch_nums = self.model.patch_nums
        S = patch_nums[-1]
        if aspect is None:
            bucket = Bucket(S, S)
        else:
            bucket = bucket_for_aspect(aspect, self.buckets or (Bucket(S, S),))
        return bucket, training_schedule(bucket, patch_nums)


@torch.no_grad()
def sample_images(model: HARTForT2I, tokenizer: HARTAutoEncoder, text_encoder: TextEncoder, prompts: list[str], *,
                  seed: int = 0, cfg_scale: float = 4.5, top_k: int = 600, top_p: float = 0.0,
                  more_smooth: bool = False, device=None, draws: SampleDraws | None = None,
                  schedule: Schedule | None = None) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for `prompts`; the same seed gives the same images. `draws` replaces
    the seeded draws it gives (`model.draw_sampling_randomness(N, device, generator, more_smooth,
    schedule=schedule)` returns the ones the seed gives). `schedule`: a bucket's scale schedule (the image is
    downsample*h x downsample*w for its last grid h x w), None for the square one."""
    device = torch.device(device or "cpu")
    context, mask, pos = text_encoder.encode(prompts)
    generator = D.generator(device).manual_seed(seed)
    num_scales = len(model.patch_nums)

    def next_input(si, f_hat, h_BChw):
        return tokenizer.get_next_autoregressive_input(si, num_scales, f_hat, h_BChw, patch_nums=schedule)

    return model.autoregressive_infer_cfg(
        context, mask, tokenizer.quantize.codebook(), next_input, tokenizer.fhat_to_img,
        context_position_ids=pos, cfg=cfg_scale, top_k=top_k, top_k_late=min(top_k, 300), top_p=top_p,
        more_smooth=more_smooth, generator=generator, draws=draws, schedule=schedule,
    )


def load_pipeline(ckpt_dir: str, use_ema: bool = True, device: str = "cpu", text_encoder: bool = True,
                  merge_lora: bool = False) -> Pipeline:
    """Model (EMA weights by default), tokenizer and text encoder from a t2i checkpoint directory.
    `text_encoder=False` loads the model and tokenizer alone (e.g. an imported checkpoint whose config
    names no text encoder directory, or a parity check that feeds its own context). A LoRA checkpoint's
    adapters stay separate layers unless `merge_lora`."""
    cfg_path = os.path.join(ckpt_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{ckpt_dir} has no config.yaml (not a hart-train t2i checkpoint)")
    with open(cfg_path, encoding="utf-8") as f:
        run_cfg = yaml.safe_load(f)
    section = run_cfg.get("t2i") if isinstance(run_cfg, dict) else None
    if not isinstance(section, dict) or run_cfg.get("stage") != "t2i":
        raise ValueError(f"{cfg_path} is not the config of a t2i stage")
    model = HARTForT2I(HARTConfig(**section["model"]))
    ema_path = os.path.join(ckpt_dir, "ema.safetensors")
    if use_ema and not os.path.exists(ema_path):
        print(f"hart-sample: {ckpt_dir} has no ema.safetensors (a run without EMA): sampling the raw weights",
              file=sys.stderr)
        use_ema = False
    if lora.lora_of(run_cfg) is not None:
        model = lora.load_checkpoint_model(model, ckpt_dir, run_cfg, use_ema=use_ema, merged=merge_lora)
        return _pipeline(model, section, device, text_encoder)
    state = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    if use_ema:
        state.update(load_file(ema_path))  # EMA covers the trainable parameters; frozen ones are in model
    load_official_state_dict(model, state, strict=True)
    return _pipeline(model, section, device, text_encoder)


def _pipeline(model: HARTForT2I, section: dict, device: str, text_encoder: bool) -> Pipeline:
    tokenizer = load_tokenizer(section["tokenizer_ckpt"], patch_nums=model.config.patch_nums).to(device)
    encoder = TextEncoder(TextEncoderConfig(**section["text_encoder"]), device) if text_encoder else None
    buckets = stage_buckets(section.get("buckets"), model.config.patch_nums)  # absent (older checkpoints): None
    return Pipeline(model.to(device).eval().requires_grad_(False), tokenizer, encoder, buckets)
