"""Predictions of a saved classifier for new texts (`encdec classify --predict DIR`)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from encdec.classification.classifier import load_classifier
from encdec.classification.train import encode, padding_id, predict
from encdec.data.text import check_text, json_lines, lone_surrogate
from encdec.errors import EncdecError
from encdec.inference.loading import compute_device

log = logging.getLogger("encdec")


def read_inputs(path: Path, field: str = "text") -> list[str]:
    """The texts of a JSON-lines file: one object per line with a "text" field."""
    texts = []
    for number, record in json_lines(path, strict=True, pipe=True):  # (--input <(jq -c ...): a pipe)
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise EncdecError(f"{path}, line {number}: expected a JSON object with a string field {field!r}")
        if lone_surrogate(record[field]):
            raise EncdecError(f"{path}, line {number}: {field!r} holds a \\uD800-\\uDFFF escape that is not half "
                              "of a pair: not a character, so no tokenizer can read it")
        texts.append(record[field])
    if not texts:
        raise EncdecError(f"{path} holds no records; expected one JSON object per line with a string field {field!r}")
    return texts


def laid_out_as(text: str, template: str) -> bool:
    """Whether `text` holds the fixed parts of a task's input template ("{premise}\nHypothesis: {hypothesis}"
    needs "Hypothesis:"; COPA's "A|B" either question) in their order."""
    at = 0
    for piece in re.split(r"\{\w+\}", template):
        choices = [c.strip() for c in piece.split("|") if c.strip()] if piece.strip() else []
        if not choices:
            continue
        found = [text.find(c, at) for c in choices if text.find(c, at) >= 0]
        if not found:
            return False
        at = min(found) + 1
    return True


def predict_texts(path: Path, texts: list[str], batch_size: int = 8) -> tuple[list[str], list[list[float]]]:
    """(label names, probabilities of each text) from the classifier saved in `path`."""
    from encdec.sources import load_tokenizer

    if not texts:
        raise EncdecError("nothing to predict: pass --text TEXT or --input FILE.jsonl")
    for n, text in enumerate(texts, 1):
        check_text(text, f"input #{n}")
    classifier, info = load_classifier(path)
    limit = classifier.backbone.spec.stack.max_positions
    if limit is not None and info.max_len > limit:  # a hand-edited classifier.json
        raise EncdecError(f"{path}: its max_len {info.max_len} is more than the {limit} positions its backbone reads")
    unlike = [i for i, text in enumerate(texts) if not laid_out_as(text, info.template)]
    if unlike:  # read as given all the same: a user may know better; but plain text gets a plain guess
        log.warning("%d of %d input(s) (the first: #%d) are not laid out as this classifier's training texts were, "
                    "%s (each {field} stands for a text; in COPA's, | separates the two questions): they are "
                    "classified as given", len(unlike), len(texts), unlike[0] + 1, json.dumps(info.template))
    classifier.to(compute_device())
    tokenizer = load_tokenizer(path)
    vocab = classifier.backbone.embed.num_embeddings
    rows = encode(tokenizer, texts, info.max_len, info.first_token, vocab)
    return info.labels, predict(classifier, rows, pad_id=padding_id(tokenizer, vocab), batch_size=batch_size)
