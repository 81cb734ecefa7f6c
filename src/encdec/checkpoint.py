"""Saving and loading encoder-decoder checkpoint directories.

A configuration that a transformers class holds exactly (see `formats.t5gemma.exportable`) is
saved in that class's layout, so vanilla `AutoModelForSeq2SeqLM.from_pretrained(DIR)` loads it;
any other is saved in the project's own format: config.json with `"format": "encdec"` and our
configuration, model.safetensors with our parameter names, and a modeling file through which
`AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True)` loads it (formats.remote_code).
Both are written atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from encdec.config import EncDecConfig
from encdec.errors import EncdecError, load_failure
from encdec.files import (
    atomic_dir,
    check_output_dir,
    check_utf8,
    read_json,
    read_weights,
    reading_config,
    refuse_quantized,
    refuse_transformers_weights,
    write_native,
    write_weights,
)
from encdec.formats import remote_code
from encdec.formats.decoder_only import with_generation_eos
from encdec.formats.t5gemma import LAYOUTS, config_from_hf, exportable, from_hf_weights, hf_config, to_hf_weights
from encdec.model import EncoderDecoder

log = logging.getLogger("encdec")
NATIVE = "encdec"
NATIVE_ENCODER = "encdec-encoder"  # an encoder alone in the project's own format (`encdec export-encoder`)
FORMAT_VERSION = 1
METADATA = "encdec.json"  # where the model came from (sources, training); transformers ignores it


@dataclass
class Loaded:
    model: EncoderDecoder
    format: str  # "encdec", "t5gemma" or "t5gemma2"
    notes: list[str] = field(default_factory=list)  # what loading skipped


def _converted_for_inference(model: torch.nn.Module) -> str | None:
    """How `model`'s linear layers were converted for inference (their state no longer holds float weights), if so."""
    from encdec.inference.onednn import PackedLinear

    for module in model.modules():
        if isinstance(module, PackedLinear):
            return "packed for oneDNN"
        if type(module).__module__.startswith("torch.ao.nn.quantized"):
            return "quantized to int8"
    return None


def save(
    model: EncoderDecoder, out: Path | str, *, tokenizer_dir: Path | None = None, overwrite: bool = False,
    dtype: torch.dtype | str | None = None, metadata: dict | None = None, tokenizer: object | None = None,
) -> str:
    """Write `model` (and `tokenizer`, or the one found in `tokenizer_dir`) to `out`; returns the format used.
    `metadata`: its encdec.json (None: the model's own `provenance`, from encdec.adapt or encdec.load). A model
    saved over the checkpoint it was loaded from (overwrite=True) keeps its tokenizer unless another is given."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper, whose state_dict prefixes every key
    if not isinstance(model, EncoderDecoder):
        raise EncdecError(f"encdec.save writes an encoder-decoder of encdec's (encdec.adapt, encdec.load), not a "
                          f"{type(model).__name__}")
    converted = _converted_for_inference(model)
    if converted:
        raise EncdecError(f"this model's weights were {converted} for inference (load_for_inference) and cannot be "
                          "saved: save the model that encdec.load returns")
    if tokenizer is not None and tokenizer_dir is not None:  # one of the two would be saved, in silence
        raise EncdecError("give encdec.save a tokenizer or a tokenizer_dir, not both")
    dtype = _saved_dtype(dtype)
    out = Path(out).expanduser()
    check_output_dir(out, overwrite, replaces=("config.json",), kind=SAVED)  # before a copy of every weight (dtype)
    from encdec.sources import has_tokenizer, load_tokenizer

    if (tokenizer is None and tokenizer_dir is None and overwrite and model.loaded_from == str(out.resolve())
            and has_tokenizer(out)):  # a checkpoint saved again in place (load, change, save with overwrite=True)
        tokenizer_dir = out  # keeps its tokenizer, as its provenance is kept: replaced whole, it lost it, and
        # generate and serve refused the model (another model saved over it does not take it: another vocabulary)
    cfg = model.config
    weights = model.state_dict()
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    layout = exportable(cfg)
    from transformers import GenerationConfig

    # overwrite=True replaces an earlier checkpoint, not another folder
    with atomic_dir(out, overwrite, replaces=("config.json",), kind=SAVED) as tmp:
        if layout is None:  # with a modeling file, for transformers' trust_remote_code=True
            write_native(tmp, {"format": NATIVE, "format_version": FORMAT_VERSION, **remote_code.config_fields(),
                               "config": cfg.to_dict()}, weights)
            remote_code.write_modeling_file(tmp)
        else:
            config = hf_config(cfg, layout)
            config.dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
            config.save_pretrained(str(tmp))
            write_weights(tmp, to_hf_weights(weights, cfg, layout))
        GenerationConfig(
            decoder_start_token_id=cfg.bos_token_id, bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_ids, pad_token_id=cfg.pad_token_id,
        ).save_pretrained(str(tmp))
        metadata = model.provenance if metadata is None else metadata
        if metadata:
            (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
        if tokenizer is None and tokenizer_dir is not None:
            tokenizer = load_tokenizer(Path(tokenizer_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return NATIVE if layout is None else layout.model_type


SAVED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}


def _saved_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The weights' type to save in: None (the model's), or one of SAVED_DTYPES, by name as transformers takes it
    too ("bfloat16"); an integer type truncated every weight into a checkpoint that loaded without a word."""
    if dtype is None or dtype in SAVED_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in SAVED_DTYPES:
        return SAVED_DTYPES[dtype]
    raise EncdecError(f"encdec.save writes weights in {', '.join(SAVED_DTYPES)} (or the model's own type: "
                      f"dtype=None), not {dtype!r}")


