"""``python -m pipelines.compare``: the headline comparison, MRConvNeXt against ConvNeXt, by one command.

    python -m pipelines.compare --config fashion_mnist_gpu \\
        --models mrconvnext_femto,mrconvnext_pico,convnext_femto,convnext_pico [--out runs/compare/NAME] \\
        [--data DIR] [--ranks N] [--set key=value ...] [--bench-batch-size 256] [--bench-args "--amp bf16"] \\
        [--reference-results CSV --reference-bench CSV] [--slurm [--gpus-per-node G --partition P ...]] [--collect]

Every model is trained with the same recipe and shards (``model.name`` changes; the ConvNeXt peers keep the
schedule, optimizer and augmentation, and drop only the MRConv-only ``model.kwargs``). Per model, in ``OUT/NAME/``:
``config.yaml`` (its recipe), the run (checkpoints, TensorBoard, ``summary.json``), ``model.safetensors`` (fused
for MRConvNeXt), ``results.csv`` (test top-1 of that exported model). Then, in ``OUT/``: one benchmark run of every
model side by side on the machine at hand (MRConvNeXt fused and unfused), ``results.csv`` (timm's results format,
one row per model), ``bench.csv`` (timm's benchmark format) and ``accuracy_throughput.png``.

Locally the trainings run one after another (``torchrun`` with ``--ranks`` ranks); re-running skips the finished
ones and resumes an interrupted one from its checkpoint. With ``--slurm`` the unfinished models go out as one job
array of ``slurm/sweep.sbatch`` (also ``python -m slurm.submit --sweep CONFIG --models ...``); afterwards the same
command with ``--collect`` instead exports, evaluates, benchmarks and plots the finished runs (submitting again
while the array runs would queue its unfinished models twice).

This module imports no torch: ``slurm.submit`` uses it on login nodes. The heavy steps are the repository's own
commands, printed before they run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from pipelines import tables
from pipelines.data.files import atomic_write_text
from pipelines.data.shards import INFO_NAME
from train.config import ConfigError, TrainConfig, load_config, write_config

SUMMARY, WEIGHTS, UNFUSED, RESULTS = "summary.json", "model.safetensors", "model_unfused.safetensors", "results.csv"


class CompareError(ValueError):
    """A request that cannot run; the message says what to change."""


def is_mrconv(name: str) -> bool:
    return name.startswith("mrconvnext_")


def peer_of(name: str) -> str | None:
    """The ConvNeXt that an MRConvNeXt replaces the 7x7 depthwise conv of (same depths and dims)."""
    return name.replace("mrconvnext_", "convnext_", 1) if is_mrconv(name) else None


def init_args(path: Path, cls_name: str) -> set[str]:
    """The arguments of ``cls_name.__init__`` in the Python file ``path``, read from its syntax tree."""
    import ast

    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}


def mrconv_only_kwargs() -> set[str]:
    """``MRConvNeXt`` constructor arguments that timm's ``ConvNeXt`` does not take. Read from the two source
    files rather than the classes: importing them loads torch, and ``slurm.submit`` runs this on login nodes."""
    import importlib.util

    timm_dir = Path(importlib.util.find_spec("timm").origin).parent  # finds the package without importing it
    return (init_args(Path(__file__).resolve().parent.parent / "models" / "mrconvnext.py", "MRConvNeXt")
            - init_args(timm_dir / "models" / "convnext.py", "ConvNeXt"))


def model_kwargs(name: str, kwargs: dict) -> dict:
    """The recipe's ``model.kwargs`` for ``name``: all of them for MRConvNeXt, the ConvNeXt ones for the rest."""
    if is_mrconv(name):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k not in mrconv_only_kwargs()}


def parse_models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CompareError("--models lists no model (e.g. --models mrconvnext_atto,convnext_atto)")
    if len(set(names)) != len(names):
        raise CompareError(f"--models lists a model twice: {text}")
    bad = [n for n in names if not n.replace("_", "").isalnum()]
    if bad:
        raise CompareError(f"--models: not a timm model name: {', '.join(bad)}")
    return names


def model_config(cfg: TrainConfig, name: str, run_dir: str) -> TrainConfig:
    """The shared recipe with ``name`` as its model: same data, schedule, optimizer, augmentation and seed."""
    one = copy.deepcopy(cfg)
    one.model.name = name
    one.model.kwargs = model_kwargs(name, cfg.model.kwargs)
    one.run_dir = run_dir
    return one


