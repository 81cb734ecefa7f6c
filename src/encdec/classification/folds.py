"""Seeded stratified k-fold splits and seeded subsets: the evaluation protocol of tasks without a training split."""

from __future__ import annotations

import random
from collections.abc import Sequence

from encdec.errors import EncdecError


def kfold(labels: Sequence[int], k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(train indices, test indices) per fold, stratified: each class's examples shuffled with the seed, the
    classes laid end to end and dealt to the folds in turn, so every fold holds its share of every class
    (a plain shuffle with seed 0 put CB's 5 "neutral" of 56 in the folds 2, 1, 2, 0, 0) and the folds'
    sizes differ by at most one. Every example is tested exactly once and never trained on in its own fold."""
    n = len(labels)
    if not 2 <= k <= n:
        raise EncdecError(f"--folds {k}: needs 2 <= folds <= the number of examples ({n})")
    rng = random.Random(seed)
    order: list[int] = []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        order += members
    parts = [order[i::k] for i in range(k)]
    return [(sorted(j for p in parts[:i] + parts[i + 1:] for j in p), sorted(parts[i])) for i in range(k)]


def subset(n: int, limit: int | None, seed: int, flag: str) -> list[int]:
    """At most `limit` (the value of the option `flag`) of n indices, chosen with a seed (all of them, in order,
    without a limit)."""
    if limit is not None and limit < 1:
        raise EncdecError(f"{flag} {limit} leaves no example; pass a positive number")
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))
