"""int8 weights for CPU inference: PyTorch's dynamic int8 linear layers (weights in int8 with one scale per
output channel, activations quantized per tensor on the fly), on every projection and on the LM head.

Per-channel weight scales, because Gemma's weights have outlier rows: on the adapted 270M, one scale per
tensor raised the held-out suffix NLL (untrained adapted model, all layers but the LM head) by 2.4 nats,
one per channel by 0.9.

The activations' scale is one per product, shared by every row computed in it: a row's results (and greedy
tokens) depend on the rows batched with it, unlike float32's and bfloat16's.

Chosen over torchao's int8 weight-only layout because, measured on this 2-core CPU (a 640 -> 2048 -> 640
MLP at batch 8, eager mode), dynamic int8 ran 5x faster than float32 while torchao's ran 3x slower.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from encdec.errors import EncdecError
from encdec.model import EncoderDecoder

QUANTIZATIONS = ("int8",)


def check_int8(dtype: torch.dtype, device: torch.device) -> None:
    if device.type != "cpu" or dtype != torch.float32:
        raise EncdecError("--quantize int8 runs on CPU in float32 (dynamic int8 kernels); use --dtype float32 on CPU")


def quantize_int8(model: EncoderDecoder) -> EncoderDecoder:
    """Replace the model's linear layers, in place, by dynamic int8 ones, and give it an int8 LM head
    (the tied embedding table stays float for lookups). For inference only: it cannot be trained or saved."""
    check_int8(model.embed.weight.dtype, model.device)
    if model.config.tied_head:
        # built on the meta device: a full-size weight drawn at random only to be replaced (671 MB for the 270M)
        head = nn.Linear(model.embed.embedding_dim, model.embed.num_embeddings, bias=False, device="meta")
        head.weight = model.embed.weight
        model.lm_head = head
    return quantize_layers(model)


def quantize_layers(module: nn.Module) -> nn.Module:
    """Every nn.Linear under `module` replaced, in place, by PyTorch's dynamic int8 linear layer (one weight scale
    per output channel). bench/cpu_kernels.py times these layers' products."""
    for child in module.modules():  # PyTorch's int8 conversion takes exactly nn.Linear, not its subclasses
        if isinstance(child, nn.Linear):
            child.__class__ = nn.Linear
    with warnings.catch_warnings():  # torch marks its eager quantization API deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    return module
