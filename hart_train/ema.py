"""Exponential moving average of the trainable weights' fp32 masters, sharded like the masters.

HART infers with EMA weights (`ema_model.bin`). The EMA follows the optimizer's fp32 master weights, not
the module's bf16 copies (a bf16 copy rounds away updates smaller than 2^-8 of the weight, which is most
of them late in training). Each rank keeps the EMA of exactly its own piece of each master
(`zero_utils.local_master`): under ZeRO-3 the parameter's partition, under ZeRO-1/2 (and DeepSpeed's bf16
optimizer) its fragment of the flat master, so EMA memory is 1/N per rank and the update is a local lerp
with no communication. Without a DeepSpeed master (fp32, no ZeRO) every rank holds the full EMA.

On save each tensor is gathered to rank 0 and moved to CPU one at a time (`full_state_dict`), so the saved
EMA is independent of the world size and no rank ever holds the whole fp32 model on its device; on load
each rank slices its own piece out again. The shadow lives where the master piece is read from (the
rank's device; with optimizer offload DeepSpeed hands the piece over on the device too).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hart_train import zero_utils


class EMA:
    def __init__(self, module: nn.Module, decay: float, device: torch.device):
        self.decay = decay
        self.device = device
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        for name, p in module.named_parameters():
            if p.requires_grad:
                self.names.append(name)
                self.params.append(p)
        self.shadow = [zero_utils.local_master(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for s, p in zip(self.shadow, self.params):
            s.lerp_(zero_utils.local_master(p), 1.0 - d)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA tensors on CPU on rank 0 (collective: every rank calls it; the others get {})."""
        out = {}
        for n, s, p in zip(self.names, self.shadow, self.params):
            full = zero_utils.gather_master(p, s, self.device)
            if full is not None:
                out[n] = full
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        rank = dist.get_rank() if dist.is_initialized() else 0
        for s, n, p in zip(self.shadow, self.names, self.params):
            s.copy_(zero_utils.master_slice(p, state[n], rank))
