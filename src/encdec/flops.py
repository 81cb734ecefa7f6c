"""FLOPs of one generation request (a prompt of P tokens -> T new tokens), computed from the model's shapes.

The cost axis of the quality-efficiency frontier (`bench/frontier.py`), next to measured latency.
Counted: the matrix products, 2 FLOPs per multiply-add (projections, feed-forward, attention
scores and weighted values, the LM head); norms, RoPE, softmax and embedding lookups are left
out. Attention counts only the query-key pairs a layer's mask allows (a local layer's keys within
its window), which is what the architecture needs, not what a dense kernel happens to compute.

- Encoder-decoder: the encoder reads the prompt bidirectionally once; every decoder layer projects
  the encoder states to its keys and values once; then T decoder steps from BOS, each reading its
  own earlier tokens and all P encoder tokens, and the LM head once per step.
- Decoder-only: the prompt is read causally once (the LM head at its last position gives the
  first new token), then T - 1 steps, each reading every earlier token.
"""

from __future__ import annotations

import torch

from encdec.config import EncDecConfig, StackConfig
from encdec.model import Segments, attention_masks


def projection_flops(stack: StackConfig) -> int:
    """Per token and layer: the q, k, v, o projections and the gated feed-forward."""
    d, heads, kv, dim = stack.hidden_size, stack.num_heads, stack.num_kv_heads, stack.head_dim
    return 2 * (2 * d * heads * dim + 2 * d * kv * dim + 3 * d * stack.intermediate_size)


def pair_flops(stack: StackConfig) -> int:
    """Per query-key pair and layer: the score (q . k) and the weighted value, over every query head."""
    return 4 * stack.num_heads * stack.head_dim


def _prompt_pairs(stack: StackConfig, length: int, *, causal: bool, convention: str = "t5gemma") -> int:
    """Query-key pairs of one pass over `length` tokens, summed over the layers (the model's own masks)."""
    ids = torch.ones(1, length, dtype=torch.long)
    seg = Segments(ids, torch.arange(length)[None])
    masks = attention_masks(seg, seg, causal=causal, window=stack.sliding_window, convention=convention)
    per_kind = {kind: int(mask.sum()) for kind, mask in masks.items()}
    return sum(per_kind[kind] for kind in stack.layer_types)


def _step_keys(stack: StackConfig, position: int) -> int:
    """Self-attention keys a causal query at `position` reads, summed over the layers."""
    return sum(position + 1 if kind == "full" else min(position + 1, stack.sliding_window) for kind in stack.layer_types)


def encdec_request_flops(cfg: EncDecConfig, prompt: int, new_tokens: int) -> int:
    enc, dec = cfg.encoder, cfg.decoder
    flops = prompt * enc.num_layers * projection_flops(enc)
    flops += pair_flops(enc) * _prompt_pairs(enc, prompt, causal=False, convention=cfg.encoder_window)
    flops += dec.num_layers * prompt * 2 * (2 * enc.hidden_size * dec.num_kv_heads * dec.head_dim)  # encoder K/V
    per_step = dec.num_layers * projection_flops(dec) + 2 * dec.hidden_size * cfg.vocab_size
    if cfg.attention == "cross":  # the cross-attention's own query and output projections
        per_step += dec.num_layers * 2 * (2 * dec.hidden_size * dec.num_heads * dec.head_dim)
    flops += new_tokens * per_step
    keys = sum(_step_keys(dec, t) + dec.num_layers * prompt for t in range(new_tokens))
    return flops + pair_flops(dec) * keys


def decoder_only_request_flops(stack: StackConfig, vocab_size: int, prompt: int, new_tokens: int) -> int:
    head = 2 * stack.hidden_size * vocab_size
    flops = prompt * stack.num_layers * projection_flops(stack) + pair_flops(stack) * _prompt_pairs(stack, prompt, causal=True)
    flops += head  # the first new token, from the prompt's last position
    steps = range(prompt, prompt + new_tokens - 1)
    flops += len(steps) * (stack.num_layers * projection_flops(stack) + head)
    return flops + pair_flops(stack) * sum(_step_keys(stack, p) for p in steps)
