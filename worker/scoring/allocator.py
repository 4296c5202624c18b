"""Keep freed memory in the process instead of handing it back to the kernel after every film.

Decoding a 2048 px film allocates a few buffers of 4-16 MB (the file's bytes, pydicom's copy of
the pixel data, Pillow's image, numpy's arrays) and frees them before the next film. glibc's
default adapts its mmap threshold upwards and then trims the top of the heap whenever more than
twice that is free, so each film's buffers are faulted in afresh, page by page: on the benchmark's
VM that was 20-30 % of the decode CPU (uncompressed DICOM 37-39 -> 22-24 ms, PNG 65-68 -> 49-55 ms per film,
bench/RESULTS.md). Fixing both thresholds keeps those pages mapped; a process then stays at the
high-water mark of its heap (a few MiB more per decode process in the benchmarks).

Only glibc has ``mallopt``; elsewhere, or when the operator tunes malloc through the environment
(``GLIBC_TUNABLES=glibc.malloc.*``, ``MALLOC_*_``), nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

#: Allocations above this are mmapped (and returned on free): films' buffers stay below it.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's ceiling for the dynamic threshold on 64-bit
#: The heap's free top is returned to the kernel only above this.
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3


def operator_tuned() -> bool:
    """True when the environment already tunes glibc's malloc: the operator's choice wins."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return "glibc.malloc." in tunables or any(
        name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
    )


def retain_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True if they were set."""
    if operator_tuned():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
