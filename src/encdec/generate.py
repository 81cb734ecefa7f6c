"""Batched generation, the user-facing function behind `model.generate` and `encdec generate`.

`generate_each` runs any number of prompts through the decoding engine (`encdec.inference.engine`) a batch of
slots at a time, a waiting prompt joining as soon as a row ends (continuous batching, as `encdec serve` does):
what `encdec generate --input` runs over a file. `generate` is the case where every row joins at step 0;
`use_cache=False` instead recomputes the whole decoder at each step and exists to check the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import TYPE_CHECKING

import torch

from encdec.errors import EncdecError
from encdec.inference.engine import Engine, Row
from encdec.inference.sampling import MIN_TEMPERATURE, NonFiniteScores, Sampling, pick_tokens, whole
from encdec.model import EncoderState, Segments

log = logging.getLogger("encdec")

if TYPE_CHECKING:
    from encdec.config import EncDecConfig
    from encdec.model import EncoderDecoder


def check_settings(max_new_tokens: int, sampling: Sampling) -> None:
    """The decoding settings, checked before a model is loaded (`encdec generate`) or run."""
    if not whole(max_new_tokens) or max_new_tokens < 1:
        raise EncdecError(f"max_new_tokens (--max-new-tokens) must be an integer of at least 1, got "
                          f"{max_new_tokens!r}")
    sampling.check()


def check_positions(prompt_tokens: int, max_new_tokens: int, cfg: EncDecConfig, where: str = "",
                    prefix: int = 0) -> None:
    """Refuse (rather than truncate: the end of a prompt is as likely to matter as its start) prompts and
    continuations longer than the source model was trained for, before any memory is allocated for them.
    `where`: the prompt's place, named first (a file's line); `prefix`: decoder positions a framing's tokens take."""
    limit = cfg.encoder.max_positions
    if limit is not None and prompt_tokens > limit:
        place = f"{where}: " if where else ""
        raise EncdecError(f"{place}the prompt has {prompt_tokens} tokens; this model reads at most {limit} "
                          "(its source's max_position_embeddings): shorten the prompt")
    limit = cfg.decoder.max_positions  # it reads BOS, the prefix and every new token but the last
    if limit is not None and max_new_tokens + prefix > limit:
        raise EncdecError(f"--max-new-tokens {max_new_tokens}: this model's decoder reads at most {limit} positions, "
                          f"so at most {limit - prefix} new tokens")


def _uncached(model: EncoderDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              rows: list[Row]) -> None:
    """The reference path: the full decoder over all tokens so far, at every step, for every row."""
    enc_seg = Segments.of(input_ids, attention_mask, None, None)
    encoder = EncoderState(model.encode_segments(input_ids, enc_seg), enc_seg)
    start = [model.config.bos_token_id, *rows[0].decoder_prefix]  # (`generate` gives every row the same prefix)
    tokens = torch.tensor([start] * len(rows), dtype=torch.long, device=input_ids.device)
    for row in rows:
        row.generator = row.sampling.generator(input_ids.device)
    while any(row.finish_reason is None for row in rows):
        hidden = model.decode(tokens, encoder, Segments.of(tokens, None, None, None))
        logits = model.logits(hidden[:, -1]).float()
        finished = [i for i, row in enumerate(rows) if row.finish_reason is not None]  # draw nothing, checked for none
        chosen = pick_tokens(logits, [r.sampling for r in rows], [r.generator for r in rows], [r.tokens for r in rows],
                             forced=finished)
        for row, token in zip(rows, chosen.tolist()):
            if row.finish_reason is None:
                row.tokens.append(token)
                if token in row.eos_token_ids:
                    row.finish_reason = "stop"
                elif len(row.tokens) >= row.max_new_tokens:
                    row.finish_reason = "length"
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)


def check_bias(sampling: Sampling, vocab_size: int, where: str = "") -> None:
    """Refuse a logit_bias naming a token past the vocabulary (an IndexError in the middle of decoding)."""
    outside = [token for token, _ in sampling.logit_bias if not 0 <= token < vocab_size]
    if outside:
        raise EncdecError(f"{where}logit_bias: token id {outside[0]} is outside the vocabulary (0 to {vocab_size - 1})")


