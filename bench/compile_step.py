"""Does `torch.compile` of the decoding step pay on this machine? Eager against compiled, same engine.

The decoding engine's tensor work per step is `Engine.hidden` (the caches and the decoder layers, without
the rows' bookkeeping and the LM head). This script generates --new-tokens greedy tokens for a batch of
corpus prompts with it as it is, then compiled as `--compile` compiles it (`compiled_step`: inductor; the
decoder and encoder lengths change every step, hence dynamic shapes), for each --kernels choice of
`load_for_inference` (blas: PyTorch's products; onednn: the packed weights `encdec generate` uses).
It prints the compilation time (the first compiled generation, less an eager one), the median step
time of the following compiled generations against eager ones, and whether the tokens are the same.
The last line is the ratio of the eager to the compiled median step (> 1: compiling pays).

    python bench/compile_step.py --model runs/bench/merged --kernels blas,onednn [--dtype bfloat16 --batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import corpus_token_ids, cpu_only, engine_steps, require_distinct, run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/bench/merged"), help="an encoder-decoder checkpoint")
    parser.add_argument("--kernels", default="blas,onednn", help="comma list of load_for_inference's CPU kernels")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed generations of each mode")
    args = parser.parse_args()
    if min(args.prompt_length, args.batch, args.new_tokens, args.repeats) < 1:
        parser.error("--prompt-length, --batch, --new-tokens and --repeats must be positive")
    require_distinct(parser, "--kernels", args.kernels.split(","))
    cpu_only()  # the ids and the kernels compared are the CPU's

    from encdec.inference.engine import Engine, compiled_step
    from encdec.inference.loading import load_for_inference

    flat = corpus_token_ids(args.model, args.batch * args.prompt_length)
    ids = torch.tensor(flat[: args.batch * args.prompt_length]).view(args.batch, args.prompt_length)
    rows, ratios = [], []
    for kernels in args.kernels.split(","):
        model = load_for_inference(args.model, getattr(torch, args.dtype), None, kernels)
        reference, _ = engine_steps(model, ids, args.new_tokens)
        eager, eager_calls = [], []  # step times; whole generations' wall times (encoder pass and joining included)
        for _ in range(args.repeats):
            start = time.perf_counter()
            eager += engine_steps(model, ids, args.new_tokens)[1]
            eager_calls.append(time.perf_counter() - start)
        compiled = compiled_step(Engine.hidden)
        start = time.perf_counter()
        try:
            tokens, _ = engine_steps(model, ids, args.new_tokens, compiled)
        except Exception as e:  # noqa: BLE001 - a kernel inductor cannot trace is a result to report
            rows.append(f"{kernels:<8} compiled: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            continue
        compile_s = time.perf_counter() - start - statistics.median(eager_calls)
        steps = [s for _ in range(args.repeats) for s in engine_steps(model, ids, args.new_tokens, compiled)[1]]
        eager_ms, compiled_ms = statistics.median(eager) * 1e3, statistics.median(steps) * 1e3
        rows.append(f"{kernels:<8} {eager_ms:>15.1f} {compiled_ms:>18.1f} {compile_s:>13.0f} "
                    f"{'yes' if tokens == reference else 'no':>11}")
        ratios.append((kernels, eager_ms / compiled_ms))
        torch._dynamo.reset()

    print(f"model {args.model}, {torch.get_num_threads()} threads, {args.dtype}, batch {args.batch}, prompt "
          f"{args.prompt_length} -> {args.new_tokens} new, median step over {args.repeats} generation(s)")
    print(f"{'kernels':<8} {'eager ms/step':>15} {'compiled ms/step':>18} {'compile s':>13} {'same tokens':>11}")
    for row in rows:
        print(row)
    for kernels, ratio in ratios:
        print(f"ratio ({kernels}: eager / compiled step time): {ratio:.2f}x")


if __name__ == "__main__":
    run_main(main)
