"""The decoding engine: a batch of slots that rows join (after one shared encoder pass) and leave at any step.

Why it is fast: the self-attention buffers are allocated once and only grow (by doubling) when a row goes past
the positions allocated; the encoder's are as wide as the longest prompt of the rows that join and those running,
and narrowed when the rows that needed them leave (a step reads them whole). Each slot holds the self-attention
keys/values of its decoded tokens and the encoder keys/values of its prompt, written once when the row joins; a
step attends over [self keys | encoder keys] as two products and one joint softmax, so nothing is concatenated per
step. RoPE tables are built once for all positions and indexed by each row's position; each step's
causal / sliding mask is built from the rows' positions ([rows, positions], not a table of every
query position against every key, which grew with the square of the token budget). The self caches
are allocated for up to PREALLOCATED_POSITIONS positions when rows join, and double when a row
goes past them, so a large budget costs memory only as tokens are actually generated; caches grown past
that (a long answer, a long prompt) are let go when the batch empties. Live rows sit
in the first slots: a row that ends is replaced by the last live row, so every step computes only
live rows, and the LM head runs once per row (for greedy rows on CPU, through a low-precision screen
that keeps the float32 argmax).

`encdec.generate.generate` is "every row joins at step 0"; the server (`encdec.serve`) lets rows
join whenever requests arrive. A row's tokens never depend on its neighbours (each has its own
position, masks, sampling settings and random stream), except with int8 weights (`encdec.inference.quantize`)
and at near-ties: the products' rounding depends on how many rows they compute and how prompts are packed (in
float32 a logit moves by about 1e-6; bfloat16 rounds 2^16 times coarser), which can flip a choice between two
tokens that close, as in any batched engine.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx.experimental._config as fx_config

from encdec.inference.onednn import ScreenedHead
from encdec.inference.sampling import NonFiniteScores, Sampling, pick_tokens
from encdec.model import Attention, Segments, embed_tokens, rope_tables

if TYPE_CHECKING:
    from encdec.model import DecoderBlock, EncoderDecoder

KeysValues = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys, values [n, kv_heads, L, d], bias [n, 1, 1, L]


@dataclass(eq=False)
class Row:
    """One sequence being generated: its budget, its stop tokens, its sampling, and what it produced."""

    max_new_tokens: int
    eos_token_ids: frozenset[int]
    sampling: Sampling = field(default_factory=Sampling)
    tokens: list[int] = field(default_factory=list)
    # "stop" (an EOS token), "length", "cancelled", "error" (a failed step) or "shutdown" (a drain's time ran out)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    logprobs: int | None = None  # report each token's log-probability and this many likeliest alternatives
    # tokens the decoder reads after its start, before the ones it generates (a UL2-pretrained model's sentinel,
    # `encdec.objectives.Framing`): fed one a step in place of the step's choice, neither emitted nor counted
    decoder_prefix: tuple[int, ...] = ()
    prefix_read: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:  # a step emits a token before it compares the count with the budget
            raise ValueError(f"a row generates at least one token, got max_new_tokens={self.max_new_tokens}")

    @property
    def decoded(self) -> int:
        """The decoder positions after its start that this row has filled."""
        return self.prefix_read + len(self.tokens)


@dataclass(frozen=True)
class Emitted:
    """A token a step produced for a row; `row.finish_reason` is set when it was the row's last. For a row
    that asked for log-probabilities: the token's, and the likeliest tokens' (best first), under the model's
    own distribution (the float32 log-softmax of its logits, before penalties, biases, temperature, top-k, top-p)."""

    row: Row
    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


LOGPROB_FLOOR = -9999.0
PREALLOCATED_POSITIONS = 1024  # self-attention positions allocated when rows join; beyond, buffers double
MAX_PACK_WIDTH = 2048  # packed encoder rows grow up to this many tokens (their masks cost width^2 each)
# and no wider than keeps a pass's masks (rows x width^2 = its tokens x width) to about this many entries: 256
# prompts of 30-300 tokens packed 2,000 wide held 10x the masks of rows of their own (a GiB and more of them)
MAX_MASK_ENTRIES = 16 * 2**20
PACK_WIDTH_STEP = 32


def compiled_step(step: Callable[..., torch.Tensor], **options: object) -> Callable[..., torch.Tensor]:
    """`step` (`Engine.hidden`) compiled with dynamic sizes, each its own (`options`: torch.compile's others): by
    default dynamo takes sizes that are equal when it compiles (a cache's length and the batch's slots, say) for
    one, and compiled again when they no longer were."""
    compiled = torch.compile(step, dynamic=True, **options)

    def call(*args: object) -> torch.Tensor:
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args)

    return call


def _capacity(needed: int, current: int) -> int:
    return current if needed <= current else max(needed, 2 * current)


class Engine:
    """Slots of decoding state for up to `max_batch` rows of one model (see the module docstring)."""

    def __init__(self, model: EncoderDecoder, max_batch: int, compile_step: bool = False) -> None:
        self.model, self.max_batch = model, max_batch
        if compile_step:  # the step's tensor work as compiled programs (dynamic sizes: a few compilations, one row
            # and several, serve every batch and length); on a GPU it removes most kernel launches (docs/benchmarks.md)
            self.hidden = compiled_step(self.hidden)  # type: ignore[method-assign]
        cfg = model.config.decoder
        self.cfg = cfg
        self.layers: list[DecoderBlock] = list(model.decoder.layers)
        self.device, self.dtype = model.device, model.embed.weight.dtype
        self.rows: list[Row] = []
        self.failed: list[Row] = []  # the rows the last step ended with an error (scores not finite to draw from)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.last = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.encoder_lengths = [0] * max_batch  # each slot's prompt's
        self.prompts: list[tuple[int, ...]] = [()] * max_batch  # each slot's prompt (a later copy reads its keys)
        self.self_len, self.enc_len = 0, 0
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.enc_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.enc_bias = torch.empty(max_batch, 0, dtype=self.dtype, device=self.device)
        self.key_positions = torch.empty(0, dtype=torch.long, device=self.device)
        self.rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    # -- buffers -----------------------------------------------------------------------------------

    def _kv_buffers(self, old: list[tuple[torch.Tensor, torch.Tensor]], length: int, used: int):
        """Per-layer key/value buffers of `length` positions, keeping the first `used` of the old ones."""
        heads, dim = self.cfg.num_kv_heads, self.cfg.head_dim
        new = []
        for i in range(len(self.layers)):
            k = torch.zeros(self.max_batch, heads, length, dim, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            if old:
                k[:, :, :used], v[:, :, :used] = old[i][0][:, :, :used], old[i][1][:, :, :used]
            new.append((k, v))
        return new

    def _grow_self(self, needed: int) -> None:
        """Room for `needed` decoder positions: caches and RoPE tables. Always one more than needed, so that a step's
        slices of them never take the whole (a compiled step specialises that case apart, and compiled again while
        requests waited)."""
        length = _capacity(needed + 1, self.self_len)
        if length == self.self_len:
            return
        self.self_kv = self._kv_buffers(self.self_kv, length, self.self_len)
        self.key_positions = torch.arange(length, device=self.device)
        tables = rope_tables(self.cfg, self.key_positions[None], self.dtype)
        self.rope = {kind: (cos[0, 0], sin[0, 0]) for kind, (cos, sin) in tables.items()}  # [L, head_dim]
        self.self_len = length

    def _self_bias(self, pos: torch.Tensor, seen: int) -> dict[str, torch.Tensor]:
        """The additive masks [n, 1, 1, seen] of rows at decoder positions `pos` over the first `seen` keys:
        causal ("full"), and causal within the window ("sliding")."""
        distance = pos[:, None] - self.key_positions[:seen]  # query position - key position
        allowed = {"full": distance >= 0}
        if "sliding" in self.cfg.layer_types:
            allowed["sliding"] = allowed["full"] & (distance < self.cfg.sliding_window)
        low = torch.finfo(self.dtype).min
        return {kind: torch.zeros(ok.shape, dtype=self.dtype, device=self.device).masked_fill_(~ok, low)[:, None, None]
                for kind, ok in allowed.items()}

    def _encoder_width(self, width: int) -> None:
        """Encoder key/value buffers `width` positions wide (at least 2: a width of 1 is a size a compiled step
        specialises), keeping what the slots hold; a step reads them whole (see `hidden`)."""
        width = max(width, 2)
        if width == self.enc_len:
            return
        kept = min(width, self.enc_len)
        kv = self._kv_buffers(self.enc_kv, width, kept)
        bias = torch.full((self.max_batch, width), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        bias[:, :kept] = self.enc_bias[:, :kept]
        # replaced together: buffers of two widths (one allocation failing, out of memory) failed every later step
        self.enc_kv, self.enc_bias, self.enc_len = kv, bias, width

    # -- rows joining and leaving ------------------------------------------------------------------

    @torch.no_grad()
    def join(self, prompts: Sequence[Sequence[int] | torch.Tensor], rows: list[Row]) -> int:
        """Encode `prompts` (token ids, one per row) in one pass and give each its slot; they decode from the next
        step. Returns the prompt tokens encoded: a prompt given several times is encoded once, and one that a live
        row decodes from (a request's later choices, joining as slots free) not again: its keys and values are copied.

        The prompts are packed (several to a row, as training packs examples) into rows as wide as fills
        them best, so a burst of mixed-length requests costs the encoder their tokens, not the padding."""
        if len(rows) > self.free:
            raise ValueError(f"{len(rows)} rows cannot join: {self.free} free slots")
        if len(prompts) != len(rows):
            raise ValueError(f"one prompt per row: {len(prompts)} prompt(s) for {len(rows)} row(s)")
        live = {id(row) for row in self.rows}
        if len({id(row) for row in rows}) < len(rows) or any(
                id(row) in live or row.tokens or row.prefix_read or row.finish_reason is not None for row in rows):
            # (`[Row(...)] * n` interleaved the prompts' tokens in one row, then failed; a finished one went on)
            raise ValueError("a Row generates once: make one for each prompt, and a new one to generate again")
        prompts = [torch.as_tensor(p, dtype=torch.long).to(self.device) for p in prompts]
        lengths = [len(p) for p in prompts]
        keys = [tuple(p.tolist()) for p in prompts]
        live = {self.prompts[slot]: slot for slot in range(len(self.rows))}
        fresh = [i for i, key in enumerate(keys) if key not in live]
        hidden, placed = self._encode([prompts[i] for i in fresh], [keys[i] for i in fresh]) if fresh else (None, [])
        placed = [(fresh[j], b, offset) for j, b, offset in placed]
        self._encoder_width(max(lengths + self.encoder_lengths[: len(self.rows)]))
        self._grow_self(min(max(len(r.decoder_prefix) + r.max_new_tokens for r in rows), PREALLOCATED_POSITIONS))
        first = len(self.rows)
        joining = slice(first, first + len(rows))
        for k, v in self.self_kv + self.enc_kv:  # what the slots' last rows left is read masked, and weighs 0, but
            k[joining], v[joining] = 0.0, 0.0  # 0 x inf is NaN: one row that overflowed would poison its slot for good
        for block, (k, v) in zip(self.layers, self.enc_kv):
            if hidden is not None:
                ek, ev = block.encoder_keys_values(hidden)
                for i, b, offset in placed:
                    k[first + i, :, : lengths[i]] = ek[b, :, offset : offset + lengths[i]]
                    v[first + i, :, : lengths[i]] = ev[b, :, offset : offset + lengths[i]]
            for i, key in enumerate(keys):
                if key in live:
                    k[first + i, :, : lengths[i]] = k[live[key], :, : lengths[i]]
                    v[first + i, :, : lengths[i]] = v[live[key], :, : lengths[i]]
        self.enc_bias[joining] = torch.finfo(self.dtype).min
        for i, (row, length) in enumerate(zip(rows, lengths)):
            self.enc_bias[first + i, :length] = 0.0
            self.encoder_lengths[first + i] = length
            self.prompts[first + i] = keys[i]
            self.positions[first + i] = 0
            self.last[first + i] = self.model.config.bos_token_id
            row.generator = row.sampling.generator(self.device)
        self.rows.extend(rows)
        return sum({(b, offset): lengths[i] for i, b, offset in placed}.values())  # each place in the pass once

    def _encode(self, prompts: list[torch.Tensor], keys: list[tuple[int, ...]] | None = None
                ) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """The encoder's final states of `prompts` packed into rows (`packing_width`), and where each prompt
        sits: (prompt, packed row, offset). A prompt given several times (a request for n choices) is
        encoded once."""
        if any(len(p) == 0 for p in prompts):  # its cross-attention would read nothing (or what the slot held
            # before), its pooled state would be the mean of nothing
            raise ValueError("every prompt needs at least one token")
        keys = keys if keys is not None else [tuple(p.tolist()) for p in prompts]  # (join's, made already)
        unique = {key: i for i, key in reversed(list(enumerate(keys)))}  # each prompt's first index
        order = sorted(unique.values())
        lengths = [len(prompts[i]) for i in order]
        width = packing_width(lengths)
        bins = pack(lengths, width)
        ids = torch.zeros(len(bins), width, dtype=torch.long, device=self.device)
        segments, positions = torch.zeros_like(ids), torch.zeros_like(ids)
        where = {}  # first index of a prompt -> (packed row, offset)
        for b, members in enumerate(bins):
            offset = 0
            for segment, j in enumerate(members, start=1):
                span = slice(offset, offset + lengths[j])
                ids[b, span], segments[b, span] = prompts[order[j]], segment
                positions[b, span] = torch.arange(lengths[j], device=self.device)
                where[order[j]] = (b, offset)
                offset += lengths[j]
        placed = [(i, *where[unique[key]]) for i, key in enumerate(keys)]
        return self.model.encode_segments(ids, Segments(segments, positions)), placed

    @torch.no_grad()
    def embed(self, prompts: list[list[int]], pooling: str) -> torch.Tensor:
        """[len(prompts), d] float32 on the CPU (where the server writes them out): each prompt's encoder states
        pooled ("mean" of its tokens, or its "last" token's) and scaled to unit length, in one packed encoder pass;
        the decoding slots are untouched."""
        hidden, placed = self._encode([torch.tensor(p, device=self.device) for p in prompts])
        out = torch.empty(len(prompts), hidden.shape[-1], dtype=torch.float32, device=self.device)
        for i, b, offset in placed:
            states = hidden[b, offset : offset + len(prompts[i])].float()
            out[i] = states.mean(0) if pooling == "mean" else states[-1]
        return torch.nn.functional.normalize(out, dim=-1).cpu()

    def cancel(self, row: Row, reason: str = "cancelled") -> None:
        """Take a row out of the batch now (a client went away, or a stop string ended it: `reason` "stop")."""
        if row in self.rows:
            row.finish_reason = row.finish_reason or reason
            self._remove(self.rows.index(row))

    def _remove(self, slot: int) -> None:
        """Free `slot` by moving the last live row into it."""
        last = len(self.rows) - 1
        if slot != last:
            for (k, v) in self.self_kv + self.enc_kv:
                k[slot], v[slot] = k[last], v[last]
            for buffer in (self.enc_bias, self.positions, self.last):
                buffer[slot] = buffer[last]
            self.encoder_lengths[slot], self.prompts[slot] = self.encoder_lengths[last], self.prompts[last]
            self.rows[slot] = self.rows[last]
        self.prompts[last] = ()
        self.rows.pop()
        if not self.rows:  # a long answer or prompt gone, the server idle: not held for the life of the process
            if self.self_len > PREALLOCATED_POSITIONS + 1:  # (GBs: 16 slots of 8k positions of the 270M, 4.8 GB)
                self.self_kv, self.self_len = [], 0  # the next rows to join allocate what they need
            if self.enc_len > PREALLOCATED_POSITIONS:
                self._encoder_width(2)

    # -- one decoding step -------------------------------------------------------------------------

    def warm_up(self) -> None:
        """A few steps of one row, then of two (of throwaway tokens): a compiled step builds its programs here,
        not while the first requests wait (one row, and a row's first position, are sizes it specialises)."""
        for n in sorted({1, min(2, self.max_batch)}):
            self.join([[0, 0]] * n, [Row(3, frozenset()) for _ in range(n)])
            while self.rows:
                self.step()

    @torch.no_grad()
    def step(self) -> list[Emitted]:
        """One token for every live row; rows that end (EOS or budget) leave the batch before this returns."""
        n = len(self.rows)
        if n == 0:
            return []
        seen = max(r.decoded for r in self.rows) + 1  # decoder positions any row has, this one included
        longest = max(self.encoder_lengths[:n])
        if 2 * longest <= self.enc_len:  # the rows that needed the width have left
            self._encoder_width(longest)
        self._grow_self(seen)
        hidden = self.hidden(n, seen)
        forced = {slot: r.decoder_prefix[r.prefix_read] for slot, r in enumerate(self.rows)
                  if r.prefix_read < len(r.decoder_prefix)}
        chosen, logits, broken = self._choose(hidden, forced.keys())
        if forced:
            chosen = chosen.index_put((torch.tensor(list(forced), device=self.device),),
                                      torch.tensor(list(forced.values()), device=self.device))
        scores = self._logprobs(hidden, chosen, logits, set(forced))
        self.positions[:n] += 1
        self.last[:n] = chosen
        chosen = chosen.tolist()  # the step's one wait on the device for its tokens (scores aside)
        emitted, ended, self.failed = [], [], [self.rows[slot] for slot in broken]
        for slot, (row, token) in enumerate(zip(self.rows, chosen)):
            if slot in broken:  # nothing drawn: it leaves the batch, its caller told by `failed`
                row.finish_reason = "error"
                ended.append(slot)
                continue
            if slot in forced:
                row.prefix_read += 1
                continue
            row.tokens.append(token)
            if token in row.eos_token_ids:
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.max_new_tokens:
                row.finish_reason = "length"
            if row.finish_reason is not None:
                ended.append(slot)
            emitted.append(Emitted(row, token, *scores[slot]) if slot in scores else Emitted(row, token))
        for slot in reversed(ended):
            self._remove(slot)
        return emitted

    def _choose(self, hidden: torch.Tensor, forced: Collection[int]
                ) -> tuple[torch.Tensor, torch.Tensor | None, set[int]]:
        """Each live row's next token: a batch of plain greedy rows (no penalties or biases) through the head's
        low-precision screen where it has one (`encdec.inference.onednn.ScreenedHead`), otherwise from every float32
        logit (returned too); `forced` rows (reading a decoder prefix) are not sampled. Last, the rows whose
        logits were not finite: they chose nothing (one such row failed the whole batch)."""
        settings = [r.sampling for r in self.rows]
        head = self.model.lm_head
        if isinstance(head, ScreenedHead) and not any(s.do_sample or s.adjusts for s in settings):
            chosen, broken = head.greedy(hidden.float(), self.model.config.final_logit_softcap)
            return chosen, None, set(broken) - set(forced)
        logits = self.model.logits(hidden).float()
        state = [r.generator for r in self.rows], [r.tokens for r in self.rows]
        try:
            return pick_tokens(logits, settings, *state, forced), logits, set()
        except NonFiniteScores as e:  # raised before any row drew
            broken = set(e.rows)
            return pick_tokens(logits, settings, *state, {*forced, *broken}), logits, broken

    def _logprobs(self, hidden: torch.Tensor, chosen: torch.Tensor, logits: torch.Tensor | None,
                  forced: set[int]) -> dict[int, tuple[float, tuple[tuple[int, float], ...]]]:
        """slot -> (the chosen token's log-probability, the likeliest tokens') for the rows that asked and chose
        (not those reading a `forced` prefix token); the head's full float32 logits are computed for those rows only
        (a greedy batch skipped them)."""
        slots = [i for i, row in enumerate(self.rows) if row.logprobs is not None and i not in forced]
        if not slots:
            return {}
        index = torch.tensor(slots, device=self.device)
        full = self.model.logits(hidden[index]).float() if logits is None else logits[index]
        # JSON has no NaN or infinity: scores that overflowed read as the floor OpenAI-style servers use
        logprobs = torch.log_softmax(full, dim=-1).nan_to_num_(nan=LOGPROB_FLOOR, posinf=0.0, neginf=LOGPROB_FLOOR)
        picked = logprobs.gather(1, chosen[index, None])[:, 0].tolist()
        width = min(max(self.rows[i].logprobs for i in slots), logprobs.shape[-1])  # no more than the vocabulary
        best = logprobs.topk(width, dim=-1) if width else None
        indices, values = (best.indices.tolist(), best.values.tolist()) if best is not None else ([], [])  # one copy
        out = {}
        for j, slot in enumerate(slots):
            k = self.rows[slot].logprobs
            out[slot] = (picked[j], tuple(zip(indices[j][:k], values[j][:k])) if best is not None else ())
        return out

    def hidden(self, n: int, seen: int) -> torch.Tensor:
        """The decoder's tensor work of a step: the final states [n, d] of the first n slots (the LM head
        reads them), given the decoder positions the longest of them has (`seen`); the caches get this step's keys
        and values. The encoder's keys are read whole (as wide as the longest prompt of the rows, or up to twice that
        once it has left; each row's padding masked): bfloat16 products copied a part of them first, 24 of a 88 ms
        step at 16 rows. Kept apart from the rows' bookkeeping so that it can be compiled (bench/compile_step.py)."""
        pos = self.positions[:n]
        rope = {kind: (cos[pos][:, None, None], sin[pos][:, None, None]) for kind, (cos, sin) in self.rope.items()}
        self_bias = self._self_bias(pos, seen)
        enc_bias = self.enc_bias[:n, None, None]
        rows = torch.arange(n, device=self.device)
        x = embed_tokens(self.model.embed, self.last[:n, None], self.cfg.embed_scale)
        for block, kind, (sk, sv), (ek, ev) in zip(self.layers, self.cfg.layer_types, self.self_kv, self.enc_kv):
            h = block.attn_norm(x)
            q = block.attn.queries(h, rope[kind])
            k, v = block.attn.keys_values(h, rope[kind])
            sk[rows, :, pos], sv[rows, :, pos] = k[:, :, 0], v[:, :, 0]
            own = (sk[:n, :, :seen], sv[:n, :, :seen], self_bias[kind])
            encoded = (ek[:n], ev[:n], enc_bias)
            if block.merged:
                x = block.feed_forward(x + block.post_attn_norm(attend(block.attn, q, [own, encoded])))
                continue
            x = x + block.post_attn_norm(attend(block.attn, q, [own]))
            cq = block.cross_attn.queries(block.cross_norm(x), None)
            x = block.feed_forward(x + block.post_cross_norm(attend(block.cross_attn, cq, [encoded])))
        return self.model.decoder.norm(x[:, 0])


def packing_width(lengths: list[int]) -> int:
    """The width of the packed rows that leaves the fewest padding slots: the longest prompt's, or wider (in
    steps of PACK_WIDTH_STEP, up to MAX_PACK_WIDTH and MAX_MASK_ENTRIES) where that fills the rows better; on a
    tie the narrower. Rows of the longest prompt left 11-20% of the encoder's work to padding for bursts of 16
    prompts of 64-512 tokens; the best of these widths 1-2.4% (a millisecond of packing)."""
    longest, total = max(max(lengths), 1), sum(lengths)
    widest = max(longest, min(MAX_PACK_WIDTH, total, MAX_MASK_ENTRIES // max(total, 1)))
    widths = [*range(longest, widest, PACK_WIDTH_STEP), widest]
    return min(widths, key=lambda w: len(pack(lengths, w)) * w)


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """Prompt indices per packed row of at most `width` tokens (first fit, longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fits is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[fits].append(i)
            room[fits] -= lengths[i]
    return rows


def attend(attn: Attention, q: torch.Tensor, sources: list[KeysValues]) -> torch.Tensor:
    """Attention of one query per row [n, heads, 1, d] over several key/value sources with one joint
    softmax (the same numbers as attending over their concatenation), projected back to the model width.

    The query heads sharing a key/value head are stacked into one product with it, as in the model."""
    n, heads, _, dim = q.shape
    kv_heads = sources[0][0].shape[1]
    grouped = q.reshape(n, kv_heads, heads // kv_heads, dim)
    scores = []
    for k, _, bias in sources:
        raw = grouped @ k.transpose(-1, -2)
        if attn.softcap is None:
            capped = raw * attn.scale
        else:
            capped = torch.tanh(raw * (attn.scale / attn.softcap)) * attn.softcap
        scores.append(capped + bias)
    probs = torch.softmax(torch.cat(scores, -1) if len(scores) > 1 else scores[0], dim=-1, dtype=torch.float32)
    probs = probs.to(q.dtype)
    out, start = None, 0
    for k, v, _ in sources:
        part = probs[..., start : start + k.shape[2]] @ v
        out = part if out is None else out + part
        start += k.shape[2]
    return attn.o_proj(out.reshape(n, 1, heads * dim))
