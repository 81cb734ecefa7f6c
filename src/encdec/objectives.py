"""Pre-training objectives for encoder-decoder models: PrefixLM, T5 span corruption, UL2 mixtures, and packing.

Everything here is a pure function on token ids (lists of ints); randomness comes only from the
`numpy.random.Generator` passed in, so a seed reproduces a batch exactly. An `Example` pairs encoder
inputs with decoder targets that end with EOS; the decoder reads [BOS] + targets[:-1] (teacher forcing).

Special tokens. Sentinels (T5's <extra_id_k>) and UL2 mode tokens are not in these vocabularies, so
they reuse a vocabulary's reserved tokens: Gemma's "<unused{k}>" (Gemma 3: <unused0>..<unused98> are
ids 6..104 and <unused99>..<unused6241> are ids 256001..262143; Gemma 2 has fewer), Llama 3's
"<|reserved_special_token_{k}|>", Mistral's "[control_{k}]". Ordered by k:
    k0 -> "[NLU]", k1 -> "[NLG]", k2 -> "[S2S]"   (UL2 mode tokens)
    k3, k4, ...  -> sentinels s_0, s_1, ...     (one per noise span)
A vocabulary without reserved tokens (SmolLM2, Qwen) gets them added by name: "[NLU]", "[NLG]", "[S2S]"
and "<extra_id_{k}>" (`ul2_token_names`, added by `encdec.training.vocab.with_ul2_tokens`).
See `special_token_ids`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
# reserved tokens, one pattern per family that has them: Gemma, Llama 3, Mistral
_RESERVED = (re.compile(r"<unused(\d+)>"), re.compile(r"<\|reserved_special_token_(\d+)\|>"),
             re.compile(r"\[control_(\d+)\]"))
_ADDED_SENTINEL = re.compile(r"<extra_id_(\d+)>")


@dataclass(frozen=True)
class Example:
    """One training pair: `inputs` feed the encoder, `targets` (ending with EOS) are what the decoder predicts."""

    inputs: list[int]
    targets: list[int]


def prefix_lm(tokens: Sequence[int], *, eos_id: int, rng: np.random.Generator | None = None,
              max_inputs: int | None = None, max_targets: int | None = None) -> Example:
    """Split a sequence into a prefix (encoder) and its continuation (decoder targets, plus EOS).

    Without `rng` the split is in the middle, T5Gemma's default; with one it is uniform over 1..len-1,
    UL2's S-denoiser, so that both sides are never empty. A prefix longer than `max_inputs` keeps its
    last `max_inputs` tokens: the encoder must read what the targets continue, not the window's start.
    A continuation longer than `max_targets` keeps its first ones, and the EOS (an early random split
    of a window that fills a row would otherwise lose its EOS and end mid-row when the row cuts it).
    """
    tokens = [int(t) for t in tokens]
    if len(tokens) < 2:
        raise ValueError(f"prefix_lm needs at least 2 tokens to split into a prefix and a target, got {len(tokens)}")
    k = len(tokens) // 2 if rng is None else int(rng.integers(1, len(tokens)))
    start = 0 if max_inputs is None else max(0, k - max_inputs)
    end = len(tokens) if max_targets is None else min(len(tokens), k + max_targets)
    return Example(inputs=tokens[start:k], targets=tokens[k:end] + [eos_id])


@dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: span corruption at `rate` with spans of mean length `mean_span`, or PrefixLM.

    `mean_span=None` makes the whole noise one span (extreme denoising); `mode` names the mode token
    prepended to the inputs; `prefix_lm=True` is the S-denoiser, which ignores `rate` and `mean_span`.
    """

    rate: float
    mean_span: float | None
    mode: str | None = None
    prefix_lm: bool = False

    def __post_init__(self) -> None:
        if not self.prefix_lm and not 0.0 < self.rate < 1.0:
            raise ValueError(f"corruption rate must be in (0, 1), got {self.rate}")
        if self.mean_span is not None and self.mean_span <= 0:
            raise ValueError(f"mean_span must be positive or None, got {self.mean_span}")


