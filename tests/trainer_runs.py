"""Launching the trainer as users do (torchrun, the deepspeed launcher, or plain python) on a small recipe, for
the end-to-end tests."""
from __future__ import annotations

import os
import subprocess
import sys

from train.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# 256 samples / (16 per rank x 2 ranks) = 8 optimizer updates per epoch.
SMALL = ["data.batch_size=16", "data.num_workers=0", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
         "logging.log_every_steps=2", "logging.progress_bar=false", "checkpoint.every_steps=4", "optim.lr=2e-3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def launch(run_dir, data, *sets, launcher="torchrun", nproc=2, config="fashion_mnist", wait=True, timeout=300,
           prefix=()):
    args = ["--config", config, "--run-dir", str(run_dir)]
    for s in [f"data.dir={data}", *SMALL, *sets]:
        args += ["--set", s]
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, "-m", "train"]
    elif launcher == "deepspeed":
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, "--module", "train"]
    else:
        cmd = [sys.executable, "-m", "train"]
    cmd = [*prefix, *cmd]
    kw = dict(cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return subprocess.Popen(cmd + args, start_new_session=True, **kw)
    proc = subprocess.run(cmd + args, timeout=timeout, **kw)
    return proc


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout
