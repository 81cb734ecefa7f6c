"""The part of a model a classifier reads: token embedding plus one layer stack, nothing else.

Both backbones of the paper's comparison are this module: the encoder of an encoder-decoder
(bidirectional; its decoder and LM head are dropped, which halves the memory and the time) and a
decoder-only model (the same blocks run causally, exactly `CausalLM.hidden`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from encdec.config import FAMILIES, WINDOW_CONVENTIONS, StackConfig
from encdec.errors import EncdecError
from encdec.model import CausalLM, EncoderBlock, EncoderDecoder, Segments, Stack, embed_tokens, run_self_attention_stack

KINDS = ("encoder", "causal")


@dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone: plain data, saved as JSON with its weights."""

    kind: str  # "encoder" (bidirectional, from an encoder-decoder) or "causal" (a decoder-only model)
    family: str
    vocab_size: int
    stack: StackConfig
    window_convention: str = "t5gemma2"  # the encoder's two-sided local window (unused when causal)
    # pad_token_id, bos_token_id, eos_token_ids of the model it came from (written into an exported encoder's
    # config.json); empty in descriptions saved before they were kept, which read as Gemma's
    special_tokens: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # read from a file a user may be handed: a typo ran another model, or failed later
        if self.kind not in KINDS:
            raise EncdecError(f"unknown backbone kind {self.kind!r}; accepted: {', '.join(KINDS)}")
        if self.family not in FAMILIES:
            raise EncdecError(f"unknown family {self.family!r}; accepted: {', '.join(FAMILIES)}")
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool) or self.vocab_size < 1:
            raise EncdecError(f"vocab_size must be a positive integer, got {self.vocab_size!r:.40}")
        if self.window_convention not in WINDOW_CONVENTIONS:
            raise EncdecError(f"unknown window convention {self.window_convention!r:.40}; accepted: "
                              f"{', '.join(WINDOW_CONVENTIONS)}")
        if not isinstance(self.stack, StackConfig) or not isinstance(self.special_tokens, dict):
            raise EncdecError("not a backbone description (its stack or special tokens are not objects)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        try:
            spec = cls(**{**data, "stack": StackConfig(**data["stack"])})
        except (KeyError, TypeError) as e:
            raise EncdecError(f"not a backbone description ({e})") from None
        return spec


class Backbone(nn.Module):
    """Final hidden states [B, L, d] (after the stack's final norm) of right- or left-padded token rows."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.stack.hidden_size)
        self.stack = Stack(spec.stack, [EncoderBlock(spec.stack) for _ in range(spec.stack.num_layers)])

    @property
    def hidden_size(self) -> int:
        return self.spec.stack.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seg = Segments.of(input_ids, attention_mask, None, None)
        x = embed_tokens(self.embed, input_ids, self.spec.stack.embed_scale)
        return run_self_attention_stack(self.stack, self.spec.stack, x, seg, causal=self.spec.kind == "causal",
                                        convention=self.spec.window_convention)


def _wrap(spec: BackboneSpec, embed: nn.Embedding, stack: Stack) -> Backbone:
    """A backbone holding existing modules (no copy): what owned them before can be dropped."""
    with torch.device("meta"):
        backbone = Backbone(spec)
    backbone.embed, backbone.stack = embed, stack
    return backbone


def from_encoder_decoder(model: EncoderDecoder) -> Backbone:
    """The encoder of `model` (its own embedding table, or the shared one)."""
    cfg = model.config
    spec = BackboneSpec("encoder", cfg.family, cfg.vocab_size, cfg.encoder, cfg.encoder_window, cfg.special_tokens)
    return _wrap(spec, model.embed if model.encoder_embed is None else model.encoder_embed, model.encoder)


def from_causal(model: CausalLM, family: str, special_tokens: dict[str, Any] | None = None) -> Backbone:
    """A decoder-only model without its LM head."""
    spec = BackboneSpec("causal", family, model.embed.num_embeddings, model.cfg,
                        special_tokens=dict(special_tokens or {}))
    return _wrap(spec, model.embed, model.stack)
