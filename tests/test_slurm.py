"""SLURM end to end on a real local cluster (slurm/local_cluster.sh: two slurmd "nodes" n1, n2 on this host).

Jobs go through `python -m slurm.submit` and slurm/train.sbatch exactly as users submit them and run the real
trainer (`python -m train`: DeepSpeed over gloo, one CPU task per node) on real Fashion-MNIST shards (the
`shards` fixture of conftest.py), with a tiny MRConvNeXt so that a job's training takes seconds. The submit
checks at the end need no cluster.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm.submit import TENSORBOARD_SUBDIR, JobPlan, SubmitError, plan_job
from tests.conftest import TRAIN_SAMPLES, assert_same_model, final_weights
from tests.slurm_cluster import (JOB_TIMEOUT, deepspeed_ops_built, job_info, read_log,  # noqa: F401
                                 slurm_env, wait_job)  # (the fixtures by name)
from train import checkpoint as ckpt
from train.config import BatchPlan, ConfigError, load_config, plan_batches

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

MICRO_BATCH, EPOCHS, CKPT_EVERY = 8, 3, 4
# 256 samples / (8 per rank x 2 ranks) = 16 updates per epoch, 48 in all: about 5 s of training on 2 cores,
# which leaves the signal a few seconds to arrive after the first checkpoint (step 4).
TOTAL_STEPS = EPOCHS * TRAIN_SAMPLES // (MICRO_BATCH * 2)
# One data worker per rank: SLURM's SIGTERM reaches every process of a job step, data workers included.
TINY = ["model.kwargs={img_size: 32, depths: [1, 1, 1, 1], dims: [8, 16, 24, 32], min_l0: 2}",
        f"data.batch_size={MICRO_BATCH}", "data.num_workers=1", f"schedule.epochs={EPOCHS}",
        "schedule.warmup_epochs=0.5", "optim.lr=2e-3", "deepspeed.precision=fp32", "logging.log_every_steps=4",
        "logging.progress_bar=false", f"checkpoint.every_steps={CKPT_EVERY}"]
# The batch plan of the dry-run and rejection tests: 256 = 8 x accum x world size.
GLOBAL_256 = ["optim.global_batch_size=256", "data.batch_size=8"]


def submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "slurm.submit", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def submit_training(env: dict, shards: str, run_dir: Path, *sets: str) -> tuple[str, Path]:
    """The tiny recipe as a 2-node CPU job; returns the job id and its log."""
    overrides = [f"data.dir={shards}", *TINY, *sets]
    res = submit(env, "--config", "fashion_mnist", "--nodes", "2", "--gpus-per-node", "0", "--run-dir",
                 str(run_dir), "--signal-seconds", "60", *[a for s in overrides for a in ("--set", s)])
    assert res.returncode == 0, res.stderr
    job_id = re.search(r"submitted job (\d+)", res.stdout).group(1)
    log = Path(re.search(r"log:\s+(\S+)", res.stdout).group(1))
    return job_id, log


def latest_step(run_dir: Path) -> int:
    tag = ckpt.latest_tag(ckpt.checkpoint_dir(str(run_dir)))
    return -1 if tag is None else int(tag[len(ckpt.TAG_PREFIX):])


def wait_for_checkpoint(env: dict, job_id: str, run_dir: Path, log: Path) -> int:
    """Blocks until the running job has saved its first checkpoint; returns its step."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while (step := latest_step(run_dir)) < 0:
        state = job_info(env, job_id).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING") and time.monotonic() < deadline, \
            f"job {job_id} ({state}) saved no checkpoint:\n{read_log(log)}"
        time.sleep(0.05)
    return step


