"""Kernels that can run differently on a GPU, each behind one function with a torch equivalent that runs
everywhere; which ran is decided once per run, logged, and written to <run>/kernels.json.

- `block_causal(q, k, v, seg_lens, scale)`: the training forward's block-causal attention.
  "key_prefix" (`attention.block_causal_attention`: SDPA per scale segment over its key prefix, no mask)
  or "dense_mask" (one SDPA with the released code's additive mask, `attention.dense_masked_attention`,
  the mask built once per layout).
  `run.attention: auto` times both (forward + backward, median of a few) at the run's own shape on the
  rank's device, checks each against key_prefix, and takes the fastest that passes. Rank 0 decides and
  broadcasts (every rank must round alike), and a resumed run reuses the recorded choice: the two
  round differently, so switching mid-run would break bit-exact continuation.
- `rms_norm(x, weight, eps)`: apex's fused RMSNorm on CUDA where apex imports, torch ops otherwise.
- `adamw(groups, ...)`: apex's FusedAdam (AdamW mode) on CUDA where apex imports, torch's AdamW (its
  fused CUDA kernel on CUDA) otherwise.

`bench/gpu_check.py` compares every GPU path with the torch path's outputs.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from typing import Callable, Sequence

import torch

from .attention import block_causal_attention, block_causal_mask

@functools.lru_cache(maxsize=1)  # the current step's layout only (the kept count changes every step)
def _mask(seg_lens: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return block_causal_mask(seg_lens, device, dtype)


def _dense_mask(q, k, v, seg_lens, scale):
    """dense_masked_attention with its mask built once per layout (every layer of a step shares it)."""
    mask = _mask(tuple(int(n) for n in seg_lens), q.device, q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


ATTENTION: dict[str, Callable] = {"key_prefix": block_causal_attention, "dense_mask": _dense_mask}
_active = {"attention": "key_prefix"}


def block_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_lens: Sequence[int], scale: float):
    """Block-causal attention (B, H, L, d) with the implementation chosen for this run."""
    return ATTENTION[_active["attention"]](q, k, v, seg_lens, scale)


def clear_caches() -> None:
    _mask.cache_clear()


def set_attention(name: str) -> None:
    if name not in ATTENTION:
        raise ValueError(f"attention implementation {name!r}: expected one of {sorted(ATTENTION)} or auto")
    _active["attention"] = name


def active_attention() -> str:
    return _active["attention"]


# ----------------------------------------------------------------------------- apex


@functools.lru_cache(maxsize=None)  # a failed import would search the path again at every call
def _apex_module(name: str):
    try:
        import importlib

        return importlib.import_module(name)
    except Exception:  # not installed, or built without its CUDA extensions
        return None


@functools.lru_cache(maxsize=1)
def apex_available() -> bool:
    return torch.cuda.is_available() and _apex_module("apex.normalization.fused_layer_norm") is not None \
        and _apex_module("apex.optimizers") is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in fp32, cast back to x's dtype, multiply by the weight. On CUDA with
    apex and matching dtypes, apex's fused kernel (also fp32 inside)."""
    if x.is_cuda and x.dtype == weight.dtype and _use_apex():
        fused = _apex_module("apex.normalization.fused_layer_norm")
        return fused.fused_rms_norm_affine(x, weight, weight.shape, eps)
    in_dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(in_dtype)


def adamw(groups, lr: float, betas: tuple, eps: float, device_type: str) -> torch.optim.Optimizer:
    """AdamW over param groups that carry their own weight_decay."""
    if device_type == "cuda" and _use_apex():
        return _apex_module("apex.optimizers").FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type == "cuda")


def _use_apex() -> bool:
    return os.environ.get("HART_DISABLE_APEX", "") != "1" and apex_available()


# ----------------------------------------------------------------------------- choosing


