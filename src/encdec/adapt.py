"""Adaptation: build an encoder-decoder from decoder-only checkpoints (any family of formats.registry).

Balanced: encoder and decoder both copy one source; a separate cross-attention is initialised
from the same layer's self-attention (merged attention needs nothing new). Unbalanced: the decoder
comes from a smaller source of the same family and vocabulary (a separate cross-attention then starts
random, its K/V reading the encoder width), or from a subset of the source's layers (each layer's
cross-attention a copy of its self-attention, as balanced: docs/adaptation.md).
"""

from __future__ import annotations

import logging
import numbers
from pathlib import Path

import torch

from encdec.config import EncDecConfig, StackConfig
from encdec.errors import EncdecError
from encdec.files import portable_path
from encdec.formats.decoder_only import EMBED, HEAD, to_stack
from encdec.formats.registry import adapted_as, layer_names
from encdec.model import EncoderDecoder
from encdec.sources import DecoderOnlySource

CROSS_INIT_STD = 0.02  # normal init of an unbalanced model's cross-attention projections

log = logging.getLogger("encdec")


def layer_spec(text: str) -> list[int] | slice:
    """`--decoder-layers` as written, a comma list ("0,3,6") or a Python slice ("::3" = every third layer): checked
    before any source is read (a dequantized GGUF takes half a minute)."""
    try:
        if ":" in text:
            parts = [int(p) if p else None for p in text.split(":")]
            if len(parts) > 3 or (len(parts) == 3 and parts[2] == 0):
                raise ValueError
            return slice(*parts)
        layers = [int(p) for p in text.split(",")]
    except ValueError:
        raise EncdecError(f"--decoder-layers {text!r}: expected a comma list like 0,3,6 or a slice like ::3") from None
    if sorted(set(layers)) != layers:  # said before the sources load, as the syntax is (the range needs them)
        raise EncdecError(f"--decoder-layers {text!r}: layers must be distinct and increasing")
    return layers


def parse_layers(text: str, num_layers: int) -> list[int]:
    """The source layers `--decoder-layers` selects of `num_layers`."""
    spec = layer_spec(text)
    return check_layers(list(range(num_layers))[spec] if isinstance(spec, slice) else spec, num_layers,
                        f"--decoder-layers {text!r}")


def check_layers(layers: list[int], num_layers: int, name: str = "decoder_layers") -> list[int]:
    """`layers` if they are a selection of a source's `num_layers` (some, distinct, in order); else one line naming
    `name`, what gave them (`encdec.adapt` took any list: [] built the whole decoder, [3, 1] reversed it)."""
    if not layers:
        raise EncdecError(f"{name} selects no layer of {num_layers}")
    odd = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if odd:  # numpy's integers are taken as the numbers they are; 2.0 is not a layer's index
        raise EncdecError(f"{name}: layer indices are integers, got {odd}")
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise EncdecError(f"{name}: layer(s) {bad} out of range; the source has {num_layers} (0-{num_layers - 1})")
    if sorted(set(layers)) != layers:
        raise EncdecError(f"{name}: layers must be distinct and increasing")
    return layers


def _subset(stack: StackConfig, layers: list[int]) -> StackConfig:
    return StackConfig(**{**stack.__dict__, "num_layers": len(layers), "layer_types": [stack.layer_types[i] for i in layers]})


def stack_weights(source: DecoderOnlySource, prefix: str, layers: list[int]) -> dict[str, torch.Tensor]:
    """Source layers `layers` renamed into our stack `prefix` (encoder/decoder), plus its final norm."""
    return to_stack(source.weights, layer_names(source.family), prefix, layers)


def _copy_cross_from_self(weights: dict[str, torch.Tensor], num_layers: int) -> None:
    for i in range(num_layers):
        p = f"decoder.layers.{i}."
        for name in [n for n in weights if n.startswith(p + "attn.")]:
            weights[p + "cross_attn." + name[len(p + "attn."):]] = weights[name].clone()
        weights[p + "cross_norm.weight"] = weights[p + "attn_norm.weight"].clone()
        if p + "post_attn_norm.weight" in weights:  # families with norms after the sub-layers
            weights[p + "post_cross_norm.weight"] = weights[p + "post_attn_norm.weight"].clone()