def task_pid(job_id: str, rank: int) -> int:
    """The trainer process of one task of a running job (rank = SLURM_PROCID), found by its environment."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except OSError:  # gone, or not ours to read
            continue
        if argv[1:3] == [b"-m", b"train"] and env.get("SLURM_JOB_ID") == job_id \
                and env.get("SLURM_PROCID") == str(rank):
            found.append(int(proc.name))
    # With data.worker_start=fork its data workers are forks of it (same command line and environment): keep the
    # process they descend from (the default fork server's workers carry the server's command line instead).
    trainers = [pid for pid in found if _parent(pid) not in found]
    assert len(trainers) == 1, f"rank {rank} of job {job_id}: processes {found}"
    return trainers[0]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def expected_master() -> str:
    try:
        socket.gethostbyname("n1")
        return "n1"
    except OSError:
        return "127.0.0.1"  # n1's NodeAddr, which train.sbatch looks up when the name does not resolve


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, shards, tmp_path_factory) -> tuple[Path, Path, dict]:
    """The reference: a 2-node job that runs from start to end. (run dir, log, final job info)."""
    run_dir = tmp_path_factory.mktemp("slurm-uninterrupted") / "run"
    job_id, log = submit_training(slurm_env, shards, run_dir)
    return run_dir, log, wait_job(slurm_env, job_id, log)


@pytest.mark.slow
def test_two_node_job_trains_and_leaves_checkpoint_and_tensorboard(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, log, info = uninterrupted
    text = read_log(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", text
    assert f"attempt 1: 2 node(s) n[1-2], 2 task(s), master {expected_master()} (n1)" in text
    assert "slurm world 2, global batch 8 x 1 x 2 = 16" in text, "srun tasks joined one DeepSpeed world"
    assert text.rstrip().endswith("finished")
    assert latest_step(run_dir) == TOTAL_STEPS
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["step"] == TOTAL_STEPS
    acc = EventAccumulator(str(run_dir / TENSORBOARD_SUBDIR), size_guidance={"scalars": 0})
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == TOTAL_STEPS // 4  # logging.log_every_steps=4
    assert len(acc.Scalars("val/top1")) == EPOCHS


def stopped_requeued_and_resumed(slurm_env, shards, uninterrupted, run_dir, scancel_args: list[str],
                                 signame: str) -> str:
    """Signal a running job with ``scancel``; it must stop with a checkpoint mid-run, requeue itself, resume from
    that checkpoint and finish with the uninterrupted run's weights. Returns the job's log."""
    job_id, log = submit_training(slurm_env, shards, run_dir)
    wait_for_checkpoint(slurm_env, job_id, run_dir, log)
    subprocess.run(["scancel", *scancel_args, job_id], env=slurm_env, check=True)
    info = wait_job(slurm_env, job_id, log)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    stopped = int(re.search(rf"stop requested \({signame} [\d.]+ s ago\): checkpoint at step (\d+) saved, "
                            r"exiting with 3", text).group(1))
    assert CKPT_EVERY <= stopped < TOTAL_STEPS, "stopped mid-run"
    assert f"requeued job {job_id}" in text, text
    assert f"resumed from {ckpt.checkpoint_dir(str(run_dir))}/{ckpt.tag_for(stopped)}: " in text, text
    assert text.rstrip().endswith("finished")
    assert json.loads((run_dir / "summary.json").read_text())["step"] == TOTAL_STEPS
    assert_same_model(final_weights(uninterrupted[0]), final_weights(run_dir))
    return text


@pytest.mark.slow
def test_signalled_job_checkpoints_requeues_and_resumes_exactly(slurm_env, shards, uninterrupted, tmp_path):
    # What SLURM does --signal-seconds before the time limit: USR1 to the batch script, which forwards it.
    text = stopped_requeued_and_resumed(slurm_env, shards, uninterrupted, tmp_path / "run",
                                        ["--signal=USR1", "--batch"], "SIGUSR1")
    assert "USR1: asking the tasks to checkpoint" in text and "attempt 2:" in text, text


@pytest.mark.slow
def test_term_to_every_task_checkpoints_requeues_and_resumes_exactly(slurm_env, shards, uninterrupted, tmp_path):
    """`scancel --signal=TERM`: SIGTERM to every process of the job's steps at once, each rank's data worker
    included (what a pre-emption's GraceTime sends to the tasks). Every rank saves the same step and exits 3."""
    text = stopped_requeued_and_resumed(slurm_env, shards, uninterrupted, tmp_path / "run", ["--signal=TERM"],
                                        "SIGTERM")
    assert "DataLoader worker" not in text and "Traceback" not in text, text


@pytest.mark.slow
def test_term_to_the_batch_script_stops_the_tasks_with_a_checkpoint(slurm_env, shards, tmp_path):
    """TERM to the script alone goes to the tasks as USR1: a TERM to srun would make it SIGKILL them ("srun:
    forcing job termination"). The job ends with 3 and is not requeued: the user stopped it."""
    run_dir = tmp_path / "run"
    job_id, log = submit_training(slurm_env, shards, run_dir)
    wait_for_checkpoint(slurm_env, job_id, run_dir, log)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], env=slurm_env, check=True)
    info = wait_job(slurm_env, job_id, log)
    text = read_log(log)
    assert info["ExitCode"] == "3:0" and info["Restarts"] == "0", text
    assert "forcing job termination" not in text, text
    stopped = int(re.search(r"stop requested \(SIGUSR1 [\d.]+ s ago\): checkpoint at step (\d+) saved", text).group(1))
    assert latest_step(run_dir) == stopped
    assert text.rstrip().endswith(f"stopped by TERM after a checkpoint; resubmit the same command to resume from "
                                  f"it in {run_dir}")