@torch.no_grad()
def generate_each(
    model: EncoderDecoder, prompts: Sequence[Sequence[int]], rows: Sequence[Row], batch_size: int,
    compile_step: bool = False,
) -> Iterator[int]:
    """Generate `rows[i]` from `prompts[i]` (token ids, at least one each), at most `batch_size` rows decoding at
    once; yields each prompt's index as its row ends (in the order rows end, not the prompts' order), a row whose
    scores were not finite too (finish_reason "error": it drew nothing more; the others decode on). Prompts join
    in their order, as many at a time as there are free slots, in one encoder pass. `compile_step`: the engine's
    step compiled (`Engine`)."""
    if len(prompts) != len(rows):
        raise ValueError(f"one row per prompt: {len(prompts)} prompt(s) for {len(rows)} row(s)")
    cfg = model.config
    for i, (prompt, row) in enumerate(zip(prompts, rows)):  # as `generate` checks its own (IndexErrors otherwise)
        ids = torch.cat([torch.as_tensor(prompt, dtype=torch.long).reshape(-1).cpu(),
                         torch.tensor(row.decoder_prefix, dtype=torch.long)])
        if len(ids) == len(row.decoder_prefix) or not 0 <= int(ids.min()) <= int(ids.max()) < cfg.vocab_size:
            raise EncdecError(f"prompt {i}: token ids in 0..{cfg.vocab_size - 1} (at least one, and the row's "
                              f"decoder_prefix), got {ids[:8].tolist()}{'...' if len(ids) > 8 else ''}")
        check_positions(len(ids) - len(row.decoder_prefix), row.max_new_tokens, cfg, prefix=len(row.decoder_prefix))
        check_bias(row.sampling, cfg.vocab_size, f"prompt {i}: ")
    engine = Engine(model, max_batch=max(1, min(batch_size, len(prompts))), compile_step=compile_step)
    waiting = iter(range(len(prompts)))
    index: dict[Row, int] = {}
    while True:
        joining = list(islice(waiting, engine.free))
        if joining:
            engine.join([prompts[i] for i in joining], [rows[i] for i in joining])
            index.update((rows[i], i) for i in joining)
        if not engine.rows:
            return
        emitted = engine.step()
        for row in engine.failed:
            yield index.pop(row)
        for item in emitted:
            if item.row.finish_reason is not None:
                yield index.pop(item.row)


def _eos_ids(value: object) -> frozenset[int]:
    """The ids that end a row: one id, or any collection (a set, a list, a tensor) of them, as ints (a tensor's
    elements hash by identity and would never equal a token); a frozenset was a RuntimeError, a float never ended."""
    if isinstance(value, torch.Tensor):
        ids = value.reshape(-1).tolist()
    elif whole(value):
        ids = [value]
    else:
        ids = list(value) if isinstance(value, Iterable) and not isinstance(value, str | bytes) else None
    if ids is None or not all(whole(t) for t in ids):
        raise EncdecError(f"eos_token_ids must be a token id or a collection of them, got {value!r:.60}")
    return frozenset(int(t) for t in ids)


