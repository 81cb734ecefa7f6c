"""Confidence intervals for accuracies."""

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
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(results: list[tuple[float, int]], z: float = Z95) -> tuple[float, float, float]:
    """The average of several tasks' accuracies, given each as (correct, n), with its 95% interval.

    The tasks are independent samples, so the variance of the average is the sum of the accuracies'
    binomial variances p (1 - p) / n divided by the number of tasks squared (normal approximation)."""
    if not results or any(n == 0 for _, n in results):
        raise ValueError("every task needs at least one example")
    accuracies = [correct / n for correct, n in results]
    mean = sum(accuracies) / len(results)
    half = z * math.sqrt(sum(p * (1 - p) / n for p, (_, n) in zip(accuracies, results))) / len(results)
    return mean, max(0.0, mean - half), min(1.0, mean + half)
