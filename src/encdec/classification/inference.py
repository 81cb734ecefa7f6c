"""Predictions of a saved classifier for new texts (`encdec classify --predict DIR`)."""

from __future__ import annotations

import json
from pathlib import Path

from encdec.classification.classifier import load_classifier
from encdec.classification.train import encode, predict
from encdec.errors import EncdecError
from encdec.inference.loading import compute_device


def read_inputs(path: Path, field: str = "text") -> list[str]:
    """The texts of a JSON-lines file: one object per line with a "text" field."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EncdecError(f"cannot read {path} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise EncdecError(f"cannot read {path} (not UTF-8: byte {e.start}); expected JSON lines in UTF-8") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise EncdecError(f"{path}:{number}: expected a JSON object with a string field {field!r}")
        texts.append(record[field])
    return texts


def predict_texts(path: Path, texts: list[str], batch_size: int = 8) -> tuple[list[str], list[list[float]]]:
    """(label names, probabilities of each text) from the classifier saved in `path`."""
    from encdec.sources import load_tokenizer

    if not texts:
        raise EncdecError("nothing to predict: pass --text TEXT or --input FILE.jsonl")
    classifier, info = load_classifier(path)
    classifier.to(compute_device())
    tokenizer = load_tokenizer(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = encode(tokenizer, texts, info.max_len, info.first_token)
    return info.labels, predict(classifier, rows, pad_id=pad_id, batch_size=batch_size)
