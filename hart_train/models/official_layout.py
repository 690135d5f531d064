"""HARTForT2I's weights in the released layout: loading a released state dict, producing one, and the two
buffers the released code stores but this implementation regenerates from the config (`lvl_1L`,
`attn_bias_for_masking`)."""

from __future__ import annotations

import torch

from .hart_t2i import HARTForT2I

REGENERABLE_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


def load_official_state_dict(model: HARTForT2I, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a released `HARTForT2I` state dict (e.g. `ema_model.bin`). The regenerable buffers `lvl_1L` and
    `attn_bias_for_masking` are checked against this config's sequence layout, then dropped."""
    sd = dict(state_dict)
    bias = sd.get("attn_bias_for_masking")
    check_regenerable_buffers(model, sd.get("lvl_1L"), None if bias is None else tuple(bias.shape))
    for name in REGENERABLE_BUFFERS:
        sd.pop(name, None)
    return model.load_state_dict(sd, strict=strict)


def check_regenerable_buffers(model: HARTForT2I, lvl_1L: torch.Tensor | None, attn_bias_shape: tuple | None) -> None:
    """A released checkpoint's `lvl_1L` and (the shape of) `attn_bias_for_masking`, where present, must fit
    this config's sequence layout; they are regenerated, not loaded."""
    T, L = model.config.context_token, model.L
    if lvl_1L is not None:
        want = _official_buffers(model, with_mask=False)["lvl_1L"]
        if tuple(lvl_1L.shape) != tuple(want.shape) or not torch.equal(lvl_1L.cpu().long(), want):
            raise ValueError(f"lvl_1L in the checkpoint does not match patch_nums={model.patch_nums}, context_token={T}")
    if attn_bias_shape is not None and attn_bias_shape != (1, 1, T + L - 1, T + L - 1):
        raise ValueError(f"attn_bias_for_masking has shape {attn_bias_shape}, expected length {T + L - 1}")


def _official_buffers(model: HARTForT2I, with_mask: bool = True) -> dict[str, torch.Tensor]:
    T = model.config.context_token
    lvl = torch.cat([torch.zeros(T, dtype=torch.long)] + [torch.full((p * p,), i + 1) for i, p in enumerate(model.patch_nums[1:])])
    out = {"lvl_1L": lvl.view(1, -1)}
    if with_mask:
        out["attn_bias_for_masking"] = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf).view(1, 1, lvl.numel(), lvl.numel())
    return out


def official_state_dict(model: HARTForT2I, include_buffers: bool = True) -> dict[str, torch.Tensor]:
    """This model's weights in the released layout; with `include_buffers` the released code loads it
    strictly (the dense mask is (T+L-1)^2 fp32: ~380 MB at 1024px), without it load with strict=False."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if include_buffers:
        sd.update(_official_buffers(model))
    return sd
