"""Greedy generation speed of the packaged 270M adapted: encdec versus transformers, CTranslate2 and the source.

Implementations, each in a process of its own, in float32 unless named otherwise, on the same prompts:

- encdec: `load_for_inference(DIR, ...).generate(...)` (what `encdec generate` runs: on CPU the weights
  packed for oneDNN's products, `encdec.inference.onednn`);
- encdec-blas: the same with `--cpu-kernels blas` (PyTorch's default products, as before the packing);
- encdec-bf16: the same with `--dtype bfloat16` (on CPU, oneDNN's bfloat16 products);
- encdec-int8: the same with `--quantize int8` (`encdec.inference.loading.load_for_inference`);
- transformers: `AutoModelForSeq2SeqLM.from_pretrained(DIR).generate(...)` on the same checkpoint;
- transformers+keep: the same in a process with this project's allocator setting (`encdec.allocator`: freed
  memory kept for reuse), which encdec's loading makes, so that the difference it alone makes shows;
- ct2-float32, ct2-bfloat16, ct2-int8: CTranslate2's `Translator.translate_batch` on the checkpoint
  converted by `encdec export --to ctranslate2` (float32 weights; bfloat16 and int8 weights with the
  compute type of the same name);
- decoder-only: the source, Gemma 3 270M, as transformers' `AutoModelForCausalLM`, reading the same
  prompt and generating as many tokens (what the encoder-decoder competes with).

Models: `merged` (balanced, merged attention: `encdec adapt`, saved in the T5Gemma 2 layout) and
`cross-2::3` (`--decoder-layers 2::3 --attention cross`: 18-layer encoder, 6-layer decoder, saved in the
project's own format, which neither transformers nor CTranslate2 can load: those rows say skipped and why).
Both are adapted once into --work-dir and reused.

Prompts: rows of exactly L tokens (BOS + L - 1 tokens) cut from the default corpus (the prose of Python's
language reference and the standard library's docstrings), different rows for different batch positions.
Every implementation generates exactly --new-tokens tokens per row, EOS ignored (no stopping), greedily.

The speed of a shared machine drifts, so implementations run in --rounds rounds: each round runs every
implementation once in turn (in reverse order every other round; before 2026-12-06's third session, in the
same order every round), in a fresh process that loads the model, makes one untimed 2-token call
per setting, then --repeats timed calls. The table gives the median wall seconds per call over all
rounds, the CPU seconds of the call (all threads of the process: less sensitive than wall time to other
processes taking turns on the cores, though not immune), new tokens per second (batch x new tokens /
wall seconds), the peak resident memory of the process (one process runs all of an implementation's settings: the
peak of them all, the same in each of its rows; bench/long_prompt_memory.py measures one length a process), and how
many of each row's tokens equal encdec's
float32 tokens. The ratio lines come last, CPU-time ones and then wall-time ones: encdec against
transformers, against transformers+keep, against CTranslate2 float32, encdec-bf16 against ct2-bfloat16,
encdec-int8 against ct2-int8, and encdec against encdec-blas (> 1: the first faster), with each round's ratio.

Run (the first use adapts the models, a few minutes; the full grid takes long on a 2-core CPU):

    python bench/generate_throughput.py
    python bench/generate_throughput.py --models merged --prompt-lengths 256 --batch-sizes 1,8 --rounds 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from common import (
    corpus_token_ids,
    cpu_only,
    in_turn,
    peak_memory_gib,
    print_result,
    ratio_line,
    require_distinct,
    require_positive,
    run_main,
    run_worker,
    time_calls,
)

SOURCE = "gemma-3-270m"
MODELS = {"merged": [], "cross-2::3": ["--decoder-layers", "2::3", "--attention", "cross"]}
IMPLEMENTATIONS = ("encdec", "encdec-blas", "encdec-bf16", "encdec-int8", "transformers", "transformers+keep",
                   "ct2-float32", "ct2-bfloat16", "ct2-int8", "decoder-only")
CT2_COMPUTE = {"ct2-float32": "float32", "ct2-bfloat16": "bfloat16", "ct2-int8": "int8"}
RATIOS = (("encdec", "transformers"), ("encdec", "transformers+keep"), ("encdec", "ct2-float32"),
          ("encdec-bf16", "ct2-bfloat16"), ("encdec-int8", "ct2-int8"), ("encdec", "encdec-blas"))
WARMUP_TOKENS = 2
DEVICE = torch.device("cpu")
Runner = Callable[[torch.Tensor, int], list[list[int]]]  # (prompt ids [B, L], new tokens) -> tokens per row


@dataclass
class Cell:
    """One implementation on one model at one prompt length and batch size, over all rounds."""

    rounds: list[list[float]] = field(default_factory=list)  # wall seconds per call, one list per round
    cpu_rounds: list[list[float]] = field(default_factory=list)  # CPU seconds (all threads) per call
    tokens: list[list[int]] = field(default_factory=list)  # the generated tokens of the last round
    peak_gib: float = 0.0

    @property
    def seconds(self) -> float:
        return statistics.median(t for r in self.rounds for t in r)

    @property
    def cpu_seconds(self) -> float:
        return statistics.median(t for r in self.cpu_rounds for t in r)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--implementations", default=",".join(IMPLEMENTATIONS), help="comma list of the implementations")
    p.add_argument("--prompt-lengths", default="256,1024", help="comma list of prompt lengths in tokens")
    p.add_argument("--batch-sizes", default="1,8", help="comma list of batch sizes")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (EOS ignored)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running every implementation once in turn")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per setting and round")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench"), help="where the adapted models are kept")
    p.add_argument("--worker", nargs=3, metavar=("IMPLEMENTATION", "MODEL_DIR", "PROMPTS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.models = args.models.split(",")
    args.implementations = args.implementations.split(",")
    for name, known in (("models", MODELS), ("implementations", IMPLEMENTATIONS)):
        require_distinct(p, f"--{name}", getattr(args, name))
        unknown = set(getattr(args, name)) - set(known)
        if unknown:
            p.error(f"--{name}: unknown {sorted(unknown)}; choose from {', '.join(known)}")
    try:
        args.prompt_lengths = [int(n) for n in args.prompt_lengths.split(",")]
        args.batch_sizes = [int(n) for n in args.batch_sizes.split(",")]
    except ValueError:
        p.error("--prompt-lengths and --batch-sizes take comma lists of integers, e.g. 256,1024")
    require_positive(p, args, ("new_tokens", "rounds", "repeats"))
    require_distinct(p, "--prompt-lengths", args.prompt_lengths)
    require_distinct(p, "--batch-sizes", args.batch_sizes)
    if min(args.prompt_lengths) < 2 or min(args.batch_sizes) < 1:
        p.error("prompt lengths must be at least 2 (BOS and one token), batch sizes at least 1")
    return args


def settings(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(length, batch) for length in args.prompt_lengths for batch in args.batch_sizes]


# ---- workers: one implementation, every setting, in this process ----

def encdec_runner(model_dir: Path, name: str) -> Runner:
    from encdec.inference.loading import load_for_inference

    dtype = torch.bfloat16 if name == "encdec-bf16" else torch.float32
    model = load_for_inference(model_dir, dtype, "int8" if name == "encdec-int8" else None,
                               "blas" if name == "encdec-blas" else "onednn")

    def run(ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
        return model.generate(ids, torch.ones_like(ids), max_new_tokens=new_tokens, eos_token_ids=[-1]).tolist()

    return run


def transformers_runner(model_dir: Path, causal: bool) -> Runner:
    import transformers

    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSeq2SeqLM
    model = auto.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # no stopping: exactly new_tokens per row

    def run(ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        # the causal model's output starts with the prompt, the encoder-decoder's with the decoder start token
        return out[:, ids.shape[1] if causal else 1:].tolist()

    return run


def ct2_runner(ct2_dir: Path, compute_type: str) -> Runner:
    import ctranslate2

    from encdec.sources import load_tokenizer

    tokenizer = load_tokenizer(ct2_dir)
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type=compute_type,
                                        intra_threads=torch.get_num_threads())
    strings: dict[tuple, list[list[str]]] = {}  # token strings of each batch, made before timing

    def run(ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
        key = tuple(map(tuple, ids.tolist()))
        if key not in strings:
            strings[key] = [tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
        results = translator.translate_batch(strings[key], beam_size=1, max_decoding_length=new_tokens, end_token=[],
                                             max_input_length=0)  # its default cuts inputs at 1024 tokens
        return [tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]

    return run


def time_setting(run: Runner, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """One untimed short call, then --repeats timed ones: their wall and CPU seconds, the last call's tokens."""
    run(ids, WARMUP_TOKENS)
    outputs: list[list[list[int]]] = []
    cpu: list[float] = []

    def call() -> None:
        start = time.process_time()  # all threads of this process
        outputs.append(run(ids, args.new_tokens))
        cpu.append(time.process_time() - start)

    seconds = time_calls(call, 0, args.repeats, DEVICE)
    lengths = sorted({len(row) for out in outputs for row in out})
    if lengths != [args.new_tokens]:  # tokens/s counts --new-tokens a row: rows of other lengths would skew it
        raise RuntimeError(f"rows of {lengths} tokens, not the {args.new_tokens} asked for")
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": outputs[-1]}


