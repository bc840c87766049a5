"""Crash-safe DeepSpeed checkpoints in ``RUN_DIR/checkpoints``.

Protocol (every rank calls ``save``): DeepSpeed writes a new tag directory (``step_00000420``) without touching
``latest``; a barrier makes sure every rank has finished writing; rank 0 then writes ``meta.json`` into the tag and
replaces ``latest`` atomically (write a temporary file, ``os.replace``); a second barrier; only then rank 0 prunes
tags beyond the newest ``keep``. A crash at any point leaves ``latest`` naming a complete checkpoint. Resume reads
``latest``; a tag directory without ``meta.json`` is an unfinished save and is ignored.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from train.config import ConfigError, TrainConfig, config_diff, fingerprint, to_dict

LATEST = "latest"
META = "meta.json"
TAG_PREFIX = "step_"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def latest_tag(ckpt_dir: str) -> Optional[str]:
    """The newest complete checkpoint tag, or None."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.isfile(os.path.join(ckpt_dir, tag, META)):
        raise RuntimeError(f"{path} names {tag!r} but {os.path.join(ckpt_dir, tag, META)} is missing: the run "
                           f"directory was changed by hand")
    return tag


def read_meta(ckpt_dir: str, tag: str) -> dict:
    with open(os.path.join(ckpt_dir, tag, META)) as f:
        return json.load(f)


def check_compatible(meta: dict, cfg: TrainConfig, world_size: int, where: str) -> None:
    """Fail when a run directory holds a checkpoint of another model, config or world size (the data position
    and the per-rank RNG states are per rank)."""
    if meta["model_name"] != cfg.model.name:
        raise ConfigError(
            f"the checkpoint in {where} is of model '{meta['model_name']}', this config trains '{cfg.model.name}'; "
            f"use a new --run-dir")
    if meta["fingerprint"] != fingerprint(cfg):
        diff = config_diff(meta["config"], to_dict(cfg))
        raise ConfigError(
            f"the checkpoint in {where} was made with a different config ({'; '.join(diff) or 'fingerprint differs'});"
            f" use a new --run-dir (or restore the old values)")
    if meta["world_size"] != world_size:
        raise ConfigError(
            f"the checkpoint in {where} was written by {meta['world_size']} ranks, this run has {world_size}; "
            f"exact resume needs the same world size: relaunch with {meta['world_size']} ranks or use a new --run-dir")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(engine, run_dir: str, cfg: TrainConfig, *, step: int, epoch: int, batch_in_epoch: int,
         ema_state: Optional[dict], keep: int) -> str:
    """Save on every rank (must be called by all ranks). Returns the tag."""
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag_for(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    # Per-rank RNG states: each rank saves its own into its own file, since client_state is written by rank 0 only.
    client_state = {
        "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "ema": ema_state,
        "fingerprint": fingerprint(cfg), "model_name": cfg.model.name, "config": to_dict(cfg),
    }
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(ckpt_dir, tag, f"rng_rank{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        meta = {"tag": tag, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "world_size": world,
                "model_name": cfg.model.name, "model_kwargs": cfg.model.kwargs, "fingerprint": fingerprint(cfg),
                "config": to_dict(cfg)}
        _atomic_write(os.path.join(ckpt_dir, tag, META), json.dumps(meta, indent=1, default=str))
        _atomic_write(os.path.join(ckpt_dir, LATEST), tag)
    dist.barrier()
    if rank == 0:
        prune(ckpt_dir, keep)
    return tag


def load(engine, run_dir: str, tag: str) -> dict:
    """Load on every rank; restores module, optimizer and returns the client state (+ this rank's RNG states)."""
    ckpt_dir = checkpoint_dir(run_dir)
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
    rng_file = os.path.join(ckpt_dir, tag, f"rng_rank{dist.get_rank():05d}.pt")
    client_state["rng"] = torch.load(rng_file, weights_only=False) if os.path.isfile(rng_file) else None
    return client_state


def prune(ckpt_dir: str, keep: int) -> None:
    """Remove complete tags beyond the newest ``keep`` and unfinished tags older than ``latest``."""
    current = latest_tag(ckpt_dir)
    tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith(TAG_PREFIX) and os.path.isdir(
        os.path.join(ckpt_dir, t)))
    complete = [t for t in tags if os.path.isfile(os.path.join(ckpt_dir, t, META))]
    keep_set = set(complete[-keep:]) | {current}
    for t in tags:
        if t not in keep_set and t <= current:
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ema_state_dict(ema: Any) -> Optional[dict]:
    return None if ema is None else {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
