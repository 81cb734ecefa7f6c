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

A tied float32 LM head also gets a low-precision copy that screens the vocabulary for greedy decoding
(ScreenedHead). At batch 1 a decoding step of the 270M spent about half its time reading the float32
head (262k x 640, 671 MB: 17.7 ms on the benchmark machine); a bfloat16 copy reads in 9.2 ms where
oneDNN computes bfloat16 (AVX-512 CPUs). An AVX2-only CPU has no such product, but PyTorch's float16 one
reads a lone row's head in 18-21 ms against 35-41 ms for the packed float32 head (two rows already cost
as much as the float32 head, so there the screen is for single rows). The screen keeps the float32
argmax: a bound b on |screened logit - float32 logit|, valid for every token of a row, follows from the
rounding of the hidden state and of the weights, so the argmax is among the tokens whose screened logit
is within 2b of the screened maximum; only those are scored in float32 (median 9, at most 216 over 96
measured bfloat16 steps at first; with the rounding term doubled to the margin its comment promised and the
threshold compared in bfloat16, median 4-6 and at most 36 over 512 rows of 256- and 1,024-token prompts:
docs/benchmarks.md, 2026-12-05).

For inference only: the packed layout cannot be trained, saved or indexed. The tied embedding table stays
as it is for lookups (and for scoring screened tokens); the head gets packed copies of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, partial

import torch
from torch import nn
from torch.nn import functional as F

from encdec.errors import EncdecError
from encdec.inference.sampling import row_argmax
from encdec.model import MLP, EncoderDecoder, soft_cap

