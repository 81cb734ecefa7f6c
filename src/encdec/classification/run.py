"""The `encdec classify` protocol: data, folds, fine-tuning, accuracy with its interval, outputs.

BoolQ: fine-tune on (at most --limit of) the training split, evaluate on the validation split.
CB, COPA, RTE: no training split offline, so k-fold cross-validation over the validation split;
each fold fine-tunes a fresh copy of the backbone (and a new head) on the other folds, and the
accuracy is pooled over all folds. The saved classifier is BoolQ's model, or the first fold's
model of a k-fold task (trained on (k-1)/k of the examples), so a run trains nothing twice.
--search chooses fine-tuning settings, --probe a frozen backbone's logistic-regression head, on dev
splits of each training part only (selection.py); the reported split is scored once, afterwards.
Everything (OUT/results.json, OUT/classifier/) is written atomically at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encdec.classification import features
from encdec.classification.backbone import Backbone
from encdec.classification.classifier import POOLINGS, Classifier, ClassifierInfo, save_classifier
from encdec.classification.features import cache_key, cached_features
from encdec.classification.folds import kfold, subset
from encdec.classification.grid import candidates, varied
from encdec.classification.journal import TrialJournal
from encdec.classification.probe import check_available, fit_head, probabilities
from encdec.classification.selection import DevProtocol, Trial, choose, dev_splits
from encdec.classification.tasks import Example, TaskData, load_task
from encdec.classification.train import Diverged, Hyper, encode, fine_tune, padding_id, predict
from encdec.data.tokens import leading_bos
from encdec.errors import EncdecError
from encdec.evaluation.stats import macro_f1, wilson_interval
from encdec.files import atomic_dir, check_apart, check_output_dir, portable_path, read_json
from encdec.training.precision import autocast_dtype

log = logging.getLogger("encdec")
DEFAULT_DEV = DevProtocol()
POOLING_NAMES = {"last": "last-token pooling", "mean": "mean pooling"}


@dataclass
class Plan:
    """Which examples train and which are tested, per fold (one "fold" for BoolQ)."""

    protocol: str
    folds: int | None
    train: list[Example]  # the pool training indices refer to
    train_ids: list[int]  # each pool example's index in its split (training split, or validation when k-fold)
    evaluation: list[Example]
    evaluation_ids: list[int]  # each evaluated example's index in its split
    splits: list[tuple[list[int], list[int]]]  # (train indices into `train`, test indices into `evaluation`)


def plan(data: TaskData, *, folds: int, limit: int | None, eval_limit: int | None, seed: int) -> Plan:
    """The examples and splits of one run; checks --folds, --limit, --eval-limit against the data."""
    if data.train is not None:
        tr, ev = subset(len(data.train), limit, seed, "--limit"), subset(len(data.evaluation), eval_limit, seed,
                                                                    "--eval-limit")
        protocol = (f"trained on {len(tr)} of the {len(data.train)} training examples, evaluated on "
                    f"{len(ev)} of the {len(data.evaluation)} validation examples")
        return Plan(protocol, None, [data.train[i] for i in tr], tr, [data.evaluation[i] for i in ev], ev,
                    [(list(range(len(tr))), list(range(len(ev))))])
    if eval_limit is not None:
        raise EncdecError(f"--eval-limit applies to BoolQ only; {data.name} is cross-validated: use --limit")
    ids = subset(len(data.evaluation), limit, seed, "--limit")
    chosen = [data.evaluation[i] for i in ids]
    splits = kfold([e.label for e in chosen], folds, seed)
    of = f"{len(ids)} of the {len(data.evaluation)}" if len(ids) < len(data.evaluation) else f"the {len(ids)}"
    protocol = (f"{folds}-fold cross-validation over {of} validation examples (no training split offline); "
                f"stratified seeded folds, accuracy pooled over the folds")
    return Plan(protocol, folds, chosen, ids, chosen, ids, splits)


def classify(model: str, task: str, out: Path, *, hyper: Hyper, pooling: str = "last", folds: int = 5,
             limit: int | None = None, eval_limit: int | None = None, overwrite: bool = False,
             grid: dict[str, list[Any]] | None = None, probe_c: list[float] | None = None,
             dev: DevProtocol = DEFAULT_DEV, save: bool = True) -> dict[str, Any]:
    """Run the protocol, write OUT/results.json and OUT/classifier/ (not with `save=False`: a comparison of many
    runs needs their results, not a copy of the backbone each), and return the results.

    With `grid` (--search) every candidate is scored on dev splits of each training part and the best one
    is retrained on the whole part; with `probe_c` (--probe) the backbone stays frozen and a logistic
    regression, its C chosen the same way, reads cached features. The reported split is read only after
    the choice, once."""
    from encdec.classification.loading import load_backbone
    from encdec.inference.loading import compute_device
    from encdec.sources import load_tokenizer

    hyper.check()
    if hyper.precision == "auto":  # chosen once, so that every fold and candidate trains alike; recorded as chosen
        hyper = dataclasses.replace(hyper, precision="bf16" if autocast_dtype("auto", compute_device()) else "fp32")
    dev.check()
    if pooling not in POOLINGS:
        raise EncdecError(f"unknown pooling {pooling!r}; accepted: {', '.join(POOLINGS)}")
    if grid is not None and probe_c is not None:
        raise EncdecError("--probe with --search: the probe always chooses its C on the dev split (--probe-c sets "
                          "the values); pass one of them")
    searched = candidates(grid, hyper) if grid is not None else None
    if probe_c is not None:
        check_available()
    check_output_dir(out, overwrite, (model,), replaces=("results.json", "classifier"), kind=CLASSIFIED)
    # not inside MODEL either: its files (every one, nested too) name the feature cache and a search's journal, and
    # the run's temporary output among them would make a resumed search or a cached probe start over
    check_apart(out, (model,), inside=True)
    data = load_task(task)
    p = plan(data, folds=folds, limit=limit, eval_limit=eval_limit, seed=hyper.seed)
    selecting = grid is not None or probe_c is not None
    dev_by_fold = [dev_splits([p.train[i].label for i in train_ids], dev, inner=p.folds is not None,
                              seed=hyper.seed + k) if selecting else []
                   for k, (train_ids, _) in enumerate(p.splits)]
    start = time.perf_counter()
    backbone, tokenizer_dir = load_backbone(model)
    limit = backbone.spec.stack.max_positions  # what every other command keeps to as well
    if limit is not None and hyper.max_len > limit:
        raise EncdecError(f"--max-len {hyper.max_len}: {model} reads at most {limit} positions (its source's "
                          f"max_position_embeddings); give at most {limit}")
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = backbone.embed.num_embeddings
    pad_id, first = padding_id(tokenizer, vocab), leading_bos(tokenizer)
    train_rows = encode(tokenizer, [e.text for e in p.train], hyper.max_len, first, vocab, f"{data.name} training text")
    reported = _Reported(p, train_rows, lambda examples: encode(
        tokenizer, [e.text for e in examples], hyper.max_len, first, vocab, f"{data.name} evaluation text"))
    journal = None  # a fine-tuning run's (its search's trials; its fits' progress, which goes once it is done)
    if probe_c is not None:
        fold = _ProbeFolds(backbone, p, data, reported, model=model, pooling=pooling, hyper=hyper, pad_id=pad_id,
                           c_values=probe_c, train_rows=train_rows, first=first)
    else:
        # steps, set or searched, replace epochs: an epochs value no reported model trained with is not recorded
        unused = {"epochs"} if hyper.steps is not None or (grid is not None and "steps" in grid) else set()
        fixed = {name: value for name, value in hyper.to_dict().items()
                 if name not in unused and (grid is None or name not in grid)}
        # keyed on what a trial reads: the training parts (never the evaluation subset: BoolQ's --eval-limit) and
        # the settings other than the searched ones (each trial names its own: a grid given one more value keeps the
        # trials of the others)
        journal = TrialJournal({
            "model": features.model_fingerprint(model), "task": task, "labels": list(data.labels),
            "pool": [(e.text, e.label) for e in p.train], "plan": [p.folds, p.train_ids, [t for t, _ in p.splits]],
            "dev": dataclasses.asdict(dev), "pooling": pooling, "first": first, "hyper": fixed})
        fold = _FineTuneFolds(backbone, p, reported, pooling=pooling, hyper=hyper, pad_id=pad_id, grid=grid,
                              searched=searched, train_rows=train_rows, num_labels=len(data.labels), journal=journal,
                              save_first=save)
    probs: list[list[float]] = [[] for _ in p.evaluation]
    fold_of: list[int | None] = [None] * len(p.evaluation)
    selections = []
    info = ClassifierInfo(task, list(data.labels), data.template, pooling, hyper.max_len, portable_path(model), first)
    # a run of the journal at a time; what its fits saved and never finished goes once it is written
    with journal.running() if journal is not None else contextlib.nullcontext(), atomic_dir(out, overwrite) as tmp:
        for k, (train_ids, test_ids) in enumerate(p.splits):
            desc = f"{task} fold {k + 1}/{len(p.splits)}" if p.folds else task
            classifier, fold_probs, chosen, trials = fold.run(k, train_ids, test_ids, dev_by_fold[k], desc)
            for i, pr in zip(test_ids, fold_probs):
                probs[i], fold_of[i] = pr, (k if p.folds else None)
            if trials is not None:
                selections.append({"fold": k if p.folds else None, "chosen": chosen,
                                   "candidates": [t.to_dict() for t in trials]})
            if k == 0 and save:
                save_classifier(classifier, info, tmp / "classifier", tokenizer_dir=tokenizer_dir)
        selection = None
        if selections:
            selection = {"dev": _dev_description(p, dev), "folds": selections}
        method = "probe" if probe_c is not None else "fine-tuning with search" if grid is not None else "fine-tuning"
        # a search records the settings its candidates share and the grid (each fold's choice is in "selection"),
        # never the defaults of the searched settings, which no reported model trained with
        settings = ({**{k: getattr(hyper, k) for k in ("max_len", "batch_size", "seed")}, "C_values": probe_c}
                    if probe_c is not None else fixed if grid is None else {**fixed, "grid": grid})
        results = summarise(data, p, probs, fold_of, fold.losses, model=portable_path(model), pooling=pooling,
                            hyperparameters=settings, backbone_kind=backbone.spec.kind, seconds=time.perf_counter() - start,
                            method=method, selection=selection)
        if not save:
            results["saved_classifier"] = None
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _dev_description(p: Plan, dev: DevProtocol) -> str:
    if p.folds is None:
        return (f"a seeded dev split of {dev.dev_share:.0%} of the training examples; the chosen settings are "
                "retrained on all of them")
    return (f"{dev.inner_folds} inner folds over each outer fold's training part; the chosen settings are retrained "
            "on the whole part")


# a fold's classifier (to save), its probabilities on the reported part, the chosen settings and every trial
FoldResult = tuple[Classifier | None, list[list[float]], dict[str, Any] | None, list[Trial] | None]


class _Reported:
    """The rows of the reported split, encoded on first use: nothing reads them before a fold's choice is made."""

    def __init__(self, p: Plan, train_rows: list[list[int]],
                 encoder: Callable[[list[Example]], list[list[int]]]) -> None:
        self._p, self._train_rows, self._encoder, self._rows = p, train_rows, encoder, None

    def rows(self, test_ids: list[int]) -> list[list[int]]:
        if self._p.folds:
            return [self._train_rows[i] for i in test_ids]  # k-fold: the outer fold's held-out part of the pool
        if self._rows is None:
            self._rows = self._encoder(self._p.evaluation)
        return [self._rows[i] for i in test_ids]


