"""Training batches: token windows -> objective examples -> packed rows, plus the rows the
decoder-only teacher reads. The stream is a pure function of the seed and its state, so a resumed
run sees exactly the batches an uninterrupted one would have seen. Unpacked rows (one example
each, as classification and scoring read them) are padded by `pad_rows`, and grouped into batches of alike
lengths by `length_grouped`."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from encdec.errors import EncdecError
from encdec.objectives import MIXTURES, Example, PackedRows, apply_denoiser, pack, prefix_lm, special_token_ids

MakeExample = Callable[[list[int], np.random.Generator], Example]
ItemToExample = Callable[[Any, np.random.Generator], Example]


@dataclass
class TeacherRows:
    """Each row's examples as the teacher reads them: inputs + targets[:-1], causally, packed."""

    input_ids: torch.Tensor  # [R, enc_len + dec_len]
    segment_ids: torch.Tensor
    positions: torch.Tensor
    target_positions: torch.Tensor  # [R, dec_len]: teacher position predicting each decoder label; -1: none


@dataclass
class Batch:
    rows: PackedRows
    teacher: TeacherRows | None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with `fn` applied to every tensor."""
        def apply(obj: Any) -> Any:
            return dataclasses.replace(obj, **{f.name: fn(getattr(obj, f.name)) for f in dataclasses.fields(obj)})

        return Batch(apply(self.rows), None if self.teacher is None else apply(self.teacher))

    def slice(self, start: int, end: int) -> Batch:
        """Rows [start, end): one process's share of a global batch."""
        return self.map(lambda t: t[start:end])

    def to(self, device: torch.device) -> Batch:
        return self if device.type == "cpu" else self.map(lambda t: t.to(device))

    @property
    def target_tokens(self) -> int:
        return int((self.rows.labels != -100).sum())


