"""CPU ranks keep freed memory: a training step's large temporaries are reused, not page-faulted in every step."""
from __future__ import annotations

import statistics
import subprocess
import sys

import pytest

STEPS = """
import resource, sys
import torch
from models import MRConv
from train.host import retain_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "retain":
    assert retain_freed_memory()
layer = MRConv(160, 256, 28)  # MRConvNeXt-atto's first stage at 64 px, four times as wide
# batch 128: its FFT temporaries (one branch's spectra, 42 MB) are past the 32 MiB cap of glibc's adaptive mmap
# threshold, so by default every step maps them afresh; below the cap (40 channels: 10.5 MB since the FFT path works
# one branch at a time) glibc's adaptation makes the default vary from run to run
u = torch.randn(128, 160, 256, requires_grad=True)
for _ in range(2):
    layer(u).sum().backward()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    layer(u).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)  # per step
"""


def _faults_per_step(mode: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return [float(v) for v in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_steps_stop_page_faulting_their_temporaries():
    """By default glibc maps these temporaries afresh and hands them back every step (tens of thousands of faults a
    step, every step); with freed memory kept the typical step faults nothing (the median: now and then the host's
    own memory reclaim, or a new allocation size, faults a few pages back in)."""
    default, retained = _faults_per_step("default"), _faults_per_step("retain")
    assert min(default) > 10_000, default  # the test can tell, in every step
    assert statistics.median(retained) * 10 < min(default), (retained, default)