@dataclass(frozen=True)
class Mixture:
    """Denoisers sampled per example with probabilities proportional to `weights`."""

    denoisers: tuple[Denoiser, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.denoisers or len(self.denoisers) != len(self.weights):
            raise ValueError(f"a mixture needs one weight per denoiser, got {len(self.denoisers)} denoisers "
                             f"and {len(self.weights)} weights")
        if any(not w > 0 for w in self.weights):
            raise ValueError(f"mixture weights must be positive, got {self.weights}")

    def draw(self, rng: np.random.Generator) -> Denoiser:
        p = np.asarray(self.weights, dtype=float)
        return self.denoisers[int(rng.choice(len(p), p=p / p.sum()))]


# T5Gemma 2: four span-corruption settings plus one span covering 3/4 of the sequence, weighted 1:1:1:1:4.
T5GEMMA2_MIXTURE = Mixture(
    denoisers=(
        Denoiser(rate=0.15, mean_span=3),
        Denoiser(rate=0.5, mean_span=12),
        Denoiser(rate=0.15, mean_span=32),
        Denoiser(rate=0.5, mean_span=32),
        Denoiser(rate=0.75, mean_span=None),
    ),
    weights=(1.0, 1.0, 1.0, 1.0, 4.0),
)

# Original UL2: R-denoisers ("[NLU]"), X-denoisers ("[NLG]") and the S-denoiser ("[S2S]", PrefixLM; its rate is unused).
# The sampling weights are this package's choice, not the paper's: equal over the seven denoisers.
UL2_MIXTURE = Mixture(
    denoisers=(
        Denoiser(rate=0.15, mean_span=3, mode="[NLU]"),
        Denoiser(rate=0.15, mean_span=8, mode="[NLU]"),
        Denoiser(rate=0.5, mean_span=3, mode="[NLG]"),
        Denoiser(rate=0.5, mean_span=8, mode="[NLG]"),
        Denoiser(rate=0.15, mean_span=64, mode="[NLG]"),
        Denoiser(rate=0.5, mean_span=64, mode="[NLG]"),
        Denoiser(rate=0.25, mean_span=None, mode="[S2S]", prefix_lm=True),
    ),
    weights=(1.0,) * 7,
)

MIXTURES = {"t5gemma2": T5GEMMA2_MIXTURE, "ul2": UL2_MIXTURE}


def _random_composition(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """Split `total` into `parts` positive integers, every such split equally likely (distinct cut points)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist()


def noise_and_spans(length: int, rate: float, mean_span: float | None) -> tuple[int, int]:
    """(noise tokens, spans) span corruption draws in `length` tokens, before spans are capped."""
    num_noise = min(max(round(length * rate), 1), length - 1)
    return num_noise, 1 if mean_span is None else round(num_noise / mean_span)


def spans_wanted(mixture: str, length: int) -> int:
    """The most spans a denoiser of `mixture` wants in a `length`-token window: the sentinels it can use."""
    return max((noise_and_spans(length, d.rate, d.mean_span)[1] for d in MIXTURES[mixture].denoisers
                if not d.prefix_lm), default=0)


def too_few_sentinels(mixture: str, length: int, sentinels: int) -> list[str]:
    """The denoisers of `mixture` that want more spans in a `length`-token window than there are `sentinels`
    (one per span): their spans come out longer than their mean (the UL2 mixtures at thousands of tokens, with a
    vocabulary's 100-odd reserved tokens), each said as a line."""
    said = []
    for denoiser in MIXTURES[mixture].denoisers:
        noise, spans = noise_and_spans(length, denoiser.rate, denoiser.mean_span)
        if not denoiser.prefix_lm and spans > sentinels:
            said.append(f"UL2 denoiser (mean span {denoiser.mean_span:g}, rate {denoiser.rate:g}) wants {spans} "
                        f"spans in a {length}-token window and the vocabulary has {sentinels} sentinels: its spans "
                        f"average {noise / sentinels:.1f} tokens")
    return said


def span_corruption(tokens: Sequence[int], *, rate: float, mean_span: float | None, sentinels: Sequence[int],
                    eos_id: int, rng: np.random.Generator) -> Example:
    """T5 span corruption: replace random spans by one sentinel each; the targets list the spans after their sentinels.

    num_noise = round(L * rate) in [1, L-1]; num_spans = round(num_noise / mean_span) (1 if mean_span is None),
    at least 1 and at most num_noise, L - num_noise and len(sentinels), so long sequences with short spans
    are capped at one span per available sentinel (the spans then get longer than `mean_span`).
    The sequence alternates non-noise and noise spans, starting with non-noise.
    """
    tokens = [int(t) for t in tokens]
    length = len(tokens)
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens (one kept, one noise), got {length}")
    if not sentinels:
        raise ValueError("span corruption needs at least one sentinel id")
    num_noise, num_spans = noise_and_spans(length, rate, mean_span)
    num_spans = max(1, min(num_spans, num_noise, length - num_noise, len(sentinels)))
    noise_lengths = _random_composition(num_noise, num_spans, rng)
    keep_lengths = _random_composition(length - num_noise, num_spans, rng)
    inputs: list[int] = []
    targets: list[int] = []
    start = 0
    for sentinel, keep, noise in zip(sentinels, keep_lengths, noise_lengths):
        inputs += tokens[start:start + keep] + [int(sentinel)]
        start += keep
        targets += [int(sentinel)] + tokens[start:start + noise]
        start += noise
    return Example(inputs=inputs, targets=targets + [eos_id])


def apply_denoiser(tokens: Sequence[int], denoiser: Denoiser, *, sentinels: Sequence[int], mode_ids: Mapping[str, int],
                   eos_id: int, rng: np.random.Generator, max_inputs: int | None = None,
                   max_targets: int | None = None) -> Example:
    """UL2: one denoiser's example (drawn from a mixture by `Mixture.draw`), its mode token (if it has one)
    prepended to the inputs. `max_inputs` bounds the S-denoiser's prefix with its mode token, `max_targets` its
    continuation before the EOS (see `prefix_lm`); the span denoisers' are theirs to fit."""
    if denoiser.prefix_lm:
        room = None if max_inputs is None else max(1, max_inputs - (denoiser.mode is not None))
        example = prefix_lm(tokens, eos_id=eos_id, rng=rng, max_inputs=room, max_targets=max_targets)
    else:
        example = span_corruption(tokens, rate=denoiser.rate, mean_span=denoiser.mean_span, sentinels=sentinels,
                                  eos_id=eos_id, rng=rng)
    if denoiser.mode is None:
        return example
    if denoiser.mode not in mode_ids:
        raise ValueError(f"no token id for mode {denoiser.mode!r}; mode_ids has {sorted(mode_ids)}")
    return Example(inputs=[int(mode_ids[denoiser.mode])] + example.inputs, targets=example.targets)


@dataclass(frozen=True)
class Framing:
    """How a model reads "continue this text" in the format its pretraining posed it: `before` goes after the
    prompt's BOS in the encoder (UL2's mode token), `after` at the prompt's end (a sentinel), and `decoder`
    after the decoder's start token, before the continuation. A model trained on T5Gemma 2's mixture never read
    a prompt without a sentinel after it nor began a target without one: scored without them, its first
    continuation token cost 19-21 nats (docs/adaptation.md)."""

    before: tuple[int, ...] = ()
    after: tuple[int, ...] = ()
    decoder: tuple[int, ...] = ()

    def describe(self) -> str:
        parts = [f"{name} {list(ids)}" for name, ids in (("before the prompt", self.before),
                                                          ("after the prompt", self.after),
                                                          ("after the decoder's start", self.decoder)) if ids]
        return "; ".join(parts) or "plain"

    def prompt(self, ids: Sequence[int], bos_id: int | None) -> list[int]:
        """`ids` framed for the encoder; `bos_id`: the tokenizer's leading BOS, kept first when `ids` has it."""
        lead = 1 if ids and bos_id is not None and ids[0] == bos_id else 0
        return [*ids[:lead], *self.before, *ids[lead:], *self.after]


PLAIN = Framing()


def continuation_framing(objective: str, mixture: str, vocab: Mapping[str, int]) -> Framing:
    """The framing of a model pretrained with `objective` (and UL2's `mixture`): a UL2 mixture's PrefixLM
    denoiser where it has one (its mode token before the prefix), else its single-span denoiser (the kept start,
    then the first sentinel in both encoder and decoder); PrefixLM and instruction tuning read plain text."""
    if objective != "ul2":
        return PLAIN
    mode_ids, sentinels = special_token_ids(vocab)
    denoisers = MIXTURES[mixture].denoisers
    prefix = next((d for d in denoisers if d.prefix_lm), None)
    if prefix is not None:
        return Framing(before=(mode_ids[prefix.mode],) if prefix.mode else ())
    single = next((d for d in denoisers if d.mean_span is None), None)
    if single is None:
        return PLAIN
    mode = (mode_ids[single.mode],) if single.mode else ()
    return Framing(before=mode, after=(sentinels[0],), decoder=(sentinels[0],))


def trained_framing(metadata: Mapping, vocab: Mapping[str, int]) -> Framing:
    """The framing of a saved model from its provenance (`encdec.checkpoint.read_metadata`): its pretraining
    objective's, unless it was instruction-tuned too (plain prompts; the provenance keeps one record of each kind
    of run, not their order, and tuning normally comes last)."""
    run = metadata.get("pretrained")
    if "finetuned" in metadata or not isinstance(run, Mapping):
        return PLAIN
    settings = run.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise TypeError(f"its provenance's settings are a {type(settings).__name__}, not a mapping")
    objective, mixture = run.get("objective", "prefixlm"), settings.get("mixture", "t5gemma2")
    if objective == "ul2" and mixture not in MIXTURES:  # hand-edited, or from another version
        raise ValueError(f"its provenance names the UL2 mixture {mixture!r}; known: {', '.join(MIXTURES)}")
    return continuation_framing(objective, mixture, vocab)


def _numbered(vocab: Mapping[str, int], pattern: re.Pattern) -> list[int]:
    """Ids of the tokens matching `pattern`, ordered by their number k."""
    matches = ((pattern.fullmatch(name), int(i)) for name, i in vocab.items())
    return [i for _, i in sorted((int(m.group(1)), i) for m, i in matches if m)]


def reserved_token_ids(vocab: Mapping[str, int]) -> list[int]:
    """The vocabulary's reserved tokens by k, of the first family pattern it has enough of (may be empty)."""
    for pattern in _RESERVED:
        ids = _numbered(vocab, pattern)
        if len(ids) > len(MODE_TOKENS):
            return ids
    return []


def ul2_token_names(sentinels: int) -> list[str]:
    """The tokens added to a vocabulary without reserved ones: the mode tokens, then `sentinels` sentinels."""
    return [*MODE_TOKENS, *(f"<extra_id_{k}>" for k in range(sentinels))]


def special_token_ids(vocab: Mapping[str, int]) -> tuple[dict[str, int], list[int]]:
    """Mode-token ids and sentinel ids (mapping in module docstring): the added tokens where the vocabulary has
    them, else its reserved tokens, the three lowest k being "[NLU]", "[NLG]", "[S2S]" and the rest sentinels."""
    if all(token in vocab for token in MODE_TOKENS) and (added := _numbered(vocab, _ADDED_SENTINEL)):
        return {token: int(vocab[token]) for token in MODE_TOKENS}, added
    ids = reserved_token_ids(vocab)
    if not ids:
        raise ValueError(f"the vocabulary has no reserved tokens (<unused{{k}}>, <|reserved_special_token_{{k}}|>, "
                         f"[control_{{k}}]) beyond {len(MODE_TOKENS)}, nor UL2's added tokens {ul2_token_names(1)}")
    return dict(zip(MODE_TOKENS, ids)), ids[len(MODE_TOKENS):]


@dataclass
class PackedRows:
    """Packed batch: several examples per row, told apart by segment ids (0 = padding, k = k-th example of the row).

    Encoder fields are [rows, enc_len], decoder fields [rows, dec_len], all int64; decoder segment k pairs with
    encoder segment k, and positions restart at 0 in each segment.
    """

    input_ids: torch.Tensor
    segment_ids: torch.Tensor
    positions: torch.Tensor
    decoder_input_ids: torch.Tensor
    decoder_segment_ids: torch.Tensor
    decoder_positions: torch.Tensor
    labels: torch.Tensor

    def padding_waste(self) -> tuple[float, float]:
        """Fraction of encoder slots and of decoder slots that hold padding: the cost of this packing."""
        enc, dec = self.segment_ids, self.decoder_segment_ids
        return (enc == 0).sum().item() / enc.numel(), (dec == 0).sum().item() / dec.numel()


def pack(examples: Iterable[Example], *, enc_len: int, dec_len: int, pad_id: int, bos_id: int) -> PackedRows:
    """Pack examples, in order, greedily into rows of enc_len encoder and dec_len decoder slots.

    An example joins the current row when both its inputs and its targets fit in what is left, else it starts
    a new row. An example longer than a row is truncated to its first enc_len inputs and dec_len targets (its
    targets then lose their EOS); the decoder inputs are built from the truncated targets.
    """
    if enc_len < 1 or dec_len < 1:
        raise ValueError(f"enc_len and dec_len must be positive, got {enc_len} and {dec_len}")
    rows: list[list[Example]] = []
    used_enc = used_dec = 0
    for example in examples:
        if not example.inputs or not example.targets:
            raise ValueError("cannot pack an example with empty inputs or targets: its segment would be missing")
        example = Example(inputs=list(example.inputs[:enc_len]), targets=list(example.targets[:dec_len]))
        if not rows or used_enc + len(example.inputs) > enc_len or used_dec + len(example.targets) > dec_len:
            rows.append([])
            used_enc = used_dec = 0
        rows[-1].append(example)
        used_enc += len(example.inputs)
        used_dec += len(example.targets)
    if not rows:
        raise ValueError("no examples to pack")

    shape_enc, shape_dec = (len(rows), enc_len), (len(rows), dec_len)
    input_ids, segment_ids, positions = np.full(shape_enc, pad_id), np.zeros(shape_enc, int), np.zeros(shape_enc, int)
    dec_ids, dec_segments, dec_positions = np.full(shape_dec, pad_id), np.zeros(shape_dec, int), np.zeros(shape_dec, int)
    labels = np.full(shape_dec, IGNORE_INDEX)
    for r, row in enumerate(rows):
        e = d = 0
        for segment, example in enumerate(row, start=1):
            n, m = len(example.inputs), len(example.targets)
            input_ids[r, e:e + n], segment_ids[r, e:e + n], positions[r, e:e + n] = example.inputs, segment, range(n)
            dec_ids[r, d:d + m] = [bos_id] + example.targets[:-1]
            dec_segments[r, d:d + m], dec_positions[r, d:d + m] = segment, range(m)
            labels[r, d:d + m] = example.targets
            e, d = e + n, d + m
    return PackedRows(*(torch.from_numpy(a.astype(np.int64)) for a in (
        input_ids, segment_ids, positions, dec_ids, dec_segments, dec_positions, labels)))