def _layout_type(data: dict) -> str | None:
    """The transformers layout whose encoder and decoder a config.json describes, if any: a t5gemma config with
    `is_encoder_decoder: false` holds an encoder alone (T5GemmaEncoderModel, as `encdec export-encoder` writes),
    whose decoder transformers would fill with random weights."""
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in LAYOUTS or (model_type == "t5gemma"
                                                                       and data.get("is_encoder_decoder") is False):
        return None
    return model_type


def encoder_alone(data: dict) -> bool:
    """Whether a config.json describes an encoder without its decoder (what `encdec export-encoder` writes: a
    transformers encoder class, or in the format `encdec-encoder` where none holds it)."""
    return (data.get("model_type") in ("t5gemma", "t5gemma2_encoder") and _layout_type(data) is None
            or data.get("format") == NATIVE_ENCODER)


ACCEPTED = "this project's format, t5gemma, t5gemma2"
ENCODER_ALONE = "an encoder alone, as `encdec export-encoder` writes, which `encdec classify` reads"


def check_format_version(data: dict, latest: int, file: Path) -> None:
    """A file in one of this project's formats that a newer encdec wrote is refused, not misread (a field whose
    meaning changed); one that names no version is a first-version one."""
    version = data.get("format_version", 1)
    if not (type(version) is int and 1 <= version <= latest):
        reads = "1" if latest == 1 else f"1 to {latest}"
        raise EncdecError(f"{file} has format_version {version!r}; this encdec reads {reads} (written by a newer "
                          "encdec? update its checkout: git pull && pip install -e .)")


