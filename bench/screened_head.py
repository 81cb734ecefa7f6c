"""Does the greedy screen of the LM head pay on this host? The same model generating with the head that
`load_for_inference` gives it (a ScreenedHead where this CPU has a screen: bfloat16 with oneDNN's
bfloat16 products, float16 on AVX2) against the plain packed float32 head, alternated in rounds.

A decoding step of the 270M at batch 1 reads its 262k x 640 float32 LM head (671 MB); the screen reads a
half-size copy and scores only the tokens its error bound cannot rule out in float32, at the cost of that
copy's memory (335 MB). The table gives the head's time for one row alone (screen + scoring against the
full float32 product) and whole generations (corpus prompts, greedy, EOS ignored); the tokens must agree.
The last line is the ratio of the plain head's generation time to the screened one's (> 1: the screen
pays).

    python bench/screened_head.py --model runs/bench/merged --batch 1,2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import corpus_token_ids, cpu_only, in_turn, int_list, require_distinct, run_main


def _median_ms(call, repeats: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/bench/merged"), help="an encoder-decoder checkpoint")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--batch", type=int_list, default="1", help="comma list of batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each generating once with either head")
    args = parser.parse_args()
    batches = args.batch
    if min(args.prompt_length, args.new_tokens, args.rounds, *batches) < 1:
        parser.error("--prompt-length, --batch, --new-tokens and --rounds must be positive")
    require_distinct(parser, "--batch", batches)
    cpu_only()  # the screen is a CPU head's

    from encdec.inference import onednn
    from encdec.inference.loading import load_for_inference

    model = load_for_inference(args.model, torch.float32, None)
    screened = model.lm_head
    if not isinstance(screened, onednn.ScreenedHead):
        raise SystemExit(f"no screen on this host (onednn.screen_dtype(): {onednn.screen_dtype()}); nothing to compare")
    plain = onednn.PackedLinear(model.embed.weight, None)
    print(f"model {args.model}, {torch.get_num_threads()} threads, float32, screen {screened.dtype}, "
          f"prompt {args.prompt_length} -> {args.new_tokens} new, median of {args.rounds} round(s)")
    hidden = torch.randn(1, model.config.decoder.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden *= 30 / hidden.norm()  # about the size of a final-norm state
    softcap = model.config.final_logit_softcap
    head_ms = {"screened": _median_ms(lambda: screened.greedy(hidden, softcap), 20),
               "plain": _median_ms(lambda: plain(hidden).argmax(-1), 20)}
    print(f"{'head':<10} {'rows':>4} {'ms':>9}")
    for name, ms in head_ms.items():
        print(f"{name:<10} {1:>4} {ms:>9.1f}")
    ids_all = corpus_token_ids(args.model, args.prompt_length * max(batches))
    print(f"{'head':<10} {'batch':>5} {'seconds':>9} {'same tokens':>12}")
    ratios = {}
    for batch in batches:
        ids = torch.tensor(ids_all[: args.prompt_length * batch]).view(batch, args.prompt_length)
        mask = torch.ones_like(ids)
        times: dict[str, list[float]] = {"screened": [], "plain": []}
        outputs = {}
        heads = [("screened", screened), ("plain", plain)]
        for name, head in heads:  # untimed: a batch size's first generation sets up its buffers and kernels
            model.lm_head = head
            model.generate(ids, mask, max_new_tokens=2, eos_token_ids=[-1])
        for r in range(args.rounds):
            for name, head in in_turn(heads, r):
                model.lm_head = head
                start = time.perf_counter()
                outputs[name] = model.generate(ids, mask, max_new_tokens=args.new_tokens, eos_token_ids=[-1])
                times[name].append(time.perf_counter() - start)
        same = bool(torch.equal(outputs["screened"], outputs["plain"]))
        for name, values in times.items():
            print(f"{name:<10} {batch:>5} {statistics.median(values):>9.2f} {'yes' if same else 'NO':>12}")
        ratios[batch] = statistics.median(p / s for p, s in zip(times["plain"], times["screened"]))
    for batch, ratio in ratios.items():
        print(f"ratio (batch {batch}: plain head's generation time / screened head's, median of rounds): {ratio:.2f}x")


if __name__ == "__main__":
    run_main(main)