CPU_KERNELS = ("onednn", "blas")
PACK_FOR_ROWS = 512  # oneDNN's hint of the rows per product; measured: any hint >= 8 ran 1 to 512 rows alike
# each of the model's activations (encdec.model.ACTIVATIONS) as oneDNN's post-operation: (name, algorithm)
FUSED_ACTIVATIONS = {"gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}
MAX_CANDIDATES = 4096  # beyond this many screened tokens the full float32 head is cheaper
# relative rounding of a screen's result (half an ulp is 2^-8 in bfloat16, 2^-11 in float16; twice that, to be safe)
ROUNDING = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
FP32_ROUNDING = 2.0**-24
NORM_CHUNK = 4096  # vocabulary rows per pass when measuring the head's norms (in float64: 2 copies and a difference)


def available() -> bool:
    """Whether this PyTorch build has oneDNN and its packed linear operator."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def bfloat16_products() -> bool:
    """Whether oneDNN computes bfloat16 products on this CPU (it needs AVX-512 or AVX-NE-CONVERT; on an AVX2-only
    CPU packing a bfloat16 weight fails)."""
    return available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
            activation: str = "none", algorithm: str = "") -> torch.Tensor:
    """x [rows, in] @ the packed weight's transpose (+ bias), through `activation` (a oneDNN post-operation)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, activation, [], algorithm)


def _linear_mul(x: torch.Tensor, other: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """(x @ the packed weight's transpose) * other, the multiplication done as the product writes its output."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, "mul")


# The same as operators of encdec's own, for torch.compile (`--compile`): it keeps each a call, as it is, and
# compiles the operations around them (inductor's lowering of oneDNN's operator refused packed weights). Eager
# steps call the functions above: an operator's dispatch costs about 10 us a call, 1.3 ms a step of the 270M.
compiled_linear = torch.library.custom_op("encdec::packed_linear", _linear, mutates_args=())
compiled_linear_mul = torch.library.custom_op("encdec::packed_linear_mul", _linear_mul, mutates_args=())
compiled_linear.register_fake(lambda x, packed, bias, out_features, activation="none", algorithm="":
                              x.new_empty(x.shape[0], out_features))
compiled_linear_mul.register_fake(lambda x, other, packed: other.new_empty(other.shape))


def _ops():
    """The packed products to call: the operators while torch.compile traces, else the plain functions."""
    return (compiled_linear, compiled_linear_mul) if torch.compiler.is_compiling() else (_linear, _linear_mul)


class PackedLinear(nn.Module):
    """x @ weight.T (+ bias) through oneDNN, on a copy of `weight` packed into oneDNN's layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_FOR_ROWS)
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        return _ops()[0](flat, self.packed, self.bias, self.out_features).view(*x.shape[:-1], self.out_features)

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
        linear, linear_mul = _ops()
        gate = linear(flat, self.gate_proj.packed, None, self.gate_proj.out_features, self.activation, self.algorithm)
        gated = linear_mul(flat, gate, self.up_proj.packed)
        return self.down_proj(gated).view(*x.shape[:-1], -1)


@cache
def screen_dtype() -> torch.dtype | None:
    """The dtype in which a float32 LM head's greedy tokens are screened here: bfloat16 where oneDNN computes it,
    else float16 where PyTorch's float16 product sums in float32 (the screen's bound assumes it; checked once, on
    a sum that float16 additions would round away), else none."""
    if bfloat16_products():
        return torch.bfloat16
    x = torch.zeros(1, 640, dtype=torch.float16)
    x[0, 0], x[0, 1:101] = 2048, 1  # 2048 + 1 is 2048 in float16
    return torch.float16 if F.linear(x, torch.ones(2, 640, dtype=torch.float16))[0, 0].item() == 2148 else None


def bfloat16_below(x: torch.Tensor) -> torch.Tensor:
    """`x` (float32) as the largest bfloat16 number no larger than it: rounded to bfloat16, and a step down where
    the rounding went up."""
    rounded = x.to(torch.bfloat16)
    lower = torch.nextafter(rounded, torch.full_like(rounded, float("-inf")))
    return torch.where(rounded.float() > x, lower, rounded)


class ScreenedHead(nn.Module):
    """x @ weight.T in float32 (packed), and `greedy`: its argmax through a bfloat16 or float16 screen (module
    docstring); a float16 screen reads single rows only, larger batches read the float32 head.

    `weight` (float32 [vocab, d]) is kept as it is for scoring the screened tokens: for a tied head it is
    the embedding table, which the model keeps for lookups anyway."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if dtype not in ROUNDING:
            raise EncdecError(f"a screen is bfloat16 or float16, got {dtype}")
        self.weight = weight.detach()
        self.full = PackedLinear(self.weight, None)
        self.dtype, self.rounding, self.smallest_normal = dtype, ROUNDING[dtype], torch.finfo(dtype).smallest_normal
        self.max_rows = None if dtype == torch.bfloat16 else 1
        low = self.weight.to(dtype)
        # oneDNN's bfloat16 product where this CPU has one; elsewhere PyTorch's (for bfloat16 slower than the float32
        # head: pack_for_cpu screens in bfloat16 only where oneDNN computes it), which gives the same candidates
        packed = dtype == torch.bfloat16 and bfloat16_products()
        self.screen = PackedLinear(low, None) if packed else partial(F.linear, weight=low)
        self.max_norm, self.max_error = 0.0, 0.0  # the largest row norm of the screen's weight, and of its rounding
        # in chunks (whole-table temporaries would be 6 x its size), in float64: squares of entries under 1e-19 are
        # subnormal or 0 in float32, and the bound lost its terms (a wrong argmax for tiny weights or hidden states)
        direction = torch.randn(self.weight.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        keys = []  # each row's product with one direction, summed in one order: equal rows, equal keys
        for start in range(0, len(low), NORM_CHUNK):
            rows, exact = low[start: start + NORM_CHUNK].double(), self.weight[start: start + NORM_CHUNK].double()
            self.max_norm = max(self.max_norm, float(rows.norm(dim=-1).max()))
            self.max_error = max(self.max_error, float((exact - rows).norm(dim=-1).max()))
            keys.append((exact * direction).sum(-1))
        self.first_equal = _first_equal_rows(self.weight, torch.cat(keys))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.full(x)

    def candidates(self, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
        """[n, vocab] booleans: the tokens of each row whose screened logit is within twice the error bound
        of that row's screened maximum, among which its float32 argmax is (none for a row whose logits are not
        finite)."""
        capped, threshold = self._screened(hidden, softcap)
        return capped >= threshold[:, None]

    def _screened(self, hidden: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The screened logits [n, vocab] (soft-capped as the model does) and each row's threshold [n]: the tokens
        at or above it are the candidates. NaN where the bound is undefined (logits that are not finite)."""
        low = hidden.to(self.dtype)
        approx = self.screen(low)  # [n, vocab] in the screen's dtype
        top = approx.amax(-1).float()
        largest = torch.maximum(top, -approx.amin(-1).float())
        # |approx - exact| <= |h - h_low| |w_low| + |h| |w - w_low| + the product's own rounding (an overflow makes
        # the bound infinite or NaN: then every token, or none, is a candidate, and the full head decides); results
        # below the dtype's smallest normal number are rounded by a fixed step, not a relative one
        exact, rounded = hidden.double(), low.double()  # (norms in float64, as the table's above)
        bound = ((exact - rounded).norm(dim=-1) * self.max_norm + exact.norm(dim=-1) * self.max_error
                 + largest.double().clamp_min(self.smallest_normal) * self.rounding
                 + hidden.shape[-1] * FP32_ROUNDING * rounded.norm(dim=-1) * self.max_norm).float()
        if softcap is not None:  # the cap moves no two logits further apart, so the bound holds after it
            approx = soft_cap(approx.float(), softcap)
            top = approx.amax(-1)
        threshold = top - 2 * bound
        if approx.dtype == torch.bfloat16:  # compared in bfloat16, not on a float32 copy of the logits
            threshold = bfloat16_below(threshold)
        return approx, threshold

    def greedy(self, hidden: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, list[int]]:
        """The argmax token of each row of the logits of `hidden` [n, d] (float32), soft-capped as the model
        does, and the rows whose largest logit is not finite (a NaN counts as the largest): their tokens mean nothing.
        The screened tokens are scored by another float32 product than the full head's, so at ties
        within float32 rounding the two may pick differently, as any two float32 kernels may; of equal head rows
        (an exact tie), the first is taken (`_first_equal_rows`)."""
        chosen, broken = self._greedy(hidden, softcap)
        return chosen if self.first_equal is None else self.first_equal[chosen], broken

    def _greedy(self, hidden: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, list[int]]:
        if self.max_rows is not None and len(hidden) > self.max_rows:
            return _argmax_checked(soft_cap(self.full(hidden), softcap))
        capped, threshold = self._screened(hidden, softcap)
        candidates = capped >= threshold[:, None]
        columns = candidates.any(0).nonzero()[:, 0]
        # a row without candidates (a NaN threshold) has logits that are not finite: the full head gives its argmax
        if not 0 < len(columns) <= MAX_CANDIDATES or bool(threshold.isnan().any()):
            return _argmax_checked(soft_cap(self.full(hidden), softcap))
        exact = soft_cap(hidden @ self.weight[columns].T, softcap)
        return columns[exact.masked_fill(~candidates[:, columns], float("-inf")).argmax(-1)], []


def _first_equal_rows(weight: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """Each row's index -> the first row equal to it, or None where no two rows are equal (`keys`: one number per
    row, equal for equal rows). Equal rows (a grown vocabulary's mean-initialised ones) tie exactly, and a
    matrix-vector product, whose sum order hangs on a column's place, scored them an ulp apart: the later token
    won at one row where a batch took the first. The greedy choice is the first of them, as argmax takes it."""
    order = torch.argsort(keys, stable=True)
    same = (keys[order[1:]] == keys[order[:-1]]).nonzero()[:, 0].tolist()
    if not same:
        return None
    first = torch.arange(len(weight))
    for i in same:  # runs of equal keys: the rows are compared, and each mapped to the first of its equals
        a, b = int(order[i]), int(order[i + 1])
        lead = int(first[a])
        if torch.equal(weight[lead], weight[b]):
            first[b] = min(lead, int(first[b]))
    return first if bool((first != torch.arange(len(weight))).any()) else None


def _argmax_checked(logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(`row_argmax(logits)`, the rows whose chosen logit is not finite)."""
    chosen = row_argmax(logits)
    finite = torch.isfinite(logits.gather(1, chosen[:, None])[:, 0]).tolist()
    return chosen, [row for row, ok in enumerate(finite) if not ok]


def _pack_layers(module: nn.Module, kept: list[tuple[nn.Module, str, nn.Module]] | None = None) -> None:
    """Replace every feed-forward (PackedMLP) and every other nn.Linear (PackedLinear) under `module`; with
    `kept`, add (owner, name, original) of each to it as it is replaced (so that a failure partway, out of memory
    say, leaves what to put back).

    By name, one layer at a time, holding no reference to a replaced layer unless kept, so that each one's float
    weight is freed as its packed copy arrives (checkpoints are read into memory of their own, not mapped:
    `encdec.files.read_weights`)."""
    names: list[str] = []
    for name, child in module.named_modules():  # parents come before their children
        inside = any(name.startswith(f"{outer}.") for outer in names)
        if name and not inside and isinstance(child, (MLP, nn.Linear)):
            names.append(name)
    for name in names:
        parent, _, attribute = name.rpartition(".")
        owner = module.get_submodule(parent)
        layer = getattr(owner, attribute)
        setattr(owner, attribute, PackedMLP(layer) if isinstance(layer, MLP) else PackedLinear(layer.weight, layer.bias))
        if kept is not None:
            kept.append((owner, attribute, layer))
        del layer


def packable(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether weights of this dtype on this device can be packed here: float32 on CPU, and bfloat16 where
    oneDNN computes it."""
    return torch.device(device).type == "cpu" and (dtype == torch.float32
                                                   or dtype == torch.bfloat16 and bfloat16_products())


def pack_for_cpu(model: EncoderDecoder) -> EncoderDecoder:
    """Replace, in place, every linear layer of `model` (on CPU, float32 or bfloat16) by a PackedLinear,
    every feed-forward by a PackedMLP, and give it a packed LM head (a tied float32 one screened for greedy
    tokens: `screen_dtype`)."""
    if not available():
        raise EncdecError("this PyTorch build has no oneDNN packed linear operator; use --cpu-kernels blas")
    weight = model.embed.weight
    if not packable(weight.dtype, weight.device):
        raise EncdecError(f"oneDNN-packed weights are for CPU inference in float32, or in bfloat16 on CPUs with "
                          f"AVX-512 or AVX-NE-CONVERT; got {weight.dtype} on {weight.device}"
                          f"{'' if weight.dtype != torch.bfloat16 else ' (this CPU has no oneDNN bfloat16 products)'}")
    if model.lm_head is None:  # tied: the embedding table stays for lookups, the head reads packed copies
        screen = screen_dtype() if weight.dtype == torch.float32 else None
        model.lm_head = ScreenedHead(weight, screen) if screen else PackedLinear(weight, None)
    _pack_layers(model)
    return model


@contextmanager
def packed_while_inferring(module: nn.Module) -> Iterator[nn.Module]:
    """`module` with its linear layers packed inside the block and as it was after it: for inference passes
    over a model that is trained or saved around them (classification's predictions and probe features).
    Where packing does not apply (another device or dtype, no oneDNN) the module is used as it is."""
    weight = next((m.weight for m in module.modules() if isinstance(m, nn.Linear)), None)
    if weight is None or not available() or not packable(weight.dtype, weight.device):
        yield module
        return
    kept: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        _pack_layers(module, kept)
        yield module
    finally:
        for owner, attribute, linear in kept:
            setattr(owner, attribute, linear)
