"""Decoder-only model run by this project's own blocks: the distillation teacher, the decoder-only
baseline of classification and instruction tuning, and how a trained one is saved back in its family's
Hugging Face layout (so transformers and `load_source` read it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from encdec.adapt import stack_weights
from encdec.files import atomic_dir, read_json, write_weights
from encdec.formats.decoder_only import EMBED, HEAD, from_stack
from encdec.formats.registry import layer_names
from encdec.model import CausalLM
from encdec.sources import DecoderOnlySource, load_source, load_tokenizer


def causal_from_source(source: DecoderOnlySource) -> CausalLM:
    """The source's weights in a CausalLM (float32 unless the source was loaded otherwise)."""
    weights = stack_weights(source, "stack", list(range(source.stack.num_layers)))
    weights["embed.weight"] = source.weights[EMBED]
    if not source.tied_head:
        weights["lm_head.weight"] = source.weights[HEAD]
    with torch.device("meta"):
        model = CausalLM(source.stack, source.vocab_size, source.final_logit_softcap, source.tied_head)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def load_causal(spec: str, dtype: torch.dtype = torch.float32) -> tuple[CausalLM, DecoderOnlySource]:
    source = load_source(spec, dtype)
    return causal_from_source(source), source


def hf_weights(model: CausalLM, family: str) -> dict[str, torch.Tensor]:
    """Our parameter names -> transformers' names of the family (`model.layers.{i}.self_attn...`)."""
    return {k: v.detach().contiguous() for k, v in from_stack(model.state_dict(), layer_names(family)).items()}


def save_causal(model: CausalLM, source: DecoderOnlySource, out: Path, *, overwrite: bool = False,
                metadata: dict | None = None) -> None:
    """Write `model` as a Hugging Face checkpoint of its family: the source's config.json and tokenizer, new weights."""
    with atomic_dir(Path(out), overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(read_json(source.directory / "config.json"), indent=2))
        write_weights(tmp, hf_weights(model, source.family))
        if source.has_tokenizer:
            load_tokenizer(source.directory).save_pretrained(str(tmp))
        if metadata is not None:
            (tmp / "encdec.json").write_text(json.dumps(metadata, indent=2))
