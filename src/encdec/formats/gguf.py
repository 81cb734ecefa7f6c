"""GGUF files (llama.cpp's format): checked, then dequantized once by transformers into a Hugging Face
checkpoint directory (weights + tokenizer), which the family's adapter reads like any other."""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encdec.config import MAX_LAYERS
from encdec.errors import EncdecError, described, first_line
from encdec.files import atomic_dir, file_start, reading_config, write_weights
from encdec.formats.registry import adapter_of, check_gguf_architecture

log = logging.getLogger("encdec")


def architecture(path: Path) -> tuple[str, int]:
    """The `general.architecture` of a GGUF file and its parameter count, after checking that the file is
    complete and supported."""
    from gguf.constants import GGUFValueType

    if file_start(path, 4) != b"GGUF":
        raise EncdecError(f"{path} is not a GGUF file (bad magic number)")
    try:
        reader = _reader(path)
        _refuse_split(reader, path)
        field = reader.fields["general.architecture"]
        if field.types != [GGUFValueType.STRING]:  # a number's bytes were printed as the architecture's name
            raise EncdecError(f"{path}: its general.architecture is not text; expected a name such as gemma3")
        arch = bytes(field.parts[field.data[0]]).decode()
        size = path.stat().st_size
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
        parameters = sum(int(t.n_elements) for t in reader.tensors)
    except EncdecError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds of errors on damaged files
        raise EncdecError(f"{path} is a truncated or corrupt GGUF file ({described(e)})") from None
    if end > size:
        raise EncdecError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}")
    check_gguf_architecture(arch, str(path))
    _check_blocks(reader, arch, path)
    return arch, parameters


def _refuse_split(reader, path: Path) -> None:
    """One file of a GGUF split into several (llama.cpp's gguf-split, as large models are published): its first
    part holds some blocks, the others no metadata, which would be told as a damaged file."""
    field = reader.fields.get("split.count")
    parts = int(field.parts[field.data[0]][0]) if field is not None else 1
    if parts > 1:
        part = reader.fields.get("split.no")
        number = "" if part is None else f" {int(part.parts[part.data[0]][0]) + 1}"
        raise EncdecError(f"{path} is part{number} of a GGUF split into {parts} files; merge them into one first "
                          "(llama.cpp: llama-gguf-split --merge FIRST-PART OUT.gguf), then pass that file")


def _check_blocks(reader, arch: str, path: Path) -> None:
    """The blocks the metadata declares are the ones the file holds: transformers builds as many layers as it
    declares and fills the missing ones with new weights, so a file of a few hundred bytes could ask for
    millions of layers (and all the memory there is)."""
    field = reader.fields.get(f"{arch}.block_count")
    integer = field is not None and field.types[0].name.startswith(("UINT", "INT"))
    declared = int(field.parts[field.data[0]][0]) if integer else None
    named = [re.fullmatch(r"blk\.(\d{1,6})\..+", t.name) for t in reader.tensors if t.name.startswith("blk.")]
    present = {int(m[1]) if m else -1 for m in named}  # -1: a block name of no number, never a declared block
    if declared is None or not 1 <= declared <= MAX_LAYERS or present != set(range(declared)):
        raise EncdecError(f"{path}: its metadata declares {declared if integer else 'no integer'} {arch}.block_count "
                          f"(at most {MAX_LAYERS}), its tensors hold {len(present)} blocks; expected the two to agree")


@cache
def _bounded_reader() -> type:
    """gguf's reader class, bounded: its reads past the end of the file raise (gguf's return empty arrays, so an
    array field claiming 2**62 items, in an 84-byte file, was read for ever, holding ever more memory), and a file
    whose metadata holds more items or values than any model's is refused as it is parsed."""
    from gguf.constants import GGUFValueType
    from gguf.gguf_reader import GGUFReader  # the class (`_parsed_once` puts a function in gguf.GGUFReader)

    class Bounded(GGUFReader):
        values = 0  # numpy views made: each field, array item and string is one or two, a few hundred bytes each

        def _get(self, offset, dtype, count=1, override_order=None):
            count = int(count)
            if count < 0 or offset + np.dtype(dtype).itemsize * count > len(self.data):
                raise ValueError(f"a field of {count} items at byte {offset} runs past the end of the file")
            self.values += 1  # many arrays each under MAX_ARRAY_ITEMS held as much memory as one above it
            if self.values > MAX_VALUES:
                raise ValueError(f"its metadata holds more than {MAX_VALUES:,} values, more than any model's")
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs, raw_type):
            """gguf reads an array item by item, a few Python objects each: 1 million empty strings (an 8 MB file)
            took 1.6 GB. No model's vocabulary or merges come near MAX_ARRAY_ITEMS."""
            if raw_type == GGUFValueType.ARRAY:
                items = int(self._get(orig_offs + 4, np.uint64)[0])
                if items > MAX_ARRAY_ITEMS:
                    raise ValueError(f"a metadata array claims {items:,} items, more than any model's "
                                     f"{MAX_ARRAY_ITEMS:,}")
            return super()._get_field_parts(orig_offs, raw_type)

    return Bounded


