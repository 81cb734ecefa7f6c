"""How each generated row picks its next token: its own penalties, sampling settings and seeded generator.

A row's tokens depend only on its prompt and its settings, never on the rows it shares a batch with,
so a request served in a continuous batch gets the tokens it would get alone (up to near-ties at the dtype's
rounding, far more frequent in bfloat16: `encdec.inference.engine`).

Penalties and biases change a row's logits before greedy or sampled choice, counting the tokens the row
generated (the prompt is the encoder's, not text the decoder wrote): OpenAI's presence penalty (minus
p for each token already generated) and frequency penalty (minus f times its count), the repetition
penalty of the CTRL paper that transformers and vLLM offer (a generated token's positive logit divided
by r, a negative one multiplied by r), and a logit bias per token id.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from encdec.errors import EncdecError

MIN_TEMPERATURE = 1e-5  # below it sampling is greedy, as in vLLM (in float32 a tinier one divides by zero)
ARGMAX_BLOCK = 512  # logits per block when a row's argmax is found through its blocks' maxima


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` of logits [B, V], the same index (the first of equal maxima; a NaN counts as the largest),
    found on CPU from the maxima of blocks of ARGMAX_BLOCK logits, then within the first block holding the
    largest: PyTorch's CPU argmax of 16 x 262k logits took 2.65 ms in float32 and 6.7 ms in bfloat16, this 0.4
    and 0.7 ms (docs/benchmarks.md, 2026-12-05)."""
    n, vocab = x.shape
    whole = vocab - vocab % ARGMAX_BLOCK
    if x.device.type != "cpu" or whole == 0 or n == 0:
        return x.argmax(-1)
    blocks = x[:, :whole].reshape(n, -1, ARGMAX_BLOCK)
    block = blocks.amax(-1).argmax(-1)
    best = block * ARGMAX_BLOCK + blocks[torch.arange(n, device=x.device), block].argmax(-1)
    if whole == vocab:
        return best
    tail = whole + x[:, whole:].argmax(-1)
    a, b = x.gather(1, best[:, None])[:, 0], x.gather(1, tail[:, None])[:, 0]
    return torch.where((b > a) | (b.isnan() & ~a.isnan()), tail, best)  # on a tie, the earlier


@dataclass(frozen=True)
class Sampling:
    """Greedy decoding by default; `do_sample` draws from the temperature / top-k / top-p filtered distribution
    (a temperature below MIN_TEMPERATURE is greedy; top_k None, 0 or -1 keeps every token; top_p 0 the likeliest
    alone: as transformers, vLLM and the OpenAI API read them)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_bias", bias_pairs(self.logit_bias))
        _check_types(self)
        for name in ("top_k", "seed"):  # numpy's integers as Python's: a seed's arithmetic overflowed int64
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        if self.top_k in (0, -1):  # no limit, as transformers and vLLM read them
            object.__setattr__(self, "top_k", None)
        if self.top_p == 0:  # the smallest set of tokens whose mass reaches 0: the likeliest token alone
            object.__setattr__(self, "top_p", 1.0)
            object.__setattr__(self, "top_k", 1)
        if self.do_sample and 0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "do_sample", False)
            object.__setattr__(self, "temperature", 1.0)

    @functools.cached_property
    def _bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The logit biases as token ids and values, added in one operation each step (one at a time, a
        full-vocabulary map took 2.5 s a row and step on the scheduler's thread, stalling every row of the batch;
        added at once, 1.1 ms: docs/benchmarks.md)."""
        return (torch.tensor([t for t, _ in self.logit_bias], dtype=torch.long),
                torch.tensor([b for _, b in self.logit_bias], dtype=torch.float64))

    @property
    def adjusts(self) -> bool:
        """Whether the logits are changed before the choice (then greedy needs every logit, not a screen)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias)

    def adjust(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """One row's float logits [V] with the penalties for the `generated` tokens and the biases applied."""
        if not self.adjusts:
            return logits
        logits = logits.clone()
        if generated:
            ids, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
            seen = logits[ids]
            seen = torch.where(seen > 0, seen / self.repetition_penalty, seen * self.repetition_penalty)
            logits[ids] = seen - self.presence_penalty - self.frequency_penalty * counts.to(logits.dtype)
        if self.logit_bias:
            ids, biases = self._bias
            logits.index_add_(0, ids.to(logits.device), biases.to(logits.device, logits.dtype))
        return _finite(logits)  # a tiny repetition penalty overflows a logit: it stays the largest, not inf

    def check(self) -> None:
        """The settings' ranges. A temperature of 0 is refused only when sampling: greedy decoding never reads it,
        and transformers accepts temperature=0 with do_sample=False."""
        low_ok = self.temperature > 0 or (self.temperature == 0 and not self.do_sample)
        if not (math.isfinite(self.temperature) and low_ok):
            raise EncdecError(f"temperature must be a positive finite number, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise EncdecError(f"top_k must be at least 1 (None: no limit), got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise EncdecError(f"top_p must be in [0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise EncdecError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise EncdecError(f"repetition_penalty must be a positive finite number, got {self.repetition_penalty}")
        for token, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise EncdecError(f"the logit bias of token {token} must be in [-100, 100], got {bias}")

    def nth(self, index: int) -> Sampling:
        """The settings of the index-th (from 0) of several samples with these ones (a request's choices, the prompts
        of `encdec generate`): a seeded one draws from seed + index, so that the first is what one alone draws and
        the same prompt twice gets two samples."""
        if index == 0 or self.seed is None:
            return self
        if self.logit_bias:
            _ = self._bias  # built once, shared by every copy (a full-vocabulary map: 36 ms a copy)
        other = copy.copy(self)  # the settings checked once: replace() checked and rebuilt a full-vocabulary
        # logit_bias for every choice of a request (280 ms each, on the server's event loop)
        object.__setattr__(other, "seed", (self.seed + index) % 2**64)
        return other

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The row's own random stream: seeded by `seed`, else by the global torch RNG (so manual_seed governs it)."""
        if not self.do_sample:
            return None
        if self.seed is None:
            return torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,)).item()))
        # the CPU generator reads the low 32 bits of its seed: the high ones are folded in, so that seeds 5 and
        # 5 + 2**32 (or -1 and 2**32 - 1) give different streams, and a seed below 2**32 its stream of before
        seed = self.seed % 2**64
        return torch.Generator(device=device).manual_seed((seed ^ (seed >> 32) * 0x9E3779B1) % 2**32)


