"""Reading and writing whole parameters whatever the ZeRO stage.

Under ZeRO-3 a module's parameters are empty placeholders outside its forward; under ZeRO-1/2 (and with
bf16) the optimizer owns fp32 master copies that overwrite the module's weights at every step. These
helpers hide both: `local_master` is this rank's piece of a parameter's fp32 master (what the EMA follows),
`gather_master` assembles one parameter on rank 0 (`full_state_dict` does so for all, one at a time, so
peak memory is one full tensor beyond the shards), and `set_full_param` writes a new value into the module
weight, the fp32 master and, optionally, zeroes the Adam moments of given rows.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _gathered(params, modifier_rank: int | None = None) -> contextlib.AbstractContextManager:
    """ZeRO-3 partitioned `params` gathered whole for the block (a no-op for ordinary parameters); with a
    `modifier_rank`, that rank's in-place changes are kept and re-partitioned on exit."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def modifying(params) -> contextlib.AbstractContextManager:
    """Gather `params` for an in-place change made identically on every rank (rank 0's result is kept).
    Initialisers that run after a submodule was built use it, so they also work under
    `partitioned_construction`."""
    return _gathered(params, modifier_rank=0)


def partitioned_construction(ds_config: dict, enabled: bool) -> contextlib.AbstractContextManager:
    """Build a module under ZeRO-3's partitioned initialisation: each submodule's parameters are split
    across the ranks as soon as it is constructed, so no rank ever holds the whole model. They are
    created in the run's parameter dtype, which zero.Init takes from `ds_config` (its `dtype` argument
    is not passed: DeepSpeed 0.19.8 turns any given dtype into bf16 on accelerators without fp16)."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False)


@torch.no_grad()
def load_safetensors(module: nn.Module, path: str, skip: tuple[str, ...] = (),
                     targets: dict[str, torch.Tensor] | None = None) -> None:
    """Load a safetensors file into `module` strictly (same names, same shapes; `skip` names are ignored),
    one tensor at a time: under ZeRO-3 each parameter is gathered, written by rank 0 (the only rank that
    reads its data) and re-partitioned, so no rank holds more than one full tensor beyond its shards.
    `targets` (file name -> parameter or buffer) replaces the module's own names and tensors: every
    parameter and persistent buffer by default (a LoRA model loads its base under the official names)."""
    import torch.distributed as dist
    from safetensors import safe_open

    rank = dist.get_rank() if dist.is_initialized() else 0
    if targets is None:
        targets = dict(module.named_parameters())
        targets.update((n, b) for n, b in module.named_buffers() if is_persistent(module, n))
    with safe_open(path, framework="pt", device="cpu") as f:
        keys = set(f.keys()) - set(skip)
        missing, unexpected = sorted(set(targets) - keys), sorted(keys - set(targets))
        if missing or unexpected:
            raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, t in targets.items():
            want = tuple(getattr(t, "ds_shape", t.shape))
            got = tuple(f.get_slice(name).get_shape())
            if got != want:
                raise ValueError(f"{path}: {name} has shape {got}, the model's is {want}")
    for name, t in targets.items():
        partitioned = hasattr(t, "ds_id")
        with modifying([t]):
            if rank == 0 or not partitioned:
                # the file is memory-mapped: open it per tensor, so its pages are let go after each one
                with safe_open(path, framework="pt", device="cpu") as f:
                    t.data.copy_(f.get_tensor(name))


def local_master(p: nn.Parameter) -> torch.Tensor:
    """This rank's piece of `p`'s fp32 master weights, flat: under ZeRO-3 its partition (padded, the
    `ds_tensor` layout), under ZeRO-1/2 and DeepSpeed's bf16 optimizer its fragment of the flat master
    (possibly empty), else the whole weight. A view of the optimizer's master where one exists, so what
    the optimizer writes is what this reads; frozen parameters have no master and give their own values."""
    if hasattr(p, "ds_id"):
        if p.requires_grad and hasattr(p, "_z3_optimizer"):
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        return p.ds_tensor.float()
    if hasattr(p, "_hp_mapping"):
        if p._hp_mapping is None:  # this rank owns no fragment of p
            return p.data.new_zeros(0, dtype=torch.float32)
        return p._hp_mapping.get_hp_fragment()
    return p.data.reshape(-1).float()


def master_slice(p: nn.Parameter, full: torch.Tensor, rank: int) -> torch.Tensor:
    """The piece of a full value of `p` that `local_master(p)` holds on `rank` (flat, fp32, on CPU)."""
    flat = full.reshape(-1).float()
    if hasattr(p, "ds_id"):
        size = p.ds_tensor.numel()
        out = flat.new_zeros(size)  # the partition of the last rank is zero-padded
        piece = flat[rank * size : (rank + 1) * size]
        out[: piece.numel()] = piece
        return out
    mapping = getattr(p, "_hp_mapping", None)
    if hasattr(p, "_hp_mapping"):
        if mapping is None:
            return flat.new_zeros(0)
        a = mapping.lp_fragment_address
        return flat.narrow(0, a.start, a.numel)
    return flat


def gather_master(p: nn.Parameter, local: torch.Tensor, device: torch.device, dst: int = 0) -> torch.Tensor | None:
    """Collective: the full fp32 value of `p` from every rank's `local` piece (as `local_master` lays it
    out), as a CPU tensor on rank `dst`; None elsewhere. One parameter's worth of memory on `dst` only."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = local.detach().float().to(device)
    if hasattr(p, "ds_id"):
        parts = [torch.empty_like(local) for _ in range(world)] if rank == dst else None
        if world > 1:
            dist.gather(local.contiguous(), parts, dst=dst)
        else:
            parts = [local]
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu() if rank == dst else None
    if hasattr(p, "_hp_mapping"):  # disjoint fragments of the flat weight: their sum is the weight
        full = torch.zeros(p.numel(), dtype=torch.float32, device=device)
        if p._hp_mapping is not None:
            a = p._hp_mapping.lp_fragment_address
            full.narrow(0, a.start, a.numel).copy_(local)
        if world > 1:
            dist.reduce(full, dst=dst)
        return full.view(p.shape).cpu() if rank == dst else None
    return local.view(p.shape).cpu() if rank == dst else None  # every rank holds all of it