def worker(args: argparse.Namespace) -> None:
    """Time one implementation on every setting; prints seconds, tokens and peak memory as JSON."""
    import json

    name, model_dir, prompts_file = args.worker
    prompts = {int(k): v for k, v in json.loads(Path(prompts_file).read_text()).items()}
    if name.startswith("ct2-"):
        run = ct2_runner(Path(model_dir), CT2_COMPUTE[name])
    elif name.startswith("encdec"):
        run = encdec_runner(Path(model_dir), name)
    else:
        if name == "transformers+keep":  # the allocator setting encdec's loading makes (`encdec.allocator`)
            from encdec.allocator import keep_freed_memory

            keep_freed_memory()
        run = transformers_runner(Path(model_dir), causal=name == "decoder-only")
    result = {}
    for length, batch in settings(args):
        ids = torch.tensor(prompts[length][:batch])
        print(f"  {name} prompt {length} batch {batch}", file=sys.stderr, flush=True)
        result[f"{length}x{batch}"] = time_setting(run, ids, args)
    print_result({"cells": result, "peak_gib": peak_memory_gib(DEVICE)})


# ---- the parent: prepare models and prompts, run rounds, print the table ----

def encdec_command(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "encdec.cli", *arguments], check=True, stdout=subprocess.DEVNULL)


