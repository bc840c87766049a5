"""Timing shared by the benchmark commands: warm-up, synchronized steps, and variants interleaved in rounds so
that ratios are measured side by side (a slow moment of the machine hits every variant alike)."""
from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """GiB a call of ``fn`` needs on a CUDA device: ``resident_bytes`` (its model's own tensors) plus the peak it
    allocates above what was allocated before it, so models resident side by side do not count each other.
    None on other devices (no allocator statistics)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (resident_bytes + torch.cuda.max_memory_allocated(device) - before) / 2**30


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def device_name(device: torch.device) -> str:
    """What ran the benchmark, in a word or two: the GPU's name, or 'CPU'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")
