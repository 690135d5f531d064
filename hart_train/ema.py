"""Exponential moving average of the trainable weights, sharded like the weights themselves.

HART infers with EMA weights (`ema_model.bin`). Under ZeRO-3 a rank holds only its partition of each
parameter (`param.ds_tensor`, a flat slice `[rank * n, (rank + 1) * n)` of the padded flattened
tensor), so each rank keeps the EMA of exactly that slice: EMA memory is 1/N per rank like the
weights, and the update is a local lerp with no communication. Under ZeRO-0/1/2 every rank holds the
full parameter and keeps the full EMA (identical on all ranks).

On save the shards are gathered into full tensors on rank 0 (`full_state_dict`), so the saved EMA is
independent of the world size; on load each rank slices out its own partition again. The shadow is
kept in fp32 even when the module computes in bf16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _is_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def _local(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if _is_partitioned(p) else p.data


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        for name, p in module.named_parameters():
            if p.requires_grad:
                self.names.append(name)
                self.params.append(p)
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for s, p in zip(self.shadow, self.params):
            s.lerp_(_local(p).float(), 1.0 - d)

    def _gather(self, s: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        if not _is_partitioned(p):
            return s.clone()
        world = dist.get_world_size() if dist.is_initialized() else 1
        parts = [torch.empty_like(s) for _ in range(world)]
        if world > 1:
            dist.all_gather(parts, s.contiguous())
        else:
            parts = [s]
        flat = torch.cat(parts)[: p.ds_numel]
        return flat.view(p.ds_shape)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full EMA tensors (collective under ZeRO-3: call on every rank; all get the result)."""
        return {n: self._gather(s, p) for n, s, p in zip(self.names, self.shadow, self.params)}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        rank = dist.get_rank() if dist.is_initialized() else 0
        for i, (n, p) in enumerate(zip(self.names, self.params)):
            full = state[n].float()
            if not _is_partitioned(p):
                self.shadow[i].copy_(full.view_as(self.shadow[i]))
                continue
            size = self.shadow[i].numel()
            flat = full.reshape(-1)
            start = rank * size
            piece = flat[start : start + size]
            self.shadow[i].zero_()
            self.shadow[i][: piece.numel()].copy_(piece)
