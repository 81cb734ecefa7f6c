"""Memory of reading one long prompt: the peak resident memory that encoding a prompt of each --lengths size adds
to the process, encdec's engine (`Engine.join`: the encoder pass and its keys and values for the decoder) against
transformers' T5Gemma 2 (or T5Gemma) encoder on the same weights, each length in a fresh process of its own.

Encoder-decoders are chosen for long inputs; what an encoder pass holds beyond the weights grows with the
square of the prompt's length where attention masks are built whole ([L, L] entries per layer kind). The model is
randomly initialised in a Gemma 3 shape small enough for CPU (--layers, --width; a 512-token local window), so the
masks, not the activations, dominate. Printed last: transformers' added peak over encdec's at the longest length.

    python bench/long_prompt_memory.py --lengths 2048,8192,16384
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_only, peak_rss_gib, print_result, run_main, run_worker

VOCAB = 1024


def build(directory: Path, family: str, layers: int, width: int, longest: int) -> None:
    """A random Gemma 3 (or 2) text model adapted and saved in the T5Gemma 2 (or T5Gemma) layout, which both
    sides load."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

    import encdec

    torch.manual_seed(0)
    shape = {"vocab_size": VOCAB, "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
             "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": width // 4, "sliding_window": 512,
             "max_position_embeddings": longest, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
    config = Gemma3TextConfig(**shape) if family == "gemma3" else Gemma2Config(**shape)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory / "source")
    encdec.save(encdec.adapt(encdec.load_source(str(directory / "source"))), directory / "adapted")


def worker(side: str, model: Path, length: int) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    ids = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    if side == "encdec":
        import encdec
        from encdec.inference.engine import Engine, Row

        engine = Engine(encdec.load(model), max_batch=1)
        encode = lambda: engine.join([ids[0].tolist()], [Row(1, frozenset())])
    else:
        from transformers import AutoModelForSeq2SeqLM

        encoder = AutoModelForSeq2SeqLM.from_pretrained(str(model), dtype=torch.float32).eval().get_encoder()
        encode = lambda: encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
    before = peak_rss_gib(os.getpid())
    start = time.perf_counter()
    with torch.no_grad():
        encode()
    print_result({"added_gib": peak_rss_gib(os.getpid()) - before, "seconds": time.perf_counter() - start})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2048,8192", help="prompt lengths in tokens, comma list")
    p.add_argument("--family", choices=("gemma3", "gemma2"), default="gemma3",
                   help="the shape's family: gemma2's attention is soft-capped (T5Gemma, transformers' T5Gemma)")
    p.add_argument("--layers", type=int, default=6, help="layers of each stack (Gemma 3's 5 local : 1 global)")
    p.add_argument("--width", type=int, default=128, help="model width")
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "MODEL", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        side, model, length = args.worker
        worker(side, Path(model), int(length))
        return
    cpu_only()
    try:
        lengths = sorted({int(n) for n in args.lengths.split(",")})
    except ValueError:
        p.error(f"--lengths {args.lengths!r}: expected a comma list of integers like 2048,8192")
    if lengths[0] < 1 or args.layers < 1 or args.width < 4 or args.width % 4:
        p.error("--lengths, --layers must be at least 1 and --width a multiple of 4")
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.family, args.layers, args.width, lengths[-1])
        print(f"{'prompt tokens':>13}  {'side':<12}  {'added peak GiB':>14}  {'seconds':>8}")
        results: dict[tuple[int, str], dict] = {}
        for length in lengths:
            for side in ("encdec", "transformers"):
                results[length, side] = run_worker(__file__, ["--worker", side, str(Path(tmp) / "adapted"),
                                                              str(length)])
                r = results[length, side]
                print(f"{length:>13}  {side:<12}  {r['added_gib']:>14.3f}  {r['seconds']:>8.2f}", flush=True)
    ours, theirs = (results[lengths[-1], side]["added_gib"] for side in ("encdec", "transformers"))
    print(json.dumps({"family": args.family, "lengths": lengths, "layers": args.layers, "width": args.width}),
          file=sys.stderr)
    ratio = f"{theirs / ours:.2f}x" if ours > 0 else "n/a (encdec added nothing to its peak)"
    print(f"ratio (transformers / encdec added peak memory, {lengths[-1]}-token prompt): {ratio}")


if __name__ == "__main__":
    run_main(main)
