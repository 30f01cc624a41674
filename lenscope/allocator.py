"""Memory that a lenscope command frees is kept for its next allocation instead of going back to the system.

glibc's ``malloc`` gives every block above 32 MB a mapping of its own, unmapped as soon as it is
freed, and returns freed heap memory to the system past a threshold. A loop whose tensors are
hundreds of MB (a batch's residual stream, the float64 products of a least-squares fit, a
method's logits over the vocabulary) then asks the kernel for fresh zeroed pages at every step:
the Patchscopes evaluation of the Pile sample took 8 million page faults and 15-40 s of system
time that way on a 2-core CPU (docs/results.md). A command (``lenscope …``, ``python train.py``,
``python evaluate.py``) therefore tells glibc to serve large blocks from its heap and to keep
what is freed (``mallopt``); the process's footprint stays at its peak instead of shrinking
between steps. Importing lenscope as a library changes nothing: a notebook's process is its own.

Settings already made through glibc's own environment variables (``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``) are left as they are,
and so is every C library other than glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""``mallopt`` parameters, from glibc's ``malloc.h``."""

GLIBC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process (see the module). Returns whether it
    did: False off glibc, or where the environment already sets glibc's allocator."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in GLIBC_SETTINGS):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Large blocks from the heap (0 mappings of their own), and no trimming of its free top (-1: never).
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
