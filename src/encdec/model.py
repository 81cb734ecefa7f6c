"""The encoder-decoder model: two decoder-only layer stacks, a bidirectional encoder and a causal decoder.

One model for every family: Gemma, Llama, Mistral and Qwen blocks differ only in the switches of
`StackConfig` (norms after the sub-layers, RMSNorm offset, activation, q/k/v biases, QK-norm, RoPE
variant, embedding scale), read where the modules are built.

The decoder reads the encoder either through a separate cross-attention sub-layer per block
("cross", T5Gemma) or through one merged attention whose keys are [decoder tokens | encoder tokens]
with shared projections ("merged", T5Gemma 2). Batches are either padded (attention_mask) or packed
(segment ids with per-segment positions); attention never crosses a segment boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from encdec.config import EncDecConfig, StackConfig
from encdec.errors import EncdecError

INPLACE_NORM_MIN = 2**16  # elements from which an inference norm runs in place (RMSNorm.forward)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; the scale is `offset + weight` (Gemma stores an offset from 1: offset 1.0).
    A new norm starts as the identity scale whichever the offset."""

    def __init__(self, dim: int, eps: float, offset: float = 1.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * scale in float32: PyTorch's rms_norm, those numbers in one call where
        # they were seven (a decoding step of the 270M runs 109 norms). Large CPU inputs without gradients: the
        # same numbers bit for bit (tested) in place on one float32 copy, which rms_norm's separate temporaries
        # made 1.4x slower on an encoder pass's activations (4,731 x 640 bfloat16: 6.1 -> 4.4 ms a norm; a
        # decoding step's 16 x 640: 60 -> 65 us, hence the threshold). Not where rms_norm may be one kernel (a
        # GPU), nor while dynamo traces (the threshold would guard the batch size: a compiled step built again)
        scale = self.offset + self.weight.float()
        if (torch.compiler.is_compiling() or torch.is_grad_enabled() or x.device.type != "cpu"
                or x.numel() < INPLACE_NORM_MIN):
            return F.rms_norm(x.float(), (x.shape[-1],), scale, self.eps).type_as(x)
        out = x.to(torch.float32, copy=True)
        factor = out.square().mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return out.mul_(factor).mul_(scale).type_as(x)


def norm(cfg: StackConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


def post_norm(cfg: StackConfig) -> nn.Module:
    """The norm after a sub-layer: Gemma has one, Llama and Qwen add the sub-layer's output as it is."""
    return norm(cfg) if cfg.post_norms else nn.Identity()


SMALL_ROWS = 64  # products with at most this many rows take `project`'s decoding path on CPU


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias). With a few rows on CPU (decoding) it is computed as weight @ x.T, one row
    doubled: there CPU BLAS's matrix-vector path (1 row) and its small-M products ran 1.5-2.6x slower
    than the weight-major product on the 270M's projections and LM head (docs/benchmarks.md)."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or not 0 < rows <= SMALL_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    out = torch.mm(weight, flat.T if rows > 1 else torch.cat([flat, flat]).T)[:, :rows].T.contiguous()
    if bias is not None:
        out = out + bias.to(out.dtype)  # under autocast the product is bf16, as F.linear's output would be
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear computed by `project` (the same weights, names and initialisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)


ACTIVATIONS = {"gelu_tanh": partial(F.gelu, approximate="tanh"), "silu": F.silu}


class MLP(nn.Module):
    """Gated feed-forward: activation(gate) * up, projected down."""

    def __init__(self, hidden: int, intermediate: int, activation: str = "gelu_tanh") -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


Rope = tuple[torch.Tensor, torch.Tensor]
# attention score entries per layer (batch x heads x queries x keys) up to which CPU attention runs as
# plain products: faster there than SDPA's kernel, and their probabilities (kept for the backward
# pass, 16 MB per layer at this size) stay small
PLAIN_SCORES_MAX = 2**22
# queries per chunk when CPU inference attends chunk by chunk over only the keys the chunk may see
QUERY_CHUNK = 64
# queries per block of soft-capped attention (plain products) over a whole long row in CPU inference
PRODUCT_QUERIES = 512
# SDPA's kernels, cuDNN's left out: on Hopper GPUs PyTorch prefers it, and it builds a plan for every new
# sequence length (forward and backward), so batches of varying length (classification, prompts) paid that at
# most steps (bench/gpu_check.py --only attention measures both)
GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


Span = tuple[slice, int, int, int, int]  # rows, first query, end query, first key, end key
# mask entries (rows x queries x keys) computed at a time: the position differences behind a mask are 8 bytes an
# entry, and built whole they were 8 GB beside it for one 32k-token prompt (a block: 32 MB)
MASK_BLOCK = 2**22


def bias_of(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `allowed`, else the dtype's minimum."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


class AttentionMask:
    """A boolean attention mask [B, 1, Lq, Lk] and what attention derives from it, computed once per
    stack and shared by every layer of a kind: the additive bias, and for long CPU inference, which
    keys each chunk of QUERY_CHUNK queries may see at all.

    Masked scores get the dtype's finite minimum rather than -inf, so a row with nothing to see
    (padding) stays finite instead of turning into NaN."""

    def __init__(self, allowed: torch.Tensor) -> None:
        self.allowed = allowed
        self._biases: dict[torch.dtype, torch.Tensor | None] = {}
        self._spans: list[Span] | None = None

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """0 where allowed, else the dtype's minimum, in the dtype of the scores (bf16 under autocast); None where
        everything is allowed (one unpadded prompt's global layers: 4 GB of zeros at 32k tokens)."""
        if dtype not in self._biases:
            self._biases[dtype] = None if bool(self.allowed.all()) else bias_of(self.allowed, dtype)
        return self._biases[dtype]

    def spans(self) -> list[Span]:
        """Query chunks and the keys they may see: per chunk of QUERY_CHUNK queries, the keys between the
        first and the last that one of its queries may see (every key for a chunk of padding), consecutive
        chunks with the same keys merged. For all rows at once when the rows' masks agree (one prompt per
        row, all of one length), else row by row (packed or padded rows). Padding queries, which see
        nothing, average the values of their chunk's span rather than of the whole row: nothing reads them."""
        if self._spans is None:
            queries, keys = self.allowed.shape[-2:]
            pad = -queries % QUERY_CHUNK
            seen = F.pad(self.allowed[:, 0], (0, 0, 0, pad)).view(len(self.allowed), -1, QUERY_CHUNK, keys).any(2)
            any_key = seen.any(2)  # [B, chunks]
            first = seen.int().argmax(2).masked_fill(~any_key, 0)
            end = torch.where(any_key, keys - seen.flip(2).int().argmax(2), keys)
            if bool((first == first[:1]).all() and (end == end[:1]).all()):
                rows: list[slice] = [slice(None)]
                first, end = first[:1], end[:1]
            else:
                rows = [slice(b, b + 1) for b in range(len(self.allowed))]
            self._spans = []
            for row, lows, highs in zip(rows, first.tolist(), end.tolist()):
                for c, (lo, hi) in enumerate(zip(lows, highs)):
                    stop = min((c + 1) * QUERY_CHUNK, queries)
                    last = self._spans[-1] if self._spans else None
                    if last is not None and last[0] == row and last[3:] == (lo, hi):
                        self._spans[-1] = (row, last[1], stop, lo, hi)
                    else:
                        self._spans.append((row, c * QUERY_CHUNK, stop, lo, hi))
        return self._spans


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low: float, high: float, original: float) -> torch.Tensor:
    """Llama 3's RoPE scaling: long wavelengths slowed by `factor`, short ones kept, those between blended."""
    wavelength = 2 * math.pi / inv_freq
    smooth = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_tables(cfg: StackConfig, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, Rope]:
    """cos/sin tables [B, 1, L, head_dim] for each layer type present in the stack."""
    params = {"sliding": (cfg.rope_theta_local, cfg.rope_scale_local), "full": (cfg.rope_theta_global, cfg.rope_scale_global)}
    tables = {}
    for kind in set(cfg.layer_types):
        theta, scale = params[kind]
        exponents = torch.arange(0, cfg.head_dim, 2, device=positions.device, dtype=torch.float) / cfg.head_dim
        inv_freq = 1.0 / (theta**exponents) / scale
        if cfg.rope_llama3 is not None:
            inv_freq = llama3_frequencies(inv_freq, *cfg.rope_llama3)
        freqs = positions[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        tables[kind] = (angles.cos().to(dtype), angles.sin().to(dtype))
    return tables


def sdpa_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype SDPA computes `q` in: autocast's where it is on, to which it would round a bias built in float32
    (whose finite minimum becomes -inf in bfloat16, and a row with nothing to see, 0 or NaN)."""
    kind = q.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else q.dtype


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Attention projections, used for self-, merged and cross-attention.

    Keys and values may come from another stream of a different width (`kv_width`): the encoder
    output in cross-attention. RoPE is applied only when a table is given (never to encoder keys
    read by the decoder).
    """

    def __init__(self, cfg: StackConfig, kv_width: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kv_width = kv_width or cfg.hidden_size
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(kv_width, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(kv_width, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = norm(cfg, cfg.head_dim)
            self.k_norm = norm(cfg, cfg.head_dim)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_softcap

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:2], n, self.head_dim).transpose(1, 2)

    def queries(self, x: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        q = self._heads(self.q_proj(x), self.num_heads)
        if self.qk_norm:
            q = self.q_norm(q)
        return q if rope is None else apply_rope(q, rope)

    def keys_values(self, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._heads(self.k_proj(x), self.num_kv_heads)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if self.qk_norm:
            k = self.k_norm(k)
        return (k if rope is None else apply_rope(k, rope)), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """Attention output projected back to the model width."""
        # soft-capping sits between the product and the softmax, which SDPA cannot express; on CPU,
        # plain products are also faster than SDPA's kernel for short sequences (docs/benchmarks.md)
        cpu = q.device.type == "cpu"
        small = cpu and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= PLAIN_SCORES_MAX
        if cpu and not torch.is_grad_enabled() and q.shape[2] > 4 * QUERY_CHUNK:
            out = self._attend_in_chunks(q, k, v, mask)
        elif self.softcap is not None or small:
            out = self._attend_by_products(q, k, v, mask.bias(q.dtype))
        else:
            with sdpa_kernel(GPU_ATTENTION):  # on CPU the same choice as without it (cuDNN is GPU-only)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bias(sdpa_dtype(q)), scale=self.scale,
                                                     enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(*q.shape[:1], q.shape[2], -1))

    def _attend_in_chunks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """SDPA (plain products where scores are soft-capped) chunk of queries by chunk, each over only the span
        of keys it may see: a local layer's window, or a packed prompt's own tokens, instead of the whole row
        (inference on CPU, where the kernel computes every masked score; 1.6x faster on 1024-token prompts,
        docs/benchmarks.md)."""
        spans = mask.spans()
        if len(spans) == 1 and self.softcap is None:  # every query of every row may see every key
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bias(sdpa_dtype(q)), scale=self.scale,
                                                  enable_gqa=True)
        if len(spans) == 1:  # soft-capped products over every key, a block of queries at a time: whole, a layer's
            # scores were [B, H, L, L] (2 GB at 8k tokens for 8 heads)
            spans = [(slice(None), s, min(s + PRODUCT_QUERIES, q.shape[2]), 0, k.shape[2])
                     for s in range(0, q.shape[2], PRODUCT_QUERIES)]
        out = torch.empty_like(q)
        for rows, start, end, lo, hi in spans:  # each span's bias of its own: the whole one was 4 GB at 32k tokens
            allowed, part = mask.allowed[rows, :, start:end, lo:hi], (q[rows, :, start:end], k[rows, :, lo:hi],
                                                                     v[rows, :, lo:hi])
            out[rows, :, start:end] = self._attend_by_products(*part, bias_of(allowed, q.dtype)) if self.softcap \
                else F.scaled_dot_product_attention(*part, attn_mask=bias_of(allowed, sdpa_dtype(q)), scale=self.scale,
                                                    enable_gqa=True)
        return out

    def _attend_by_products(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
        """Scores, softmax and weighted values as plain products. The query heads that share a key/value
        head are stacked into one product with it, so keys and values are never copied per head."""
        batch, heads, length, dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        raw = q.reshape(batch, kv_heads, heads // kv_heads * length, dim) @ k.transpose(-1, -2)
        if self.softcap is None:
            scores = raw * self.scale
        else:
            scores = torch.tanh(raw * (self.scale / self.softcap)) * self.softcap
        scores = scores.view(batch, heads, length, keys)
        probs = torch.softmax(scores if bias is None else scores + bias, dim=-1, dtype=torch.float32).to(q.dtype)
        return (probs.view(batch, kv_heads, -1, keys) @ v).view(batch, heads, length, dim)


@dataclass
class Segments:
    """Where each token of a row sits: segment id (0 = padding) and position within its segment."""

    ids: torch.Tensor  # [B, L] long
    positions: torch.Tensor  # [B, L] long

    @classmethod
    def of(
        cls, tokens: torch.Tensor, attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None,
        positions: torch.Tensor | None,
    ) -> Segments:
        if tokens.dim() != 2 or tokens.shape[1] == 0:  # a raw reshape error deep in attention otherwise
            raise EncdecError(f"token ids must be [batch, length] with at least one token, got shape "
                              f"{tuple(tokens.shape)}")
        for name, given in (("attention mask", attention_mask), ("segment ids", segment_ids), ("positions", positions)):
            if given is not None and given.shape != tokens.shape:
                raise EncdecError(f"the {name} must have the token ids' shape {tuple(tokens.shape)}, got "
                                  f"{tuple(given.shape)}")
        packed = segment_ids is not None
        if segment_ids is None:
            segment_ids = torch.ones_like(tokens) if attention_mask is None else attention_mask.long()
        if positions is None:
            # self-attention's RoPE is relative, but merged attention's decoder queries take it and meet encoder
            # keys that do not: their own positions count. Packed rows restart them at each segment, as training
            # does; a padded row keeps plain indices (left padding shifts them, as transformers' T5Gemma 2 does)
            index = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
            positions = index
            if packed:
                starts = torch.ones_like(segment_ids, dtype=torch.bool)
                starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
                positions = index - torch.where(starts, index, 0).cummax(dim=1).values
        return cls(segment_ids.long(), positions.long())


def _same_segment(q: Segments, k: Segments) -> torch.Tensor:
    """[B, Lq, Lk]: key k is a real token of query q's segment."""
    return (q.ids[:, :, None] == k.ids[:, None, :]) & (k.ids[:, None, :] != 0)


def attention_masks(
    q: Segments, k: Segments, *, causal: bool, window: int, convention: str = "t5gemma", lookahead: int | None = None
) -> dict[str, torch.Tensor]:
    """Boolean self-attention masks for "full" and "sliding" layers; keys must share the query's segment.
    `lookahead` limits a bidirectional mask to keys at most that many positions after the query
    (0 is exactly the causal mask; None no limit)."""
    batch, queries, keys = *q.ids.shape, k.ids.shape[1]
    full = torch.empty(batch, 1, queries, keys, dtype=torch.bool, device=q.ids.device)
    local = torch.empty_like(full)
    step = max(1, MASK_BLOCK // max(1, batch * keys))
    for start in range(0, queries, step):  # a block of queries at a time: the temporaries stay small for long inputs
        rows = slice(start, start + step)
        block = Segments(q.ids[:, rows], q.positions[:, rows])
        full[:, 0, rows], local[:, 0, rows] = _masks_of(block, k, causal, window, convention, lookahead)
    return {"full": full, "sliding": local}  # [B, 1, Lq, Lk]


def _masks_of(q: Segments, k: Segments, causal: bool, window: int, convention: str,
              lookahead: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    same = _same_segment(q, k)
    d = q.positions[:, :, None] - k.positions[:, None, :]
    if causal or lookahead == 0:
        full = same & (d >= 0)
        return full, full & (d < window)
    # the local window's reach behind and ahead of the query; t5gemma2 splits the window over both sides
    behind, ahead = {"t5gemma": (window, window), "flax": (window - 1, window - 1)}.get(
        convention, ((window + 1) // 2 - 1, window // 2))
    if lookahead is None:
        return same, same & (d >= -ahead) & (d <= behind)
    # the curriculum (causal to bidirectional): the causal window slides ahead as the lookahead grows, giving up
    # behind only what it gains ahead, down to the final window's reach (it fell from the causal window's to that
    # at once, so a local layer first saw half its keys)
    local = same & (d >= -min(lookahead, ahead)) & (d <= max(behind, window - 1 - lookahead))
    return same & (d >= -lookahead), local


def cross_mask(q: Segments, k: Segments) -> torch.Tensor:
    """Decoder tokens see the encoder tokens of their own segment."""
    return _same_segment(q, k)[:, None]


class EncoderBlock(nn.Module):
    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.attn_norm = norm(cfg)
        self.attn = Attention(cfg)
        self.post_attn_norm = post_norm(cfg)
        self.mlp_norm = norm(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation)
        self.post_mlp_norm = post_norm(cfg)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))

    def forward(self, x: torch.Tensor, rope: Rope, mask: AttentionMask,
                cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """`cache`: this block's keys and values are appended to it (decoder-only generation reuses them)."""
        h = self.attn_norm(x)
        k, v = self.attn.keys_values(h, rope)
        if cache is not None:
            cache.append((k, v))
        x = x + self.post_attn_norm(self.attn.attend(self.attn.queries(h, rope), k, v, mask))
        return self.feed_forward(x)


class DecoderBlock(EncoderBlock):
    """A block with causal self-attention that also reads the encoder (merged or through cross-attention)."""

    def __init__(self, cfg: StackConfig, merged: bool, encoder_width: int) -> None:
        super().__init__(cfg)
        self.merged = merged
        if not merged:
            self.cross_norm = norm(cfg)
            self.cross_attn = Attention(cfg, kv_width=encoder_width)
            self.post_cross_norm = post_norm(cfg)

    def encoder_keys_values(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the encoder output (the generation engine computes them once per prompt)."""
        return (self.attn if self.merged else self.cross_attn).keys_values(encoder_out, rope=None)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, rope: Rope, mask: AttentionMask, encoder_out: torch.Tensor,
        cross: AttentionMask | None,
    ) -> torch.Tensor:
        """`mask`: over the decoder tokens, or when merged over [decoder tokens | encoder tokens];
        `cross`: the cross-attention mask (None when merged)."""
        # computed here, inside the block, so that a sharded (FSDP) block has its weights gathered
        ek, ev = self.encoder_keys_values(encoder_out)
        h = self.attn_norm(x)
        q = self.attn.queries(h, rope)
        k, v = self.attn.keys_values(h, rope)
        if self.merged:
            out = self.attn.attend(q, torch.cat([k, ek], 2), torch.cat([v, ev], 2), mask)
            return self.feed_forward(x + self.post_attn_norm(out))
        x = x + self.post_attn_norm(self.attn.attend(q, k, v, mask))
        h = self.cross_norm(x)
        x = x + self.post_cross_norm(self.cross_attn.attend(self.cross_attn.queries(h, None), ek, ev, cross))
        return self.feed_forward(x)


class Stack(nn.Module):
    """A list of blocks with a final norm."""

    def __init__(self, cfg: StackConfig, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.norm = norm(cfg)


def embed_tokens(table: nn.Embedding, ids: torch.Tensor, scale: bool) -> torch.Tensor:
    """Token embeddings; Gemma (`scale`) multiplies them by sqrt(d), rounded to the activation dtype as Gemma does."""
    x = table(ids)
    return x * torch.tensor(math.sqrt(table.embedding_dim), dtype=x.dtype) if scale else x


def soft_cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return soft_cap(project(hidden, weight), softcap)


def run_self_attention_stack(
    stack: Stack, cfg: StackConfig, x: torch.Tensor, seg: Segments, *, causal: bool, convention: str = "t5gemma",
    lookahead: int | None = None, cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Embedded tokens through a stack of EncoderBlocks (bidirectional, or causal like the decoder-only source);
    `cache` receives each block's keys and values."""
    rope = rope_tables(cfg, seg.positions, x.dtype)
    allowed = attention_masks(seg, seg, causal=causal, window=cfg.sliding_window, convention=convention,
                              lookahead=lookahead)
    masks = {kind: AttentionMask(a) for kind, a in allowed.items()}
    for block, kind in zip(stack.layers, cfg.layer_types):
        x = block(x, rope[kind], masks[kind], cache)
    return stack.norm(x)


def untied_head(cfg: StackConfig, vocab_size: int, tied: bool) -> Linear | None:
    """The LM head's own weight, for models that do not read logits out of the embedding table."""
    return None if tied else Linear(cfg.hidden_size, vocab_size, bias=False)


class CausalLM(nn.Module):
    """A decoder-only model run by the same blocks: the source model, as a distillation teacher."""

    def __init__(
        self, cfg: StackConfig, vocab_size: int, final_logit_softcap: float | None, tied_head: bool = True
    ) -> None:
        super().__init__()
        self.cfg, self.final_logit_softcap = cfg, final_logit_softcap
        self.embed = nn.Embedding(vocab_size, cfg.hidden_size)
        self.stack = Stack(cfg, [EncoderBlock(cfg) for _ in range(cfg.num_layers)])
        self.lm_head = untied_head(cfg, vocab_size, tied_head)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, ids: torch.Tensor, seg: Segments,
               cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Final states (after the final norm); `cache` receives each layer's keys and values."""
        x = embed_tokens(self.embed, ids, self.cfg.embed_scale)
        return run_self_attention_stack(self.stack, self.cfg, x, seg, causal=True, cache=cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_logits(hidden, self.head_weight, self.final_logit_softcap)


@dataclass
class Seq2SeqOutput:
    logits: torch.Tensor  # [B, Ld, vocab]
    encoder_hidden_states: torch.Tensor  # [B, Le, d_encoder]
    decoder_hidden_states: torch.Tensor  # [B, Ld, d_decoder], after the final norm


@dataclass
class EncoderState:
    """What the decoder needs from one encoder pass."""

    hidden: torch.Tensor
    segments: Segments


class EncoderDecoder(nn.Module):
    """The encoder-decoder. `embed` feeds the decoder and is the LM head unless the model has its own
    (`lm_head`, untied); `encoder_embed` exists only when the encoder has its own table (else the
    encoder reads `embed` too)."""

    def __init__(self, config: EncDecConfig) -> None:
        super().__init__()
        self.config = config
        enc, dec = config.encoder, config.decoder
        self.embed = nn.Embedding(config.vocab_size, dec.hidden_size)
        self.encoder_embed = None if config.shared_embeddings else nn.Embedding(config.vocab_size, enc.hidden_size)
        # how far after itself an encoder token may look (None: bidirectional, the model's design); a
        # curriculum of adaptation training opens it gradually from 0, causal like the source
        self.encoder_lookahead: int | None = None
        self.encoder = Stack(enc, [EncoderBlock(enc) for _ in range(enc.num_layers)])
        merged = config.attention == "merged"
        self.decoder = Stack(dec, [DecoderBlock(dec, merged, enc.hidden_size) for _ in range(dec.num_layers)])
        # an untied head, or for inference a quantized (`encdec.inference.quantize`) or oneDNN-packed
        # (`encdec.inference.onednn`) copy of the tied one
        self.lm_head: nn.Module | None = untied_head(dec, config.vocab_size, config.tied_head)
        # where the model came from (sources, training: its encdec.json), set by encdec.adapt and encdec.load and
        # written again by encdec.save, so that a model saved again keeps what its prompts' framing is read from
        self.provenance: dict = {}
        self.loaded_from: str | None = None  # the checkpoint encdec.load read it from, resolved (encdec.save in
        # place keeps that checkpoint's tokenizer)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's [vocab, d] weight: the decoder's embedding table when tied."""
        return self.embed.weight if self.config.tied_head else self.lm_head.weight

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
        segment_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None, causal: bool = False,
    ) -> torch.Tensor:
        """Encoder hidden states [B, L, d] (after the final norm). `causal=True` runs the stack as
        the decoder-only source would: a check of the adaptation, not a mode for use."""
        return self.encode_segments(input_ids, Segments.of(input_ids, attention_mask, segment_ids, positions), causal)

    def encode_segments(self, input_ids: torch.Tensor, seg: Segments, causal: bool = False) -> torch.Tensor:
        """Encoder hidden states of packed or padded rows described by `seg`."""
        table = self.embed if self.encoder_embed is None else self.encoder_embed
        x = embed_tokens(table, input_ids, self.config.encoder.embed_scale)
        return run_self_attention_stack(
            self.encoder, self.config.encoder, x, seg, causal=causal, convention=self.config.encoder_window,
            lookahead=self.encoder_lookahead,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return lm_logits(hidden, self.embed.weight, self.config.final_logit_softcap)
        return soft_cap(self.lm_head(hidden), self.config.final_logit_softcap)

    def decode(
        self, decoder_input_ids: torch.Tensor, encoder: EncoderState, seg: Segments,
    ) -> torch.Tensor:
        """Final decoder hidden states for `decoder_input_ids` (generation goes through `encdec.inference.engine`)."""
        cfg = self.config.decoder
        x = embed_tokens(self.embed, decoder_input_ids, cfg.embed_scale)
        rope = rope_tables(cfg, seg.positions, x.dtype)
        allowed = attention_masks(seg, seg, causal=True, window=cfg.sliding_window)
        cross_allowed = cross_mask(seg, encoder.segments)
        if self.config.attention == "merged":  # one mask over [decoder tokens | encoder tokens]
            masks = {kind: AttentionMask(torch.cat([a, cross_allowed], -1)) for kind, a in allowed.items()}
            cross = None
        else:
            masks = {kind: AttentionMask(a) for kind, a in allowed.items()}
            cross = AttentionMask(cross_allowed)
        for block, kind in zip(self.decoder.layers, cfg.layer_types):
            x = block(x, rope[kind], masks[kind], encoder.hidden, cross)
        return self.decoder.norm(x)

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None, *,
        segment_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
        decoder_segment_ids: torch.Tensor | None = None, decoder_positions: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> Seq2SeqOutput:
        """Logits of the decoder; padded batches use the attention masks, packed rows the segment ids
        and per-segment positions (segment 0 is padding; decoder segment k reads encoder segment k; positions left
        out restart at 0 in each segment).
        Training does not come here: it reads the hidden states (`encode_segments`, `decode`) and
        computes the head together with the loss (`encdec.training.loss`)."""
        if input_ids is None or decoder_input_ids is None:
            raise ValueError("input_ids and decoder_input_ids are both required")
        enc_seg = Segments.of(input_ids, attention_mask, segment_ids, positions)
        if encoder_hidden_states is None:
            encoder_hidden_states = self.encode_segments(input_ids, enc_seg)
        dec_seg = Segments.of(decoder_input_ids, decoder_attention_mask, decoder_segment_ids, decoder_positions)
        hidden = self.decode(decoder_input_ids, EncoderState(encoder_hidden_states, enc_seg), dec_seg)
        return Seq2SeqOutput(self.logits(hidden), encoder_hidden_states, hidden)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Generated decoder tokens [B, T]; see `encdec.generate.generate` for the options."""
        from encdec.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)
