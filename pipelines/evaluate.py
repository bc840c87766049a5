"""Top-1/top-5 of a checkpoint on a shard split, written as a row of timm's ``results-imagenet.csv``.

    python -m pipelines.evaluate --model NAME --checkpoint FILE --data SHARDS_DIR [--split validation]
        [--reparam] [--inference-mode] [--img-size N --crop-pct F --batch-size B --workers W]
        [--model-kwargs JSON --num-classes N --in-chans C] [--results CSV]
    torchrun --nproc-per-node 2 -m pipelines.evaluate ...   (each rank scores its shards; counts are all_reduced)

Checkpoints: safetensors, or a torch state dict (``.pth``/``.pt``, possibly under 'state_dict'/'model'/'module',
keys possibly prefixed ``module.``), in the training form or the fused form (``--inference-mode`` builds the fused
model to load a fused checkpoint; ``--reparam`` folds a training-form model before evaluating). When the
checkpoint has the side file that ``python -m train.export`` writes (``OUT.json``), its model kwargs, classes,
channels and preprocessing are the defaults; otherwise ``num_classes`` comes from the data's ``_info.json`` and the
preprocessing from the model's pretrained config. Command-line options win over both, except the model: a
``--model`` other than the one the side file names is refused. A user's mistake (a missing file, a checkpoint of
another model or form, a file that is not a plain state dict) ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from deepspeed.accelerator import get_accelerator

from pipelines import tables
from train.engine import AMP_DTYPES
from train.evaluate import evaluate

STATE_DICT_KEYS = ("state_dict", "model", "module")


class UsageError(Exception):
    """A mistake of the command's user: ``main`` prints it as one line and exits with 2."""


