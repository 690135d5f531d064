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

Set once, early, by the trainer (`run.keep_freed_host_memory`, on by default) and by the step
benchmark. DataLoader workers forked later inherit it. No effect (and `False`) off glibc.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1


def keep_freed_memory(top_pad: int = 64 * 2**20) -> bool:
    """Raise glibc's mmap and trim thresholds to their maximum (2 GiB - 1) and pad heap growth by
    `top_pad` bytes. Returns whether every setting was accepted."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, _INT_MAX), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, min(top_pad, _INT_MAX)))
    return all(mallopt(param, value) == 1 for param, value in settings)
