"""The `encdec classify` protocol: data, folds, fine-tuning, accuracy with its interval, outputs.

BoolQ: fine-tune on (at most --limit of) the training split, evaluate on the validation split.
CB, COPA, RTE: no training split offline, so k-fold cross-validation over the validation split;
each fold fine-tunes a fresh copy of the backbone (and a new head) on the other folds, and the
accuracy is pooled over all folds. The saved classifier is BoolQ's model, or the first fold's
model of a k-fold task (trained on (k-1)/k of the examples), so a run trains nothing twice.
Everything (OUT/results.json, OUT/classifier/) is written atomically at the end.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encdec.classification.classifier import POOLINGS, Classifier, ClassifierInfo, save_classifier
from encdec.classification.folds import kfold, subset
from encdec.classification.tasks import Example, TaskData, load_task
from encdec.classification.train import Hyper, encode, fine_tune, predict
from encdec.errors import EncdecError
from encdec.evaluation.stats import wilson_interval
from encdec.files import atomic_dir, check_output_dir, portable_path

POOLING_NAMES = {"last": "last-token pooling", "mean": "mean pooling"}


@dataclass
class Plan:
    """Which examples train and which are tested, per fold (one "fold" for BoolQ)."""

    protocol: str
    folds: int | None
    train: list[Example]  # the pool training indices refer to
    evaluation: list[Example]
    evaluation_ids: list[int]  # each evaluated example's index in its split
    splits: list[tuple[list[int], list[int]]]  # (train indices into `train`, test indices into `evaluation`)


def plan(data: TaskData, *, folds: int, limit: int | None, eval_limit: int | None, seed: int) -> Plan:
    """The examples and splits of one run; checks --folds, --limit, --eval-limit against the data."""
    if data.train is not None:
        tr, ev = subset(len(data.train), limit, seed), subset(len(data.evaluation), eval_limit, seed)
        protocol = (f"fine-tuned on {len(tr)} of the {len(data.train)} training examples, evaluated on "
                    f"{len(ev)} of the {len(data.evaluation)} validation examples")
        return Plan(protocol, None, [data.train[i] for i in tr], [data.evaluation[i] for i in ev], ev,
                    [(list(range(len(tr))), list(range(len(ev))))])
    if eval_limit is not None:
        raise EncdecError(f"--eval-limit applies to BoolQ only; {data.name} is cross-validated: use --limit")
    ids = subset(len(data.evaluation), limit, seed)
    chosen = [data.evaluation[i] for i in ids]
    splits = kfold(len(chosen), folds, seed)
    of = f"{len(ids)} of the {len(data.evaluation)}" if len(ids) < len(data.evaluation) else f"the {len(ids)}"
    protocol = (f"{folds}-fold cross-validation over {of} validation examples (no training split offline); "
                f"seeded shuffle, accuracy pooled over the folds")
    return Plan(protocol, folds, chosen, chosen, ids, splits)


def classify(model: str, task: str, out: Path, *, hyper: Hyper, pooling: str = "last", folds: int = 5,
             limit: int | None = None, eval_limit: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run the protocol, write OUT/results.json and OUT/classifier/, and return the results."""
    from encdec.classification.loading import load_backbone
    from encdec.sources import load_tokenizer

    hyper.check()
    if pooling not in POOLINGS:
        raise EncdecError(f"unknown pooling {pooling!r}; accepted: {', '.join(POOLINGS)}")
    check_output_dir(out, overwrite)
    data = load_task(task)
    p = plan(data, folds=folds, limit=limit, eval_limit=eval_limit, seed=hyper.seed)
    start = time.perf_counter()
    backbone, tokenizer_dir = load_backbone(model)
    tokenizer = load_tokenizer(tokenizer_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows = encode(tokenizer, [e.text for e in p.train], hyper.max_len)
    eval_rows = train_rows if p.folds else encode(tokenizer, [e.text for e in p.evaluation], hyper.max_len)
    initial = {k: v.clone() for k, v in backbone.state_dict().items()} if len(p.splits) > 1 else None
    probs: list[list[float]] = [[] for _ in p.evaluation]
    fold_of: list[int | None] = [None] * len(p.evaluation)
    losses = []
    info = ClassifierInfo(task, list(data.labels), data.template, pooling, hyper.max_len, portable_path(model))
    with atomic_dir(out, overwrite) as tmp:
        for k, (train_ids, test_ids) in enumerate(p.splits):
            if k and initial is not None:
                backbone.load_state_dict(initial)
            classifier = Classifier(backbone, len(data.labels), pooling)
            desc = f"{task} fold {k + 1}/{len(p.splits)}" if p.folds else f"{task} fine-tuning"
            losses.append(fine_tune(classifier, [train_rows[i] for i in train_ids], [p.train[i].label for i in train_ids],
                                    hyper, pad_id=pad_id, desc=desc, seed=hyper.seed + k))
            for i, pr in zip(test_ids, predict(classifier, [eval_rows[i] for i in test_ids], pad_id=pad_id,
                                               batch_size=hyper.batch_size, desc=f"{desc}: evaluating")):
                probs[i], fold_of[i] = pr, (k if p.folds else None)
            if k == 0:
                save_classifier(classifier, info, tmp / "classifier", tokenizer_dir=tokenizer_dir)
        results = summarise(data, p, probs, fold_of, losses, model=portable_path(model), pooling=pooling, hyper=hyper,
                            backbone_kind=backbone.spec.kind, seconds=time.perf_counter() - start)
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
    return results


def summarise(data: TaskData, p: Plan, probs: list[list[float]], fold_of: list[int | None], losses: list[list[float]],
              *, model: str, pooling: str, hyper: Hyper, backbone_kind: str, seconds: float) -> dict[str, Any]:
    """The results.json content: accuracy, its 95% Wilson interval, and every prediction."""
    predictions = []
    for example, index, pr, fold in zip(p.evaluation, p.evaluation_ids, probs, fold_of):
        guess = max(range(len(pr)), key=pr.__getitem__)
        predictions.append({"index": index, "fold": fold, "label": data.labels[example.label],
                            "prediction": data.labels[guess], "correct": guess == example.label,
                            "probabilities": dict(zip(data.labels, pr))})
    n, correct = len(predictions), sum(x["correct"] for x in predictions)
    majority_label, majority = Counter(e.label for e in p.evaluation).most_common(1)[0]
    return {
        "task": data.name, "model": model, "backbone": backbone_kind, "pooling": pooling, "protocol": p.protocol,
        "folds": p.folds, "n": n, "correct": correct, "accuracy": correct / n, "interval": list(wilson_interval(correct, n)),
        "majority_baseline": {"label": data.labels[majority_label], "accuracy": majority / n},
        "train_examples": len(p.train) if p.folds is None else len(p.splits[0][0]),
        "epoch_losses": losses, "hyperparameters": hyper.to_dict(), "seconds": round(seconds, 1),
        "saved_classifier": "the model fine-tuned on the training split" if p.folds is None
        else f"the first fold's model (trained on {len(p.splits[0][0])} of the {n} examples)",
        "predictions": predictions,
    }


def report(results: dict[str, Any], out: Path) -> str:
    """The readable block the CLI prints."""
    lo, hi = results["interval"]
    base = results["majority_baseline"]
    return "\n".join([
        f"task:      {results['task']} ({results['backbone']} backbone, {POOLING_NAMES[results['pooling']]})",
        f"model:     {results['model']}",
        f"protocol:  {results['protocol']}",
        f"accuracy:  {results['accuracy']:.3f} ({results['correct']}/{results['n']}), 95% Wilson interval [{lo:.3f}, {hi:.3f}]",
        f"baseline:  {base['accuracy']:.3f} by always answering {base['label']!r} (the majority class)",
        f"time:      {results['seconds']:.0f} s",
        f"saved:     {out / 'results.json'}; {out / 'classifier'} ({results['saved_classifier']})",
    ])
