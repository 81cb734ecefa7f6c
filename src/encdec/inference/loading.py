"""A checkpoint made ready to generate: device, dtype, weight quantization and CPU kernels, chosen once
for `encdec generate`, `encdec serve` and the benchmarks; and how it reads a prompt (its framing)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from encdec.allocator import keep_freed_memory
from encdec.checkpoint import load, read_metadata
from encdec.errors import EncdecError
from encdec.inference import onednn
from encdec.inference.quantize import QUANTIZATIONS, check_int8, quantize_int8
from encdec.model import EncoderDecoder
from encdec.objectives import PLAIN, Framing, trained_framing

log = logging.getLogger("encdec")


def compute_device() -> torch.device:
    """Where inference, evaluation and classification run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(path: Path | str, dtype: torch.dtype, quantize: str | None,
                       cpu_kernels: str = "onednn") -> EncoderDecoder:
    """A checkpoint (any format `encdec.load` reads) ready to generate: on the GPU when there is one, in
    `dtype`, with the requested weight quantization (None: as saved); on CPU without quantization, its
    products computed by `cpu_kernels` (onednn: weights packed once, `encdec.inference.onednn`; blas: PyTorch's
    default), and the process keeping the memory it frees (`encdec.allocator`)."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise EncdecError(f"unknown quantization {quantize!r}; accepted: {', '.join(QUANTIZATIONS)}")
    if cpu_kernels not in onednn.CPU_KERNELS:
        raise EncdecError(f"unknown CPU kernels {cpu_kernels!r}; accepted: {', '.join(onednn.CPU_KERNELS)}")
    if quantize is not None:  # before the weights are read; int8 runs on the CPU, whatever device there is
        check_int8(dtype, torch.device("cpu"))
    model = load(path, dtype)
    device = compute_device()
    if device.type == "cuda" and quantize is None:
        return model.to(device)
    keep_freed_memory()  # encoder passes allocate big temporaries: not page-faulted afresh each time
    if quantize is not None:
        if device.type == "cuda":  # as an ignored --cpu-kernels is said: a GPU left idle should not pass unseen
            log.warning("--quantize int8 runs on the CPU (dynamic int8 products are CPU kernels): the GPU is not "
                        "used; leave --quantize out to run on it (in bfloat16: --dtype bfloat16)")
        return quantize_int8(model)
    if cpu_kernels == "onednn":
        if not onednn.available():
            log.warning("this PyTorch build has no oneDNN packed linear operator: CPU products use PyTorch's BLAS")
        elif dtype == torch.bfloat16 and not onednn.bfloat16_products():
            log.warning("this CPU has no oneDNN bfloat16 products (they need AVX-512 or AVX-NE-CONVERT): bfloat16 "
                        "products use PyTorch's kernels, up to 9x slower than float32's on such a CPU (use --dtype "
                        "float32 for speed)")
        else:
            return onednn.pack_for_cpu(model)
    return model


def model_framing(path: Path | str, tokenizer) -> Framing:
    """How the checkpoint at `path` reads a prompt to continue (`encdec.objectives.trained_framing`): plain, or as
    its UL2 pretraining posed the task (a sentinel after the prompt and after the decoder's start), said once."""
    path = Path(path).expanduser()
    if not path.is_dir():  # read_metadata has nothing to say of a mistyped path: plain framing would pass unseen
        raise EncdecError(f"{path}: no such checkpoint directory")
    try:
        framing = trained_framing(read_metadata(path), tokenizer.get_vocab())
    except (ValueError, TypeError) as e:  # a mixture it does not know, a tokenizer without UL2's tokens
        raise EncdecError(f"{path}: cannot read prompts as its UL2 pretraining posed them: {e}") from None
    if framing != PLAIN:
        log.info("%s was pretrained with UL2 and not instruction-tuned since: prompts are read as its objective "
                 "posed them (token ids %s)", path, framing.describe())
    return framing
