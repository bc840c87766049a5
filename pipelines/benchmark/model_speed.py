"""``python -m pipelines.benchmark models``: inference (and training) throughput of timm models, measured the way
timm's ``benchmark.py`` does, with every listed model interleaved in one run.

    python -m pipelines.benchmark models --models convnext_tiny mrconvnext_tiny@fused mrconvnext_tiny@unfused \
        [--reparam] [--amp bf16] [--channels-last] [--compile] [--batch-size 16] [--img-size 224] [--train] \
        [--device cuda] [--threads N] [--model-kwargs [NAME:]KEY=VALUE ...] [--csv OUT.csv]

Inference: random input, ``eval()``, ``torch.inference_mode()``, warm-up, synchronized timed steps, samples/s.
Training: forward + backward + SGD step on random input and targets, always in the training form. ``--reparam``
benchmarks reparameterizable models fused (timm's convention); ``NAME@fused`` / ``NAME@unfused`` pick the form
of one entry, so both forms of a model can run side by side. ``--model-kwargs NAME:KEY=VALUE`` (value parsed
as YAML) goes to model NAME only; a plain ``KEY=VALUE`` goes to every MRConv model of this repository (never to
a timm peer such as ConvNeXt, which would refuse MRConv's arguments). The CSV has timm's benchmark columns plus
the peak memory of an inference and a training step (the allocator's on a GPU, the tensors' on the CPU:
``timing.LiveBytes``) and the operations a training step runs (``timing.count_ops``: about one kernel launch each
on a GPU, the host-side cost of a step whatever its batch); the side file ``OUT.csv.json`` holds the FFT counting
convention of ``infer_gmacs``, the machine, the device, each model's kwargs and the
settings.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from deepspeed.accelerator import get_accelerator

from pipelines import tables
from train.engine import AMP_DTYPES

from .timing import count_ops, device_name, interleaved, machine_description, peak_memory_gib, tensor_bytes

# timm benchmark.py's CSV columns, in its order (infer_macts: fvcore activations in millions), then peak memory.
INFER_COLUMNS = ("model", "infer_img_size", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
                 "param_count", "infer_gmacs", "infer_macts", "infer_peak_mem_gib")
TRAIN_COLUMNS = ("train_samples_per_sec", "train_step_time", "train_peak_mem_gib", "train_ops")
FORMS = ("fused", "unfused")


@dataclass(frozen=True)
class ModelSpec:
    """One entry of ``--models``: ``NAME`` or ``NAME@fused`` / ``NAME@unfused``."""
    label: str  # as given, the CSV's model column
    name: str  # timm model name
    fused: bool | None  # None: follow --reparam


def parse_spec(text: str) -> ModelSpec:
    name, _, form = text.partition("@")
    if form and form not in FORMS:
        raise ValueError(f"{text!r}: the form after '@' must be one of {', '.join(FORMS)}")
    return ModelSpec(label=text, name=name, fused=None if not form else form == "fused")


def parse_model_kwargs(items: list[str], names: list[str]) -> dict[str | None, dict]:
    """``[NAME:]KEY=VALUE`` items -> {NAME: kwargs, None: kwargs for every MRConv model}; values parsed as YAML."""
    import yaml

    out: dict[str | None, dict] = {}
    for item in items:
        target, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"--model-kwargs {item!r}: expected [NAME:]KEY=VALUE")
        name, colon, key = target.rpartition(":")
        if colon and name not in names:
            raise ValueError(f"--model-kwargs {item!r}: {name!r} is not among --models ({', '.join(names)})")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--model-kwargs {item!r}: the value is not valid YAML") from exc
        out.setdefault(name if colon else None, {})[key.strip()] = value
    return out


def is_mrconv(name: str) -> bool:
    """A model of this repository's families (the ``models`` package), which take MRConv's arguments."""
    import timm

    import models  # noqa: F401  (registers mrconvnext_*)

    return timm.models.model_entrypoint(name).__module__.startswith("models.")


def kwargs_for(name: str, model_kwargs: dict[str | None, dict]) -> dict:
    return {**(model_kwargs.get(None, {}) if is_mrconv(name) else {}), **model_kwargs.get(name, {})}


def is_reparameterizable(model: torch.nn.Module) -> bool:
    """Whether ``timm.utils.reparameterize_model`` changes anything (a module with a fuse/reparameterize hook)."""
    hooks = ("fuse", "reparameterize", "switch_to_deploy")
    return any(m is not model and any(callable(getattr(m, h, None)) for h in hooks) for m in model.modules())


def create(name: str, img_size: int, in_chans: int, num_classes: int | None, kwargs: dict) -> torch.nn.Module:
    import timm

    import models  # noqa: F401  (registers mrconvnext_*)

    kwargs = dict(kwargs, in_chans=in_chans)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:  # models that lay weights out for the input size (MRConvNeXt, ViTs) take img_size; others refuse it
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(name, **kwargs)


def count_macs(model: torch.nn.Module, input_size: tuple[int, int, int]) -> tuple[float, float | None]:
    """(GMACs with FFTs counted, activations in millions) of one sample, by fvcore, on a CPU copy."""
    from fvcore.nn import ActivationCountAnalysis

    from pipelines.flops import count_flops

    model = copy.deepcopy(model).float().cpu().eval()
    macs = count_flops(model, input_size, batch_size=1).gmacs
    try:
        analysis = ActivationCountAnalysis(model, torch.randn(1, *input_size))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        acts = analysis.total() / 1e6
    except Exception:  # activations are an extra column: leave it blank rather than lose the figures
        acts = None
    return macs, acts


@dataclass
class Entry:
    spec: ModelSpec
    fused: bool
    reparameterizable: bool
    model: torch.nn.Module
    params: int
    gmacs: float | None = None
    macts: float | None = None
    infer_s: float | None = None
    train_s: float | None = None
    infer_mem: float | None = None  # GiB (timing.peak_memory_gib)
    train_mem: float | None = None
    train_ops: int | None = None  # operations a training step runs (timing.count_ops)

    @property
    def form(self) -> str:
        return "fused" if self.fused else "unfused" if self.reparameterizable else "-"


def build_entries(specs: list[ModelSpec], args: argparse.Namespace, device: torch.device) -> list[Entry]:
    from timm.utils import reparameterize_model

    entries, bases = [], {}
    for spec in specs:
        if spec.name not in bases:
            torch.manual_seed(0)
            bases[spec.name] = create(spec.name, args.img_size, args.in_chans, args.num_classes,
                                      kwargs_for(spec.name, args.kwargs)).eval()
        base = bases[spec.name]
        want_fused = args.reparam if spec.fused is None else spec.fused
        if want_fused and not is_reparameterizable(base):
            if spec.fused:
                raise ValueError(f"{spec.label}: {spec.name} has no fused form (nothing to reparameterize)")
            want_fused = False
        model = reparameterize_model(base) if want_fused else copy.deepcopy(base)
        entries.append(Entry(spec, want_fused, is_reparameterizable(base), model.to(device),
                             sum(p.numel() for p in model.parameters())))
    return entries


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Channels-last for the 4D weights only: ``model.to(memory_format=...)`` also converts 5D tensors and fails
    on them (the unfused MRConv's ``fourier_modes`` is 5D)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.ndim == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


def _prepare(model: torch.nn.Module, args: argparse.Namespace) -> Callable:
    if args.channels_last:
        model = to_channels_last(model)
    return torch.compile(model) if args.compile else model


def inference_fns(entries: list[Entry], args: argparse.Namespace, device: torch.device
                  ) -> dict[str, Callable[[], object]]:
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=AMP_DTYPES[args.amp])) if args.amp else \
        contextlib.nullcontext
    fns = {}
    for e in entries:
        run = _prepare(e.model.eval(), args)

        def step(run=run):
            with torch.inference_mode(), autocast():
                return run(x)

        fns[e.spec.label] = step
    return fns


def train_fns(entries: list[Entry], args: argparse.Namespace, device: torch.device
              ) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], int]]]:
    """One training step per call, in the training form (a fused entry trains its unfused model), one per
    timm model name: both forms of a model share it. Also, per name, the bytes its model's own tensors hold
    (weights, buffers, gradients, optimizer state)."""
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fns, resident = {}, {}
    for e in entries:
        if e.spec.name in fns:
            continue
        torch.manual_seed(0)
        model = create(e.spec.name, args.img_size, args.in_chans, args.num_classes,
                       kwargs_for(e.spec.name, args.kwargs)).to(device).train()
        target = torch.randint(0, model.num_classes, (args.batch_size,), device=device)
        run = _prepare(model, args)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        amp = torch.autocast(device_type=device.type, dtype=AMP_DTYPES[args.amp]) if args.amp else None

        def step(run=run, opt=opt, target=target, amp=amp):
            with amp if amp is not None else contextlib.nullcontext():
                loss = torch.nn.functional.cross_entropy(run(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[e.spec.name] = step
        resident[e.spec.name] = lambda model=model, opt=opt: tensor_bytes(
            [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()),
             *(t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))])
    return fns, resident


def _gib(value: float | None) -> float | str:
    return "" if value is None else round(value, 3)


def csv_rows(entries: list[Entry], args: argparse.Namespace) -> list[dict]:
    rows = []
    for e in entries:
        row = {"model": e.spec.label, "infer_img_size": args.img_size,
               "infer_samples_per_sec": round(args.batch_size / e.infer_s, 2),
               "infer_step_time": round(1000 * e.infer_s, 3), "infer_batch_size": args.batch_size,
               "param_count": round(e.params / 1e6, 2),
               "infer_gmacs": "" if e.gmacs is None else round(e.gmacs, 2),
               "infer_macts": "" if e.macts is None else round(e.macts, 2), "infer_peak_mem_gib": _gib(e.infer_mem)}
        if args.train:
            row.update(train_samples_per_sec=round(args.batch_size / e.train_s, 2),
                       train_step_time=round(1000 * e.train_s, 3), train_peak_mem_gib=_gib(e.train_mem),
                       train_ops="" if e.train_ops is None else e.train_ops)
        rows.append(row)
    return rows


def table(entries: list[Entry], args: argparse.Namespace) -> str:
    first = entries[0]
    cols = f"{'model':<28} {'form':<7} {'params(M)':>9} {'GMACs':>7} {'infer/s':>9} {'ms/step':>9} {'vs first':>8}"
    if args.train:
        cols += f" {'train/s':>9} {'ms/step':>9} {'vs first':>8} {'peak GiB':>8} {'vs first':>8} {'ops':>7}"
    lines = [cols, "-" * len(cols)]
    for e in entries:
        gmacs = "-" if e.gmacs is None else f"{e.gmacs:.3f}"
        line = (f"{e.spec.label:<28} {e.form:<7} {e.params / 1e6:>9.2f} {gmacs:>7} "
                f"{args.batch_size / e.infer_s:>9.1f} {1000 * e.infer_s:>9.1f} {first.infer_s / e.infer_s:>7.2f}x")
        if args.train:
            line += (f" {args.batch_size / e.train_s:>9.1f} {1000 * e.train_s:>9.1f} "
                     f"{first.train_s / e.train_s:>7.2f}x")
            if e.train_mem is not None and first.train_mem:
                line += f" {e.train_mem:>8.3f} {e.train_mem / first.train_mem:>7.2f}x"
            else:
                line += f" {'-':>8} {'-':>8}"
            line += f" {'-' if e.train_ops is None else f'{e.train_ops:,}':>7}"
        lines.append(line)
    return "\n".join(lines)


def summary(entries: list[Entry]) -> str:
    fastest = min(entries, key=lambda e: e.infer_s)
    parts = [f"fastest inference: {fastest.spec.label}"]
    by_name: dict[str, dict[bool, Entry]] = {}
    for e in entries:
        by_name.setdefault(e.spec.name, {})[e.fused] = e
    for name, forms in by_name.items():
        if True in forms and False in forms:
            parts.append(f"{name} fused vs unfused: {forms[False].infer_s / forms[True].infer_s:.2f}x")
    first = entries[0]
    for e in entries[1:]:
        parts.append(f"{e.spec.label} vs {first.spec.label}: {first.infer_s / e.infer_s:.2f}x")
    return "summary: " + "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.benchmark models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="timm names, optionally NAME@fused / NAME@unfused")
    p.add_argument("--reparam", action="store_true", help="benchmark reparameterizable models fused")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None, help="autocast dtype (default: fp32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=None, help="default: each model's own")
    p.add_argument("--model-kwargs", nargs="+", default=[], metavar="[NAME:]KEY=VALUE",
                   help="NAME:KEY=VALUE: to model NAME; KEY=VALUE: to every MRConv model (not to timm peers); "
                        "values parsed as YAML, e.g. img_size=64 mrconvnext_tiny:conv_impl=fft")
    p.add_argument("--train", action="store_true", help="also time a training step (forward, backward, SGD)")
    p.add_argument("--device", default=get_accelerator().device_name())
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up calls per model")
    p.add_argument("--iters", type=int, default=10, help="timed calls per model and round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (median reported)")
    p.add_argument("--no-flops", action="store_true", help="skip fvcore counting (blank GMACs/activations)")
    p.add_argument("--csv", default=None, help="write timm's benchmark CSV here (+ OUT.json side file)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        specs = [parse_spec(m) for m in args.models]
        args.kwargs = parse_model_kwargs(args.model_kwargs, [s.name for s in specs])
    except ValueError as exc:
        return fail(str(exc))
    if len({s.label for s in specs}) != len(specs):
        return fail("a model is listed twice")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        entries = build_entries(specs, args, device)
    except (TypeError, ValueError, RuntimeError) as exc:
        return fail(str(exc).splitlines()[0])
    input_size = (args.in_chans, args.img_size, args.img_size)
    if not args.no_flops:
        for e in entries:
            e.gmacs, e.macts = count_macs(e.model, input_size)

    timing = dict(device=device, warmup=args.warmup, iters=args.iters, rounds=args.rounds)
    fns = inference_fns(entries, args, device)
    for label, seconds in interleaved(fns, **timing).items():
        e = next(e for e in entries if e.spec.label == label)
        e.infer_s = seconds
        e.infer_mem = peak_memory_gib(fns[label], device, tensor_bytes([*e.model.parameters(), *e.model.buffers()]))
    if args.train:
        steps, resident = train_fns(entries, args, device)
        per_name = interleaved(steps, **timing)
        peak = {name: peak_memory_gib(step, device, resident[name]()) for name, step in steps.items()}
        # a compiled step's kernels are not ATen operations (and a dispatch mode would retrace it)
        ops = {name: None if args.compile else count_ops(step) for name, step in steps.items()}
        for e in entries:
            e.train_s, e.train_mem, e.train_ops = per_name[e.spec.name], peak[e.spec.name], ops[e.spec.name]

    from pipelines.flops import FFT_CONVENTION

    machine = machine_description(device)
    settings = {k: v for k, v in vars(args).items() if k not in ("csv", "kwargs")}
    print(f"{'inference' + (' and training' if args.train else '')} throughput, batch {args.batch_size}, "
          f"{args.img_size}px, {args.amp or 'fp32'}{', channels_last' if args.channels_last else ''}"
          f"{', compiled' if args.compile else ''}, on {machine}; {args.rounds} interleaved rounds of "
          f"{args.iters} steps (median). GMACs per sample: {FFT_CONVENTION}.")
    print(table(entries, args))
    if args.csv:
        columns = INFER_COLUMNS + (TRAIN_COLUMNS if args.train else ())
        meta = {"fft_convention": FFT_CONVENTION, "machine": machine, "device": device_name(device),
                "settings": settings, "forms": {e.spec.label: e.form for e in entries},
                "kwargs": {e.spec.label: kwargs_for(e.spec.name, args.kwargs) for e in entries},
                "columns": {"param_count": "millions", "infer_gmacs": "GMACs per sample (fvcore, FFTs counted)",
                            "infer_macts": "fvcore activations per sample, millions",
                            "infer_step_time": "ms per batch", "train_step_time": "ms per batch",
                            "infer_peak_mem_gib": "GiB: the model's weights and buffers plus the peak one "
                                                  "inference step allocates (the allocator's peak on a GPU, "
                                                  "the tensors' on the CPU)",
                            "train_peak_mem_gib": "GiB: weights, buffers, gradients and optimizer state plus the "
                                                  "peak one training step allocates (as above)",
                            "train_ops": "computing operations one training step runs, its SGD step included "
                                         "(views and empty allocations left out; about one kernel launch each "
                                         "on a GPU; blank when compiled)"}}
        tables.write_rows(args.csv, columns, csv_rows(entries, args), side=meta)
        print(f"wrote {args.csv} and {args.csv}{tables.SIDE_SUFFIX}")
    print(summary(entries))
    return 0


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
