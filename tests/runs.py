"""The reference tokenizer run shared by the runtime, launcher and fault tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from tokenizer.autoencoder import HARTAutoEncoderWithDisc, config_to_dict, tokenizer_config

TOKENIZER_CONFIG = "configs/tokenizer_vq_tiny.yaml"


def tokenizer_overrides(data: str, out: Path, name: str, *extra: str) -> list[str]:
    """12 steps, a checkpoint every 4, one log line per step, the GAN from step 6, dead-code restarts.

    Small shuffle windows and 8 KiB reads keep the reader fetching throughout the run (with the
    config's window, a rank's first window already holds every sample 12 steps use), so S3 faults
    injected mid-run really hit reads."""
    return [f"data.urls=[{data}]", f"run.out_dir={out}", f"run.name={name}", "run.max_steps=12",
            "run.save_every=4", "run.keep_last=5", "run.log_every=1", "tokenizer.loss.disc_start_step=6",
            "tokenizer.loss.dead_code_steps=3", "data.shuffle_window=16", "data.read_block_bytes=8192",
            f"tokenizer.eval_url={data}", "tokenizer.eval_samples=16", *extra]


def losses(run_dir: Path) -> dict[int, dict]:
    """step -> the training log line of that step."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def assert_same_losses(got_dir: Path, ref_dir: Path, keys=("loss", "recon", "vq")) -> None:
    got, ref = losses(got_dir), losses(ref_dir)
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    for step in sorted(ref):
        for key in keys:
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])


def same_kernel(reference: Path) -> str:
    """The attention kernel the reference run took, as an override: the shipped `run.attention: auto` times
    both kernels at start and under load either may win; runs compared bit for bit must use the same one."""
    return f"run.attention={json.loads((Path(reference) / 'kernels.json').read_text())['attention']}"


def assert_no_secret_in(run_dir: Path, *secrets: str) -> None:
    """No file the run wrote (logs, configs, checkpoints, wandb's offline files) holds a credential."""
    files = [p for p in Path(run_dir).rglob("*") if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} leaked into {p}"


def make_tokenizer_ckpt(root: Path, seed: int) -> Path:
    """A tokenizer checkpoint directory in hart-train's format (random tiny weights from `seed`)."""
    out = root / f"tok_seed{seed}" / "step_00000001"
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    cfg = tokenizer_config("tiny")
    model = HARTAutoEncoderWithDisc(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.yaml").write_text(yaml.safe_dump({"stage": "tokenizer-hybrid", "tokenizer": {"model": config_to_dict(cfg)}}))
    return out


def fullsize_t2i_overrides(data, out: Path, name: str, tok: Path, text_encoder_dir: Path, *extra: str) -> list[str]:
    """The shipped full-size t2i configs (configs/t2i_{256,512,1024}.yaml) at small width: only sizes, run
    lengths, paths and the device are overridden. dtype (bf16), ZeRO-3 and its thresholds, activation
    checkpointing, EMA decay, the optimizer and the Qwen2 text encoder with its system prompt stay as
    shipped; the warmup is shortened to the run's 12 steps."""
    return [f"data.urls=[{data}]", f"run.out_dir={out}", f"run.name={name}", "run.device=cpu", "run.init_from=null",
            f"t2i.tokenizer_ckpt={tok}", f"t2i.text_encoder.path={text_encoder_dir}", "t2i.text_encoder.max_length=16",
            "t2i.model.context_token=16", "t2i.model.context_dim=32", "t2i.model.depth=2", "t2i.model.embed_dim=64",
            "t2i.model.num_heads=4", "t2i.model.patch_nums=[1,2,4]", "t2i.model.vocab_size=64", "t2i.model.Cvae=8",
            "t2i.model.diff_width=64", "t2i.model.diff_depth=2", "data.resolution=16", "data.batch_size=8",
            "data.num_workers=1", "data.shuffle_window=64", "run.max_steps=12", "run.save_every=4", "run.keep_last=5",
            "run.log_every=1", "run.image_every=0", "optim.warmup_steps=2", "t2i.sample_prompts=[red apple,rocket]",
            *extra]
