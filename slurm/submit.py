"""Submit a training run to SLURM from a recipe:

    python -m slurm.submit --config CONFIG --nodes N --gpus-per-node G [--partition P --time T --account A
                           --run-dir DIR --signal-seconds S --cpus-per-task C --set key=value ...] [--dry-run]

or a comparison sweep, one model per array task of slurm/sweep.sbatch (``python -m pipelines.compare --slurm``;
collect the finished runs with ``python -m pipelines.compare ... --collect``):

    python -m slurm.submit --sweep CONFIG --models NAME,NAME,... [--out DIR --gpus-per-node G --partition P ...]

Renders the `sbatch` command for slurm/train.sbatch (one task per GPU; `--gpus-per-node 0` is a CPU job with one
task per node over gloo) and submits it. The recipe and its overrides go through the trainer's own loader and
batch planner first (train/config.py), so a config the trainer would reject fails here, before any queueing.
Resubmitting the same command resumes from the newest checkpoint in the run directory.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from train.config import BatchPlan, ConfigError, TrainConfig, load_config, plan_batches, resolve_config_path

REPO = Path(__file__).resolve().parent.parent
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
SWEEP_SBATCH = REPO / "slurm" / "sweep.sbatch"
# train.logger.TENSORBOARD_SUBDIR (a test keeps them equal); importing train.logger here would load torch.
TENSORBOARD_SUBDIR = "tensorboard"


def tasks_per_node(gpus_per_node: int) -> int:
    return max(gpus_per_node, 1)  # one task per GPU, or one CPU task per node


class SubmitError(ValueError):
    """A request that cannot run; the message says what to change."""


@dataclass(frozen=True)
class JobPlan:
    nodes: int
    gpus_per_node: int  # 0: CPU job
    batch: BatchPlan

    @property
    def tasks_per_node(self) -> int:
        return tasks_per_node(self.gpus_per_node)

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus_per_node else "gloo"

    def describe(self) -> str:
        b = self.batch
        unit = f"{self.gpus_per_node} GPU(s)" if self.gpus_per_node else "1 CPU task"
        return (f"{self.nodes} node(s) x {unit} = world size {b.world_size} ({self.backend}); global batch "
                f"{b.micro_batch_size} x {b.grad_accum_steps} accum x {b.world_size} = {b.global_batch_size}")


def plan_job(nodes: int, gpus_per_node: int, cfg: TrainConfig) -> JobPlan:
    """The job's shape and the trainer's batch plan (train.config.plan_batches) at its world size; raises
    SubmitError saying what to change."""
    if nodes < 1:
        raise SubmitError(f"--nodes must be at least 1, got {nodes}")
    if gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node must be >= 0 (0 = a CPU job, one task per node), got {gpus_per_node}")
    tasks = tasks_per_node(gpus_per_node)
    try:
        return JobPlan(nodes, gpus_per_node, plan_batches(cfg, nodes * tasks))
    except ConfigError as exc:
        raise SubmitError(f"{exc} (world size {nodes * tasks} = --nodes {nodes} x {tasks} task(s) per node: "
                          f"change the job's shape or the batch keys with --set)") from None


def _job_options(plan: JobPlan, log: Path, signal_seconds: int, partition: str | None, time: str | None,
                 account: str | None, cpus_per_task: int | None, python: str) -> list[str]:
    """The sbatch options a training job and a sweep's array tasks share (shape, requeue, USR1, where it runs)."""
    cmd = [f"--nodes={plan.nodes}", f"--ntasks-per-node={plan.tasks_per_node}"]
    if plan.gpus_per_node:
        cmd.append(f"--gpus-per-node={plan.gpus_per_node}")
    if cpus_per_task:
        cmd.append(f"--cpus-per-task={cpus_per_task}")
    for flag, value in (("partition", partition), ("time", time), ("account", account)):
        if value:
            cmd.append(f"--{flag}={value}")
    return cmd + [f"--output={log}", "--open-mode=append", "--requeue", f"--signal=B:USR1@{signal_seconds}",
                  f"--chdir={REPO}", f"--export=ALL,MRCONV_HOME={REPO},MRCONV_PYTHON={python}"]


