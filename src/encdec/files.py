"""Reading safetensors checkpoints and writing output directories atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from encdec.errors import EncdecError

SHARD_BYTES = 4 * 1024**3


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EncdecError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EncdecError(f"{path} is not valid JSON ({e})") from None


def read_weights(directory: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, or the shards its index lists."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted({directory / f for f in read_json(index).get("weight_map", {}).values()})
        if not files:
            raise EncdecError(f"{index} lists no weight files")
    elif (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    else:
        found = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pth")]
        extra = f" (found {', '.join(found)}: only safetensors weights are read)" if found else ""
        raise EncdecError(f"{directory} has no model.safetensors or model.safetensors.index.json{extra}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.exists():
            raise EncdecError(f"weight shard {file} is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    weights[name] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise EncdecError(f"{file} is not a readable safetensors file, truncated or corrupt? ({e})") from None
    return weights


def write_native(directory: Path, meta: dict, weights: dict[str, torch.Tensor]) -> None:
    """The project's own formats: `meta` (format name, version, configuration) as config.json, then the weights."""
    (directory / "config.json").write_text(json.dumps(meta, indent=2))
    write_weights(directory, weights)


def write_weights(directory: Path, weights: dict[str, torch.Tensor]) -> None:
    """Write model.safetensors, or shards of at most SHARD_BYTES with the standard index."""
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work when the output would clobber something."""
    if out.exists() and not out.is_dir():
        raise EncdecError(f"output path {out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise EncdecError(f"output directory {out} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `out` only once everything was written.

    On any error the temporary directory is removed and an existing `out` is left untouched.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False,
                                     encoding="utf-8") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def portable_path(spec: str) -> str:
    """A model or data specification as it can be found again later: local paths made absolute, names kept."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec
