"""The DeepSpeed side: the engine's config (ZeRO stage, precision, batch sizes, clipping) built from the run
config, and the engine itself, which owns model, optimizer and precision."""
from __future__ import annotations

from typing import Optional

import deepspeed
import torch

from train.config import BatchPlan, CompileConfig, DeepSpeedConfig

# DeepSpeed prints a line every `steps_per_print` steps; the trainer logs itself.
_QUIET_STEPS = 10**9
# torch.autocast dtypes by the names the configs and the tools' --amp take.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(section: DeepSpeedConfig, plan: BatchPlan, clip_grad: Optional[float] = None) -> dict:
    """DeepSpeed's config for the run's ``deepspeed`` section, batch plan and gradient clipping."""
    ds = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": clip_grad or 0.0,
        "zero_optimization": {"stage": section.zero_stage},
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    if section.precision == "bf16":
        # Not the "bf16" block: it casts parameters but not buffers, and BatchNorm then fails on its first
        # forward. torch_autocast keeps weights and BN statistics in fp32 (docs/FIELD_NOTES.md).
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    ds.update(section.extra)
    return ds


def autocast_dtype(section: DeepSpeedConfig) -> Optional[torch.dtype]:
    return AMP_DTYPES.get(section.precision)


def create_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def compile_engine(engine, section: CompileConfig) -> Optional[str]:
    """``torch.compile`` the engine's module in place (DeepSpeed's ``engine.compile``: parameter names, checkpoints
    and the optimizer's parameters stay those of the module) when the run's ``compile`` section asks; what was done,
    for the log, or None. Compilation itself happens on the first forward of each mode (train, eval)."""
    if not section.enabled:
        return None
    engine.compile(backend=section.backend, compile_kwargs={} if section.mode is None else {"mode": section.mode})
    return f"torch.compile (backend {section.backend}, mode {section.mode or 'default'})"


def grad_norm_before_step(engine) -> Optional[float]:
    """Without ZeRO the engine keeps no norm unless clipping; the gradients are already averaged across ranks
    at the accumulation boundary (before ``step``), so compute it here. With ZeRO, None: read
    ``engine.get_global_grad_norm()`` after the step."""
    if engine.zero_optimization() or not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else None
