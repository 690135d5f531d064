"""Keep freed host memory inside the process, so a training step does not page-fault its buffers in anew.

Why: glibc's malloc serves every allocation above its mmap threshold (128 KiB, rising with use to at
most 32 MiB) with a fresh `mmap` and gives it back with `munmap` when freed, and trims the heap top
past 128 KiB. A CPU training step allocates and frees the same large activations and gradients every
step (the (L, V) logits alone are 100 MB at 1024px), so each step pays a minor page fault and a
kernel zero-fill per 4 KiB page. `bench/t2i_step.py --depth 2 --host-malloc default` against
`--host-malloc keep` counts them (`median_minor_page_faults_per_step`, `median_system_cpu_s_per_step`,
`peak_rss_mb`): with the thresholds raised the freed memory stays in the heap and is reused.
PyTorch's CPU performance guide gives the same advice in the form of jemalloc or tcmalloc; this needs
no preloaded library. The price is that the process keeps its peak host memory until it exits.

Set once, early, by the trainer (`run.keep_freed_host_memory`, by default on CPU runs only) and by the step
benchmark. DataLoader workers forked later inherit it. No effect (and `False`) off glibc.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1


_KEEP_SETTINGS: tuple | None = None  # what keep_freed_memory set, re-applied after a PeakMemory region
_GLIBC_DEFAULTS = ((_M_MMAP_THRESHOLD, 128 * 1024), (_M_TRIM_THRESHOLD, 128 * 1024), (_M_TOP_PAD, 128 * 1024))


def _mallopt(settings) -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in settings)


def keep_freed_memory(top_pad: int = 64 * 2**20) -> bool:
    """Raise glibc's mmap and trim thresholds to their maximum (2 GiB - 1) and pad heap growth by
    `top_pad` bytes. Returns whether every setting was accepted."""
    global _KEEP_SETTINGS
    settings = ((_M_MMAP_THRESHOLD, _INT_MAX), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, min(top_pad, _INT_MAX)))
    ok = _mallopt(settings)
    _KEEP_SETTINGS = settings if ok else None
    return ok


class PeakMemory:
    """Peak memory of a region of code, in bytes above what was in use when it started: on CUDA the
    allocator's peak, on the host the kernel's peak resident set (VmHWM, reset by writing 5 to
    /proc/self/clear_refs). `None` where neither can be measured.

    On the host, glibc would keep freed blocks in its heap, and the resident set would count them as if
    they were live (many times the live tensors for a partitioned build, which frees a layer's full
    weights after splitting each). While measuring,
    every allocation above 64 KiB is therefore its own mapping, unmapped when freed, so the peak resident
    set follows the peak of live memory; the previous malloc settings come back afterwards."""

    def __init__(self, device):
        self.device = device
        self.start = None
        self.peak_bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif _mallopt(((_M_MMAP_THRESHOLD, 64 * 1024), (_M_TRIM_THRESHOLD, 0))) and _reset_peak_rss():
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.start is None:
            return
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak_bytes = _status_kib("VmHWM") * 1024 - self.start
            _mallopt(_KEEP_SETTINGS or _GLIBC_DEFAULTS)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # not Linux, or not permitted
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)