def read_config(path: Path | str) -> tuple[EncDecConfig, str]:
    """The model configuration of a checkpoint directory and its format, without reading its weights (so that
    what a run asks of the model can be checked before it loads)."""
    path = Path(path).expanduser()
    check_utf8(path)  # its weights and tokenizer are read by libraries that take UTF-8 names only
    if not path.is_dir():
        from encdec.sources import PACKAGED

        what = "a file, not a checkpoint directory" if path.exists() else "no such directory"
        made = (f" ({path} is a decoder-only source: `encdec adapt --encoder {path} --out DIR` makes an "
                "encoder-decoder from it)" if str(path) in PACKAGED or path.suffix == ".gguf" else "")
        raise EncdecError(f"{path}: {what}; expected an encoder-decoder checkpoint directory ({ACCEPTED}){made}")
    if (path / "classifier.json").is_file() and not (path / "config.json").exists():
        raise EncdecError(f"{path} is a saved classifier (`encdec classify`), not an encoder-decoder checkpoint: "
                          f"`encdec classify --predict {path} --text ...` labels texts with it")
    if (path / "model.bin").is_file():
        raise EncdecError(f"{path} is a CTranslate2 export (model.bin), which CTranslate2's Translator runs; encdec "
                          "reads the checkpoint it was converted from")
    if not (path / "config.json").exists():  # a training run's directory, most often: its model is a folder down
        inside = f"; the training run's model is {path / 'model'}" if (path / "model" / "config.json").is_file() else ""
        raise EncdecError(f"{path} holds no config.json; expected an encoder-decoder checkpoint directory "
                          f"({ACCEPTED}){inside}")
    data = read_json(path / "config.json")
    if data.get("format") != NATIVE and _layout_type(data) is None:
        raise EncdecError(
            f"{path} is not an encoder-decoder checkpoint (model_type {data.get('model_type')!r}"
            f"{': ' + ENCODER_ALONE if encoder_alone(data) else ''}"
            f"); accepted: {ACCEPTED}. A decoder-only model must first go through "
            "`encdec adapt`"
        )
    refuse_transformers_weights(data, path / "config.json")
    refuse_quantized(data, path)
    fmt = NATIVE if data.get("format") == NATIVE else data["model_type"]
    if fmt == NATIVE:
        check_format_version(data, FORMAT_VERSION, path / "config.json")
    with reading_config(path / "config.json"):  # a damaged config.json: one line naming it
        config = EncDecConfig.from_dict(data["config"]) if fmt == NATIVE else config_from_hf(data)
    # an instruct checkpoint may name its end of turn in generation_config.json alone, as a decoder-only source does
    # (transformers, reading a native checkpoint through its remote code, stops there too)
    eos = with_generation_eos({"eos_token_ids": config.eos_token_ids}, path)["eos_token_ids"]
    return replace(config, eos_token_ids=eos), fmt


def load_checkpoint(path: Path | str, dtype: torch.dtype | None = torch.float32, *, mapped: bool = False) -> Loaded:
    """Read a checkpoint directory in the project's format or a transformers T5Gemma / T5Gemma 2 layout (`dtype`
    None: as stored; `mapped`: the weights left in a memory map of their files, see `read_weights`)."""
    path = Path(path).expanduser()
    config, fmt = read_config(path)
    notes: list[str] = []
    with reading_config(path / "config.json"), torch.device("meta"):  # a config the model cannot be built from
        model = EncoderDecoder(config)
    weights = read_weights(path, dtype, mapped=mapped)
    if fmt != NATIVE:
        try:
            weights, notes = from_hf_weights(weights, list(model.state_dict()), LAYOUTS[fmt])
        except EncdecError as e:
            raise EncdecError(f"{path}: {e}") from None
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        raise EncdecError(f"{path}: weights do not match config.json ({load_failure(e)})") from None
    for note in notes:
        log.info("%s: %s", path, note)
    model.provenance, model.loaded_from = read_metadata(path), str(path.resolve())
    return Loaded(model.eval(), fmt, notes)


def load(path: Path | str, dtype: torch.dtype | None = torch.float32) -> EncoderDecoder:
    """The encoder-decoder model saved in `path` (any format `load_checkpoint` reads; `dtype` None: as stored)."""
    return load_checkpoint(path, dtype).model


def checkpoint_format(spec: str | Path) -> str | None:
    """"encdec", "t5gemma" or "t5gemma2" for an encoder-decoder checkpoint directory, else None (its
    config.json alone is read: no weights)."""
    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        return None
    data = read_json(config)
    if data.get("format") == NATIVE:
        return NATIVE
    return _layout_type(data)


def is_checkpoint(spec: str | Path) -> bool:
    """Whether `spec` is an encoder-decoder checkpoint directory (else it may be a decoder-only source)."""
    return checkpoint_format(spec) is not None


SAVED = ("an encoder-decoder checkpoint", is_checkpoint)  # what `save` replaces


def read_metadata(path: Path | str) -> dict:
    """The provenance saved with a model (empty when there is none)."""
    file = Path(path).expanduser() / METADATA
    return read_json(file) if file.exists() else {}
