"""Decoder-only model run by this project's own blocks: the distillation teacher, the decoder-only
baseline of classification and instruction tuning, and how a trained one is saved back in its family's
Hugging Face layout (so transformers and `load_source` read it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from encdec.adapt import stack_weights
from encdec.files import atomic_dir, read_json, write_weights
from encdec.formats.decoder_only import EMBED, HEAD, from_stack
from encdec.formats.registry import layer_names, text_model_config
from encdec.model import CausalLM
from encdec.sources import DecoderOnlySource, load_source, load_tokenizer


def causal_from_source(source: DecoderOnlySource) -> CausalLM:
    """The source's weights in a CausalLM (float32 unless the source was loaded otherwise): its tensors themselves,
    not copies (training the model changes `source.weights`)."""
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
                metadata: dict | None = None, tokenizer: Any = None) -> None:
    """Write `model` as a Hugging Face checkpoint of its family: the source's config.json (of its text model, for a
    multimodal source), generation_config.json (an instruct model's end of turn is named there only) and tokenizer,
    or `tokenizer` (UL2's, with its added tokens), new weights."""
    config = {**text_model_config(read_json(source.directory / "config.json")), "vocab_size": model.embed.num_embeddings}
    generation = source.directory / "generation_config.json"
    generation = read_json(generation) if generation.is_file() else None
    if tokenizer is None and source.has_tokenizer:
        tokenizer = load_tokenizer(source.directory)
    weights = hf_weights(model, source.family)
    # the dtype of the weights written, not the source's (bfloat16 in released ones: transformers reads them in it)
    config.pop("torch_dtype", None)
    config["dtype"] = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    with atomic_dir(Path(out), overwrite, replaces=("config.json",)) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_weights(tmp, weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if metadata is not None:
            (tmp / "encdec.json").write_text(json.dumps(metadata, indent=2))
