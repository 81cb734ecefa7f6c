"""One scoring interface over both kinds of model, so that every task treats them alike.

- An encoder-decoder reads the context in its encoder and scores the continuation in its decoder
  (decoder input: BOS + continuation[:-1]); each distinct context is encoded once per batch.
- A decoder-only model (run by transformers, as its authors ship it) scores the continuation
  after the context, in one causal pass.
Contexts are tokenized with BOS, continuations without special tokens, identically for both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from encdec.checkpoint import is_checkpoint
from encdec.data.tokens import leading_bos, text_ids
from encdec.errors import EncdecError
from encdec.model import EncoderDecoder, EncoderState, Segments
from encdec.objectives import PLAIN, Framing
from encdec.training.data import pad_rows

log = logging.getLogger("encdec")
Request = tuple[list[int], list[int]]  # (context ids with BOS, continuation ids)


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


@dataclass
class Scorer:
    """A loaded model of either kind; `name` is what the user passed."""

    name: str
    kind: str  # "encoder-decoder" or "decoder-only"
    model: torch.nn.Module
    tokenizer: object
    max_len: int = 2048
    framing: Framing = PLAIN  # how an encoder-decoder was trained to read a continuation (UL2's sentinel)
    positions: int | None = None  # a decoder-only model's: what its context and continuation (or new tokens) share
    # each token's text, read when first needed (`stop_token_ids`)
    _vocabulary: list[str] = field(default_factory=list, init=False, repr=False)

    @property
    def eos_id(self) -> int:
        """The tokenizer's EOS, or where it names none (a tokenizer_config.json without one) the model's first."""
        eos = self.tokenizer.eos_token_id
        eos = next(iter(self.model_eos_ids), None) if eos is None else eos
        if eos is None:  # (int(None): a TypeError's traceback once the model's first task needed it)
            raise EncdecError(f"{self.name}: neither its tokenizer nor its configuration names an EOS token, which "
                              "padding and generation need; set eos_token in its tokenizer_config.json")
        return int(eos)

    @property
    def pad_id(self) -> int:
        """What batches are padded with (masked, never read): the model's pad token, or for a tokenizer that names
        none (Llama's, Mistral's) its EOS."""
        if self.kind == "encoder-decoder":
            return self.model.config.pad_token_id  # also what encdec's generate fills finished rows with
        return self.eos_id if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id

    def context_ids(self, text: str) -> list[int]:
        return self.cut_context(text_ids(self.tokenizer, text))  # with BOS where the tokenizer puts one

    def cut_context(self, ids: list[int]) -> list[int]:
        """A context's ids cut to --max-len as `context_ids` cuts them (`_cut`)."""
        return self._cut(ids, self.max_len)

    def _cut(self, ids: list[int], n: int) -> list[int]:
        """A context of at most `n` tokens: a long one keeps its BOS and its end. A BOS the tokenizer puts before
        every text, as instruction tuning's cut keeps it (SmolLM2's BOS id is its <|im_start|>, which begins a
        chat prompt, not every text)."""
        if len(ids) <= n:
            return ids
        first = leading_bos(self.tokenizer)
        bos = int(first is not None and ids[0] == first)
        return ids[:bos] + ids[len(ids) - max(n - bos, 1 - bos) :]

    def stop_token_ids(self, stops: tuple[str, ...]) -> list[int]:
        """The tokens whose text holds a stop string: generation ends at them, as what follows a stop is cut anyway.
        The one token that spells a stop was not enough: Gemma writes a few-shot answer's blank line as its "\\n\\n"
        token (NQ's "\\n" stop never came, every answer ran its whole budget), byte-level tokenizers merge ".\\n\\n".
        Special tokens are left out: their text is not in the decoded answer."""
        if not self._vocabulary:  # 2 s for a vocabulary of 262k
            self._vocabulary = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        special = set(self.tokenizer.all_special_ids)
        return [i for i, text in enumerate(self._vocabulary) if i not in special and any(s in text for s in stops)]

    def continuation_ids(self, text: str, after: str) -> list[int]:
        """The tokens `text` adds after `after` (its context): both tokenized together, as the model reads them in
        a text, and split where the context's own tokens end. Alone, a tokenizer that prepends "▁" to every
        text (Llama 2's, Mistral's) would spell " Paris" as "▁", "▁Paris"; where the two merge across the
        boundary, `text` is tokenized alone."""
        before = self.tokenizer(after, add_special_tokens=False).input_ids
        whole = self.tokenizer(after + text, add_special_tokens=False).input_ids
        if whole[: len(before)] == before:
            return whole[len(before) :]
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def response_ids(self, text: str) -> list[int]:
        """An answer's tokens in a chat turn, as instruction tuning tokenizes a response (`encdec.data.instructions`):
        alone. After the turn's opening Llama 2's tokenizer would read "Paris" without the "▁" it was tuned with."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def loglikelihoods(self, requests: list[Request], batch_size: int, desc: str = "scoring") -> list[tuple[float, bool]]:
        """Per request: the summed log-probability of the continuation, and whether greedy decoding
        would produce it exactly."""
        # a request asked twice (two answer options with the same text) is scored once: its copies then tie
        # exactly, instead of by padding noise that changes with the batch they land in
        if any(not ctx for ctx, _ in requests):  # (a decoder-only model read its first token after the padding)
            raise EncdecError("a request's context is empty: a continuation is scored after at least one token (the "
                              "tokenizer's BOS, where it puts one: `context_ids`)")
        first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        copy_of = [first.setdefault((tuple(ctx), tuple(cont)), i) for i, (ctx, cont) in enumerate(requests)]
        distinct = sorted(set(copy_of), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with torch.no_grad():
            for chunk in tqdm(list(_batches(distinct, batch_size)), desc=desc, unit="batch", leave=False, disable=None):
                scores = self._score([requests[i] for i in chunk])
                for i, s in zip(chunk, scores):
                    out[i] = s
        return [out[i] for i in copy_of]

    def _score(self, requests: list[Request]) -> list[tuple[float, bool]]:
        if self.kind == "encoder-decoder":
            hidden, targets = _encdec_states(self.model, requests, self.framing)
            logits = self.model.logits(hidden)
        else:
            if self.positions is not None:  # the context cut further to leave its continuation room (lm-eval's way)
                requests = [(self._cut(ctx, self.positions - len(cont)), cont) for ctx, cont in requests]
            logits, targets = _causal_logits(self.model, requests, self.pad_id)
        logp = F.log_softmax(logits.float(), -1)
        token_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
        greedy = logp.argmax(-1) == targets
        out, start = [], 0
        for _, cont in requests:
            end = start + len(cont)
            out.append((token_logp[start:end].sum().item(), bool(greedy[start:end].all())))
            start = end
        return out

    @property
    def model_eos_ids(self) -> list[int]:
        """The ids the model itself ends at (Gemma 3 IT's <end_of_turn> besides <eos>, Llama 3's <|eot_id|>)."""
        if self.kind == "encoder-decoder":
            return list(self.model.config.eos_token_ids)
        eos = self.model.generation_config.eos_token_id
        eos = self.model.config.eos_token_id if eos is None else eos
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def budget(self, max_new_tokens: int) -> int:
        """The new tokens a continuation gets of a task's `max_new_tokens`: what the model's positions hold (an
        encoder-decoder's decoder, past a framing's tokens; half a decoder-only model's, the prompt the rest)."""
        if self.kind == "encoder-decoder":
            limit = self.model.config.decoder.max_positions
            return max_new_tokens if limit is None else min(max_new_tokens, limit - len(self.framing.decoder))
        return max_new_tokens if self.positions is None else min(max_new_tokens, self.positions // 2)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
        """Greedy continuations of at most `budget(max_new_tokens)` tokens, stopping at the model's EOS ids, the
        tokenizer's or any of `stop_ids`."""
        eos, pad = list(dict.fromkeys([self.eos_id, *self.model_eos_ids, *stop_ids])), self.pad_id
        max_new_tokens = self.budget(max_new_tokens)
        with torch.no_grad():
            if self.kind == "encoder-decoder":
                framed = [self.framing.prompt(p, self.model.config.bos_token_id) for p in prompts]
                ids, mask = (t.to(self.model.device) for t in pad_rows(framed, pad))
                out = self.model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                                          decoder_prefix=self.framing.decoder)
            else:
                if self.positions is not None:
                    prompts = [self._cut(p, self.positions - max_new_tokens) for p in prompts]
                ids, mask = (t.to(self.model.device) for t in pad_rows(prompts, pad, left=True))
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          do_sample=False, eos_token_id=eos, pad_token_id=pad)[:, ids.shape[1]:]
        return [[t for t in row.tolist() if t != pad] for row in out]