_parsed: dict[tuple[str, str], Any] | None = None  # within `_parsed_once`: each file's reader
_PARSING = threading.RLock()  # held through `_parsed_once`: the patch of gguf.GGUFReader is the process's


def _reader(path: str | Path, mode: str = "r") -> Any:
    """The GGUF file `path` parsed by the bounded reader (`_bounded_reader`); within `_parsed_once`, once a file."""
    key = (str(Path(path).resolve()), mode)
    if _parsed is not None and key in _parsed:
        return _parsed[key]
    reader = _bounded_reader()(str(path), mode)
    if _parsed is not None:
        _parsed[key] = reader
    return reader


@contextmanager
def _parsed_once() -> Iterator[None]:
    """Within this block every parse of a GGUF file, encdec's checks' and each `gguf.GGUFReader(path)` of
    transformers', is one (bounded) parse. transformers parses a GGUF three times (config, tokenizer, weights)
    and a parse walks every vocabulary string and merge in Python: about 30 s each for Qwen2.5's 151k tokens."""
    global _parsed
    import gguf

    with _PARSING:  # conversions in two threads, overlapping, left the patch in place for good (and its parses)
        original, outer = gguf.GGUFReader, _parsed
        gguf.GGUFReader, _parsed = _reader, {} if outer is None else outer
        try:
            yield
        finally:
            gguf.GGUFReader, _parsed = original, outer


RECORD = "gguf-source.json"  # in a converted directory: the resolved path of the file it was made from


def to_hf_directory(path: Path, out: Path) -> Path:
    """Dequantize `path` into the Hugging Face directory `out` (atomically, with its RECORD); the LM head is
    kept only when it is not the embedding table."""
    with _parsed_once():
        return _convert(path, out)


CONVERSION_VERSION = 2  # part of the cache key: conversions made before a change of what is written are redone
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # how llama.cpp tells the 27B models, which scale queries otherwise


SOFTCAPS = ("attn_logit_softcapping", "final_logit_softcapping")
MAX_ARRAY_ITEMS = 1 << 20  # items of a metadata array (vocabularies and merges: 262k at most, Gemma's tokens)
# values of a whole file's metadata and tensor list, as gguf reads them (one or two numpy views each): the 270M's
# 1.05 million took 0.68 GB; Llama 3's 128k tokens and 280k merges are about as many. At 4 M a file of a few MB
# of empty strings took 3.4 GB and 52 s to be refused
MAX_VALUES = 1 << 21


def _dropped_fields(path: Path, arch: str) -> dict[str, float]:
    """What transformers' GGUF reader leaves out of the config where it changes the model, read from the file
    before the minutes (and, for 8B, the 32 GB) of dequantizing: Gemma 2's soft-caps (its defaults are the
    released models'), the linear RoPE factor of Gemma 3's global layers (4B-27B). Other RoPE scaling is
    refused here rather than dropped."""
    reader = _reader(path)
    fields = reader.fields
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):  # llama.cpp's form of Llama 3's RoPE scaling
        raise EncdecError(f"{path}: its RoPE scaling (Llama 3's, as llama.cpp's rope_freqs tensor) is not carried over "
                          "by transformers' GGUF reader; use the model's Hugging Face checkpoint directory instead")

    def value(key: str) -> str | float | None:
        field = fields.get(f"{arch}.{key}")
        if field is None:
            return None
        try:
            data = field.parts[field.data[0]]
            return bytes(data).decode() if field.types[0].name == "STRING" else float(data[0])
        except (UnicodeDecodeError, ValueError, TypeError, IndexError) as e:
            raise EncdecError(f"{path}: its {arch}.{key} is neither text nor a number ({described(e)})") from None

    dropped = {key: value(key) for key in SOFTCAPS if arch == "gemma2" and value(key) is not None}
    kind, factor = value("rope.scaling.type"), value("rope.scaling.factor")
    if factor is None:  # the older key, which llama.cpp still reads
        factor = value("rope.scale_linear")
    if kind != "none" and factor not in (None, 0.0, 1.0):
        kind = kind or "linear"  # llama.cpp's reading of a factor without a type
        if arch != "gemma3" or kind != "linear":
            raise EncdecError(f"{path}: its RoPE scaling ({kind}, factor {factor}) is not carried over by "
                              "transformers' GGUF reader; use the model's Hugging Face checkpoint directory instead")
        dropped["rope_factor"] = factor
    return dropped


