"""The run's one config object: a typed dataclass tree loaded from a YAML recipe, with ``--set`` overrides,
validated once at start and written into the run directory.

Errors name the offending key: an unknown key with the closest valid name, a wrong type with the expected
one, inconsistent batch sizes with the arithmetic (global batch = micro batch x grad accum x world size), an
unknown model with the closest timm name, a YAML syntax error with its file, line and column. Each is one line.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from pipelines.data.files import atomic_write_text
from train.workers import WORKER_STARTS

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is wrong."""


@dataclass
class ModelConfig:
    name: str = "mrconvnext_atto"
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model as is
    num_classes: Optional[int] = None  # None: the number of classes in the data's _info.json
    in_chans: int = 3
    drop_path_rate: float = 0.0


@dataclass
class DataConfig:
    dir: str = ""
    train_split: str = "train"
    val_split: str = "validation"
    batch_size: int = 128  # micro batch per rank
    eval_batch_size: Optional[int] = None  # None: batch_size
    img_size: int = 224
    crop_pct: float = 0.875
    num_workers: int = 4
    interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    auto_augment: Optional[str] = None
    re_prob: float = 0.0
    hflip: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    resampled: bool = False
    shuffle_buffer: int = 5000
    decode: str = "cpu"  # cpu: workers decode and augment; gpu: workers read bytes, the training device decodes
    worker_start: str = "forkserver"  # how workers start: forkserver (not forked from the threaded rank), fork, spawn


@dataclass
class OptimConfig:
    opt: str = "adamw"
    lr: Optional[float] = None  # absolute lr; None: base_lr * global_batch_size / base_batch_size
    base_lr: float = 4e-3
    base_batch_size: int = 4096
    kernel_lr: Optional[float] = None  # absolute lr of the MRConv kernel group; None: same as the others
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: Optional[float] = None  # global grad-norm clip (DeepSpeed gradient_clipping)
    global_batch_size: Optional[int] = None  # None: batch_size x grad_accum_steps x world size
    grad_accum_steps: Optional[int] = None  # None: derived from global_batch_size (or 1)


@dataclass
class ScheduleConfig:
    epochs: int = 300
    warmup_epochs: float = 20
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "bf16"  # bf16 (torch_autocast: weights and BN statistics stay fp32) | fp32
    extra: dict = field(default_factory=dict)  # merged last into the generated DeepSpeed config


# torch.compile's modes (``None``: its default).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileConfig:
    """``torch.compile`` of the model through DeepSpeed's ``engine.compile`` (timm's ``--torchcompile``): the same
    arithmetic in fused kernels, compiled in the first steps of each start (minutes on a CPU)."""
    enabled: bool = False
    backend: str = "inductor"  # any of torch._dynamo.list_backends()
    mode: Optional[str] = None  # one of COMPILE_MODES; None: torch.compile's default


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False
    eval: bool = True  # also evaluate the EMA weights


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # optimizer updates between saves; a save also happens at the end
    keep: int = 2


@dataclass
class LoggingConfig:
    log_every_steps: int = 50
    tensorboard: bool = True
    progress_bar: bool = True
    eval_every_epochs: int = 1
    alpha_image_every_epochs: int = 1


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0
    run_dir: Optional[str] = None  # None: runs/<recipe name>; --run-dir wins


# Keys that may change between a run and its resumption without changing what is trained.
RESUME_SAFE_KEYS = frozenset({
    "run_dir", "data.dir", "data.num_workers", "data.worker_start", "data.eval_batch_size", "checkpoint.every_steps",
    "checkpoint.keep", "logging.log_every_steps", "logging.tensorboard", "logging.progress_bar",
    "logging.eval_every_epochs", "logging.alpha_image_every_epochs", "ema.eval",
    # how the same model is run, not what it is: a run may resume compiled or not (float rounding aside)
    "compile.enabled", "compile.backend", "compile.mode",
})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints pass as floats, numeric strings as floats
    (YAML reads ``4e-3`` as a string)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, f"{full}.")
        else:
            values[key] = _coerce(value, tp, full)
    return cls(**values)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: line and column (1-based), what is wrong."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(filter(None, (getattr(exc, "problem", None), getattr(exc, "context", None))))
    return where + (what or " ".join(str(exc).split()))


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(text) if text.strip() else None))
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({yaml_problem(exc)})") from None
    return out


