"""Crash-safe DeepSpeed checkpoints in ``RUN_DIR/checkpoints``.

Protocol (every rank calls ``save``): DeepSpeed writes a new tag directory (``step_00000420``) without touching
``latest``; a barrier makes sure every rank has finished writing; rank 0 then writes ``meta.json`` into the tag and
replaces ``latest`` atomically (write a temporary file, ``os.replace``); a second barrier; only then rank 0 prunes
tags beyond the newest ``keep``. A crash at any point leaves ``latest`` naming a complete checkpoint. Resume reads
``latest``; a tag directory without ``meta.json`` is an unfinished save and is ignored.

Loading never unpickles arbitrary objects: every ``.pt`` file of a tag is first read with
``torch.load(weights_only=True)`` (tensors, containers, numbers, strings and the few DeepSpeed types a checkpoint
holds); a file that needs anything else is refused before DeepSpeed reads it. A file that cannot be read at all
(a truncated copy, a full disk) makes resume fall back to the previous complete tag, with a line naming the file.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from pipelines.data.files import atomic_write_text
from train.config import ConfigError, TrainConfig, config_diff, fingerprint, to_dict

_log = logging.getLogger("train")

LATEST = "latest"
META = "meta.json"
TAG_PREFIX = "step_"
# DeepSpeed's file of a tag that holds the module (the whole model under ZeRO 0) and our client state.
MODEL_STATES = "mp_rank_00_model_states.pt"
EMA_KEY = "ema"  # the client state's EMA weights


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


class CheckpointError(Exception):
    """A checkpoint that must not or cannot be loaded; the message is the one line the user reads."""


def _deepspeed_safe_globals() -> list:
    """The non-builtin types DeepSpeed writes into its checkpoint files (ZeRO's optimizer states: the stage, the
    loss scaler, the parameter fragment map), found by reading real ones with ``weights_only=True``."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, fragment_address]


def safe_load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` that only rebuilds tensors, containers, numbers, strings and DeepSpeed's checkpoint types.
    Raises CheckpointError when the file asks for anything else (the payload of a crafted pickle never runs),
    the reader's own error when the file cannot be read."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if refused is None:  # truncated or garbled data, not a refused global
                raise
            raise CheckpointError(f"refusing to load {path}: it asks to call {refused.group(1)}, which is not part "
                                  f"of a checkpoint (a crafted file?); load only checkpoints from a trusted "
                                  f"source") from None


def check_files(paths: list[str]) -> list[tuple[str, str]]:
    """Reads each file with ``safe_load``; returns ``(path, why)`` for those that cannot be read. Raises
    CheckpointError for a file that is refused."""
    bad = []
    for path in paths:
        try:
            safe_load(path)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001  (any reader error means: not a usable file)
            bad.append((path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"))
    return bad


def model_states_file(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, tag, MODEL_STATES)


def ema_weights(ckpt_dir: str, tag: str) -> Optional[dict[str, torch.Tensor]]:
    """The EMA weights of a tag as saved, None when the run kept no EMA."""
    return safe_load(model_states_file(ckpt_dir, tag)).get(EMA_KEY)


def model_weights(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers of a tag's model: the ZeRO partitions merged, or under ZeRO 0 the module itself."""
    if glob.glob(os.path.join(ckpt_dir, tag, "*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag))
    return to_fp32(safe_load(model_states_file(ckpt_dir, tag))["module"])


def to_fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def tag_files(ckpt_dir: str, tag: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ckpt_dir, tag, "*.pt")))


def complete_tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir) if t.startswith(TAG_PREFIX)
                  and os.path.isfile(os.path.join(ckpt_dir, t, META)))


def resume_tag(ckpt_dir: str) -> Optional[str]:
    """The newest complete tag whose files all read back, or None when there is no checkpoint. Collective: each
    rank checks its share of a tag's files and the ranks agree on the result. A refused file (CheckpointError)
    stops the run; an unreadable one makes it fall back to the previous tag, saying so."""
    latest = latest_tag(ckpt_dir)
    if latest is None:
        return None
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for tag in reversed([t for t in complete_tags(ckpt_dir) if t <= latest]):
        refused, bad = None, []
        try:
            bad = check_files(tag_files(ckpt_dir, tag)[rank::world])
        except CheckpointError as exc:
            refused = str(exc)
        found = [(refused, bad)]
        if world > 1:
            found = [None] * world
            dist.all_gather_object(found, (refused, bad))
        refused = next((r for r, _ in found if r), None)
        if refused:
            raise CheckpointError(refused)
        bad = [b for _, rank_bad in found for b in rank_bad]
        if not bad:
            return tag
        path, why = bad[0]
        if rank == 0:
            _log.warning(f"checkpoint file {path} cannot be read ({why}); falling back to the previous complete "
                         f"checkpoint")
    raise CheckpointError(f"no checkpoint in {ckpt_dir} can be read (see the lines above); move the directory "
                          f"away to start afresh")


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and numbers, so that they load with ``weights_only=True``."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])


def save(engine, run_dir: str, cfg: TrainConfig, *, step: int, epoch: int, batch_in_epoch: int,
         ema_state: Optional[dict], keep: int) -> str:
    """Save on every rank (must be called by all ranks). Returns the tag."""
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag_for(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    # Per-rank RNG states: each rank saves its own into its own file, since client_state is written by rank 0 only.
    client_state = {
        "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, EMA_KEY: ema_state,
        "fingerprint": fingerprint(cfg), "model_name": cfg.model.name, "config": to_dict(cfg),
    }
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(ckpt_dir, tag, f"rng_rank{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        meta = {"tag": tag, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "world_size": world,
                "model_name": cfg.model.name, "model_kwargs": cfg.model.kwargs, "fingerprint": fingerprint(cfg),
                "config": to_dict(cfg)}
        atomic_write_text(os.path.join(ckpt_dir, tag, META), json.dumps(meta, indent=1, default=str))
        atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)
    dist.barrier()
    if rank == 0:
        prune(ckpt_dir, keep)
    return tag


def load(engine, run_dir: str, tag: str) -> dict:
    """Load on every rank; restores module, optimizer and returns the client state (+ this rank's RNG states).
    ``tag`` must come from ``resume_tag``, which has read every file of it with ``weights_only=True``: DeepSpeed
    itself unpickles them with ``weights_only=False``."""
    ckpt_dir = checkpoint_dir(run_dir)
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
    rng_file = os.path.join(ckpt_dir, tag, f"rng_rank{dist.get_rank():05d}.pt")
    client_state["rng"] = safe_load(rng_file) if os.path.isfile(rng_file) else None
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


def ema_state_dict(ema: Any) -> Optional[dict]:
    return None if ema is None else {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
