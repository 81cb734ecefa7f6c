"""State-dict and configuration adapters for transformers' T5Gemma and T5Gemma 2 checkpoints.

T5Gemma (`model_type` "t5gemma"): Gemma 2 stacks, separate cross-attention, separate encoder and
decoder embeddings (the decoder's tied to the LM head), encoder window |i - j| <= W.
T5Gemma 2 ("t5gemma2"): Gemma 3 stacks, merged attention, one embedding for everything, encoder
window split over both sides. transformers always builds a SigLIP vision tower for it: a text-only
export carries a tiny all-zero placeholder tower (1 layer, width 8, 16x16 images), which text
inputs never reach; importing a released checkpoint skips its vision tower and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from encdec.config import EncDecConfig, StackConfig, flag
from encdec.errors import EncdecError, described
from encdec.formats.decoder_only import check_tied_copy, rename
from encdec.formats.gemma import stack_from_hf, stack_to_hf, with_defaults

# our block sub-module -> T5Gemma / T5Gemma 2 block sub-module
LAYER = {
    "attn_norm": "pre_self_attn_layernorm",
    "attn": "self_attn",
    "post_attn_norm": "post_self_attn_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "mlp": "mlp",
    "post_mlp_norm": "post_feedforward_layernorm",
    "cross_norm": "pre_cross_attn_layernorm",
    "cross_attn": "cross_attn",
    "post_cross_norm": "post_cross_attn_layernorm",
}
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")
EOI_EMBEDDINGS = ("model.encoder.embed_tokens.eoi_embedding", "model.decoder.embed_tokens.eoi_embedding")
# transformers nests T5Gemma 2's text encoder under "text_model." in memory but saves it without
TEXT_MODEL = "model.encoder.text_model."
PLACEHOLDER_VISION = {
    "model_type": "siglip_vision_model", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 1, "image_size": 16, "patch_size": 8,
}


@dataclass(frozen=True)
class Layout:
    """Where our parameters live in one transformers format."""

    model_type: str
    architecture: str
    stacks: dict[str, str]  # our stack -> its prefix there
    embeddings: dict[str, str]  # our embedding parameter -> its name there
    implied: dict[str, str]  # names there that ties make copies of another there -> that one (checked on import)


T5GEMMA = Layout(
    "t5gemma", "T5GemmaForConditionalGeneration",
    {"encoder": "model.encoder", "decoder": "model.decoder"},
    {"embed.weight": "model.decoder.embed_tokens.weight", "encoder_embed.weight": "model.encoder.embed_tokens.weight"},
    {"lm_head.out_proj.weight": "model.decoder.embed_tokens.weight"},
)
T5GEMMA2 = Layout(
    "t5gemma2", "T5Gemma2ForConditionalGeneration",
    {"encoder": "model.encoder", "decoder": "model.decoder"},
    {"embed.weight": "model.encoder.embed_tokens.weight"},
    {"lm_head.out_proj.weight": "model.encoder.embed_tokens.weight",
     "model.decoder.embed_tokens.weight": "model.encoder.embed_tokens.weight"},
)
LAYOUTS = {layout.model_type: layout for layout in (T5GEMMA, T5GEMMA2)}


def external_name(name: str, layout: Layout) -> str:
    """Our parameter name -> the transformers name."""
    if name in layout.embeddings:
        return layout.embeddings[name]
    stack, _, rest = name.partition(".")
    if rest.startswith("layers."):
        _, index, sub = rest.split(".", 2)
        mapped = rename(sub, LAYER)
        if mapped is None:
            raise KeyError(name)
        rest = f"layers.{index}.{mapped}"
    return f"{layout.stacks[stack]}.{rest}"


def _one_rope(stack: StackConfig) -> bool:
    """T5Gemma has one RoPE setting for local and global layers."""
    return (stack.rope_theta_local, stack.rope_scale_local) == (stack.rope_theta_global, stack.rope_scale_global)


def _gemma_stack(stack: StackConfig, family: str) -> bool:
    """Whether the stack computes what transformers' blocks of the family compute: the settings the family's reader
    gives (`gemma.stack_from_hf`), which the T5Gemma formats have no field for. A stack changed since (a config
    edited by hand, `dataclasses.replace`) was written without them, and transformers ran another model."""
    return (stack.post_norms and stack.norm_offset == 1.0 and stack.activation == "gelu_tanh" and stack.embed_scale
            and not stack.qkv_bias and stack.rope_llama3 is None and stack.qk_norm == (family == "gemma3")
            and (family == "gemma2" or stack.attn_softcap is None))


def _typed_fields(stack: StackConfig) -> bool:
    """Whether transformers' strictly typed T5Gemma configurations take the stack's values: an integral query scale
    (an int field there) and a hidden size that is a multiple of the heads (checked there); a source's config.json
    may have either otherwise, and saving failed after adapting with a traceback."""
    return float(stack.query_pre_attn_scalar).is_integer() and stack.hidden_size % stack.num_heads == 0


def encoder_layout(family: str, stack: StackConfig, window: str) -> Layout | None:
    """The transformers format whose encoder holds this encoder stack exactly, if any."""
    if not _gemma_stack(stack, family) or not _typed_fields(stack):
        return None
    if family == "gemma2" and window == "t5gemma" and _one_rope(stack):
        return T5GEMMA
    if family == "gemma3" and window == "t5gemma2":
        return T5GEMMA2
    return None


def exportable(cfg: EncDecConfig) -> Layout | None:
    """The transformers format that holds this configuration exactly, if any (both tie the LM head to the
    embedding)."""
    if not cfg.tied_head or not _gemma_stack(cfg.decoder, cfg.family) or not _typed_fields(cfg.decoder):
        return None
    layout = encoder_layout(cfg.family, cfg.encoder, cfg.encoder_window)
    if layout is T5GEMMA and cfg.attention == "cross" and not cfg.shared_embeddings and _one_rope(cfg.decoder):
        return T5GEMMA
    if layout is T5GEMMA2 and cfg.attention == "merged" and cfg.shared_embeddings and cfg.final_logit_softcap is None:
        return T5GEMMA2
    return None


def transformers_refusal(directory: Path) -> str | None:
    """Why transformers' AutoConfig refuses the config.json in `directory` (one line), or None where it reads it:
    its typed fields are stricter than encdec's reading (an attention scale written 8.5, a soft-cap written 30)."""
    import transformers

    try:
        transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - huggingface_hub's validation errors derive from Exception alone
        return described(e)
    return None