class _FineTuneFolds:
    """Each fold: (a search over the grid on dev splits, then) fine-tuning a fresh copy of the backbone."""

    def __init__(self, backbone: Backbone, p: Plan, reported: _Reported, *, pooling: str, hyper: Hyper, pad_id: int,
                 grid: dict[str, list[Any]] | None, searched: list[Hyper] | None, train_rows: list[list[int]],
                 num_labels: int, journal: TrialJournal | None = None, save_first: bool = True) -> None:
        self.backbone, self.p, self.reported, self.pooling, self.hyper = backbone, p, reported, pooling, hyper
        self.pad_id, self.grid, self.searched, self.train_rows, self.num_labels = pad_id, grid, searched, train_rows, num_labels
        # a search's finished trials, every fit's progress and the finished folds: an interrupted run resumes
        self.journal = journal
        self.save_first = save_first  # the first fold's classifier is saved: its weights are kept with the fold
        many = len(p.splits) > 1 or searched is not None
        self.initial = {k: v.clone() for k, v in backbone.state_dict().items()} if many else None
        self.losses: list[list[float]] = []

    def _train(self, ids: list[int], hp: Hyper, desc: str, fold: int,
               keep_finished: bool = False) -> tuple[Classifier, list[float]]:
        """A fresh classifier fine-tuned on `ids` with the fold's seed, resuming the fit's saved progress
        (`keep_finished`: kept once finished, until `_progress(...)` is removed: `fine_tune`)."""
        if self.initial is not None:
            self.backbone.load_state_dict(self.initial)
        classifier = Classifier(self.backbone, self.num_labels, self.pooling)
        losses = fine_tune(classifier, [self.train_rows[i] for i in ids], [self.p.train[i].label for i in ids], hp,
                           pad_id=self.pad_id, desc=desc, seed=self.hyper.seed + fold,
                           progress=self._progress(fold, hp, ids), keep_finished=keep_finished)
        return classifier, losses

    def _progress(self, fold: int, hp: Hyper, ids: list[int]) -> Path | None:
        return None if self.journal is None else self.journal.progress(fold, varied(hp, self.grid or {}), ids)

    def run(self, k: int, train_ids: list[int], test_ids: list[int], splits: list[tuple[list[int], list[int]]],
            desc: str) -> FoldResult:
        hp, trials = self.hyper, None
        if self.searched is not None:
            def trial(candidate: Hyper, fit: list[int], dev: list[int]) -> int:
                try:  # the finished fit kept while its dev split is scored (a kill then trained it again)
                    classifier, _ = self._train([train_ids[i] for i in fit], candidate, f"{desc} search", k,
                                                keep_finished=True)
                except Diverged as e:  # its all-NaN predictions scored label 0's share of the dev split: chosen
                    log.warning("%s: the candidate counts no correct answer", e)  # over real ones near chance
                    return 0
                dev_ids = [train_ids[i] for i in dev]
                probs = predict(classifier, [self.train_rows[i] for i in dev_ids], pad_id=self.pad_id,
                                batch_size=candidate.batch_size, desc=f"{desc} search: dev")
                return sum(_guess(pr) == self.p.train[i].label for pr, i in zip(probs, dev_ids))

            def correct(candidate: Hyper, fit: list[int], dev: list[int]) -> int:
                if self.journal is None:
                    return trial(candidate, fit, dev)
                score = self.journal.correct(k, varied(candidate, self.grid), dev, lambda: trial(candidate, fit, dev))
                progress = self._progress(k, candidate, [train_ids[i] for i in fit])  # its score journaled: not needed
                shutil.rmtree(progress, ignore_errors=True)
                return score

            hp, trials = choose(self.searched, splits, correct=correct, describe=lambda h: varied(h, self.grid))
        chosen = varied(hp, self.grid) if self.grid is not None else None
        key = [varied(hp, self.grid or {}), train_ids, test_ids]
        kept = self._kept(k, key)
        if kept is not None:
            log.info("%s: kept from the interrupted run, not trained again", desc)
            classifier, probs, losses = kept
        else:
            # the finished fit is kept while it is scored (minutes of BoolQ's 3,270 answers after its hour)
            classifier, losses = self._train(train_ids, hp, f"{desc} fine-tuning", k, keep_finished=True)
            probs = predict(classifier, self.reported.rows(test_ids), pad_id=self.pad_id, batch_size=hp.batch_size,
                            desc=f"{desc}: evaluating")
            if self.journal is not None and len(self.p.splits) > 1:  # a run of one fit has its progress alone, kept
                # until the run is done (`Journal.running`)
                weights = dict(classifier.state_dict()) if k == 0 and self.save_first else None
                if self.journal.keep_fold(k, key, {"probs": probs, "losses": losses, "weights": weights}):
                    shutil.rmtree(self._progress(k, hp, train_ids), ignore_errors=True)  # the fold kept: GBs freed
        self.losses.append(losses)
        return classifier, probs, chosen, trials

    def _kept(self, k: int, key: list) -> tuple[Classifier | None, list[list[float]], list[float]] | None:
        """A finished fold of the interrupted run of this journal: (its classifier where it is saved, predictions,
        losses); None where it must be trained (again)."""
        kept = None if self.journal is None else self.journal.finished_fold(k, key)
        if kept is None:
            return None
        probs, losses = kept["probs"], kept["losses"]
        if not (isinstance(probs, list) and len(probs) == len(key[2]) and isinstance(losses, list)
                and all(isinstance(row, list) and len(row) == self.num_labels for row in probs)):
            log.warning("what was kept of fold %d is not its predictions and losses; it is trained again", k + 1)
            return None
        classifier = None
        if k == 0 and self.save_first:  # its weights whole (the backbone's too); one that does not load partly
            classifier = Classifier(self.backbone, self.num_labels, self.pooling)  # is reset by `_train`
            try:
                classifier.load_state_dict(kept["weights"])
            except (RuntimeError, TypeError, AttributeError) as e:  # none kept (--no-save then), or of another model
                log.warning("the finished fold's weights do not fit (%s); it is trained again", e)
                return None
            classifier.eval()
        return classifier, probs, losses


