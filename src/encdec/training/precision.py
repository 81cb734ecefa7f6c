"""Choosing the autocast dtype: bfloat16 only where it is actually faster.

On CUDA bfloat16 pays where the GPU computes it natively (compute capability 8.0 and up; older ones emulate
it). On CPUs it depends on the instruction set: with AVX512-BF16 / AMX bfloat16 products run several times
faster than float32, without them they can be 100x slower (measured on an AVX2-only AMD EPYC: 0.3 vs 150
GFLOP/s). So "auto" asks the CPU for those instructions: a verdict that timing would give too, but one that a
busy machine cannot flip from one launch to the next (a classification search's journal is keyed on it).
Only where this PyTorch cannot say are the two timed.
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


def _bf16_instructions() -> bool | None:
    """Whether this CPU has bfloat16 product instructions (AVX512-BF16 or AMX); None where PyTorch cannot say."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return None if None in probes else any(probe() for probe in probes)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 or None (plain float32) for "bf16", "fp32" or "auto"."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    native = _bf16_instructions()
    if native is None:
        native = _seconds(torch.bfloat16) < 0.8 * _seconds(torch.float32)
    return torch.bfloat16 if native else None
