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

from encdec.errors import EncdecError
from encdec.report import PARTS, parameter_counts, part_of
from encdec.training.config import TrainConfig


def check_recipe(cfg: TrainConfig, model: nn.Module, causal: bool) -> None:
    """Refuse recipes that cannot apply to `model` (they would silently train nothing, or something else)."""
    if causal and (cfg.freeze_encoder_steps or cfg.encoder_curriculum_steps or cfg.cross_warmup_steps):
        raise EncdecError("--freeze-encoder-steps, --encoder-curriculum-steps and --cross-warmup-steps need an "
                          "encoder-decoder model; this one is decoder-only")
    if cfg.cross_warmup_steps and not causal and not parameter_counts(model)["cross-attention"]:
        raise EncdecError("--cross-warmup-steps trains only cross-attention, and this model has none (its decoder "
                          "reads the encoder through merged self-attention): it would train nothing. Leave it at 0, "
                          "or adapt with --attention cross")


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
