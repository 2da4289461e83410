"""Allocator tuning for processes that churn megabyte-sized buffers (every frame is one).

By default glibc's malloc serves such buffers with mmap once they pass a dynamic
threshold, and gives freed heap memory back to the kernel; either way the next frame's
buffer is faulted in page by page again. In the streaming server that cost more CPU than
AES-GCM itself (hundreds of thousands of page faults per GiB, bench/stream.py). Raising
the mmap and trim thresholds keeps freed buffers in the heap for the next frame: memory
stays bounded by the process's peak, it is just not returned between frames.
"""

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest; above the largest frame (16 MiB)
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc as above; False (and nothing changed) on another C library."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not tuned:
        logger.warning("malloc tuning was refused; large buffers will be faulted in again")
    return tuned