@torch.no_grad()
def full_state_dict(module: nn.Module, device: torch.device, rank: int, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of every parameter (its fp32 master where the optimizer keeps one) and of the
    persistent buffers (floating ones as fp32), on rank 0; other ranks take part and get an empty dict.
    Collective. One parameter at a time, so beyond the shards rank 0 holds one full tensor on `device`.
    `trainable_only`: the trainable parameters alone, no buffers (a LoRA run's adapters)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        full = gather_master(p, local_master(p), device)
        if full is not None:
            out[name] = full.clone()
    if rank == 0 and not trainable_only:
        for name, b in module.named_buffers():
            if is_persistent(module, name):
                out[name] = (b.detach().float() if b.is_floating_point() else b.detach()).cpu().clone()
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


def is_persistent(module: nn.Module, name: str) -> bool:
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


def storage_bytes(tensors, seen: set) -> int:
    """Bytes of the storages behind `tensors`, each storage once (`seen` holds the data pointers counted)."""
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def memory_breakdown(engine) -> dict[str, int]:
    """Bytes this rank holds now, by what holds them, counted from the tensors themselves (shared
    storage once): the module's parameters (ZeRO-3: their partitions), the optimizer's fp32 master
    weights (the tensors its inner torch optimizer steps), the optimizer state (Adam moments), and the
    gradients (ZeRO-3's flat gradient partitions, or the masters' .grad), and ZeRO-3's reduce buckets."""
    seen: set = set()
    module = engine.module
    # ZeRO-3: the partition, and the full tensor where one is held (persistent small parameters; others
    # are released to an empty tensor between uses)
    params = storage_bytes((t for p in module.parameters() for t in (getattr(p, "ds_tensor", None), p.data)), seen)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    masters = [p for g in inner.param_groups for p in g["params"]]
    # ZeRO-3 keeps its fp32 partitions here (the inner optimizer may hold placeholders, e.g. with offload)
    master_bytes = storage_bytes(list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])) + masters, seen)
    state = storage_bytes((v for st in inner.state.values() for v in st.values()), seen)
    grads = storage_bytes([getattr(engine.optimizer, "grad_partitions_flat_buffer", None)]
                           + [p.grad for p in masters], seen)
    # ZeRO-3's gradient reduce buckets: allocated whole at engine start (reduce_bucket_size elements each)
    buckets = storage_bytes([getattr(b, "buffer", None) for b in getattr(engine.optimizer, "ipg_buckets", {}).values()], seen)
    return {"parameters": params, "master_weights": master_bytes, "optimizer_state": state, "gradients": grads,
            "buckets": buckets}
