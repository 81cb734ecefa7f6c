"""A linear head on the pooled final hidden states of a backbone, and its save / load.

A saved classifier is self-contained: classifier.json (task, label names, input template, pooling,
max_len, where it came from, the backbone description), model.safetensors (backbone and head) and
the tokenizer, so `encdec classify --predict DIR` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from encdec.checkpoint import check_format_version
from encdec.classification.backbone import Backbone, BackboneSpec
from encdec.errors import EncdecError, load_failure
from encdec.files import atomic_dir, read_json, read_weights, reading_config, write_weights

POOLINGS = ("last", "mean")
FORMAT = "encdec-classifier"
FORMAT_VERSION = 2  # 2: first_token recorded (version 1 put the tokenizer's bos_token_id first)
INFO_FILE = "classifier.json"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, L, d] -> [B, d]: the last non-padding token of right-padded rows, or the mean over real tokens."""
    if pooling == "last":
        last = attention_mask.long().sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1)


class Classifier(nn.Module):
    """Backbone + pooling + a linear head; the head starts at zero (uniform predictions), so that the
    first steps do not push the backbone around with a random projection's gradients."""

    def __init__(self, backbone: Backbone, num_labels: int, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise EncdecError(f"unknown pooling {pooling!r}; accepted: {', '.join(POOLINGS)}")
        self.backbone, self.pooling = backbone, pooling
        self.head = nn.Linear(backbone.hidden_size, num_labels, device=backbone.embed.weight.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] in float32."""
        pooled = pool(self.backbone(input_ids, attention_mask), attention_mask, self.pooling)
        return self.head(pooled.to(self.head.weight.dtype)).float()


@dataclass
class ClassifierInfo:
    """What a saved classifier is for and how it reads its inputs."""

    task: str
    labels: list[str]
    template: str  # the layout of an input text, as it was trained
    pooling: str
    max_len: int  # inputs are cut to this many tokens, from the left (the end of a text is kept)
    source: str  # the MODEL it was fine-tuned from
    first_token: int | None  # put before every input, as the backbone's tokenizer begins a text (None: nothing)

    def __post_init__(self) -> None:  # a hand-edited or handed classifier.json must not predict silently wrong
        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        checks = {  # field: (whether it holds, what is accepted)
            "labels": (isinstance(self.labels, list) and len(self.labels) >= 2
                       and all(isinstance(x, str) for x in self.labels), "a list of at least 2 strings"),
            "template": (isinstance(self.template, str), "a string"),
            "pooling": (self.pooling in POOLINGS, " or ".join(POOLINGS)),
            "max_len": (integer(self.max_len) and self.max_len >= 2, "an integer of at least 2 (BOS and one token)"),
            "first_token": (self.first_token is None or integer(self.first_token) and self.first_token >= 0,
                            "null or a token id"),
        }
        for name, (ok, accepted) in checks.items():
            if not ok:
                raise EncdecError(f"{name} must be {accepted}, got {json.dumps(getattr(self, name))[:40]}")


def save_classifier(classifier: Classifier, info: ClassifierInfo, out: Path, *, tokenizer_dir: Path,
                    overwrite: bool = False) -> None:
    """Write backbone, head, description and tokenizer to `out`, atomically."""
    from encdec.sources import load_tokenizer

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(info), "backbone": classifier.backbone.spec.to_dict()}
    with atomic_dir(Path(out), overwrite, replaces=(INFO_FILE,)) as tmp:
        (tmp / INFO_FILE).write_text(json.dumps(meta, indent=2))
        write_weights(tmp, classifier.state_dict())
        load_tokenizer(tokenizer_dir).save_pretrained(str(tmp))


def load_classifier(path: Path | str, dtype: torch.dtype = torch.float32) -> tuple[Classifier, ClassifierInfo]:
    """A classifier saved by `save_classifier`."""
    path = Path(path)
    file = path / INFO_FILE
    if not file.is_file():
        raise EncdecError(f"{path} is not a saved classifier (no {INFO_FILE}); `encdec classify ... --out DIR` "
                          "saves one in DIR/classifier")
    meta = read_json(file)
    if meta.get("format") != FORMAT:
        raise EncdecError(f"{file} is not a classifier description (format {meta.get('format')!r}, expected {FORMAT!r})")
    check_format_version(meta, FORMAT_VERSION, file)
    if meta.get("format_version") == 1:  # trained with the tokenizer's named BOS first, whatever the tokenizer does
        from encdec.sources import load_tokenizer

        meta["first_token"] = load_tokenizer(path).bos_token_id
    try:
        info = ClassifierInfo(**{k: meta[k] for k in ClassifierInfo.__dataclass_fields__})
        spec = BackboneSpec.from_dict(meta["backbone"])
    except KeyError as e:
        raise EncdecError(f"{file} lacks {e}") from None
    except EncdecError as e:
        raise EncdecError(f"{file}: {e}") from None
    if info.first_token is not None and info.first_token >= spec.vocab_size:  # (blamed on the input texts otherwise)
        raise EncdecError(f"{file}: first_token {info.first_token} is outside the backbone's vocabulary (0 to "
                          f"{spec.vocab_size - 1})")
    with reading_config(file), torch.device("meta"):
        classifier = Classifier(Backbone(spec), len(info.labels), info.pooling)
    try:
        classifier.load_state_dict(read_weights(path, dtype), strict=True, assign=True)
    except RuntimeError as e:
        raise EncdecError(f"{path}: weights do not match {INFO_FILE} ({load_failure(e)})") from None
    return classifier.eval(), info
