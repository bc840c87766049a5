"""Process settings for ranks that compute on the CPU.

glibc's malloc returns large freed blocks to the kernel (its mmap threshold starts at 128 KiB and follows freed
blocks up to 32 MiB; the heap top is trimmed past twice that). A training step frees and allocates the same large
temporaries every step, so each step page-faults them in again. MRConv's training form suffers most (its FFT
buffers): measured on the 2-core development machine (one MRConv at MRConvNeXt-atto's first stage, 64 px, batch
16, 1 thread, `ru_minflt`), 3,600-8,000 page faults per training step by default, 0-220 with freed memory kept;
a whole MRConvNeXt-atto step 208-227 ms -> 185-188 ms (ConvNeXt-atto: no faults either way, 115-134 ms). Since the
FFT path works one branch at a time (smaller temporaries), the same layer: 0-2,200 faults a step by default, 0-960 kept.
``retain_freed_memory`` keeps it, as PyTorch's CUDA caching allocator does on GPUs: the process stays near its
peak resident size. GPU ranks do not call it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 256 * 2**20  # blocks above this still come from (and go back to) the kernel
TRIM_THRESHOLD = 2**30  # free memory kept at the heap top before it is trimmed


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring). False, and nothing changed, where
    the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