@pytest.mark.slow
def test_killed_task_fails_clearly_and_resubmit_resumes_exactly(slurm_env, shards, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log = submit_training(slurm_env, shards, run_dir)
    wait_for_checkpoint(slurm_env, job_id, run_dir, log)
    os.kill(task_pid(job_id, rank=1), signal.SIGKILL)  # a task lost mid-run (OOM killer, node crash)
    info = wait_job(slurm_env, job_id, log)
    text = read_log(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", text
    assert re.search(r"FAILED: .*task 1 on n2: Killed", text), text
    assert f"Resubmit the same command to resume from the last good checkpoint in {run_dir}" in text
    last_good = latest_step(run_dir)
    assert CKPT_EVERY <= last_good < TOTAL_STEPS, "killed mid-run"

    job_id2, log2 = submit_training(slurm_env, shards, run_dir)
    assert job_id2 != job_id
    info = wait_job(slurm_env, job_id2, log2)
    text = read_log(log2)
    assert info["JobState"] == "COMPLETED", text
    assert f"resumed from {ckpt.checkpoint_dir(str(run_dir))}/{ckpt.tag_for(last_good)}: " in text, text
    assert json.loads((run_dir / "summary.json").read_text())["step"] == TOTAL_STEPS
    assert_same_model(final_weights(uninterrupted[0]), final_weights(run_dir))


@pytest.mark.slow
def test_sweep_array_runs_each_config_in_its_own_run_dir(slurm_env, shards, tmp_path):
    recipe = yaml.safe_load((REPO / "train" / "configs" / "fashion_mnist.yaml").read_text())
    recipes = []
    for seed, name in ((1, "small"), (2, "large")):
        recipes.append(tmp_path / f"{name}.yaml")
        recipes[-1].write_text(yaml.safe_dump({**recipe, "seed": seed}))
    (tmp_path / "sweep.txt").write_text("# sweep\n" + "".join(f"{r}\n\n" for r in recipes))
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "logs").mkdir(parents=True)
    trainer_args = [a for s in (f"data.dir={shards}", *TINY, "schedule.epochs=1") for a in ("--set", s)]
    res = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--nodes=1", f"--chdir={REPO}",
         f"--output={sweep_dir}/logs/%x-%A_%a.out", str(REPO / "slurm" / "sweep.sbatch"), str(tmp_path / "sweep.txt"),
         str(sweep_dir), *trainer_args],
        env=slurm_env, capture_output=True, text=True, check=True)
    array_id = res.stdout.strip()
    for i, name in enumerate(("small", "large")):
        log = sweep_dir / "logs" / f"mrconv-sweep-{array_id}_{i}.out"
        info = wait_job(slurm_env, f"{array_id}_{i}", log)
        assert info["JobState"] == "COMPLETED", read_log(log)
        run_dir = sweep_dir / f"{i}-{name}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == i + 1, "line i's config"
        assert json.loads((run_dir / "summary.json").read_text())["step"] == TRAIN_SAMPLES // MICRO_BATCH
        assert "slurm world 1" in read_log(log)


# ---------------------------------------------------------------------------------------------------------
# slurm.submit without a cluster


def _sets(items) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def test_submit_dry_run_renders_the_job(tmp_path):
    run_dir = tmp_path / "run"
    res = submit({**os.environ}, "--config", "fashion_mnist", "--nodes", "2", "--gpus-per-node", "4",
                 "--partition", "gpu", "--time", "1-00:00:00", "--account", "proj", "--run-dir", str(run_dir),
                 "--signal-seconds", "120", *_sets([*GLOBAL_256, "optim.lr=1e-3"]), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "world size 8 (nccl); global batch 8 x 4 accum x 8 = 256" in res.stdout
    cmd = res.stdout.strip().splitlines()[-1].split()
    assert cmd[:2] == ["sbatch", "--parsable"]
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=1-00:00:00",
                 "--account=proj", "--requeue", "--signal=B:USR1@120", "--open-mode=append",
                 f"--output={run_dir}/logs/%x-%j.out", f"--chdir={REPO}"):
        assert flag in cmd
    assert cmd[-9:] == [str(REPO / "slurm" / "train.sbatch"), str(REPO / "train" / "configs" / "fashion_mnist.yaml"),
                        str(run_dir), *_sets([*GLOBAL_256, "optim.lr=1e-3"])]
    assert not run_dir.exists(), "a dry run creates nothing"

    cpu = submit({**os.environ}, "--config", "fashion_mnist", "--nodes", "4", "--gpus-per-node", "0",
                 *_sets(GLOBAL_256), "--dry-run")
    assert cpu.returncode == 0, cpu.stderr
    assert "--ntasks-per-node=1" in cpu.stdout and "--gpus-per-node" not in cpu.stdout.splitlines()[-1]
    assert "(gloo); global batch 8 x 8 accum x 4 = 256" in cpu.stdout
    assert f"{REPO}/runs/fashion_mnist" in cpu.stdout, "default run dir: runs/<recipe> in the repository"


