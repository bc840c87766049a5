"""Submit a training run to SLURM from a recipe:

    python -m slurm.submit --config CONFIG --nodes N --gpus-per-node G [--partition P --time T --account A
                           --run-dir DIR --signal-seconds S --cpus-per-task C --set key=value ...] [--dry-run]

Renders the `sbatch` command for slurm/train.sbatch (one task per GPU; `--gpus-per-node 0` is a CPU job with one
task per node over gloo), checks the request against the recipe's batch sizes first, and submits it.
Resubmitting the same command resumes from the newest checkpoint in the run directory.

The batch arithmetic (global batch = micro batch x grad accum x world size) follows the trainer's keys:
data.batch_size (micro batch per rank), optim.grad_accum_steps, optim.global_batch_size.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "train" / "configs"
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
TENSORBOARD_SUBDIR = "tensorboard"
MICRO_BATCH_KEYS = ("data.batch_size",)
GRAD_ACCUM_KEYS = ("optim.grad_accum_steps", "optim.grad_accum")
GLOBAL_BATCH_KEYS = ("optim.global_batch_size", "data.global_batch_size", "global_batch_size")


class SubmitError(ValueError):
    """A request that cannot run; the message says what to change."""


@dataclass(frozen=True)
class JobPlan:
    nodes: int
    gpus_per_node: int  # 0: CPU job
    tasks_per_node: int
    micro_batch_size: int
    grad_accum_steps: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus_per_node else "gloo"

    def describe(self) -> str:
        unit = f"{self.gpus_per_node} GPU(s)" if self.gpus_per_node else "1 CPU task"
        return (f"{self.nodes} node(s) x {unit} = world size {self.world_size} ({self.backend}); global batch "
                f"{self.micro_batch_size} x {self.grad_accum_steps} accum x {self.world_size} = "
                f"{self.global_batch_size}")


def plan_job(nodes: int, gpus_per_node: int, micro_batch_size: int | None,
             grad_accum_steps: int | None = None, global_batch_size: int | None = None) -> JobPlan:
    """World size and gradient accumulation for a request; raises SubmitError saying what to change."""
    if nodes < 1:
        raise SubmitError(f"--nodes must be at least 1, got {nodes}")
    if gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node must be >= 0 (0 = a CPU job, one task per node), got {gpus_per_node}")
    if micro_batch_size is None or micro_batch_size < 1:
        raise SubmitError(f"data.batch_size (the micro batch per rank) must be a positive integer, got "
                          f"{micro_batch_size}: set it in the config or pass --set data.batch_size=N")
    if grad_accum_steps is not None and grad_accum_steps < 1:
        raise SubmitError(f"optim.grad_accum_steps must be >= 1, got {grad_accum_steps}")
    tasks = max(gpus_per_node, 1)
    world = nodes * tasks
    if global_batch_size is None:
        return JobPlan(nodes, gpus_per_node, tasks, micro_batch_size, grad_accum_steps or 1)
    per_step = world * micro_batch_size
    if global_batch_size < 1 or global_batch_size % per_step:
        raise SubmitError(
            f"optim.global_batch_size={global_batch_size} does not divide by world size x micro batch = "
            f"{world} x {micro_batch_size} = {per_step}: change --nodes/--gpus-per-node, or pass "
            f"--set data.batch_size=M so that {global_batch_size} is a multiple of {world} x M, or "
            f"--set optim.global_batch_size=<a multiple of {per_step}>")
    accum = global_batch_size // per_step
    if grad_accum_steps is not None and grad_accum_steps != accum:
        raise SubmitError(
            f"optim.global_batch_size={global_batch_size} needs grad accumulation {accum} at world size {world} "
            f"and micro batch {micro_batch_size}, but the config sets optim.grad_accum_steps={grad_accum_steps}: "
            f"drop one of the two (--set optim.grad_accum_steps=null) or make them agree")
    return JobPlan(nodes, gpus_per_node, tasks, micro_batch_size, accum)


def resolve_config(config: str) -> Path:
    """A path, or a recipe name under train/configs (`fashion_mnist` or `fashion_mnist.yaml`)."""
    for candidate in (Path(config), CONFIG_DIR / config, CONFIG_DIR / f"{config}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    recipes = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise SubmitError(f"config {config!r} not found: give a YAML path or a recipe name from {CONFIG_DIR} "
                      f"({', '.join(recipes) or 'none yet'})")


def load_recipe(path: Path, overrides: Sequence[str] = ()) -> dict:
    """The YAML mapping with --set key=value overrides applied (values parsed as YAML, like the trainer)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SubmitError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SubmitError(f"{path}: the top level must be a mapping")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"--set expects key=value, got {item!r}")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SubmitError(f"--set {item}: {part!r} is not a section of the config")
        node[leaf] = yaml.safe_load(text) if text.strip() else None
    return raw


def _lookup(raw: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any] | tuple[None, None]:
    for dotted in keys:
        node: Any = raw
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            return dotted, node
    return None, None


def _as_int(key: str | None, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SubmitError(f"{key} must be an integer, got {value!r}")
    return value


def batch_sizes(raw: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(micro batch, grad accum, global batch) from a recipe; missing keys are None."""
    return tuple(_as_int(*_lookup(raw, keys)) for keys in (MICRO_BATCH_KEYS, GRAD_ACCUM_KEYS, GLOBAL_BATCH_KEYS))


def sbatch_command(plan: JobPlan, config: Path, run_dir: Path, *, job_name: str, signal_seconds: int,
                   partition: str | None = None, time: str | None = None, account: str | None = None,
                   cpus_per_task: int | None = None, overrides: Sequence[str] = (),
                   python: str = sys.executable) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--nodes={plan.nodes}",
           f"--ntasks-per-node={plan.tasks_per_node}"]
    if plan.gpus_per_node:
        cmd.append(f"--gpus-per-node={plan.gpus_per_node}")
    if cpus_per_task:
        cmd.append(f"--cpus-per-task={cpus_per_task}")
    for flag, value in (("partition", partition), ("time", time), ("account", account)):
        if value:
            cmd.append(f"--{flag}={value}")
    cmd += [f"--output={run_dir / 'logs' / '%x-%j.out'}", "--open-mode=append", "--requeue",
            f"--signal=B:USR1@{signal_seconds}", f"--chdir={REPO}",
            f"--export=ALL,MRCONV_HOME={REPO},MRCONV_PYTHON={python}",
            str(TRAIN_SBATCH), str(config), str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


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
    p.add_argument("--run-dir", help="checkpoints, logs, TensorBoard (default runs/<recipe>)")
    p.add_argument("--job-name", help="default mrconv-<recipe>")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this long before the time limit: checkpoint, then requeue (default 300)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer config override (repeatable); batch keys are checked here too")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command and the plan, submit nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args.config)
        plan = plan_job(args.nodes, args.gpus_per_node, *batch_sizes(load_recipe(config, args.overrides)))
        if args.signal_seconds < 1:
            raise SubmitError(f"--signal-seconds must be >= 1, got {args.signal_seconds}")
    except SubmitError as exc:
        print(f"submit: error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or REPO / "runs" / config.stem).resolve()
    job_name = args.job_name or f"mrconv-{config.stem}"
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
