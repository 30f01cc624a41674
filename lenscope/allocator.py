"""A CPU evaluation command keeps the memory it frees for its next allocation.

glibc's ``malloc`` gives every block above 32 MB a mapping of its own, unmapped as soon as it is
freed, and returns freed heap memory to the system past a threshold. A loop whose tensors are
hundreds of MB (a batch's residual stream, the float64 products of a least-squares fit, a
method's logits over the vocabulary) then asks the kernel for fresh zeroed pages at every step:
the Patchscopes evaluation of the Pile sample took 8 million page faults and 15 s of kernel time
that way on a 2-core CPU (the code before issue 13's part 3: 30 million and ~80 s;
docs/results.md). So ``lenscope evaluate`` (and ``python evaluate.py``), when it runs on the CPU,
tells glibc to serve large blocks from its heap and to keep what is freed (``mallopt``): the
process's memory then stays at its peak instead of shrinking between steps.

Only a command's own process does this (its entry point calls :func:`command_started`), and only
on the CPU: on a GPU the CPU copy of the model the loader made would stay resident. Importing
lenscope, or calling a command's ``main`` from Python, changes nothing. ``LENSCOPE_KEEP_FREED_MEMORY=0``
turns it off; glibc's own malloc settings in the environment (``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``glibc.malloc.*`` in ``GLIBC_TUNABLES``)
are left as they are, and so is every C library other than glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""``mallopt`` parameters, from glibc's ``malloc.h``."""

GLIBC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")

_in_command = False


def command_started() -> None:
    """Mark this process as a lenscope command's own (the ``lenscope`` script, ``python -m
    lenscope``, ``python train.py``, ``python evaluate.py`` call it before anything else)."""
    global _in_command
    _in_command = True


def keep_freed_memory(device_type: str) -> bool:
    """In a command's process running on ``device_type`` "cpu", make glibc keep freed memory for
    reuse (see the module). Returns whether it did."""
    if not _in_command or device_type != "cpu" or os.environ.get("LENSCOPE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in GLIBC_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Large blocks from the heap (0 mappings of their own), and no trimming of its free top (-1: never).
    kept = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
    log.debug("freed memory kept for reuse: %s", kept)
    return kept
