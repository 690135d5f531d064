"""Reading and writing whole parameters whatever the ZeRO stage.

Under ZeRO-3 a module's parameters are empty placeholders outside its forward; under ZeRO-1/2 the
optimizer owns fp32 master copies that overwrite the module's weights at every step. These helpers hide
both: `full_state_dict` gathers one parameter at a time (so peak memory is one full tensor beyond the
shards), and `set_full_param` writes a new value into the module weight, the fp32 master and,
optionally, zeroes the Adam moments of given rows.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _gathered(params: list[nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def full_state_dict(module: nn.Module, only_main: bool = True, rank: int = 0) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of every parameter and persistent buffer (collective under ZeRO-3).

    With `only_main`, ranks other than 0 return an empty dict (they still take part in the gathers)."""
    keep = not only_main or rank == 0
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        with _gathered([p]):
            if keep:
                out[name] = p.detach().float().cpu().clone()
    if keep:
        for name, b in module.named_buffers():
            if _is_persistent(module, name):
                out[name] = b.detach().cpu().clone()
    return out


@torch.no_grad()
def full_param(param: nn.Parameter) -> torch.Tensor:
    """The full fp32 value of one parameter on every rank (the optimizer's master copy where there is one)."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is not None:
        return master.detach().float().cpu().clone()
    with _gathered([param]):
        return param.detach().float().cpu().clone()


def _is_persistent(module: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return leaf not in owner._non_persistent_buffers_set


@torch.no_grad()
def set_full_param(param: nn.Parameter, value: torch.Tensor, reset_rows: torch.Tensor | None = None) -> None:
    """Give `param` the full `value` (identical on every rank): module weight, fp32 master, and the
    Adam moments of `reset_rows` zeroed. Works for plain modules and ZeRO stages 1-3."""
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.detach()
    if hasattr(param, "ds_id"):  # ZeRO-3: write this rank's partition of the flat tensor
        size = param.ds_tensor.numel()
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        flat = value.reshape(-1).to(param.ds_tensor)
        piece = flat[rank * size : rank * size + size]
        param.ds_tensor.zero_()
        param.ds_tensor[: piece.numel()].copy_(piece)
    else:
        param.data.copy_(value.to(param.data))
    safe_set_full_fp32_param(param, value.float())
    if reset_rows is not None and reset_rows.numel():
        for key in ("exp_avg", "exp_avg_sq"):
            state = safe_get_full_optimizer_state(param, key)
            if state is not None:
                state = state.clone()
                state[reset_rows.to(state.device)] = 0
                safe_set_full_optimizer_state(param, state, key)
