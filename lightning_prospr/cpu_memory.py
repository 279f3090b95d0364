"""Give the memory that scoring freed on the CPU back to the operating system.

Scoring allocates and frees a few GB of activation-sized tensors (the unrolled steps' graphs).
glibc's ``malloc`` keeps freed blocks of that size in its heap instead of unmapping them (its
``mmap`` threshold grows to the largest block freed, up to 32 MiB), so after full-mode scoring of a
ResNet-20 at batch 128 the process stays about 1.4 GiB larger for the rest of training, although
training reuses only a fraction of it. ``malloc_trim(0)`` returns those free pages; it takes tens of
milliseconds and changes nothing but the resident size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

__all__ = ["release_freed_memory"]


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` on other C libraries and platforms."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc only; elsewhere a no-op).

    Returns:
        ``True`` if glibc's ``malloc_trim`` was called, ``False`` where there is none (another C
        library or platform). With tcmalloc or jemalloc preloaded the call finds glibc's heap unused
        and changes nothing: those allocators return freed memory themselves.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