class _ProbeFolds:
    """Each fold: a logistic regression on frozen cached features, its C chosen on dev splits, folded into a head."""

    def __init__(self, backbone: Backbone, p: Plan, data: TaskData, reported: _Reported, *, model: str, pooling: str,
                 hyper: Hyper, pad_id: int, c_values: list[float], train_rows: list[list[int]],
                 first: int | None) -> None:
        self.backbone, self.p, self.data, self.reported, self.model = backbone, p, data, reported, model
        self.first = first
        self.pooling, self.hyper, self.pad_id, self.c_values = pooling, hyper, pad_id, c_values
        self.losses: list[list[float]] = []
        pool_split = "train" if p.folds is None else "validation"
        pool_examples = data.train if p.folds is None else data.evaluation
        self.train_x = self._features(pool_split, pool_examples, p.train_ids, lambda ids: [train_rows[i] for i in ids])
        self._eval_x: np.ndarray | None = None

    def _features(self, split: str, examples: list[Example], ids: list[int],
                  rows_of: Callable[[list[int]], list[list[int]]]) -> np.ndarray:
        key = cache_key(self.model, self.data.name, split, [e.text for e in examples], self.pooling, self.hyper.max_len,
                        self.first)
        position = {index: n for n, index in enumerate(ids)}
        return cached_features(key, ids, lambda missing: features.pooled_features(
            self.backbone, rows_of([position[i] for i in missing]), pad_id=self.pad_id, pooling=self.pooling,
            batch_size=self.hyper.batch_size), self.backbone.hidden_size)

    def _reported_features(self, test_ids: list[int]) -> np.ndarray:
        if self.p.folds:
            return self.train_x[test_ids]
        if self._eval_x is None:
            self._eval_x = self._features("validation", self.data.evaluation, self.p.evaluation_ids,
                                          lambda positions: self.reported.rows(positions))
        return self._eval_x[test_ids]

    def run(self, k: int, train_ids: list[int], test_ids: list[int], splits: list[tuple[list[int], list[int]]],
            desc: str) -> FoldResult:
        x = self.train_x[train_ids]
        labels = [self.p.train[i].label for i in train_ids]
        num_labels = len(self.data.labels)

        def correct(c: float, fit: list[int], dev: list[int]) -> int:
            weight, bias = fit_head(x[fit], [labels[i] for i in fit], num_labels, c)
            return sum(_guess(pr) == labels[i] for pr, i in zip(probabilities(x[dev], weight, bias), dev))

        c, trials = choose(self.c_values, splits, correct=correct, describe=lambda c: {"C": c})
        weight, bias = fit_head(x, labels, num_labels, c)
        classifier = Classifier(self.backbone, num_labels, self.pooling)
        with torch.no_grad():
            classifier.head.weight.copy_(torch.from_numpy(weight))
            classifier.head.bias.copy_(torch.from_numpy(bias))
        probs = probabilities(self._reported_features(test_ids), weight, bias).tolist()
        return classifier, probs, {"C": c}, trials