def write_configs(cfg: TrainConfig, models: Sequence[str], out: str) -> dict[str, str]:
    """``OUT/NAME/config.yaml`` per model (the trainer rewrites the same file with the class count resolved)."""
    paths = {}
    for name in models:
        run_dir = os.path.join(out, name)
        os.makedirs(run_dir, exist_ok=True)
        paths[name] = os.path.join(run_dir, "recipe.yaml")
        write_config(model_config(cfg, name, run_dir), paths[name])
    return paths


def finished(run_dir: str) -> bool:
    """The trainer wrote its summary (it does so only after the last epoch's checkpoint)."""
    return os.path.exists(os.path.join(run_dir, SUMMARY))


def newer(path: str, *than: str) -> bool:
    return os.path.exists(path) and all(os.path.getmtime(path) >= os.path.getmtime(t) for t in than)


def run(cmd: list[str], env: dict | None = None) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise SystemExit(f"step failed (exit {result.returncode}): {shlex.join(cmd)}")


def train_cmd(recipe: str, run_dir: str, ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
            "train", "--config", recipe, "--run-dir", run_dir]


def export_and_evaluate(name: str, run_dir: str, data: str, env: dict) -> str:
    """Exports the run (folded for MRConvNeXt; a check that fused == unfused) and evaluates the exported model
    into ``RUN_DIR/results.csv``; both skipped when already newer than the run's summary."""
    weights, results = os.path.join(run_dir, WEIGHTS), os.path.join(run_dir, RESULTS)
    summary = os.path.join(run_dir, SUMMARY)
    if not newer(weights, summary):
        unfused = ["--unfused-out", os.path.join(run_dir, UNFUSED)] if is_mrconv(name) else []
        run([sys.executable, "-m", "train.export", run_dir, weights, "--data", data, *unfused], env=env)
    if not newer(results, weights):
        if os.path.exists(results):
            os.remove(results)  # evaluate appends
        run([sys.executable, "-m", "pipelines.evaluate", "--model", name, "--checkpoint", weights, "--data", data,
             "--name", f"{name}@fused" if is_mrconv(name) else name, "--results", results], env=env)
    return results


def bench_entries(models: Sequence[str]) -> list[str]:
    """MRConvNeXt in both forms (the plot draws both), every other model as is."""
    return [e for n in models for e in ((f"{n}@fused", f"{n}@unfused") if is_mrconv(n) else (n,))]


def bench_kwargs(cfg: TrainConfig, models: Sequence[str]) -> list[str]:
    """``pipelines.benchmark models --model-kwargs`` items: each model its own ``NAME:KEY=VALUE`` (its recipe's
    kwargs, as ``model_kwargs`` gives them; img_size goes by ``--img-size``)."""
    return [f"{name}:{k}={json.dumps(v)}" for name in models
            for k, v in model_kwargs(name, cfg.model.kwargs).items() if k != "img_size"]


def collect(cfg: TrainConfig, models: Sequence[str], out: str, data: str, num_classes: int, env: dict,
            args: argparse.Namespace) -> dict[str, str]:
    """Export, evaluate, benchmark (one run) and plot the finished runs; returns the paths written."""
    done = [n for n in models if finished(os.path.join(out, n))]
    missing = [n for n in models if n not in done]
    if not done:
        raise CompareError(f"no finished run in {out} for {', '.join(models)} (train them first, without --collect)")
    if missing:
        print(f"note: not finished, left out: {', '.join(missing)}")
    per_model = [export_and_evaluate(n, os.path.join(out, n), data, env) for n in done]
    results = os.path.join(out, RESULTS)
    tables.merge(per_model, results, tables.RESULTS_COLUMNS)

    bench = os.path.join(out, "bench.csv")
    img_size = cfg.model.kwargs.get("img_size", cfg.data.img_size)
    print(f"\n== benchmark: {', '.join(done)} side by side in one run")
    run([sys.executable, "-m", "pipelines.benchmark", "models", "--models", *bench_entries(done), "--img-size",
         str(img_size), "--in-chans", str(cfg.model.in_chans), "--num-classes", str(num_classes),
         *(["--model-kwargs", *items] if (items := bench_kwargs(cfg, done)) else []),
         "--batch-size", str(args.bench_batch_size), "--csv", bench,
         *shlex.split(args.bench_args)], env=env)

    png = os.path.join(out, "accuracy_throughput.png")
    reference = []
    if args.reference_results:
        reference = ["--reference-results", *args.reference_results, "--reference-bench", *args.reference_bench]
    run([sys.executable, "-m", "pipelines.plot", "--results", results, "--bench", bench, "--out", png, "--title",
         f"{Path(args.config).stem}: top-1 vs inference throughput", *reference], env=env)
    return {"results": results, "bench": bench, "plot": png}


