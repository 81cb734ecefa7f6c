"""Training-step throughput of the 270M-270M model: this project versus plain transformers.

Measures one optimiser step (forward, loss, backward, gradient clipping at 1.0, AdamW) on the
packaged Gemma 3 270M adapted with merged attention, in implementations holding the same weights:

- encdec: the project's `LossModule` (forward + fused LM-head cross-entropy) on a `make_batch` batch,
  with the optimiser from `build_optimizer` and, on CPU, the allocator setting of
  `encdec.allocator` (freed memory kept for reuse), as `encdec pretrain` runs them, except that the LM head's
  loss is computed in chunks of `--loss-chunk` 1024 tokens (the step's 512 targets in one), where pretraining's
  default is 256 (memory bounded at any batch; two chunks here): `--loss-chunk 256` times that default;
- transformers: `T5Gemma2ForConditionalGeneration` loaded from the same weights (SDPA attention) in a
  plain PyTorch loop: `out.loss.backward()` and `torch.optim.AdamW`;
- transformers+keep (CPU only): the same plain loop with the project's allocator setting, to show
  how much of the difference that setting alone makes;
- transformers+fused: the same plain loop with fused AdamW (`fused=True`, which encdec's optimiser uses and
  transformers' Trainer defaults to, `adamw_torch_fused`); the plain loop's default AdamW steps tensor by
  tensor on a CPU.

Each implementation runs in a process of its own (the allocator setting is process-wide). The speed of
a shared machine drifts by 10-20% over minutes, so the implementations are measured in `--rounds`
rounds, each round running every implementation once in turn (in reverse order every other round; a fresh
process, `--warmup` untimed steps, `--steps` timed ones): a slow spell then falls on all of them rather than on
whichever ran during it. The table reports the median over all timed steps of all rounds; the ratio lines also
give each round's ratio, so the spread is visible.

Both read the same B rows of `enc_len` input and `dec_len` target tokens (one example per row, no
padding), keep float32 weights, and run each precision ("fp32"; "bf16" = bfloat16 autocast around
forward and loss). The table reports the median step time, tokens/s (encoder + decoder tokens),
model FLOP utilisation against a matrix-product rate measured in the same run (before and after the
steps, the better of the two), and peak memory (CUDA: allocated by torch; CPU: the worker process's
resident memory, loading included). bf16 is skipped where bfloat16 products run under a tenth of the
float32 rate (AVX2-only CPUs), since a step would take an hour there. The last line is the
throughput ratio encdec / transformers (the plain loop) in the last of --precisions; the lines before it
compare with transformers+fused and transformers+keep, and bf16 with fp32.

Model FLOPs per step count 6 per parameter per token that parameter reads (forward + backward):
encoder parameters x encoder tokens, decoder parameters x decoder tokens, the decoder's key/value
projections x encoder tokens again (merged attention projects the encoder output in every decoder
layer), and the tied LM head x decoder tokens. Attention score products and embedding lookups are
left out.

Run (the first use of gemma-3-270m dequantises and caches it, about 2 minutes):

    python bench/train_throughput.py                 # cuda if available, else cpu
    python bench/train_throughput.py --steps 5 --rounds 2 --precisions fp32 --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from common import (
    in_turn,
    peak_memory_gib,
    print_result,
    ratio_line,
    require_distinct,
    require_positive,
    run_main,
    run_worker,
    synchronize,
    time_calls,
)

import encdec
from encdec.allocator import keep_freed_memory
from encdec.objectives import Example
from encdec.training.data import Batch, make_batch
from encdec.training.optim import build_optimizer
from encdec.training.step import LossModule

SOURCE = "gemma-3-270m"
PAD_ID, BOS_ID = 0, 2
TOKEN_IDS = (10, 20000)  # random ids drawn from [low, high): ordinary tokens, no special ones
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMUL_SIZE = 2048
MATMUL_REPEATS, MATMUL_BUDGET_S, MATMUL_ROUND_S = 5, 1.0, 0.05
SLOW_FACTOR = 10  # skip a precision whose products run this many times slower than float32


@dataclass
class Measured:
    implementation: str
    precision: str
    rounds: list[list[float]]  # timed step seconds, one list per round
    peak_gib: float  # CUDA: peak allocated memory; CPU: peak resident memory of the process (model loading included)

    @property
    def seconds(self) -> float:
        """Median over all timed steps of all rounds."""
        return statistics.median(t for times in self.rounds for t in times)


@dataclass
class Skipped:
    precision: str
    reason: str


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--enc-len", type=int, default=128, help="encoder tokens per row")
    p.add_argument("--dec-len", type=int, default=128, help="decoder (target) tokens per row")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running every implementation once in turn")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (CPU: kept memory settles in 2)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per chunk of encdec's LM-head loss")
    p.add_argument("--worker", nargs=3, metavar=("IMPLEMENTATION", "PRECISION", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    try:  # a device this machine has: a RuntimeError's or an AssertionError's traceback otherwise, in the workers
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        p.error(f"--device {args.device}: this machine has {gpus} GPU(s)")
    require_positive(p, args, ("batch", "enc_len", "dec_len", "steps", "rounds", "loss_chunk"))
    args.precisions = args.precisions.split(",")
    unknown = set(args.precisions) - set(DTYPES)
    if unknown:
        p.error(f"--precisions: unknown {sorted(unknown)}; choose from {sorted(DTYPES)}")
    require_distinct(p, "--precisions", args.precisions)
    return args


def matmul_rate(dtype: torch.dtype, device: torch.device) -> float:
    """Best FLOP/s of MATMUL_SIZE-square products in `dtype`: up to MATMUL_REPEATS rounds, stopping once
    MATMUL_BUDGET_S is spent (one product can take many seconds); fast devices run several products a round."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype, device=device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype, device=device)
    flops = 2 * MATMUL_SIZE**3
    per_round, best, spent = 1, 0.0, 0.0
    for _ in range(MATMUL_REPEATS):
        start = time.perf_counter()
        for _ in range(per_round):
            a @ b
        synchronize(device)
        seconds = time.perf_counter() - start
        best, spent = max(best, per_round * flops / seconds), spent + seconds
        if spent > MATMUL_BUDGET_S:
            break
        per_round = max(1, int(MATMUL_ROUND_S * per_round / seconds))
    return best


def random_examples(batch: int, enc_len: int, dec_len: int) -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(*TOKEN_IDS, (batch, enc_len + dec_len), generator=generator).tolist()
    return [Example(inputs=row[:enc_len], targets=row[enc_len:]) for row in ids]


def step_flops(model: encdec.EncoderDecoder, batch: int, enc_len: int, dec_len: int) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    def count(prefix: str) -> int:
        return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefix))

    encoder_kv = sum(b.attn.k_proj.weight.numel() + b.attn.v_proj.weight.numel() for b in model.decoder.layers)
    encoder_reads = (count("encoder.") + encoder_kv) * batch * enc_len
    decoder_reads = (count("decoder.") + model.embed.weight.numel()) * batch * dec_len
    return 6.0 * (encoder_reads + decoder_reads)


def prepare(directory: Path, args: argparse.Namespace) -> float:
    """Adapt the source with merged attention, save it to `directory` (T5Gemma 2 layout); returns step FLOPs."""
    model = encdec.adapt(encdec.load_source(SOURCE), attention="merged")
    encdec.save(model, directory)
    return step_flops(model, args.batch, args.enc_len, args.dec_len)


def time_steps(step: Callable[[], None], args: argparse.Namespace) -> list[float]:
    """Seconds of each of `args.steps` calls of `step` after `args.warmup` untimed calls."""
    return time_calls(step, args.warmup, args.steps, torch.device(args.device))


def batch_to(batch: Batch, device: torch.device) -> Batch:
    rows = batch.rows
    moved = {f.name: getattr(rows, f.name).to(device) for f in dataclasses.fields(rows)}
    return Batch(dataclasses.replace(rows, **moved), None)


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def time_encdec(
    directory: Path, examples: list[Example], args: argparse.Namespace, dtype: torch.dtype
) -> list[float]:
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    model = encdec.load(directory).to(device).train()
    module = LossModule(model, args.loss_chunk, distillation=None)
    optimizer = build_optimizer(module, lr=LR, weight_decay=WEIGHT_DECAY, decay_all=False)
    params = list(module.parameters())
    batch = batch_to(make_batch(examples, enc_len=args.enc_len, dec_len=args.dec_len, pad_id=PAD_ID, bos_id=BOS_ID,
                                with_teacher=False), device)

    def step() -> None:
        with autocast(device, dtype):
            parts = module(batch)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, args)


def time_transformers(
    directory: Path, examples: list[Example], args: argparse.Namespace, dtype: torch.dtype, fused: bool = False
) -> list[float]:
    device = torch.device(args.device)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        str(directory), attn_implementation="sdpa", dtype=torch.float32
    ).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=fused or None)
    params = list(model.parameters())
    input_ids = torch.tensor([e.inputs for e in examples], device=device)
    labels = torch.tensor([e.targets for e in examples], device=device)
    decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], BOS_ID), labels[:, :-1]], dim=1)
    attention_mask = torch.ones_like(input_ids)

    def step() -> None:
        with autocast(device, dtype):
            out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                        labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, args)


def time_transformers_keep(
    directory: Path, examples: list[Example], args: argparse.Namespace, dtype: torch.dtype
) -> list[float]:
    keep_freed_memory()
    return time_transformers(directory, examples, args, dtype)


def time_transformers_fused(
    directory: Path, examples: list[Example], args: argparse.Namespace, dtype: torch.dtype
) -> list[float]:
    return time_transformers(directory, examples, args, dtype, fused=True)


IMPLEMENTATIONS = {"encdec": time_encdec, "transformers": time_transformers,
                   "transformers+keep": time_transformers_keep, "transformers+fused": time_transformers_fused}


