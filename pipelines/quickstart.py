"""``python -m pipelines.quickstart``: the whole product end to end on the built-in default, Fashion-MNIST.

Every step is one of the repository's own commands, printed before it runs, so the output doubles as a
tutorial; the same commands scale to ImageNet (see the README):

  1. data      Fashion-MNIST idx files (Debian's dataset-fashion-mnist, else the official download)
               -> WebDataset shards                                  python -m pipelines.data.shards fashion-mnist
  2. train     a small MRConvNeXt with DeepSpeed on 2 local ranks    torchrun -m train --config fashion_mnist
               and its ConvNeXt peer, same recipe: on a GPU always, on CPU with --with-peer (its training
               takes about 0.7x the MRConvNeXt's there)
  3. export    fold it, check fused == unfused on test images        python -m train.export
  4. evaluate  test top-1/top-5 of the exported fused model (+ peer)  python -m pipelines.evaluate
  5. benchmark fused vs unfused vs the matching ConvNeXt             python -m pipelines.benchmark models
  6. plot      accuracy vs throughput, alpha maps, learned kernels   python -m pipelines.plot

Re-running resumes: finished shards are kept and training resumes from its last checkpoint. For more models
than one pair (e.g. femto and pico of both families) see ``python -m pipelines.compare``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request

from pipelines import tables
from pipelines.data.files import atomic_write

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# idx files: name -> (magic number, number of items)
IDX_FILES = {
    "train-images-idx3-ubyte.gz": (2051, 60000),
    "train-labels-idx1-ubyte.gz": (2049, 60000),
    "t10k-images-idx3-ubyte.gz": (2051, 10000),
    "t10k-labels-idx1-ubyte.gz": (2049, 10000),
}


def idx_ok(path: str, magic: int, count: int) -> bool:
    """An idx file with the expected header (the Debian package re-compresses, so no checksum of the .gz)."""
    try:
        with gzip.open(path) as f:
            header = f.read(8)
        return int.from_bytes(header[:4], "big") == magic and int.from_bytes(header[4:8], "big") == count
    except (OSError, EOFError):  # EOFError: a truncated .gz
        return False


def fashion_mnist_source(cache_dir: str) -> str:
    """A folder with the four Fashion-MNIST idx files: Debian's package, else a verified download."""
    if all(idx_ok(os.path.join(DEBIAN_DIR, n), *spec) for n, spec in IDX_FILES.items()):
        print(f"[data] Fashion-MNIST from the Debian package dataset-fashion-mnist ({DEBIAN_DIR})")
        return DEBIAN_DIR
    os.makedirs(cache_dir, exist_ok=True)
    for name, spec in IDX_FILES.items():
        path = os.path.join(cache_dir, name)
        if idx_ok(path, *spec):
            continue
        print(f"[data] downloading {DOWNLOAD_URL}{name} (no dataset-fashion-mnist package: "
              f"`apt-get install dataset-fashion-mnist` avoids this)")
        with atomic_write(path) as tmp:
            try:
                urllib.request.urlretrieve(DOWNLOAD_URL + name, tmp)
            except OSError as exc:
                raise SystemExit(f"could not download {name}: {exc}. Install the Debian package "
                                 f"dataset-fashion-mnist or put the four idx .gz files into {cache_dir}") from exc
            if not idx_ok(tmp, *spec):
                raise SystemExit(f"{DOWNLOAD_URL}{name} is not the Fashion-MNIST idx file it should be")
    return cache_dir


