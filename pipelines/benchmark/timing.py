"""Timing shared by the benchmark commands: warm-up, synchronized steps, and variants interleaved in rounds so
that ratios are measured side by side (a slow moment of the machine hits every variant alike)."""
from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from deepspeed.accelerator import get_accelerator


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


def peak_memory_gib(fn: Callable[[], object], device: torch.device, resident_bytes: int) -> float | None:
    """GiB a call of ``fn`` needs on an accelerator: ``resident_bytes`` (its model's own tensors) plus the peak it
    allocates above what was allocated before it, so models resident side by side do not count each other.
    None on other devices (no allocator statistics)."""
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
