"""Generation for a decoder-only model run by this project's blocks (`encdec.model.CausalLM`).

It exists so that the decoder-only source and its adapted encoder-decoders are timed by the same
code (the quality-efficiency frontier, `bench/frontier.py`): the prompt is read in one causal pass
whose keys and values are kept, then each step appends one token's keys and values and attends
over all of them with the engine's attention (`encdec.inference.engine.attend`). Prompts are
left-padded (the padding is masked; RoPE is relative, so plain indices serve as positions).
"""

from __future__ import annotations

import torch

from encdec.errors import EncdecError
from encdec.inference.sampling import Sampling, pick_tokens
from encdec.model import CausalLM, Segments, embed_tokens, rope_tables


@torch.no_grad()
def generate_causal(
    model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
    max_new_tokens: int = 32, eos_token_ids: list[int], pad_id: int = 0, sampling: Sampling | None = None,
) -> torch.Tensor:
    """New tokens [B, T], T <= max_new_tokens, after left-padded prompts; rows that ended are padded with `pad_id`."""
    from encdec.generate import check_settings
    from encdec.inference.engine import attend

    sampling = sampling or Sampling()
    check_settings(max_new_tokens, sampling)
    cfg, device = model.cfg, model.embed.weight.device
    n, length = input_ids.shape
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if not bool(mask[:, -1].all()):
        raise EncdecError("decoder-only generation continues each prompt from its last position: pad prompts on the left")
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    hidden = model.hidden(input_ids, Segments.of(input_ids, mask, None, None), cache)
    total = length + max_new_tokens
    keys, values = [], []
    for k, v in cache:  # buffers for every position a request will have
        kb = k.new_zeros(n, k.shape[1], total, k.shape[3])
        kb[:, :, :length] = k
        vb = torch.zeros_like(kb)
        vb[:, :, :length] = v
        keys.append(kb)
        values.append(vb)
    del cache
    seen = torch.cat([mask.bool(), torch.ones(n, max_new_tokens, dtype=torch.bool, device=device)], 1)
    key_positions = torch.arange(total, device=device)
    generators = [sampling.nth(i).generator(device) for i in range(n)]  # row i draws from seed + i, as encdec's
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    out = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    x_last = hidden[:, -1]
    for t in range(max_new_tokens):
        generated = out[:, :t].tolist() if sampling.adjusts else [[]] * n
        token = pick_tokens(model.logits(x_last).float(), [sampling] * n, generators, generated).to(device)
        out[:, t] = torch.where(done, pad_id, token)
        done |= torch.isin(token, eos)
        if bool(done.all()) or t + 1 == max_new_tokens:
            break
        position = length + t  # where the token just chosen sits
        rope = rope_tables(cfg, torch.full((1, 1), position, device=device), model.embed.weight.dtype)
        low = torch.finfo(model.embed.weight.dtype).min
        allowed = {"full": seen[:, : position + 1]}
        allowed["sliding"] = allowed["full"] & (key_positions[: position + 1] > position - cfg.sliding_window)
        bias = {kind: torch.zeros(a.shape, dtype=model.embed.weight.dtype, device=device).masked_fill_(~a, low)[:, None, None]
                for kind, a in allowed.items()}
        x = embed_tokens(model.embed, token[:, None], cfg.embed_scale)
        for block, kind, kb, vb in zip(model.stack.layers, cfg.layer_types, keys, values):
            h = block.attn_norm(x)
            q = block.attn.queries(h, rope[kind])
            k, v = block.attn.keys_values(h, rope[kind])
            kb[:, :, position], vb[:, :, position] = k[:, :, 0], v[:, :, 0]
            own = (kb[:, :, : position + 1], vb[:, :, : position + 1], bias[kind])
            x = block.feed_forward(x + block.post_attn_norm(attend(block.attn, q, [own])))
        x_last = model.stack.norm(x[:, 0])
    return out[:, : t + 1]
