"""Training checkpoints: everything a resumed run needs, written atomically.

OUT/checkpoints/step-NNNNNN/ holds model.safetensors (our parameter names), optimizer.json/.safetensors
and trainer.json/.safetensors (step, scheduler, data-stream position, RNG states, configuration), written
by `plain_state` so that resuming never unpickles anything. State dicts are gathered in full on the
first process (DDP and FSDP2 alike), which writes them and tells the others what it found. Weights are
checked to be finite before they are saved and again before they are resumed from.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from encdec.errors import EncdecError, ReadFailed, first_line, load_failure
from encdec.files import atomic_dir, parse_json, read_small, read_weights, write_weights
from encdec.training import distributed
from encdec.training.config import USER_PATHS
from encdec.training.distributed import Dist
from encdec.training.optim import bad_moment
from encdec.training.plain_state import read_state, write_state

log = logging.getLogger("encdec")

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
PREFIX = "model."  # the trained model inside the loss module


def checkpoints(out: Path) -> list[Path]:
    """A run's checkpoints, oldest first (by step: past step 999,999 names no longer sort)."""
    found = [p for p in (out / "checkpoints").glob("step-*") if is_step_name(p.name)]
    return sorted(found, key=step_of)


def is_step_name(name: str) -> bool:
    """step-N, N in ASCII digits: str.isdigit() takes "²", which int() refuses (a traceback of --resume)."""
    digits = name.removeprefix("step-")
    return name.startswith("step-") and digits.isascii() and digits.isdigit()


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def scheduled(out: Path, save_every: int, steps: int) -> list[Path]:
    """The checkpoints of the run's schedule (every --save-every steps, as each was written under, and the last
    step), oldest first: those that --keep-last keeps and --average-last averages. A checkpoint written because the
    run was stopped is not one of them, so that a stopped and resumed run keeps and averages what an uninterrupted
    one does; nor is one past `steps`, left by an earlier, longer attempt that resuming skipped as damaged. A run
    resumed with another --save-every keeps the earlier interval's (they were deleted, unsaid), and one extended
    with more --steps the earlier run's last (its final model)."""
    kept = []
    for p in checkpoints(out):
        step = step_of(p)
        every, last = _written_schedule(p, save_every, steps)
        if step <= steps and (step % save_every == 0 or step % every == 0 or step in (steps, last)):
            kept.append(p)
    return kept


def _written_schedule(checkpoint: Path, save_every: int, steps: int) -> tuple[int, int]:
    """The --save-every and --steps `checkpoint` was written under (its trainer state's configuration), each
    `save_every` or `steps` where it does not say."""
    try:
        config = parse_json(read_small(checkpoint / "trainer.json"))["state"]["config"]
        every, last = config.get("save_every"), config.get("steps")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return save_every, steps
    return (every if isinstance(every, int) and every >= 1 else save_every,
            last if isinstance(last, int) and last >= 1 else steps)


