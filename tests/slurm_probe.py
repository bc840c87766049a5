"""A stand-in trainer for the SLURM tests, honouring the trainer's contract (see slurm/train.sbatch):

    python -m tests.slurm_probe --config CONFIG --run-dir DIR [--set probe.steps=N ...]

It joins the process group through train.distributed.init_distributed (gloo on CPU), all-reduces every step,
writes <run_dir>/world-rank<R>.json with its WorldInfo, appends each finished step to steps-rank<R>.log,
checkpoints (<run_dir>/checkpoint.json, written by rank 0 after a barrier) every `probe.ckpt_every` steps,
resumes from that checkpoint, and on SIGUSR1/SIGTERM finishes the step, checkpoints and exits 3.
PROBE_DIE=<rank>:<step> makes that rank SIGKILL itself at that step (a task lost mid-run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

# Before the heavy imports: a USR1 that arrives while torch loads must not kill the task (default action).
STOP = {"requested": False}
signal.signal(signal.SIGUSR1, lambda *_: STOP.update(requested=True))
signal.signal(signal.SIGTERM, lambda *_: STOP.update(requested=True))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from train.distributed import init_distributed  # noqa: E402

EXIT_PREEMPTED = 3
DEFAULTS = {"probe.steps": 20, "probe.step_time": 0.2, "probe.ckpt_every": 5}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    opts = dict(DEFAULTS)
    for kv in args.set:
        key, _, value = kv.partition("=")
        if key in opts:
            opts[key] = type(opts[key])(value)
    args.opts = opts
    return args


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    steps, step_time, every = (args.opts[k] for k in ("probe.steps", "probe.step_time", "probe.ckpt_every"))
    info = init_distributed()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    _write_json(run_dir / f"world-rank{info.rank}.json", {
        **dataclasses.asdict(info), "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        "job_id": os.environ.get("SLURM_JOB_ID"), "restart": restart, "start": start,
        "backend": dist.get_backend(), "config": args.config})
    if info.rank == 0:
        with open(run_dir / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"job_id": os.environ.get("SLURM_JOB_ID"), "restart": restart, "start": start}) + "\n")
    print(f"probe rank {info.rank}/{info.world_size} ({info.launcher}) starts at step {start} of {steps}", flush=True)

    die = os.environ.get("PROBE_DIE", "")
    die_rank, die_step = (int(x) for x in die.split(":")) if die else (-1, -1)
    for step in range(start, steps):
        if info.rank == die_rank and step == die_step:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(step_time)
        # The stop flag is reduced with the step so that every rank stops after the same step.
        t = torch.tensor([step, int(STOP["requested"])], dtype=torch.int64)
        dist.all_reduce(t)
        if t[0].item() != step * info.world_size:
            raise RuntimeError(f"ranks disagree on the step: sum {t[0].item()} at step {step}")
        with open(run_dir / f"steps-rank{info.rank}.log", "a") as f:
            f.write(f"{step}\n")
        done, preempted = step + 1, t[1].item() > 0
        if done % every == 0 or preempted:
            dist.barrier()
            if info.rank == 0:
                _write_json(ckpt, {"step": done})
            dist.barrier()
        if preempted:
            print(f"probe rank {info.rank}: preempted: checkpoint saved at step {done}", flush=True)
            dist.destroy_process_group()
            return EXIT_PREEMPTED
    if info.rank == 0:
        _write_json(run_dir / "done.json", {"step": steps, "world_size": info.world_size})
    print(f"probe rank {info.rank}: finished {steps} steps", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
