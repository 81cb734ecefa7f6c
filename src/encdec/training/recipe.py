"""Adaptation recipes that change what trains, or how the encoder attends, over the first steps.

All are pure functions of the step, so a resumed run follows the same schedule as an uninterrupted one.
- cross-attention warm-up (unbalanced models, the paper's 1000 steps): only cross-attention learns;
- a frozen encoder: its layers hold still while the decoder learns to read the states they make;
- a causal-to-bidirectional curriculum: the encoder starts as its causal source and its attention
  opens by t/K of the row each step until it is fully bidirectional at step K.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from encdec.report import PARTS, part_of
from encdec.training.config import TrainConfig


def frozen_parts(cfg: TrainConfig, step: int) -> set[str]:
    """The parts of the model (`encdec.report.PARTS`) that do not learn at this step (0-based)."""
    if step < cfg.cross_warmup_steps:
        return set(PARTS) - {"cross-attention"}
    if step < cfg.freeze_encoder_steps:
        return {"encoder"}
    return set()


def drop_frozen_gradients(named: Iterable[tuple[str, nn.Parameter]], frozen: set[str]) -> None:
    """Frozen parameters get no gradient, so the optimizer leaves them as they are (weight decay too)."""
    if not frozen:
        return
    for name, p in named:
        if part_of(name.removeprefix("module.").removeprefix("model.")) in frozen:  # DDP's and the loss module's
            p.grad = None


def encoder_lookahead(cfg: TrainConfig, step: int) -> int | None:
    """How many positions ahead the encoder sees at this step: 0 (causal) at step 0, None (all) from step K."""
    k = cfg.encoder_curriculum_steps
    return None if step >= k else step * cfg.enc_len // k
