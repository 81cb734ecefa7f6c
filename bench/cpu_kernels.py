"""Which CPU kernel should a decoding step's products use on this host? PyTorch's default (MKL's sgemm /
sgemv behind F.linear) against oneDNN on packed weights (`encdec.inference.onednn.PackedLinear`, what
`encdec generate` and `encdec serve` use), on the projections of a model's decoder, at the row counts
of decoding (1 row per live request).

A decoding step reads every weight once and the weights do not fit in the caches, so each timing cycles
through --copies copies of the weight (more bytes than the last-level cache) and reports the bytes read
per second: the kernels are compared as the step meets them, not on a cached matrix. Float32, the
host's threads. It also checks what continuous batching needs: that a row's result does not depend on
the rows it is computed with (row 0 of a --rows-max-row product equals the one-row product, bit for bit).

The table gives, per projection shape and row count, microseconds per product and GB/s for each
kernel; the last lines give the geometric mean over shapes of MKL's time / oneDNN's time per row count
(> 1: oneDNN faster) and the invariance checks.

    python bench/cpu_kernels.py                          # the shapes of the packaged 270M's decoder
    python bench/cpu_kernels.py --hidden 2304 --intermediate 9216 --heads 8 --kv-heads 4 --head-dim 256
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from encdec.inference.onednn import PackedLinear


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
    p.add_argument("--rows", default="1,2,4,8,16", help="comma list of row counts (live requests)")
    p.add_argument("--copies", type=int, default=0, help="weight copies cycled through (0: enough for 512 MB)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if min(rows + [args.repeats, args.copies + 1]) < 1:
        p.error("--rows and --repeats must be positive, --copies at least 0")
    torch.manual_seed(0)
    mkl = lambda x, w: F.linear(x, w)  # noqa: E731
    onednn = lambda x, packed: packed(x)  # noqa: E731
    print(f"{torch.get_num_threads()} threads, float32, cold weights; microseconds per product (GB/s of weights read)")
    print(f"{'projection':<10} {'out x in':>12} {'rows':>5} {'MKL':>16} {'oneDNN packed':>16}")
    ratios: dict[int, list[float]] = {r: [] for r in rows}
    differs: dict[str, list[str]] = {"MKL": [], "oneDNN packed": []}  # "shape at r rows" where row 0 differs
    for name, (out_f, in_f) in shapes(args).items():
        copies = args.copies or max(2, math.ceil(512e6 / (out_f * in_f * 4)))
        weights = [torch.randn(out_f, in_f) / in_f**0.5 for _ in range(copies)]
        packed = [PackedLinear(w, None) for w in weights]
        gigabytes = out_f * in_f * 4 / 1e9
        for r in rows:
            x = torch.randn(r, in_f)
            a = seconds_per_product(mkl, weights, x, args.repeats)
            b = seconds_per_product(onednn, packed, x, args.repeats)
            ratios[r].append(a / b)
            print(f"{name:<10} {f'{out_f} x {in_f}':>12} {r:>5} {a * 1e6:>8.0f} ({gigabytes / a:>5.1f}) "
                  f"{b * 1e6:>8.0f} ({gigabytes / b:>5.1f})")
        x = torch.randn(max(rows), in_f)
        for kernel, run, w in (("MKL", mkl, weights[0]), ("oneDNN packed", onednn, packed[0])):
            alone = [r for r in rows if not torch.equal(run(x[:r], w)[0], run(x, w)[0])]
            differs[kernel] += [f"{name} at {r}" for r in alone]
        del weights, packed
    for kernel, cases in differs.items():
        where = f"differs from its {max(rows)}-row result: {', '.join(cases)}" if cases else "never differs"
        print(f"{kernel}: a row's result {where} (rows computed with it)")
    for r in rows:
        mean = math.exp(sum(math.log(v) for v in ratios[r]) / len(ratios[r]))
        print(f"ratio ({r} rows: MKL time / oneDNN packed time, geometric mean over shapes): {mean:.2f}x")


if __name__ == "__main__":
    main()
