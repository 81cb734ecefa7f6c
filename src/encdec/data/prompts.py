"""Prompts for batch generation (`encdec generate --input`), read and tokenized before any model is loaded.

A .jsonl file (or `-`, standard input) holds one record per line: {"prompt": TEXT} or {"messages": [...]}, a
conversation ending with a user's message, rendered in the model's chat format as `encdec serve` renders chat
requests. A record's other fields (an id, a reference answer) travel to its output line. A .txt file's
paragraphs (separated by blank lines, as `--data` reads text) are its prompts.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encdec.data.chat import ChatFormat
from encdec.data.instructions import ROLES, conversation, without_nulls
from encdec.data.text import check_text, json_lines, json_records, read_file
from encdec.data.tokens import text_ids
from encdec.errors import EncdecError
from encdec.files import expand_user

OUTPUT_FIELDS = ("completion", "finish_reason", "prompt_tokens", "completion_tokens")  # what an output line adds
SHAPES = ('{"prompt": "..."} or {"messages": [{"role": "' + "|".join(ROLES) + '", "content": "..."}, ...]} (the '
          'last message a user\'s); other fields are copied to the output, but for ' + ", ".join(OUTPUT_FIELDS))
STDIN = "-"


@dataclass(frozen=True)
class Prompt:
    """One prompt: the encoder's token ids, the record its output line starts from, and where it was read."""

    ids: list[int]
    record: dict[str, Any]
    source: str  # "file:line", or "file, prompt n" for the n-th paragraph of a text file


def _from_record(record: Any, chat: Callable[[], ChatFormat], tokenizer: Any) -> list[int]:
    """The token ids of a .jsonl record; ValueError (TypeError) with what was wrong."""
    if not isinstance(record, dict):
        raise TypeError(f"a record must be a JSON object, got {type(record).__name__}; accepted: {SHAPES}")
    record = without_nulls(record, ("prompt", "messages"))
    if ("prompt" in record) == ("messages" in record):
        raise ValueError(f"give either 'prompt' or 'messages'; accepted: {SHAPES}")
    taken = [name for name in OUTPUT_FIELDS if name in record]
    if taken:
        raise ValueError(f"the record has {', '.join(map(repr, taken))}, which its output line would replace; rename "
                         "the field (an output file given as input again?)")
    turns = None
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError(f"'prompt' must be a string, got {type(record['prompt']).__name__}")
        texts = [record["prompt"]]
    else:
        turns = conversation(record["messages"])
        if turns[-1][0] != "user":
            raise ValueError("the last message must be a user message: the model answers it")
        texts = [text for _, text in turns]
    return text_ids(tokenizer, texts[0]) if turns is None else chat().encode(turns)


ACCEPTED = ("a .jsonl file of " + SHAPES + ", a .txt file of prompts separated by blank lines, or - for .jsonl "
            "records on standard input")


def read_prompts(spec: str, tokenizer: Any) -> list[Prompt]:
    """Every prompt of `spec` (a file, or `-` for .jsonl records on standard input), in order."""
    path = Path(spec if spec == STDIN else expand_user(spec))
    suffix = path.suffix.lower()
    if spec != STDIN and (not path.is_file() or suffix not in (".jsonl", ".txt")):
        problem = "no such file" if not path.exists() else "not a file" if not path.is_file() else "unsupported type"
        raise EncdecError(f"--input {spec}: {problem}; expected {ACCEPTED}")
    if spec == STDIN and sys.stdin is None:
        raise EncdecError("--input -: standard input is closed; give a file or pipe .jsonl records in")
    if spec == STDIN or suffix == ".jsonl":
        # read for the first record of messages: plain prompts need no chat template (a broken one failed them)
        chat, name = functools.cache(lambda: ChatFormat.of(tokenizer)), "standard input" if spec == STDIN else str(path)
        prompts = []
        records = json_records(sys.stdin.buffer, name, strict=True) if spec == STDIN else json_lines(path, strict=True)
        for number, record in records:
            try:  # the record is written back with the completion, in UTF-8: refused now, not after generating
                json.dumps(record, allow_nan=False, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise EncdecError(f"{name}, line {number}: a string holds a \\uD800-\\uDFFF escape that is not half "
                                  "of a pair: not a character, so no tokenizer can read it nor UTF-8 write it back"
                                  ) from None
            except ValueError:
                raise EncdecError(f"{name}, line {number}: a number too large for a float (read as infinity, which "
                                  "JSON has no number for)") from None
            try:
                prompts.append(Prompt(_from_record(record, chat, tokenizer), record, f"{name}:{number}"))
            except (ValueError, TypeError) as e:
                raise EncdecError(f"{name}, line {number}: {e}") from None
    else:
        prompts = [Prompt(text_ids(tokenizer, text), {"prompt": text}, f"{path}, prompt {n}")
                   for n, text in enumerate(read_file(path), 1)]
    if not prompts:
        raise EncdecError(f"--input {spec}: no prompts in it; expected {ACCEPTED}")
    return checked(prompts)


def texts_as_prompts(texts: list[str], tokenizer: Any) -> list[Prompt]:
    """Prompts given on the command line (`--prompt TEXT`)."""
    return checked([Prompt(text_ids(tokenizer, check_text(text, f"--prompt {n}")), {"prompt": text}, f"--prompt {n}")
                    for n, text in enumerate(texts, 1)])


def checked(prompts: list[Prompt]) -> list[Prompt]:
    """`prompts`, refused when one has no tokens: an empty text, from a tokenizer that puts no BOS first (Qwen's)."""
    empty = next((p for p in prompts if not p.ids), None)
    if empty is not None:
        raise EncdecError(f"{empty.source}: the prompt has no tokens; a prompt needs at least one")
    return prompts
