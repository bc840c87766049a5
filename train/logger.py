"""Rank-0 outputs: TensorBoard scalars and the per-stage ``alpha`` image, one line per epoch, and within an epoch
a tqdm bar on a terminal or, when the output goes to a file (SLURM, ``> log``), one line every
``logging.log_every_steps``: a bar redrawn with carriage returns writes megabytes an hour and no newline."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import deepspeed
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from models.mrconv import MRConv
from models.mrconv import alpha_energy as stage_alpha_energy

TENSORBOARD_SUBDIR = "tensorboard"  # RUN_DIR/tensorboard, as slurm.submit and the README say

_log = logging.getLogger("train")


def setup_logging(rank: int) -> logging.Logger:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
    return _log


def alpha_energy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """``||alpha_i||^2`` per block x resolution for every stage (``models.mrconv.alpha_energy``), keyed ``stage0``...

    Collective under ZeRO-3 (the ``alpha`` parameters are gathered): call it on every rank. Returns {} when the
    model has no MRConv layer."""
    alphas = [m.alpha for m in model.modules() if isinstance(m, MRConv) and not m.inference_mode]
    with deepspeed.zero.GatheredParameters(alphas, modifier_rank=None):
        stages = stage_alpha_energy(model)
    return {stage.replace("stages.", "stage"): energy for stage, (energy, _) in stages.items()}


def energy_image(energy: np.ndarray, cell: int = 12) -> np.ndarray:
    """A (3, H, W) uint8 heat map: rows are blocks, columns resolutions (short kernel on the left), each cell
    ``cell`` pixels; normalized per stage; padding (stages with fewer resolutions) is black."""
    finite = np.isfinite(energy)
    lo, hi = (np.nanmin(energy), np.nanmax(energy)) if finite.any() else (0.0, 1.0)
    norm = np.where(finite, (energy - lo) / max(hi - lo, 1e-12), 0.0)
    red, blue = norm, 1.0 - norm  # a two-colour ramp: blue = small share, red = large share
    img = np.stack([red, 0.2 * np.ones_like(norm), blue]) * finite[None]
    img = np.repeat(np.repeat(img, cell, axis=1), cell, axis=2)
    return (img * 255).astype(np.uint8)


class RunLogger:
    """Does nothing on ranks other than 0, so the loop calls it unconditionally."""

    def __init__(self, run_dir: str, rank: int, tensorboard: bool, progress_bar: bool):
        self.rank = rank
        # tqdm draws on stderr: a bar only where stderr is a terminal, step lines otherwise.
        self.progress_bar = progress_bar and rank == 0 and sys.stderr.isatty()
        self.writer: Optional[SummaryWriter] = None
        if rank == 0 and tensorboard:
            self.writer = SummaryWriter(os.path.join(run_dir, TENSORBOARD_SUBDIR))
        self.bar: Optional[tqdm] = None

    def start_epoch(self, epoch: int, total: int, initial: int) -> None:
        if self.progress_bar:
            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="batch", dynamic_ncols=True,
                            leave=False)

    def batch(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def scalars(self, step: int, values: dict[str, Optional[float]]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)

    def step_line(self, step: int, values: dict[str, Optional[float]], data_wait: float) -> None:
        """One line per logging interval where there is no bar. ``data_wait``: the share of the interval rank 0
        spent waiting for its loader (near 1: the data pipeline is the bottleneck)."""
        if self.rank == 0 and self.bar is None:
            _log.info(f"step {step} epoch {values['train/epoch']:.2f} loss {values['train/loss']:.4f} "
                      f"lr {values['train/lr']:.3g} {values['train/images_per_sec']:.0f} img/s "
                      f"data wait {100 * data_wait:.0f}%")

    def alpha_images(self, step: int, energies: dict[str, np.ndarray]) -> None:
        if self.writer is not None:
            for stage, energy in sorted(energies.items()):
                self.writer.add_image(f"alpha_energy/{stage}", energy_image(energy), step)

    def info(self, msg: str) -> None:
        if self.rank == 0:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                _log.info(msg)

    def close(self) -> None:
        self.end_epoch()
        if self.writer is not None:
            self.writer.close()
