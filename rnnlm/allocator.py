"""Keep freed memory in the process for the next step (glibc's allocator, Linux).

Every training step allocates and frees the same few tensors of about a megabyte (the step's
hidden states, their gradients, the logits). By default glibc gives such memory back to the
kernel when it is freed (unmapping blocks above its mmap threshold, trimming the top of the
heap) and takes fresh, zeroed pages for the next step: measured here, 50-110 page faults a step
in one process with the compiled recurrence (225-330 on the framework's operations). Raised
thresholds keep that memory in the heap for reuse: 0-17 faults a step, and the step 2-7% faster
in 7 of 8 alternating pairs of runs (300 steps each; 3.20-3.36 ms vs 3.26-3.47 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h); the mmap threshold's ceiling on 64-bit glibc is 32 MiB.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap
TRIM_THRESHOLD = 64 << 20  # free memory at the heap's top kept before returning it


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds. False where there is no ``mallopt`` (not
    glibc) or it refused a value (then the allocator keeps its default for that one)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    if not all(done):
        log.debug("mallopt refused a threshold; the allocator keeps its default for it")
    return all(done)