def _not_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or inf, if any."""
    return next((name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def _last_good(path: Path | None) -> str:
    return f"the last good checkpoint is {path}" if path else "no checkpoint was written"


def not_finite(what: str, step: int, last_good: Path | None) -> EncdecError:
    """The one line a run stops with when NaN or inf shows up, naming the checkpoint to go back to."""
    return EncdecError(f"{what} at step {step}; stopped ({_last_good(last_good)}). Try a lower --lr or check the data")


def save(out: Path, step: int, wrapped: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any],
         d: Dist, keep: tuple[int, int, int], last_good: Path | None = None) -> Path:
    """Collective: every process calls it; the first writes. Non-finite weights are never saved, and a
    checkpoint that cannot be written stops the run: every process stops with the same line, naming
    `last_good`, the checkpoint to go back to (only the first holds the gathered state and writes it: the others,
    not told, went on into the next step's collectives, where they failed or waited). Then the first process
    keeps the newest checkpoint and the last `keep` = (keep_last, save_every, steps) scheduled ones."""
    model_state = get_model_state_dict(wrapped, options=FULL)  # the first process's: the others' are empty
    bad = distributed.from_main(_not_finite(model_state), d)
    if bad is not None:
        raise not_finite(f"weight {bad.removeprefix(PREFIX)} became NaN or inf (not saved)", step, last_good)
    optim_state = get_optimizer_state_dict(wrapped, optimizer, options=FULL)
    path, failed = out / "checkpoints" / f"step-{step:06d}", None
    if d.main:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        try:
            with atomic_dir(path, overwrite=True) as tmp:
                write_weights(tmp, {k.removeprefix(PREFIX): v for k, v in model_state.items() if k.startswith(PREFIX)})
                write_state(tmp, "optimizer", optim_state)
                write_state(tmp, "trainer", {**trainer, "step": step, "rng": rng})
        except (OSError, SafetensorError, EncdecError) as e:  # a full disk, most often; or the directory refused
            failed = first_line(e)
        else:
            keep_last, save_every, steps = keep
            kept = {path, *scheduled(out, save_every, steps)[-keep_last:]}
            for old in checkpoints(out):
                if old not in kept:
                    shutil.rmtree(old, ignore_errors=True)
    failed = distributed.from_main(failed, d)
    if failed is not None:
        raise EncdecError(f"could not write the checkpoint of step {step} ({failed}); stopped "
                          f"({_last_good(last_good)}). Free space in {out} (or lower --keep-last), then --resume")
    return path


@dataclass
class Saved:
    """A checkpoint read back in full and checked, before anything of it is applied."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]


MAX_PROCESSES, MAX_ROWS = 1 << 20, 1 << 31  # a saved run's process count and rows a step, past any real run's
MAX_STEPS = 1 << 53  # a saved schedule's step, past any run's (a float still counts it)


def read(path: Path) -> Saved:
    """Everything of a checkpoint; EncdecError (one line) when a file is missing, damaged, foreign or not finite."""
    if (path / "optimizer.pt").exists() or (path / "trainer.pt").exists():
        raise EncdecError(f"{path} is in the old pickle format (optimizer.pt, trainer.pt), which encdec no longer "
                          "loads: unpickling can run code")
    weights = read_weights(path, mapped=True)  # copied into the model at once
    optimizer, trainer = read_state(path, "optimizer"), read_state(path, "trainer")
    if not isinstance(optimizer, dict) or not isinstance(trainer, dict) or "step" not in trainer \
            or not isinstance(optimizer.get("state", {}), dict) or not isinstance(optimizer.get("param_groups"), list) \
            or not all(isinstance(group, dict) for group in optimizer["param_groups"]):
        raise EncdecError(f"{path}: optimizer.json or trainer.json does not hold a training state")
    if type(trainer["step"]) is not int or trainer["step"] != step_of(path):  # a copied or renamed step directory
        raise EncdecError(f"{path}: its trainer.json records step {trainer['step']!r}, not the step of its name")
    # what resuming reads (a trainer.json edited or damaged: KeyError tracebacks; a batch of 10**12 processes
    # multiplied a string into terabytes when the settings were compared)
    config, processes, schedule = trainer.get("config", {}), trainer.get("processes", 1), trainer.get("scheduler")
    malformed = [name for name, ok in (
        ("scheduler", isinstance(schedule, dict) and type(schedule.get("last_epoch")) is int
         and -1 <= schedule["last_epoch"] <= MAX_STEPS and type(schedule.get("_step_count", 0)) is int
         and all(isinstance(schedule.get(key), list) for key in ("base_lrs", "lr_lambdas"))
         and all(entry is None or isinstance(entry, dict) for entry in schedule["lr_lambdas"])),
        ("stream", isinstance(trainer.get("stream"), dict)),
        ("record", _json_record(trainer.get("record"), trainer["step"])),
        ("resumes", _json_resumes(trainer.get("resumes"))),
        ("config", isinstance(config, dict)),
        ("config's paths", not isinstance(config, dict) or all(_path_setting(config.get(name)) for name in USER_PATHS)),
        ("processes", type(processes) is int and 1 <= processes <= MAX_PROCESSES),
        ("config.batch_size", not isinstance(config, dict) or "batch_size" not in config
         or type(config["batch_size"]) is int and 1 <= config["batch_size"] <= MAX_ROWS)) if not ok]
    if malformed:
        raise EncdecError(f"{path}: its trainer.json lacks or mangles {', '.join(malformed)}")
    bad = _not_finite(weights)
    if bad is not None:
        raise EncdecError(f"{path}: weight {bad} holds NaN or inf")
    bad = _bad_moment(optimizer, weights)
    if bad is not None:
        raise EncdecError(f"{path}: its optimizer state's {bad}")
    return Saved(path, weights, optimizer, trainer)


def _json_record(value: Any, step: int) -> bool:
    """Whether a saved metrics line is one: none, or a JSON object of the checkpoint's step (it is written to
    metrics.jsonl and TensorBoard again, at its step)."""
    try:
        return value is None or isinstance(value, dict) and type(value.get("step")) is int and value["step"] == step \
            and bool(json.dumps(value))
    except (TypeError, ValueError):
        return False


def _json_resumes(value: Any) -> bool:
    """Whether a run's saved resumes are: none, or a list of JSON objects (copied into every later checkpoint and into
    the final model's encdec.json: a tensor there failed the run at its end, after every step, and every later
    resume the same way)."""
    try:
        return value is None or isinstance(value, list) and all(isinstance(v, dict) for v in value) \
            and bool(json.dumps(value))
    except (TypeError, ValueError):
        return False


def _path_setting(value: Any) -> bool:
    """Whether a saved setting is what a path setting holds: none, a path, or a list of paths."""
    return value is None or isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


def latest_usable(out: Path, d: Dist) -> Saved | None:
    """The newest checkpoint of a run that reads back completely; damaged ones are skipped with a warning.
    None when the run has no checkpoint; EncdecError when it has some but none is usable."""
    found = checkpoints(out)
    for path in reversed(found):
        try:
            return read(path)
        except ReadFailed as e:  # set aside as damaged, a good checkpoint's steps were trained again from an older
            raise ReadFailed(f"{e}; nothing is set aside: resume once the file reads (a checkpoint that is "
                             "damaged, not unreadable, is skipped)") from None
        except EncdecError as e:
            if d.main:
                log.warning("skipping damaged checkpoint %s: %s", path.name, e)
    if found:
        raise EncdecError(f"none of the {len(found)} checkpoint(s) in {out / 'checkpoints'} is usable (see the "
                          "warnings above); start afresh with --overwrite")
    return None


def apply(saved: Saved, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states in place; returns the trainer state (step, scheduler, stream, ...)."""
    weights = {PREFIX + k: v for k, v in saved.weights.items()}
    # DDP's wrapper adds "module."; FSDP2 keeps the names
    params = {name.removeprefix("module."): p for name, p in wrapped.named_parameters()}
    try:  # the loads below are not strict (see there), so what makes the checkpoint another model's is checked here
        with_state = set(saved.optimizer.get("state", {}))
        missing = sorted(name for name in params if name.startswith(PREFIX) and name not in weights)
        if missing:
            raise KeyError(f"no weight for {missing[0].removeprefix(PREFIX)!r}")
        foreign = sorted(with_state - set(params))
        if foreign:
            raise KeyError(f"optimizer state for {foreign[0].removeprefix(PREFIX)!r}, which this model does not have")
        set_model_state_dict(wrapped, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        # not strict: parameters frozen so far (--freeze-encoder-steps, --cross-warmup-steps) had no gradient, so
        # no optimizer state; torch makes state for them while loading, which must go again to match the run
        set_optimizer_state_dict(wrapped, optimizer, saved.optimizer,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    except (RuntimeError, KeyError, ValueError) as e:  # shapes or parameters that are not this model's
        raise EncdecError(f"{saved.path} was saved by a run of another model ({load_failure(e)}); "
                          "resume with the --model that run started from, or start afresh with --overwrite") from None
    except (TypeError, AttributeError) as e:  # an optimizer.json edited or damaged within its structure
        raise EncdecError(f"{saved.path}: its optimizer state cannot be restored ({type(e).__name__}: {e})") from None
    for name, p in params.items():
        if name not in with_state:
            optimizer.state.pop(p, None)
    trainer = saved.trainer
    try:
        torch.set_rng_state(trainer["rng"]["torch"])
        np.random.set_state(trainer["rng"]["numpy"])
        random.setstate(trainer["rng"]["python"])
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as e:  # a damaged or hand-edited trainer.json
        raise EncdecError(f"{saved.path}: its random states cannot be restored ({type(e).__name__}: {e})") from None
    return trainer


def _bad_moment(optimizer: dict[str, Any], weights: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with the first optimizer tensor (AdamW's moments) that is not of its weight's shape, or not
    finite: torch checks neither, and the fused AdamW wrote past a smaller one's memory (a segmentation fault on
    the first step of a resume). State of a weight the checkpoint lacks is `apply`'s to refuse."""
    for name, state in optimizer.get("state", {}).items():
        weight = weights.get(name.removeprefix(PREFIX)) if isinstance(name, str) else None
        for key, value in state.items() if isinstance(state, dict) and weight is not None else ():
            bad = bad_moment(key, value, weight.shape)
            if bad is not None:
                return f"{bad} ({name.removeprefix(PREFIX)})"
    return None


def average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the model weights of several checkpoints (T5Gemma 2 averages the last 5). Each is checked
    as a resumed one is: the older ones (of an earlier process, or handed over) were summed unread, and NaN weights
    reached the final model."""
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        weights = read_weights(path, torch.float32, mapped=True)
        bad = _not_finite(weights)
        if total and (set(weights) != set(total) or any(weights[n].shape != t.shape for n, t in total.items())):
            bad = f"names or shapes other than {paths[0].name}'s"
        elif bad is not None:
            bad = f"weight {bad}, which holds NaN or inf"
        if bad is not None:
            raise EncdecError(f"{path}: --average-last reads it, and it has {bad}; the run's checkpoints are kept: "
                              "run it again with --resume and a smaller --average-last to write its final model")
        for name, t in weights.items():
            total[name] = total[name] + t if name in total else t.clone()
    return {name: t / len(paths) for name, t in total.items()}
