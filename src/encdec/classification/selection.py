"""Choosing settings without looking at the reported split: dev splits carved out of the training
examples only, every candidate scored on them, the best one kept.

A task with a training split (BoolQ) holds out a seeded share of it as the dev split; a k-fold task
(CB, COPA, RTE) runs inner folds over each outer fold's training part. The functions here receive
the training part alone, so what is reported cannot leak into the choice.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from encdec.classification.folds import kfold
from encdec.errors import EncdecError

Candidate = TypeVar("Candidate")


@dataclass(frozen=True)
class DevProtocol:
    """How dev splits are carved: `dev_share` of the training examples, or `inner_folds` folds (k-fold tasks)."""

    dev_share: float = 0.2
    inner_folds: int = 3

    def check(self) -> None:
        if not 0 < self.dev_share < 1:
            raise EncdecError(f"--dev-share {self.dev_share}: expected a share strictly between 0 and 1")
        if self.inner_folds < 2:
            raise EncdecError(f"--inner-folds {self.inner_folds}: expected at least 2")


def dev_splits(labels: Sequence[int], protocol: DevProtocol, *, inner: bool,
               seed: int) -> list[tuple[list[int], list[int]]]:
    """(fit positions, dev positions) among the training examples (their labels given): stratified inner
    folds, or one seeded holdout (BoolQ's, thousands of examples)."""
    n = len(labels)
    if inner:
        if protocol.inner_folds > n:
            raise EncdecError(f"--inner-folds {protocol.inner_folds}: an outer fold trains on only {n} examples; "
                              "pass fewer inner folds or a larger --limit")
        return kfold(labels, protocol.inner_folds, seed)
    held = round(n * protocol.dev_share)
    if not 1 <= held < n:
        raise EncdecError(f"--dev-share {protocol.dev_share} of {n} training examples leaves no dev or no fit "
                          "example; pass a larger --limit")
    dev = sorted(random.Random(seed).sample(range(n), held))
    chosen = set(dev)
    return [([i for i in range(n) if i not in chosen], dev)]


@dataclass
class Trial:
    """One candidate's settings and its accuracy pooled over the dev splits."""

    settings: dict[str, Any]
    dev_correct: int
    dev_n: int

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "dev_accuracy": self.dev_correct / self.dev_n, "dev_correct": self.dev_correct,
                "dev_n": self.dev_n}


def choose(candidates: Sequence[Candidate], splits: list[tuple[list[int], list[int]]], *,
           correct: Callable[[Candidate, list[int], list[int]], int],
           describe: Callable[[Candidate], dict[str, Any]]) -> tuple[Candidate, list[Trial]]:
    """The candidate with the best pooled dev accuracy (the first one on a tie: order the candidates from
    the most conservative) and every candidate's trial. `correct(candidate, fit, dev)` trains on the fit
    positions and counts the right answers on the dev positions."""
    if not candidates:
        raise EncdecError("nothing to choose from: the grid is empty")
    trials = []
    for candidate in candidates:
        right = sum(correct(candidate, fit, dev) for fit, dev in splits)
        trials.append(Trial(describe(candidate), right, sum(len(dev) for _, dev in splits)))
    best = max(range(len(candidates)), key=lambda i: (trials[i].dev_correct, -i))
    return candidates[best], trials