def prepare_model(name: str, work_dir: Path) -> Path:
    directory = work_dir / name.replace("::", "-")
    if not directory.exists():
        print(f"adapting {SOURCE} into {directory} ...", file=sys.stderr, flush=True)
        encdec_command("adapt", "--encoder", SOURCE, *MODELS[name], "--out", str(directory))
    return directory


def prepare_ct2(model_dir: Path, implementation: str) -> Path | str:
    """The `encdec export --to ctranslate2` conversion of `model_dir` for `implementation`, or the one line
    saying why there is none."""
    import hashlib

    import encdec.formats.ctranslate2 as exporter
    from encdec.training.rundir import start_model_digest

    out = model_dir.with_name(f"{model_dir.name}-{implementation}")
    # the model it was converted from, by content, and the exporter that converted it (its code: the package's
    # version stays 0.1.0 through its fixes): a conversion of the model before it was adapted again, or by an older
    # exporter or CTranslate2, was timed, and its tokens compared, as if it were this one's
    try:
        converter = version("ctranslate2")
    except PackageNotFoundError:
        converter = "none"
    code = hashlib.sha256(Path(exporter.__file__).read_bytes()).hexdigest()[:16]
    source = f"{start_model_digest(str(model_dir))} exporter {code} ctranslate2 {converter}"  # (encdec's version:
    # the exporter's code says it; a checkout run with PYTHONPATH=src has no installed version to read)
    marker = out / ".converted-from"
    if not marker.exists() or marker.read_text() != source:
        print(f"converting {model_dir} into {out}" + (" again (it held a conversion of another model, or by another "
              "exporter)" if out.exists() else "") + " ...", file=sys.stderr, flush=True)
        if marker.exists():  # this script's own conversion (one of before exports were marked is not replaceable)
            shutil.rmtree(out)
        done = subprocess.run([sys.executable, "-m", "encdec.cli", "export", str(model_dir), "--to", "ctranslate2",
                               "--out", str(out), "--quantization", CT2_COMPUTE[implementation], "--overwrite"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if done.returncode == 2:
            return done.stderr.strip().splitlines()[-1].removeprefix("encdec export: error: ")
        done.check_returncode()
        marker.write_text(source)
    return out


def make_prompts(tokenizer_dir: Path, args: argparse.Namespace, path: Path) -> None:
    """Rows of exactly L tokens (BOS first) from the default corpus, one per batch position."""
    import json

    from encdec.sources import load_tokenizer

    rows, longest = max(args.batch_sizes), max(args.prompt_lengths)
    ids = corpus_token_ids(tokenizer_dir, rows * longest)
    bos = load_tokenizer(tokenizer_dir).bos_token_id
    prompts = {length: [[bos] + ids[r * longest: r * longest + length - 1] for r in range(rows)]
               for length in args.prompt_lengths}
    path.write_text(json.dumps(prompts))


def skip_reason(implementation: str, model_dir: Path, ct2: dict[str, Path | str]) -> str | None:
    from encdec.checkpoint import NATIVE, checkpoint_format

    if implementation in CT2_COMPUTE and isinstance(ct2[implementation], str):
        return ct2[implementation]
    if implementation in CT2_COMPUTE:
        import ctranslate2

        supported = ctranslate2.get_supported_compute_types("cpu")
        if CT2_COMPUTE[implementation] not in supported:
            return (f"CTranslate2 {ctranslate2.__version__} computes {', '.join(sorted(supported))} on this CPU, "
                    f"not {CT2_COMPUTE[implementation]}")
    if implementation.startswith("transformers") and checkpoint_format(model_dir) == NATIVE:
        return f"{model_dir} is in this project's own format: no transformers class holds its configuration"
    return None


def worker_options(args: argparse.Namespace) -> list[str]:
    return ["--prompt-lengths", ",".join(map(str, args.prompt_lengths)), "--batch-sizes",
            ",".join(map(str, args.batch_sizes)), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> str:
    """Positions where the tokens equal the reference's, of all positions either has (a longer or shorter row
    disagrees where the other has no token)."""
    same = sum(a == b for x, y in zip(tokens, reference) for a, b in zip(x, y))
    total = sum(max(len(x), len(y)) for x, y in zip(tokens, reference)) + abs(len(tokens) - len(reference))
    return f"{same}/{total}"


def main() -> None:
    cpu_only()
    args = parse_args()
    if args.worker:
        worker(args)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    models = {name: prepare_model(name, args.work_dir) for name in args.models}
    prompts = args.work_dir / "prompts.json"
    make_prompts(next(iter(models.values())), args, prompts)
    groups: list[tuple[str, str, Path]] = []  # (model, implementation, directory) to run in each round
    skipped: list[tuple[str, str, str]] = []
    for model, directory in models.items():
        ct2 = {impl: prepare_ct2(directory, impl) for impl in CT2_COMPUTE if impl in args.implementations}
        for impl in args.implementations:
            if impl == "decoder-only":
                continue
            reason = skip_reason(impl, directory, ct2)
            if reason:
                skipped.append((model, impl, reason))
            else:
                groups.append((model, impl, ct2[impl] if impl in CT2_COMPUTE else directory))
    if "decoder-only" in args.implementations:
        from encdec.sources import resolve

        groups.append((SOURCE, "decoder-only", resolve(SOURCE)))
    cells: dict[tuple[str, str, str], Cell] = {}
    for round_ in range(1, args.rounds + 1):
        for model, impl, directory in in_turn(groups, round_ - 1):
            print(f"round {round_}/{args.rounds}: {model} {impl} ...", file=sys.stderr, flush=True)
            result = run_worker(__file__, [*worker_options(args), "--worker", impl, str(directory), str(prompts)])
            for key, measured in result["cells"].items():
                cell = cells.setdefault((model, impl, key), Cell())
                cell.rounds.append(measured["seconds"])
                cell.cpu_rounds.append(measured["cpu_seconds"])
                cell.tokens = measured["tokens"]
                cell.peak_gib = max(cell.peak_gib, result["peak_gib"])

    print(f"device cpu ({torch.get_num_threads()} threads), float32 unless named, greedy, {args.new_tokens} new tokens per row "
          f"(EOS ignored), median of {args.rounds} round(s) x {args.repeats} call(s); peak GiB: an implementation's "
          "process over all its settings")
    print(f"{'model':<13}  {'implementation':<17}  {'prompt':>6}  {'batch':>5}  {'seconds':>8}  {'CPU s':>7}"
          f"  {'new tok/s':>9}  {'peak GiB':>8}  tokens = encdec's")
    for model, impl, _ in groups:
        for length, batch in settings(args):
            cell = cells[(model, impl, f"{length}x{batch}")]
            reference = cells.get((model, "encdec", f"{length}x{batch}"))
            same = agreement(cell.tokens, reference.tokens) if reference and impl != "encdec" else "-"
            print(f"{model:<13}  {impl:<17}  {length:>6}  {batch:>5}  {cell.seconds:>8.2f}  {cell.cpu_seconds:>7.1f}"
                  f"  {batch * args.new_tokens / cell.seconds:>9.1f}  {cell.peak_gib:>8.2f}  {same}")
    for model, impl, reason in skipped:
        print(f"{model:<13}  {impl:<17}  skipped: {reason}")
    for kind in ("cpu", "wall"):  # the wall-clock ratios last
        for model in models:
            for length, batch in settings(args):
                for ours, theirs in RATIOS:
                    a, b = (cells.get((model, impl, f"{length}x{batch}")) for impl in (ours, theirs))
                    if a and b:
                        label = (f"{model}, prompt {length}, batch {batch}: speed of {ours} over {theirs}, "
                                 f"their {kind} s / ours")
                        print(ratio_line(label, *((a.cpu_rounds, b.cpu_rounds) if kind == "cpu" else (a.rounds, b.rounds))))


if __name__ == "__main__":
    run_main(main)
