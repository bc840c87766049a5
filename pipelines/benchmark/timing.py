"""Timing shared by the benchmark commands: warm-up, synchronized steps, and variants interleaved in rounds so
that ratios are measured side by side (a slow moment of the machine hits every variant alike)."""
from __future__ import annotations

import platform
import statistics
import time
import weakref
from collections.abc import Callable

import torch
from deepspeed.accelerator import get_accelerator
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def accelerated(device: torch.device) -> bool:
    """Whether ``device`` is the machine's accelerator (a GPU, XPU, ...), which runs asynchronously and keeps
    allocator statistics; the CPU does neither."""
    return device.type != "cpu" and device.type == get_accelerator().device_name()


def synchronize(device: torch.device) -> None:
    if accelerated(device):
        get_accelerator().synchronize(device.index)


def interleaved(fns: dict[str, Callable[[], object]], *, device: torch.device, warmup: int = 3, iters: int = 10,
                rounds: int = 3) -> dict[str, float]:
    """Median seconds per call of every function, measured in ``rounds`` interleaved rounds of ``iters`` calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(s) for name, s in samples.items()}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of CPU tensor storage made while the mode is active and still alive (``live``), and their
    peak (``peak``): the CPU's stand-in for an accelerator's allocator statistics, exact to the byte for tensors.
    Storage that existed before (weights, inputs) is not counted, views and in-place results count once, and
    memory a library takes without a tensor (oneDNN's scratch pads) is not seen. Every op goes through Python
    while it is active: measure in a call of its own, never a timed one."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._sizes:
                continue
            self._sizes[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)
        return out


# Operations that make an empty tensor: no kernel runs (the allocator's work only).
_NO_KERNEL = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"})


class OpCount(TorchDispatchMode):
    """Counts the operations that compute while the mode is active (``count``): every ATen operation that reaches a
    kernel, leaving out views and empty allocations. On a GPU that is about one kernel launch each, a host-side cost
    a step pays whatever the batch (what CUDA graphs and ``torch.compile`` take away). Measure in a call of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name.split("::")[-1] not in _NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    """How many computing operations one call of ``fn`` runs (``OpCount``)."""
    with OpCount() as ops:
        fn()
    return ops.count


def peak_memory_gib(fn: Callable[[], object], device: torch.device, resident_bytes: int) -> float | None:
    """GiB a call of ``fn`` needs: ``resident_bytes`` (its model's own tensors) plus the peak it allocates above what
    was allocated before it, so models resident side by side do not count each other. From the allocator's
    statistics on an accelerator, from the tensors ``fn`` makes on the CPU (``LiveBytes``, in an extra call); None
    on other devices."""
    if device.type == "cpu":
        with LiveBytes() as live:
            fn()
        return (resident_bytes + live.peak) / 2**30
    if not accelerated(device):
        return None
    accelerator = get_accelerator()
    synchronize(device)
    before = accelerator.memory_allocated(device.index)
    accelerator.reset_peak_memory_stats(device.index)
    fn()
    synchronize(device)
    return (resident_bytes + accelerator.max_memory_allocated(device.index) - before) / 2**30


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def device_name(device: torch.device) -> str:
    """What ran the benchmark, in a word or two: the GPU's name, or 'CPU'."""
    # DeepSpeed's accelerator does not name its device; torch's module for the device type does.
    return torch.get_device_module(device.type).get_device_name(device) if accelerated(device) else "CPU"


def machine_description(device: torch.device) -> str:
    if accelerated(device):
        return f"{device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def memory_bandwidth_gbs(clock_khz: float, bus_bits: int) -> float:
    """Peak memory bandwidth in GB/s of a memory clocked at ``clock_khz`` on a ``bus_bits`` wide bus, two transfers
    a clock (an H100 SXM: 2,619 MHz x 5,120 bits -> 3,352 GB/s)."""
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """The accelerator's peak memory bandwidth in GB/s, from the memory clock and bus width its driver reports; None
    on the CPU, or where the device does not report them."""
    if not accelerated(device):
        return None
    props = torch.get_device_module(device.type).get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return memory_bandwidth_gbs(clock_khz, bus_bits) if clock_khz and bus_bits else None
