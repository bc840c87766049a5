"""The paper's figures from the project's CSVs and checkpoints (matplotlib, Agg backend).

    python -m pipelines.plot --results CSV [CSV ...] --bench CSV [CSV ...] --out FILE.png [--title T]
        top-1 (timm's results CSV: ours from pipelines.evaluate, or timm's published results-imagenet.csv)
        against inference throughput (timm's benchmark CSV from python -m pipelines.benchmark models), log x;
        one labelled point per model, families as lines, the Pareto front marked, marker area by GMACs.
    python -m pipelines.plot alpha --model NAME --checkpoint FILE --out FILE.png [--model-kwargs JSON]
        per-stage heat maps of ||alpha_i||^2 (summed over channels) per block and resolution (paper, Fig. 3b).
    python -m pipelines.plot kernels --model NAME --checkpoint FILE [--layer stages.2.blocks.0.conv_dw]
        --out FILE.png [--channels 4] [--inference-mode]
        the fused kernels of one layer (a few channels) and their envelope over backward and forward lags
        (paper, Fig. 7).

Rows are joined on the model name without its ``.tag`` and ``@fused``/``@unfused`` marker, and on the image
size. A model benchmarked in several forms takes its fused throughput (timm's convention for reparameterizable
models), else the plain entry. Rows that cannot be joined are listed.

The figure functions take plain data and return a ``Figure`` (tests call them directly); ``main`` wires them.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

# Size words of timm's model names (convnext_tiny, vit_base_patch16_224, mrconvnext_atto, ...).
SIZE_WORDS = {"atto", "femto", "pico", "nano", "tiny", "small", "medium", "base", "large", "xlarge", "xxlarge",
              "huge", "giant", "gigantic", "mini", "micro", "little", "big", "s", "m", "l", "xl", "t", "b"}
# Preference among the forms of one benchmarked model.
FORM_ORDER = ("fused", "", "unfused")
DEFAULT_LAYER = "stages.2.blocks.0.conv_dw"


# ----------------------------------------------------------------------------------------------------------
# names and joins


def base_name(name: str) -> str:
    """``convnext_tiny.fb_in1k`` -> ``convnext_tiny``; ``mrconvnext_tiny@fused`` -> ``mrconvnext_tiny``."""
    return name.split("@", 1)[0].split(".", 1)[0]


def form_of(name: str) -> str:
    return name.split("@", 1)[1] if "@" in name else ""


def family(name: str) -> str:
    """The model name without its size: ``mrconvnext_tiny`` -> ``mrconvnext``, ``resnet50`` -> ``resnet``."""
    base = base_name(name)
    tokens = base.split("_")
    kept = [t for t in tokens if t not in SIZE_WORDS]
    if kept and len(kept) < len(tokens):
        return "_".join(kept)
    return re.sub(r"_?\d+[a-z]?$", "", base) or base  # resnet50, regnety_040: the size is a number


@dataclass
class Point:
    label: str
    family: str
    top1: float
    throughput: float  # samples/s
    gmacs: float | None
    bench_model: str  # the benchmark row it came from


def read_csvs(paths: Iterable[str]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in paths:
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def join(results: Sequence[Mapping[str, str]], bench: Sequence[Mapping[str, str]]
         ) -> tuple[list[Point], list[str]]:
    """Points for every results row whose model (and image size) was benchmarked; notes on the rest."""
    notes: list[str] = []
    by_base: dict[str, dict[str, Mapping[str, str]]] = {}
    for row in bench:  # later CSVs win on the very same entry
        key, form = base_name(row["model"]), form_of(row["model"])
        previous = by_base.setdefault(key, {}).get(form)
        if previous is not None:
            notes.append(f"benchmark row {row['model']!r} listed twice: the later one is used")
        by_base[key][form] = row
    chosen: dict[str, Mapping[str, str]] = {}
    for key, forms in by_base.items():
        form = min(forms, key=lambda f: FORM_ORDER.index(f) if f in FORM_ORDER else len(FORM_ORDER))
        chosen[key] = forms[form]
        others = [r["model"] for f, r in forms.items() if f != form]
        if others:
            notes.append(f"{key}: throughput of {forms[form]['model']} (not {', '.join(others)})")

    points, used, no_bench, size_mismatch = [], set(), [], []
    bases = [base_name(r["model"]) for r in results]
    for row, key in zip(results, bases):
        b = chosen.get(key)
        if b is None:
            no_bench.append(row["model"])
            continue
        if row.get("img_size") and b.get("infer_img_size") and int(float(row["img_size"])) != int(
                float(b["infer_img_size"])):
            size_mismatch.append(f"{row['model']} ({row['img_size']}px; benchmarked at {b['infer_img_size']}px)")
            continue
        top1, speed = _float(row.get("top1")), _float(b.get("infer_samples_per_sec"))
        if top1 is None or speed is None or speed <= 0:
            notes.append(f"{row['model']}: no top1 or throughput value")
            continue
        label = row["model"] if bases.count(key) > 1 else key
        points.append(Point(label, family(key), top1, speed, _float(b.get("infer_gmacs")), b["model"]))
        used.add(key)
    if no_bench:
        shown = ", ".join(no_bench[:5]) + (f" and {len(no_bench) - 5} more" if len(no_bench) > 5 else "")
        notes.append(f"{len(no_bench)} results rows not benchmarked: {shown}")
    if size_mismatch:
        notes.append(f"{len(size_mismatch)} results rows at another image size: {', '.join(size_mismatch[:5])}")
    unused = [chosen[k]["model"] for k in chosen if k not in used]
    if unused:
        notes.append(f"benchmark rows with no accuracy: {', '.join(unused)}")
    return points, notes


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point beats on both top-1 and throughput, by increasing throughput."""
    front = [i for i, p in enumerate(points)
             if not any(q.top1 >= p.top1 and q.throughput >= p.throughput
                        and (q.top1 > p.top1 or q.throughput > p.throughput) for q in points)]
    return sorted(front, key=lambda i: points[i].throughput)


