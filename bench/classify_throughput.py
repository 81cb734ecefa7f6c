"""Classification fine-tuning throughput (examples/s): `encdec classify`'s training versus a plain PyTorch loop.

Times `encdec.classification.train.fine_tune`, the function `encdec classify` trains every fold and
every search candidate with, on a fixed set of token rows, against a plain loop over the same
classifier (backbone + pooling + linear head):

- encdec: `fine_tune` as `encdec classify` runs it (its optimizer, schedule, padding and, on CPU,
  the allocator setting of `encdec.allocator`);
- encdec+bf16 (with `--bf16`): the same call with `precision="bf16"` (bfloat16 autocast of the forward's
  products, weights in float32), where bfloat16 products are fast (AVX512-BF16 / AMX);
- encdec+frozen, encdec+bf16+frozen (with `--frozen-embeddings`): the same calls with
  `freeze_embeddings=True` (`encdec classify --freeze-embeddings`: the token embedding is not trained);
- encdec@base (with `--base-src DIR`): the same call, importing `encdec` from another source tree
  (e.g. main's `src/`), so that a change is measured against the code before it in the same run;
- plain: the same classifier in a textbook loop: `torch.optim.AdamW` with its default implementation,
  `pad_sequence`, `F.cross_entropy`, gradient clipping at 1.0, nothing process-wide changed.

Each implementation runs in a process of its own (the allocator setting is process-wide), in `--rounds`
rounds, each round running every implementation once in turn (in reverse order every other round), so that a
slow spell of a shared machine falls on all of them. A process makes its classifier, runs one untimed call of
`--warmup` steps, then
`--repeats` timed calls of `--steps` optimizer steps each; every call starts a new optimizer (as each
fold does) and sees the same seeded batches. Rows are seeded random ids of 1/4 to all of `--max-len`
tokens (right-padded per batch, as classification pads them), labels random over two classes.

The model is, by default, a random Gemma 3 adapted into an encoder-decoder (its encoder is the
backbone): 6 layers of width 256, vocabulary 32,768, big enough that a step is real work and small
enough for a minute's run. `--model PATH` times any MODEL `encdec classify` takes instead (an adapted
checkpoint of the 270M model: minutes per round on a 2-core CPU).

    python bench/classify_throughput.py
    python bench/classify_throughput.py --base-src /work/main/src --bf16   # before / after a change, and bf16
    python bench/classify_throughput.py --model runs/adapted --steps 2 --repeats 1 --batch 8 --max-len 256
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cpu_only, in_turn, print_result, ratio_line, require_positive, run_main, run_worker, time_calls

LR, HEAD_LR, WEIGHT_DECAY, CLIP, WARMUP = 1e-5, 1e-4, 0.01, 1.0, 0.1
BOS_ID, PAD_ID = 2, 0
TOKEN_IDS = (10, 30000)  # random ids drawn from [low, high): ordinary tokens of both vocabularies
TINY = {"vocab_size": 32768, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "sliding_window": 128,
        "query_pre_attn_scalar": 64, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": 1,
        "max_position_embeddings": 4096}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="MODEL as `encdec classify` takes it (default: a random tiny adapted Gemma 3)")
    p.add_argument("--base-src", type=Path, help="also time fine_tune from this source tree (e.g. main's src/)")
    p.add_argument("--bf16", action="store_true", help="also time fine_tune with bfloat16 autocast")
    p.add_argument("--frozen-embeddings", action="store_true",
                   help="also time fine_tune with the token embedding frozen (and bf16 frozen, with --bf16)")
    p.add_argument("--batch", type=int, default=16, help="examples per step")
    p.add_argument("--max-len", type=int, default=128, help="longest row, in tokens")
    p.add_argument("--examples", type=int, default=256, help="distinct rows the steps draw from")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per timed call")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per process")
    p.add_argument("--warmup", type=int, default=2, help="steps of the untimed first call")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each running every implementation once in turn")
    p.add_argument("--worker", nargs=2, metavar=("IMPLEMENTATION", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    require_positive(p, args, ("batch", "max_len", "examples", "steps", "repeats", "warmup", "rounds"))
    if args.base_src is not None and not (args.base_src / "encdec" / "__init__.py").is_file():  # the installed
        # encdec was imported instead, and a tree compared with itself
        p.error(f"--base-src {args.base_src}: no encdec package there; give a source tree's src/ folder")
    if args.max_len < 4:
        p.error("--max-len must be at least 4")
    if args.examples % args.batch:  # both sides then step through full batches only, as the examples/s assumes
        p.error(f"--examples must be a multiple of --batch ({args.batch}), got {args.examples}: encdec's epochs end "
                "with a short batch otherwise, the plain loop's never")
    return args


def tiny_model(directory: Path) -> Path:
    """A random Gemma 3 (saved by transformers), adapted and saved as an encoder-decoder checkpoint."""
    import transformers

    import encdec

    torch.manual_seed(0)
    source = directory / "source"
    transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TINY)).save_pretrained(str(source))
    encdec.save(encdec.adapt(encdec.load_source(str(source))), directory / "model")
    return directory / "model"


def rows_and_labels(args: argparse.Namespace) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)
    rows = [[BOS_ID] + [rng.randrange(*TOKEN_IDS) for _ in range(rng.randint(args.max_len // 4, args.max_len) - 1)]
            for _ in range(args.examples)]
    return rows, [rng.randrange(2) for _ in rows]


def time_encdec(classifier, rows: list[list[int]], labels: list[int], args: argparse.Namespace,
                bf16: bool = False, frozen: bool = False) -> list[float]:
    from encdec.classification.train import Hyper, fine_tune

    # fields an older tree (--base-src) may lack are passed only when used
    extra = {**({"precision": "bf16"} if bf16 else {}), **({"freeze_embeddings": True} if frozen else {})}

    def call(steps: int) -> None:
        hp = Hyper(lr=LR, head_lr=HEAD_LR, weight_decay=WEIGHT_DECAY, steps=steps, batch_size=args.batch,
                   max_len=args.max_len, warmup=WARMUP, **extra)
        fine_tune(classifier, rows, labels, hp, pad_id=PAD_ID, desc="bench", seed=0)

    call(args.warmup)
    return time_calls(lambda: call(args.steps), 0, args.repeats, torch.device("cpu"))


def time_plain(classifier, rows: list[list[int]], labels: list[int], args: argparse.Namespace) -> list[float]:
    """The textbook loop: one AdamW over all parameters, the head at its own rate, a linear schedule."""
    def call(steps: int) -> None:
        head = [p for name, p in classifier.named_parameters() if name.startswith("head.")]
        body = [p for name, p in classifier.named_parameters() if not name.startswith("head.")]
        optimizer = torch.optim.AdamW([{"params": body}, {"params": head, "lr": HEAD_LR}], lr=LR,
                                      weight_decay=WEIGHT_DECAY)
        warmup = round(WARMUP * steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        classifier.train()
        for step in range(steps):
            chosen = [order[(step * args.batch + i) % len(order)] for i in range(args.batch)]
            ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(rows[i]) for i in chosen], batch_first=True,
                                                  padding_value=PAD_ID)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(rows[i]), dtype=torch.long) for i in chosen],
                                                   batch_first=True)
            loss = F.cross_entropy(classifier(ids, mask), torch.tensor([labels[i] for i in chosen]))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(classifier.parameters(), CLIP)
            optimizer.step()
            schedule.step()

    call(args.warmup)
    return time_calls(lambda: call(args.steps), 0, args.repeats, torch.device("cpu"))


IMPLEMENTATIONS = {"encdec": time_encdec, "encdec+bf16": functools.partial(time_encdec, bf16=True),
                   "encdec+frozen": functools.partial(time_encdec, frozen=True),
                   "encdec+bf16+frozen": functools.partial(time_encdec, bf16=True, frozen=True),
                   "encdec@base": time_encdec, "plain": time_plain}


def worker(args: argparse.Namespace) -> None:
    """One implementation in this process; prints the seconds of its timed calls as JSON."""
    import encdec
    from encdec.classification.classifier import Classifier
    from encdec.classification.loading import load_backbone

    name, model = args.worker
    print(f"  {name}: encdec from {Path(encdec.__file__).parent}", file=sys.stderr, flush=True)
    backbone, _ = load_backbone(model)
    classifier = Classifier(backbone, 2, "last")
    rows, labels = rows_and_labels(args)
    print_result({"call_seconds": IMPLEMENTATIONS[name](classifier, rows, labels, args)})


def measure(name: str, model: str, args: argparse.Namespace) -> list[float]:
    options = ["--batch", str(args.batch), "--max-len", str(args.max_len), "--examples", str(args.examples),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    env = None
    if name == "encdec@base":
        env = {**os.environ, "PYTHONPATH": str(args.base_src.resolve())}
    return run_worker(__file__, [*options, "--worker", name, model], env=env)["call_seconds"]


def main() -> None:
    args = parse_args()
    cpu_only()  # the plain loop's batches stay on the CPU; encdec's loading would take a GPU
    if args.worker:
        worker(args)
        return
    frozen = ["encdec+frozen", *(["encdec+bf16+frozen"] if args.bf16 else [])] if args.frozen_embeddings else []
    names = ["encdec", *(["encdec+bf16"] if args.bf16 else []), *frozen, *(["encdec@base"] if args.base_src else []),
             "plain"]
    rounds: dict[str, list[list[float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp)))
        for round_ in range(1, args.rounds + 1):
            for name in in_turn(names, round_ - 1):
                print(f"round {round_}/{args.rounds}: timing {name} ...", file=sys.stderr, flush=True)
                rounds[name].append(measure(name, model, args))
    examples = args.steps * args.batch
    print(f"model {args.model or 'tiny random Gemma 3 encoder (6 x 256, vocabulary 32768)'}, "
          f"{torch.get_num_threads()} threads, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"batch {args.batch}, rows of {args.max_len // 4}-{args.max_len} tokens, {args.steps} steps per call, "
          f"median of {args.rounds} rounds x {args.repeats} calls")
    width = max(len("implementation"), *map(len, names))
    print(f"{'implementation':<{width}}  {'s/step (median)':>15}  {'examples/s':>10}")
    for name, times in rounds.items():
        seconds = statistics.median(t for r in times for t in r)
        print(f"{name:<{width}}  {seconds / args.steps:>15.3f}  {examples / seconds:>10.1f}")
    if args.bf16:
        print(ratio_line("encdec+bf16 / encdec", rounds["encdec+bf16"], rounds["encdec"]))
    for name in frozen:
        unfrozen = name.removesuffix("+frozen")
        print(ratio_line(f"{name} / {unfrozen}", rounds[name], rounds[unfrozen]))
    if args.base_src:
        print(ratio_line("encdec / encdec@base", rounds["encdec"], rounds["encdec@base"]))
    print(ratio_line("encdec / plain", rounds["encdec"], rounds["plain"]))


if __name__ == "__main__":
    run_main(main)
