"""Vocabulary trimming for small budgets (`--trim-vocab N`, beyond the paper).

Gemma's 262k-row embedding dominates a 270M model's cost: its LM head is a quarter of a step's
FLOPs and its optimizer state the largest tensor. Training on a trimmed vocabulary keeps N tokens in
all: the special, sentinel and mode tokens, then the most frequent tokens of the training data, with ids
remapped in ascending order (so pad 0, eos 1, bos 2 keep their ids); any other token of the data
becomes <unk>, and a target that became <unk> is not scored (the model should not learn to
predict <unk> for words it was never shown). The final model is mapped back to the full
vocabulary: rows that were trained are written into the original embedding, the others keep their
original values, so the saved model loads, generates, and opens in transformers like any other.

Mapped back naively, such a model is poor in full-vocabulary use: its hidden states move during
training while the untrained rows of the tied head stay put, so more and more of the probability
goes to tokens it was never taught to rank (measured on the 270M: a third of the mass after 12
steps, 82% after 200). Each step's softmax therefore also spans a fresh uniform sample of the
untrained rows, frozen, each standing for M / S of them (the log of that ratio added to its logit:
the sampled-softmax estimate of the full partition function); the teacher's distribution is
extended the same way. The held-out loss uses every untrained row, so it is the exact
full-vocabulary cross-entropy of the held-out targets inside the kept vocabulary (the others became <unk>
and are not scored: full-vocabulary evaluations score the mapped-back model, `encdec evaluate`). The kept
tokens are counted on the training windows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from encdec.config import EncDecConfig
from encdec.errors import EncdecError
from encdec.model import CausalLM, EncoderDecoder

EMBEDDINGS = ("embed.weight", "encoder_embed.weight", "lm_head.weight")  # the tables with a row per token
UL2_SENTINELS = 128  # sentinels a run uses at most (added where a vocabulary has no reserved tokens)
Trainable = TypeVar("Trainable", EncoderDecoder, CausalLM)  # an encoder-decoder, or a decoder-only model trained alike


def check_trim_size(n: int, always: list[int]) -> None:
    """--trim-vocab N keeps at least the tokens that must stay (`always`: special tokens, chat markers, sentinels)."""
    if n < len(always):
        raise EncdecError(f"--trim-vocab {n} is smaller than the {len(always)} special tokens that must stay")


def kept_tokens(stream: np.ndarray, n: int, always: list[int], vocab_size: int) -> np.ndarray:
    """Sorted ids: `always`, then the most frequent tokens of `stream` up to n in all."""
    check_trim_size(n, always)
    counts = np.bincount(stream, minlength=vocab_size)
    counts[always] = -1  # already in
    frequent = [int(i) for i in np.argsort(-counts, kind="stable")[: n - len(always)] if counts[i] > 0]
    return np.array(sorted(set(always) | set(frequent)), dtype=np.int64)


def remap_table(keep: np.ndarray, vocab_size: int, unk_id: int) -> np.ndarray:
    """full id -> trimmed id; tokens not kept map to <unk>."""
    table = np.full(vocab_size, np.searchsorted(keep, unk_id), dtype=np.int32)
    table[keep] = np.arange(len(keep), dtype=np.int32)
    return table


def trim_model(model: Trainable, keep: np.ndarray, table: np.ndarray) -> Trainable:
    """The same model over the kept tokens only, special token ids remapped."""
    index = torch.as_tensor(keep)
    weights = {k: (v[index] if k in EMBEDDINGS else v) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        trimmed = _empty_like(model, len(keep), table)
    trimmed.load_state_dict(weights, strict=True, assign=True)
    return trimmed.to(model.embed.weight.device).train(model.training)


def _empty_like(model: Trainable, vocab_size: int, table: np.ndarray | None = None) -> Trainable:
    """A model of `model`'s kind and shape over `vocab_size` tokens (its special ids mapped through `table`)."""
    if isinstance(model, CausalLM):  # holds no token ids
        return CausalLM(model.cfg, vocab_size, model.final_logit_softcap, tied_head=model.lm_head is None)
    cfg = model.config
    if table is None:
        return EncoderDecoder(cfg)
    return EncoderDecoder(EncDecConfig.from_dict({
        **cfg.to_dict(), "vocab_size": vocab_size, "pad_token_id": int(table[cfg.pad_token_id]),
        "bos_token_id": int(table[cfg.bos_token_id]),
        # an end id past the table (a generation config's, which EncDecConfig allows) has no row to keep
        "eos_token_ids": [int(table[e]) for e in cfg.eos_token_ids if e < len(table)],
    }))


