"""The hyperparameter grid of `encdec classify --search`: values per fine-tuning setting, from the
defaults, a YAML file (`--grid FILE.yaml`) and the `--grid-*` flags, crossed into candidates."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

from encdec.classification.train import Hyper
from encdec.errors import EncdecError

# a few backbone rates around the usual full fine-tuning range, short and longer training, two head rates. Not
# 1e-3 for the head: the pooled states of Gemma 3 270M share a large component (RMS 3.0 of 3.6), so that a step of
# 1e-3 on each head weight moves every logit alike, and on BoolQ the mean p(yes) swung between 0.15 and 0.88 from
# one step to the next, which 3e-5 and 1e-4 did not (docs/benchmarks.md, "Batches of alike lengths, and the head's
# learning rate")
DEFAULT_GRID: dict[str, list[Any]] = {"lr": [1e-5, 3e-5, 1e-4], "epochs": [2, 4], "head_lr": [3e-5, 1e-4]}
TUNABLE = ("lr", "head_lr", "epochs", "steps", "weight_decay", "warmup", "batch_size")
_TYPES = {field.name: field.type for field in dataclasses.fields(Hyper)}


def _value(name: str, raw: Any, where: str) -> Any:
    integer = "int" in str(_TYPES[name])
    try:
        if isinstance(raw, bool) or (integer and isinstance(raw, float)):
            raise ValueError
        return int(raw) if integer else float(raw)
    except (TypeError, ValueError, OverflowError):  # (an integer of 400 digits is past every float)
        kind = "an integer" if integer else "a number a float holds"
        # a list or mapping named by its type: its repr was built whole before the cut (YAML aliases nest 10^9 items
        # in a file of 500 bytes)
        shown = repr(raw)[:40] if raw is None or isinstance(raw, (str, int, float)) else f"of type {type(raw).__name__}"
        raise EncdecError(f"{where}: {name} value {shown} is not {kind}") from None


def read_grid(path: Path | None, overrides: dict[str, str | None]) -> dict[str, list[Any]]:
    """The grid: a YAML mapping {setting: [values]} (or the default grid), with comma lists from flags replacing keys."""
    from encdec.training.config import load_yaml

    grid: dict[str, Any] = dict(DEFAULT_GRID)
    if path is not None:
        loaded = load_yaml(Path(path), "the --grid file")
        if not isinstance(loaded, dict) or not loaded:
            raise EncdecError(f"--grid {path}: expected a mapping like {{lr: [1e-5, 3e-5], epochs: [3]}}; "
                              f"settings: {', '.join(TUNABLE)}")
        grid = loaded
    for name, text in overrides.items():
        if text is not None:
            grid[name] = [v.strip() for v in text.split(",") if v.strip()]
    where = f"--grid {path}" if path is not None else "the grid"
    checked: dict[str, list[Any]] = {}
    for name, values in grid.items():
        if name not in TUNABLE:
            raise EncdecError(f"{where}: unknown setting {name!r}; accepted: {', '.join(TUNABLE)}")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise EncdecError(f"{where}: {name} has no values; give at least one")
        checked[name] = [_value(name, v, where) for v in values]
    if "steps" in checked and "epochs" in checked:  # each epochs value would train the same candidate again
        raise EncdecError(f"{where}: both steps and epochs are given, and steps override epochs; give one of them")
    return checked


def candidates(grid: dict[str, list[Any]], base: Hyper) -> list[Hyper]:
    """Every combination of the grid's values over `base` (the other settings), each checked."""
    if base.steps is not None and "epochs" in grid and "steps" not in grid:
        raise EncdecError("--steps with --search: steps override the grid's epochs; leave --steps out or put steps "
                          "in the grid")
    names = list(grid)
    out = [dataclasses.replace(base, **dict(zip(names, combo))) for combo in itertools.product(*grid.values())]
    for hyper in out:
        try:
            hyper.check()
        except EncdecError as e:  # its message names the command line's flags: the grid's candidate is meant
            raise EncdecError(f"the search's candidate {varied(hyper, grid)} is not a valid setting: {e}") from None
    return out


def varied(hyper: Hyper, grid: dict[str, list[Any]]) -> dict[str, Any]:
    """The settings of `hyper` the grid varies: how a candidate is listed."""
    return {name: getattr(hyper, name) for name in grid}