def _converted_config(config, arch: str, dropped: dict[str, float]) -> dict:
    """The config.json of the converted directory: transformers' configuration of the file, with what it drops."""
    converted = config.to_dict()
    converted.pop("quantization_config", None)
    _restore(converted, arch, dropped)
    return converted


def _restore(config: dict, arch: str, dropped: dict[str, float]) -> None:
    """Put the `dropped` fields back into the config transformers derived, with the 27B models' query scale (no
    GGUF key holds it; llama.cpp derives it from the size, as done here)."""
    config.update({key: dropped[key] for key in SOFTCAPS if key in dropped})
    if "rope_factor" in dropped:
        full = config["rope_parameters"]["full_attention"]
        config["rope_parameters"]["full_attention"] = {**full, "rope_type": "linear", "factor": dropped["rope_factor"]}
    if arch in GEMMA_27B_LAYERS:  # llama.cpp scales queries by head_dim, except the 27B models' by hidden / heads
        big = config["num_hidden_layers"] == GEMMA_27B_LAYERS[arch]
        heads = config["num_attention_heads"]
        config["query_pre_attn_scalar"] = config["hidden_size"] // heads if big else config["head_dim"]


def _check_parameters(alone: str, name: str, path: Path, arch: str, parameters: int, dropped: dict[str, float]) -> None:
    """The model transformers would build from the file's metadata, built without memory (on the meta device),
    has as many parameters as the file's tensors: what it cannot map it would otherwise allocate and fill with
    new weights (a declared width of millions, or shapes it derives otherwise, such as head_dim), and the
    checkpoint would not be the file's. Its configuration is read as the converted directory's will be, so that a
    value encdec refuses (a soft-cap of 0, a window of 0) is refused naming the file, before minutes of
    dequantizing and a cached copy that is never read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(alone, gguf_file=name, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - its strict dataclasses' validation errors, ValueError, KeyError...
        raise EncdecError(f"{path}: transformers cannot read this {arch} GGUF's metadata ({first_line(e)})") from None
    described = _converted_config(config, arch, dropped)
    with reading_config(path):
        adapter_of(described.get("model_type"), str(path)).read_config(described, path)
    tied = config.tie_word_embeddings
    built = sum(t.numel() for k, t in model.state_dict().items() if not (tied and k == "lm_head.weight"))
    if built != parameters:
        raise EncdecError(f"{path}: transformers would read its {arch} metadata as a model of {built:,} parameters, "
                          f"its tensors hold {parameters:,}; this GGUF's shapes (e.g. head_dim) are not ones "
                          "transformers can map")


def _convert(path: Path, out: Path) -> Path:
    arch, parameters = architecture(path)
    dropped = _dropped_fields(path, arch)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once (about a minute; cached in %s)", path.name, out)
    start = time.perf_counter()
    # read from a folder of its own: in the file's, transformers would also read a tokenizer_config.json (its
    # tokenizer class, an auto_map) that belongs to some other model kept beside it
    with tempfile.TemporaryDirectory(prefix="encdec-gguf-") as alone:
        (Path(alone) / path.name).symlink_to(path.resolve())
        _check_parameters(alone, path.name, path, arch, parameters, dropped)
        try:
            model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=path.name, dtype=torch.float32,
                                                         trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - a tensor type it cannot dequantize, memory running out...
            first = first_line(e)
            # numpy's allocation failures (dequantizing) are MemoryErrors, torch's on CPU RuntimeErrors
            if isinstance(e, MemoryError) or "not enough memory" in first or "can't allocate memory" in first:
                size = parameters * 4 / 2**30
                raise EncdecError(f"{path}: too little memory to dequantize this {arch} GGUF ({first}): its "
                                  f"{parameters:,} parameters take about {size:.1f} GiB in float32") from None
            raise EncdecError(f"{path}: transformers cannot read this {arch} GGUF ({described(e)})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=path.name, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - ValueError for a tokenizer kind it cannot build, the tokenizers
            # library's plain Exception for vocabularies it cannot map
            raise EncdecError(f"{path}: transformers cannot build a tokenizer from this GGUF "
                              f"({first_line(e)})") from None
    config = _converted_config(model.config, arch, dropped)
    tied = model.config.tie_word_embeddings
    weights = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_weights(tmp, weights)
        tokenizer.save_pretrained(str(tmp))
        (tmp / RECORD).write_text(json.dumps({"path": str(path.resolve())}))  # in the same rename as the weights
    log.info("cached %s in %.0f s", path.name, time.perf_counter() - start)
    return out