def time_attention(name: str, q, k, v, seg_lens, scale, repeats: int = 3) -> float:
    """Median seconds of forward + backward of one implementation (after one untimed warm-up)."""
    fn, times = ATTENTION[name], []
    for i in range(repeats + 1):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        t0 = time.perf_counter()
        fn(qq, kk, vv, seg_lens, scale).float().square().sum().backward()
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_attention(problem: dict, device: torch.device, dtype: torch.dtype, candidates=None) -> dict:
    """Times every implementation at `problem` (batch, heads, head_dim, seg_lens, scale) and checks its
    output and input gradients against the exact result (key_prefix in fp32 on the same inputs):
    {name: {"s": seconds, "max_rel_err": ..., "ok": bool}}. A kernel passes within twice key_prefix's own
    error in this dtype, or two units of the dtype's rounding (2 * 2^-8 in bf16, 1e-5 in fp32), whichever
    is larger: as accurate as the default kernel, so the choice does not trade accuracy for speed."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B, H, d, seg = problem["batch"], problem["heads"], problem["head_dim"], list(problem["seg_lens"])
    q, k, v = (torch.randn(B, H, sum(seg), d, generator=g).to(device, dtype) for _ in range(3))
    exact = _outputs("key_prefix", q.float(), k.float(), v.float(), seg, problem["scale"])
    errors = {name: max(rel_err(a, b) for a, b in zip(_outputs(name, q, k, v, seg, problem["scale"]), exact))
              for name in candidates or ATTENTION}
    bound = max(2 * errors.get("key_prefix", 0.0), 1e-5 if dtype == torch.float32 else 2 * 2**-8)
    return {name: {"s": time_attention(name, q, k, v, seg, problem["scale"]), "max_rel_err": err, "ok": err <= bound}
            for name, err in errors.items()}


def rel_err(a: torch.Tensor | None, b: torch.Tensor) -> float:
    """Largest |a - b| over the largest |b| (inf where `a` is missing or misshapen)."""
    if a is None or a.shape != b.shape:  # e.g. no gradient reached an input
        return float("inf")
    return float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1e-12)


def _outputs(name, q, k, v, seg, scale):
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    o = ATTENTION[name](qq, kk, vv, seg, scale)
    o.float().square().sum().backward()
    return o.detach(), qq.grad, kk.grad, vv.grad


def configure(requested: str, problem: dict | None, device: torch.device, dtype: torch.dtype, run_dir: str,
              broadcast: Callable, is_main: bool, optimizer_offloaded: bool = False) -> dict:
    """Decide this run's kernels (see the module docstring), apply them and return the record. Only rank 0
    reads and writes kernels.json (another rank could read it half written) and measures; every rank
    gets its decision, or its error, by `broadcast`."""
    path = os.path.join(run_dir, "kernels.json")
    record = error = None
    if is_main:
        try:
            record = _decide(requested, problem, device, dtype, path)
        except ValueError as e:
            error = str(e)
    record, error = broadcast((record, error))
    if error is not None:
        raise ValueError(error)
    apex = device.type == "cuda" and _use_apex()  # what runs now (these two do not change the model's numerics)
    optimizer = "deepspeed.DeepSpeedCPUAdam" if optimizer_offloaded else "apex.FusedAdam" if apex else "torch.AdamW"
    record.update(rms_norm="apex" if apex else "torch", optimizer=optimizer)
    if is_main:
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
    set_attention(record["attention"])
    return record


def _decide(requested: str, problem: dict | None, device: torch.device, dtype: torch.dtype, path: str) -> dict:
    """Rank 0: the recorded attention kernel of a resumed run, else `requested`, measured where `auto`."""
    if os.path.exists(path):  # a resumed run keeps its kernels
        with open(path) as f:
            record = json.load(f)
        if requested not in ("auto", record["attention"]):
            raise ValueError(f"run.attention={requested!r}, but this run was started with {record['attention']!r} "
                             f"({path}); a run keeps its attention kernel to resume bit for bit")
        return record
    if requested != "auto":
        return {"attention": requested, "measured": None}
    if problem is None:
        return {"attention": "key_prefix", "measured": None}
    measured = measure_attention(problem, device, dtype)
    passing = {n: m for n, m in measured.items() if m["ok"]}
    return {"attention": min(passing, key=lambda n: passing[n]["s"]), "measured": measured, "problem": problem}
