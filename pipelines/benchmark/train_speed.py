"""``python -m pipelines.benchmark train``: DeepSpeed training throughput (images/s) with the trainer's own engine
setup, for 1 and 2 ranks (scaling efficiency) and for each ``mrconvnext_*`` beside the matching ``convnext_*``,
all in one run under the same config.

Synthetic data (one fixed random batch per rank, random labels): this measures forward + backward + optimizer
+ gradient all-reduce, not data loading. Per-rank batch is fixed (weak scaling): efficiency = images/s at N
ranks / (N x images/s at 1 rank). Each (model, ranks) cell runs in fresh processes launched with torchrun.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

from pipelines.compare import peer_of
from pipelines.data.files import atomic_write
from train.distributed import free_port

RESULT_PREFIX = "BENCH_RESULT "


def worker(args: argparse.Namespace) -> int:
    """One rank of one measurement (started by torchrun)."""
    import timm
    import torch
    from deepspeed.accelerator import get_accelerator

    import models  # noqa: F401  (registers mrconvnext_*)
    from train.config import BatchPlan, CompileConfig, DeepSpeedConfig
    from train.distributed import init_distributed
    from train.engine import compile_engine, create_engine, deepspeed_config
    from train.loop import loss_fn
    from train.optim import create_optimizer

    world = init_distributed()
    kwargs = {"img_size": args.img_size} if args.model.startswith("mrconvnext_") else {}
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.num_classes, **kwargs)
    optimizer = create_optimizer(model, 1e-3, 0.05, (0.9, 0.999), 1e-8)
    section = DeepSpeedConfig(zero_stage=args.zero_stage, precision=args.precision)
    engine = create_engine(model, optimizer,
                           deepspeed_config(section, BatchPlan(args.batch_size, 1, world.world_size)))
    compile_engine(engine, CompileConfig(enabled=args.compile))  # compiled in the warm-up steps
    device = get_accelerator().current_device_name()
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    target = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    engine.train()

    def step() -> None:
        loss = loss_fn(engine(images), target)
        engine.backward(loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    get_accelerator().synchronize()
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    get_accelerator().synchronize()
    torch.distributed.barrier()
    elapsed = time.perf_counter() - t0
    if world.rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(RESULT_PREFIX + json.dumps({
            "model": args.model, "ranks": world.world_size, "images_per_sec":
            args.batch_size * args.steps * world.world_size / elapsed, "step_ms": 1000 * elapsed / args.steps,
            "params": params, "compiled": engine.is_compiled}), flush=True)
    return 0


def measure(model: str, ranks: int, args: argparse.Namespace) -> dict:
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()), "-m", "pipelines.benchmark.train_speed", "--worker", "--model", model]
    for key in ("batch_size", "img_size", "steps", "warmup", "zero_stage", "precision", "num_classes"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--compile"] if args.compile else []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"{model} on {ranks} ranks failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")


def peer_ratios(results: list[dict], name: str, ranks: int) -> list[float]:
    """``name``'s img/s over its peer's at ``ranks`` ranks, one ratio per round (both measured in that round)."""
    peer = peer_of(name)
    by = {(r["model"], r["ranks"], r.get("round", 0)): r["images_per_sec"] for r in results}
    rounds = sorted({r.get("round", 0) for r in results})
    return [by[(name, ranks, k)] / by[(peer, ranks, k)] for k in rounds
            if peer and (name, ranks, k) in by and (peer, ranks, k) in by]


def table(results: list[dict], ranks: list[int]) -> str:
    """One row per model: params, img/s per world size (the median over rounds), scaling efficiency and the ratio to
    its ConvNeXt peer at the largest world size (the median of the per-round ratios)."""
    speeds: dict[tuple[str, int], list[float]] = {}
    params = {}
    for r in results:
        speeds.setdefault((r["model"], r["ranks"]), []).append(r["images_per_sec"])
        params[r["model"]] = r["params"]
    speed = {key: statistics.median(values) for key, values in speeds.items()}
    names = list(dict.fromkeys(r["model"] for r in results))
    head = f"{'model':20s} {'params':>10s}" + "".join(f" {f'{n} rank img/s':>14s}" for n in ranks)
    if len(ranks) > 1:
        head += "".join(f" {f'eff@{n}':>8s}" for n in ranks[1:])
    head += f" {'vs convnext':>11s}"
    lines = [head, "-" * len(head)]
    for name in names:
        row = f"{name:20s} {params[name]:>10,d}"
        row += "".join(f" {speed[(name, n)]:>14.1f}" for n in ranks)
        base = speed[(name, ranks[0])] / ranks[0]  # per-rank throughput at the smallest world
        row += "".join(f" {speed[(name, n)] / (n * base):>8.2f}" for n in ranks[1:])
        ratios = peer_ratios(results, name, ranks[-1])
        row += f" {statistics.median(ratios):>10.2f}x" if ratios else f" {'':>11s}"
        lines.append(row)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.benchmark train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mrconvnext_atto",
                   help="comma list; each mrconvnext_* is measured beside its convnext_* peer")
    p.add_argument("--ranks", default="1,2", help="comma list of world sizes")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every cell this many times, the model order reversed every other round; the table "
                        "shows medians (on a shared machine the ratio of one round can be off by 0.1 or more)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model (inductor, as the trainer's compile.enabled); the warm-up steps "
                        "compile it")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    names = []
    for name in args.models.split(","):
        names += [name] + ([peer_of(name)] if peer_of(name) else [])
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.rounds < 1:
        print(f"--rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    results = []
    order = list(dict.fromkeys(names))
    for k in range(args.rounds):
        for name in (order if k % 2 == 0 else order[::-1]):  # drift of a shared machine cancels over two rounds
            for n in ranks:
                results.append(dict(measure(name, n, args), round=k))
                label = f" (round {k + 1}/{args.rounds})" if args.rounds > 1 else ""
                print(f"  {name} x{n} rank(s): {results[-1]['images_per_sec']:.1f} img/s{label}", flush=True)
    print(f"\nDeepSpeed training throughput, synthetic data (one fixed random batch), batch {args.batch_size}/rank, "
          f"{args.img_size}px, ZeRO-{args.zero_stage}, {args.precision}{', compiled' if args.compile else ''}, "
          f"{args.steps} timed steps after "
          f"{args.warmup} warm-up, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, {args.rounds} round(s) "
          f"(medians); eff@N = img/s at N ranks / (N x per-rank img/s at {ranks[0]} rank(s)); vs convnext at "
          f"{ranks[-1]} rank(s)\n")
    print(table(results, ranks))
    for name in order:
        ratios = peer_ratios(results, name, ranks[-1])
        if len(ratios) > 1:
            print(f"{name} vs {peer_of(name)} per round: {' '.join(f'{r:.2f}' for r in ratios)} "
                  f"(median {statistics.median(ratios):.2f})")
    if args.json:
        with atomic_write(args.json) as tmp, open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
