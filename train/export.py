"""``python -m train.export RUN_DIR OUT [--data DIR --split validation] [--ema] [--tag TAG]``

Consolidates a run's DeepSpeed checkpoint (any ZeRO stage) to fp32, loads the unfused model, folds it with
``timm.utils.reparameterize_model``, checks fused == unfused on real validation images (fails when the max
relative difference exceeds 1e-4) and writes ``OUT`` (safetensors) + ``OUT``'s ``.json`` (model name, kwargs,
num_classes, in_chans and the exact ``timm.create_model`` call that loads it).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Optional

import timm
import torch
from safetensors.torch import save_file
from timm.utils import reparameterize_model

import models  # noqa: F401  (registers mrconvnext_* in timm)
from pipelines.data.files import atomic_write, atomic_write_text
from train import checkpoint as ckpt
from train import loaders
from train.config import TrainConfig, from_dict

MAX_REL_DIFF = 1e-4


def consolidated_state_dict(ckpt_dir: str, tag: str, ema: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers of checkpoint ``tag``: ZeRO partitions merged, or the EMA copy. Every file is
    read with ``weights_only=True`` first (train/checkpoint.py), so DeepSpeed's own reader (``weights_only=False``)
    only ever sees files that hold no code."""
    bad = ckpt.check_files(ckpt.tag_files(ckpt_dir, tag))
    if bad:
        raise ckpt.CheckpointError(f"checkpoint file {bad[0][0]} cannot be read ({bad[0][1]}); export another "
                                   f"tag with --tag (complete tags: {', '.join(ckpt.complete_tags(ckpt_dir))})")
    if not ema:
        return ckpt.model_weights(ckpt_dir, tag)
    state = ckpt.ema_weights(ckpt_dir, tag)
    if state is None:
        raise SystemExit(f"{tag} holds no EMA weights (ema.enabled was false)")
    return ckpt.to_fp32(state)


def check_images(cfg: TrainConfig, data_dir: Optional[str], split: str, n: int) -> tuple[torch.Tensor, str]:
    d = cfg.data
    if data_dir is None:
        torch.manual_seed(0)
        return torch.randn(n, cfg.model.in_chans, d.img_size, d.img_size), "random inputs (no --data)"
    loader = loaders.eval_loader(d, in_chans=cfg.model.in_chans, data_dir=data_dir, split=split, batch_size=n,
                                 num_workers=0, decode="cpu")
    images = next(iter(loader))[0]
    return images, f"{images.shape[0]} images of {data_dir} split {split!r}"


def max_rel_diff(fused: torch.Tensor, reference: torch.Tensor) -> float:
    return float((fused - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def load_call(name: str, out: str, num_classes: int, in_chans: int, img_size: int, kwargs: dict,
              inference_mode: bool) -> str:
    # The overlay carries num_classes and input_size too: without them timm drops a classifier whose size
    # differs from the default cfg's 1000 and "adapts" a stem whose in_chans differs from 3.
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    mode = " inference_mode=True," if inference_mode else ""
    return (f"timm.create_model({name!r}, pretrained=True,{mode} num_classes={num_classes}, "
            f"in_chans={in_chans}{extra}, pretrained_cfg_overlay=dict(file={out!r}, num_classes={num_classes}, "
            f"input_size=({in_chans}, {img_size}, {img_size})))")


def side_file(weights: str) -> str:
    """The JSON that export writes beside an exported weights file: what they are and how to load them."""
    return os.path.splitext(weights)[0] + ".json"


def read_side_file(weights: str) -> dict:
    """The side file of ``weights``, ``{}`` when there is none (weights that export did not write)."""
    path = side_file(weights)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        info = json.load(f)
    return info if isinstance(info, dict) and "model" in info else {}


def save_atomic(state: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write safetensors under a temporary name, then rename: a crash never leaves a half-written file at ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, tmp, metadata=metadata)


def export(run_dir: str, out: str, data_dir: Optional[str] = None, split: str = "validation", ema: bool = False,
           tag: Optional[str] = None, num_images: int = 32, unfused_out: Optional[str] = None) -> dict:
    ckpt_dir = ckpt.checkpoint_dir(run_dir)
    tag = tag or ckpt.latest_tag(ckpt_dir)
    if tag is None:
        raise SystemExit(f"no checkpoint in {ckpt_dir}")
    meta = ckpt.read_meta(ckpt_dir, tag)
    cfg = from_dict(meta["config"])
    m = cfg.model
    state = consolidated_state_dict(ckpt_dir, tag, ema)
    model = timm.create_model(m.name, num_classes=m.num_classes, in_chans=m.in_chans, **m.kwargs)
    model.load_state_dict(state, strict=True)
    model.eval()
    fused = reparameterize_model(model)
    images, source = check_images(cfg, data_dir, split, num_images)
    with torch.no_grad():
        reference, folded = model(images), fused(images)
    rel = max_rel_diff(folded, reference)
    if not rel <= MAX_REL_DIFF:
        raise SystemExit(f"fused model differs from the unfused one: max rel diff {rel:.3e} > {MAX_REL_DIFF:g} on "
                         f"{source}; not writing {out}")
    metadata = {"model": m.name, "checkpoint": f"{ckpt_dir}/{tag}"}
    save_atomic(fused.state_dict(), out, metadata | {"form": "fused"})
    if unfused_out:  # the training form: for fine-tuning and the alpha / kernel diagnostics (pipelines.plot)
        save_atomic(model.state_dict(), unfused_out, metadata | {"form": "unfused"})
    # Models with a fused form (MRConvNeXt, RepVGG, ...) take inference_mode=True to build it.
    has_fused_form = "inference_mode" in inspect.signature(type(model).__init__).parameters
    call = load_call(m.name, out, m.num_classes, m.in_chans, cfg.data.img_size, m.kwargs, has_fused_form)
    info = {"model": m.name, "kwargs": m.kwargs, "num_classes": m.num_classes, "in_chans": m.in_chans,
            "img_size": cfg.data.img_size, "mean": cfg.data.mean, "std": cfg.data.std,
            "interpolation": cfg.data.interpolation, "crop_pct": cfg.data.crop_pct, "inference_mode": has_fused_form,
            "checkpoint": os.path.join(ckpt_dir, tag), "ema": ema, "step": meta["step"],
            "fold_check": {"max_rel_diff": rel, "inputs": source}, "load": call}
    atomic_write_text(side_file(out), json.dumps(info, indent=1))
    params = sum(v.numel() for v in model.parameters())
    fused_params = sum(v.numel() for v in fused.parameters())
    print(f"exported {m.name} ({'EMA' if ema else 'model'} weights) from {ckpt_dir}/{tag} (step {meta['step']})\n"
          f"  parameters: {params:,} training form -> {fused_params:,} fused\n"
          f"  fold check: max rel diff {rel:.2e} (limit {MAX_REL_DIFF:g}) on {source}\n"
          f"  wrote {out} and {side_file(out)}"
          f"{f' and the training form to {unfused_out}' if unfused_out else ''}\n"
          f"  load with: {call}")
    return info


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--data", default=None, help="shard folder whose images check the fold (default: random)")
    p.add_argument("--split", default="validation")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--unfused-out", default=None, help="also write the training-form weights (.safetensors) here")
    args = p.parse_args(argv)
    try:
        export(args.run_dir, args.out, args.data, args.split, args.ema, args.tag, args.num_images, args.unfused_out)
    except ckpt.CheckpointError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
