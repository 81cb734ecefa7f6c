"""Which adapter reads a decoder-only checkpoint: by its config.json `model_type` or its GGUF
`general.architecture`. A new family is one adapter module added to ADAPTERS, plus configuration."""

from __future__ import annotations

from types import ModuleType

from encdec.errors import EncdecError
from encdec.formats import gemma, llama, qwen

ADAPTERS: tuple[ModuleType, ...] = (gemma, llama, qwen)
SUPPORTED_FAMILIES = "Gemma 2, Gemma 3, Llama (Llama 2/3.x, SmolLM2), Mistral, Qwen2 / Qwen2.5, Qwen3 text models"
BY_MODEL_TYPE = {model_type: adapter for adapter in ADAPTERS for model_type in adapter.MODEL_TYPES}
BY_GGUF_ARCHITECTURE = {arch: adapter for adapter in ADAPTERS for arch in adapter.GGUF_ARCHITECTURES}
BY_FAMILY = {family: adapter for adapter in ADAPTERS for family in adapter.MODEL_TYPES.values()}


def adapter_of(model_type: str | None, where: str) -> ModuleType:
    """The adapter of a config.json `model_type`; one line naming the supported families otherwise."""
    adapter = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None  # a list is not hashable
    if adapter is None:
        what = (f"holds a {model_type} model" if isinstance(model_type, str) and model_type
                else f"has model_type {model_type!r} in its config.json, not a name" if model_type is not None
                else "has no model_type in its config.json")
        raise EncdecError(f"{where} {what}; supported: {SUPPORTED_FAMILIES}")
    return adapter


def check_gguf_architecture(arch: str, where: str) -> None:
    if arch not in BY_GGUF_ARCHITECTURE:
        raise EncdecError(f"{where} holds a {arch} model; supported GGUF architectures: "
                          f"{', '.join(sorted(BY_GGUF_ARCHITECTURE))}")


def adapted_as(family: str) -> tuple[str, str]:
    """(attention, encoder window convention) a family is adapted with by default."""
    return BY_FAMILY[family].ADAPTED_AS[family]


def text_model_config(cfg: dict) -> dict:
    """The config.json a decoder-only model of this source's text decoder is saved with (a multimodal source's text
    model alone: the adapter's `text_model_config`, where it has one)."""
    model_type = cfg.get("model_type")
    adapter = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    convert = getattr(adapter, "text_model_config", None)
    return cfg if convert is None else convert(cfg)


def layer_names(family: str) -> dict[str, str]:
    """Our block sub-module -> the family's Hugging Face decoder-only sub-module."""
    return BY_FAMILY[family].LAYER
