"""Held-out English passages that every Python installation carries: prose paragraphs of the
language reference in the standard library's `pydoc_data.topics` (grammar rules and code removed).

They are used for quick NLL checks only and are never training data.
"""

from __future__ import annotations

import re

TOPICS = ("if", "while", "for", "try", "with", "function", "class", "import", "assignment", "exceptions", "naming", "types")


def _prose(text: str) -> str:
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith(" ") for line in lines) or re.fullmatch(r"[*=\-]+", lines[-1].strip()):
            continue  # indented code or grammar, or a heading underline
        if "::=" in block or len(block) < 120:
            continue
        paragraphs.append(" ".join(line.strip() for line in lines))
    return " ".join(paragraphs)


def heldout_passages(count: int = 8) -> list[str]:
    """Up to `count` passages of plain English prose, one per language-reference topic."""
    from pydoc_data.topics import topics

    passages = [_prose(topics[name]) for name in TOPICS if name in topics]
    return [p for p in passages if len(p) > 600][:count]