def _special(cfg: EncDecConfig) -> dict[str, Any]:
    return {"pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids}


def hf_config(cfg: EncDecConfig, layout: Layout):
    """The transformers configuration object of an exportable model."""
    import transformers as tf

    cap = None if cfg.final_logit_softcap is None else float(cfg.final_logit_softcap)  # 30 in a config.json: a float
    common = {"vocab_size": cfg.vocab_size, "final_logit_softcapping": cap, **_special(cfg)}
    if layout is T5GEMMA:
        enc = tf.T5GemmaModuleConfig(**stack_to_hf(cfg.encoder, per_layer_type_rope=False), **common)
        dec = tf.T5GemmaModuleConfig(**stack_to_hf(cfg.decoder, per_layer_type_rope=False), **common)
        config = tf.T5GemmaConfig(encoder=enc, decoder=dec, vocab_size=cfg.vocab_size, **_special(cfg))
    else:
        text = tf.T5Gemma2TextConfig(**stack_to_hf(cfg.encoder, per_layer_type_rope=True), **common)
        enc = tf.T5Gemma2EncoderConfig(text_config=text, vision_config=PLACEHOLDER_VISION, mm_tokens_per_image=4)
        dec = tf.T5Gemma2DecoderConfig(**stack_to_hf(cfg.decoder, per_layer_type_rope=True), **common)
        config = tf.T5Gemma2Config(encoder=enc, decoder=dec, **_special(cfg))
    config.architectures = [layout.architecture]
    return config


def to_hf_weights(weights: dict[str, torch.Tensor], cfg: EncDecConfig, layout: Layout) -> dict[str, torch.Tensor]:
    """Our state dict in transformers' names, checked against the model transformers would build."""
    import transformers as tf

    out = {external_name(name, layout): t for name, t in weights.items()}
    config = hf_config(cfg, layout)
    with torch.device("meta"):
        reference = getattr(tf, layout.architecture)(config).state_dict()
    reference = {_on_disk(n): t for n, t in reference.items()}
    if layout is T5GEMMA2:
        embed = weights["embed.weight"]
        eoi = reference[EOI_EMBEDDINGS[0]]
        eoi_index = config.eoi_token_index
        # token <end_of_image> reads eoi_embedding there; give it the row it has here
        value = embed[eoi_index] * torch.tensor(cfg.encoder.hidden_size**0.5, dtype=embed.dtype) \
            if eoi_index < cfg.vocab_size else torch.zeros(eoi.shape, dtype=embed.dtype)
        out[EOI_EMBEDDINGS[0]] = value
        for name, t in reference.items():
            if name.startswith(VISION_PREFIXES):
                out[name] = torch.zeros(t.shape, dtype=embed.dtype)
    expected = {n: t.shape for n, t in reference.items() if n not in layout.implied and n != EOI_EMBEDDINGS[1]}
    got = {n: t.shape for n, t in out.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [n for n in got if got[n] != expected[n]]
        raise AssertionError(f"{layout.model_type} export does not match transformers' model, e.g. {diff[:3]}")
    return out


def _on_disk(name: str) -> str:
    return "model.encoder." + name[len(TEXT_MODEL):] if name.startswith(TEXT_MODEL) else name


def config_from_hf(data: dict[str, Any]) -> EncDecConfig:
    """Our configuration of a T5Gemma / T5Gemma 2 config.json (released or exported)."""
    model_type = data["model_type"]
    if not flag(data, "tie_word_embeddings", True):  # read as tied (as released), its own head would be dropped unsaid
        raise EncdecError(f"a {model_type} checkpoint with an LM head of its own (tie_word_embeddings: false), which "
                          "encdec does not read; accepted: T5Gemma / T5Gemma 2 checkpoints whose LM head is the "
                          "decoder's embedding, as released")
    encoder, decoder = data.get("encoder") or {}, data.get("decoder") or {}
    if model_type == "t5gemma2":
        encoder = encoder.get("text_config") or {}
    family = "gemma2" if model_type == "t5gemma" else "gemma3"
    top = {k: data[k] for k in ("vocab_size", "eos_token_id") if k in data}  # named outside the stacks
    encoder, decoder = with_defaults(encoder, family), with_defaults({**top, **decoder}, family)
    try:
        enc, dec = stack_from_hf(encoder, family), stack_from_hf(decoder, family)
    except KeyError as e:
        raise EncdecError(f"the {model_type} configuration lacks {e}") from None
    # the top level's ids where it names them (generation reads them there), as transformers reads them
    special = {k: data[k] if data.get(k) is not None else decoder.get(k, default)
               for k, default in (("pad_token_id", 0), ("bos_token_id", 2), ("eos_token_id", 1))}
    eos = special["eos_token_id"]
    return EncDecConfig(
        encoder=enc, decoder=dec, vocab_size=decoder["vocab_size"], family=family,
        attention="cross" if model_type == "t5gemma" else "merged", shared_embeddings=model_type == "t5gemma2",
        encoder_window=model_type, final_logit_softcap=decoder.get("final_logit_softcapping"),
        pad_token_id=special["pad_token_id"] or 0, bos_token_id=special["bos_token_id"],
        eos_token_ids=list(eos) if isinstance(eos, list) else [eos],
    )


def from_hf_weights(
    hf: dict[str, torch.Tensor], names: list[str], layout: Layout
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict (`names`) from a transformers one, and notes on what was skipped."""
    hf = {_on_disk(n): t for n, t in hf.items()}
    ours, missing = {}, []
    for name in names:
        ext = external_name(name, layout)
        if ext in hf:
            ours[name] = hf[ext]
        else:
            missing.append(ext)
    if missing:
        raise EncdecError(f"the checkpoint lacks {len(missing)} weight(s) such as {missing[0]}; truncated?")
    used = {external_name(n, layout) for n in names}
    rest = [n for n in hf if n not in used and n not in layout.implied]
    for copy, source in layout.implied.items():  # stored, a tie's copy must be one: transformers computes with it
        if copy in hf and source in hf:
            check_tied_copy(hf[copy], hf[source], f"the checkpoint's {copy}", source)
    notes = []
    vision = [n for n in rest if n.startswith(VISION_PREFIXES)]
    if any(hf[n].any() for n in vision):  # an all-zero tower is this project's text-only placeholder
        count = sum(hf[n].numel() for n in vision)
        notes.append(f"ignored the vision tower and projector ({len(vision)} tensors, {count:,} parameters): text only")
        if any(n in EOI_EMBEDDINGS for n in rest):
            notes.append("ignored eoi_embedding (it only replaces <end_of_image>, which text inputs do not use)")
    unknown = [n for n in rest if n not in vision and n not in EOI_EMBEDDINGS]
    if unknown:  # transformers' model would compute with them (a bias, a variant's extra weights)
        raise EncdecError(f"the checkpoint holds {len(unknown)} tensor(s) encdec does not read, such as {unknown[0]}: "
                          f"a variant of {layout.model_type} this version does not know")
    return ours, notes