@torch.no_grad()
def generate(
    model: EncoderDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
    max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
    top_p: float = 1.0, seed: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0, logit_bias: Mapping[int, float] | Iterable[tuple[int, float]] | None = None,
    eos_token_ids: Iterable[int] | int | torch.Tensor | None = None, use_cache: bool = True, compile_step: bool = False,
    decoder_prefix: Sequence[int] = (),
) -> torch.Tensor:
    """Generated tokens [B, T], T <= max_new_tokens; rows that ended early are filled with the pad id.

    `input_ids` [B, L] (B >= 1, L >= 1). The decoder starts from the BOS token, as T5Gemma does; a row ends at one
    of `eos_token_ids` (the model's when None; one id, a list, a set or a tensor; `[]`: only at max_new_tokens). With a
    seed, row i samples from its own stream seeded with seed + i (as `encdec generate` seeds its prompts): a row's
    tokens do not depend on the rest of the batch, and a prompt repeated gets several samples. Positions whose
    `attention_mask` is 0 are never read (any id may pad).
    The penalties count each row's generated tokens (`encdec.inference.sampling`); `logit_bias` ({id: bias}, or
    (id, bias) pairs) adds to the logits of the given token ids. Sampling's settings without `do_sample` are said to
    be ignored, as transformers says it. `compile_step` compiles the engine's step (`torch.compile`: worth its
    first call's compilation on a GPU, docs/benchmarks.md). `decoder_prefix`: tokens the decoder reads after BOS
    before generating, not returned (a UL2-pretrained model's sentinel: `encdec.objectives.trained_framing`).
    """
    sampling = Sampling(do_sample, temperature, top_k, top_p, seed, presence_penalty, frequency_penalty,
                        repetition_penalty, logit_bias)
    check_settings(max_new_tokens, sampling)
    unused = [name for name, value, default in (("temperature", temperature, 1.0), ("top_k", top_k, None),
                                                ("top_p", top_p, 1.0), ("seed", seed, None)) if value != default]
    if do_sample and not sampling.do_sample:  # so low a temperature is greedy decoding, as `encdec generate` says
        others = [name for name in unused if name != "temperature"]
        log.warning("temperature %g (below %g) is greedy decoding%s", temperature, MIN_TEMPERATURE,
                    f", which ignores {', '.join(others)}" if others else "")
    elif unused and not do_sample:  # as `encdec generate` and transformers say it: greedy tokens, taken for samples
        log.warning("%s apply to sampling (do_sample=True); greedy decoding ignores them", ", ".join(unused))
    for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise EncdecError(f"{name} must be a tensor [batch, length] (torch.tensor(...)), got "
                              f"{type(tensor).__name__}")
    cfg = model.config
    check_bias(sampling, cfg.vocab_size)
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise EncdecError(f"input_ids must be [batch, length] with at least one prompt of at least one token, got "
                          f"shape {list(input_ids.shape)} (one prompt: ids[None])")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise EncdecError(f"input_ids must hold token ids (integers), got {input_ids.dtype}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise EncdecError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}")
    if attention_mask is not None and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        # (the cached path read a 2 as 1, the uncached one as a segment of its own)
        raise EncdecError("attention_mask must hold 1 for a prompt's tokens and 0 for padding, nothing else")
    if isinstance(decoder_prefix, torch.Tensor):
        decoder_prefix = decoder_prefix.reshape(-1).tolist()
    sequence = isinstance(decoder_prefix, Iterable) and not isinstance(decoder_prefix, str | bytes)
    prefix = tuple(decoder_prefix) if sequence else None  # (5 alone was a TypeError's traceback)
    if prefix is None or not all(whole(t) for t in prefix):
        raise EncdecError(f"decoder_prefix must be a sequence of token ids (integers), got {decoder_prefix!r:.60}")
    decoder_prefix = prefix
    read = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    lowest, highest = (int(read.min()), int(read.max())) if read.numel() else (0, 0)
    outside = [lowest if lowest < 0 else highest] if lowest < 0 or highest >= cfg.vocab_size else []
    outside_prefix = [t for t in decoder_prefix if not 0 <= t < cfg.vocab_size]
    for name, bad in (("input_ids", outside), ("decoder_prefix", outside_prefix)):
        if bad:  # the embedding's IndexError otherwise
            raise EncdecError(f"{name}: token id {bad[0]} is outside the vocabulary (0 to {cfg.vocab_size - 1})")
    if attention_mask is not None and int(attention_mask.sum(1).min()) == 0:
        raise EncdecError(f"prompt {int(attention_mask.sum(1).argmin())} of the batch is empty (its attention_mask "
                          "is all 0): every prompt needs at least one token (the tokenizer's BOS, for an empty text)")
    if attention_mask is not None:  # the cached path reads a prompt's kept tokens as one text: a gap moved its tokens
        kept = attention_mask.bool()
        starts = kept[:, :1].long().sum(1) + (kept[:, 1:] & ~kept[:, :-1]).sum(1)
        if int(starts.max()) > 1:
            raise EncdecError(f"prompt {int(starts.argmax())} of the batch has a gap in its attention_mask: a prompt's "
                              "1s must be one run, padding (0s) before or after it only")
    longest = int(attention_mask.sum(1).max()) if attention_mask is not None else input_ids.shape[1]
    check_positions(longest, max_new_tokens, cfg, prefix=len(decoder_prefix))  # as encdec generate and serve refuse
    eos = _eos_ids(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    rows = [Row(max_new_tokens, eos, sampling.nth(i), decoder_prefix=tuple(decoder_prefix))
            for i in range(input_ids.shape[0])]
    input_ids = input_ids.long()  # (uint8 or int16 ids: the uncached path's embedding takes long and int only)
    if attention_mask is not None:  # what the uncached path's embedding reads too
        input_ids = input_ids.masked_fill(~attention_mask.bool(), cfg.pad_token_id)
    input_ids = input_ids.to(model.device)
    attention_mask = None if attention_mask is None else attention_mask.to(model.device)
    if use_cache:
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        for _ in generate_each(model, [ids[keep] for ids, keep in zip(input_ids, real)], rows, len(rows),
                                compile_step):
            pass
        failed = [i for i, row in enumerate(rows) if row.finish_reason == "error"]
        if failed:
            raise NonFiniteScores(failed)
    else:
        _uncached(model, input_ids, attention_mask, rows)
    width = max(len(row.tokens) for row in rows)
    out = torch.full((len(rows), width), cfg.pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row.tokens)] = torch.tensor(row.tokens)
    return out.to(model.device)
