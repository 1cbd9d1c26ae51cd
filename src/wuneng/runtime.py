"""Process-level settings for running on the CPU.

:func:`tune_cpu_allocator` keeps freed memory inside the process. PyTorch allocates CPU tensors with the C
library's ``malloc``; glibc's malloc returns large freed blocks to the kernel (blocks above a dynamic
``mmap`` threshold of at most 32 MiB are unmapped when freed, and the top of the heap is trimmed), so the
next allocation of the same size is backed by fresh pages, and every page costs a page fault when first
written. A training step frees its activations after the backward and allocates them again in the next
forward, so with glibc's defaults a CPU training step spends seconds of system time in page faults, and
almost none once the memory is kept (measurements: benchmarks/README.md, ``benchmarks/hybrid.py``).
This is the job that jemalloc or tcmalloc do when preloaded (PyTorch's CPU performance guide recommends
them); ``mallopt`` gets the same effect without a preload, from inside the process:

- ``M_MMAP_MAX = 0``: large blocks come from the heap, never from a fresh ``mmap``;
- ``M_TRIM_THRESHOLD`` = 2 GiB - 1: freed memory at the top of the heap stays mapped;
- ``M_TOP_PAD`` = 64 MiB: the heap grows in large steps.

Not covered: tensors of tens of MiB (PyTorch asks for 64-byte aligned blocks, and glibc still grows the
heap around such requests), which the teacher and WuNeng allocate alike (MLP activations, logits). The cost: the process keeps its peak heap size
until it exits (the memory is reused, not returned).
It changes the whole process, so it is applied by programs that own the process (``wuneng train``,
``wuneng demo``, the benchmarks), never at import. On C libraries other than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_TOP_PAD = 64 << 20

_applied = False


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc loaded through ctypes, or None when this process does not run on glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it (musl does not)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (see the module docstring). Idempotent.

    Returns True when the settings are in effect (glibc), False where there is nothing to tune (another
    C library or operating system)."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD))
    _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _applied


def cpu_allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` has taken effect in this process."""
    return _applied
