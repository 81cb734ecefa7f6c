"""How fast adaptation recovers the source's quality: held-out suffix NLL against training tokens, per recipe.

Each recipe is the quickstart's before the grid (PrefixLM + distillation, 4 rows of 64 + 64 tokens, lr 3e-4,
Python's documentation, vocabulary trimmed to 8,192 tokens with sampled negatives) with some options changed. Every
`--eval-every` steps its checkpoint is mapped back to the full vocabulary and scored on both held-out
sets (in-domain Python documentation, general English) over the full vocabulary; the decoder-only
source is the baseline line. Results are appended to OUT/results.jsonl as they come, so an
interrupted study resumes where it stopped (a finished recipe is skipped, a started one resumed),
and OUT/recovery.png is drawn from them. A recipe's checkpoints are deleted once all are scored (its final
model stays in OUT/NAME/model).

    python bench/recovery.py --model runs/quickstart/adapted --out runs/recovery --steps 40 --eval-every 10 \\
        --recipe default --recipe no-negatives:trim_negatives=0 --recipe untrimmed:trim_vocab=0

A recipe is NAME or NAME:option=value,option=value with TrainConfig's option names (YAML values); see study.py.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from common import run_main
from study import append, check_recipe, parse_recipe, read_results, recipe_config, tokens_per_step

from encdec.checkpoint import load, read_metadata
from encdec.data.corpus import HELDOUT_SETS
from encdec.data.tokens import packaged_text_versions
from encdec.errors import EncdecError
from encdec.evaluation.nll import PrefixSuffix, decoder_only_suffix_nll, encdec_suffix_nll, split_passages
from encdec.files import portable_path, read_weights
from encdec.inference.loading import model_framing
from encdec.objectives import PLAIN, Framing
from encdec.sources import load_source, load_tokenizer
from encdec.training import checkpointing
from encdec.training.loop import train
from encdec.training.plain_state import read_state
from encdec.training.rundir import start_model_digest
from encdec.training.vocab import full_vocabulary_model


def score(model, sets: dict[str, PrefixSuffix], framing: Framing = PLAIN) -> dict[str, float]:
    return {name: round(encdec_suffix_nll(model.eval(), data, framing=framing), 4) for name, data in sets.items()}


def run_recipe(name: str, options: dict, args: argparse.Namespace, sets: dict[str, PrefixSuffix],
               results: Path, trained: bool, done: set[tuple[str, int]]) -> None:
    """Train the recipe unless it was (`trained`), then score each checkpoint not scored yet (`done`: (recipe,
    step) pairs scored); the checkpoints go once every evaluated step is scored."""
    steps, every = args.steps, args.eval_every
    cfg = recipe_config(options, model=args.model, out=args.out / name, steps=steps, seed=args.seed, save_every=every,
                        keep_last=steps // every + 1)
    if not trained:
        began = time.perf_counter()
        # a run stopped before its first checkpoint left its metrics.jsonl, which only --resume trains past
        cfg.resume = Path(cfg.out).is_dir()
        # its options recorded before the first step: a run stopped midway is resumed only under the same ones
        append(results, {"recipe": name, "event": "started", "options": options})
        try:
            train(cfg)
        except EncdecError as e:
            raise SystemExit(f"training recipe {name!r} failed: {e}") from None
        append(results, {"recipe": name, "event": "trained", "steps": steps, "seconds": round(time.perf_counter() - began),
                         "options": options})
    start = load(args.model)
    final = Path(cfg.out) / "model"  # its provenance: how it reads a continuation (UL2's: after a sentinel)
    framing = model_framing(final, load_tokenizer(final))
    for path in checkpointing.checkpoints(Path(cfg.out)):
        step = int(path.name.split("-")[1])
        if (name, step) in done:
            continue
        keep = read_state(path, "trainer").get("kept_tokens")  # a numpy array, or None when untrimmed
        model = full_vocabulary_model(read_weights(path), start, keep)
        append(results, {"recipe": name, "step": step, "tokens": step * tokens_per_step(cfg),
                         "nll": score(model, sets, framing)})
        done.add((name, step))
    if all((name, step) in done for step in range(every, steps + 1, every)):  # scored: only the final model stays
        shutil.rmtree(Path(cfg.out) / "checkpoints", ignore_errors=True)  # (2.4 GB a checkpoint of the 270M)


def source_nll(args: argparse.Namespace, sets: dict[str, PrefixSuffix]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    spec = read_metadata(args.model)["adapted_from"]["encoder"]
    reference = AutoModelForCausalLM.from_pretrained(str(load_source(spec).directory), dtype=torch.float32).eval()
    return {name: round(decoder_only_suffix_nll(reference, data), 4) for name, data in sets.items()}


def plot(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = next(r["nll"] for r in records if r.get("recipe") == "source")
    fig, axes = plt.subplots(1, len(HELDOUT_SETS), figsize=(6 * len(HELDOUT_SETS), 4.5))
    for ax, name in zip(axes, HELDOUT_SETS):
        recipes = list(dict.fromkeys(r["recipe"] for r in records if "tokens" in r))
        colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 recipes (the default cycle has 10)
        for i, recipe in enumerate(recipes):
            points = sorted((r["tokens"], r["nll"][name]) for r in records if r.get("recipe") == recipe and "tokens" in r)
            ax.plot(*zip(*points), marker="o", label=recipe, color=colors[i % len(colors)])
        ax.axhline(source[name], color="black", linestyle="--", label="decoder-only source")
        trained = [r["nll"][name] for r in records if r.get("tokens")]
        start = next((r["nll"][name] for r in records if r.get("tokens") == 0), None)
        if trained:  # the untrained start is far above: the scale is the trained points'
            ax.set_ylim(min(source[name], *trained) - 0.2, max(trained) + 0.2)
        note = "" if start is None else f" (start: {start:.2f}, off the scale)"
        ax.set(title=f"held-out {name}{note}", xlabel="training tokens", ylabel="suffix NLL (nats/token)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "recovery.png"
    fig.savefig(path, dpi=100)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/quickstart/adapted"), help="the adapted model")
    parser.add_argument("--out", type=Path, default=Path("runs/recovery"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", action="append", default=[], help="NAME[:option=value,...] (repeat)")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: the plot and table of every recipe that OUT/results.jsonl holds")
    args = parser.parse_args()
    results = args.out / "results.jsonl"
    if args.report:
        if not results.exists():
            parser.error(f"--report: {results} does not exist")
        report(results, list(dict.fromkeys(r["recipe"] for r in read_results(results) if "step" in r)), args.out)
        return
    if args.steps < 1 or args.eval_every < 1 or args.steps % args.eval_every:
        parser.error("--steps and --eval-every must be at least 1, and --steps a multiple of --eval-every")
    try:  # e.g. distill with ul2, a --seed below 0: one line, before any work
        recipes = [parse_recipe(text) for text in args.recipe or ["default"]]
        for name, options in recipes:
            check_recipe(options)
            recipe_config(options, model=args.model, out=args.out / name, steps=args.steps, seed=args.seed)
    except EncdecError as e:
        parser.error(str(e))
    if not args.model.is_dir():
        parser.error(f"--model {args.model}: no such checkpoint directory")
    adapted_from = read_metadata(args.model).get("adapted_from")  # the source's baseline: before OUT is made
    if not isinstance(adapted_from, dict) or not isinstance(adapted_from.get("encoder"), str):  # a KeyError otherwise
        parser.error(f"{args.model}: its encdec.json names no source (adapted_from); give a model made by "
                     "`encdec adapt`")
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model)
    sets = {name: split_passages(tokenizer, passages(), 64, 64) for name, (_, passages) in HELDOUT_SETS.items()}
    records = read_results(results)
    study = {"model": portable_path(str(args.model)), "seed": args.seed, "steps": args.steps,
             "eval_every": args.eval_every}
    recorded = next((r for r in records if r.get("recipe") == "study"), None)
    weights = start_model_digest(str(args.model))  # by content: the same path adapted again is another model
    texts = packaged_text_versions()  # the held-out passages come from this Python's documentation
    if recorded is None:
        append(results, {"recipe": "study", **study, "weights": weights, "texts": texts})
    elif {k: recorded.get(k) for k in study} != study:  # the baselines and every curve in OUT were made so
        parser.error(f"{args.out} holds a study of {recorded}, not {study}: use another --out")
    elif None not in (recorded.get("weights"), weights) and recorded["weights"] != weights:  # (studies before it)
        parser.error(f"{args.out} holds a study of the model {args.model} held before (its weights differ now: adapted "
                     "again?); its baselines and curves are of that one: use another --out")
    elif recorded.get("texts") not in (None, texts):  # a curve of two held-out sets otherwise
        parser.error(f"{args.out} holds a study scored on the held-out passages of {', '.join(recorded['texts'])}; "
                     f"this environment carries {', '.join(texts)}, whose passages differ: use another --out")
    if not any(r.get("recipe") == "source" for r in records):
        append(results, {"recipe": "source", "nll": source_nll(args, sets)})
    start_nll = next((r for r in records if r.get("recipe") == "adapted"), None)
    if start_nll is None:
        append(results, {"recipe": "adapted", "tokens": 0, "nll": score(load(args.model), sets)})
    for name, options in recipes:
        records = read_results(results)
        before = [r for r in records if r.get("event") in ("started", "trained") and r["recipe"] == name]
        if before and before[-1]["options"] != options:  # the curve in OUT would be reported under these options
            parser.error(f"recipe {name!r} was run in {args.out} with {before[-1]['options']}, not {options}: give it "
                         "another name, or another --out")
        done = {(r["recipe"], r["step"]) for r in records if "step" in r}
        trained = any(r.get("event") == "trained" for r in before)
        run_recipe(name, options, args, sets, results, trained, done)
    report(results, [name for name, _ in recipes], args.out)


def report(results: Path, names: list[str], out: Path) -> None:
    """The plot, a markdown table (suffix NLL per recipe at each evaluated token count) and each recipe's gap."""
    records = read_results(results)
    missing = [what for what in ("source", "adapted") if not any(r.get("recipe") == what for r in records)]
    if missing:  # a first run stopped while it scored the baselines (minutes): a StopIteration's traceback
        raise SystemExit(f"{results} holds no score of the {' and the '.join(missing)} model yet (its first run "
                         "stopped before them): run the study again to score them")
    for name in names:  # every recipe starts from the adapted model
        records.append({**next(r for r in records if r["recipe"] == "adapted"), "recipe": name})
    records = [r for r in records if r["recipe"] != "adapted"]
    print(f"plot: {plot(records, out)}")
    source = next(r["nll"] for r in records if r["recipe"] == "source")
    scored = {(r["recipe"], r["tokens"]): r["nll"] for r in records if "tokens" in r}
    sets = " / ".join(HELDOUT_SETS)
    print(f"\nheld-out suffix NLL, {sets}; the decoder-only source: " + " / ".join(f"{source[n]:.3f}" for n in HELDOUT_SETS))
    counts = sorted({t for _, t in scored})  # one row per recipe (grids grow long), one column per token count
    print("\n| recipe | " + " | ".join(f"{t:,} tokens" for t in counts) + " |\n" + "|---" * (len(counts) + 1) + "|")
    for name in names:
        cells = [" / ".join(f"{scored[name, t][n]:.3f}" for n in HELDOUT_SETS) if (name, t) in scored else ""
                 for t in counts]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for name in names:
        last = max((r for r in records if r["recipe"] == name and "tokens" in r), key=lambda r: r["tokens"])
        gaps = ", ".join(f"{n} {last['nll'][n] - source[n]:+.3f}" for n in HELDOUT_SETS)
        print(f"gap to the source after {last['tokens']} tokens, {name}: {gaps} nats")

if __name__ == "__main__":
    run_main(main)
