"""The run config's data section handed to the data library: the one place that spells out the loaders'
arguments for the trainer and the export check."""
from __future__ import annotations

from typing import Optional

from pipelines.data.loader import create_eval_loader, create_train_loader
from train import workers
from train.config import DataConfig


def train_loader(d: DataConfig, *, num_classes: int, in_chans: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: Optional[str] = None):
    return create_train_loader(
        d.dir, d.train_split, batch_size=d.batch_size, img_size=d.img_size, num_classes=num_classes, rank=rank,
        world_size=world_size, num_workers=d.num_workers, seed=seed, in_chans=in_chans, auto_augment=d.auto_augment,
        re_prob=d.re_prob, hflip=d.hflip, scale=tuple(d.scale), interpolation=d.interpolation, mean=d.mean,
        std=d.std, mixup=d.mixup, cutmix=d.cutmix, label_smoothing=d.label_smoothing, resampled=d.resampled,
        shuffle_buffer=d.shuffle_buffer, decode=d.decode, device=device,
        multiprocessing_context=_context(d.worker_start, d.num_workers))


def eval_loader(d: DataConfig, *, in_chans: int, rank: int = 0, world_size: int = 1, device: Optional[str] = None,
                data_dir: Optional[str] = None, split: Optional[str] = None, batch_size: Optional[int] = None,
                num_workers: Optional[int] = None, decode: Optional[str] = None):
    """The evaluation loader of ``d``; the keywords given replace the section's values (the export check reads a
    few images of any folder and split, in this process, decoded on the CPU)."""
    num_workers = d.num_workers if num_workers is None else num_workers
    return create_eval_loader(
        data_dir or d.dir, split or d.val_split, batch_size=batch_size or d.eval_batch_size or d.batch_size,
        img_size=d.img_size, crop_pct=d.crop_pct, rank=rank, world_size=world_size,
        num_workers=num_workers, in_chans=in_chans, interpolation=d.interpolation, mean=d.mean, std=d.std,
        decode=decode or d.decode, device=device, multiprocessing_context=_context(d.worker_start, num_workers))


def _context(start: str, num_workers: int):
    """How the workers start (``train.workers``); None without workers (nothing to start)."""
    return workers.context(start) if num_workers else None
