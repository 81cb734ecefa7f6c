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
other backbone with the first on the same examples (paired): per task the score's difference with its 95%
interval, the examples only one of the two got right and McNemar's exact p-value; per protocol the
average's difference with its interval. Paired intervals are narrower than two overlapping unpaired ones
suggest: most examples are right or wrong for both backbones.

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
from collections.abc import Callable
from pathlib import Path

from encdec.evaluation.stats import Z95, mcnemar_p

TASKS = ("boolq", "cb", "copa", "rte")
PROTOCOLS = {"probe": ["--probe"], "search": ["--search"]}
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
        try:
            if sep and re.fullmatch(r"\s*[A-Za-z_]\w*\s*", named):  # TASK=...; options begin with -
                named = named.strip().lower()
                if named not in TASKS:
                    sys.exit(f"--search-args / --probe-args {value!r}: {named!r} is not a task; "
                             f"accepted: {', '.join(TASKS)}")
                specific += shlex.split(rest) if named == task else []
            else:
                general += shlex.split(value)
        except ValueError as e:  # an unbalanced quote: shlex's traceback otherwise
            sys.exit(f"--search-args / --probe-args {value!r}: {e}; expected encdec classify options, quoted as a "
                     "shell quotes them")
    return general + specific


def weights_of(model: str) -> list | None:
    """What identifies a MODEL directory's weights without reading them (its files' identities, as classify's
    feature cache keys them); None for a packaged or Hub name."""
    from encdec.classification.features import model_fingerprint

    return model_fingerprint(model) if Path(model).expanduser().exists() else None


def run_cell(model: str, task: str, protocol: str, out: Path, args: argparse.Namespace) -> dict | None:
    """The cell's results.json, running `encdec classify` first unless it exists (with --table-only: None for a
    cell not run yet). A cell is reused only for the same options and, unless --table-only, the same weights (a
    rerun of bench/frontier.py rewrites a MODEL directory under the same path)."""
    results, recorded = out / "results.json", out.with_name(f"{out.name}.command.json")
    weights = out.with_name(f"{out.name}.weights.json")  # (cells run before it was kept: options alone)
    options = [model, "--task", task, "--seed", str(args.seed), *PROTOCOLS[protocol]]
    if task == "boolq":
        options += ["--limit", str(args.boolq_train), "--eval-limit", str(args.boolq_eval)]
    options += protocol_options(getattr(args, f"{protocol}_args"), task) + args.classify_args
    if results.exists():
        if not recorded.exists() or json.loads(recorded.read_text()) != options:
            if args.table_only:  # (its cells are kept results: never to be deleted for a table)
                ran = recorded.read_text().strip() if recorded.exists() else "not recorded"
                sys.exit(f"{out} holds a run of other settings ({ran}), where these options give "
                         f"{json.dumps(options)}; pass the options it was run with")
            sys.exit(f"{out} holds a run of other settings ({recorded}); use another --out or delete it")
        if not args.table_only and weights.exists() and json.loads(weights.read_text()) != weights_of(model):
            sys.exit(f"{out} was run on other weights of {model} (its files changed since: {weights}); use another "
                     "--out or delete it")
        return json.loads(results.read_text())
    if args.table_only:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(options))
    weights.write_text(json.dumps(weights_of(model)))
    # no classifier: every cell would save a copy of its backbone (1.1 GB for the 270M) that no table reads
    command = [sys.executable, "-m", "encdec.cli", "classify", *options, "--no-save", "--out", str(out)]
    print(" ".join(command), flush=True)
    if subprocess.run(command, check=False).returncode != 0:  # encdec's own one-line error is above
        sys.exit(f"the cell {task} / {protocol} of {model} failed; a rerun retries it")
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


def cb_score(predictions: list[dict], labels: list) -> float:
    accuracy = sum(p["label"] == p["prediction"] for p in predictions) / len(predictions)
    return (accuracy + macro_f1(predictions, labels)) / 2


def task_score(result: dict) -> float:
    """SuperGLUE's score of a task: accuracy, except CB's mean of accuracy and macro-F1."""
    if result["task"] == "cb":
        return (result["accuracy"] + macro_f1(result["predictions"])) / 2
    return result["accuracy"]


def labels_of(predictions: list[dict]) -> list:
    return sorted({p["label"] for p in predictions} | {p["prediction"] for p in predictions})