def whole(value: object) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_types(s: Sampling) -> None:
    """Values of the wrong kind from the Python API (`model.generate(top_k=2.5)`, OpenAI's string keys in
    `logit_bias`): a TypeError from deep inside otherwise (the CLI and the server check their own)."""
    real = {name: getattr(s, name) for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                                  "repetition_penalty")}
    for name, value in real.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise EncdecError(f"{name} must be a number, got {value!r}")
    for name in ("top_k", "seed"):
        if getattr(s, name) is not None and not whole(getattr(s, name)):
            raise EncdecError(f"{name} must be an integer or None, got {getattr(s, name)!r}")
    for token, bias in s.logit_bias:
        if not whole(token) or not isinstance(bias, numbers.Real) or isinstance(bias, bool):
            raise EncdecError(f"logit_bias maps token ids (integers) to numbers, got {token!r}: {bias!r}")


def bias_pairs(value: object) -> tuple[tuple[object, object], ...]:
    """`logit_bias` as (token id, bias) pairs: given as pairs or as a mapping ({id: bias}, which iterated as pairs
    was a TypeError's traceback); None for none. The pairs' values are checked by `_check_types`."""
    pairs = value.items() if isinstance(value, Mapping) else () if value is None else value
    pairs = tuple(pairs) if isinstance(pairs, Iterable) and not isinstance(pairs, str | bytes) else None  # (zip: once)
    if pairs is None or not all(isinstance(p, tuple | list) and len(p) == 2 for p in pairs):
        raise EncdecError(f"logit_bias must map token ids to biases ({{id: bias}}), got {value!r:.60}")
    return tuple(tuple(p) for p in pairs)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """Logits with +-inf replaced by the dtype's largest finite values (NaN cannot arise: settings are checked)."""
    largest = torch.finfo(logits.dtype).max
    return logits.clamp(-largest, largest)


def filtered_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """Float logits [..., V] scaled by the temperature, with the tokens outside top-k / top-p set to -inf.
    The largest logit is subtracted first (the softmax is unchanged): with a temperature so small that the
    scaled logits overflow, the others become -inf and the largest is drawn, never a NaN."""
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[..., 0] = False  # and the likeliest token always: a top_p that float32 rounds to 0 dropped every one
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class NonFiniteScores(EncdecError):
    """Rows whose logits hold NaN or infinity (an overflow, in float16 say): no token can be chosen from them.
    Raised before any row draws, so that a caller can leave those rows out and the others' streams are as
    they were."""

    def __init__(self, rows: Sequence[int] = ()) -> None:
        super().__init__("the model's scores (logits) are not finite numbers, so no token can be chosen from them (an "
                         "overflow: float32 or bfloat16 do not overflow where float16 may)")
        self.rows = rows


def pick_tokens(
    logits: torch.Tensor, settings: list[Sampling], generators: list[torch.Generator | None],
    generated: list[list[int]], forced: Collection[int] = (),
) -> torch.Tensor:
    """One token per row of float logits [B, V] (each row's `generated` tokens so far for its penalties): greedy
    rows by one argmax, sampling rows each from its own stream. `forced`: rows whose token is set instead (a
    decoder prefix being read), which draw nothing: a seeded stream's first draw is its first generated token's.
    Raises `NonFiniteScores` for the rows whose logits are not finite (sampling rows: any; greedy rows: a NaN or an
    overflowed largest), before any row draws."""
    drawing = [row for row, s in enumerate(settings) if s.do_sample and row not in forced]
    broken = []
    if drawing:
        finite = torch.isfinite(logits[drawing]).all(-1).tolist()
        broken = [row for row, ok in zip(drawing, finite) if not ok]
    def unchosen(scores: torch.Tensor, chosen: torch.Tensor) -> list[int]:
        """The greedy rows whose chosen score is not finite (a NaN counts as the largest: a row holding one chose it,
        and emitted a token as if all were well)."""
        top = torch.isfinite(scores.gather(1, chosen[:, None])[:, 0]).tolist()
        return [row for row, (s, ok) in enumerate(zip(settings, top)) if not (ok or s.do_sample or row in forced)]

    if any(s.adjusts for s in settings):  # the model's own scores checked: `adjust` made an overflow's inf finite
        broken += unchosen(logits, row_argmax(logits))
        logits = torch.stack([s.adjust(row, done) for row, s, done in zip(logits, settings, generated)])
    chosen = row_argmax(logits)
    broken += unchosen(logits, chosen)
    if broken:
        raise NonFiniteScores(sorted(set(broken)))
    for row, (s, gen) in enumerate(zip(settings, generators)):
        if s.do_sample and row not in forced:
            probs = torch.softmax(filtered_logits(logits[row], s.temperature, s.top_k, s.top_p), dim=-1)
            chosen[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return chosen
