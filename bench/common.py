"""Helpers the bench/ scripts share: timing, one implementation per process, ratio lines over rounds.

Every benchmark runs each implementation in a process of its own (a setting or a library can be
process-wide, and a fresh process starts with nothing cached), and repeats the whole set in rounds so
that a slow spell of a shared machine falls on all implementations rather than on one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from encdec.errors import EncdecError

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_steps(model, ids: torch.Tensor, new_tokens: int, hidden=None) -> tuple[list[list[int]], list[float]]:
    """Greedy tokens of every row and each step's seconds through the decoding engine, its decoder step
    (`Engine.hidden`) replaced by `hidden` (a compiled one) when given."""
    import functools

    from encdec.inference.engine import Engine, Row

    engine = Engine(model, len(ids))
    if hidden is not None:
        engine.hidden = functools.partial(hidden, engine)
    rows = [Row(new_tokens, frozenset()) for _ in range(len(ids))]
    engine.join(list(ids), rows)
    if hidden is not None:  # the buffers the step writes in place are not reallocated here (no row outgrows them):
        # marked static, or inductor skips CUDA graphs ("mutated inputs") and "reduce-overhead" measures nothing new
        for k, v in engine.self_kv + engine.enc_kv:
            torch._dynamo.mark_static_address(k)
            torch._dynamo.mark_static_address(v)
        for buffer in (engine.enc_bias, engine.positions, engine.last, engine.key_positions):
            torch._dynamo.mark_static_address(buffer)
    seconds = []
    while engine.rows:
        synchronize(ids.device)
        start = time.perf_counter()
        engine.step()
        synchronize(ids.device)
        seconds.append(time.perf_counter() - start)
    return [row.tokens for row in rows], seconds


def time_calls(call: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` calls of `call` after `warmup` untimed ones (printed to stderr too)."""
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    print("  seconds: " + ", ".join(f"{t:.2f}" for t in times), file=sys.stderr, flush=True)
    return times


def peak_rss_gib(pid: int) -> float:
    """A process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: a worker started from a parent
    inherits the parent's peak in it (a parent at 1.5 GiB made a 13 MB child report 1.5 GiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"no VmHWM for process {pid}")


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak memory allocated by torch; CPU: this process's peak resident memory (loading included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib(os.getpid())


def cpu_only() -> None:
    """Hide any GPU from this process and the workers and servers it starts: these benchmarks compare CPU
    implementations, and encdec's loading would take a GPU where the baselines stay on the CPU."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def in_turn(items: Sequence[T], round_index: int) -> list[T]:
    """`items` in order in even rounds (counted from 0), reversed in odd ones: a machine's drift within a round
    then weighs on both sides of a comparison alike."""
    return list(items) if round_index % 2 == 0 else list(items)[::-1]


def run_worker(script: str | Path, arguments: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `script` with `arguments` in a fresh Python process (with `env` in place of this one's environment,
    where given); its last stdout line is its JSON result."""
    out = subprocess.run([sys.executable, str(script), *arguments], stdout=subprocess.PIPE, text=True, env=env,
                         check=False)
    if out.returncode != 0:  # its own error is above, on stderr: one line here, not a CalledProcessError's traceback
        raise SystemExit(f"{Path(script).name} {' '.join(arguments)} failed (exit status {out.returncode}; its "
                         "error is above)")
    return json.loads(out.stdout.strip().splitlines()[-1])


def int_list(text: str) -> list[int]:
    """An argparse type: a comma list of integers ("1,8"); anything else is the parser's usage error."""
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers like 1,8, got {text!r}") from None


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Stop with the parser's usage error when one of the integer options `names` is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def require_distinct(parser: argparse.ArgumentParser, option: str, values: list) -> None:
    """Stop with the parser's usage error when the list option `option` names a value twice (its rows and ratio
    lines would be printed twice, or a setting run twice a round and paired wrongly)."""
    if len(set(values)) < len(values):
        parser.error(f"{option} {','.join(map(str, values))}: each value at most once")


def print_result(result: dict) -> None:
    """A worker's answer to `run_worker`: one JSON line, the last on stdout."""
    print(json.dumps(result), flush=True)


def ratio_line(label: str, ours: list[list[float]], theirs: list[list[float]]) -> str:
    """`label`: theirs / ours, the median of the rounds' ratios (each round's medians; rounds pair the two sides
    measured in the same spell, which pooling all seconds would undo: a pooled ratio fell below both of its
    rounds'), then each round's ratio (the spread)."""
    ratios = [statistics.median(b) / statistics.median(a) for a, b in zip(ours, theirs)]
    rounds = ", ".join(f"{r:.2f}x" for r in ratios)
    return f"ratio ({label}): {statistics.median(ratios):.2f}x (rounds: {rounds})"


def corpus_token_ids(tokenizer_dir: Path, count: int) -> list[int]:
    """At least `count` token ids of the default corpus (packaged text: Python's language reference and the
    standard library's docstrings), in order, without special tokens."""
    from encdec.data.corpus import default_corpus
    from encdec.sources import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    ids: list[int] = []
    for document in default_corpus():
        ids.extend(tokenizer(document, add_special_tokens=False).input_ids)
        if len(ids) >= count:
            return ids
    raise EncdecError(f"the default corpus has only {len(ids)} tokens, fewer than the {count} asked for: ask for "
                      "fewer or shorter prompts")


def run_main(main: Callable[[], None]) -> None:
    """A script's entry point: an error of encdec's (a mistyped model path, options the corpus cannot serve) is one
    line and exit status 2, as the CLI's, not a traceback."""
    try:
        main()
    except EncdecError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