# ----------------------------------------------------------------------------------------------------------
# figures


def _figure(size_px: tuple[int, int], dpi: int, **kwargs) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi, layout="constrained",
                             squeeze=False, **kwargs)
    return fig, axes


def accuracy_throughput_figure(points: Sequence[Point], *, title: str = "Top-1 vs inference throughput",
                               xlabel: str = "inference throughput (samples/s, log scale)",
                               size_px: tuple[int, int] = (1000, 700), dpi: int = 100) -> Figure:
    if not points:
        raise ValueError("no point to plot: no results row could be joined with a benchmark row")
    fig, axes = _figure(size_px, dpi)
    ax = axes[0, 0]
    known = [p.gmacs for p in points if p.gmacs]
    biggest = max(known) if known else 1.0
    families = sorted({p.family for p in points})
    colours = plt.get_cmap("tab10")
    for k, fam in enumerate(families):
        members = sorted((p for p in points if p.family == fam), key=lambda p: p.throughput)
        sizes = [40 + 360 * (p.gmacs / biggest) if p.gmacs else 60 for p in members]
        colour = colours(k % 10)
        ax.plot([p.throughput for p in members], [p.top1 for p in members], "-", color=colour, alpha=0.6, lw=1.5)
        ax.scatter([p.throughput for p in members], [p.top1 for p in members], s=sizes, color=colour,
                   alpha=0.85, edgecolors="white", linewidths=0.8, label=fam, zorder=3)
        for p in members:
            gm = f", {p.gmacs:.2f} GMACs" if p.gmacs else ""
            ax.annotate(f"{p.label}{gm}", (p.throughput, p.top1), textcoords="offset points", xytext=(6, 6),
                        fontsize=8)
    front = [points[i] for i in pareto_front(points)]
    ax.step([p.throughput for p in front], [p.top1 for p in front], where="post", color="black", ls="--", lw=1,
            label="Pareto front", zorder=2)
    ax.scatter([p.throughput for p in front], [p.top1 for p in front], s=160, facecolors="none",
               edgecolors="black", linewidths=1.2, zorder=4)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())  # plain samples/s, not powers of ten
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=9, title="family (marker area ~ GMACs)", title_fontsize=8)
    return fig


