"""Parameter groups, the AdamW optimizer and timm's warm-up + cosine schedule (stepped per optimizer update)."""
from __future__ import annotations

from typing import Optional

import torch
from timm.scheduler import CosineLRScheduler

from models.mrconv import KERNEL_PARAM_NAMES, MRConv


def kernel_param_names(model: torch.nn.Module) -> set[str]:
    """Names of the MRConv kernel parameters and branch weights (``alpha``, ``beta``); not their BatchNorms."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, MRConv):
            prefix = f"{module_name}." if module_name else ""
            names.update(f"{prefix}{n}" for n, _ in module.named_parameters()
                         if n.split(".")[0] in KERNEL_PARAM_NAMES)
    return names


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float,
                 kernel_lr: Optional[float] = None) -> list[dict]:
    """Decay for weight matrices and conv filters only; no weight decay for norms, biases (ndim <= 1) and
    MRConv parameters, which get ``kernel_lr`` when it is set (the paper's 1D recipe)."""
    kernel_names = kernel_param_names(model)
    decay, no_decay, kernel = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in kernel_names:
            kernel.append(p)
        elif p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr": lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": lr},
        {"name": "kernel", "params": kernel, "weight_decay": 0.0, "lr": lr if kernel_lr is None else kernel_lr},
    ]
    return [g for g in groups if g["params"]]


def create_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                     eps: float, kernel_lr: Optional[float] = None) -> torch.optim.Optimizer:
    # torch's AdamW is in DeepSpeed's ZeRO-supported list and runs on every accelerator.
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, kernel_lr), lr=lr, betas=tuple(betas), eps=eps)


def create_scheduler(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: float, warmup_lr: float,
                     min_lr: float, updates_per_epoch: int) -> CosineLRScheduler:
    """timm's warm-up + cosine schedule in update units (warm-up may be a fraction of an epoch): call
    ``step_update(num_updates)`` after every optimizer update. The lr is a pure function of the update count,
    so resuming only needs that count."""
    scheduler = CosineLRScheduler(
        optimizer, t_initial=epochs * updates_per_epoch, lr_min=min_lr,
        warmup_t=int(round(warmup_epochs * updates_per_epoch)), warmup_lr_init=warmup_lr, t_in_epochs=False)
    scheduler.step_update(0)
    return scheduler
