"""Choosing the autocast dtype: bfloat16 only where it is actually faster.

On CUDA bfloat16 always pays. On CPUs it depends on the instruction set: with AVX512-BF16 / AMX
bfloat16 products run several times faster than float32, without them they can be 100x slower
(measured on an AVX2-only AMD EPYC: 0.3 vs 150 GFLOP/s). So "auto" times both once.
"""

from __future__ import annotations

import time

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def _seconds(dtype: torch.dtype) -> float:
    a, b = torch.randn(256, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return time.perf_counter() - start


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 or None (plain float32) for "bf16", "fp32" or "auto"."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _seconds(torch.bfloat16) < 0.8 * _seconds(torch.float32) else None
