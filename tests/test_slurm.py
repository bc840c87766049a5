"""SLURM end to end on a real local cluster (slurm/local_cluster.sh: two slurmd "nodes" n1, n2 on this host).

Jobs go through `python -m slurm.submit` and slurm/train.sbatch exactly as users submit them, with the trainer
swapped for tests/slurm_probe.py (MRCONV_MODULE), which honours the trainer's contract: gloo all-reduce every
step, checkpoint + exit 3 on SIGUSR1, resume from the run directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm.submit import JobPlan, SubmitError, batch_sizes, plan_job
from train.distributed import master_port_for_job

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "slurm" / "local_cluster.sh"
PY = sys.executable
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")


def _have(binary: str) -> bool:
    return shutil.which(binary) is not None or Path("/usr/sbin", binary).exists()


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory) -> dict:
    """A running local cluster and the environment to talk to it; brought down at the end if we started it."""
    missing = [b for b in SLURM_BINARIES if not _have(b)]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): "
                    "apt-get install -y slurmctld slurmd slurm-client munge")
    state = os.environ.get("MRCONV_SLURM_DIR", "/tmp/mrconv-slurm")
    env = {**os.environ, "MRCONV_SLURM_DIR": state, "SLURM_CONF": f"{state}/slurm.conf", "OMP_NUM_THREADS": "1",
           "MRCONV_MODULE": "tests.slurm_probe", "MRCONV_EXIT_WAIT": "20", "MRCONV_HOME": str(REPO),
           "MRCONV_PYTHON": PY}
    env.pop("PROBE_DIE", None)
    was_up = subprocess.run(["bash", str(CLUSTER), "status"], env=env, capture_output=True).returncode == 0
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        pytest.fail(f"local SLURM cluster did not start (rc {up.returncode}):\n{up.stdout}\n{up.stderr}", pytrace=False)
    yield env
    if not was_up:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, timeout=120)


def _job(env: dict, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(env: dict, job_id: str, log: Path, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(env, job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} not done after {timeout}s: {_job(env, job_id)}\n--- {log}:\n{_read(log)}")


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else "(missing)"


def write_recipe(path: Path, **optim) -> Path:
    path.write_text(yaml.safe_dump({"data": {"batch_size": 8}, "optim": optim}))
    return path


def submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "slurm.submit", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def submit_probe(env: dict, recipe: Path, run_dir: Path, *sets: str, nodes: int = 2) -> tuple[str, Path]:
    res = submit(env, "--config", str(recipe), "--nodes", str(nodes), "--gpus-per-node", "0",
                 "--run-dir", str(run_dir), "--signal-seconds", "60", *[a for s in sets for a in ("--set", s)])
    assert res.returncode == 0, res.stderr
    job_id = re.search(r"submitted job (\d+)", res.stdout).group(1)
    log = Path(re.search(r"log:\s+(\S+)", res.stdout).group(1))
    return job_id, log


def steps_done(run_dir: Path, rank: int) -> list[int]:
    f = run_dir / f"steps-rank{rank}.log"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def attempts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]


def expected_master() -> str:
    try:
        socket.gethostbyname("n1")
        return "n1"
    except OSError:
        return "127.0.0.1"  # n1's NodeAddr, which train.sbatch looks up when the name does not resolve


@pytest.mark.slow
def test_two_node_job_all_reduces_over_gloo(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log = submit_probe(slurm_env, write_recipe(tmp_path / "r.yaml"), run_dir,
                               "probe.steps=6", "probe.step_time=0.05")
    info = wait_job(slurm_env, job_id, log)
    assert info["JobState"] == "COMPLETED", _read(log)
    worlds = [json.loads((run_dir / f"world-rank{r}.json").read_text()) for r in range(2)]
    for rank, w in enumerate(worlds):
        assert (w["rank"], w["local_rank"], w["world_size"]) == (rank, 0, 2)
        assert (w["launcher"], w["backend"]) == ("slurm", "gloo")
        assert w["master_addr"] == expected_master()
        assert w["master_port"] == master_port_for_job(int(job_id))
        assert w["job_id"] == job_id
    assert [w["node"] for w in worlds] == ["n1", "n2"]
    assert steps_done(run_dir, 0) == steps_done(run_dir, 1) == list(range(6))
    assert json.loads((run_dir / "done.json").read_text()) == {"step": 6, "world_size": 2}
    assert "finished" in _read(log)


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_env, tmp_path):
    run_dir, total = tmp_path / "run", 30
    # No periodic checkpoints: the resumed run can only start from the one written on USR1.
    job_id, log = submit_probe(slurm_env, write_recipe(tmp_path / "r.yaml"), run_dir,
                               f"probe.steps={total}", "probe.step_time=0.15", "probe.ckpt_every=1000")
    deadline = time.monotonic() + 60
    while len(steps_done(run_dir, 0)) < 4:
        assert time.monotonic() < deadline, f"probe made no progress:\n{_read(log)}"
        assert _job(slurm_env, job_id).get("JobState") in ("PENDING", "RUNNING"), _read(log)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_env, check=True)
    info = wait_job(slurm_env, job_id, log, timeout=90)
    text = _read(log)
    assert info["JobState"] == "COMPLETED", text
    assert info["Restarts"] == "1", text
    first, second = attempts(run_dir)
    assert (first["restart"], first["start"], second["restart"]) == (0, 0, 1)
    assert 4 <= second["start"] < total, "resumed from the checkpoint saved on USR1"
    # The checkpoint was taken after the step on which the ranks agreed to stop: no step is lost or redone.
    assert steps_done(run_dir, 0) == steps_done(run_dir, 1) == list(range(total))
    assert json.loads((run_dir / "done.json").read_text())["step"] == total
    assert "USR1: asking the tasks to checkpoint" in text and f"requeued job {job_id}" in text
    assert "attempt 2:" in text and text.rstrip().endswith("finished")


@pytest.mark.slow
def test_killed_task_fails_clearly_and_resubmit_resumes(slurm_env, tmp_path):
    run_dir, total = tmp_path / "run", 12
    recipe = write_recipe(tmp_path / "r.yaml")
    sets = (f"probe.steps={total}", "probe.step_time=0.05", "probe.ckpt_every=4")
    job_id, log = submit_probe({**slurm_env, "PROBE_DIE": "1:6"}, recipe, run_dir, *sets)
    info = wait_job(slurm_env, job_id, log)
    text = _read(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", text
    assert re.search(r"FAILED: task 1 on n2: Killed", text), text
    assert f"Resubmit the same command to resume from the last good checkpoint in {run_dir}" in text
    assert json.loads((run_dir / "checkpoint.json").read_text()) == {"step": 4}

    job_id2, log2 = submit_probe(slurm_env, recipe, run_dir, *sets)
    assert job_id2 != job_id
    info = wait_job(slurm_env, job_id2, log2)
    assert info["JobState"] == "COMPLETED", _read(log2)
    assert [a["start"] for a in attempts(run_dir)] == [0, 4]
    for rank in range(2):
        done = steps_done(run_dir, rank)
        restart = next(i for i in range(1, len(done)) if done[i] <= done[i - 1])
        assert done[:restart] == list(range(6)), "the first run got to step 6"
        assert done[restart:] == list(range(4, total)), "the second resumed at the last good checkpoint, step 4"
    assert json.loads((run_dir / "done.json").read_text())["step"] == total


@pytest.mark.slow
def test_sweep_array_runs_each_config_in_its_own_run_dir(slurm_env, tmp_path):
    recipes = [write_recipe(tmp_path / f"{name}.yaml") for name in ("small", "large")]
    (tmp_path / "sweep.txt").write_text("# sweep\n" + "".join(f"{r}\n\n" for r in recipes))
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "logs").mkdir(parents=True)
    res = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--nodes=1", f"--chdir={REPO}",
         f"--output={sweep_dir}/logs/%x-%A_%a.out", str(REPO / "slurm" / "sweep.sbatch"), str(tmp_path / "sweep.txt"),
         str(sweep_dir), "--set", "probe.steps=3", "--set", "probe.step_time=0.05"],
        env=slurm_env, capture_output=True, text=True, check=True)
    array_id = res.stdout.strip()
    for i, name in enumerate(("small", "large")):
        log = sweep_dir / "logs" / f"mrconv-sweep-{array_id}_{i}.out"
        info = wait_job(slurm_env, f"{array_id}_{i}", log)
        assert info["JobState"] == "COMPLETED", _read(log)
        run_dir = sweep_dir / f"{i}-{name}"
        world = json.loads((run_dir / "world-rank0.json").read_text())
        assert world["config"] == str(recipes[i]) and world["world_size"] == 1
        assert json.loads((run_dir / "done.json").read_text())["step"] == 3


def test_submit_dry_run_renders_the_job(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", global_batch_size=256)
    run_dir = tmp_path / "run"
    res = submit({**os.environ}, "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "4",
                 "--partition", "gpu", "--time", "1-00:00:00", "--account", "proj", "--run-dir", str(run_dir),
                 "--signal-seconds", "120", "--set", "optim.lr=1e-3", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "world size 8 (nccl); global batch 8 x 4 accum x 8 = 256" in res.stdout
    cmd = res.stdout.strip().splitlines()[-1].split()
    assert cmd[:2] == ["sbatch", "--parsable"]
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=1-00:00:00",
                 "--account=proj", "--requeue", "--signal=B:USR1@120", "--open-mode=append",
                 f"--output={run_dir}/logs/%x-%j.out", f"--chdir={REPO}"):
        assert flag in cmd
    assert cmd[-5:] == [str(REPO / "slurm" / "train.sbatch"), str(recipe), str(run_dir), "--set", "optim.lr=1e-3"]
    assert not run_dir.exists(), "a dry run creates nothing"

    cpu = submit({**os.environ}, "--config", str(recipe), "--nodes", "4", "--gpus-per-node", "0", "--dry-run")
    assert cpu.returncode == 0, cpu.stderr
    assert "--ntasks-per-node=1" in cpu.stdout and "--gpus-per-node" not in cpu.stdout.splitlines()[-1]
    assert "(gloo); global batch 8 x 8 accum x 4 = 256" in cpu.stdout


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes must be at least 1"),
    (["--nodes", "1", "--gpus-per-node", "-1"], "--gpus-per-node must be >= 0"),
    (["--nodes", "3", "--gpus-per-node", "4"], "does not divide by world size x micro batch = 12 x 8 = 96"),
    (["--nodes", "1", "--gpus-per-node", "8", "--set", "optim.grad_accum_steps=2"], "optim.grad_accum_steps=2"),
    (["--nodes", "1", "--gpus-per-node", "1", "--set", "data.batch_size=0"], "data.batch_size"),
    (["--nodes", "1", "--gpus-per-node", "1", "--signal-seconds", "0"], "--signal-seconds"),
])
def test_impossible_requests_fail_before_submitting(tmp_path, args, message):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "sbatch-called"
    (fake_bin / "sbatch").write_text(f"#!/bin/sh\ntouch {marker}\necho 1\n")
    (fake_bin / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    recipe = write_recipe(tmp_path / "r.yaml", global_batch_size=256)
    res = submit(env, "--config", str(recipe), "--run-dir", str(tmp_path / "run"), *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_missing_config_names_the_recipes(tmp_path):
    res = submit({**os.environ}, "--config", str(tmp_path / "nope.yaml"), "--nodes", "1", "--gpus-per-node", "1")
    assert res.returncode == 2 and "not found" in res.stderr and "recipe name" in res.stderr


def test_plan_job_math():
    assert plan_job(2, 8, 128, None, 4096) == JobPlan(2, 8, 8, 128, 2)
    assert plan_job(2, 8, 128, None, 4096).global_batch_size == 4096
    assert plan_job(2, 0, 32, 3, None) == JobPlan(2, 0, 1, 32, 3)
    assert plan_job(1, 0, 32).backend == "gloo" and plan_job(1, 1, 32).backend == "nccl"
    assert plan_job(4, 2, 16, 2, 256).grad_accum_steps == 2
    with pytest.raises(SubmitError, match="multiple of 2560"):
        plan_job(5, 4, 128, None, 4096)
    with pytest.raises(SubmitError, match="needs grad accumulation 2"):
        plan_job(2, 8, 128, 4, 4096)


def test_batch_sizes_are_read_defensively():
    assert batch_sizes({}) == (None, None, None)
    assert batch_sizes({"data": {"batch_size": 64}, "optim": {"grad_accum_steps": None, "global_batch_size": 512}}) \
        == (64, None, 512)
    assert batch_sizes({"data": {"batch_size": 64}, "optim": {"grad_accum": 2}}) == (64, 2, None)
    assert batch_sizes({"data": None, "optim": "x"}) == (None, None, None)
    with pytest.raises(SubmitError, match="data.batch_size must be an integer"):
        batch_sizes({"data": {"batch_size": "big"}})
