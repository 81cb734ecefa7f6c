"""Held-out suffix NLL given a prefix (the PrefixLM view), for encoder-decoders and decoder-only models.

The encoder-decoder reads the prefix in its encoder and predicts the suffix in its decoder (whose
input is BOS + suffix[:-1]); the decoder-only model reads prefix + suffix causally. Both are scored
on exactly the same suffix tokens, in nats per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from encdec.errors import EncdecError
from encdec.model import EncoderDecoder


@dataclass
class PrefixSuffix:
    prefix: torch.Tensor  # [N, P] token ids, starting with BOS
    suffix: torch.Tensor  # [N, S]


def split_passages(tokenizer, texts: list[str], prefix_len: int = 64, suffix_len: int = 64) -> PrefixSuffix:  # noqa: ANN001
    """Tokenize (with BOS) and cut each text into a prefix and the suffix that follows it."""
    rows = []
    for text in texts:
        ids = tokenizer(text).input_ids
        if len(ids) >= prefix_len + suffix_len:
            rows.append(ids[: prefix_len + suffix_len])
    if not rows:
        raise EncdecError(f"no text has the {prefix_len + suffix_len} tokens needed for a {prefix_len}+{suffix_len} split")
    ids = torch.tensor(rows)
    return PrefixSuffix(ids[:, :prefix_len], ids[:, prefix_len:])


@torch.no_grad()
def encdec_suffix_nll(model: EncoderDecoder, data: PrefixSuffix, batch_size: int = 4) -> float:
    total, count = 0.0, 0
    for i in range(0, len(data.prefix), batch_size):
        prefix, suffix = data.prefix[i : i + batch_size], data.suffix[i : i + batch_size]
        start = torch.full((len(suffix), 1), model.config.bos_token_id)
        logits = model(prefix, decoder_input_ids=torch.cat([start, suffix[:, :-1]], 1)).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), suffix.flatten(), reduction="sum").item()
        count += suffix.numel()
    return total / count


@torch.no_grad()
def decoder_only_suffix_nll(model, data: PrefixSuffix, batch_size: int = 4) -> float:  # noqa: ANN001
    """`model` is a transformers causal LM (the decoder-only source)."""
    total, count = 0.0, 0
    for i in range(0, len(data.prefix), batch_size):
        prefix, suffix = data.prefix[i : i + batch_size], data.suffix[i : i + batch_size]
        logits = model(input_ids=torch.cat([prefix, suffix], 1)).logits[:, prefix.shape[1] - 1 : -1]
        total += F.cross_entropy(logits.flatten(0, 1).float(), suffix.flatten(), reduction="sum").item()
        count += suffix.numel()
    return total / count
