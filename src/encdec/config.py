"""Configuration dataclasses of the encoder-decoder model.

A model is two layer stacks (encoder, decoder) taken from decoder-only models plus how they are
joined. The families differ only in switches of `StackConfig` (norm placement, activation, biases,
RoPE variant...), whose defaults are Gemma's. Every field is plain data so that a configuration
round-trips through JSON in the project's checkpoint format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from encdec.errors import EncdecError

FAMILIES = ("gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3")
ACTIVATIONS = ("gelu_tanh", "silu")
ATTENTION_KINDS = ("merged", "cross")
# How far a local (sliding-window) encoder layer reaches, for a window W, with d = query - key:
#   "t5gemma":  |d| <= W                        (transformers' T5Gemma)
#   "t5gemma2": -(W // 2) <= d <= (W + 1) // 2 - 1 (transformers' T5Gemma2: the window split over both sides)
#   "flax":     |d| <= W - 1                    (Google's Flax T5Gemma code)
WINDOW_CONVENTIONS = ("t5gemma", "t5gemma2", "flax")
# far above any published model's (Llama 3.1 405B has 126): a count past it is a damaged or crafted configuration,
# refused before anything is built per layer (a meta-device skeleton of 10 million layers needs hundreds of GB)
MAX_LAYERS = 1024


def flag(cfg: dict[str, Any], key: str, default: bool) -> bool:
    """A true/false field of a source configuration (`default` where it is missing or null): a hand-edited "false"
    was read as true (bool("false")), and a Llama's own LM head dropped for the embedding table."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise EncdecError(f"{key} must be true or false, got {value!r:.40}")
    return value


