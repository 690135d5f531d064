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


def rank_device(kind: str) -> torch.device:
    """This rank's one device: `cuda:LOCAL_RANK` for "cuda", else the CPU. Everything a rank allocates
    (stage, frozen tokenizer and text encoder, generators, evaluation, collectives) goes here; it is made
    once, in `init`, after the process group exists, and passed down."""
    return torch.device("cuda", local_rank()) if kind == "cuda" else torch.device(kind)


def generator(device: torch.device) -> torch.Generator:
    """A torch.Generator for random draws on `device` (the `meta` device, which draws nothing and has no
    generator of its own, gets a CPU one: it is the stand-in device of the device tests)."""
    return torch.Generator(device="cpu" if device.type == "meta" else device)


def init(device: str, timeout_s: float) -> torch.device:
    """Initialise the default process group (idempotent); returns this rank's device (`rank_device`)."""
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return rank_device(device)
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
    _unlink_shm_allreduce_buffer()
    return rank_device(device)


SHM_DIR = "/dev/shm"


def shm_allreduce_buffer_name(rank: int) -> str:
    """The /dev/shm object DeepSpeed's CPU shared-memory allreduce creates for `rank` (csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_allreduce_buffer() -> None:
    """When all ranks are on one machine, DeepSpeed's CPU backend creates a ~66 MB shared-memory
    buffer per rank and never unlinks it, so every CPU run left its buffers in /dev/shm (RAM) for good:
    19 GB had piled up on the development machine until a benchmark was OOM-killed. Once every rank
    has mapped every buffer (they wait for each other inside init; the barrier makes sure all are
    past it), each rank unlinks its own name: the mappings stay valid, and the memory is freed when
    the last rank exits, however it exits."""
    if dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(os.path.join(SHM_DIR, shm_allreduce_buffer_name(dist.get_rank())))
    except FileNotFoundError:  # no shared-memory allreduce here (ranks on several machines, or not built)
        pass


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