def _fake_sbatch(tmp_path: Path) -> tuple[dict, Path]:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "sbatch-called"
    (fake_bin / "sbatch").write_text(f"#!/bin/sh\ntouch {marker}\necho 1\n")
    (fake_bin / "sbatch").chmod(0o755)
    return {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}, marker


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes must be at least 1"),
    (["--nodes", "1", "--gpus-per-node", "-1"], "--gpus-per-node must be >= 0"),
    (["--nodes", "1", "--gpus-per-node", "1", "--signal-seconds", "0"], "--signal-seconds"),
    (["--nodes", "3", "--gpus-per-node", "4"], "world size 12 = --nodes 3 x 4 task(s) per node"),
])
def test_impossible_job_shapes_fail_before_submitting(tmp_path, args, message):
    env, marker = _fake_sbatch(tmp_path)
    res = submit(env, "--config", "fashion_mnist", "--run-dir", str(tmp_path / "run"), *_sets(GLOBAL_256), *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, nodes, gpus", [
    (["optim.weigth_decay=0.1"], 1, 1),  # unknown key, with the closest valid one
    (["data.batch_size=big"], 1, 1),  # wrong type
    (["data.batch_size=0"], 1, 1),
    ([*GLOBAL_256, "optim.grad_accum_steps=2"], 1, 8),  # 8 x 2 x 8 != 256
    (GLOBAL_256, 3, 4),  # 256 is not a multiple of 8 x 12
    (["model.kwargs=[1]"], 1, 1),
])
def test_config_errors_are_the_trainers_and_nothing_is_submitted(tmp_path, overrides, nodes, gpus):
    try:
        plan_batches(load_config("fashion_mnist", overrides), nodes * gpus)
        pytest.fail(f"the trainer accepts {overrides} at world size {nodes * gpus}")
    except ConfigError as exc:
        expected = str(exc)
    env, marker = _fake_sbatch(tmp_path)
    res = submit(env, "--config", "fashion_mnist", "--nodes", str(nodes), "--gpus-per-node", str(gpus),
                 "--run-dir", str(tmp_path / "run"), *_sets(overrides))
    assert res.returncode == 2 and f"submit: error: {expected}" in res.stderr, res.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_missing_config_names_the_recipes(tmp_path):
    res = submit({**os.environ}, "--config", str(tmp_path / "nope.yaml"), "--nodes", "1", "--gpus-per-node", "1")
    assert res.returncode == 2 and "not found" in res.stderr and "fashion_mnist" in res.stderr, res.stderr


def test_plan_job_uses_the_trainers_batch_plan():
    cfg = load_config("fashion_mnist", ["optim.global_batch_size=4096", "data.batch_size=128"])
    assert plan_job(2, 8, cfg) == JobPlan(2, 8, BatchPlan(128, 2, 16))
    assert plan_job(2, 8, cfg).tasks_per_node == 8 and plan_job(2, 8, cfg).backend == "nccl"
    cpu = plan_job(4, 0, cfg)
    assert (cpu.tasks_per_node, cpu.backend, cpu.batch) == (1, "gloo", BatchPlan(128, 8, 4))
    with pytest.raises(SubmitError, match=r"128 x 20 = 2560.*world size 20 = --nodes 5 x 4 task"):
        plan_job(5, 4, cfg)


def test_submit_stays_light_and_agrees_with_the_trainer_on_tensorboard():
    from train.logger import TENSORBOARD_SUBDIR as TRAINER_SUBDIR
    assert TENSORBOARD_SUBDIR == TRAINER_SUBDIR
    probe = "import sys, slurm.submit; sys.exit('torch' in sys.modules)"
    assert subprocess.run([PY, "-c", probe], cwd=REPO).returncode == 0, "slurm.submit must not import torch"
