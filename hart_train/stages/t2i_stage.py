"""The text-to-image stages (`t2i`, configured per resolution: configs/t2i_*.yaml) on the shared runtime.

The DeepSpeed engine holds exactly `HARTForT2I` (its state dict is the official one), sharded with
ZeRO-3. The tokenizer and the text encoder are frozen and live beside the engine on every rank, in
eval mode: a batch of images and captions becomes the transformer's inputs on the fly (per-scale
indices, teacher-forcing input, last-scale residual, text embeddings). The next stage at a higher
resolution starts from this one's `model.safetensors` (`run.init_from`): 2D RoPE and the sinusoidal
level embedding make the weights independent of the schedule length.

With `data.kind: tokens` the batches are `hart-data encode` token shards (indices, last-scale
residual, text embeddings; `validate_paths` has checked they come from this run's tokenizer weights and
text encoder settings): `prepare` only splits the indices per scale and runs
`tokenizer.idxBl_to_var_input` (embedding lookups and interpolation; the tokenizer's encoder never
runs). The tokenizer is still loaded, for that codebook and for decoding sample grids. The text encoder
is then built lazily, the first time a sample grid needs the prompts encoded (never, with no
`sample_prompts`); with image data it is built up front, so a broken text encoder fails before step 1.

`head_only` freezes everything but the diffusion head (`diffloss.*`): one config flag, no new code.
Sample grids during training use the raw (not EMA) weights, since swapping EMA weights into a ZeRO-3
module would need a gather of the whole model; `hart-sample` uses the EMA weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from data_tools.encode import load_tokenizer
from data_tools.reader import StreamingReader
from data_tools.samples import to_unit_range
from data_tools.text_encoder import TextEncoder
from hart_train import distributed as D
from hart_train import zero_utils
from hart_train.models import HARTForT2I
from hart_train.flops import expected_kept_last
from hart_train.models.hart_t2i import REGENERABLE_BUFFERS, check_regenerable_buffers
from hart_train.sampling import sample_images


class T2IStage:
    partitioned_construction = True  # under ZeRO-3 the model is built partitioned (zero_utils)

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.stage_cfg = cfg.t2i
        self.device = device
        self.generator = D.generator(device)
        self.tokenizer = load_tokenizer(self.stage_cfg.tokenizer_ckpt, patch_nums=self.stage_cfg.model.patch_nums)
        self.tokenizer.to(device)
        self._text_encoder = TextEncoder(self.stage_cfg.text_encoder, device) if cfg.data.kind == "images" else None
        self._log: dict = {}

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            self._text_encoder = TextEncoder(self.stage_cfg.text_encoder, self.device)
        return self._text_encoder

    def build_model(self) -> nn.Module:
        model = HARTForT2I(self.stage_cfg.model)
        if self.stage_cfg.head_only:
            model.requires_grad_(False)
            model.diffloss.requires_grad_(True)
        if self.cfg.run.activation_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def load_init(self, module: nn.Module, path: str) -> None:
        """Start from a previous stage (or an imported official checkpoint): all weights, strictly, one
        tensor at a time into the (partitioned) model."""
        file = f"{path.rstrip('/')}/model.safetensors"
        with safe_open(file, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            lvl = f.get_tensor("lvl_1L") if "lvl_1L" in keys else None
            bias = tuple(f.get_slice("attn_bias_for_masking").get_shape()) if "attn_bias_for_masking" in keys else None
        check_regenerable_buffers(module, lvl, bias)
        zero_utils.load_safetensors(module, file, skip=REGENERABLE_BUFFERS)

    def make_reader(self, rank: int, world_size: int) -> StreamingReader:
        return StreamingReader(self.cfg.data, rank=rank, world_size=world_size)

    @torch.no_grad()
    def prepare(self, batch: dict, step: int) -> dict:
        device = self.device
        if self.cfg.data.kind == "tokens":
            idx_BL = batch["idx"].to(device)
            idx_Bl = list(idx_BL.split([pn * pn for pn in self.stage_cfg.model.patch_nums], dim=1))
            f_rest = batch["frest"].to(device)
            context, mask = batch["context"].to(device), batch["context_mask"].to(device)
            pos = batch["context_position_ids"].to(device)
        else:
            img = to_unit_range(batch["image"]).to(device)
            idx_Bl, f_rest = self.tokenizer.img_to_idxBl_and_frest(img)
            context, mask, pos = self.text_encoder.encode(batch["caption"])
        x_wo_first = self.tokenizer.idxBl_to_var_input(idx_Bl)
        return {"context": context, "context_mask": mask, "x_BLCv_wo_first_l": x_wo_first,
                "gt_idx": idx_Bl, "f_rest_last": f_rest, "codebook": self.tokenizer.quantize.codebook(),
                "context_position_ids": pos, "generator": self.generator}

    def attention_problem(self) -> dict:
        """The training attention's shape for `run.attention: auto` to time kernels at: the micro-batch,
        heads, head dim, and the scale segments with the expected number of kept last-scale tokens."""
        mc = self.stage_cfg.model
        hd = mc.embed_dim // mc.num_heads
        seg = [mc.context_token] + [p * p for p in mc.patch_nums[1:-1]] + [round(expected_kept_last(mc))]
        return {"batch": self.cfg.data.batch_size, "heads": mc.num_heads, "head_dim": hd, "seg_lens": seg,
                "scale": 0.25 / hd ** 0.5}

    def frozen_modules(self, module: nn.Module) -> list[nn.Module]:
        """What this rank holds besides the trained model: the tokenizer, and the text encoder once loaded."""
        return [self.tokenizer] + ([self._text_encoder.model] if self._text_encoder is not None else [])

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["key"])  # both kinds of batch list their samples' keys

    def after_step(self, module: nn.Module, outputs: dict, step: int) -> None:
        per_scale = torch.stack([outputs["ce_per_scale"].detach().float(), outputs["acc_per_scale"].detach().float()])
        if dist.is_initialized():
            dist.all_reduce(per_scale)
            per_scale /= dist.get_world_size()
        self._log = {f"ce/scale_{i:02d}": float(v) for i, v in enumerate(per_scale[0])}
        self._log.update({f"acc/scale_{i:02d}": float(v) for i, v in enumerate(per_scale[1])})

    def log_values(self) -> dict:
        return self._log

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def evaluate(self, module: nn.Module, ema, step: int) -> dict:
        return {}

    @torch.no_grad()
    def images(self, module: nn.Module, ema, step: int) -> dict[str, np.ndarray]:
        """A grid for the fixed prompts (collective under ZeRO-3: every rank runs the same sampling)."""
        s = self.stage_cfg
        if not s.sample_prompts:
            return {}
        was_training = module.training
        module.eval()
        imgs = sample_images(module, self.tokenizer, self.text_encoder, list(s.sample_prompts), seed=s.sample_seed,
                             cfg_scale=s.sample_cfg, top_k=s.sample_top_k, device=self.device)
        module.train(was_training)
        grid = torch.cat(list(imgs), dim=2)  # 3, H, N*W
        return {"samples": (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()}