def bootstrap_variance(items: list, statistic: Callable[[list], float]) -> float:
    """The variance of a statistic over seeded resamples (with replacement) of its items."""
    rng = random.Random(0)
    return statistics.variance(statistic(rng.choices(items, k=len(items))) for _ in range(BOOTSTRAP_DRAWS))


def score_variance(result: dict) -> float:
    """The variance of a task's score: binomial for an accuracy; for CB's mean of accuracy and macro-F1, which has
    no closed form (F1 over 56 examples moves more than accuracy does), a seeded bootstrap over its examples."""
    if result["task"] != "cb":
        return result["accuracy"] * (1 - result["accuracy"]) / result["n"]
    labels = labels_of(result["predictions"])
    return bootstrap_variance(result["predictions"], lambda sample: cb_score(sample, labels))


def paired(reference: dict, other: dict) -> list[tuple[dict, dict]]:
    """The two cells' predictions of each example, matched by fold and index; both cells must have scored the same
    examples with the same labels (the same task, seed and sample sizes)."""
    mine = {(p.get("fold"), p["index"]): p for p in reference["predictions"]}
    theirs = {(p.get("fold"), p["index"]): p for p in other["predictions"]}
    if mine.keys() != theirs.keys() or any(mine[k]["label"] != theirs[k]["label"] for k in mine):
        raise SystemExit(f"{reference['task']}: the two cells did not score the same examples; a paired comparison "
                         "needs cells run with the same --seed and --boolq-train / --boolq-eval")
    return [(mine[k], theirs[k]) for k in sorted(mine, key=str)]


def difference_variance(reference: dict, other: dict) -> float:
    """The variance of `other`'s task score minus `reference`'s over the same examples: for accuracies that of the
    mean of the per-example differences (-1, 0 or 1); for CB's score a seeded paired bootstrap."""
    pairs = paired(reference, other)
    if reference["task"] != "cb":
        diffs = [(o["label"] == o["prediction"]) - (r["label"] == r["prediction"]) for r, o in pairs]
        mean = sum(diffs) / len(diffs)
        return (sum(d * d for d in diffs) / len(diffs) - mean * mean) / len(diffs)
    labels = labels_of([p for pair in pairs for p in pair])
    return bootstrap_variance(pairs, lambda sample: cb_score([o for _, o in sample], labels)
                              - cb_score([r for r, _ in sample], labels))


def compare(reference: dict, other: dict) -> tuple[float, float, int, int, float]:
    """Paired comparison of one task's two cells: the score difference (other - reference), the half-width of its
    95% interval, the examples only `other` got right and only `reference` did, and McNemar's exact p-value."""
    pairs = paired(reference, other)
    only_other = sum(o["label"] == o["prediction"] and r["label"] != r["prediction"] for r, o in pairs)
    only_reference = sum(r["label"] == r["prediction"] and o["label"] != o["prediction"] for r, o in pairs)
    return (task_score(other) - task_score(reference), Z95 * math.sqrt(difference_variance(reference, other)),
            only_other, only_reference, mcnemar_p(only_other, only_reference))


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
    for option, given in (("--protocol", args.protocol), ("--task", args.task)):
        if len(set(given)) < len(given):  # each repeat was a cell again: counted twice, narrower intervals
            parser.error(f"{option}: each is given once (a repeat weighs its cells twice in the averages)")
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
        for name, _ in backbones[1:]:
            cells = list(zip(table[(reference, protocol)], table[(name, protocol)]))
            for task, (mine, theirs) in zip(tasks, cells):
                if mine is not None and theirs is not None:
                    diff, half, only_theirs, only_mine, p = compare(mine, theirs)
                    print(f"paired ({protocol}, {task}, {name} - {reference}): {diff:+.3f} +- {half:.3f}; right only "
                          f"for {name} {only_theirs}, only for {reference} {only_mine}; McNemar p = {p:.3f}")
            if all(mine is not None and theirs is not None for mine, theirs in cells):
                diff = sum(task_score(theirs) - task_score(mine) for mine, theirs in cells) / len(cells)
                half = Z95 * math.sqrt(sum(difference_variance(mine, theirs) for mine, theirs in cells)) / len(cells)
                print(f"difference ({protocol}, {name} - {reference}): {diff:+.3f} +- {half:.3f} average score "
                      "(paired)")


def summary(results: list[dict | None]) -> str:
    """The row's average with its interval, or - while a cell is missing."""
    if None in results:
        return f"{'-':>15}"
    mean, half = average(results)
    return f"{mean:.3f} +- {half:.3f}"


if __name__ == "__main__":
    main()