def alpha_figure(stages: Sequence[np.ndarray], lengths: Sequence[Sequence[int]], *,
                 title: str = "||alpha||^2 per block and resolution", size_px: tuple[int, int] = (1200, 450),
                 dpi: int = 100) -> Figure:
    """One heat map per stage: rows are blocks, columns resolutions (kernel length), values ||alpha_i||^2."""
    if not stages:
        raise ValueError("no MRConv layer with branches: alpha needs a checkpoint of the unfused model")
    fig, axes = _figure(size_px, dpi, ncols=len(stages))
    for s, (norms, lens) in enumerate(zip(stages, lengths)):
        ax = axes[0, s]
        image = ax.imshow(norms, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lens)), [str(n) for n in lens], fontsize=7, rotation=45)
        ax.set_yticks(range(norms.shape[0]))
        ax.set_xlabel("kernel length")
        ax.set_ylabel("block") if s == 0 else None
        ax.set_title(f"stage {s}", fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def lag_axis(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lags, values) of kernels (dirs, ..., l): backward lags -l..-1, then forward 0..l-1 (causal: forward)."""
    length = kernel.shape[-1]
    forward = np.arange(length)
    if kernel.shape[0] == 1:
        return forward, kernel[0]
    lags = np.concatenate([-np.arange(length, 0, -1), forward])
    return lags, np.concatenate([kernel[1][..., ::-1], kernel[0]], axis=-1)


def kernels_figure(kernel: np.ndarray, envelope: np.ndarray, channels: Sequence[int], *,
                   lengths: Sequence[int] = (), title: str = "learned kernels",
                   size_px: tuple[int, int] = (1000, 700), dpi: int = 100) -> Figure:
    """Top: the fused kernel of a few channels over the lags; bottom: the envelope (mean |k| over channels),
    with the branch lengths marked. ``kernel``: (dirs, D, l); ``envelope``: (dirs, l)."""
    fig, axes = _figure(size_px, dpi, nrows=2, sharex=True)
    lags, values = lag_axis(kernel)
    for c in channels:
        axes[0, 0].plot(lags, values[c], lw=0.9, label=f"channel {c}")
    axes[0, 0].axhline(0, color="grey", lw=0.5)
    axes[0, 0].set_ylabel("kernel value")
    axes[0, 0].legend(fontsize=8)
    env_lags, env = lag_axis(envelope)
    axes[1, 0].plot(env_lags, np.maximum(env, 1e-12), color="black", lw=1)
    axes[1, 0].set_yscale("log")
    for n in lengths:  # beyond lag n only the longer branches contribute
        for x in ((n, -n) if kernel.shape[0] == 2 else (n,)):
            axes[1, 0].axvline(x, color="tab:red", lw=0.5, ls=":")
    axes[1, 0].set_ylabel("envelope: mean |k| over channels")
    axes[1, 0].set_xlabel("lag (negative: backward kernel, future positions)")
    fig.suptitle(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------------------
# model diagnostics


def mrconv_layers(model) -> dict[str, object]:
    from models import MRConv

    return {name: m for name, m in model.named_modules() if isinstance(m, MRConv)}


def alpha_norms(model) -> tuple[list[np.ndarray], list[list[int]]]:
    """Per stage: (blocks, resolutions) ||alpha_i||^2 and the branch lengths (``models.mrconv.alpha_energy``)."""
    from models.mrconv import alpha_energy

    stages = list(alpha_energy(model).values())
    return [energy for energy, _ in stages], [lengths for _, lengths in stages]


def _load(args: argparse.Namespace, inference_mode: bool):
    from pipelines.evaluate import export_info, load_model

    side = export_info(args.checkpoint)
    kwargs = dict(side.get("kwargs") or {})
    kwargs.update(json.loads(args.model_kwargs) if args.model_kwargs else {})
    try:
        return load_model(args.model, args.checkpoint, model_kwargs=kwargs,
                          inference_mode=inference_mode or bool(side.get("inference_mode")))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise SystemExit(f"error: cannot load {args.checkpoint} into {args.model}: {exc}") from None


def _save(fig: Figure, out: str, what: str) -> None:
    import os

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out} ({what})")


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def _common(p: argparse.ArgumentParser, size: str) -> None:
    p.add_argument("--out", required=True, help="output .png")
    p.add_argument("--title", default=None)
    p.add_argument("--size", type=_size, default=_size(size), help=f"pixels WxH (default {size})")
    p.add_argument("--dpi", type=int, default=100)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model-kwargs", default=None, help='JSON, e.g. \'{"img_size": 32}\' (default: the export '
                                                        'side file\'s kwargs)')


def main_accuracy(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="+", required=True, help="timm results CSVs (top1 per model)")
    p.add_argument("--bench", nargs="+", required=True, help="timm benchmark CSVs (infer_samples_per_sec)")
    _common(p, "1000x700")
    args = p.parse_args(argv)
    try:
        points, notes = join(read_csvs(args.results), read_csvs(args.bench))
    except (OSError, KeyError) as exc:
        raise SystemExit(f"error: cannot read the CSVs: {exc!r}") from None
    for note in notes:
        print(f"note: {note}")
    bench = read_csvs(args.bench)
    batches = sorted({r.get("infer_batch_size", "?") for r in bench})
    sizes = sorted({r.get("infer_img_size", "?") for r in bench})
    xlabel = (f"inference throughput (samples/s, batch {'/'.join(batches)}, {'/'.join(sizes)}px, log scale)")
    machines = []
    for path in args.bench:
        try:
            with open(path + ".json") as f:
                machines.append(json.load(f).get("machine", ""))
        except OSError:
            pass
    if machines:
        xlabel += "\n" + "; ".join(sorted(set(filter(None, machines))))
    try:
        fig = accuracy_throughput_figure(points, title=args.title or "Top-1 vs inference throughput",
                                         xlabel=xlabel, size_px=args.size, dpi=args.dpi)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    _save(fig, args.out, f"{len(points)} points, Pareto front: "
                         f"{', '.join(points[i].label for i in pareto_front(points))}")
    return 0


def main_alpha(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.plot alpha",
                                description="per-stage heat maps of ||alpha||^2 per block x resolution")
    _model_args(p)
    _common(p, "1200x450")
    args = p.parse_args(argv)
    model = _load(args, inference_mode=False)
    stages, lengths = alpha_norms(model)
    try:
        fig = alpha_figure(stages, lengths, title=args.title or f"{args.model}: ||alpha_i||^2 per block",
                           size_px=args.size, dpi=args.dpi)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    _save(fig, args.out, f"{len(stages)} stages")
    return 0


def main_kernels(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.plot kernels",
                                description="learned fused kernels of one layer and their envelope")
    _model_args(p)
    p.add_argument("--layer", default=None, help=f"MRConv module name (default {DEFAULT_LAYER}, else the first)")
    p.add_argument("--channels", type=int, default=4, help="how many channels to draw (evenly spaced)")
    p.add_argument("--inference-mode", action="store_true", help="the checkpoint is fused")
    _common(p, "1000x700")
    args = p.parse_args(argv)
    import torch

    layers = mrconv_layers(_load(args, inference_mode=args.inference_mode))
    if not layers:
        raise SystemExit(f"error: {args.model} has no MRConv layer")
    name = args.layer or (DEFAULT_LAYER if DEFAULT_LAYER in layers else next(iter(layers)))
    if name not in layers:
        raise SystemExit(f"error: no MRConv layer {name!r}; layers: {', '.join(layers)}")
    layer = layers[name]
    with torch.no_grad():
        kernel = layer.fused_kernel()[0].detach().cpu().numpy()
        envelope = layer.kernel_envelope().cpu().numpy()
    dim = kernel.shape[1]
    channels = sorted({int(c) for c in np.linspace(0, dim - 1, min(args.channels, dim))})
    lengths = [] if layer.inference_mode else list(layer.lengths)
    fig = kernels_figure(kernel, envelope, channels, lengths=lengths, size_px=args.size, dpi=args.dpi,
                         title=args.title or f"{args.model} {name}: fused kernels (length {kernel.shape[-1]})")
    _save(fig, args.out, f"layer {name}, channels {channels}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"alpha": main_alpha, "kernels": main_kernels}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return main_accuracy(argv)


if __name__ == "__main__":
    sys.exit(main())
