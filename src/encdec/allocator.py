"""Keep freed CPU memory in the process, so that big tensors are not page-faulted afresh every step.

glibc serves every allocation above 32 MB with its own mmap and unmaps it when it is freed. A
training step of the 270M-270M model allocates gigabytes of such tensors (chunks of logits, the
embedding-sized gradients, activations), and the kernel maps and zeroes each of their pages again
on first touch: 8-9 s of system time in a 17-18 s step on this project's 2-core machine
(`bench/train_throughput.py`, docs/benchmarks.md). Inference on CPU meets the same in its encoder
passes: joining 16 prompts (4,656 tokens) page-faulted 690,000-880,000 times (2.5-3.0 s of system
time) against 90,000 with freed memory kept, and took 15-30% longer (docs/benchmarks.md). Turning off
mmap for allocations and heap trimming makes glibc keep freed memory for the next step, as jemalloc
or tcmalloc would (PyTorch's CPU performance guide recommends those). Resident memory then stays at
the process's peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
KEEP = 2**31 - 1  # largest trim threshold mallopt takes (an int): free memory stays unless over 2 GB


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; whether it applied (False off Linux or without glibc).
    Process-wide and not undone: training processes call it once at the start, inference ones when they load
    a model to run on the CPU (`encdec.inference.loading`)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP) == 1
