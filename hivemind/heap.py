"""Handing the allocator's free memory back to the kernel once the daemon goes idle.

glibc keeps freed heap pages resident (for the next malloc) unless they sit at the top of the
heap; start-up, registration and every task leave such holes behind, and an idle worker would
carry them for the rest of its life. malloc_trim(0) returns them (MADV_DONTNEED on the free
pages, wherever they are). On a libc without it (musl) this does nothing.
"""

from __future__ import annotations

import ctypes


def release_free_heap() -> bool:
    """True when the allocator returned memory to the kernel."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
