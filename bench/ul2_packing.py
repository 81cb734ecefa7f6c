"""How full UL2's packed rows are: the share of a step's encoder and decoder slots that hold tokens.

PrefixLM windows fill their rows exactly; a UL2 window is corrupted into inputs and targets whose split
depends on the denoiser, so a row can be left half empty. This script runs the trainer's own pipeline
(`example_maker` -> `ExampleStream.next_examples` -> `make_batch`) over random token windows (the sizes
of corrupted examples do not depend on the tokens) for each --rows shape, and prints examples per row
and the filled share of the slots. For comparison, the same corrupted examples cut from windows of a
quarter row and packed first-fit over --open-rows open rows (an alternative the pipeline does not have).
The last line is the ratio of the alternative's fill to today's at the first shape (> 1: it would fill more).

    python bench/ul2_packing.py --rows 64+64,512+512,256+64
"""

from __future__ import annotations

import argparse

import numpy as np

from encdec.objectives import Example
from encdec.training.data import ExampleStream, example_maker, make_batch, window_length

VOCAB = {f"<unused{k}>": 6 + k for k in range(99)}  # Gemma's reserved tokens: the mode tokens and sentinels
EOS, BOS, PAD = 1, 2, 0


def fill_of_pipeline(mixture: str, enc: int, dec: int, rows: int, seed: int) -> tuple[float, float]:
    """(examples per row, filled share of the slots) of `rows` rows as the trainer packs them."""
    make = example_maker("ul2", eos_id=EOS, vocab=VOCAB, enc_len=enc, dec_len=dec, bos_id=BOS, mixture=mixture)
    length, rng = window_length("ul2", enc, dec, bos=True), np.random.default_rng(seed)
    windows = [rng.integers(200, 5000, length).tolist() for _ in range(4 * rows)]
    stream = ExampleStream(windows, make, seed=seed, enc_len=enc, dec_len=dec)
    examples = stream.next_examples(rows)
    batch = make_batch(examples, enc_len=enc, dec_len=dec, pad_id=PAD, bos_id=BOS, with_teacher=False)
    filled = int((batch.rows.segment_ids != 0).sum() + (batch.rows.decoder_segment_ids != 0).sum())
    return len(examples) / rows, filled / (rows * (enc + dec))


def first_fit(examples: list[Example], enc: int, dec: int, open_rows: int) -> int:
    """Rows used when each example joins the first of the last `open_rows` rows it fits in."""
    used: list[list[int]] = []
    for example in examples:
        a, b = len(example.inputs), len(example.targets)
        row = next((r for r in used[-open_rows:] if r[0] + a <= enc and r[1] + b <= dec), None)
        if row is None:
            used.append([a, b])
        else:
            row[0], row[1] = row[0] + a, row[1] + b
    return len(used)


def fill_of_quarter_windows(mixture: str, enc: int, dec: int, count: int, open_rows: int,
                            seed: int) -> tuple[float, float]:
    make = example_maker("ul2", eos_id=EOS, vocab=VOCAB, enc_len=enc, dec_len=dec, bos_id=BOS, mixture=mixture)
    rng = np.random.default_rng(seed)
    examples = [make(rng.integers(200, 5000, (enc + dec) // 4).tolist(), rng) for _ in range(count)]
    rows = first_fit(examples, enc, dec, open_rows)
    tokens = sum(len(e.inputs) + len(e.targets) for e in examples)
    return count / rows, tokens / (rows * (enc + dec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="64+64,512+512,256+64", help="comma list of ENC+DEC row shapes")
    parser.add_argument("--mixtures", default="t5gemma2,ul2", help="comma list of UL2 mixtures")
    parser.add_argument("--packed-rows", type=int, default=256, help="rows packed by the pipeline per shape")
    parser.add_argument("--open-rows", type=int, default=8, help="open rows of the first-fit alternative")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        shapes = [tuple(int(x) for x in shape.split("+")) for shape in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows: expected ENC+DEC shapes such as 64+64,256+64, got {args.rows!r}")
    if any(len(s) != 2 or min(s) < 8 for s in shapes) or min(args.packed_rows, args.open_rows) < 1:
        parser.error("--rows shapes need two sides of at least 8 tokens; --packed-rows and --open-rows at least 1")

    print(f"random windows, {args.packed_rows} packed rows per shape; alternative: quarter-row windows, first fit "
          f"over {args.open_rows} open rows")
    print(f"{'mixture':<9} {'rows':>8} {'ex/row':>7} {'filled':>7} {'alt ex/row':>11} {'alt filled':>11}")
    first = None
    for mixture in args.mixtures.split(","):
        for enc, dec in shapes:
            per_row, filled = fill_of_pipeline(mixture, enc, dec, args.packed_rows, args.seed)
            alt_per_row, alt_filled = fill_of_quarter_windows(mixture, enc, dec, 4 * args.packed_rows, args.open_rows,
                                                              args.seed)
            print(f"{mixture:<9} {f'{enc}+{dec}':>8} {per_row:>7.2f} {filled:>7.0%} {alt_per_row:>11.2f} "
                  f"{alt_filled:>11.0%}")
            first = first or (mixture, enc, dec, alt_filled / filled)
    mixture, enc, dec, ratio = first
    print(f"ratio ({mixture}, {enc}+{dec}: slots filled by the alternative / by today's packing): {ratio:.2f}x")


if __name__ == "__main__":
    main()
