"""Training checkpoints: everything a resumed run needs, written atomically.

OUT/checkpoints/step-NNNNNN/ holds model.safetensors (our parameter names), optimizer.pt and
trainer.pt (step, scheduler, data-stream position, RNG states, configuration). State dicts are
gathered in full on every process (DDP and FSDP2 alike) and written by the first one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from encdec.files import atomic_dir, read_weights, write_weights
from encdec.training.distributed import Dist

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
PREFIX = "model."  # the trained model inside the loss module


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


def save(out: Path, step: int, wrapped: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any],
         d: Dist, keep_last: int) -> Path:
    """Collective: every process calls it; the first writes."""
    model_state = get_model_state_dict(wrapped, options=FULL)
    optim_state = get_optimizer_state_dict(wrapped, optimizer, options=FULL)
    path = out / "checkpoints" / f"step-{step:06d}"
    if d.main:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        with atomic_dir(path, overwrite=True) as tmp:
            write_weights(tmp, {k.removeprefix(PREFIX): v for k, v in model_state.items() if k.startswith(PREFIX)})
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save({**trainer, "step": step, "rng": rng}, tmp / "trainer.pt")
        for old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load(path: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place; returns the trainer state (step, scheduler, stream, ...)."""
    weights = {PREFIX + k: v for k, v in read_weights(path).items()}
    set_model_state_dict(wrapped, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    optim_state = torch.load(path / "optimizer.pt", weights_only=False)
    set_optimizer_state_dict(wrapped, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    torch.set_rng_state(trainer["rng"]["torch"])
    np.random.set_state(trainer["rng"]["numpy"])
    random.setstate(trainer["rng"]["python"])
    return trainer


def average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the model weights of several checkpoints (T5Gemma 2 averages the last 5)."""
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, t in read_weights(path, torch.float32).items():
            total[name] = total[name] + t if name in total else t.clone()
    return {name: t / len(paths) for name, t in total.items()}
