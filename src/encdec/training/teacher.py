"""The distillation teacher: the decoder-only source, frozen, run by this project's own blocks
(so it reads packed rows like the student) in inference mode."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from encdec.causal import load_causal
from encdec.checkpoint import METADATA, read_metadata
from encdec.errors import EncdecError
from encdec.model import CausalLM

log = logging.getLogger("encdec")


def wants_distillation(distill: bool | None, objective: str, teacher: str, model_dir: Path, causal: bool) -> bool:
    """--distill as given; unset, PrefixLM distills whenever a teacher is known (every recipe of the recovery study
    that distilled beat the same recipe without: docs/adaptation.md)."""
    if distill is not None:
        return distill
    if objective != "prefixlm":
        return False
    if teacher or causal or recorded_source(model_dir):
        return True
    log.info("no distillation: %s records no source model (--teacher SRC distils from one)", model_dir)
    return False


def recorded_source(model_dir: Path) -> str:
    """The decoder-only source `encdec adapt` recorded in the checkpoint ("" when none): the default teacher."""
    adapted_from = read_metadata(model_dir).get("adapted_from") or {}
    if not isinstance(adapted_from, dict) or not isinstance(adapted_from.get("encoder") or "", str):  # hand-edited:
        # a traceback in `train` otherwise
        raise EncdecError(f"{model_dir / METADATA}: its adapted_from names no source model (expected "
                          '{"encoder": "PATH or NAME", ...}, as encdec adapt writes it); fix it, or pass --teacher SRC')
    return adapted_from.get("encoder") or ""


def teacher_spec(model_dir: Path, given: str) -> str:
    if given:
        return given
    spec = recorded_source(model_dir)
    if not spec:
        raise EncdecError(f"{model_dir} does not record its source model; pass --teacher SRC")
    # a path or Hub name from the checkpoint's own metadata: said aloud, since it is read from outside the checkpoint
    log.info("teacher: %s (recorded in %s; --teacher SRC chooses another)", spec, model_dir / "encdec.json")
    return spec


def _check_vocabulary(spec: str, teacher: dict[str, int], student: dict[str, int], table: int) -> None:
    """The teacher's tokens must be the student's, id for id. The student may have more: UL2's mode tokens and
    sentinels, added by `encdec pretrain --objective ul2` where a vocabulary reserves none (Qwen, SmolLM2), which
    the teacher predicts as the rows its table has there (Qwen's spare rows) or cannot predict at all (a grown
    table: refused, saying why; it was refused as "another tokenizer")."""
    if teacher == student:
        return
    if any(student.get(token) != i for token, i in teacher.items()):
        raise EncdecError(f"teacher {spec} has another tokenizer than the student's: its distribution over a "
                          "token would be taught as another token's; choose a teacher of the student's "
                          "tokenizer (--teacher SRC), or --no-distill")
    added = sorted((i, token) for token, i in student.items() if token not in teacher)
    beyond = [token for i, token in added if i >= table]
    if beyond:
        raise EncdecError(f"the student's tokenizer adds {len(added)} token(s) to teacher {spec}'s (such as "
                          f"{added[0][1]}: UL2's, where the vocabulary reserves none), {len(beyond)} in rows its "
                          f"{table}-row table does not have, so the teacher cannot predict them; distilling into a "
                          "grown vocabulary is not supported: --no-distill")
    log.info("teacher %s: the student's %d added token(s) (such as %s) take rows of the teacher's table that its "
             "tokenizer does not use", spec, len(added), added[0][1])


def check_teacher(spec: str) -> None:
    """One line now, where --teacher names no source this project reads (a mistyped path or name): it was said
    once the model had loaded and the corpus was tokenized."""
    from encdec.sources import source_config

    try:
        source_config(spec)
    except EncdecError as e:
        raise EncdecError(f"--teacher {spec}: {e}") from None


def load_teacher(spec: str, vocab_size: int, dtype: torch.dtype, device: torch.device, tokenizer=None) -> CausalLM:
    """The teacher, frozen, loaded in `dtype` (a 9B teacher's float32 copy alone is 37 GB); its vocabulary must be
    the student's (`tokenizer`): token by token, where both have a tokenizer (Llama 2 and Mistral both have 32,000
    tokens, spelt differently, and the teacher's token i would be taught as the student's token i). A teacher
    whose table one tokenizer pads further (the encoder source of an unbalanced model, which keeps the smaller
    table: `encdec.adapt`) keeps the student's rows."""
    teacher, source = load_causal(spec, dtype)
    if tokenizer is not None and source.has_tokenizer:
        from encdec.sources import load_tokenizer

        _check_vocabulary(spec, load_tokenizer(source.directory).get_vocab(), tokenizer.get_vocab(),
                          source.vocab_size)
        if source.vocab_size > vocab_size:
            log.info("teacher %s: its table's %d rows cut to the student's %d (one tokenizer)", spec,
                     source.vocab_size, vocab_size)
            teacher.embed = nn.Embedding.from_pretrained(teacher.embed.weight[:vocab_size].clone())
            if teacher.lm_head is not None:
                teacher.lm_head.weight = nn.Parameter(teacher.lm_head.weight[:vocab_size].clone())
                teacher.lm_head.out_features = vocab_size
    if teacher.embed.num_embeddings != vocab_size:
        raise EncdecError(f"teacher {spec} has {source.vocab_size} tokens, the student {vocab_size}: they must match")
    return teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)
