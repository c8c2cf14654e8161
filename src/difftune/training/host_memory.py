"""How the process's C allocator treats the memory a CPU training step frees.

Every step allocates and frees the same few hundred megabytes of activations. glibc's malloc hands
large freed blocks back to the operating system (``munmap`` above its mmap threshold, heap
trimming above its trim threshold), so the next step takes them back one 4 KiB page fault at a
time, each page zeroed by the kernel: about 16,000 faults per step on the half-width SD 1.5
benchmark model (docs/performance.md). :func:`keep_freed_memory` raises both thresholds so freed
blocks stay in the process and are reused; the arithmetic is untouched.

:func:`return_freed_memory` does the opposite once, on purpose: after the VAE and text encoders
are dropped (both caches on), their memory goes back to the system before training starts.

Both are no-ops where the C library is not glibc (macOS, musl, Windows): they report ``False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

#: ``mallopt`` parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit systems.
MMAP_THRESHOLD = 32 * 2**20
#: ``mallopt`` takes a C int: the largest trim threshold it can be given (2 GiB).
TRIM_THRESHOLD = 2**31 - 1


@lru_cache(maxsize=1)
def _glibc():
    """The process's C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") and hasattr(libc, "gnu_get_libc_version")):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Keep blocks up to 32 MiB, and the heap's free top, in the process after they are freed."""
    libc = _glibc()
    if libc is None:
        return False
    # Fixing the mmap threshold also stops glibc's own adjustment of it.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def return_freed_memory() -> bool:
    """Give the free memory at the top and in the middle of the heap back to the system now."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
