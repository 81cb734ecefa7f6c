"""What the decoder-only formats share: the description of a source read from its config.json, and the
renaming of weights between a Hugging Face decoder-only layout and our layer stacks, both directions.

Each family's adapter (formats.gemma, formats.llama, formats.qwen) supplies its `MODEL_TYPES`,
`GGUF_ARCHITECTURES`, `ADAPTED_AS`, where its text weights are (`TEXT_PREFIXES`, `NOT_TEXT`) and its LM head
(`HEADS`), its per-layer name table `LAYER` and `read_config`; formats.registry picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from encdec.config import StackConfig, check_cap
from encdec.errors import EncdecError
from encdec.files import read_json, reading_config

EMBED, FINAL_NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
LAYERS = "model.layers."
ROPE_BUFFER = ".rotary_emb.inv_freq"  # saved by older transformers (Llama 2 checkpoints), recomputed from the config


@dataclass
class SourceConfig:
    """What a decoder-only config.json says, in our terms."""

    family: str
    stack: StackConfig
    final_logit_softcap: float | None
    tied_head: bool
    special_tokens: dict[str, Any]  # pad_token_id, bos_token_id, eos_token_ids

    def __post_init__(self) -> None:  # checked where config.json is read, so that the error names it
        check_cap("final_logit_softcap", self.final_logit_softcap)


def rename(name: str, table: dict[str, str]) -> str | None:
    """Map the leading sub-module of `name` through `table`; None if it has no entry."""
    head, _, rest = name.partition(".")
    target = table.get(head)
    return None if target is None else f"{target}.{rest}"


def special_tokens(cfg: dict[str, Any], default_pad: int | None = None) -> dict[str, Any]:
    """pad / bos / eos ids of a config.json; a missing pad (or -1, early Llama conversions' "none") becomes
    `default_pad`, else the first EOS. The EOS has no default: a family's own id differs from any guess (Gemma's 1
    is a quotation mark in Llama 3's vocabulary)."""
    eos = cfg.get("eos_token_id")
    if eos is None or eos == []:
        raise EncdecError("config.json names no eos_token_id; add the model's end-of-sequence id (its tokenizer's "
                          "eos_token, or generation_config.json's eos_token_id)")
    eos_ids = list(eos) if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos_ids):  # before any set of them
        raise ValueError(f"eos_token_id must be a token id or a list of them, not {str(eos)[:80]}")
    pad = cfg.get("pad_token_id")
    if pad is None or pad == -1:  # (refused as no token id only after the weights were read)
        pad = eos_ids[0] if default_pad is None else default_pad
    bos = cfg.get("bos_token_id")
    return {"pad_token_id": pad, "bos_token_id": eos_ids[0] if bos is None else bos, "eos_token_ids": eos_ids}


def with_generation_eos(special: dict[str, Any], directory: Path) -> dict[str, Any]:
    """`special` with the end-of-sequence ids of the source's generation_config.json added after config.json's:
    an instruct model names its end of turn there only (Gemma 2 IT's config.json says 1, its generation config
    [1, 107]; Qwen2.5 Instruct's adds <|endoftext|>), and the adapted model would otherwise generate past it."""
    return {**special, "eos_token_ids": list(dict.fromkeys([*special["eos_token_ids"], *generation_eos(directory)]))}


def generation_eos(directory: Path) -> list[int]:
    """The end-of-sequence ids that the source's generation_config.json names (none without one)."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    with reading_config(path):
        eos = read_json(path).get("eos_token_id")
        ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"eos_token_id must be a token id or a list of them, not {eos!r}")
    return ids


def text_weights(weights: dict[str, torch.Tensor], tied_head: bool, prefixes: tuple[str, ...],
                 not_text: tuple[str, ...], where: object = "the checkpoint",
                 heads: tuple[str, ...] = (HEAD,)) -> dict[str, torch.Tensor]:
    """The text decoder's tensors (names under `prefixes`, none under `not_text`) renamed to `model.*`, and an
    untied LM head (stored under one of `heads`: a multimodal layout nests it); anything else (a vision tower, the
    RoPE frequencies older Llama checkpoints saved, which the configuration gives) is dropped. A tied head stored
    apart must be the embeddings' copy (`check_tied_copy`)."""
    stored = [name for name in heads if name in weights]
    out = {} if tied_head or not stored else {HEAD: weights[stored[0]]}
    for name, t in weights.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None and not name.startswith(not_text) and not name.endswith(ROPE_BUFFER):
            out["model." + name[len(prefix):]] = t
    for name in stored if tied_head and EMBED in out else ():
        check_tied_copy(weights[name], out[EMBED], f"{where}: its {name}", f"its embeddings ({EMBED})")
    return out


def check_tied_copy(copy: torch.Tensor, source: torch.Tensor, copy_name: str, source_name: str) -> None:
    """Refuse a tensor that config.json ties to another (tie_word_embeddings) but that the checkpoint stores with
    other values: transformers then computes with the stored one (it does not tie them), and reading it as the
    tie says built a model that computed otherwise, unsaid (logits apart by 1 and more)."""
    if copy.shape != source.shape or not torch.equal(copy, source):
        raise EncdecError(f"{copy_name} differs from {source_name}, which config.json ties it to "
                          "(tie_word_embeddings): transformers would compute with the stored one; keep one of them "
                          "(remove the stored copy, or, where the family has heads of their own, set "
                          "tie_word_embeddings to false)")


def to_stack(
    weights: dict[str, torch.Tensor], layer: dict[str, str], prefix: str, layers: list[int]
) -> dict[str, torch.Tensor]:
    """Source layers `layers` (Hugging Face names) renamed into our stack `prefix`, plus its final norm."""
    out = {f"{prefix}.norm.weight": weights[FINAL_NORM]}
    wanted = {f"{LAYERS}{src}.": dst for dst, src in enumerate(layers)}
    inverse = {v: k for k, v in layer.items()}
    for name, t in weights.items():
        head = name[: name.find(".", len(LAYERS)) + 1] if name.startswith(LAYERS) else None
        if head in wanted:
            ours = rename(name[len(head):], inverse)
            if ours is not None:
                out[f"{prefix}.layers.{wanted[head]}.{ours}"] = t
    return out


def from_stack(state: dict[str, torch.Tensor], layer: dict[str, str]) -> dict[str, torch.Tensor]:
    """A CausalLM's state dict (`embed`, `stack`, `lm_head`) in Hugging Face decoder-only names."""
    out = {}
    for name, t in state.items():
        if name == "embed.weight":
            out[EMBED] = t
        elif name == "stack.norm.weight":
            out[FINAL_NORM] = t
        elif name == "lm_head.weight":
            out[HEAD] = t
        else:
            _, _, index, sub = name.split(".", 3)  # stack.layers.{i}.{sub}
            out[f"{LAYERS}{index}.{rename(sub, layer)}"] = t
    return out
