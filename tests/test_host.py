"""CPU ranks keep freed memory: a training step's large temporaries are reused, not page-faulted in every step."""
from __future__ import annotations

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
layer = MRConv(40, 256, 28)  # MRConvNeXt-atto's first stage at 64 px
u = torch.randn(16, 40, 256, requires_grad=True)
for _ in range(2):
    layer(u).sum().backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    layer(u).sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_steps_stop_page_faulting_their_temporaries():
    default, retained = _faults_per_step("default"), _faults_per_step("retain")
    assert default > 1000  # the test can tell: glibc hands the FFT buffers back to the kernel every step
    assert retained * 10 < default
