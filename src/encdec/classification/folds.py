"""Seeded k-fold splits and seeded subsets: the evaluation protocol of tasks without a training split."""

from __future__ import annotations

import random

from encdec.errors import EncdecError


def kfold(n: int, k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(train indices, test indices) per fold: a seeded shuffle cut into k near-equal parts, so every
    example is tested exactly once and never trained on in its own fold."""
    if not 2 <= k <= n:
        raise EncdecError(f"--folds {k}: needs 2 <= folds <= the number of examples ({n})")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts = [order[i::k] for i in range(k)]
    return [(sorted(j for p in parts[:i] + parts[i + 1:] for j in p), sorted(parts[i])) for i in range(k)]


def subset(n: int, limit: int | None, seed: int) -> list[int]:
    """At most `limit` of n indices, chosen with a seed (all of them, in order, without a limit)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise EncdecError(f"a limit of {limit} leaves no example; pass a positive number")
    return sorted(random.Random(seed).sample(range(n), limit))
