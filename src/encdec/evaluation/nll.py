"""Held-out suffix NLL given a prefix (the PrefixLM view), for encoder-decoders and decoder-only models.

The encoder-decoder reads the prefix in its encoder and predicts the suffix in its decoder (whose
input is BOS + suffix[:-1]); the decoder-only model reads prefix + suffix causally. Both are scored
on exactly the same suffix tokens, in nats per token.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from encdec.data.tokens import text_ids
from encdec.errors import EncdecError
from encdec.model import EncoderDecoder
from encdec.objectives import PLAIN, Framing


@dataclass
class PrefixSuffix:
    prefix: torch.Tensor  # [N, P] token ids, starting with BOS
    suffix: torch.Tensor  # [N, S]


def split_passages(tokenizer, texts: list[str], prefix_len: int = 64, suffix_len: int = 64) -> PrefixSuffix:
    """Tokenize (with BOS) and cut each text into a prefix and the suffix that follows it."""
    rows = []
    for text in texts:
        ids = text_ids(tokenizer, text)
        if len(ids) >= prefix_len + suffix_len:
            rows.append(ids[: prefix_len + suffix_len])
    if not rows:
        raise EncdecError(f"no text has the {prefix_len + suffix_len} tokens needed for a {prefix_len}+{suffix_len} split")
    ids = torch.tensor(rows)
    return PrefixSuffix(ids[:, :prefix_len], ids[:, prefix_len:])


def _position_nll(data: PrefixSuffix, batch_size: int, desc: str, suffix_logits: Callable,
                  device: torch.device) -> torch.Tensor:
    """Mean NLL at each suffix position, [S], given a function (prefix, suffix) -> logits predicting each suffix
    token: the first positions show how well a model reads the prefix, with no suffix context of its own yet."""
    total = torch.zeros(data.suffix.shape[1], dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in tqdm(range(0, len(data.prefix), batch_size), desc=desc, unit="batch", leave=False, disable=None):
            prefix, suffix = data.prefix[i : i + batch_size].to(device), data.suffix[i : i + batch_size].to(device)
            logits = suffix_logits(prefix, suffix)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), suffix.flatten(), reduction="none")
            total += nll.view(suffix.shape).double().sum(0)
    return total.cpu() / len(data.suffix)


def framed_prefix(prefix: torch.Tensor, framing: Framing, bos: int) -> torch.Tensor:
    """Prompt rows [B, L] as the model's pretraining posed a continuation (`encdec.objectives.Framing`)."""
    if framing == PLAIN:
        return prefix
    return torch.tensor([framing.prompt(row, bos) for row in prefix.tolist()], device=prefix.device)


def suffix_logits(model: EncoderDecoder, prefix: torch.Tensor, suffix: torch.Tensor,
                  framing: Framing = PLAIN) -> torch.Tensor:
    """The logits [B, S, V] predicting each token of `suffix` [B, S] after `prefix`, teacher-forced, framed."""
    bos = model.config.bos_token_id
    start = torch.tensor([bos, *framing.decoder], device=suffix.device).expand(len(suffix), -1)
    logits = model(framed_prefix(prefix, framing, bos), decoder_input_ids=torch.cat([start, suffix[:, :-1]], 1)).logits
    return logits[:, len(framing.decoder):]


def encdec_position_nll(model: EncoderDecoder, data: PrefixSuffix, batch_size: int = 4,
                        framing: Framing = PLAIN) -> torch.Tensor:
    """`framing`: how the model was trained to read a continuation (`encdec.objectives.trained_framing`); the
    same suffix tokens are scored whatever it adds."""
    return _position_nll(data, batch_size, "encoder-decoder NLL",
                         lambda prefix, suffix: suffix_logits(model, prefix, suffix, framing), model.device)


def decoder_only_position_nll(model, data: PrefixSuffix, batch_size: int = 4) -> torch.Tensor:
    """`model` is a transformers causal LM (the decoder-only source)."""

    def suffix_logits(prefix: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
        return model(input_ids=torch.cat([prefix, suffix], 1)).logits[:, prefix.shape[1] - 1 : -1]

    return _position_nll(data, batch_size, "decoder-only NLL", suffix_logits, model.device)


def encdec_suffix_nll(model: EncoderDecoder, data: PrefixSuffix, batch_size: int = 4,
                      framing: Framing = PLAIN) -> float:
    return encdec_position_nll(model, data, batch_size, framing).mean().item()


def decoder_only_suffix_nll(model, data: PrefixSuffix, batch_size: int = 4) -> float:
    """`model` is a transformers causal LM (the decoder-only source)."""
    return decoder_only_position_nll(model, data, batch_size).mean().item()


def decoder_only_perplexity(model, tokenizer, texts: list[str], max_len: int = 2048) -> float:
    """exp(mean NLL) of every token of each text after the first, read causally by a transformers LM. A text longer
    than `max_len` tokens is read in windows of `max_len`, each scoring the tokens the one before did not (with at
    least half a window before them), each beginning with the text's BOS where it has one (Gemma reads text
    without one badly): every token is scored once (the rest of a text was dropped)."""
    total, count = 0.0, 0
    stride = max(1, max_len // 2)
    with torch.no_grad():
        for text in tqdm(texts, desc="decoder-only perplexity", unit="text", leave=False, disable=None):
            ids = torch.tensor(text_ids(tokenizer, text), device=model.device)
            bos = ids[:1] if len(ids) and ids[0].item() == tokenizer.bos_token_id else ids[:0]
            done = 1  # tokens scored, or (the first) context only
            while done < len(ids):
                end = min(len(ids), max(max_len, done + stride))
                begin = max(0, end - max_len)
                # window[j] is ids[begin + j], but its first token the BOS
                window = torch.cat([bos, ids[begin + len(bos): end]]) if begin else ids[:end]
                first = done - begin - 1  # the window's first prediction of a token not scored yet
                logits = model(input_ids=window[None]).logits[0, first:-1]
                total += F.cross_entropy(logits.float(), window[first + 1:], reduction="sum").item()
                count += end - done
                done = end
    if not count:
        raise EncdecError("no text has the 2 tokens perplexity needs (a first token, and one to predict after it)")
    mean = total / count
    # a diverged model's mean NLL past ~710 nats overflowed math.exp, and the model's scored tasks were lost with it
    if math.isnan(mean):  # NaN logits: not a number, not a model that diverged
        return math.nan
    return math.exp(mean) if mean < math.log(sys.float_info.max) else math.inf
