"""Hugging Face Qwen2 / Qwen2.5 (`qwen2`) and Qwen3 (`qwen3`) checkpoints: Llama blocks (formats.llama)
with biases on the q/k/v projections (Qwen2) or RMSNorm on queries and keys (Qwen3), and optionally
local layers from `max_window_layers` on (`use_sliding_window`, off in the released models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from encdec.config import flag, layer_count
from encdec.formats.decoder_only import SourceConfig
from encdec.formats.gemma import layer_types_from_hf
from encdec.formats.llama import HEADS, LAYER, NOT_TEXT, TEXT_PREFIXES, source_config, stack_from_hf

MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3"}
ADAPTED_AS = {"qwen2": ("merged", "t5gemma2"), "qwen3": ("merged", "t5gemma2")}  # as Llama, see formats.llama
__all__ = ["ADAPTED_AS", "GGUF_ARCHITECTURES", "HEADS", "LAYER", "MODEL_TYPES", "NOT_TEXT", "TEXT_PREFIXES",
           "read_config"]


def _layer_types(cfg: dict[str, Any]) -> list[str]:
    """As transformers reads them: no layer is local without `use_sliding_window` and a window, whatever
    `layer_types` says."""
    n = layer_count(cfg)
    if not flag(cfg, "use_sliding_window", False) or cfg.get("sliding_window", 4096) is None:
        return ["full"] * n
    if cfg.get("layer_types") is not None:  # an empty list too (the default pattern in its place, in silence)
        return layer_types_from_hf(cfg["layer_types"])
    return ["sliding" if i >= cfg.get("max_window_layers", 28) else "full" for i in range(n)]


def read_config(cfg: dict[str, Any], where: Path) -> SourceConfig:
    """A Qwen2 or Qwen3 config.json."""
    family = MODEL_TYPES[cfg["model_type"]]
    if family == "qwen3":  # Qwen3Config's head_dim when the file names none (Qwen2's is hidden / heads)
        cfg = {"head_dim": 128, **cfg}
    stack = stack_from_hf(cfg, _layer_types(cfg), where, qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
    return source_config(cfg, family, stack)
