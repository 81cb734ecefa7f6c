"""Nested training state (optimizer, scheduler, data position, RNG states) as JSON plus safetensors.

A run directory may come from someone else; loading its state must never run code, so nothing here
is pickled: tensors and numpy arrays go to NAME.safetensors, everything else is plain JSON in
NAME.json, with tuples and non-string dictionary keys spelled out so that the state comes back
exactly as it was saved (resumed runs repeat the uninterrupted one bit for bit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from encdec.errors import EncdecError, ReadFailed
from encdec.files import open_regular, parse_json, read_small, save_tensors

FORMAT = "encdec-train-state"
VERSION = 1
_TAGS = ("$tensor", "$ndarray", "$tuple", "$items")
MAX_DEPTH = 64  # optimizer and RNG states nest a few levels; a deeper file is not one of ours (and would recurse)


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"$ndarray": key}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"$items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"training state holds a {type(obj).__name__}, which plain_state cannot store")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels, more than any training state this package writes")
    if isinstance(obj, list):
        return [_decode(v, tensors, depth + 1) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag in ("$tensor", "$ndarray"):  # each taken once: two parameters' optimizer moments were one tensor
            if not isinstance(value, str) or value not in tensors:
                raise ValueError(f"tensor {value!r} is not in the file, or is named twice")
            taken = tensors.pop(value)
            return taken if tag == "$tensor" else taken.numpy()
        if tag == "$tuple":
            return tuple(_decode(v, tensors, depth + 1) for v in value)
        if tag == "$items":
            return {_decode(k, tensors, depth + 1): _decode(v, tensors, depth + 1) for k, v in value}
    return {k: _decode(v, tensors, depth + 1) for k, v in obj.items()}


def write_state(directory: Path, name: str, state: Any) -> None:
    """NAME.json and NAME.safetensors in `directory` (a temporary directory that is renamed afterwards)."""
    tensors: dict[str, torch.Tensor] = {}
    body = _encode(state, tensors)
    save_tensors(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, "state": body}))


def read_state(directory: Path, name: str) -> Any:
    """The state `write_state` wrote; EncdecError naming the file when a file is missing, damaged or foreign."""
    meta_file, tensor_file = directory / f"{name}.json", directory / f"{name}.safetensors"
    try:
        meta = parse_json(read_small(meta_file))
    except FileNotFoundError:
        raise EncdecError(f"{meta_file} is missing") from None
    except OSError as e:
        raise ReadFailed(f"cannot read {meta_file}: {e.strerror or e}") from None
    except ValueError as e:  # bad JSON or bad UTF-8, or nested too deeply to read
        raise EncdecError(f"{meta_file} is unreadable, truncated or corrupt? ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise EncdecError(f"{meta_file} is not an {FORMAT} file of version {VERSION}")
    try:  # opened here first: safetensors' own open waits for a pipe's writer for ever, and says "missing" of a
        open_regular(tensor_file).close()  # file it may not read (set aside as damaged, where it is only unreadable)
    except FileNotFoundError:
        raise EncdecError(f"{tensor_file} is missing") from None
    except OSError as e:
        raise ReadFailed(f"cannot read {tensor_file}: {e.strerror or e}") from None
    try:
        with safe_open(str(tensor_file), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise EncdecError(f"{tensor_file} is missing") from None
    except (SafetensorError, OSError, RuntimeError) as e:
        raise EncdecError(f"{tensor_file} is unreadable, truncated or corrupt? ({e})") from None
    try:
        return _decode(meta["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise EncdecError(f"{meta_file} does not match {tensor_file.name} ({type(e).__name__}: {e})") from None