def run(cmd: list[str], *, env: dict | None = None) -> None:
    """Run one of the repository's commands, showing it first; stop the quickstart if it fails."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise SystemExit(f"step failed (exit {result.returncode}): {shlex.join(cmd)}")


def throughput_summary(bench_csv: str, model: str, peer: str) -> tuple[str, str]:
    """(plot title, summary line) of the benchmark, naming the device it ran on (its CSV's side file)."""
    device = (tables.read_side(bench_csv) or {}).get("device", "device not recorded")
    speed = {r["model"]: float(r["infer_samples_per_sec"]) for r in tables.read_rows(bench_csv)}
    fused, unfused, base = speed[f"{model}@fused"], speed[f"{model}@unfused"], speed[peer]
    return (f"Fashion-MNIST: top-1 vs {device} inference throughput",
            f"{f'throughput ({device})':<21} fused {fused:,.0f} img/s = {fused / unfused:.2f}x unfused "
            f"({unfused:,.0f}), {fused / base:.2f}x {peer} ({base:,.0f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion-mnist-wds", help="shard folder (written if missing)")
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("--config", default="fashion_mnist", help="training recipe (train/configs)")
    p.add_argument("--ranks", type=int, default=2, help="local DeepSpeed ranks (gloo on CPU, NCCL on GPUs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe overrides passed to the trainer, e.g. --set schedule.epochs=1")
    p.add_argument("--with-peer", action="store_true",
                   help="also train the matching ConvNeXt on CPU (always done on a GPU), so that the plot compares")
    args = p.parse_args(argv)

    from deepspeed.accelerator import get_accelerator

    from pipelines import compare
    from train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, [f"data.dir={args.data}", *args.overrides])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    py = sys.executable
    peer = compare.peer_of(cfg.model.name) or cfg.model.name
    # On a GPU the peer costs little next to the MRConvNeXt; on 2 CPU cores it would break the 15-minute demo.
    with_peer = (args.with_peer or get_accelerator().device_name() != "cpu") and peer != cfg.model.name
    run_dir, data = args.run_dir, args.data
    peer_dir = os.path.join(run_dir, peer)
    weights = os.path.join(run_dir, "model.safetensors")
    results_csv, bench_csv = os.path.join(run_dir, "results.csv"), os.path.join(run_dir, "bench.csv")
    t0 = time.perf_counter()
    # The 2 ranks share the machine's cores; one intra-op thread each avoids oversubscription.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))

    print(f"== 1/6 data: Fashion-MNIST -> WebDataset shards in {data}")
    run([py, "-m", "pipelines.data.shards", "fashion-mnist", fashion_mnist_source("data/fashion-mnist"), data])

    print(f"\n== 2/6 train: {cfg.model.name} with DeepSpeed on {args.ranks} local ranks -> {run_dir}")
    run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}", "-m", "train",
         "--config", args.config, "--run-dir", run_dir, "--set", f"data.dir={data}",
         *[a for o in args.overrides for a in ("--set", o)]], env=env)
    if with_peer:
        print(f"\n== 2/6 train: the peer {peer}, same recipe and shards -> {peer_dir}")
        recipe = compare.write_configs(cfg, [peer], run_dir)[peer]
        if compare.finished(peer_dir):
            print(f"{peer}: finished in {peer_dir}, not retrained")
        else:
            run(compare.train_cmd(recipe, peer_dir, args.ranks), env=env)

    print("\n== 3/6 export: fold the branches into one kernel per layer, check fused == unfused")
    unfused = os.path.join(run_dir, "model_unfused.safetensors")
    run([py, "-m", "train.export", run_dir, weights, "--data", data, "--unfused-out", unfused], env=env)

    print("\n== 4/6 evaluate: the exported fused model on the 10,000 test images")
    if os.path.exists(results_csv):
        os.remove(results_csv)
    run([py, "-m", "pipelines.evaluate", "--model", cfg.model.name, "--checkpoint", weights, "--data", data,
         "--name", f"{cfg.model.name}@fused", "--results", results_csv], env=env)
    if with_peer:
        print(f"\n== 4/6 evaluate: the peer {peer} (exported first)")
        tables.merge([results_csv, compare.export_and_evaluate(peer, peer_dir, data, env)], results_csv,
                     tables.RESULTS_COLUMNS)

    print("\n== 5/6 benchmark: inference throughput, fused vs unfused vs the matching ConvNeXt (one run)")
    from pipelines.data.loader import read_info

    num_classes = cfg.model.num_classes or len(read_info(data)["classes"])
    img_size = cfg.model.kwargs.get("img_size", cfg.data.img_size)
    model_kwargs = compare.bench_kwargs(cfg, [cfg.model.name, peer])
    run([py, "-m", "pipelines.benchmark", "models", "--models", f"{cfg.model.name}@fused",
         f"{cfg.model.name}@unfused", peer, "--img-size", str(img_size), "--in-chans", str(cfg.model.in_chans),
         "--num-classes", str(num_classes), *(["--model-kwargs", *model_kwargs] if model_kwargs else []),
         "--batch-size", "256", "--csv", bench_csv], env=env)
    title, throughput = throughput_summary(bench_csv, cfg.model.name, peer)

    print("\n== 6/6 plot: accuracy vs throughput, per-stage alpha weights, learned kernels")
    plots = {name: os.path.join(run_dir, f"{name}.png") for name in ("accuracy_throughput", "alpha", "kernels")}
    run([py, "-m", "pipelines.plot", "--results", results_csv, "--bench", bench_csv,
         "--out", plots["accuracy_throughput"], "--title", title])
    for what, extra in (("alpha", []), ("kernels", ["--layer", "stages.0.blocks.0.conv_dw"])):  # the longest
        run([py, "-m", "pipelines.plot", what, "--model", cfg.model.name, "--checkpoint", unfused,
             "--model-kwargs", json.dumps(cfg.model.kwargs), "--out", plots[what], *extra])

    top1 = float(tables.read_rows(results_csv)[0]["top1"])
    minutes = (time.perf_counter() - t0) / 60
    print(f"""
== summary ({minutes:.1f} min)
  test top-1            {top1:.2f}% on the 10,000 Fashion-MNIST test images ({cfg.model.name}, fused)
  {throughput}
  exported weights      {weights} (+ {weights[:-len('.safetensors')]}.json: how to load it with timm)
  plots                 {', '.join(plots.values())}
  TensorBoard           tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}
  results (timm CSVs)   {results_csv}, {bench_csv}""")
    if with_peer:
        peer_top1 = next(float(r["top1"]) for r in tables.read_rows(results_csv) if r["model"] == peer)
        print(f"  peer top-1            {peer_top1:.2f}% ({peer}, same recipe; run dir {peer_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
