"""Distributed evaluation: every rank scores its part of the evaluation set; correct counts and sample counts
are summed with all_reduce, so top-1/top-5 are over exactly the evaluation set (no padding, no duplicates).
The bad-data counts of a shard loader (``ShardLoader.stats``) are summed across ranks the same way."""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from pipelines.data.progress import progress as show_progress
from train import signals


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Samples whose target is among the top-k logits, for each k (k capped at the number of classes)."""
    maxk = min(max(ks), logits.shape[1])
    hit = logits.topk(maxk, dim=1).indices.eq(target.view(-1, 1))
    return [int(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


def summed_counts(now: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    """What a loader's counts grew by since ``before`` (its ``stats`` then), summed over all ranks when a process
    group is up (collective), else this process's."""
    grown = {k: now[k] - before.get(k, 0) for k in sorted(now)}
    if not (dist.is_available() and dist.is_initialized()):
        return grown
    totals = torch.tensor(list(grown.values()), dtype=torch.float64, device=get_accelerator().current_device_name())
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return {k: int(v) for k, v in zip(grown, totals.tolist())}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, autocast_dtype: torch.dtype | None = None, *,
             device: torch.device | str | None = None, progress: bool = False, total: int | None = None) -> dict:
    """Returns ``{'top1', 'top5', 'loss', 'count'}`` over the whole evaluation set (all ranks when a process group
    is up, else this process's loader), plus the loader's bad-data counts of this pass (``corrupt_skipped``, ...)
    when it keeps them. ``device`` defaults to the accelerator's current device; ``progress`` draws a bar."""
    device = torch.device(device or get_accelerator().current_device_name())
    distributed = dist.is_available() and dist.is_initialized()
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, count
    counts_before = dict(getattr(loader, "stats", {}))
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    batches = signals.shielded(loader)  # its workers ignore the stop signals
    if progress:
        batches = show_progress(batches, total=total, desc="eval", unit="batch")
    for images, target in batches:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        logits = logits.float()
        c1, c5 = topk_correct(logits, target)
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        totals += torch.tensor([c1, c5, float(loss), target.numel()], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    model.train(was_training)
    count = totals[3].item()
    if count == 0:
        raise RuntimeError("the evaluation set is empty on every rank")
    return {"top1": totals[0].item() / count, "top5": totals[1].item() / count, "loss": totals[2].item() / count,
            "count": int(count), **summed_counts(getattr(loader, "stats", {}), counts_before)}
