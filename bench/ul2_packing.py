"""How full UL2's packed rows are: the share of a step's encoder and decoder slots that hold tokens.

PrefixLM windows fill their rows exactly; a UL2 window is corrupted into inputs and targets whose split
depends on the denoiser, so a row can be left half empty. This script runs the trainer's own pipeline
(`example_maker` -> `ExampleStream.next_examples`, which packs each step's rows first fit -> `make_batch`)
over random token windows (the sizes of corrupted examples do not depend on the tokens) for each --rows
shape, and prints examples per row and the filled share of the slots; then the same from windows of a
quarter row (an alternative the trainer does not use: shorter contexts, fuller rows).
The last line is the ratio of the alternative's fill to today's at the first shape (> 1: it would fill more).

    python bench/ul2_packing.py --rows 64+64,512+512,256+64
"""

from __future__ import annotations

import argparse

import numpy as np
from common import require_distinct

from encdec.objectives import MIXTURES
from encdec.training.data import ExampleStream, example_maker, make_batch, window_length

VOCAB = {f"<unused{k}>": 6 + k for k in range(99)}  # Gemma's reserved tokens: the mode tokens and sentinels
EOS, BOS, PAD = 1, 2, 0


def fill_of_pipeline(mixture: str, enc: int, dec: int, rows: int, batch_rows: int, window: int,
                     seed: int) -> tuple[float, float]:
    """(examples per row, filled share of the slots) of `rows` rows as the trainer packs them, `batch_rows` rows
    a step, from windows of `window` tokens."""
    make = example_maker("ul2", eos_id=EOS, vocab=VOCAB, enc_len=enc, dec_len=dec, bos_id=BOS, mixture=mixture)
    rng = np.random.default_rng(seed)
    windows = [rng.integers(200, 5000, window).tolist() for _ in range(8 * rows)]
    stream = ExampleStream(windows, make, seed=seed, enc_len=enc, dec_len=dec)
    examples, filled = 0, 0
    for _ in range(rows // batch_rows):
        step = stream.next_examples(batch_rows)
        batch = make_batch(step, enc_len=enc, dec_len=dec, pad_id=PAD, bos_id=BOS, with_teacher=False)
        examples += len(step)
        filled += int((batch.rows.segment_ids != 0).sum() + (batch.rows.decoder_segment_ids != 0).sum())
    packed = rows // batch_rows * batch_rows
    return examples / packed, filled / (packed * (enc + dec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="64+64,512+512,256+64", help="comma list of ENC+DEC row shapes")
    parser.add_argument("--mixtures", default="t5gemma2,ul2", help="comma list of UL2 mixtures")
    parser.add_argument("--packed-rows", type=int, default=256, help="rows packed by the pipeline per shape")
    parser.add_argument("--batch-rows", type=int, default=8, help="rows a step packs (first fit among them)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        shapes = [tuple(int(x) for x in shape.split("+")) for shape in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows: expected ENC+DEC shapes such as 64+64,256+64, got {args.rows!r}")
    require_distinct(parser, "--rows", args.rows.split(","))
    require_distinct(parser, "--mixtures", args.mixtures.split(","))
    unknown = sorted(set(args.mixtures.split(",")) - set(MIXTURES))
    if unknown:  # a KeyError otherwise, after the table's header
        parser.error(f"--mixtures: unknown {', '.join(unknown)}; choose from {', '.join(MIXTURES)}")
    if any(len(s) != 2 or min(s) < 8 for s in shapes) or not 1 <= args.batch_rows <= args.packed_rows:
        parser.error("--rows shapes need two sides of at least 8 tokens; --batch-rows at least 1 and at most "
                     "--packed-rows")

    print(f"random windows, {args.packed_rows} packed rows per shape, {args.batch_rows} a step; alternative: "
          "quarter-row windows")
    print(f"{'mixture':<9} {'rows':>8} {'ex/row':>7} {'filled':>7} {'alt ex/row':>11} {'alt filled':>11}")
    first = None
    for mixture in args.mixtures.split(","):
        for enc, dec in shapes:
            per_row, filled = fill_of_pipeline(mixture, enc, dec, args.packed_rows, args.batch_rows,
                                               window_length("ul2", enc, dec, bos=True), args.seed)
            alt_per_row, alt_filled = fill_of_pipeline(mixture, enc, dec, args.packed_rows, args.batch_rows,
                                                       (enc + dec) // 4, args.seed)
            print(f"{mixture:<9} {f'{enc}+{dec}':>8} {per_row:>7.2f} {filled:>7.0%} {alt_per_row:>11.2f} "
                  f"{alt_filled:>11.0%}")
            first = first or (mixture, enc, dec, alt_filled / filled)
    mixture, enc, dec, ratio = first
    print(f"ratio ({mixture}, {enc}+{dec}: slots filled by the alternative / by today's packing): {ratio:.2f}x")


if __name__ == "__main__":
    main()