def _random_cross(model: EncoderDecoder, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The cross-attention of a decoder from another source, in the sources' `dtype` (drawn in float32, so that a
    seed gives the same start in either): a float32 part of a bfloat16 model failed its first product."""
    generator = torch.Generator().manual_seed(seed)
    offset = model.config.decoder.norm_offset
    out = {}
    for name, p in model.named_parameters():
        if ".cross_attn." in name or ".cross_norm." in name or ".post_cross_norm." in name:
            if name.endswith("_proj.weight"):
                out[name] = (torch.randn(p.shape, generator=generator) * CROSS_INIT_STD).to(dtype)
            elif name.endswith("_proj.bias"):
                out[name] = torch.zeros(p.shape, dtype=dtype)
            else:  # norms start at scale 1: weight 1 - offset (0 in Gemma's RMSNorm)
                out[name] = torch.full(p.shape, 1.0 - offset, dtype=dtype)
    return out


def _warn_if_only_local(stack: StackConfig, layers: list[int]) -> None:
    """A decoder subset with no full-attention layer cannot look further back than the window."""
    full = [i for i, kind in enumerate(stack.layer_types) if kind == "full"]
    if full and not set(full) & set(layers):
        log.warning("decoder layers %s are all sliding-window layers: the decoder will not attend further back than %d "
                    "tokens. The source's full-attention layers are %s; include one to keep global attention.",
                    layers, stack.sliding_window, full)


def _rows(table: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` rows of an embedding table (or head): a copy where that cuts it, so that no two parameters
    share memory (the same tensor given twice is cloned below)."""
    return table if table.shape[0] == count else table[:count].clone()


def check_same_vocabulary(encoder_dir: Path, decoder_dir: Path) -> None:
    """One line where the two sources' tokenizers spell different vocabularies, naming the first id whose token
    differs (the CLI asks before reading their weights)."""
    from encdec.sources import load_tokenizer

    ours, theirs = (load_tokenizer(directory).get_vocab() for directory in (encoder_dir, decoder_dir))
    if ours == theirs:
        return
    tokens = [{i: token for token, i in vocab.items()} for vocab in (ours, theirs)]
    ids = [i for i in {*tokens[0], *tokens[1]} if tokens[0].get(i) != tokens[1].get(i)]
    if ids:
        first = min(ids)
        shown = [repr(side[first]) if first in side else "absent" for side in tokens]
        where = f"token {first} is {shown[0]} in the encoder's, {shown[1]} in the decoder's"
    else:  # the same token at every id, one side spelling an id twice (an alias)
        text, i = min(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])
        where = f"{text!r} is token {i} of {'the encoder' if ours.get(text) == i else 'the decoder'}'s alone"
    raise EncdecError(f"the encoder's and the decoder's tokenizers spell different vocabularies ({len(ours)} and "
                      f"{len(theirs)} tokens; {where}); they must share one vocabulary")


def _shared_vocabulary(encoder: DecoderOnlySource, decoder: DecoderOnlySource) -> int:
    """The rows of the embedding tables both sides keep. Models of one family share a tokenizer but pad their tables
    to different sizes (Qwen2.5 7B and up: 152,064 rows, 0.5B-3B: 151,936; Gemma 3 4B and up: 262,208, 1B and
    270M: 262,144): both keep the smaller table, the rows the smaller model already stops at. Models whose tables
    are alike can still spell different vocabularies (Llama 2's and OpenLLaMA's 32,000 tokens): their tokenizers
    are compared, where both have one."""
    if encoder.has_tokenizer and decoder.has_tokenizer:
        check_same_vocabulary(encoder.directory, decoder.directory)
    elif encoder.vocab_size != decoder.vocab_size:  # nothing to tell a table's padding from another vocabulary
        raise EncdecError(f"encoder vocabulary has {encoder.vocab_size} tokens, decoder's {decoder.vocab_size}; "
                          "they must share one vocabulary")
    else:  # a checkpoint copied without its tokenizer files: two vocabularies of one size went through unsaid
        missing = " and ".join(f"the {side}'s ({source.directory})" for side, source in
                               (("encoder", encoder), ("decoder", decoder)) if not source.has_tokenizer)
        log.warning("the vocabularies were not compared: %s has no tokenizer; both tables have %d rows and are taken "
                    "to spell one vocabulary (add the tokenizer files to have them compared)",
                    missing, encoder.vocab_size)
    size = min(encoder.vocab_size, decoder.vocab_size)
    if encoder.vocab_size != decoder.vocab_size:
        log.info("the encoder's embedding table has %d rows, the decoder's %d (one tokenizer): both keep the first "
                 "%d", encoder.vocab_size, decoder.vocab_size, size)
    return size


