"""The paper's figures from the project's CSVs and checkpoints (matplotlib, Agg backend).

    python -m pipelines.plot --results CSV [CSV ...] --bench CSV [CSV ...] --out FILE.png [--title T]
        top-1 (timm's results CSV: ours from pipelines.evaluate, or timm's published results-imagenet.csv)
        against inference throughput (timm's benchmark CSV from python -m pipelines.benchmark models), log x;
        one labelled point per model, each family with its Pareto front, marker area by GMACs, a hollow marker
        and an arrow from the unfused to the fused throughput of a model benchmarked in both forms, the device
        and settings of the benchmark (its side file OUT.csv.json) in the caption.
        [--reference-results CSV ... --reference-bench CSV ...] adds published rows (timm's
        results-imagenet.csv and benchmark CSVs) as grey reference families.
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
import json
import re
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: E402

from pipelines import tables  # noqa: E402

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
    unfused_throughput: float | None = None  # the same model's training form, when it was benchmarked too
    reference: bool = False  # from published CSVs (--reference-results), drawn in grey


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def join(results: Sequence[Mapping[str, str]], bench: Sequence[Mapping[str, str]], reference: bool = False
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
        unfused = by_base[key].get("unfused")
        slow = _float(unfused.get("infer_samples_per_sec")) if unfused is not None and unfused is not b else None
        fam = f"{family(key)} (reference)" if reference else family(key)
        points.append(Point(label, fam, top1, speed, _float(b.get("infer_gmacs")), b["model"], slow, reference))
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


def family_fronts(points: Sequence[Point]) -> dict[str, list[int]]:
    """Per family, the indices (into ``points``) of its Pareto front, by increasing throughput."""
    fronts = {}
    for fam in sorted({p.family for p in points}):
        members = [i for i, p in enumerate(points) if p.family == fam]
        fronts[fam] = [members[j] for j in pareto_front([points[i] for i in members])]
    return fronts


# Tick mantissas on a log axis, sparse to dense: the first set that gives at least 3 ticks is used.
TICK_MANTISSAS = ((1,), (1, 2, 5), (1, 2, 3, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9))
MIN_TICK_GAP = 0.08  # of the axis' log width: closer labels ("9,000" and "10,000") would overlap


def log_ticks(lo: float, hi: float) -> list[float]:
    """Readable major ticks for a log axis from ``lo`` to ``hi``: round values, at least two where the range
    allows, none closer than MIN_TICK_GAP of the axis."""
    width = np.log10(hi / lo)
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    ticks: list[float] = []
    for mantissas in TICK_MANTISSAS:
        ticks = sorted(m * 10.0 ** d for d in decades for m in mantissas if lo <= m * 10.0 ** d <= hi)
        if len(ticks) >= 3:
            break
    if len(ticks) < 3:  # within a decade (900-1,500): plain round numbers, as on a linear axis
        from matplotlib.ticker import MaxNLocator

        ticks = [float(t) for t in MaxNLocator(nbins=4, steps=[1, 2, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]
    kept: list[float] = []
    for t in ticks:
        if not kept or np.log10(t / kept[-1]) >= MIN_TICK_GAP * width:
            kept.append(t)
    return kept


def _tick_label(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:g}"


def marker_area(gmacs: float | None, biggest: float) -> float:
    return 40 + 360 * (gmacs / biggest) if gmacs else 60


def accuracy_throughput_figure(points: Sequence[Point], *, title: str = "Top-1 vs inference throughput",
                               xlabel: str = "inference throughput (samples/s, log scale)", caption: str = "",
                               size_px: tuple[int, int] = (1000, 700), dpi: int = 100) -> tuple[Figure, dict]:
    """Top-1 against throughput: one colour per family with its Pareto front, marker area by GMACs, and for a
    model benchmarked in both forms a hollow marker at its unfused throughput with an arrow to the fused one.
    Returns the figure and what it drew: ``points`` (label, family, top1, throughput, unfused_throughput, area),
    ``fronts`` (family -> labels by throughput), ``xticks`` and the ``caption``."""
    if not points:
        raise ValueError("no point to plot: no results row could be joined with a benchmark row")
    fig, axes = _figure(size_px, dpi)
    ax = axes[0, 0]
    known = [p.gmacs for p in points if p.gmacs]
    biggest = max(known) if known else 1.0
    fronts = family_fronts(points)
    colours, greys = plt.get_cmap("tab10"), plt.get_cmap("Greys")
    ours = [f for f in fronts if not any(p.reference for p in points if p.family == f)]
    references = [f for f in fronts if f not in ours]
    for fam, front in fronts.items():
        members = sorted((p for p in points if p.family == fam), key=lambda p: p.throughput)
        reference = fam in references
        colour = greys(0.4 + 0.2 * (references.index(fam) % 3)) if reference else colours(ours.index(fam) % 10)
        xs, ys = [p.throughput for p in members], [p.top1 for p in members]
        ax.scatter(xs, ys, s=[marker_area(p.gmacs, biggest) for p in members], color=colour,
                   alpha=0.5 if reference else 0.85, marker="s" if reference else "o", edgecolors="white",
                   linewidths=0.8, label=fam, zorder=3)
        best = [points[i] for i in front]
        # "pre": the staircase drops at each front point, never drawing a corner that no model reaches.
        ax.step([p.throughput for p in best], [p.top1 for p in best], where="pre", color=colour, ls="--", lw=1.2,
                alpha=0.8, zorder=2, label=f"{fam} Pareto front")
        for p in members:
            if p.unfused_throughput:
                ax.scatter([p.unfused_throughput], [p.top1], s=marker_area(p.gmacs, biggest), facecolors="none",
                           edgecolors=colour, linewidths=1.2, zorder=3)
                ax.annotate("", (p.throughput, p.top1), xytext=(p.unfused_throughput, p.top1),
                            arrowprops=dict(arrowstyle="->", color=colour, lw=1, shrinkA=6, shrinkB=8), zorder=2)
    # Labels alternate above and below in order of throughput, so neighbours at similar accuracy stay legible.
    labelled = sorted((p for p in points if not p.reference), key=lambda p: p.throughput)
    for k, p in enumerate(labelled):
        gm = f", {p.gmacs:.3g} GMACs" if p.gmacs else ""
        ax.annotate(f"{p.label}{gm}", (p.throughput, p.top1), textcoords="offset points",
                    xytext=(6, 6 if k % 2 == 0 else -14), fontsize=8)
    if any(p.unfused_throughput for p in points):
        ax.scatter([], [], s=60, facecolors="none", edgecolors="grey", label="unfused (training form) -> fused")
    speeds = [p.throughput for p in points] + [p.unfused_throughput for p in points if p.unfused_throughput]
    lo, hi = min(speeds) / 1.25, max(speeds) * 1.25
    ticks = log_ticks(lo, hi)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick_label(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())  # unlabelled minor ticks: labelled ones overlapped
    ax.set_xlabel(xlabel + (f"\n{caption}" if caption else ""))
    ylim = accuracy_limits([p.top1 for p in points])
    ax.set_ylim(*ylim)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8, title="marker area ~ GMACs", title_fontsize=8)
    drawn = {"points": [{"label": p.label, "family": p.family, "top1": p.top1, "throughput": p.throughput,
                         "unfused_throughput": p.unfused_throughput, "area": marker_area(p.gmacs, biggest)}
                        for p in points],
             "fronts": {fam: [points[i].label for i in front] for fam, front in fronts.items()},
             "xticks": ticks, "ylim": ylim, "caption": caption}
    return fig, drawn


def accuracy_limits(top1: Sequence[float], min_span: float = 1.0, margin: float = 0.12) -> tuple[float, float]:
    """The y range: every point with ``margin`` of the span around it (room for labels), and a span of at least
    ``min_span`` points of accuracy, so that models a few hundredths apart do not look far apart."""
    lo, hi = min(top1), max(top1)
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    return mid - span / 2 - margin * span, mid + span / 2 + margin * span


def bench_caption(paths: Sequence[str]) -> str:
    """The device and settings of benchmark CSVs, from their side files (``OUT.csv.json`` of
    ``pipelines.benchmark models``): e.g. ``NVIDIA H200, torch 2.11: batch 256, 64px, bf16, channels_last``."""
    parts = []
    for path in paths:
        side = tables.read_side(path)
        if side is None:
            parts.append(f"{path}: device and settings not recorded (no {path}.json)")
            continue
        st = side.get("settings", {})
        flags = [st.get("amp") or "fp32"] + [w for k, w in (("channels_last", "channels_last"),
                                                            ("compile", "compiled")) if st.get(k)]
        if st.get("threads"):
            flags.append(f"{st['threads']} threads")
        parts.append(f"{side.get('machine') or 'device not recorded'}: batch {st.get('batch_size', '?')}, "
                     f"{st.get('img_size', '?')}px, {', '.join(flags)}")
    return " | ".join(dict.fromkeys(parts))


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
    from pipelines.evaluate import load_model
    from train.export import read_side_file

    side = read_side_file(args.checkpoint)
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
    p.add_argument("--reference-results", nargs="+", default=[],
                   help="a reference family in grey: published results CSVs (e.g. timm's results-imagenet.csv)")
    p.add_argument("--reference-bench", nargs="+", default=[], help="benchmark CSVs for --reference-results")
    _common(p, "1000x700")
    args = p.parse_args(argv)
    if bool(args.reference_results) != bool(args.reference_bench):
        raise SystemExit("error: --reference-results and --reference-bench go together")
    try:
        bench = tables.read_rows(args.bench)
        points, notes = join(tables.read_rows(args.results), bench)
        if args.reference_results:
            extra, ref_notes = join(tables.read_rows(args.reference_results), tables.read_rows(args.reference_bench),
                                    reference=True)
            points += extra
            notes += [f"reference: {n}" for n in ref_notes]
    except (OSError, KeyError) as exc:
        raise SystemExit(f"error: cannot read the CSVs: {exc!r}") from None
    for note in notes:
        print(f"note: {note}")
    try:
        fig, drawn = accuracy_throughput_figure(points, title=args.title or "Top-1 vs inference throughput",
                                                caption=bench_caption(args.bench + args.reference_bench),
                                                size_px=args.size, dpi=args.dpi)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    fronts = "; ".join(f"{fam}: {', '.join(labels)}" for fam, labels in drawn["fronts"].items())
    _save(fig, args.out, f"{len(points)} points, Pareto fronts: {fronts}")
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