def _guess(probabilities: list[float]) -> int:
    return max(range(len(probabilities)), key=probabilities.__getitem__)


def is_classify_output(directory: Path) -> bool:
    """Whether `directory` is what `encdec classify` writes: a results.json of its own (a task, a method and the
    predictions), not another tool's file of that name (--overwrite replaced any folder holding one)."""
    try:
        data = read_json(directory / "results.json")
    except EncdecError:
        return False
    return {"task", "method", "predictions"} <= data.keys()


CLASSIFIED = ("an encdec classify output", is_classify_output)  # what --overwrite replaces


def summarise(data: TaskData, p: Plan, probs: list[list[float]], fold_of: list[int | None], losses: list[list[float]],
              *, model: str, pooling: str, hyperparameters: dict[str, Any], backbone_kind: str, seconds: float, method: str = "fine-tuning",
              selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results.json content: accuracy, its 95% Wilson interval, macro-F1, every prediction, and how settings
    were chosen."""
    predictions, gold, guesses = [], [e.label for e in p.evaluation], []
    for example, index, pr, fold in zip(p.evaluation, p.evaluation_ids, probs, fold_of):
        guess = _guess(pr)
        guesses.append(guess)
        predictions.append({"index": index, "fold": fold, "label": data.labels[example.label],
                            "prediction": data.labels[guess], "correct": guess == example.label,
                            "probabilities": dict(zip(data.labels, pr))})
    n, correct = len(predictions), sum(x["correct"] for x in predictions)
    majority_label, majority = Counter(e.label for e in p.evaluation).most_common(1)[0]
    trained = "the probe fitted" if method == "probe" else "the model fine-tuned"
    return {
        "task": data.name, "model": model, "backbone": backbone_kind, "pooling": pooling, "method": method,
        "probe": method == "probe", "protocol": p.protocol,
        "folds": p.folds, "n": n, "correct": correct, "accuracy": correct / n, "interval": list(wilson_interval(correct, n)),
        "macro_f1": macro_f1(gold, guesses, len(data.labels)),
        "majority_baseline": {"label": data.labels[majority_label], "accuracy": majority / n,
                              "macro_f1": macro_f1(gold, [majority_label] * n, len(data.labels))},
        "train_examples": len(p.train) if p.folds is None else len(p.splits[0][0]),
        "epoch_losses": losses, "hyperparameters": hyperparameters, "selection": selection, "seconds": round(seconds, 1),
        "saved_classifier": f"{trained} on the training split" if p.folds is None
        else f"the first fold's {trained.removeprefix('the ')} (trained on {len(p.splits[0][0])} of the {n} examples)",
        "predictions": predictions,
    }


def _selection_lines(selection: dict[str, Any]) -> list[str]:
    """One line per candidate: its dev accuracy in each fold, and where it was chosen."""
    folds = selection["folds"]
    lines = [f"selection: on {selection['dev']}"]
    for n, trial in enumerate(folds[0]["candidates"]):
        shown = " ".join(f"{k}={v:g}" for k, v in trial["settings"].items())
        scores = " ".join(f"{f['candidates'][n]['dev_accuracy']:.3f}" for f in folds)
        chosen = [str(i + 1) for i, f in enumerate(folds) if f["chosen"] == trial["settings"]]
        mark = "" if not chosen else "  <- chosen" if len(folds) == 1 else f"  <- chosen in fold{'s' * (len(chosen) > 1)} {','.join(chosen)}"
        lines.append(f"  {shown}: dev accuracy {scores}{mark}")
    return lines


def report(results: dict[str, Any], out: Path) -> str:
    """The readable block the CLI prints."""
    lo, hi = results["interval"]
    base = results["majority_baseline"]
    selection = results.get("selection")
    return "\n".join([
        f"task:      {results['task']} ({results['backbone']} backbone, {POOLING_NAMES[results['pooling']]})",
        f"model:     {results['model']}",
        f"method:    {results['method']}" + (" (a linear probe: frozen backbone)" if results["probe"] else ""),
        f"protocol:  {results['protocol']}",
        *(_selection_lines(selection) if selection else []),
        f"accuracy:  {results['accuracy']:.3f} ({results['correct']}/{results['n']}), 95% Wilson interval [{lo:.3f}, {hi:.3f}]",
        *([(f"macro-F1:  {results['macro_f1']:.3f} (the F1 of the labels that occur, averaged; the baseline's "
            f"{base['macro_f1']:.3f})")] if "macro_f1" in results else []),  # results.json of a version before it
        f"baseline:  {base['accuracy']:.3f} by always answering {base['label']!r} (the majority class)",
        f"time:      {results['seconds']:.0f} s",
        f"saved:     {out / 'results.json'}" + (f"; {out / 'classifier'} ({results['saved_classifier']})"
                                                 if results["saved_classifier"] else " (the classifier was not saved)"),
    ])
