"""Which CPU kernel should a decoding step's products use on this host? PyTorch's default (MKL's sgemm /
sgemv behind F.linear) against oneDNN on packed weights (`encdec.inference.onednn.PackedLinear`, what
`encdec generate` and `encdec serve` use), on the projections of a model's decoder, at the row counts
of decoding (1 row per live request).

A decoding step reads every weight once and the weights do not fit in the caches, so each timing cycles
through --copies copies of the weight (more bytes than the last-level cache) and reports the bytes read
per second: the kernels are compared as the step meets them, not on a cached matrix. Float32, the
host's threads. It also checks what continuous batching needs: that a row's result does not depend on
the rows it is computed with (row 0 of a --rows-max-row product equals the one-row product, bit for bit).

With --int8 it also times the two int8 products `--quantize int8` could use, on weights in int8 with one
scale per output channel: PyTorch's dynamic int8 linear layers (`encdec.inference.quantize`, fbgemm), which
quantize a product's activations with one scale for all its rows, so that a row's result depends on its
batch, and an int8 product with one activation scale per row (`torch._int_mm`), whose rows are their own.

The table gives, per projection shape and row count, microseconds per product and GB/s for each
kernel; the last lines give the invariance checks and the geometric mean over shapes of MKL's time /
oneDNN's time per row count (> 1: oneDNN faster), with --int8 then of the per-row int8 product's time /
the dynamic int8 layer's (> 1: per-row scales cost that much).

    python bench/cpu_kernels.py                          # the shapes of the packaged 270M's decoder
    python bench/cpu_kernels.py --hidden 2304 --intermediate 9216 --heads 8 --kv-heads 4 --head-dim 256
    python bench/cpu_kernels.py --int8
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from common import int_list, require_distinct, run_main
from torch import nn

from encdec.inference.onednn import PackedLinear


def dynamic_int8(weight: torch.Tensor) -> nn.Module:
    """The weight as `--quantize int8` makes it: PyTorch's dynamic int8 linear layer, one scale per output channel."""
    from encdec.inference.quantize import quantize_layers

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return quantize_layers(nn.Sequential(layer))


class RowScaledInt8:
    """x @ weight.T in int8 with one scale per weight row and one per activation row (torch._int_mm)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.scale = weight.abs().amax(1).clamp_min(1e-12) / 127
        self.transposed = torch.round(weight / self.scale[:, None]).to(torch.int8).t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        return torch._int_mm(torch.round(x / scale).to(torch.int8), self.transposed) * scale * self.scale


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of a decoder layer (Gemma-style: gated feed-forward)."""
    d = args.hidden
    return {"q": (args.heads * args.head_dim, d), "k / v": (args.kv_heads * args.head_dim, d),
            "o": (d, args.heads * args.head_dim), "gate / up": (args.intermediate, d), "down": (d, args.intermediate)}


def seconds_per_product(product, weights: list, x: torch.Tensor, repeats: int) -> float:
    for w in weights:  # warm-up: first-touch and kernel selection
        product(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        for w in weights:
            product(x, w)
    return (time.perf_counter() - start) / (repeats * len(weights))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--rows", type=int_list, default="1,2,4,8,16", help="comma list of row counts (live requests)")
    p.add_argument("--copies", type=int, default=0, help="weight copies cycled through (0: enough for 512 MB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--int8", action="store_true", help="also time the int8 products (module docstring)")
    args = p.parse_args()
    rows = args.rows
    if min(rows + [args.repeats, args.copies + 1]) < 1:
        p.error("--rows and --repeats must be positive, --copies at least 0")
    require_distinct(p, "--rows", rows)
    torch.manual_seed(0)
    # each kernel: the weight prepared once (copies of it cycled through), and the product
    kernels = {"MKL": (lambda w: w, F.linear), "oneDNN packed": (lambda w: PackedLinear(w, None), lambda x, k: k(x))}
    if args.int8:
        kernels |= {"int8 per tensor": (dynamic_int8, lambda x, k: k(x)),
                    "int8 per row": (RowScaledInt8, lambda x, k: k(x))}
    print(f"{torch.get_num_threads()} threads, float32, cold weights; microseconds per product (GB/s of weights read,"
          " as float32)")
    print(f"{'projection':<10} {'out x in':>12} {'rows':>5} " + " ".join(f"{k:>16}" for k in kernels))
    seconds: dict[str, dict[int, list[float]]] = {k: {r: [] for r in rows} for k in kernels}
    differs: dict[str, list[str]] = {k: [] for k in kernels}  # "shape at r rows" where row 0 differs
    for name, (out_f, in_f) in shapes(args).items():
        copies = args.copies or max(2, math.ceil(512e6 / (out_f * in_f * 4)))
        weights = [torch.randn(out_f, in_f) / in_f**0.5 for _ in range(copies)]
        prepared = {k: [prepare(w) for w in weights] for k, (prepare, _) in kernels.items()}
        gigabytes = out_f * in_f * 4 / 1e9
        for r in rows:
            x = torch.randn(r, in_f)
            cells = []
            for k, (_, run) in kernels.items():
                t = seconds_per_product(run, prepared[k], x, args.repeats)
                seconds[k][r].append(t)
                cells.append(f"{t * 1e6:>8.0f} ({gigabytes / t:>5.1f})")
            print(f"{name:<10} {f'{out_f} x {in_f}':>12} {r:>5} " + " ".join(cells))
        x = torch.randn(max(rows), in_f)
        for k, (_, run) in kernels.items():
            w = prepared[k][0]
            alone = [r for r in rows if not torch.equal(run(x[:r], w)[0], run(x, w)[0])]
            differs[k] += [f"{name} at {r}" for r in alone]
        del weights, prepared
    for kernel, cases in differs.items():
        where = f"differs from its {max(rows)}-row result: {', '.join(cases)}" if cases else "never differs"
        print(f"{kernel}: a row's result {where} (rows computed with it)")
    pairs = [("MKL", "oneDNN packed")] + ([("int8 per row", "int8 per tensor")] if args.int8 else [])
    for slow, fast in pairs:
        for r in rows:
            mean = math.exp(sum(math.log(a / b) for a, b in zip(seconds[slow][r], seconds[fast][r])) / len(seconds[slow][r]))
            print(f"ratio ({r} rows: {slow} time / {fast} time, geometric mean over shapes): {mean:.2f}x")


if __name__ == "__main__":
    run_main(main)
