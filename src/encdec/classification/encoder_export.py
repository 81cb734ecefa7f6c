"""The encoder alone, without the decoder: for embeddings and classification.

Where a transformers class holds the encoder exactly, it is written in that class's layout, so
vanilla transformers loads it and gives the same hidden states:

- Gemma 2 stacks with T5Gemma's window and one RoPE setting: `T5GemmaEncoderModel` (a t5gemma
  config.json with `is_encoder_decoder: false`; its decoder sub-config describes no weights);
- Gemma 3 stacks with T5Gemma 2's window: `T5Gemma2Encoder` (model_type "t5gemma2_encoder"), with the
  same all-zero placeholder vision tower as a full T5Gemma 2 export.

Any other encoder is written in the project's own format: config.json with `"format":
"encdec-encoder"` and the backbone description, model.safetensors with our parameter names.
`read_encoder` reads all three back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers

from encdec.checkpoint import NATIVE_ENCODER as NATIVE
from encdec.checkpoint import check_format_version
from encdec.classification.backbone import Backbone, BackboneSpec
from encdec.config import EncDecConfig
from encdec.errors import EncdecError, load_failure
from encdec.files import atomic_dir, read_json, read_weights, reading_config, write_native, write_weights
from encdec.formats.decoder_only import special_tokens
from encdec.formats.gemma import stack_from_hf, with_defaults
from encdec.formats.t5gemma import (
    EOI_EMBEDDINGS,
    T5GEMMA,
    T5GEMMA2,
    VISION_PREFIXES,
    Layout,
    encoder_layout,
    external_name,
    hf_config,
)

FORMAT_VERSION = 1
ARCHITECTURES = {"t5gemma": "T5GemmaEncoderModel", "t5gemma2": "T5Gemma2Encoder"}
log = logging.getLogger("encdec")
TEXT_MODEL = "text_model."  # T5Gemma2Encoder nests its text stack here in memory, not on disk


def layout_of(spec: BackboneSpec) -> Layout | None:
    """The transformers layout that holds this encoder exactly, if any."""
    return encoder_layout(spec.family, spec.stack, spec.window_convention) if spec.kind == "encoder" else None


def _hf_config(spec: BackboneSpec, layout: Layout):
    full = hf_config(EncDecConfig(
        encoder=spec.stack, decoder=spec.stack, vocab_size=spec.vocab_size, family=spec.family,
        attention="cross" if layout is T5GEMMA else "merged", shared_embeddings=layout is T5GEMMA2,
        encoder_window=spec.window_convention, **spec.special_tokens,
    ), layout)
    config = full.encoder if layout is T5GEMMA2 else full
    if layout is T5GEMMA:
        config.is_encoder_decoder = False
    config.architectures = [ARCHITECTURES[layout.model_type]]
    return config


def _reference(config, layout: Layout) -> dict[str, torch.Tensor]:
    """The state dict (on the meta device, names as on disk) of the transformers encoder class."""
    import transformers as tf

    with torch.device("meta"):
        if layout is T5GEMMA:
            model = tf.T5GemmaEncoderModel(config)
        else:
            model = tf.T5Gemma2Encoder(config, eoi_token_index=config.eoi_token_index)
    return {n.removeprefix(TEXT_MODEL): t for n, t in model.state_dict().items()}


def external(name: str, layout: Layout) -> str:
    """A backbone parameter name -> its name in the transformers encoder layout."""
    if name == "embed.weight":
        rest = "embed_tokens.weight"
    else:
        rest = external_name("encoder." + name.removeprefix("stack."), layout).removeprefix("model.encoder.")
    return "encoder." + rest if layout is T5GEMMA else rest


def write_encoder(backbone: Backbone, out: Path, *, tokenizer_dir: Path | None = None, overwrite: bool = False) -> str:
    """Write the encoder to `out` (atomically); returns the format used."""
    spec, weights = backbone.spec, backbone.state_dict()
    if spec.kind != "encoder":
        raise EncdecError("only the encoder of an encoder-decoder is exported; a decoder-only model is its own checkpoint")
    layout = layout_of(spec)
    with atomic_dir(Path(out), overwrite, replaces=("config.json",), kind=EXPORTED) as tmp:
        if layout is None:
            # transformers_version: without it (or a model_type), transformers 5 takes a tokenizer of over 100k
            # tokens beside it for an old Mistral one, warns of its regex and advises a "fix" that breaks it
            meta = {"format": NATIVE, "format_version": FORMAT_VERSION, "backbone": spec.to_dict(),
                    "transformers_version": transformers.__version__}
            write_native(tmp, meta, weights)
        else:
            config = _hf_config(spec, layout)
            config.dtype = str(weights["embed.weight"].dtype).removeprefix("torch.")
            out_weights = {external(n, layout): t for n, t in weights.items()}
            reference = _reference(config, layout)
            embed = weights["embed.weight"]
            for name, t in reference.items():  # T5Gemma 2 only: <end_of_image>'s row and the placeholder tower
                if name == EOI_EMBEDDINGS[0].removeprefix("model.encoder."):
                    eoi = config.eoi_token_index
                    out_weights[name] = embed[eoi] * torch.tensor(spec.stack.hidden_size**0.5, dtype=embed.dtype) \
                        if eoi < spec.vocab_size else torch.zeros(t.shape, dtype=embed.dtype)
                elif name not in out_weights:
                    out_weights[name] = torch.zeros(t.shape, dtype=embed.dtype)
            unexpected = sorted(set(out_weights) - set(reference))
            if unexpected:
                raise AssertionError(f"encoder export does not match {ARCHITECTURES[layout.model_type]}, e.g. {unexpected[:3]}")
            config.save_pretrained(str(tmp))
            write_weights(tmp, out_weights)
        if tokenizer_dir is not None:
            from encdec.sources import load_tokenizer

            load_tokenizer(Path(tokenizer_dir)).save_pretrained(str(tmp))
    return NATIVE if layout is None else layout.model_type


def encoder_format(data: dict[str, Any]) -> str | None:
    """The encoder-only format a config.json describes, if it is one."""
    if data.get("format") == NATIVE:
        return NATIVE
    if data.get("model_type") == "t5gemma" and data.get("is_encoder_decoder") is False:
        return "t5gemma"
    if data.get("model_type") == "t5gemma2_encoder":
        return "t5gemma2"
    return None


def is_encoder_export(path: str | Path) -> bool:
    config = Path(path).expanduser() / "config.json"
    return config.is_file() and encoder_format(read_json(config)) is not None


EXPORTED = ("an exported encoder", is_encoder_export)  # what `write_encoder` replaces


def _special(data: dict[str, Any]) -> dict[str, Any]:
    """The special ids a transformers encoder configuration names (none where it names no EOS)."""
    return special_tokens(data, default_pad=0) if data.get("eos_token_id") not in (None, []) else {}


def _spec(data: dict[str, Any], fmt: str) -> BackboneSpec:
    try:
        if fmt == NATIVE:
            return BackboneSpec.from_dict(data["backbone"])
        if fmt == "t5gemma":  # the stack's fields it leaves out as transformers fills them (gemma.with_defaults)
            enc = with_defaults({**{k: data[k] for k in ("vocab_size",) if k in data}, **data["encoder"]}, "gemma2")
            return BackboneSpec("encoder", "gemma2", enc["vocab_size"], stack_from_hf(enc, "gemma2"), "t5gemma",
                                _special(data))
        text = with_defaults(data["text_config"], "gemma3")
        return BackboneSpec("encoder", "gemma3", text["vocab_size"], stack_from_hf(text, "gemma3"), "t5gemma2",
                            _special(data["text_config"]))
    except KeyError as e:
        raise EncdecError(f"the encoder configuration lacks {e}") from None


def read_encoder(path: Path | str, dtype: torch.dtype = torch.float32) -> Backbone:
    """An exported encoder, in any of the formats `write_encoder` writes."""
    path = Path(path)
    data = read_json(path / "config.json")
    fmt = encoder_format(data)
    if fmt is None:
        raise EncdecError(f"{path} is not an exported encoder (accepted: {NATIVE}, T5GemmaEncoderModel, T5Gemma2Encoder)")
    if fmt == NATIVE:
        check_format_version(data, FORMAT_VERSION, path / "config.json")
    with reading_config(path / "config.json"), torch.device("meta"):  # damaged or hand-edited: one line naming it
        backbone = Backbone(_spec(data, fmt))
    stored = {n.removeprefix(TEXT_MODEL): t for n, t in read_weights(path, dtype).items()}
    layout = None if fmt == NATIVE else {"t5gemma": T5GEMMA, "t5gemma2": T5GEMMA2}[fmt]
    names = {n: n if layout is None else external(n, layout) for n in backbone.state_dict()}
    missing = [ext for ext in names.values() if ext not in stored]
    if missing:
        raise EncdecError(f"{path} lacks {len(missing)} encoder weight(s) such as {missing[0]}; truncated?")
    extra = sorted(set(stored) - set(names.values()))
    if fmt == "t5gemma2":  # what T5Gemma2Encoder holds beside the text stack: its vision tower (our all-zero
        # placeholder), and <end_of_image>'s embedding, which text inputs never read
        tower = [n for n in extra if n.startswith(tuple(p.removeprefix("model.encoder.") for p in VISION_PREFIXES))]
        if any(stored[n].any() for n in tower):
            log.warning("%s: ignored its vision tower and projector (%d tensors): text only", path, len(tower))
        extra = [n for n in extra if n not in tower and n != EOI_EMBEDDINGS[0].removeprefix("model.encoder.")]
    if extra:  # as a full checkpoint's are: a variant (biases, a pooler) read without them computed another function
        raise EncdecError(f"{path} holds {len(extra)} weight(s) this encoder has no place for, such as {extra[0]}: a "
                          "variant this version does not know")
    try:
        backbone.load_state_dict({n: stored[ext] for n, ext in names.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise EncdecError(f"{path}: weights do not match config.json ({load_failure(e)})") from None
    return backbone.eval()
