"""Hugging Face Llama-architecture checkpoints (`llama`: Llama 2/3.x, SmolLM2; `mistral`): config fields
and per-layer weight names.

A Llama block has norms before its two sub-layers only, plain RMSNorm weights, SiLU gating, unscaled
embeddings and one RoPE setting for every layer (default, linear or Llama 3's scaling). Mistral is the
same block with every layer local (`sliding_window`). formats.qwen builds on these helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from encdec.config import StackConfig, flag, layer_count, mapping
from encdec.errors import EncdecError
from encdec.formats.decoder_only import SourceConfig, special_tokens

MODEL_TYPES = {"llama": "llama", "mistral": "mistral"}
GGUF_ARCHITECTURES = {"llama": "llama"}  # llama.cpp writes Mistral models as llama; gguf-py has no "mistral"
# merged attention (T5Gemma 2's: no new parameters); Mistral's local encoder layers split the window over both sides
ADAPTED_AS = {"llama": ("merged", "t5gemma2"), "mistral": ("merged", "t5gemma2")}
TEXT_PREFIXES, NOT_TEXT, HEADS = ("model.",), (), ("lm_head.weight",)
# our block sub-module -> Hugging Face sub-module ("post_attention_layernorm" is the norm before the MLP)
LAYER = {"attn_norm": "input_layernorm", "attn": "self_attn", "mlp_norm": "post_attention_layernorm", "mlp": "mlp"}
ROPE_TYPES = ("default", "linear", "llama3")


def rope(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """The StackConfig RoPE fields of a one-setting config (current `rope_parameters` or older `rope_scaling`), read
    as transformers reads them: `rope_scaling` in place of `rope_parameters` where both are given, a theta they
    leave out taken from `rope_theta`."""
    params = mapping(cfg, "rope_scaling") or mapping(cfg, "rope_parameters")
    params = {"rope_theta": cfg.get("rope_theta", 10_000.0), **params}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise EncdecError(f"{where}: RoPE type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    theta = float(params.get("rope_theta", 10_000.0))
    out: dict[str, Any] = {"rope_theta_local": theta, "rope_theta_global": theta}
    if kind == "linear":
        out["rope_scale_local"] = out["rope_scale_global"] = float(params["factor"])
    if kind == "llama3":
        out["rope_llama3"] = [float(params["factor"]), float(params["low_freq_factor"]),
                              float(params["high_freq_factor"]), float(_original_context(cfg, params))]
    return out


def _original_context(cfg: dict[str, Any], params: dict[str, Any]) -> Any:
    """Llama 3's pre-scaling context length: the RoPE setting's, else (as transformers fills it in)
    max_position_embeddings."""
    return params.get("original_max_position_embeddings", cfg["max_position_embeddings"])


def refuse_unsupported(cfg: dict[str, Any], where: Path) -> None:
    """Biases on the output projection or the MLP, or another activation, are not in our blocks."""
    if cfg.get("mlp_bias") or (cfg.get("attention_bias") and cfg["model_type"] != "qwen2"):
        raise EncdecError(f"{where}: attention_bias / mlp_bias are not supported (only Qwen2's q/k/v biases are)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise EncdecError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported for {cfg['model_type']}; "
                          "supported: 'silu'")


CLASS_DEFAULTED = ("max_position_embeddings", "num_key_value_heads")


def with_class_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with the fields above that it leaves out given the values of transformers' configuration class for its
    model_type, as transformers reads it (MistralConfig's 8 key/value heads, Qwen2's 32,768 positions): read as the
    head count and as no limit, a Mistral-7B config without the key was refused against its weights, and prompts
    past the model's positions were not caught."""
    missing = [key for key in CLASS_DEFAULTED if key not in cfg]
    if not missing:
        return cfg
    import inspect

    from transformers import CONFIG_MAPPING

    # the class's own defaults, not a default instance's (whose key/value heads follow its own 32 query heads)
    parameters = inspect.signature(CONFIG_MAPPING[cfg["model_type"]].__init__).parameters
    given = {key: parameters[key].default for key in missing if key in parameters}
    return {**cfg, **{key: value for key, value in given.items() if isinstance(value, int)}}


def stack_from_hf(cfg: dict[str, Any], layer_types: list[str], where: Path, **family: Any) -> StackConfig:
    """A StackConfig of a Llama-like config; `family` sets the switches that differ from Llama."""
    cfg = with_class_defaults(cfg)
    refuse_unsupported(cfg, where)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return StackConfig(
        num_layers=layer_count(cfg), hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_heads=cfg["num_attention_heads"], num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=head_dim, layer_types=layer_types, sliding_window=cfg.get("sliding_window") or 4096,
        query_pre_attn_scalar=head_dim, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_positions=cfg.get("max_position_embeddings"), post_norms=False, norm_offset=0.0, activation="silu",
        embed_scale=False, **rope(cfg, where), **family,
    )


def source_config(cfg: dict[str, Any], family: str, stack: StackConfig) -> SourceConfig:
    return SourceConfig(family=family, stack=stack, final_logit_softcap=None,
                        tied_head=flag(cfg, "tie_word_embeddings", False), special_tokens=special_tokens(cfg))


def read_config(cfg: dict[str, Any], where: Path) -> SourceConfig:
    """A Llama or Mistral config.json."""
    family = MODEL_TYPES[cfg["model_type"]]
    local = family == "mistral" and cfg.get("sliding_window", 4096) is not None  # MistralConfig's default window
    layer_types = ["sliding" if local else "full"] * layer_count(cfg)
    return source_config(cfg, family, stack_from_hf(cfg, layer_types, where))
