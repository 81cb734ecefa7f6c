"""Confidence intervals for accuracies, and the other scores classification tasks report."""

from __future__ import annotations

import math

Z95 = 1.959964


def wilson_interval(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: unlike mean +- 1.96 sd it stays inside [0, 1] and is
    sensible for small n and for accuracies near 0 or 1."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # it holds p in exact arithmetic; in floating point its ends missed p by an ulp (4 of 4 right: hi 0.999...)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def macro_f1(gold: list[int], guessed: list[int], labels: int) -> float:
    """The mean of each class's F1 over the classes of `labels` that are gold or guessed at least once, as
    scikit-learn's f1_score(average="macro") and SuperGLUE's scorer count them (CB reports it beside accuracy:
    with 5 "neutral" of 56 examples, a model that never says neutral loses little accuracy and a third of this).
    A class absent from both (a --limit sample without CB's rare "neutral") would score 0 and cap a perfect
    model at 2/3."""
    scores = []
    for label in range(labels):
        hits = sum(g == label == p for g, p in zip(gold, guessed))
        claimed, actual = guessed.count(label), gold.count(label)
        if claimed + actual:
            scores.append(2 * hits / (claimed + actual))
    return sum(scores) / len(scores) if scores else 0.0


def mean_interval(results: list[tuple[float, int]], z: float = Z95) -> tuple[float, float, float]:
    """The average of several tasks' accuracies, given each as (correct, n), with its 95% interval.

    The tasks are independent samples, so the variance of the average is the sum of the accuracies'
    variances divided by the number of tasks squared (normal approximation). The interval is Agresti and
    Coull's, whose pseudo-counts (z^2 / 2 successes in z^2 trials) are added once for the average, shared by its T
    tasks: centred on the mean of p~ = (correct + z^2 / 2T) / (n + z^2 / T), each of variance p~ (1 - p~) / (n + z^2 /
    T) (the plain p (1 - p) / n is zero for a task at 0% or 100%, which would claim a certainty that a sample of n
    examples does not give). With the counts added once per task, the centre moved towards one half by as much for
    14 tasks as for one while the half-width shrank: 14 tasks of 25 examples at 10% held the true average 53 times in
    100. One task's interval is its Wilson interval, as its own row of a table shows it."""
    if not results or any(n == 0 for _, n in results):
        raise ValueError("every task needs at least one example")
    mean = sum(correct / n for correct, n in results) / len(results)
    if len(results) == 1:
        return mean, *wilson_interval(*results[0], z=z)
    added = z * z / len(results)
    adjusted = [((correct + added / 2) / (n + added), n + added) for correct, n in results]
    centre = sum(p for p, _ in adjusted) / len(results)
    half = z * math.sqrt(sum(p * (1 - p) / size for p, size in adjusted)) / len(results)
    return mean, max(0.0, min(mean, centre - half)), min(1.0, max(mean, centre + half))


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar test of two classifiers scored on the same examples, from the examples only the
    first got right and only the second got right: under equal accuracy each of these discordant examples is a
    fair coin, so the p-value is twice the smaller binomial tail (at most 1)."""
    if only_first < 0 or only_second < 0:
        raise ValueError("counts of examples cannot be negative")
    n = only_first + only_second
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)