def check_pairing(encoder_family: str, decoder_family: str, one_source: bool, attention: str | None) -> str:
    """The attention an encoder of `encoder_family` and a decoder of `decoder_family` (`one_source`: the same model)
    are adapted with (`attention`, or the family's default); one line where they cannot be. The CLI checks it
    from the sources' configs, before their weights are read."""
    if decoder_family != encoder_family:
        raise EncdecError(f"encoder is {encoder_family} but decoder is {decoder_family}; "
                          "both must be the same family (one architecture, one vocabulary)")
    attention = attention or adapted_as(encoder_family)[0]
    if attention == "merged" and not one_source:
        raise EncdecError("merged attention shares one embedding and the K/V projections between encoder and decoder, "
                          "so the decoder cannot come from another model; use --attention cross")
    return attention


def adapt(
    encoder: DecoderOnlySource, decoder: DecoderOnlySource | None = None, decoder_layers: list[int] | None = None,
    attention: str | None = None, seed: int = 0,
) -> EncoderDecoder:
    """An encoder-decoder initialised from decoder-only sources (see the module docstring). Its parameters are the
    sources' tensors themselves where a role takes one first (no copy: a 9B source is not held twice), so training
    the model in place changes `encoder.weights` too: load the source again to adapt it afresh."""
    if decoder is not None and decoder_layers is not None:
        raise EncdecError("give either a decoder source or decoder layers, not both")
    dec_source = decoder or encoder
    dtypes = {source.weights[EMBED].dtype for source in (encoder, dec_source)}
    if len(dtypes) > 1:  # a model of two dtypes: its first product's error, and a checkpoint saved as one of them
        raise EncdecError(f"the sources were loaded in different dtypes ({', '.join(sorted(map(str, dtypes)))}); "
                          "load both with one dtype (load_source(path, dtype))")
    # the encoder's model named again as --decoder, by another path (absolute, through a link) is still one source
    one_source = decoder is None or decoder.directory.resolve() == encoder.directory.resolve()
    attention = check_pairing(encoder.family, dec_source.family, one_source, attention)
    window = adapted_as(encoder.family)[1]
    vocab_size = encoder.vocab_size if one_source else _shared_vocabulary(encoder, dec_source)
    n = dec_source.stack.num_layers
    layers = list(range(n)) if decoder_layers is None else check_layers(list(decoder_layers), n)
    dec_stack = _subset(dec_source.stack, layers)
    _warn_if_only_local(dec_source.stack, layers)
    # One embedding table when both sides start from the same one, as T5Gemma 2 does (no measured
    # quality cost); T5Gemma's layout (cross-attention, T5Gemma's window) keeps separate tables so that it
    # stays loadable there.
    shared = one_source and (attention == "merged" or window != "t5gemma")
    config = EncDecConfig(
        encoder=encoder.stack, decoder=dec_stack, vocab_size=vocab_size, family=encoder.family,
        attention=attention, shared_embeddings=shared, encoder_window=window,
        final_logit_softcap=dec_source.final_logit_softcap, tied_head=dec_source.tied_head, **dec_source.special_tokens,
    )
    with torch.device("meta"):
        model = EncoderDecoder(config)
    weights = stack_weights(encoder, "encoder", list(range(encoder.stack.num_layers)))
    weights.update(stack_weights(dec_source, "decoder", layers))
    weights["embed.weight"] = _rows(dec_source.weights[EMBED], vocab_size)
    if not config.tied_head:
        weights["lm_head.weight"] = _rows(dec_source.weights[HEAD], vocab_size)
    if not config.shared_embeddings:
        weights["encoder_embed.weight"] = _rows(encoder.weights[EMBED], vocab_size)
    if attention == "cross":
        # from one source, each decoder layer's cross-attention starts as a copy of its own self-attention (the
        # papers' rule for a balanced model; for a --decoder-layers subset too)
        if one_source:
            _copy_cross_from_self(weights, dec_stack.num_layers)
        else:
            weights.update(_random_cross(model, seed, weights["embed.weight"].dtype))
            log.info("the decoder's cross-attention starts random: the papers train it alone first (`encdec pretrain "
                     "--cross-warmup-steps N`; 1,000 steps in T5Gemma's), which is off by default")
    # one tensor per parameter: roles copied from the same source tensor must train apart
    seen: set[int] = set()
    for name, t in weights.items():
        if id(t) in seen:
            weights[name] = t.clone()
        seen.add(id(t))
    model.load_state_dict(weights, strict=True, assign=True)
    model.provenance = {"adapted_from": {  # encdec.json's, which encdec.save writes
        "encoder": portable_path(encoder.spec), "decoder": None if decoder is None else portable_path(decoder.spec),
        "decoder_layers": None if decoder_layers is None else layers, "attention": attention}}
    return model.eval()