# ----------------------------------------------------------------------------------------------------------
# checkpoints and models


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch checkpoint (unwrapped from 'state_dict'/'model'/'module',
    ``module.`` prefixes of DDP/DeepSpeed wrappers removed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a global outside the tensor types: refused, never run
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise ValueError(f"refusing to load {path}: it asks to call "
                         f"{refused.group(1) if refused else 'something else than tensors'}, which is not part "
                         f"of a checkpoint; refused (a crafted file? export plain weights with python -m train.export)"
                         ) from None
    except (OSError, RuntimeError) as exc:  # torch and safetensors say 'not a checkpoint' this way
        raise ValueError(f"{path} is not a readable checkpoint ({str(exc).splitlines()[0]})") from None
    for key in STATE_DICT_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (expected tensors, possibly under one of "
                         f"{', '.join(STATE_DICT_KEYS)})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _head_shape(state: Mapping[str, torch.Tensor], key: str | None, dim: int) -> int | None:
    weight = state.get(f"{key}.weight") if key else None
    return int(weight.shape[dim]) if weight is not None and weight.ndim > dim else None


def pretrained_cfg(name: str) -> dict:
    import timm

    import models  # noqa: F401  (registers mrconvnext_*)

    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def checkpoint_shape(name: str, state: Mapping[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """(classes, input channels) that a checkpoint's classifier and first conv hold (None where unknown)."""
    cfg = pretrained_cfg(name)
    return _head_shape(state, cfg.get("classifier"), 0), _head_shape(state, cfg.get("first_conv"), 1)


def load_model(name: str, checkpoint: str | Mapping[str, torch.Tensor], *,
               model_kwargs: Mapping[str, Any] | None = None, num_classes: int | None = None,
               in_chans: int | None = None, inference_mode: bool = False) -> torch.nn.Module:
    """A timm model with a checkpoint's weights (a path or a state dict) loaded strictly, in eval mode.

    ``num_classes`` and ``in_chans`` default to what the checkpoint's classifier and first conv hold, so a
    diagnostic needs only the model name (and the kwargs that shape it, e.g. MRConvNeXt's ``img_size``)."""
    import timm

    state = read_state_dict(checkpoint) if isinstance(checkpoint, str) else checkpoint
    kwargs = dict(model_kwargs or {})
    if inference_mode:
        kwargs["inference_mode"] = True
    ckpt_classes, ckpt_chans = checkpoint_shape(name, state)
    num_classes, in_chans = num_classes or ckpt_classes, in_chans or ckpt_chans
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if value is not None:
            kwargs.setdefault(key, value)
    model = timm.create_model(name, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # torch lists every key on many lines; MRConvNeXt models raise one-line ValueErrors
        from models.mrconvnext import state_dict_mismatch

        details = state_dict_mismatch(model.state_dict(), state) or str(exc).splitlines()[0]
        raise ValueError(f"checkpoint is for a different model than {name!r}: {details}") from None
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# the results row


def results_row(model: str, img_size: int, correct1: float, correct5: float, count: int, param_count: int,
                crop_pct: float, interpolation: str) -> dict[str, Any]:
    """A row of timm's results CSV: accuracies and errors in percent, params in millions."""
    if count <= 0:
        raise ValueError("no sample was evaluated")
    top1, top5 = 100.0 * correct1 / count, 100.0 * correct5 / count
    return {"model": model, "img_size": img_size, "top1": f"{top1:.3f}", "top1_err": f"{100 - top1:.3f}",
            "top5": f"{top5:.3f}", "top5_err": f"{100 - top5:.3f}", "param_count": f"{param_count / 1e6:.2f}",
            "crop_pct": f"{crop_pct:.3f}", "interpolation": interpolation}


# ----------------------------------------------------------------------------------------------------------
# command line


@dataclass
class EvalSettings:
    """The preprocessing and model shape of one evaluation, after defaults are resolved."""
    model_kwargs: dict
    num_classes: int
    in_chans: int
    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    inference_mode: bool


def _first(*values):
    return next((v for v in values if v is not None), None)


def resolve_settings(args: argparse.Namespace, data_info: Mapping[str, Any],
                     state: Mapping[str, torch.Tensor]) -> EvalSettings:
    """Command line > the export side file > the data's classes / the checkpoint's first conv / the model's
    pretrained config."""
    from train.export import read_side_file, side_file

    side = read_side_file(args.checkpoint)
    if side and side["model"].split(".")[0] != args.model.split(".")[0]:
        raise UsageError(f"{args.checkpoint} holds {side['model']} weights (its export side file "
                         f"{side_file(args.checkpoint)} says so), not {args.model}: evaluate it with "
                         f"--model {side['model']}")
    kwargs = dict(side.get("kwargs") or {})
    kwargs.update(json.loads(args.model_kwargs) if args.model_kwargs else {})
    kwargs.pop("num_classes", None)
    classes = data_info.get("classes")
    num_classes = _first(args.num_classes, side.get("num_classes"), len(classes) if classes else None)
    if not num_classes:
        raise UsageError(f"{args.data}/_info.json lists no classes: give --num-classes")
    in_chans = _first(args.in_chans, side.get("in_chans"), kwargs.pop("in_chans", None),
                      checkpoint_shape(args.model, state)[1], 3)
    cfg = pretrained_cfg(args.model)
    img_size = _first(args.img_size, side.get("img_size"), kwargs.get("img_size"),
                      cfg.get("input_size", (3, 224, 224))[-1])
    if isinstance(img_size, (list, tuple)):
        img_size = img_size[-1]
    mean, std = (_first(getattr(args, key), side.get(key), cfg.get(key)) for key in ("mean", "std"))
    if mean is not None and len(mean) != in_chans:
        mean = std = None  # the model's RGB statistics do not fit a grey model: the loader's grey defaults do
    return EvalSettings(model_kwargs=kwargs, num_classes=int(num_classes), in_chans=int(in_chans),
                        img_size=int(img_size),
                        crop_pct=float(_first(args.crop_pct, side.get("crop_pct"), cfg.get("crop_pct"), 0.875)),
                        interpolation=str(_first(args.interpolation, side.get("interpolation"),
                                                 cfg.get("interpolation"), "bicubic")),
                        mean=tuple(mean) if mean is not None else None,
                        std=tuple(std) if std is not None else None,
                        inference_mode=bool(args.inference_mode or side.get("inference_mode", False)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name")
    p.add_argument("--checkpoint", required=True, help=".safetensors, .pth or .pt")
    p.add_argument("--data", required=True, help="shard folder written by python -m pipelines.data.shards")
    p.add_argument("--split", default="validation")
    p.add_argument("--reparam", action="store_true", help="fold a training-form model before evaluating")
    p.add_argument("--inference-mode", action="store_true", help="build the fused form (fused checkpoint)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", default=None)
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model-kwargs", default=None, help='JSON, e.g. \'{"img_size": 32}\'')
    p.add_argument("--num-classes", type=int, default=None, help="default: the data's classes")
    p.add_argument("--in-chans", type=int, default=None,
                   help="default: the export side file's, else the checkpoint's first conv")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None)
    p.add_argument("--device", default=None,
                   help="default: the accelerator's device LOCAL_RANK (cuda:N, ...) if there is one, else cpu")
    p.add_argument("--name", default=None, help="model name in the results row (default: --model)")
    p.add_argument("--results", default=None, help="append the row to this CSV (timm's results format)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from pipelines.data.loader import DataError, create_eval_loader, read_info
    from train.config import ConfigError, check_model_name
    from train.distributed import world_info_from_env

    for path, what in ((args.checkpoint, "checkpoint"), (args.data, "data folder")):
        if not os.path.exists(path):
            raise UsageError(f"{what} {path} not found")
    try:
        check_model_name(args.model)
        info = read_info(args.data)
        state = read_state_dict(args.checkpoint)
        settings = resolve_settings(args, info, state)
    except (ConfigError, DataError, ValueError) as exc:
        raise UsageError(str(exc).removeprefix("model.name: ")) from None
    if args.split not in info.get("splits", {}):
        raise UsageError(f"split {args.split!r} not in {args.data} (has {sorted(info.get('splits', {}))})")

    world = world_info_from_env()
    if world.world_size > 1:
        from train.distributed import init_distributed

        init_distributed()
    accelerator = get_accelerator()
    if args.device:
        device = torch.device(args.device)
    elif accelerator.device_name() != "cpu":
        device = torch.device(accelerator.device_name(world.local_rank % accelerator.device_count()))
    else:
        device = torch.device("cpu")
    try:
        model = load_model(args.model, state, model_kwargs=settings.model_kwargs,
                           num_classes=settings.num_classes, in_chans=settings.in_chans,
                           inference_mode=settings.inference_mode)
    except (TypeError, ValueError) as exc:
        hint = (" (the model lays its weights out for img_size: pass --model-kwargs '{\"img_size\": N}')"
                if "img_size" in str(exc) and "img_size" not in settings.model_kwargs else "")
        raise UsageError(f"cannot load {args.checkpoint} into {args.model}: {exc}{hint}") from None
    if args.reparam:
        from timm.utils import reparameterize_model

        model = reparameterize_model(model)
    model = model.to(device).eval()
    param_count = sum(p.numel() for p in model.parameters())

    try:
        loader = create_eval_loader(args.data, args.split, batch_size=args.batch_size, img_size=settings.img_size,
                                    crop_pct=settings.crop_pct, rank=world.rank, world_size=world.world_size,
                                    num_workers=args.workers, in_chans=settings.in_chans,
                                    interpolation=settings.interpolation, mean=settings.mean, std=settings.std)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    metrics = evaluate(model, loader, AMP_DTYPES[args.amp] if args.amp else None, device=device,
                       progress=world.is_main, total=len(loader))
    n = metrics["count"]
    c1, c5 = round(metrics["top1"] * n), round(metrics["top5"] * n)  # exact: the fractions of integer counts
    if not world.is_main:
        return 0
    expected = int(info["splits"][args.split]["num_samples"])
    row = results_row(args.name or args.model, settings.img_size, c1, c5, int(n), param_count, settings.crop_pct,
                      settings.interpolation)
    if args.results:
        tables.append_rows(args.results, tables.RESULTS_COLUMNS, [row])
    form = "fused" if args.reparam or settings.inference_mode else "as loaded"
    missing = "" if int(n) == expected else f" (split lists {expected}; {expected - int(n)} skipped as corrupt)"
    print(f"summary: {row['model']} ({form}, {row['param_count']}M params) on {args.data} {args.split}: "
          f"top1 {row['top1']} top5 {row['top5']} over {int(n)} samples{missing} at {settings.img_size}px "
          f"crop {settings.crop_pct:g} {settings.interpolation}, {world.world_size} rank(s)"
          + (f"; appended to {args.results}" if args.results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