def resolve_config_path(path: str) -> str:
    """A path, or a recipe name under ``train/configs`` (``fashion_mnist`` or ``fashion_mnist.yaml``)."""
    if os.path.isfile(path):
        return path
    for candidate in (os.path.join(CONFIG_DIR, path), os.path.join(CONFIG_DIR, f"{path}.yaml")):
        if os.path.isfile(candidate):
            return candidate
    recipes = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise ConfigError(f"config {path!r} not found (recipes in {CONFIG_DIR}: {', '.join(recipes)})")


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    raw: dict = {}
    if path:
        resolved = resolve_config_path(path)
        try:
            with open(resolved) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{resolved} is not valid YAML: {yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    cfg = _build(TrainConfig, raw, "")
    check_static(cfg)
    return cfg


def check_model_name(name: str) -> None:
    """An unknown model fails with the closest names. Not part of ``load_config``: it imports timm (and torch),
    which ``slurm.submit`` must not."""
    import timm

    import models  # noqa: F401  (registers mrconvnext_*)

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "; see timm.list_models()"
    raise ConfigError(f"model.name: {name!r} is not a timm model{hint}")


def check_compile_backend(cfg: TrainConfig) -> None:
    """An unknown ``compile.backend`` fails with the closest names (imports torch, as ``check_model_name`` does)."""
    if not cfg.compile.enabled:
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if cfg.compile.backend not in backends:
        close = difflib.get_close_matches(cfg.compile.backend, backends, n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"compile.backend: {cfg.compile.backend!r} is not a torch.compile backend{hint} (main "
                          f"ones: {', '.join(torch._dynamo.list_backends())})")


def model_kwarg_hint(model_name: str, key: str) -> str:
    """'; did you mean ...?' for a ``model.kwargs`` key the model refused: the closest argument of the model
    classes defined next to its timm entry point (where a timm family keeps its blocks and stages)."""
    import inspect
    import sys

    import timm
    import torch

    import models  # noqa: F401  (registers mrconvnext_*)

    module = sys.modules[timm.models.model_entrypoint(model_name).__module__]
    names = {p for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, torch.nn.Module)
             for p in inspect.signature(obj.__init__).parameters if p not in ("self", "args", "kwargs")}
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def from_dict(raw: dict) -> TrainConfig:
    """A config from its dict form (as written into config.yaml and checkpoints), validated."""
    cfg = _build(TrainConfig, raw, "")
    check_static(cfg)
    return cfg


