"""oneDNN-packed weights for CPU inference: every projection and the LM head computed by oneDNN's matrix
products on weights reordered once into its blocked layout, instead of PyTorch's default BLAS calls, and
the feed-forward's activation and gating multiplication done by those products as they write their output.

Why: on the benchmark machine (AMD EPYC with AVX-512, 2 threads) PyTorch's float32 products (MKL) ran the
encoder's shapes at 180-190 GFLOP/s and read the 262k x 640 LM head for one decoding row in 43 ms;
oneDNN on packed weights ran the same products at 400-440 GFLOP/s and the head in 9-17 ms
(docs/benchmarks.md, "oneDNN-packed weights"). The results agree with BLAS's to float32 rounding
(summation order differs), so greedy tokens can differ from an unpacked run only at near-ties. Fusing the
activation into the gate product and the gating into the up product saved a fifth of the feed-forward's
time on 8 x 1024 encoder tokens (two passes over 8192 x 2048 activations less).

For inference only: the packed layout cannot be trained, saved or indexed. The tied embedding table stays
as it is for lookups and the head gets a packed copy of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from encdec.errors import EncdecError
from encdec.model import MLP, EncoderDecoder

CPU_KERNELS = ("onednn", "blas")
PACK_FOR_ROWS = 512  # oneDNN's hint of the rows per product; measured: any hint >= 8 ran 1 to 512 rows alike
# the model's activations as oneDNN's post-operations: (name, algorithm)
FUSED_ACTIVATIONS = {"gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}


def available() -> bool:
    """Whether this PyTorch build has oneDNN and its packed linear operator."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """x @ weight.T (+ bias) through oneDNN, on a copy of `weight` packed into oneDNN's layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_FOR_ROWS)
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedMLP(nn.Module):
    """The gated feed-forward on packed weights: the activation applied by the gate product and the
    multiplication by the up product's output done by that product (oneDNN post-operations)."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.gate_proj = PackedLinear(mlp.gate_proj.weight, None)
        self.up_proj = PackedLinear(mlp.up_proj.weight, None)
        self.down_proj = PackedLinear(mlp.down_proj.weight, None)
        self.activation, self.algorithm = FUSED_ACTIVATIONS[mlp.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.gate_proj.in_features).contiguous()
        gate = torch.ops.mkldnn._linear_pointwise(flat, self.gate_proj.packed, None, self.activation, [], self.algorithm)
        gated = torch.ops.mkldnn._linear_pointwise.binary(flat, gate, self.up_proj.packed, None, "mul")
        return self.down_proj(gated).view(*x.shape[:-1], -1)


def _packed(layer: nn.Module) -> nn.Module | None:
    """The packed replacement of a layer, or None for one that is not replaced."""
    if isinstance(layer, MLP) and layer.activation in FUSED_ACTIVATIONS and layer.gate_proj.bias is None:
        return PackedMLP(layer)
    if isinstance(layer, nn.Linear):
        return PackedLinear(layer.weight, layer.bias)
    return None


def _pack_linears(module: nn.Module, keep: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every feed-forward and every other nn.Linear under `module` by its packed form; with `keep`,
    return (owner, name, original) of each.

    By name, one layer at a time, holding no reference to a replaced layer unless kept, so that each one's float
    weight can be freed as its packed copy arrives (pages of a memory-mapped checkpoint stay mapped while any
    tensor of it lives: docs/benchmarks.md notes the resident memory this leaves)."""
    kept = []
    names: list[str] = []
    for name, child in module.named_modules():  # parents come before their children
        inside = any(name.startswith(f"{outer}.") for outer in names)
        if name and not inside and isinstance(child, (MLP, nn.Linear)):
            names.append(name)
    for name in names:
        parent, _, attribute = name.rpartition(".")
        owner = module.get_submodule(parent)
        layer = getattr(owner, attribute)
        replacement = _packed(layer)
        if replacement is None:  # a feed-forward whose activation oneDNN cannot apply: its linear layers
            kept += _pack_linears(layer, keep)
            continue
        setattr(owner, attribute, replacement)
        if keep:
            kept.append((owner, attribute, layer))
        del layer
    return kept


def _packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)


def pack_for_cpu(model: EncoderDecoder) -> EncoderDecoder:
    """Replace, in place, every linear layer of `model` (on CPU, float32 or bfloat16) by a PackedLinear,
    and give it a packed LM head."""
    if not _packable(model.embed.weight):
        raise EncdecError("oneDNN-packed weights are for CPU inference in float32 or bfloat16")
    if not available():
        raise EncdecError("this PyTorch build has no oneDNN packed linear operator; use --cpu-kernels blas")
    _pack_linears(model, keep=False)
    if model.lm_head is None:  # tied: the embedding table stays for lookups, the head reads a packed copy
        model.lm_head = PackedLinear(model.embed.weight, None)
    return model


@contextmanager
def packed_while_inferring(module: nn.Module) -> Iterator[nn.Module]:
    """`module` with its linear layers packed inside the block and as it was after it: for inference passes
    over a model that is trained or saved around them (classification's predictions and probe features).
    Where packing does not apply (another device or dtype, no oneDNN) the module is used as it is."""
    weight = next((m.weight for m in module.modules() if isinstance(m, nn.Linear)), None)
    if weight is None or not _packable(weight) or not available():
        yield module
        return
    kept = _pack_linears(module, keep=True)
    try:
        yield module
    finally:
        for owner, attribute, linear in kept:
            setattr(owner, attribute, linear)