def _encdec_states(model: EncoderDecoder, requests: list[Request],
                   framing: Framing = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder states predicting every continuation token (flattened, in request order) and those tokens."""
    cfg, device = model.config, model.device
    contexts: dict[tuple[int, ...], int] = {}
    for ctx, _ in requests:
        contexts.setdefault(tuple(ctx), len(contexts))
    enc_ids, enc_mask = (t.to(device) for t in pad_rows([framing.prompt(c, cfg.bos_token_id) for c in contexts],
                                                         cfg.pad_token_id))
    encoded = model.encode(enc_ids, enc_mask)
    rows = torch.tensor([contexts[tuple(ctx)] for ctx, _ in requests], device=device)
    start = [cfg.bos_token_id, *framing.decoder]
    dec_ids, dec_mask = (t.to(device) for t in pad_rows([[*start, *cont[:-1]] for _, cont in requests],
                                                         cfg.pad_token_id))
    encoder = EncoderState(encoded[rows], Segments.of(enc_ids[rows], enc_mask[rows], None, None))
    hidden = model.decode(dec_ids, encoder, Segments.of(dec_ids, dec_mask, None, None))
    targets = torch.tensor([t for _, cont in requests for t in cont], dtype=torch.long, device=device)
    # an empty continuation still feeds the start; only positions that predict a continuation token are kept
    lengths = torch.tensor([len(cont) for _, cont in requests], device=device)
    position = torch.arange(dec_ids.shape[1], device=device) - len(framing.decoder)
    predicts = (position >= 0) & (position < lengths[:, None])
    return hidden[predicts], targets


def _causal_logits(model: torch.nn.Module, requests: list[Request], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits [tokens, vocab] that predict each request's continuation tokens (the targets [tokens]), as the
    model's own forward gives them, with its output layer fed those positions alone [1, tokens, d] (a hook on it):
    what the model does to its logits after the layer applies (Gemma's soft-cap, Granite's and Cohere's scales,
    which were skipped), and the vocabulary is computed for the continuations only."""
    ids, mask = (t.to(model.device) for t in pad_rows([ctx + cont for ctx, cont in requests], pad_id))
    # (long even when empty: a batch of empty continuations only indexed with float tensors)
    rows = torch.tensor([i for i, (_, cont) in enumerate(requests) for _ in cont], dtype=torch.long,
                        device=model.device)
    positions = torch.tensor([p for ctx, cont in requests for p in range(len(ctx) - 1, len(ctx) + len(cont) - 1)],
                             dtype=torch.long, device=model.device)
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _, args: (args[0][rows, positions][None], *args[1:]))
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits[0]
    finally:
        hook.remove()
    targets = torch.tensor([t for _, cont in requests for t in cont], dtype=torch.long, device=model.device)
    return logits, targets