def check_static(cfg: TrainConfig) -> None:
    """Checks that do not need the world size."""
    positive = {
        "data.batch_size": cfg.data.batch_size, "data.img_size": cfg.data.img_size,
        "schedule.epochs": cfg.schedule.epochs, "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.keep": cfg.checkpoint.keep, "logging.log_every_steps": cfg.logging.log_every_steps,
        "logging.eval_every_epochs": cfg.logging.eval_every_epochs, "model.in_chans": cfg.model.in_chans,
        "optim.base_batch_size": cfg.optim.base_batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key, value in {"data.num_workers": cfg.data.num_workers, "data.shuffle_buffer": cfg.data.shuffle_buffer,
                       "model.drop_path_rate": cfg.model.drop_path_rate}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    if cfg.deepspeed.precision not in ("bf16", "fp32"):
        raise ConfigError(f"deepspeed.precision must be 'bf16' or 'fp32', got {cfg.deepspeed.precision!r}")
    if cfg.optim.opt != "adamw":
        raise ConfigError(f"optim.opt: only 'adamw' is supported, got {cfg.optim.opt!r}")
    if cfg.schedule.warmup_epochs >= cfg.schedule.epochs and cfg.schedule.warmup_epochs > 0:
        raise ConfigError(f"schedule.warmup_epochs ({cfg.schedule.warmup_epochs}) must be < schedule.epochs "
                          f"({cfg.schedule.epochs})")
    if len(cfg.data.mean) != cfg.model.in_chans or len(cfg.data.std) != cfg.model.in_chans:
        raise ConfigError(f"data.mean/data.std need model.in_chans={cfg.model.in_chans} values, got "
                          f"{len(cfg.data.mean)}/{len(cfg.data.std)}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas needs 2 values, got {cfg.optim.betas}")
    if cfg.data.worker_start not in WORKER_STARTS:
        raise ConfigError(f"data.worker_start must be one of {', '.join(WORKER_STARTS)}, got "
                          f"{cfg.data.worker_start!r}")
    if cfg.data.decode not in ("cpu", "gpu"):
        raise ConfigError(f"data.decode must be 'cpu' or 'gpu', got {cfg.data.decode!r}")
    if cfg.data.decode == "gpu" and cfg.data.auto_augment and not cfg.data.auto_augment.startswith("rand"):
        raise ConfigError(f"data.decode=gpu runs RandAugment ('rand-...') on the device, not "
                          f"{cfg.data.auto_augment!r}: set data.auto_augment to a rand- policy or null, or "
                          f"data.decode=cpu")
    if cfg.compile.mode is not None and cfg.compile.mode not in COMPILE_MODES:
        raise ConfigError(f"compile.mode must be one of {', '.join(COMPILE_MODES)} or null, got {cfg.compile.mode!r}")
    if len(cfg.data.scale) != 2:
        raise ConfigError(f"data.scale needs 2 values, got {cfg.data.scale}")
    if not cfg.data.dir:
        raise ConfigError("data.dir is empty: point it at a shard directory with an _info.json "
                          "(e.g. --set data.dir=/path/to/shards)")
    if cfg.ema.enabled and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("ema.enabled with deepspeed.zero_stage=3: the EMA copy needs the full weights on every "
                          "rank, which ZeRO-3 partitions; use zero_stage <= 2 or ema.enabled=false")


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size


def plan_batches(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """Resolve global batch = micro batch x grad accum x world size; fails with the arithmetic."""
    micro, accum, glob = cfg.data.batch_size, cfg.optim.grad_accum_steps, cfg.optim.global_batch_size
    if accum is not None and accum <= 0:
        raise ConfigError(f"optim.grad_accum_steps must be > 0, got {accum}")
    if glob is None:
        return BatchPlan(micro, accum or 1, world_size)
    if accum is None:
        per_update = micro * world_size
        if glob % per_update:
            raise ConfigError(
                f"optim.global_batch_size={glob} is not a multiple of data.batch_size x world size = "
                f"{micro} x {world_size} = {per_update}; global batch = micro batch x grad accum x world size")
        return BatchPlan(micro, glob // per_update, world_size)
    if micro * accum * world_size != glob:
        raise ConfigError(
            f"inconsistent batch sizes: data.batch_size x optim.grad_accum_steps x world size = "
            f"{micro} x {accum} x {world_size} = {micro * accum * world_size}, but optim.global_batch_size={glob}")
    return BatchPlan(micro, accum, world_size)


def scaled_lr(cfg: TrainConfig, global_batch_size: int) -> float:
    """The linear scaling rule: lr = base_lr x global batch / base batch, unless optim.lr is set."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.base_lr * global_batch_size / cfg.optim.base_batch_size


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("kwargs", "extra"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def trajectory_dict(cfg_dict: dict) -> dict:
    """The flattened config without the keys that may change on resume."""
    return {k: v for k, v in flatten(cfg_dict).items() if k not in RESUME_SAFE_KEYS}


def fingerprint(cfg: TrainConfig) -> str:
    blob = json.dumps(trajectory_dict(to_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_diff(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two config dicts (trajectory keys only)."""
    a, b = trajectory_dict(saved), trajectory_dict(current)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def write_config(cfg: TrainConfig, path: str) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