def sbatch_command(plan: JobPlan, config: Path, run_dir: Path, *, job_name: str, signal_seconds: int,
                   partition: str | None = None, time: str | None = None, account: str | None = None,
                   cpus_per_task: int | None = None, overrides: Sequence[str] = (),
                   python: str = sys.executable) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}",
           *_job_options(plan, run_dir / "logs" / "%x-%j.out", signal_seconds, partition, time, account,
                         cpus_per_task, python),
           str(TRAIN_SBATCH), str(config), str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def sweep_command(plan: JobPlan, listing: Path, sweep_dir: Path, tasks: int, *, job_name: str = "mrconv-sweep",
                  signal_seconds: int = 300, partition: str | None = None, time: str | None = None,
                  account: str | None = None, cpus_per_task: int | None = None,
                  python: str = sys.executable) -> list[str]:
    """A job array of slurm/sweep.sbatch: task i trains line i of ``listing`` (``RECIPE NAME``) in
    ``sweep_dir/NAME``, each task shaped by ``plan``."""
    return ["sbatch", "--parsable", f"--array=0-{tasks - 1}", f"--job-name={job_name}",
            *_job_options(plan, sweep_dir / "logs" / "%x-%A_%a.out", signal_seconds, partition, time, account,
                          cpus_per_task, python),
            str(SWEEP_SBATCH), str(listing), str(sweep_dir)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a YAML recipe: a path or a name under train/configs")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0: a CPU job, one task per node (gloo)")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, as sbatch takes it (e.g. 2-00:00:00)")
    p.add_argument("--account")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (data loading workers + 1)")
    p.add_argument("--run-dir", help="checkpoints, logs, TensorBoard (default: the config's run_dir, else "
                                     "runs/<recipe>)")
    p.add_argument("--job-name", help="default mrconv-<recipe>")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this long before the time limit: checkpoint, then requeue (default 300)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer config override (repeatable), validated here as the trainer does")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command and the plan, submit nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sweep" in argv:  # one recipe, several models: pipelines.compare renders and submits the array
        from pipelines.compare import main as compare_main

        i = argv.index("--sweep")
        return compare_main(["--config", *argv[i + 1:i + 2], *argv[:i], *argv[i + 2:], "--slurm"])
    args = build_parser().parse_args(argv)
    try:
        if args.signal_seconds < 1:
            raise SubmitError(f"--signal-seconds must be >= 1, got {args.signal_seconds}")
        config = Path(resolve_config_path(args.config)).resolve()
        cfg = load_config(str(config), args.overrides)
        plan = plan_job(args.nodes, args.gpus_per_node, cfg)
    except (SubmitError, ConfigError) as exc:
        print(f"submit: error: {exc}", file=sys.stderr)
        return 2
    stem = config.stem
    # A run_dir from the recipe is relative to the repository, where the job runs (--chdir); --run-dir to here.
    run_dir = Path(args.run_dir).resolve() if args.run_dir else (REPO / (cfg.run_dir or f"runs/{stem}")).resolve()
    job_name = args.job_name or f"mrconv-{stem}"
    cmd = sbatch_command(plan, config, run_dir, job_name=job_name, signal_seconds=args.signal_seconds,
                         partition=args.partition, time=args.time, account=args.account,
                         cpus_per_task=args.cpus_per_task, overrides=args.overrides)
    print(f"# {plan.describe()}")
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if shutil.which("sbatch") is None:
        print("submit: error: sbatch not found: run this on a SLURM login node (or start the local cluster: "
              "bash slurm/local_cluster.sh up; export SLURM_CONF=...)", file=sys.stderr)
        return 2
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"submit: error: sbatch failed ({result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {shlex.join(cmd)}")
    print(f"  log:         {run_dir / 'logs' / f'{job_name}-{job_id}.out'}")
    print(f"  run dir:     {run_dir} (resubmit the same command to resume from its newest checkpoint)")
    print(f"  TensorBoard: tensorboard --logdir {run_dir / TENSORBOARD_SUBDIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
