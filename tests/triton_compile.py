"""Compiling a Triton kernel for sm_90 on a machine without a GPU (Triton's own compiler and ptxas), for the tests
that check what the interpreter cannot: tile shapes, types and shared memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_memory(script: str) -> dict:
    """Runs ``script`` (which compiles kernels and prints a JSON object of their shared memory as its last line)
    in a fresh process without the interpreter, from the repository root; returns that object."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
