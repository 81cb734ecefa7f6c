"""The paper's encoder claim on this machine's budget: classification from the adapted encoder's
representations against the decoder-only source's, on BoolQ, CB, COPA and RTE.

Every cell (backbone x protocol x task) is one `encdec classify` run, written atomically to
OUT/BACKBONE/PROTOCOL/TASK/results.json; a cell whose results exist is not run again, so an interrupted
comparison resumes where it stopped. Protocols:

- probe: frozen backbone, cached pooled features, logistic regression with C chosen on dev splits of
  the training data (`encdec classify --probe`);
- search: full fine-tuning with the learning rate x epochs x head learning rate chosen on dev splits
  (`encdec classify --search`).

BoolQ trains on (a seeded sample of) its training split and is scored on validation; CB, COPA and RTE
are k-fold cross-validated over validation, as `encdec classify` does. Nothing is chosen on the
reported split. The table gives each cell's accuracy with its 95% Wilson interval, the majority-class
baseline, and per backbone and protocol the SuperGLUE-style average (the mean of the four tasks' scores,
CB scored as the mean of accuracy and macro-F1 as SuperGLUE does) with a 95% interval from the
per-task variances (binomial for accuracies, bootstrapped for CB's score). The last lines compare each
adapted backbone with the decoder-only one.

    python bench/encoder_claim.py --out runs/encoder-claim \\
        --backbone decoder-only=gemma-3-270m --backbone adapted-init=runs/frontier/balanced/adapted \\
        --backbone adapted-trained=runs/frontier/balanced/train/model --protocol probe

(the two adapted backbones as bench/frontier.py leaves them: the balanced adaptation before and after
its 102k training tokens). Options after `--` go to every cell's `encdec classify` (`-- --pooling mean`);
`--search-args` / `--probe-args` to one protocol's cells, and with a TASK= prefix to one task's
(`--search-args='boolq=--grid-epochs 1'`: BoolQ's training split is 100x a k-fold task's).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

TASKS = ("boolq", "cb", "copa", "rte")
PROTOCOLS = {"probe": ["--probe"], "search": ["--search"]}
Z95 = 1.959964
BOOTSTRAP_DRAWS = 2000  # resamples of CB's examples for the variance of its score


def parse_backbone(text: str) -> tuple[str, str]:
    name, sep, model = text.partition("=")
    if not sep or not name or not model:
        raise argparse.ArgumentTypeError(f"--backbone takes NAME=MODEL (a directory, GGUF or source name), got {text!r}")
    return name, model


def protocol_options(values: list[str], task: str) -> list[str]:
    """The options of --search-args / --probe-args values for `task`'s cell: 'OPTIONS' go to every task's cells,
    'TASK=OPTIONS' to that task's only (after the others: BoolQ, with 100x the training examples of the k-fold
    tasks, wants fewer epochs; the last of a repeated option is the one `encdec classify` keeps)."""
    general: list[str] = []
    specific: list[str] = []
    for value in values:
        named, sep, rest = value.partition("=")
        if sep and re.fullmatch(r"\s*[A-Za-z_]\w*\s*", named):  # TASK=...; options begin with -
            named = named.strip().lower()
            if named not in TASKS:
                sys.exit(f"--search-args / --probe-args {value!r}: {named!r} is not a task; "
                         f"accepted: {', '.join(TASKS)}")
            specific += shlex.split(rest) if named == task else []
        else:
            general += shlex.split(value)
    return general + specific


def run_cell(model: str, task: str, protocol: str, out: Path, args: argparse.Namespace) -> dict | None:
    """The cell's results.json, running `encdec classify` first unless it exists (with --table-only: None for a
    cell not run yet)."""
    results, recorded = out / "results.json", out.with_name(f"{out.name}.command.json")
    options = [model, "--task", task, "--seed", str(args.seed), *PROTOCOLS[protocol]]
    if task == "boolq":
        options += ["--limit", str(args.boolq_train), "--eval-limit", str(args.boolq_eval)]
    options += protocol_options(getattr(args, f"{protocol}_args"), task) + args.classify_args
    if results.exists():
        if not recorded.exists() or json.loads(recorded.read_text()) != options:
            sys.exit(f"{out} holds a run of other settings ({recorded}); use another --out or delete it")
        return json.loads(results.read_text())
    if args.table_only:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(options))
    # no classifier: every cell would save a copy of its backbone (1.1 GB for the 270M) that no table reads
    command = [sys.executable, "-m", "encdec.cli", "classify", *options, "--no-save", "--out", str(out)]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(results.read_text())


def macro_f1(predictions: list[dict], labels: list | None = None) -> float:
    labels = labels or sorted({p["label"] for p in predictions} | {p["prediction"] for p in predictions})
    scores = []
    for label in labels:
        tp = sum(p["label"] == label and p["prediction"] == label for p in predictions)
        fp = sum(p["label"] != label and p["prediction"] == label for p in predictions)
        fn = sum(p["label"] == label and p["prediction"] != label for p in predictions)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def task_score(result: dict) -> float:
    """SuperGLUE's score of a task: accuracy, except CB's mean of accuracy and macro-F1."""
    if result["task"] == "cb":
        return (result["accuracy"] + macro_f1(result["predictions"])) / 2
    return result["accuracy"]


def score_variance(result: dict) -> float:
    """The variance of a task's score: binomial for an accuracy; for CB's mean of accuracy and macro-F1, which has
    no closed form (F1 over 56 examples moves more than accuracy does), a seeded bootstrap over its examples."""
    if result["task"] != "cb":
        return result["accuracy"] * (1 - result["accuracy"]) / result["n"]
    predictions = result["predictions"]
    labels = sorted({p["label"] for p in predictions} | {p["prediction"] for p in predictions})
    rng, scores = random.Random(0), []
    for _ in range(BOOTSTRAP_DRAWS):
        sample = rng.choices(predictions, k=len(predictions))
        accuracy = sum(p["label"] == p["prediction"] for p in sample) / len(sample)
        scores.append((accuracy + macro_f1(sample, labels)) / 2)
    return statistics.variance(scores)


def average(results: list[dict]) -> tuple[float, float]:
    """The mean task score and the half-width of its 95% interval (the tasks are independent samples: the sum of
    their scores' variances, `score_variance`, over the number of tasks squared)."""
    mean = sum(task_score(r) for r in results) / len(results)
    variance = sum(score_variance(r) for r in results) / len(results) ** 2
    return mean, Z95 * math.sqrt(variance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/encoder-claim"))
    parser.add_argument("--backbone", type=parse_backbone, action="append", default=[],
                        help="NAME=MODEL (repeat); default: decoder-only=gemma-3-270m, adapted-init=runs/quickstart/adapted")
    parser.add_argument("--protocol", choices=PROTOCOLS, action="append", default=[], help="probe and/or search")
    parser.add_argument("--task", choices=TASKS, action="append", default=[])
    parser.add_argument("--boolq-train", type=int, default=2000, help="BoolQ training examples (seeded sample)")
    parser.add_argument("--boolq-eval", type=int, default=1000, help="BoolQ validation examples (seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search-args", action="append", default=[], metavar="'[TASK=]OPTIONS'",
                        help="`encdec classify` options of the search cells only, e.g. "
                             "--search-args='--grid-lr 1e-5,3e-5'; TASK= for that task's cells only, after the "
                             "others: --search-args='boolq=--grid-epochs 1' (repeat)")
    parser.add_argument("--probe-args", action="append", default=[], metavar="'[TASK=]OPTIONS'",
                        help="the same for the probe cells")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: the table of the cells done so far (others shown as -)")
    parser.add_argument("classify_args", nargs="*", help="after --: more `encdec classify` options for every cell")
    args = parser.parse_args()
    backbones = args.backbone or [("decoder-only", "gemma-3-270m"), ("adapted-init", "runs/quickstart/adapted")]
    if len({name for name, _ in backbones}) < len(backbones):
        parser.error("--backbone: every NAME must differ (it names the backbone's results directory)")
    protocols, tasks = args.protocol or ["probe"], args.task or list(TASKS)
    table: dict[tuple[str, str], list[dict | None]] = {}
    for protocol in protocols:
        for task in tasks:
            for name, model in backbones:
                result = run_cell(model, task, protocol, args.out / name / protocol / task, args)
                table.setdefault((name, protocol), []).append(result)

    print(f"{'backbone':<18} {'protocol':<8} " + " ".join(f"{t:>21}" for t in tasks) + f" {'average':>15}")
    for (name, protocol), results in table.items():
        cells = " ".join(f"{'-':>21}" if r is None else f"{r['accuracy']:.3f} [{r['interval'][0]:.3f},{r['interval'][1]:.3f}]"
                         for r in results)
        print(f"{name:<18} {protocol:<8} {cells} {summary(results)}")
    done = [r for results in table.values() for r in results if r is not None]
    baselines = {r["task"]: r["majority_baseline"]["accuracy"] for r in done}
    print(f"{'majority class':<18} {'':<8} " + " ".join(f"{baselines[t]:>21.3f}" if t in baselines else f"{'-':>21}"
                                                          for t in tasks))
    reference = backbones[0][0]
    for protocol in protocols:
        if None in table[(reference, protocol)]:
            continue
        base, _ = average(table[(reference, protocol)])
        for name, _ in backbones[1:]:
            if None not in table[(name, protocol)]:
                mean, _ = average(table[(name, protocol)])
                print(f"difference ({protocol}, {name} - {reference}): {mean - base:+.3f} average score")


def summary(results: list[dict | None]) -> str:
    """The row's average with its interval, or - while a cell is missing."""
    if None in results:
        return f"{'-':>15}"
    mean, half = average(results)
    return f"{mean:.3f} +- {half:.3f}"


if __name__ == "__main__":
    main()
