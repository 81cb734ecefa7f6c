"""Adaptation recipes that change what trains, or how the encoder attends, over the first steps.

All are pure functions of the step, so a resumed run follows the same schedule as an uninterrupted one.
- cross-attention warm-up (unbalanced models, the paper's 1000 steps): only cross-attention learns;
- a frozen encoder: its layers hold still while the decoder learns to read the states they make;
- a causal-to-bidirectional curriculum: the encoder starts as its causal source and its attention
  opens by t/K of the row each step until it is fully bidirectional at step K.
"""

from __future__ import annotations

import dataclasses
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


LONGER_THAN_THE_RUN = {"warmup_steps": "the learning rate never reaches --lr",
                       "cross_warmup_steps": "only cross-attention trains, for the whole run",
                       "freeze_encoder_steps": "the encoder's layers stay frozen for the whole run",
                       "encoder_curriculum_steps": "the encoder's attention never opens fully"}


def idle_settings(cfg: TrainConfig, processes: int = 1) -> list[str]:
    """Settings this run was given that it will not use, or not as meant (said when it starts; not refused, since
    a short trial run may mean it): phases as long as the run, options of another objective or mode, and sharding
    (--fsdp) in a run of `processes` = 1."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    # the warm-up reaches --lr at its last step; the other phases end the step after theirs
    notes = [f"--{name.replace('_', '-')} {getattr(cfg, name)} is as long as the run or longer (--steps {cfg.steps}): "
             f"{what}" for name, what in LONGER_THAN_THE_RUN.items()
             if getattr(cfg, name) > cfg.steps - (name != "warmup_steps")]
    for names, applies, used in ((("alpha", "tau", "teacher", "teacher_top_k"),
                                  "distillation, which this run does not do (--distill)", cfg.distill),
                                 (("mixture",), "--objective ul2", cfg.objective == "ul2"),
                                 (("random_split",), "--objective prefixlm", cfg.objective == "prefixlm"),
                                 (("trim_negatives",), "--trim-vocab", cfg.trim_vocab > 0),
                                 (("window", "text_field"), "pretraining (--objective prefixlm or ul2)",
                                  cfg.objective != "instruct"),
                                 (("per_task",), "instruction tuning without --data (Natural-Instructions)",
                                  cfg.objective == "instruct" and not cfg.data)):
        given = [f"--{name.replace('_', '-')}" for name in names if getattr(cfg, name) != defaults[name]]
        if given and not used:
            notes.append(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to {applies}: ignored")
    if cfg.objective == "prefixlm" and cfg.enc_len != cfg.dec_len:
        short, long = sorted((cfg.enc_len, cfg.dec_len))
        side = "encoder" if cfg.enc_len > cfg.dec_len else "decoder"
        notes.append(f"--enc-len {cfg.enc_len} and --dec-len {cfg.dec_len}: PrefixLM splits each window in its "
                     f"middle (the paper's way), so a window is at most about {2 * short} tokens and some "
                     f"{100 - 100 * short // long}% of the {side}'s slots hold padding; equal lengths fill both sides")
    if cfg.objective == "ul2" and cfg.enc_len != cfg.dec_len:
        from encdec.training.data import ul2_kept_share

        kept = ul2_kept_share(cfg.mixture, cfg.enc_len, cfg.dec_len, cfg.window)
        if kept < 0.99:
            notes.append(f"--enc-len {cfg.enc_len} and --dec-len {cfg.dec_len}: a UL2 example whose corrupted window "
                         f"does not fit a row is made again from a shorter window, and what that drops is not trained "
                         f"on: about {100 - 100 * kept:.0f}% of the corpus with the {cfg.mixture} mixture; equal "
                         "lengths use every window whole")
    if cfg.fsdp and processes == 1:
        notes.append("--fsdp shards the model across processes, and this run has one: it trains unsharded (start "
                     "several with torchrun or accelerate launch)")
    saves = -(-cfg.steps // cfg.save_every)  # every --save-every steps, and the last
    if cfg.average_last > saves:
        notes.append(f"--average-last {cfg.average_last}: the run saves {saves} scheduled checkpoint(s) (--steps "
                     f"{cfg.steps}, --save-every {cfg.save_every}); the final model averages {saves}")
    return notes


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
        name = name.removeprefix("module.").removeprefix("model.")  # DDP's and the loss module's prefixes
        # the encoder's own table (a model whose encoder reads another vocabulary table) is the encoder's
        part = "encoder" if name.startswith("encoder_embed.") and "encoder" in frozen else part_of(name)
        if part in frozen:
            p.grad = None


def encoder_lookahead(cfg: TrainConfig, step: int) -> int | None:
    """How many positions ahead the encoder sees at this step: 0 (causal) at step 0, None (all) from step K."""
    k = cfg.encoder_curriculum_steps
    return None if step >= k else step * cfg.enc_len // k
