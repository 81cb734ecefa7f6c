"""Hugging Face Gemma 2 / Gemma 3 naming: configuration fields and per-layer weight names.

The same configuration fields describe a decoder-only Gemma and each stack of T5Gemma /
T5Gemma 2, so the other adapters build on these helpers. Gemma's stacks are `StackConfig`'s defaults.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from encdec.config import StackConfig, flag, layer_count, mapping
from encdec.errors import EncdecError
from encdec.formats.decoder_only import SourceConfig, special_tokens

log = logging.getLogger("encdec")

# model_type -> family; "gemma3" is the multimodal checkpoint whose text part we take
MODEL_TYPES = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
GGUF_ARCHITECTURES = {"gemma2": "gemma2", "gemma3": "gemma3"}
# family -> (attention, encoder window convention) it is adapted with by default: as T5Gemma / T5Gemma 2 were released
ADAPTED_AS = {"gemma2": ("cross", "t5gemma"), "gemma3": ("merged", "t5gemma2")}
# where a (multimodal) Gemma 3 checkpoint keeps its text decoder, and what is not part of it
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
NOT_TEXT = ("model.vision_tower", "model.multi_modal")
HEADS = ("lm_head.weight", "language_model.lm_head.weight")  # the second: the older layout's (language_model.model.*)
# our block sub-module -> Hugging Face decoder-only Gemma sub-module
LAYER = {
    "attn_norm": "input_layernorm",
    "attn": "self_attn",
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "mlp": "mlp",
    "post_mlp_norm": "post_feedforward_layernorm",
}

# What transformers' Gemma 2 / Gemma 3 configuration classes (T5Gemma's and T5Gemma 2's stacks alike) take for a
# field a config.json leaves out. Transformers before 5 saved a nested configuration as its difference from these:
# the released multimodal Gemma 3 4B's text_config names neither its head counts nor head_dim, and a stack shaped
# like Gemma 2 2B (T5Gemma 2B-2B's) names almost nothing.
_SHARED_DEFAULTS = {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "head_dim": 256}
CONFIG_DEFAULTS = {
    "gemma2": {**_SHARED_DEFAULTS, "vocab_size": 256_000, "max_position_embeddings": 8192,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {**_SHARED_DEFAULTS, "vocab_size": 262_208, "max_position_embeddings": 131_072},
}


def with_defaults(cfg: dict[str, Any], family: str) -> dict[str, Any]:
    """A Gemma 2 / Gemma 3 (or T5Gemma stack) configuration dict with the fields it leaves out as transformers
    fills them."""
    return {**CONFIG_DEFAULTS[family], **cfg}


HF_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
OUR_LAYER_TYPES = {v: k for k, v in HF_LAYER_TYPES.items()}


def layer_types_from_hf(types: Any) -> list[str]:
    """A config.json's `layer_types` in encdec's names; another kind of layer (a later family's chunked
    attention) is refused by name."""
    if not isinstance(types, list):
        raise EncdecError(f"layer_types is {type(types).__name__}, not a list of layer types")
    unknown = next((t for t in types if not isinstance(t, str) or t not in HF_LAYER_TYPES), None)
    if unknown is not None:
        raise EncdecError(f"layer_types holds {unknown!r}; accepted: {', '.join(HF_LAYER_TYPES)}")
    return [HF_LAYER_TYPES[t] for t in types]


def _rope(cfg: dict[str, Any], kind: str, family: str) -> tuple[float, float]:
    """(theta, linear factor) of a layer type, from the current or the older config layout, as transformers reads
    them: the layer type's own parameters (nested, or one setting for every layer), `rope_scaling` applied where
    that layout scales (Gemma 3's global layers, over their parameters; every layer of Gemma 2 and T5Gemma, in place
    of them), and a theta they leave out taken from the older fields (rope_theta, rope_local_base_freq)."""
    gemma3 = family == "gemma3"
    if kind == "sliding" and gemma3:
        theta = cfg.get("rope_local_base_freq", 10_000.0)
    else:
        theta = cfg.get("rope_theta", 1_000_000.0 if gemma3 else 10_000.0)
    params = dict(mapping(cfg, "rope_parameters"))
    if set(params) & set(HF_LAYER_TYPES):  # one setting per layer type
        params = dict(mapping(params, OUR_LAYER_TYPES[kind]))
    elif gemma3 and params:  # transformers' Gemma 3 keeps its per-type defaults beside a flat setting
        raise EncdecError(f"rope_parameters {params} names no layer type; Gemma 3 reads one setting per layer type "
                          f"({', '.join(HF_LAYER_TYPES)}), and transformers would leave a flat one unused")
    scaling = mapping(cfg, "rope_scaling")
    if gemma3 and kind == "full":
        params.update(scaling)
    elif not gemma3 and scaling:
        params = dict(scaling)
    params.setdefault("rope_theta", theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise EncdecError(f"RoPE type {rope_type!r} is not supported; supported: 'default', 'linear'")
    # linear scaling needs its factor, as transformers does (read as 1.0, it was no scaling, in silence)
    return float(params.get("rope_theta", 10_000.0)), float(params["factor"]) if rope_type == "linear" else 1.0


def stack_from_hf(cfg: dict[str, Any], family: str) -> StackConfig:
    """A StackConfig from a Gemma 2 / Gemma 3 (text) or T5Gemma module configuration dict."""
    cfg = with_defaults(cfg, family)
    if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise EncdecError(f"hidden_activation {cfg['hidden_activation']!r} is not supported; accepted: "
                          "'gelu_pytorch_tanh' (Gemma 2, Gemma 3, T5Gemma)")
    if cfg.get("attention_bias"):
        raise EncdecError("attention_bias: true is not supported (Gemma's projections have no biases)")
    if cfg.get("sliding_window", 4096) is None:  # (other values are StackConfig's to check; None read as 4096)
        raise EncdecError("sliding_window is None; expected a positive number of tokens (transformers' Gemma needs "
                          "one for its sliding layers)")
    n = layer_count(cfg)
    if cfg.get("layer_types") is not None:  # an empty list too (the default pattern in its place, in silence)
        layer_types = layer_types_from_hf(cfg["layer_types"])
    else:
        period = 2 if family == "gemma2" else cfg.get("sliding_window_pattern", 6)
        layer_types = ["sliding" if (i + 1) % period else "full" for i in range(n)]
    local, glob = _rope(cfg, "sliding", family), _rope(cfg, "full", family)
    return StackConfig(
        num_layers=n,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        layer_types=layer_types,
        sliding_window=cfg.get("sliding_window", 4096),
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
        rope_theta_local=local[0],
        rope_scale_local=local[1],
        rope_theta_global=glob[0],
        rope_scale_global=glob[1],
        # transformers' Gemma 3 (and T5Gemma 2) attention leaves a configured attn_logit_softcapping unapplied
        attn_softcap=cfg.get("attn_logit_softcapping") if family == "gemma2" else None,
        qk_norm=family == "gemma3",
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_positions=cfg.get("max_position_embeddings"),
    )


def _rope_dict(theta: float, scale: float) -> dict[str, Any]:
    if scale == 1.0:
        return {"rope_type": "default", "rope_theta": float(theta)}
    return {"rope_type": "linear", "rope_theta": float(theta), "factor": float(scale)}


def stack_to_hf(stack: StackConfig, per_layer_type_rope: bool) -> dict[str, Any]:
    """The Hugging Face configuration fields of one stack (T5Gemma module / T5Gemma 2 text config), of the types
    transformers' strict configurations check (a source's config.json may say 50 for a float, 256.0 for an int)."""
    if per_layer_type_rope:
        rope = {
            "sliding_attention": _rope_dict(stack.rope_theta_local, stack.rope_scale_local),
            "full_attention": _rope_dict(stack.rope_theta_global, stack.rope_scale_global),
        }
    else:
        if (stack.rope_theta_local, stack.rope_scale_local) != (stack.rope_theta_global, stack.rope_scale_global):
            raise EncdecError("this format has one RoPE setting for all layers, but local and global layers differ")
        rope = _rope_dict(stack.rope_theta_global, stack.rope_scale_global)
    positions = {} if stack.max_positions is None else {"max_position_embeddings": stack.max_positions}
    return {
        **positions,
        "hidden_size": stack.hidden_size,
        "intermediate_size": stack.intermediate_size,
        "num_hidden_layers": stack.num_layers,
        "num_attention_heads": stack.num_heads,
        "num_key_value_heads": stack.num_kv_heads,
        "head_dim": stack.head_dim,
        "layer_types": [OUR_LAYER_TYPES[t] for t in stack.layer_types],
        "sliding_window": stack.sliding_window,
        "query_pre_attn_scalar": int(stack.query_pre_attn_scalar),  # integral where a T5Gemma format holds it
        "rope_parameters": rope,
        "attn_logit_softcapping": None if stack.attn_softcap is None else float(stack.attn_softcap),
        "rms_norm_eps": float(stack.rms_norm_eps),
        "hidden_activation": "gelu_pytorch_tanh",
    }


SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def text_model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config.json of the text model alone, as a decoder-only student is saved: a multimodal Gemma 3's text
    model as a Gemma3ForCausalLM, with the special tokens the released ones name outside it (the student's
    weights are the text decoder's, under its names); any other config as it is."""
    if cfg.get("model_type") != "gemma3":
        return cfg
    outer = {k: v for k in SPECIAL_IDS if (v := cfg.get(k)) is not None}
    dtype = {k: cfg[k] for k in ("dtype", "torch_dtype") if k in cfg}
    return {**dtype, **cfg["text_config"], **outer, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


def read_config(cfg: dict[str, Any], where: Path) -> SourceConfig:
    """A decoder-only Gemma 2 / Gemma 3 config.json (of a multimodal Gemma 3, its text model)."""
    model_type = cfg["model_type"]
    family = MODEL_TYPES[model_type]
    outer: dict[str, Any] = {}
    if model_type == "gemma3":
        if not isinstance(cfg.get("text_config"), dict):
            raise EncdecError(f"{where} is a Gemma 3 configuration without a text model")
        log.info("%s is multimodal Gemma 3: taking its text model, ignoring the vision tower", where)
        # the released ones name their special tokens (EOS: [1, 106], <end_of_turn> too) outside the text model,
        # which is what generation reads
        outer = {k: v for k in SPECIAL_IDS if (v := cfg.get(k)) is not None}
        if not flag(cfg, "tie_word_embeddings", True):  # transformers reads the top level's for this class
            raise EncdecError(f"{where} is a Gemma with an LM head of its own (tie_word_embeddings: false, at the top "
                              "level), which encdec does not adapt; accepted: Gemma checkpoints whose LM head is the "
                              "embedding, as released")
        cfg = cfg["text_config"]
    cfg = with_defaults(cfg, family)
    if cfg.get("use_bidirectional_attention"):  # EmbeddingGemma: read as causal, every layer would be misread
        raise EncdecError(f"{where} is a bidirectional Gemma (use_bidirectional_attention: an embedding model), not "
                          "a language model; accepted: decoder-only (causal) Gemma checkpoints")
    if not flag(cfg, "tie_word_embeddings", True):  # every released Gemma ties them; read as tied, its head was lost
        raise EncdecError(f"{where} is a Gemma with an LM head of its own (tie_word_embeddings: false), which encdec "
                          "does not adapt; accepted: Gemma checkpoints whose LM head is the embedding, as released")
    defaults = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
    return SourceConfig(
        family=family, stack=stack_from_hf(cfg, family),
        final_logit_softcap=cfg.get("final_logit_softcapping"), tied_head=True,  # Gemma 3's too: null as released
        special_tokens=special_tokens({**defaults, **{k: v for k, v in cfg.items() if v is not None}, **outer}),
    )
