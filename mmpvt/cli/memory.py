"""Keeping freed memory in the process on CPU runs (glibc's allocator)."""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap above this is handed back to the system (int max).
_TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it
    when freed, so each of a training step's large activations and gradients is faulted in
    page by page again, every step: on a 2-core VM that was a third of a PVTv2-b2 training
    step at 2x3x512x512 (docs/benchmarks.md). With ``mmap`` off for allocations and trimming
    only above 2 GiB of free heap, the memory freed by one step serves the next once the heap
    has reached its high-water mark. That takes a few steps, not one: PyTorch's aligned
    allocations leave a small remainder beside each block, glibc's thread cache holds it, and
    a freed block merges into the top of the heap only once that cache's bin is full (seven
    chunks), so the first rounds of a size still take fresh memory. The process keeps its
    peak footprint, as PyTorch's CUDA caching allocator does on a GPU.

    Returns whether the setting took (False off glibc, or when ``MMPVT_KEEP_FREED_MEMORY=0``).
    """
    if os.environ.get('MMPVT_KEEP_FREED_MEMORY', '1') == '0' or platform.libc_ver()[0] != 'glibc':
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
