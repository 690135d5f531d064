"""Process-group setup and small collective helpers, model-agnostic.

One code path for every launch mode: bare (one process, no env), `torchrun`, and the `deepspeed`
launcher all end in `deepspeed.init_distributed`, with the backend chosen by the configured device
(cpu -> gloo, cuda -> nccl) and the collective timeout from the config, so that when a rank dies the
others fail within that timeout instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device: str, timeout_s: float) -> None:
    """Initialise the default process group (idempotent)."""
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:  # bare single process: make it a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(
        dist_backend=backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        auto_mpi_discovery=False,
        verbose=False,
    )


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (used to agree on a preemption save)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
