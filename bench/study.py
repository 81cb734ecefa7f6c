"""What the adaptation studies of bench/ share (recovery.py, frontier.py): the recipe a run trains with,
and the results file they append to as work finishes (so an interrupted study resumes).

A recipe is NAME or NAME:option=value,option=value with TrainConfig's option names (YAML values),
applied over the quickstart's recipe before the recovery grid (PrefixLM + distillation, 4 rows of 64 + 64 tokens,
lr 3e-4, Python's documentation, vocabulary trimmed to 8,192 tokens with sampled negatives; warm-up a tenth of
the steps; float32 products), so that every recipe of a study means what it meant when it ran.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import re
from pathlib import Path
from typing import Any

import yaml

from encdec.errors import EncdecError
from encdec.training.config import TrainConfig

QUICKSTART_RECIPE = {"distill": True, "enc_len": 64, "dec_len": 64, "batch_size": 4, "lr": 3e-4, "eval_windows": 16,
                     "trim_vocab": 8192, "eval_every": 0, "data": ["corpus:python-docs"],  # pinned: the default grew
                     "precision": "fp32"}  # float32 products everywhere: `auto` picks bf16 on CPUs that have it


RESERVED = ("source", "adapted", "study")  # the names of a study's own rows in its results file
# the study's options, not a recipe's, and what sets them: a recipe's value was replaced without a word
STUDY_OWNED = {"model": "--model", "out": "--out", "steps": "--steps", "seed": "--seed",
               "save_every": "its checkpoints: --eval-every, --save-every", "keep_last": "its checkpoints"}


def parse_recipe(text: str) -> tuple[str, dict]:
    """(NAME, options) of NAME[:option=value,...]; EncdecError for a NAME that is no folder of its own in the
    study's OUT (empty: the run trained into OUT itself) or that names one of its own rows (`RESERVED`)."""
    name, _, options = text.partition(":")
    if not name.strip() or name in RESERVED or "/" in name or name in (".", ".."):
        raise EncdecError(f"recipe {text!r}: its NAME names its folder in --out and its rows in the results; give a "
                          f"name that is not empty, has no '/' and is none of {', '.join(RESERVED)}")
    values = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", options)):  # commas inside [...] belong to a list
        key, _, value = item.partition("=")
        values[key.strip().replace("-", "_")] = _number_or_yaml(value)
    return name, values


def _number_or_yaml(text: str) -> Any:
    """A recipe value: numbers as Python reads them (YAML 1.1 reads `1e-4` as a string), anything else as YAML."""
    if re.fullmatch(r"[+-]?\d+", text.strip()):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text.strip()):
        return float(text)
    return yaml.safe_load(text)


def recipe_config(options: dict, *, model: str | Path, out: str | Path, steps: int, seed: int, **run: object) -> TrainConfig:
    """The quickstart's recipe with `options` changed, for `steps` steps of `model` into `out`; `run`: the
    study's own settings of the run (checkpoints), which the recipe does not choose."""
    return TrainConfig(**{**QUICKSTART_RECIPE, "warmup_steps": max(1, steps // 10), **options, "model": str(model),
                          "out": str(out), "steps": steps, "seed": seed, **run})


def check_recipe(options: dict) -> None:
    """A bad option fails before any work starts, in one line (a name that is no option: TypeError's traceback)."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise EncdecError(f"recipe option {unknown[0]!r} is not an option of a run; accepted: those of `encdec "
                          "pretrain --help` (with _ for -), such as lr, objective, trim_vocab")
    owned = sorted(set(options) & set(STUDY_OWNED))
    if owned:  # replaced by the study's own without a word
        raise EncdecError(f"recipe option {owned[0]!r} is the study's ({STUDY_OWNED[owned[0]]}), the same for every "
                          "recipe")
    TrainConfig(**{**QUICKSTART_RECIPE, **options, "model": "m"})


def tokens_per_step(cfg: TrainConfig) -> int:
    return cfg.batch_size * cfg.grad_accum * (cfg.enc_len + cfg.dec_len)


def read_results(path: Path) -> list[dict]:
    """The records of the results file, less a last line cut short (a run stopped while writing it: `append`
    drops it before writing the next)."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines()]


def append(path: Path, record: dict) -> None:
    """One record, as a line of its own: a line an interrupted write left without its end is dropped first (each
    record is one write of a complete line, so only the last can be cut short). Under a lock: frontier.py --jobs
    runs append at once, and a truncation must not cut another's line."""
    with path.open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released as the file closes
        f.seek(0)
        text = f.read()
        if text and not text.endswith(b"\n"):
            f.truncate(text.rfind(b"\n") + 1)
        f.write((json.dumps(record) + "\n").encode())
    print(json.dumps(record), flush=True)
