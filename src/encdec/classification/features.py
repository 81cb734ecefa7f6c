"""Pooled final hidden states of a frozen backbone, computed once per (checkpoint, task, split, pooling, max_len).

A linear probe reads each example's features many times (every regularisation strength, every fold)
and many probes read the same backbone, so they are kept on disk under the project's cache root: one
safetensors file per key holding the split indices computed so far and their features. A later run
computes only the indices it lacks. The key covers the checkpoint's files (path, size, modification
time), the texts of the whole split and the settings, so a changed model or task never reads stale
features. Files are replaced through a rename: a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from encdec.classification.backbone import Backbone
from encdec.classification.classifier import pool
from encdec.classification.train import batches_by_length
from encdec.errors import EncdecError
from encdec.files import file_identity, write_cache
from encdec.inference.onednn import packed_while_inferring

CACHE_VERSION = 1


@torch.inference_mode()
def pooled_features(backbone: Backbone, rows: list[list[int]], *, pad_id: int, pooling: str,
                    batch_size: int) -> np.ndarray:
    """[len(rows), hidden] float32: the pooled final hidden states of each row, in the order given."""
    backbone.eval()
    out = np.zeros((len(rows), backbone.hidden_size), dtype=np.float32)
    with packed_while_inferring(backbone):
        for chosen, ids, mask in batches_by_length(rows, batch_size, pad_id, "features", backbone.embed.weight.device):
            out[chosen] = pool(backbone(ids, mask), mask, pooling).float().cpu().numpy()
    bad = int((~np.isfinite(out).all(1)).sum())
    if bad:  # raised before the cache keeps them (every rerun would fail alike): scikit-learn's traceback otherwise
        raise EncdecError(f"the model's final states hold NaN or inf for {bad} of {len(rows)} examples: its weights "
                          "or its outputs are not finite (a diverged run?); probe another checkpoint")
    return out


def model_fingerprint(spec: str) -> list:
    """What identifies MODEL's weights without reading them: every file's `file_identity`, without its change time
    (a chmod -R, a hard-linked backup: the weights are the same, and a study's finished cells were refused as
    "run on other weights")."""
    from encdec.sources import resolve

    path = Path(spec).expanduser()
    root = path if path.exists() else resolve(spec)  # a packaged or Hub name: the directory it was converted to
    files = sorted(root.rglob("*")) if root.is_dir() else [root]
    return [str(root.resolve())] + [[str(f.relative_to(root)) if root.is_dir() else f.name,
                                     file_identity(f, change_time=False)] for f in files if f.is_file()]


def cache_key(model: str, task: str, split: str, texts: list[str], pooling: str, max_len: int,
              first: int | None) -> str:
    """The file name of one (checkpoint, task, split, pooling, max_len, first input token) feature set."""
    texts_hash = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    described = {"version": CACHE_VERSION, "model": model_fingerprint(model), "task": task, "split": split,
                 "texts": texts_hash, "pooling": pooling, "max_len": max_len, "first": first}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _read(file: Path, width: int) -> dict[int, np.ndarray]:
    """The stored features by example index; none where the file is absent, unreadable or not what `_write` writes
    for a model of this `width` (computed again and rewritten: a file of other tensors under the name was a
    KeyError's traceback, one of another width an error of numpy's when stacked with the computed ones)."""
    try:
        stored = load_file(str(file))
    except (OSError, SafetensorError):
        return {}
    indices, features = stored.get("indices"), stored.get("features")
    if (indices is None or features is None or indices.ndim != 1 or features.ndim != 2
            or len(indices) != len(features) or features.shape[1] != width):
        log.warning("%s does not hold features as encdec stores them; they are computed again", file)
        return {}
    return dict(zip(indices.tolist(), features))


def _write(file: Path, known: dict[int, np.ndarray]) -> bool:
    """Store the features (whether it worked: a cache that cannot be written is a warning)."""
    indices = sorted(known)
    tensors = {"indices": np.asarray(indices, dtype=np.int64), "features": np.stack([known[i] for i in indices])}
    return write_cache(file, lambda tmp: save_file(tensors, str(tmp)), "the features", "they are computed again next time")


log = logging.getLogger("encdec")
CHUNK = 512  # examples computed between two writes of the cache


def cached_features(key: str, indices: list[int], compute: Callable[[list[int]], np.ndarray], width: int) -> np.ndarray:
    """Features (`width` wide) of the split's examples `indices` (in that order): the stored ones, plus
    `compute(missing)` for the others, stored every CHUNK examples so that an interrupted run keeps what it computed."""
    from encdec.sources import cache_root

    file = cache_root() / "features" / f"{key}.safetensors"
    known = _read(file, width)
    missing = sorted({i for i in indices if i not in known})
    writable = True
    for start in range(0, len(missing), CHUNK):
        part = missing[start : start + CHUNK]
        known.update(zip(part, compute(part)))
        writable = writable and _write(file, known)  # after a failed write, the rest is computed without a cache
    return np.stack([known[i] for i in indices]) if indices else np.zeros((0, width), dtype=np.float32)