def example_maker(objective: str, *, eos_id: int, vocab: Mapping[str, int], enc_len: int, dec_len: int,
                  bos_id: int | None = None, mixture: str = "t5gemma2", random_split: bool = False) -> MakeExample:
    """The objective as a function of one token window and the stream's random generator.

    Windows start anywhere in a document, but at inference the encoder reads text as the tokenizer starts it:
    with `bos_id` (the tokenizer's leading BOS, if it adds one) every example's inputs begin with it, and so
    do the teacher's and a decoder-only student's rows (Gemma 3 270M reading windows without BOS is about 1.3
    nats worse on their continuations). A prefix longer than the encoder keeps its end, which the targets continue.
    A corrupted window that does not fit the row is corrupted again from a shorter window, by the same denoiser
    (drawing again would trade the denoisers with long targets for short ones whenever encoder and decoder rows
    differ: at 256 + 64 tokens the T5Gemma 2 mixture's 3/4-span denoiser fell from half the examples to a tenth);
    cutting its inputs would drop sentinels whose spans the targets still hold. UL2's S-denoiser, which has no
    sentinels, splits as PrefixLM does and keeps its continuation's start, so its split stays uniform.
    """
    eos, room = eos_id, enc_len - (bos_id is not None)
    if objective == "prefixlm":
        def make(window: Sequence[int], rng: np.random.Generator) -> Example:
            return prefix_lm(window, eos_id=eos, rng=rng if random_split else None, max_inputs=room,
                             max_targets=dec_len - 1)
    else:
        mode_ids, sentinels = special_token_ids(vocab)
        chosen = MIXTURES[mixture]

        def make(window: Sequence[int], rng: np.random.Generator) -> Example:
            denoiser = chosen.draw(rng)
            while True:
                example = apply_denoiser(window, denoiser, sentinels=sentinels, mode_ids=mode_ids, eos_id=eos, rng=rng,
                                         max_inputs=room, max_targets=dec_len - 1)
                if len(example.inputs) <= room and len(example.targets) <= dec_len:
                    return example
                if len(window) <= 2:  # cut to fit, it would lose its EOS or a sentinel: every example, silently
                    raise EncdecError(f"--enc-len {enc_len} / --dec-len {dec_len}: a UL2 example of a 2-token window "
                                      f"needs {len(example.inputs) + enc_len - room} input and {len(example.targets)} "
                                      "target tokens (mode token, BOS, sentinels, EOS); raise them")
                window = window[: max(2, len(window) * 3 // 4)]
    if bos_id is None:
        return make

    modes = set(mode_ids.values()) if objective != "prefixlm" else set()

    def make_with_bos(window: Sequence[int], rng: np.random.Generator) -> Example:
        example = make(window, rng)
        inputs = example.inputs
        if inputs[0] == bos_id:
            return example
        if len(inputs) > 1 and inputs[0] in modes and inputs[1] == bos_id:  # a document's own BOS after UL2's mode
            return Example([bos_id, inputs[0], *inputs[2:]], example.targets)  # token: first, as a prompt is served
        return Example([bos_id, *inputs], example.targets)

    return make_with_bos


UL2_TOKENS = {f"<unused{k}>": k for k in range(128)}  # a vocabulary's UL2 tokens, for ul2_kept_share alone


def ul2_kept_share(mixture: str, enc_len: int, dec_len: int, window: int = 0, draws: int = 200) -> float:
    """The share of a window's tokens that its UL2 example holds (in its inputs or its targets), over `draws`
    seeded windows, with a leading BOS: below 1 where corrupted windows are shortened to fit the rows
    (`example_maker`), what they drop never trained on. Measured: the t5gemma2 mixture kept 65% at 512 + 128 tokens,
    78% at 128 + 512; equal lengths keep everything."""
    make = example_maker("ul2", eos_id=0, vocab=UL2_TOKENS, enc_len=enc_len, dec_len=dec_len, bos_id=1,
                         mixture=mixture)
    length = window_length("ul2", enc_len, dec_len, bos=True, window=window)
    tokens, rng, kept = range(1 << 20, (1 << 20) + length), np.random.default_rng(0), 0
    for _ in range(draws):
        example = make(tokens, rng)
        kept += len({t for t in (*example.inputs, *example.targets) if t >= tokens.start})
    return kept / (draws * length)


def window_length(objective: str, enc_len: int, dec_len: int, bos: bool = False, window: int = 0) -> int:
    """Tokens per window: `window` when given, else the objective's longest. PrefixLM's, split in its middle, is
    twice the shorter side: it fills one row exactly at equal lengths (the inputs gain the tokenizer's leading BOS
    when `bos`, the targets an EOS), and the longer side's surplus stays padding otherwise. UL2's is half a row, so
    that a corrupted example fits its row, but it is alone there: at 64 + 64 and 512 + 512 tokens, 46-48% of a UL2
    row's slots are padding (the corrupted inputs fill most of the encoder side, or the long targets most of the
    decoder's). Quarter-row windows fill 77% / 71% of them, first fit (bench/ul2_packing.py), but at 64 + 64
    they recovered far worse (docs/adaptation.md)."""
    longest = min(2 * (enc_len - bos), 2 * (dec_len - 1)) if objective == "prefixlm" else (enc_len + dec_len) // 2
    if window > longest:
        raise EncdecError(f"--window {window}: at most {longest} tokens for --objective {objective} at --enc-len "
                          f"{enc_len} and --dec-len {dec_len} (a window's example must fit one row)")
    if longest < 2:  # an example splits its window in two (PrefixLM's prefix and target, UL2's kept and noise)
        raise EncdecError(f"--enc-len {enc_len} and --dec-len {dec_len} leave {max(longest, 0)} token(s) per window "
                          f"for --objective {objective}{' after the leading BOS' if bos else ''}; a window needs at "
                          "least 2: raise them")
    if objective != "prefixlm" and dec_len < 3:
        raise EncdecError(f"--dec-len {dec_len}: UL2's targets hold at least a sentinel, a token of noise and EOS; "
                          "give 3 or more")
    return window or longest


def _truncate(example: Example, enc_len: int, dec_len: int) -> Example:
    if len(example.inputs) <= enc_len and len(example.targets) <= dec_len:
        return example
    return Example(example.inputs[:enc_len], example.targets[:dec_len])


class ExampleStream:
    """Endless examples over shuffled items (a new order every epoch), grouped into packed rows.

    Items are token windows for pretraining (`make` applies the objective) or ready examples for
    instruction tuning (`make` returns them as they are)."""

    def __init__(self, items: Sequence[Any], make: ItemToExample, *, seed: int, enc_len: int, dec_len: int) -> None:
        self.items, self.make, self.seed = items, make, seed
        self.enc_len, self.dec_len = enc_len, dec_len
        self.epoch, self.cursor = 0, 0
        self.rng = np.random.default_rng([seed, 1])
        self.pending: Example | None = None
        self._orders: tuple[int, np.ndarray] | None = None  # (epoch, its order)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """What tells these items apart from other data (a digest of their tokens, taken once): a resumed run's
        place in the stream means something only over the same items."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=8)
            if isinstance(self.items, np.ndarray):  # pretraining's windows: one array
                digest.update(str(self.items.shape).encode())
                digest.update(np.ascontiguousarray(self.items))  # read in place: .tobytes() copied gigabytes
            else:  # instruction tuning's examples (a few thousand)
                for item in self.items:
                    digest.update(repr(item).encode() + b";")
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _order(self) -> np.ndarray:
        """The epoch's order of the items, drawn once per epoch (drawn for every example, it cost 0.7 s an example
        over 8M windows)."""
        if self._orders is None or self._orders[0] != self.epoch:
            self._orders = (self.epoch, np.random.default_rng([self.seed, 0, self.epoch]).permutation(len(self.items)))
        return self._orders[1]

    def _next_example(self) -> Example:
        if self.pending is not None:
            example, self.pending = self.pending, None
            return example
        if self.cursor == len(self.items):
            self.epoch, self.cursor = self.epoch + 1, 0
        item = self.items[self._order()[self.cursor]]
        self.cursor += 1
        return _truncate(self.make(item, self.rng), self.enc_len, self.dec_len)

    def next_examples(self, rows: int) -> list[Example]:
        """Examples that fill exactly `rows` packed rows, row by row in the order `pack` lays them out.

        Each example goes to the first of the rows with room for both its inputs and its targets (first fit), to
        a new row when none has one; the example that would need one row more waits for the next call. Given
        them row by row, `pack`'s greedy rule builds the same rows: the example that opened a row did not fit
        the row before it, which has only filled since. Examples shorter than half a row (UL2 from a short
        `--window`) then share rows that taking them in turn would leave part empty."""
        placed: list[list[Example]] = []
        room: list[tuple[int, int]] = []  # each row's free encoder and decoder slots
        while True:
            example = self._next_example()
            enc, dec = len(example.inputs), len(example.targets)
            row = next((r for r, (e, d) in enumerate(room) if enc <= e and dec <= d), None)
            if row is None:
                if len(placed) == rows:
                    self.pending = example
                    return [e for examples in placed for e in examples]
                placed.append([])
                room.append((self.enc_len, self.dec_len))
                row = len(placed) - 1
            placed[row].append(example)
            room[row] = (room[row][0] - enc, room[row][1] - dec)

    def state_dict(self) -> dict[str, Any]:
        pending = None if self.pending is None else [self.pending.inputs, self.pending.targets]
        return {"epoch": self.epoch, "cursor": self.cursor, "rng": self.rng.bit_generator.state, "pending": pending,
                "items": len(self.items), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any], vocab_size: int | None = None) -> None:
        """The stream's place, as `state_dict` wrote it; EncdecError for one this stream could not have written
        (a negative cursor re-read items silently; a pending example longer than a row escaped its cut; one of ids
        past the model's `vocab_size` rows failed the embedding's lookup mid-training)."""
        try:
            epoch, cursor, pending, rng = state["epoch"], state["cursor"], state["pending"], state["rng"]
        except (KeyError, TypeError) as e:
            raise EncdecError(f"the data stream's saved place lacks {e}") from None
        if state.get("fingerprint", self.fingerprint()) != self.fingerprint():  # (checkpoints before it: unchecked)
            raise EncdecError(f"the training data differs from the run's ({state.get('items')} training items then, "
                              f"{len(self.items)} now, other tokens): its place in them would mean other examples and "
                              "another held-out set; resume with the run's data, or start afresh with --overwrite")

        def count(value: object, high: float) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high

        top = float("inf") if vocab_size is None else vocab_size - 1

        def ids(value: object, most: int) -> bool:
            return isinstance(value, list) and 1 <= len(value) <= most and all(count(t, top) for t in value)

        if not count(epoch, float("inf")) or not count(cursor, len(self.items)):
            raise EncdecError(f"the data stream's saved place (epoch {epoch!r}, cursor {cursor!r}) is not one of a "
                              f"stream of {len(self.items)} items")
        if pending is not None and not (isinstance(pending, list) and len(pending) == 2
                                        and ids(pending[0], self.enc_len) and ids(pending[1], self.dec_len)):
            raise EncdecError(f"the data stream's saved pending example is not one that fits a row of {self.enc_len} + "
                              f"{self.dec_len} tokens of the model's vocabulary")
        restored = copy.deepcopy(self.rng)  # set on a copy: a state it refuses leaves the stream as it was
        try:
            restored.bit_generator.state = rng
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise EncdecError(f"the data stream's saved random state is not one of its generator "
                              f"({type(e).__name__}: {e})") from None
        self.epoch, self.cursor, self.rng = epoch, cursor, restored
        self.pending = None if pending is None else Example(*pending)


def teacher_rows(rows: PackedRows) -> TeacherRows:
    """The teacher's packed rows for the same examples, read back from the student's rows."""
    n, enc_len = rows.input_ids.shape
    dec_len = rows.labels.shape[1]
    length = enc_len + dec_len
    ids = torch.zeros(n, length, dtype=torch.long)
    segs, pos = torch.zeros_like(ids), torch.zeros_like(ids)
    targets = torch.full((n, dec_len), -1, dtype=torch.long)
    for r in range(n):
        start = 0
        for k in rows.segment_ids[r].unique().tolist():
            if k == 0:
                continue
            inputs = rows.input_ids[r][rows.segment_ids[r] == k]
            slots = (rows.decoder_segment_ids[r] == k).nonzero().flatten()
            labels = rows.labels[r][slots]
            seq = torch.cat([inputs, labels[:-1]])
            ids[r, start : start + len(seq)], segs[r, start : start + len(seq)] = seq, k
            pos[r, start : start + len(seq)] = torch.arange(len(seq))
            # label t of the segment is predicted where the teacher has read inputs + labels[:t]
            targets[r, slots] = start + len(inputs) - 1 + torch.arange(len(slots))
            start += len(seq)
    return TeacherRows(ids, segs, pos, targets)


def example_ends(rows: PackedRows) -> torch.Tensor:
    """[R, dec_len]: True at each example's last target (for pretraining, the EOS appended where its window was cut),
    found from the examples' segments: a target inside an example may be unscored (-100, outside a trimmed
    vocabulary), which does not end it."""
    segments = rows.decoder_segment_ids
    last = torch.ones_like(segments, dtype=torch.bool)
    last[:, :-1] = segments[:, 1:] != segments[:, :-1]
    return last & (segments != 0) & (rows.labels != -100)


def make_batch(examples: list[Example], *, enc_len: int, dec_len: int, pad_id: int, bos_id: int,
               with_teacher: bool) -> Batch:
    rows = pack(examples, enc_len=enc_len, dec_len=dec_len, pad_id=pad_id, bos_id=bos_id)
    return Batch(rows, teacher_rows(rows) if with_teacher else None)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as ids and attention mask [B, L]: padded on the right, or on the left."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def _cut(items: list[int], sizes: list[int]) -> list[list[int]]:
    """`items` cut into consecutive batches of `sizes`."""
    ends = list(itertools.accumulate(sizes))
    return [items[end - size: end] for size, end in zip(sizes, ends)]


def length_grouped(order: Sequence[int], lengths: Sequence[int], batch_size: int, rng: random.Random,
                   pool: int = 50) -> list[list[int]]:
    """`order` (positions, already shuffled) cut into batches of alike lengths, in a random order: each run of
    `pool` batches' positions is sorted by length (longest first) and cut into batches, then all batches are
    shuffled. Every
    batch still draws from a random pool, with little padding: on BoolQ cut to 192 tokens, batches of 8 in
    random order hold 47% more slots than tokens, grouped ones 1% (the pad-free batching of transformers'
    `group_by_length`)."""
    span = batch_size * pool
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start: start + span], key=lambda i: -lengths[i])
        sizes, short = [batch_size] * (len(chunk) // batch_size), len(chunk) % batch_size
        if short:  # the short batch where it costs the fewest slots (each batch padded to its first, longest row);
            # at the end it left the longest rows a full batch: 7 slots for 2, 1, 1 + 1 where 1, 1, 1 + 2 take 5
            cuts = [_cut(chunk, [*sizes[:at], short, *sizes[at:]]) for at in range(len(sizes), -1, -1)]
            sizes = [len(b) for b in min(cuts, key=lambda cut: sum(lengths[b[0]] * len(b) for b in cut))]
        batches += _cut(chunk, sizes)
    rng.shuffle(batches)
    return batches