def untrained_ids(keep: np.ndarray, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary ids of the rows a trimmed run does not train."""
    mask = np.ones(vocab_size, dtype=bool)
    mask[keep] = False
    return torch.as_tensor(np.flatnonzero(mask))


@dataclass
class Negatives:
    """Untrained head rows joined to one softmax: each stands for `weight` rows (offset = log weight)."""

    rows: torch.Tensor  # [S, d] the student's rows (frozen)
    teacher_rows: torch.Tensor | None  # [S, d'] the teacher's rows for the same tokens
    teacher_softcap: float | None
    offset: float


@dataclass
class UntrainedRows:
    """The head rows of every untrained token, for the student and (once loaded) the teacher."""

    rows: torch.Tensor  # [M, d]
    sample_size: int  # S rows per step; at least M means all of them
    seed: int
    teacher_rows: torch.Tensor | None = None
    teacher_softcap: float | None = None

    def sample(self, step: int, micro: int) -> Negatives | None:
        """A uniform sample without replacement, a pure function of the seed and the step (exact resumes)."""
        m = len(self.rows)
        if self.sample_size == 0:
            return None
        if self.sample_size >= m:
            return self.every()
        g = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, 4, step, micro]).integers(2**62)))
        index = torch.randperm(m, generator=g)[: self.sample_size].to(self.rows.device)
        teacher = None if self.teacher_rows is None else self.teacher_rows[index]
        return Negatives(self.rows[index], teacher, self.teacher_softcap, math.log(m / self.sample_size))

    def every(self) -> Negatives:
        """All untrained rows, weight 1: the exact full-vocabulary softmax."""
        return Negatives(self.rows, self.teacher_rows, self.teacher_softcap, 0.0)


def untrained_rows(model: Trainable, keep: np.ndarray, sample_size: int, seed: int) -> UntrainedRows:
    """The full model's head rows that a run trimmed to `keep` leaves untrained."""
    index = untrained_ids(keep, model.head_weight.shape[0]).to(model.embed.weight.device)
    return UntrainedRows(model.head_weight.detach()[index].clone(), sample_size, seed)


def trim_teacher(teacher: CausalLM, keep: np.ndarray, untrained: UntrainedRows) -> CausalLM:
    """The teacher's head over the kept tokens; its rows of the untrained tokens go to `untrained`."""
    head = teacher.head_weight
    untrained.teacher_rows = head[untrained_ids(keep, head.shape[0]).to(head.device)].detach().clone()
    untrained.teacher_softcap = teacher.final_logit_softcap
    for table in (teacher.embed, teacher.lm_head):
        if table is not None:
            table.weight = torch.nn.Parameter(table.weight[torch.as_tensor(keep)], requires_grad=False)
    return teacher


def ignore_unknown_targets(labels: torch.Tensor, unk_id: int) -> torch.Tensor:
    """Targets that became <unk> (tokens outside the kept vocabulary) are not scored."""
    return labels.masked_fill_(labels == unk_id, -100)


def untrim(trimmed: dict[str, torch.Tensor], full: dict[str, torch.Tensor], keep: np.ndarray) -> dict[str, torch.Tensor]:
    """Trimmed weights written back into the full-vocabulary model's weights."""
    out = dict(trimmed)
    for name in EMBEDDINGS:
        if name in full:
            table = full[name].clone()
            table[torch.as_tensor(keep)] = trimmed[name].to(table.dtype)
            out[name] = table
    return out


def full_vocabulary_model(weights: dict[str, torch.Tensor], start: Trainable, keep: np.ndarray | None) -> Trainable:
    """A run's weights (over the kept tokens when `keep` is given) as a model over `start`'s full vocabulary."""
    if keep is not None:
        weights = untrim(weights, start.state_dict(), keep)
    with torch.device("meta"):
        model = _empty_like(start, start.embed.num_embeddings)
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def grow_vocabulary(model: EncoderDecoder, size: int) -> EncoderDecoder:
    """The same model over `size` >= vocab_size tokens; each new row of an embedding or head table is the mean
    of the table's rows (a neutral start for tokens that training then gives a meaning)."""
    config = EncDecConfig.from_dict({**model.config.to_dict(), "vocab_size": size})
    weights = dict(model.state_dict())
    for name in EMBEDDINGS:
        if name in weights:
            table = weights[name]
            weights[name] = torch.cat([table, table.mean(0, keepdim=True).expand(size - len(table), -1)])
    with torch.device("meta"):
        grown = EncoderDecoder(config)
    grown.load_state_dict(weights, strict=True, assign=True)
    return grown.to(model.device).train(model.training)


def with_ul2_tokens(model: Trainable, tokenizer) -> tuple[Trainable, object, str]:
    """UL2's mode tokens and sentinels for this vocabulary: its reserved tokens where it has them (Gemma, Llama 3,
    Mistral), else tokens added to (a copy of) the tokenizer, placed in the embedding table's spare rows when it has
    enough (Qwen's tables are larger than its tokenizer) or in rows grown for them. Returns the model, the
    tokenizer and a sentence saying which was done."""
    import copy

    from encdec.objectives import reserved_token_ids, special_token_ids, ul2_token_names

    vocab = tokenizer.get_vocab()
    reserved = reserved_token_ids(vocab)
    if reserved or all(token in vocab for token in ul2_token_names(1)):
        sentinels = len(special_token_ids(vocab)[1])
        return model, tokenizer, f"UL2 uses the vocabulary's own tokens as mode tokens and {sentinels} sentinels"
    tokenizer = copy.deepcopy(tokenizer)
    names = ul2_token_names(UL2_SENTINELS)
    tokenizer.add_tokens(names, special_tokens=True)
    first, size = len(tokenizer) - len(names), model.embed.num_embeddings
    note = f"the vocabulary has no reserved tokens: UL2 added {len(names)} (ids {first}..{len(tokenizer) - 1}: " \
           f"[NLU], [NLG], [S2S], <extra_id_0>..)"
    if len(tokenizer) <= size:
        return model, tokenizer, note + " in the embedding table's spare rows"
    if not isinstance(model, EncoderDecoder):
        raise EncdecError("--objective ul2 for a decoder-only model needs a vocabulary with reserved tokens (Gemma, "
                          "Llama 3, Mistral): this one would need its embeddings grown")
    return grow_vocabulary(model, len(tokenizer)), tokenizer, note + f", growing the embeddings from {size} rows"


def always_kept(tokenizer, objective: str, sentinels: int = UL2_SENTINELS) -> list[int]:
    """Special tokens, the chat-turn markers, and for UL2 its mode tokens and `sentinels` sentinels."""
    from encdec.objectives import special_token_ids

    vocab = tokenizer.get_vocab()
    ids = [i for i in tokenizer.all_special_ids if i is not None]
    ids += [vocab[t] for t in ("<start_of_turn>", "<end_of_turn>") if t in vocab]
    if objective == "ul2":
        modes, sentinel_ids = special_token_ids(vocab)
        ids += [*modes.values(), *sentinel_ids[:sentinels]]
    return sorted(set(ids))
