"""Batched generation: the prompt is encoded once, the decoder runs token by token with a KV cache.

The encoder-side keys/values of every decoder layer are computed once per prompt and kept in the
cache; `use_cache=False` recomputes everything at each step and exists to check the cached path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from encdec.errors import EncdecError
from encdec.model import EncoderState, Segments

if TYPE_CHECKING:
    from encdec.config import EncDecConfig
    from encdec.model import EncoderDecoder


def check_settings(max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None, top_p: float) -> None:
    """The decoding settings, checked before a model is loaded (`encdec generate`) or run."""
    if max_new_tokens < 1:
        raise EncdecError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise EncdecError(f"temperature must be a positive finite number, got {temperature}")
    if top_k is not None and top_k < 1:
        raise EncdecError(f"top_k must be at least 1, got {top_k}")
    if not 0 < top_p <= 1:
        raise EncdecError(f"top_p must be in (0, 1], got {top_p}")


def check_positions(prompt_tokens: int, max_new_tokens: int, cfg: EncDecConfig) -> None:
    """Refuse (rather than truncate: the end of a prompt is as likely to matter as its start) prompts and
    continuations longer than the source model was trained for, before any memory is allocated for them."""
    limit = cfg.encoder.max_positions
    if limit is not None and prompt_tokens > limit:
        raise EncdecError(f"the prompt has {prompt_tokens} tokens; this model reads at most {limit} "
                          "(its source's max_position_embeddings): shorten the prompt")
    limit = cfg.decoder.max_positions
    if limit is not None and max_new_tokens + 1 > limit:
        raise EncdecError(f"--max-new-tokens {max_new_tokens}: this model's decoder reads at most {limit} positions, "
                          f"so at most {limit - 1} new tokens")


def next_tokens(
    logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int | None, top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick one token per row from float logits [B, V]: argmax, or a sample from the filtered distribution."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: EncoderDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
    max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
    top_p: float = 1.0, seed: int | None = None, eos_token_ids: list[int] | None = None, use_cache: bool = True,
) -> torch.Tensor:
    """Generated tokens [B, T], T <= max_new_tokens; rows that ended early are filled with the pad id.

    The decoder starts from the BOS token, as T5Gemma does, and stops when every row produced EOS.
    """
    check_settings(max_new_tokens, do_sample, temperature, top_k, top_p)
    cfg = model.config
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    eos = torch.tensor(eos_token_ids or cfg.eos_token_ids, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    enc_seg = Segments.of(input_ids, attention_mask, None, None)
    encoder = EncoderState(model.encode_segments(input_ids, enc_seg), enc_seg)
    batch = input_ids.shape[0]
    tokens = torch.full((batch, 1), cfg.bos_token_id, dtype=torch.long, device=device)
    cache = model.new_cache(encoder, max_new_tokens) if use_cache else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    produced: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if cache is not None:
            step_ids = tokens[:, -1:]
            seg = Segments(torch.ones_like(step_ids), torch.full_like(step_ids, step))
            hidden = model.decode(step_ids, encoder, seg, cache)
        else:
            hidden = model.decode(tokens, encoder, Segments.of(tokens, None, None, None))
        logits = model.logits(hidden[:, -1]).float()
        chosen = next_tokens(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator)
        chosen = chosen.masked_fill(finished, cfg.pad_token_id)
        produced.append(chosen)
        finished |= torch.isin(chosen, eos)
        if bool(finished.all()):
            break
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
    return torch.stack(produced, dim=1)
