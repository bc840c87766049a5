"""One training epoch: micro batches through the DeepSpeed engine, the schedule and the EMA stepped per optimizer
update, periodic checkpoints, and a stop at the next update boundary when SIGUSR1/SIGTERM arrived
(train/signals.py)."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator

from train import signals
from train.engine import grad_norm_before_step
from train.evaluate import summed_counts
from train.logger import RunLogger


@dataclass
class Position:
    """Where training is: optimizer updates done, epoch, micro batches of that epoch already consumed."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def stop_agreed(device: str) -> bool:
    """Whether any rank got a stop signal. Ranks agree with an all_reduce at every update boundary, so all of
    them stop after the same step even when the signal reached them at different times (or only one)."""
    flag = torch.tensor([1.0 if signals.requested() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed python/numpy/torch from (seed, rank, epoch) at every epoch start. The epoch's iterator (and the
    data workers' base seed drawn from torch's RNG) then depends only on the epoch, so a resumed run can
    rebuild it exactly; within the epoch the RNG states saved in the checkpoint take over."""
    s = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]))
    torch.manual_seed(int(s[0]) << 32 | int(s[1]))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if target.dtype.is_floating_point:  # soft targets from mixup/cutmix/label smoothing
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target)


@dataclass
class EpochContext:
    engine: Any
    loader: Any
    scheduler: Any
    ema: Any
    logger: RunLogger
    micro_per_epoch: int
    log_every: int
    save_every: int
    save: Callable[[Position], None]  # collective: averages BN, saves on every rank
    world_size: int
    rng_after_skip: Optional[dict] = None  # the resumed rank's RNG states, restored after skipping
    last_saved_step: int = -1
    stats: dict = field(default_factory=dict)


def train_one_epoch(ctx: EpochContext, pos: Position, restore_rng: Callable[[dict], None]) -> bool:
    """Runs the rest of epoch ``pos.epoch`` from micro batch ``pos.batch_in_epoch``. Returns False when a stop
    was requested (a checkpoint has then been saved)."""
    engine, device = ctx.engine, get_accelerator().current_device_name()
    data_before = dict(ctx.loader.stats)
    it = signals.shielded(ctx.loader)
    # Exact resume re-reads the consumed micro batches (decode + augment, no model work): the cost is that
    # part of an epoch of data loading.
    for _ in range(pos.batch_in_epoch):
        next(it)
    if ctx.rng_after_skip is not None:
        restore_rng(ctx.rng_after_skip)
        ctx.rng_after_skip = None
    ctx.logger.start_epoch(pos.epoch, ctx.micro_per_epoch, pos.batch_in_epoch)
    engine.train()
    loss_sum, loss_n, samples, wait, t0 = 0.0, 0, 0, 0.0, time.perf_counter()
    epoch_loss, epoch_n, epoch_t0, epoch_samples = 0.0, 0, time.perf_counter(), 0
    while pos.batch_in_epoch < ctx.micro_per_epoch:
        t_wait = time.perf_counter()
        images, target = next(it)
        wait += time.perf_counter() - t_wait
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        loss = loss_fn(engine(images), target)
        engine.backward(loss)
        grad_norm = grad_norm_before_step(engine)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        pos.batch_in_epoch += 1
        value = loss.item()
        loss_sum, loss_n, samples = loss_sum + value, loss_n + 1, samples + images.shape[0]
        epoch_loss, epoch_n, epoch_samples = epoch_loss + value, epoch_n + 1, epoch_samples + images.shape[0]
        ctx.logger.batch(loss=value)
        if not boundary:
            continue
        pos.step += 1
        ctx.scheduler.step_update(num_updates=pos.step)
        if ctx.ema is not None:
            ctx.ema.update(engine.module, step=pos.step)
        if pos.step % ctx.log_every == 0:
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            mean_loss = torch.tensor([loss_sum / loss_n], device=device)
            dist.all_reduce(mean_loss)
            elapsed = time.perf_counter() - t0
            values = {
                "train/loss": mean_loss.item() / ctx.world_size,
                "train/lr": engine.optimizer.param_groups[0]["lr"],
                "train/images_per_sec": samples * ctx.world_size / elapsed,
                "train/grad_norm": None if grad_norm is None else float(grad_norm),
                "train/epoch": pos.epoch + pos.batch_in_epoch / ctx.micro_per_epoch,
            }
            ctx.logger.scalars(pos.step, values)
            ctx.logger.step_line(pos.step, values, data_wait=wait / elapsed)
            loss_sum, loss_n, samples, wait, t0 = 0.0, 0, 0, 0.0, time.perf_counter()
        stop = stop_agreed(device)
        if stop or pos.step % ctx.save_every == 0:
            ctx.save(pos)
            ctx.last_saved_step = pos.step
        if stop:
            ctx.logger.end_epoch()
            return False
    ctx.logger.end_epoch()
    elapsed = time.perf_counter() - epoch_t0
    ctx.stats = {"loss": epoch_loss / max(epoch_n, 1),
                 "images_per_sec": epoch_samples * ctx.world_size / elapsed if epoch_n else None,
                 "data": summed_counts(ctx.loader.stats, data_before)}  # bad data of this epoch, all ranks
    return True
