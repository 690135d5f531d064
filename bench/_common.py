"""Helpers shared by the benchmark scripts: environment record, repeated timing, stderr progress.

Benchmarks run on shared machines, so every figure is a median over repeats and the JSON records the
load average before and after, next to the torch version and thread count.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import sys
import time
from typing import Callable

import torch


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": load_average(),
    }


def rank_env() -> dict:
    """The environment of a CPU rank started by a benchmark: the CPU accelerator, wandb offline, one
    thread per rank, DeepSpeed's JIT-built ops kept beside this Python environment."""
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONWARNINGS="ignore")
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(times_s: list[float], cpu_s: list[float] | None = None) -> dict:
    """Median / min / max of wall durations (s) and the raw values; with `cpu_s`, the median process
    CPU time too (all threads; less sensitive than wall time to other users' load, not to cache contention)."""
    out = {
        "median_s": round(statistics.median(times_s), 4),
        "min_s": round(min(times_s), 4),
        "max_s": round(max(times_s), 4),
        "n": len(times_s),
        "all_s": [round(t, 4) for t in times_s],
    }
    if cpu_s is not None:
        out["median_cpu_s"] = round(statistics.median(cpu_s), 4)
    return out


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Run each callable `warmup` times, then `repeats` rounds that call every callable once in turn, so
    a load spike from other users hits all variants alike. Returns per variant {"wall": [...], "cpu": [...]}
    durations in seconds (wall clock and this process's CPU time)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            cpu, start = time.process_time(), time.perf_counter()
            fn()
            times[name]["wall"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.process_time() - cpu)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {t['wall'][-1]:.3f}s (cpu {t['cpu'][-1]:.3f}s)" for n, t in times.items()))
    return times