def implementations(device: torch.device) -> list[str]:
    return [name for name in IMPLEMENTATIONS if device.type == "cpu" or not name.endswith("+keep")]


def worker(args: argparse.Namespace) -> None:
    """One (implementation, precision) in this process; prints its step times and peak memory as JSON."""
    name, precision, directory = args.worker
    times = IMPLEMENTATIONS[name](Path(directory), random_examples(args.batch, args.enc_len, args.dec_len), args,
                                  DTYPES[precision])
    print_result({"step_seconds": times, "peak_gib": peak_memory_gib(torch.device(args.device))})


def measure(name: str, precision: str, directory: Path, args: argparse.Namespace) -> tuple[list[float], float]:
    """Step times and peak memory of one round of `name` in a fresh process."""
    options = ["--batch", str(args.batch), "--enc-len", str(args.enc_len), "--dec-len", str(args.dec_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
               "--loss-chunk", str(args.loss_chunk)]
    result = run_worker(__file__, [*options, "--worker", name, precision, str(directory)])
    return result["step_seconds"], result["peak_gib"]


def print_table(rows: list[Measured | Skipped], tokens: int, flops: float, peaks: dict[str, float]) -> None:
    print(f"{'implementation':<18}  {'precision':<9}  {'step s (median)':>15}  {'tokens/s':>9}  {'MFU %':>6}"
          f"  {'peak GiB':>8}")
    for row in rows:
        if isinstance(row, Skipped):
            print(f"{'(both)':<18}  {row.precision:<9}  skipped: {row.reason}")
            continue
        mfu = 100 * flops / row.seconds / peaks[row.precision]
        print(f"{row.implementation:<18}  {row.precision:<9}  {row.seconds:>15.3f}  {tokens / row.seconds:>9.1f}"
              f"  {mfu:>6.1f}  {row.peak_gib:>8.2f}")


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    device = torch.device(args.device)
    wanted = dict.fromkeys(["fp32", *args.precisions])  # fp32's rate is what bf16 is judged against
    peaks = {name: matmul_rate(DTYPES[name], device) for name in wanted}
    tokens = args.batch * (args.enc_len + args.dec_len)
    rows: list[Measured | Skipped] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        flops = prepare(directory, args)
        measured: dict[tuple[str, str], Measured] = {}
        for precision in args.precisions:
            if peaks[precision] * SLOW_FACTOR < peaks["fp32"]:
                rows.append(Skipped(precision, f"{precision} products run at {peaks[precision] / 1e9:.1f} GFLOP/s, "
                                               f"under 1/{SLOW_FACTOR} of fp32's {peaks['fp32'] / 1e9:.1f} GFLOP/s"))
                continue
            measured.update({(name, precision): Measured(name, precision, [], 0.0) for name in implementations(device)})
        # every precision in every round (the README compares bf16 with fp32: timed in blocks of their own, the two
        # were measured in different spells of a noisy machine)
        for round_ in range(1, args.rounds + 1):
            for (name, precision), row in in_turn(list(measured.items()), round_ - 1):
                print(f"round {round_}/{args.rounds}: timing {name} {precision} ...", file=sys.stderr, flush=True)
                times, peak = measure(name, precision, directory, args)
                row.rounds.append(times)
                row.peak_gib = max(row.peak_gib, peak)
        rows.extend(measured.values())
    # measured again at the end, the better kept: on a shared machine one short measurement can be slowed
    peaks = {name: max(rate, matmul_rate(DTYPES[name], device)) for name, rate in peaks.items()}

    print(f"device {device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else
          f"device {device} ({torch.cuda.get_device_name(device)})")
    print(f"batch {args.batch} x (enc {args.enc_len} + dec {args.dec_len}) = {tokens} tokens/step, "
          f"loss chunk {args.loss_chunk}, {flops / 1e12:.3f} model TFLOP/step, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"peak ({MATMUL_SIZE}x{MATMUL_SIZE} @ {MATMUL_SIZE}x{MATMUL_SIZE} product, best of rounds): "
          + ", ".join(f"{name} {rate / 1e9:.1f} GFLOP/s" for name, rate in peaks.items()))
    print_table(rows, tokens, flops, peaks)
    measured = {(r.implementation, r.precision): r for r in rows if isinstance(r, Measured)}
    ours = {precision: measured[("encdec", precision)] for precision in args.precisions
            if ("encdec", precision) in measured}
    for precision, row in ours.items():  # first: the last line is the goal's (the plain loop's)
        if precision != "fp32" and "fp32" in ours:  # the same rounds: paired
            print(ratio_line(f"encdec {precision} / encdec fp32", row.rounds, ours["fp32"].rounds))
    for precision, row in ours.items():
        for baseline in reversed(implementations(device)[1:]):  # the plain loop last
            theirs = measured[(baseline, precision)]
            print(ratio_line(f"encdec / {baseline}, {precision}", row.rounds, theirs.rounds))


if __name__ == "__main__":
    run_main(main)