def mapping(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    """A mapping field of a source configuration ({} where it is missing or null): a RoPE setting written as
    "linear" or [1, 2] was read as none, the default RoPE, where transformers refuses it."""
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EncdecError(f"{key} must be a mapping of settings or null, got {value!r:.40}")
    return value


def layer_count(cfg: dict[str, Any], key: str = "num_hidden_layers") -> int:
    """A source configuration's layer count, checked before lists or modules are built from it."""
    n = cfg[key]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LAYERS:
        raise EncdecError(f"{key} must be an integer from 1 to {MAX_LAYERS}, got {n!r:.40}")
    return n


@dataclass
class StackConfig:
    """One layer stack, in the shape of the decoder-only model it was taken from (defaults: Gemma)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: list[str]  # per layer: "sliding" (local attention) or "full" (global)
    sliding_window: int  # W of the local layers
    query_pre_attn_scalar: float  # attention scores are scaled by its inverse square root
    rope_theta_local: float = 10_000.0
    rope_theta_global: float = 10_000.0
    rope_scale_local: float = 1.0  # linear RoPE scaling factor (positions divided by it)
    rope_scale_global: float = 1.0
    attn_softcap: float | None = None  # Gemma 2: tanh cap on attention logits
    qk_norm: bool = False  # Gemma 3: RMSNorm on queries and keys
    rms_norm_eps: float = 1e-6
    max_positions: int | None = None  # the source's max_position_embeddings: longest sequence it was trained for
    # family switches (Gemma / Llama, Mistral, Qwen)
    post_norms: bool = True  # Gemma: a norm after each sub-layer too; Llama, Qwen: before only
    norm_offset: float = 1.0  # RMSNorm scale = norm_offset + weight: Gemma stores 1 + w (1.0), the others w (0.0)
    activation: str = "gelu_tanh"  # gate of the feed-forward: Gemma tanh-GELU, Llama/Qwen SiLU
    embed_scale: bool = True  # Gemma multiplies embeddings by sqrt(hidden_size)
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections
    # Llama 3 RoPE scaling (factor, low_freq_factor, high_freq_factor, original max positions); all layers
    rope_llama3: list[float] | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "sliding_window"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise EncdecError(f"{name} must be a positive integer, got {value!r}")
        if self.num_layers > MAX_LAYERS:
            raise EncdecError(f"num_layers must be at most {MAX_LAYERS}, got {self.num_layers}")
        for name in ("query_pre_attn_scalar", "rope_theta_local", "rope_theta_global", "rope_scale_local",
                     "rope_scale_global", "rms_norm_eps"):
            value = getattr(self, name)
            if not _is_positive(value):
                raise EncdecError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.layer_types, list):  # a string's length was said as its entries
            raise EncdecError(f"layer_types must be a list of 'sliding' and 'full', one a layer, got "
                              f"{self.layer_types!r:.60}")
        if len(self.layer_types) != self.num_layers:
            raise EncdecError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = sorted(set(self.layer_types) - {"sliding", "full"})
        if bad:
            raise EncdecError(f"unknown layer type(s) {bad}; accepted: 'sliding', 'full'")
        if self.activation not in ACTIVATIONS:
            raise EncdecError(f"unknown activation {self.activation!r}; accepted: {', '.join(ACTIVATIONS)}")
        if self.num_heads % self.num_kv_heads:
            raise EncdecError(f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} KV heads")
        check_cap("attn_softcap", self.attn_softcap)
        if self.max_positions is not None and (not _is_int(self.max_positions) or self.max_positions < 1):
            raise EncdecError(f"max_positions must be null or a positive integer, got {self.max_positions!r}")
        for name in ("qk_norm", "post_norms", "embed_scale", "qkv_bias"):  # a hand-edited "no" is truthy
            if not isinstance(getattr(self, name), bool):
                raise EncdecError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not is_number(self.norm_offset):
            raise EncdecError(f"norm_offset must be a number (1.0 for Gemma, 0.0 for the others), got "
                              f"{self.norm_offset!r}")
        llama3 = self.rope_llama3  # (factor, low_freq_factor, high_freq_factor, original max positions)
        if llama3 is not None and not (isinstance(llama3, list) and len(llama3) == 4 and all(map(_is_positive, llama3))
                                       and llama3[1] != llama3[2]):
            raise EncdecError(f"rope_llama3 must be null or [factor, low_freq_factor, high_freq_factor, "
                              f"original_max_position_embeddings], positive, the two frequency factors apart; got "
                              f"{str(llama3)[:80]}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite number (not a bool, which Python counts as one), within a float's range (an integer of 400 digits
    compares below infinity, and the float arithmetic that reads it raised OverflowError)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return abs(float(value)) < float("inf")
    except OverflowError:
        return False


def _is_positive(value: Any) -> bool:
    """A finite number above 0 (not a bool, which Python counts as one)."""
    return is_number(value) and value > 0


def check_cap(name: str, value: Any) -> None:
    """A tanh soft-cap: none, or a positive number (0 would zero every logit it caps)."""
    if value is not None and not _is_positive(value):
        raise EncdecError(f"{name} must be null or a positive number, got {value!r}")


@dataclass
class EncDecConfig:
    """The whole encoder-decoder: two stacks, how the decoder reads the encoder, and the vocabulary."""

    encoder: StackConfig
    decoder: StackConfig
    vocab_size: int
    family: str  # which decoder-only family the stacks come from, see FAMILIES
    attention: str  # "cross": separate cross-attention sub-layer (T5Gemma); "merged": one self+cross attention (T5Gemma 2)
    shared_embeddings: bool  # one table for encoder input, decoder input and LM head; else the encoder has its own
    encoder_window: str = "t5gemma2"  # two-sided local-window convention of the encoder, see WINDOW_CONVENTIONS
    final_logit_softcap: float | None = None  # Gemma 2: tanh cap on output logits
    pad_token_id: int = 0
    bos_token_id: int = 2  # also the decoder's start token
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    tied_head: bool = True  # the LM head is the decoder's embedding table; else its own weight (`lm_head`)

    def __post_init__(self) -> None:
        if not _is_int(self.vocab_size) or self.vocab_size < 1:
            raise EncdecError(f"vocab_size must be a positive integer, got {self.vocab_size!r}")
        if _is_int(self.eos_token_ids):  # one id, as a Hugging Face config.json may give it
            self.eos_token_ids = [self.eos_token_ids]
        elif isinstance(self.eos_token_ids, tuple):
            self.eos_token_ids = list(self.eos_token_ids)
        for name in ("pad_token_id", "bos_token_id"):  # both are looked up in the embedding table
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value < self.vocab_size:
                raise EncdecError(f"{name} must be a token id in [0, {self.vocab_size}) (the vocabulary), got "
                                  f"{value!r}")
        eos = self.eos_token_ids  # not bounded by the vocabulary: a generation config's ids may lie past a small one
        if not isinstance(eos, list) or not eos or not all(_is_int(v) and v >= 0 for v in eos):
            raise EncdecError(f"eos_token_ids must be a list of token ids, got {str(eos)[:80]}")
        check_cap("final_logit_softcap", self.final_logit_softcap)
        for name in ("shared_embeddings", "tied_head"):  # a hand-edited "false" is truthy
            if not isinstance(getattr(self, name), bool):
                raise EncdecError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.family not in FAMILIES:
            raise EncdecError(f"unknown family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.attention not in ATTENTION_KINDS:
            raise EncdecError(f"unknown attention {self.attention!r}; accepted: {', '.join(ATTENTION_KINDS)}")
        if self.encoder_window not in WINDOW_CONVENTIONS:
            raise EncdecError(
                f"unknown encoder window convention {self.encoder_window!r}; accepted: {', '.join(WINDOW_CONVENTIONS)}"
            )
        if self.attention == "merged" and self.encoder.hidden_size != self.decoder.hidden_size:
            raise EncdecError(
                f"merged attention shares K/V projections, so encoder and decoder widths must match "
                f"(got {self.encoder.hidden_size} and {self.decoder.hidden_size}); such a model takes "
                "cross-attention (encdec adapt --attention cross)"
            )
        if self.shared_embeddings and self.encoder.hidden_size != self.decoder.hidden_size:
            raise EncdecError("shared embeddings need equal encoder and decoder widths")

    @property
    def special_tokens(self) -> dict[str, Any]:
        """pad / bos / eos ids, named as a decoder-only source's (`SourceConfig.special_tokens`) are."""
        return {"pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
                "eos_token_ids": list(self.eos_token_ids)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncDecConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EncdecError(f"unknown configuration field(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        data["encoder"] = StackConfig(**data["encoder"])
        data["decoder"] = StackConfig(**data["decoder"])
        return cls(**data)
