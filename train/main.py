"""``python -m train --config CONFIG [--run-dir DIR] [--set key=value ...]``: orchestration only.

Same entry point under ``torchrun``, the ``deepspeed`` launcher and ``srun`` (world info in train/distributed.py).
Exit codes: 0 finished, 3 stopped on SIGUSR1/SIGTERM after saving a checkpoint (the job is to be requeued;
the next start resumes from the run directory), 2 bad config, data or a refused checkpoint (one line on stderr,
no traceback). The stop handlers are installed by ``train/__main__.py`` before any heavy import (train/signals.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Optional

import timm
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from timm.utils import ModelEmaV3, distribute_bn

import models  # noqa: F401  (registers mrconvnext_* in timm)
from pipelines.data.files import atomic_write_text
from pipelines.data.loader import COUNT_KEYS, DataError, check_readers, check_split, read_info
from train import checkpoint as ckpt
from train import loaders, signals
from train.config import (ConfigError, TrainConfig, check_compile_backend, check_model_name, load_config,
                          model_kwarg_hint, plan_batches, scaled_lr, write_config)
from train.distributed import init_distributed, world_info_from_env
from train.engine import autocast_dtype, compile_engine, create_engine, deepspeed_config
from train.evaluate import evaluate
from train.logger import RunLogger, alpha_energy, setup_logging
from train.loop import EpochContext, Position, seed_epoch, train_one_epoch
from train.optim import create_optimizer, create_scheduler

EXIT_FINISHED, EXIT_BAD_CONFIG, EXIT_STOPPED = 0, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a YAML recipe: a path or a name under train/configs")
    p.add_argument("--run-dir", default=None, help="checkpoints, TensorBoard, config.yaml (default runs/<recipe>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (repeatable), e.g. --set optim.lr=1e-3")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p


def num_classes_for(cfg: TrainConfig, info: dict) -> int:
    classes = info.get("classes")
    if cfg.model.num_classes is None:
        if not classes:
            raise ConfigError(f"model.num_classes is not set and {cfg.data.dir}/_info.json lists no classes")
        return len(classes)
    if classes and len(classes) != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {cfg.data.dir}/_info.json lists "
                          f"{len(classes)} classes")
    return cfg.model.num_classes


def create_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    try:
        return timm.create_model(cfg.model.name, num_classes=num_classes, drop_path_rate=cfg.model.drop_path_rate,
                                 in_chans=cfg.model.in_chans, **cfg.model.kwargs)
    except TypeError as exc:
        typo = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if typo is None:
            raise
        raise ConfigError(f"model.kwargs.{typo.group(1)}: {cfg.model.name} takes no such argument"
                          f"{model_kwarg_hint(cfg.model.name, typo.group(1))}") from None
    except ValueError as exc:  # a model refusing an argument's value
        raise ConfigError(f"model.kwargs: {exc}") from None


def preflight(cfg: TrainConfig) -> None:
    """The mistakes that need no process group, found in seconds instead of after DeepSpeed's start-up: the
    model's name, the data folder, its splits and shards (and enough of them for the readers), and the model's
    arguments (the model is built on the meta device: no memory, no weights)."""
    check_model_name(cfg.model.name)
    check_compile_backend(cfg)
    num_classes = num_classes_for(cfg, read_info(cfg.data.dir))
    train_shards = check_split(cfg.data.dir, cfg.data.train_split)
    check_split(cfg.data.dir, cfg.data.val_split)
    if not cfg.data.resampled:
        check_readers(cfg.data.dir, cfg.data.train_split, train_shards, world_info_from_env().world_size,
                      cfg.data.num_workers)
    with torch.device("meta"):
        create_model(cfg, num_classes)


def run(cfg: TrainConfig, run_dir: str) -> int:
    world = init_distributed()
    rank, world_size = world.rank, world.world_size
    log = setup_logging(rank)
    plan = plan_batches(cfg, world_size)
    # Resolved before the compatibility check so config.yaml and checkpoints hold the class count.
    cfg.model.num_classes = num_classes_for(cfg, read_info(cfg.data.dir))
    num_classes = cfg.model.num_classes
    ckpt_dir = ckpt.checkpoint_dir(run_dir)
    tag = ckpt.resume_tag(ckpt_dir)
    if tag is not None:
        ckpt.check_compatible(ckpt.read_meta(ckpt_dir, tag), cfg, world_size, os.path.join(ckpt_dir, tag))
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        write_config(cfg, os.path.join(run_dir, "config.yaml"))
    dist.barrier()

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DeepSpeed also broadcasts rank 0's)
    model = create_model(cfg, num_classes)
    lr = scaled_lr(cfg, plan.global_batch_size)
    optimizer = create_optimizer(model, lr, cfg.optim.weight_decay, tuple(cfg.optim.betas), cfg.optim.eps,
                                 cfg.optim.kernel_lr)
    engine = create_engine(model, optimizer, deepspeed_config(cfg.deepspeed, plan, cfg.optim.clip_grad))
    amp_dtype = autocast_dtype(cfg.deepspeed)

    device = get_accelerator().current_device_name()  # where data.decode=gpu decodes
    train_loader = loaders.train_loader(cfg.data, num_classes=num_classes, in_chans=cfg.model.in_chans,
                                        seed=cfg.seed, rank=rank, world_size=world_size, device=device)
    eval_loader = loaders.eval_loader(cfg.data, in_chans=cfg.model.in_chans, rank=rank, world_size=world_size,
                                      device=device)
    # Whole accumulation windows per epoch, so an epoch ends on an optimizer update.
    updates_per_epoch = len(train_loader) // plan.grad_accum_steps
    if updates_per_epoch == 0:
        raise ConfigError(f"one epoch has {len(train_loader)} micro batches per rank, fewer than "
                          f"optim.grad_accum_steps={plan.grad_accum_steps}")
    micro_per_epoch = updates_per_epoch * plan.grad_accum_steps
    s = cfg.schedule
    scheduler = create_scheduler(optimizer, s.epochs, s.warmup_epochs, s.warmup_lr, s.min_lr, updates_per_epoch)
    ema = ModelEmaV3(engine.module, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
    compiled = compile_engine(engine, cfg.compile)  # after the EMA copy, which stays eager

    pos, rng_after_skip = Position(), None
    if tag is not None:
        state = ckpt.load(engine, run_dir, tag)
        pos = Position(state["step"], state["epoch"], state["batch_in_epoch"])
        if ema is not None:
            ema.module.load_state_dict(state[ckpt.EMA_KEY])
        rng_after_skip = state["rng"]
        scheduler.step_update(num_updates=pos.step)
        log.info(f"resumed from {os.path.join(ckpt_dir, tag)}: epoch {pos.epoch}, step {pos.step}, "
                 f"micro batch {pos.batch_in_epoch}/{micro_per_epoch}")

    logger = RunLogger(run_dir, rank, cfg.logging.tensorboard, cfg.logging.progress_bar)
    n_params = sum(p.numel() for p in model.parameters()) if cfg.deepspeed.zero_stage < 3 else None
    log.info(f"{cfg.model.name} ({n_params or '?'} params), {world.launcher} world {world_size}, "
             f"global batch {plan.micro_batch_size} x {plan.grad_accum_steps} x {world_size} = "
             f"{plan.global_batch_size}, lr {lr:.3g}, ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}, "
             f"{updates_per_epoch} updates/epoch, run dir {run_dir}")
    if compiled:
        log.info(f"{compiled}: the first training and evaluation steps compile the model (minutes on a CPU)")

    def average_bn() -> None:
        # DeepSpeed leaves each rank with its own BN statistics; evaluate and save their average (timm --dist-bn).
        if world_size > 1:
            distribute_bn(engine.module, world_size, reduce=True)
            if ema is not None:
                distribute_bn(ema.module, world_size, reduce=True)

    def save(p: Position) -> None:
        average_bn()
        saved = ckpt.save(engine, run_dir, cfg, step=p.step, epoch=p.epoch, batch_in_epoch=p.batch_in_epoch,
                          ema_state=ckpt.ema_state_dict(ema), keep=cfg.checkpoint.keep)
        logger.info(f"saved checkpoint {os.path.join(ckpt_dir, saved)}")

    ctx = EpochContext(engine=engine, loader=train_loader, scheduler=scheduler, ema=ema, logger=logger,
                       micro_per_epoch=micro_per_epoch, log_every=cfg.logging.log_every_steps,
                       save_every=cfg.checkpoint.every_steps, save=save, world_size=world_size,
                       rng_after_skip=rng_after_skip, last_saved_step=pos.step if tag else -1)
    metrics: dict = {}
    data_counts = dict.fromkeys(COUNT_KEYS, 0)  # bad train data over this start, all ranks
    t_start = time.perf_counter()
    while pos.epoch < s.epochs:
        seed_epoch(cfg.seed, rank, pos.epoch)
        train_loader.set_epoch(pos.epoch)
        if not train_one_epoch(ctx, pos, ckpt.set_rng_state):
            got = signals.received()
            how = f"{got[0]} {time.monotonic() - got[1]:.1f} s ago" if got else "on another rank"
            logger.info(f"stop requested ({how}): checkpoint at step {pos.step} saved, exiting with {EXIT_STOPPED}")
            logger.close()
            return EXIT_STOPPED
        last = pos.epoch + 1 == s.epochs
        line = f"epoch {pos.epoch + 1}/{s.epochs} step {pos.step} lr {optimizer.param_groups[0]['lr']:.3g}"
        if ctx.stats.get("images_per_sec"):
            line += f" train loss {ctx.stats['loss']:.4f} {ctx.stats['images_per_sec']:.0f} img/s"
        bad = {f"train {k}": v for k, v in ctx.stats["data"].items()}
        for k, v in ctx.stats["data"].items():
            data_counts[k] += v
        logger.scalars(pos.step, {f"data/{k.replace(' ', '_')}": v for k, v in bad.items()})
        if (pos.epoch + 1) % cfg.logging.eval_every_epochs == 0 or last:
            average_bn()
            metrics = {f"val/{k}": v for k, v in evaluate(engine, eval_loader, amp_dtype).items()}
            if ema is not None and cfg.ema.eval:
                metrics.update({f"val_ema/{k}": v for k, v in
                                evaluate(ema.module, eval_loader, amp_dtype).items()})
            logger.scalars(pos.step, {k: v for k, v in metrics.items() if not k.endswith("count")})
            line += " " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.split("/")[1] in ("top1", "top5"))
            bad.update({f"val {k[4:]}": v for k, v in metrics.items() if k[4:] in COUNT_KEYS and k[:4] == "val/"})
        if any(bad.values()):
            line += " bad data: " + ", ".join(f"{k} {v}" for k, v in bad.items() if v)
        if (pos.epoch + 1) % cfg.logging.alpha_image_every_epochs == 0 or last:
            logger.alpha_images(pos.step, alpha_energy(engine.module))
        logger.info(line)
        pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0

    if ctx.last_saved_step != pos.step:
        save(pos)
    final_tag = ckpt.latest_tag(ckpt_dir)
    summary = {"run_dir": run_dir, "checkpoint": os.path.join(ckpt_dir, final_tag), "step": pos.step,
               "epochs": s.epochs, "model": cfg.model.name, "metrics": metrics,
               "train_seconds_this_start": round(time.perf_counter() - t_start, 1),
               "train_bad_data_this_start": data_counts}
    if rank == 0:
        atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1))
        logger.info("finished: " + json.dumps(summary))
        logger.info(f"export with: python -m train.export {run_dir} {os.path.join(run_dir, 'model.safetensors')} "
                    f"--data {cfg.data.dir}")
    logger.close()
    dist.barrier()
    return EXIT_FINISHED


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        stem = os.path.splitext(os.path.basename(args.config))[0]
        cfg.run_dir = args.run_dir or cfg.run_dir or os.path.join("runs", stem)
        preflight(cfg)
        return run(cfg, cfg.run_dir)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except ckpt.CheckpointError as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