def submit_array(cfg: TrainConfig, recipes: dict[str, str], out: str, args: argparse.Namespace) -> int:
    """The unfinished models as one job array of slurm/sweep.sbatch (one line ``RECIPE NAME`` per task)."""
    from slurm.submit import SubmitError, plan_job, sweep_command

    todo = [n for n in recipes if not finished(os.path.join(out, n))]
    if not todo:
        print(f"every run in {out} is finished: collect with --collect")
        return 0
    try:
        plan = plan_job(1, args.gpus_per_node, cfg)
    except SubmitError as exc:
        raise CompareError(str(exc)) from None
    listing = os.path.join(out, "sweep.txt")
    atomic_write_text(listing, "".join(f"{os.path.abspath(recipes[n])} {n}\n" for n in todo))
    cmd = sweep_command(plan, Path(listing), Path(out).resolve(), len(todo), partition=args.partition,
                        time=args.time, account=args.account, cpus_per_task=args.cpus_per_task)
    print(f"# {len(todo)} array task(s), each {plan.describe()}")
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if shutil.which("sbatch") is None:
        raise CompareError("sbatch not found: run this on a SLURM login node (or start the local cluster: "
                           "bash slurm/local_cluster.sh up; export SLURM_CONF=...)")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CompareError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job array {job_id}: {', '.join(f'{i}={n}' for i, n in enumerate(todo))}\n"
          f"  logs:    {os.path.join(out, 'logs')}\n"
          f"  then:    the same command with --collect instead of --slurm, once the tasks have finished")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the shared recipe: a path or a name under train/configs")
    p.add_argument("--models", required=True, help="comma-separated timm names, e.g. mrconvnext_atto,convnext_atto")
    p.add_argument("--out", default=None, help="default runs/compare/<recipe>")
    p.add_argument("--data", default=None, help="shard folder (default: the recipe's data.dir)")
    p.add_argument("--ranks", type=int, default=1, help="local ranks per training (torchrun)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every model (repeatable)")
    p.add_argument("--bench-batch-size", type=int, default=256)
    p.add_argument("--bench-args", default="", help='more options for pipelines.benchmark models, e.g. "--amp bf16"')
    p.add_argument("--reference-results", nargs="+", default=None,
                   help="a reference family for the plot: timm results CSVs (e.g. results-imagenet.csv)")
    p.add_argument("--reference-bench", nargs="+", default=None, help="timm benchmark CSVs for --reference-results")
    p.add_argument("--collect", action="store_true", help="only export, evaluate, benchmark and plot finished runs")
    g = p.add_argument_group("SLURM (--slurm: submit the trainings as a job array instead of running them here)")
    g.add_argument("--slurm", action="store_true")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per array task (0: one CPU task)")
    g.add_argument("--partition")
    g.add_argument("--time")
    g.add_argument("--account")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--dry-run", action="store_true", help="print the sbatch command, submit nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        models = parse_models(args.models)
        if args.ranks < 1:
            raise CompareError(f"--ranks must be at least 1, got {args.ranks}")
        if bool(args.reference_results) != bool(args.reference_bench):
            raise CompareError("--reference-results and --reference-bench go together")
        overrides = list(args.overrides) + ([f"data.dir={os.path.abspath(args.data)}"] if args.data else [])
        cfg = load_config(args.config, overrides)
        cfg.data.dir = os.path.abspath(cfg.data.dir)
        data = cfg.data.dir
        if not os.path.exists(os.path.join(data, INFO_NAME)):
            raise CompareError(f"no shards in {data} (write them with python -m pipelines.data.shards, or pass --data)")
        out = os.path.abspath(args.out or os.path.join("runs", "compare", Path(args.config).stem))
        recipes = write_configs(cfg, models, out)
        if args.slurm:
            return submit_array(cfg, recipes, out, args)
        # Local ranks share the machine's cores; one intra-op thread each avoids oversubscription.
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if not args.collect:
            for i, name in enumerate(models, 1):
                run_dir = os.path.join(out, name)
                if finished(run_dir):
                    print(f"== {i}/{len(models)} {name}: finished in {run_dir}, not retrained")
                    continue
                print(f"\n== {i}/{len(models)} train {name} -> {run_dir}")
                run(train_cmd(recipes[name], run_dir, args.ranks), env=env)
        with open(os.path.join(data, INFO_NAME)) as f:
            num_classes = cfg.model.num_classes or len(json.load(f).get("classes") or [])
        if not num_classes:
            raise CompareError(f"{data}/{INFO_NAME} lists no classes: set model.num_classes (--set)")
        paths = collect(cfg, models, out, data, num_classes, env, args)
    except (CompareError, ConfigError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    print(f"\n== done: {paths['results']} (top-1), {paths['bench']} (throughput), {paths['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
