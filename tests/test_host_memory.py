"""`hart_train.host_memory`: with it, a freed large buffer is reused without page faults."""

import json
import platform
import subprocess
import sys

import pytest

_PROBE = """
import json, resource, sys, torch
from hart_train import host_memory
accepted = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)  # 64 MiB, written: every page touched
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"accepted": accepted, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_buffers_are_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    default, keep = _probe("default"), _probe("keep")
    assert keep["accepted"] is True
    # glibc's default serves 64 MiB with a fresh mmap each time: every page faults again
    assert min(default["faults"][-10:]) >= pages
    # kept: the heap grows to a steady state (aligned allocations fragment it for a while), from then on
    # the freed buffers are reused
    assert keep["faults"][0] >= pages
    assert sum(keep["faults"][-10:]) < pages // 10
