"""The real local SLURM cluster the tests submit to (slurm/local_cluster.sh: two slurmd "nodes" on this host): its
session fixtures and job polling, shared by the modules that submit jobs (import the fixtures by name)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
CLUSTER = REPO / "slurm" / "local_cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
JOB_TIMEOUT = 240  # a job takes ~20 s here; generous for a loaded CI machine


def _have(binary: str) -> bool:
    return shutil.which(binary) is not None or Path("/usr/sbin", binary).exists()


@pytest.fixture(scope="session")
def deepspeed_ops_built() -> None:
    """DeepSpeed JIT-builds its shared-memory comm op in the first process group init (about 90 s on 2 busy
    cores, then cached under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, which the jobs share through
    sbatch --export=ALL). Build it here, once and without a job's clock running, so that the first job on a
    fresh machine is not the one that pays for it."""
    code = ("import deepspeed\nfrom deepspeed.accelerator import get_accelerator\n"
            "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
            "if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False):\n    b.load()\n")
    res = subprocess.run([PY, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, f"building DeepSpeed's shm op failed:\n{res.stdout}\n{res.stderr}"


@pytest.fixture(scope="session")
def slurm_env(deepspeed_ops_built) -> dict:
    """A running local cluster and the environment to talk to it; brought down at the end if we started it."""
    missing = [b for b in SLURM_BINARIES if not _have(b)]
    require(not missing, f"SLURM not installed ({', '.join(missing)} missing): "
                         "apt-get install -y slurmctld slurmd slurm-client munge")
    state = os.environ.get("MRCONV_SLURM_DIR", "/tmp/mrconv-slurm")
    # MRCONV_EXIT_WAIT: how long a rank whose peer was killed may hang in a collective before SLURM stops it.
    env = {**os.environ, "MRCONV_SLURM_DIR": state, "SLURM_CONF": f"{state}/slurm.conf", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "MRCONV_EXIT_WAIT": "10"}
    was_up = subprocess.run(["bash", str(CLUSTER), "status"], env=env, capture_output=True).returncode == 0
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        pytest.fail(f"local SLURM cluster did not start (rc {up.returncode}):\n{up.stdout}\n{up.stderr}", pytrace=False)
    yield env
    if not was_up:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, timeout=120)


def job_info(env: dict, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def read_log(path: Path) -> str:
    return path.read_text() if path.exists() else "(missing)"


def wait_job(env: dict, job_id: str, log: Path, timeout: float = JOB_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} not done after {timeout}s: {job_info(env, job_id)}\n--- {log}:\n{read_log(log)}")
