"""Vocabulary trimming for small budgets (`--trim-vocab N`, beyond the paper).

Gemma's 262k-row embedding dominates a 270M model's cost: its LM head is a quarter of a step's
FLOPs and its optimizer state the largest tensor. Training on a trimmed vocabulary keeps the N
most frequent tokens of the training data plus the special, sentinel and mode tokens, with ids
remapped in ascending order (so pad 0, eos 1, bos 2 keep their ids); any other token of the data
becomes <unk>. The final model is mapped back to the full vocabulary: rows that were trained are
written into the original embedding, the others keep their original values, so the saved model
loads, generates, and opens in transformers like any other.
"""

from __future__ import annotations

import numpy as np
import torch

from encdec.config import EncDecConfig
from encdec.errors import EncdecError
from encdec.model import CausalLM, EncoderDecoder

EMBEDDINGS = ("embed.weight", "encoder_embed.weight")


def kept_tokens(stream: np.ndarray, n: int, always: list[int], vocab_size: int) -> np.ndarray:
    """Sorted ids: `always`, then the most frequent tokens of `stream` up to n in all."""
    if n < len(always):
        raise EncdecError(f"--trim-vocab {n} is smaller than the {len(always)} special tokens that must stay")
    counts = np.bincount(stream, minlength=vocab_size)
    counts[always] = -1  # already in
    frequent = [int(i) for i in np.argsort(-counts, kind="stable")[: n - len(always)] if counts[i] > 0]
    return np.array(sorted(set(always) | set(frequent)), dtype=np.int64)


def remap_table(keep: np.ndarray, vocab_size: int, unk_id: int) -> np.ndarray:
    """full id -> trimmed id; tokens not kept map to <unk>."""
    table = np.full(vocab_size, np.searchsorted(keep, unk_id), dtype=np.int32)
    table[keep] = np.arange(len(keep), dtype=np.int32)
    return table


def trim_model(model: EncoderDecoder, keep: np.ndarray, table: np.ndarray) -> EncoderDecoder:
    """The same model over the kept tokens only, special token ids remapped."""
    cfg = model.config
    config = EncDecConfig.from_dict({
        **cfg.to_dict(), "vocab_size": len(keep), "pad_token_id": int(table[cfg.pad_token_id]),
        "bos_token_id": int(table[cfg.bos_token_id]), "eos_token_ids": [int(table[e]) for e in cfg.eos_token_ids],
    })
    index = torch.as_tensor(keep)
    weights = {k: (v[index] if k in EMBEDDINGS else v) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        trimmed = EncoderDecoder(config)
    trimmed.load_state_dict(weights, strict=True, assign=True)
    return trimmed.to(model.device).train(model.training)


def trim_teacher(teacher: CausalLM, keep: np.ndarray) -> CausalLM:
    """The teacher's distributions over the kept tokens (its logits for them, renormalised by softmax)."""
    teacher.embed.weight = torch.nn.Parameter(teacher.embed.weight[torch.as_tensor(keep)], requires_grad=False)
    return teacher


def untrim(trimmed: dict[str, torch.Tensor], full: dict[str, torch.Tensor], keep: np.ndarray) -> dict[str, torch.Tensor]:
    """Trimmed weights written back into the full-vocabulary model's weights."""
    out = dict(trimmed)
    for name in EMBEDDINGS:
        if name in full:
            table = full[name].clone()
            table[torch.as_tensor(keep)] = trimmed[name].to(table.dtype)
            out[name] = table
    return out


def always_kept(tokenizer, objective: str, sentinels: int = 128) -> list[int]:  # noqa: ANN001
    """Special tokens, the chat-turn markers, and for UL2 its mode tokens and `sentinels` sentinels."""
    from encdec.objectives import special_token_ids

    vocab = tokenizer.get_vocab()
    ids = [i for i in tokenizer.all_special_ids if i is not None]
    ids += [vocab[t] for t in ("<start_of_turn>", "<end_of_turn>") if t in vocab]
    if objective == "ul2":
        modes, sentinel_ids = special_token_ids(vocab)
        ids += [*modes.values(), *sentinel_ids[:sentinels]]
    return sorted(set(ids))