def check_loadable(spec: str) -> None:
    """Fail before any model runs when `spec` cannot be loaded as `load_scorer` will: a checkpoint's configuration
    unreadable or its tokenizer missing, or a directory that holds no model (a training run's, whose model is in
    model/): found after hours of scoring the models before it, which lost their results."""
    from encdec.checkpoint import read_config
    from encdec.files import weight_files
    from encdec.sources import check_causal_lm, has_tokenizer

    directory = model_directory(spec)
    if is_checkpoint(directory):
        read_config(directory)
        weight_files(directory)
    elif not (directory / "config.json").is_file():
        inside = f"; its model is {Path(spec) / 'model'}" if (directory / "model" / "config.json").is_file() else ""
        raise EncdecError(f"{spec}: {directory} holds no model (no config.json){inside}")
    else:
        check_causal_lm(directory)
    if not has_tokenizer(directory):
        raise EncdecError(f"{spec}: {directory} has no tokenizer (tokenizer.json or tokenizer.model) to read the "
                          "tasks with")


def model_directory(spec: str) -> Path:
    """The directory of MODEL as given: a local checkpoint as it is, else the source it names (a packaged or Hub
    name, a GGUF file: `encdec.sources.resolve`), which may be an encoder-decoder checkpoint too (T5Gemma's on
    the Hub)."""
    from encdec.sources import resolve

    return Path(spec).expanduser() if is_checkpoint(spec) else resolve(spec)


def load_scorer(spec: str, dtype: torch.dtype = torch.float32, max_len: int = 2048) -> Scorer:
    """An encoder-decoder checkpoint (anything `encdec.load` reads) or a decoder-only source."""
    from encdec.inference.loading import compute_device
    from encdec.sources import load_tokenizer, transformers_causal_lm

    directory = model_directory(spec)
    if is_checkpoint(directory):
        from encdec.checkpoint import load
        from encdec.inference.loading import model_framing

        tokenizer = load_tokenizer(directory)
        model, framing = load(directory, dtype).to(compute_device()), model_framing(directory, tokenizer)
        limit = model.config.encoder.max_positions  # a longer context keeps its end, as past --max-len
        if limit is not None:
            max_len = max(2, min(max_len, limit - len(framing.before) - len(framing.after)))
        return Scorer(spec, "encoder-decoder", model, tokenizer, max_len, framing)
    model = transformers_causal_lm(directory, dtype).to(compute_device())
    limit = getattr(model.config, "max_position_embeddings", None)  # capped as an encoder-decoder's column is: one
    if not (isinstance(limit, int) and limit > 2):  # table's columns scored contexts of different lengths
        return Scorer(spec, "decoder-only", model, load_tokenizer(directory), max_len)
    return Scorer(spec, "decoder-only", model, load_tokenizer(directory), max(3, min(max_len, limit)), positions=limit)
