"""Instruction data for fine-tuning: prompt/response pairs from .jsonl files, Gemma's chat format, and
the encoder-decoder examples made from them.

The encoder reads the conversation before the response in the model's chat format (Gemma's turns, or
the tokenizer's own template), ending with an open answer; the decoder writes the response, closed by
the format's end-of-turn text and EOS. A `Pair` keeps the conversation as (role, text) turns, so every
source (files, Natural Instructions) reaches `chat_example` in the same shape, and a message's text is
never re-read as turn markers.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encdec.data.text import data_files, distinct_files, json_lines, lone_surrogate
from encdec.errors import EncdecError
from encdec.files import open_regular
from encdec.objectives import Example

if TYPE_CHECKING:
    from encdec.data.chat import ChatFormat

START, END = "<start_of_turn>", "<end_of_turn>"
# OpenAI's "developer" is its newer name for the system message
ROLES = {"user": "user", "assistant": "model", "model": "model", "system": "system", "developer": "system"}
SHAPES = ('{"prompt": "...", "response": "..."} or {"messages": [{"role": "' + "|".join(ROLES) + '", '
          '"content": "..."}, ...]}')


Turns = tuple[tuple[str, str], ...]  # (role, text), role "user" or "model"


@dataclass(frozen=True)
class Pair:
    """One instruction example: the conversation `turns` before the response (the last one a user's), the
    plain `response` text, and where it came from ("file:line", or "natural_instructions/<subtask>#<index>")."""

    turns: Turns
    response: str
    source: str


def chat_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """A conversation of (role, text) turns, role "user" or "model", as Gemma's chat template writes it,
    followed by an open model turn: the text the encoder reads before the decoder answers.

    Texts are trimmed, as Gemma's own template does.
    """
    parts = []
    for role, text in turns:
        if role not in ("user", "model"):
            raise ValueError(f"Gemma's chat format has the roles 'user' and 'model', got {role!r}")
        parts.append(f"{START}{role}\n{text.strip()}{END}\n")
    return "".join(parts) + f"{START}model\n"


def conversation(messages: Any) -> list[tuple[str, str]]:
    """The (role, text) turns, role "user", "model" or "system", of OpenAI-style messages (a content given as text
    parts joined by newlines, as vLLM joins them). Where system messages
    may stand is the chat format's to say (`encdec.data.chat.ChatFormat`): a template with the role renders them
    as it does, Gemma's format (no such role) reads one first system message in the first user turn
    (`system_folded`). Raises ValueError with the reason."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # OpenAI's content parts (the server's requests, logged ones given again)
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"message {i}: content parts must be {{\"type\": \"text\", \"text\": ...}}; "
                                 "this model reads text only")
            message = {**message, "content": "\n".join(p["text"] for p in content)}  # as vLLM joins them
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} is not an object with a string 'content' (or a list of text parts)")
        role = ROLES.get(message["role"]) if isinstance(message.get("role"), str) else None
        if role is None:
            raise ValueError(f"message {i} has the unknown role {repr(message.get('role'))[:40]}; "
                             f"accepted: {', '.join(ROLES)}")
        turns.append((role, message["content"]))
    _check_names(messages)
    return turns


def _check_names(messages: list) -> None:
    """Messages' `name`s are ignored (the chat turns name no speakers; frameworks send one by habit), unless they
    tell participants of one role apart, which the model would not see (nor learn, merged in training)."""
    names: dict[str, set] = {}
    for m in messages:
        if m.get("name") not in (None, ""):
            names.setdefault(m["role"], set()).add(json.dumps(m["name"]))
    several = next((role for role, seen in names.items() if len(seen) > 1), None)
    if several is not None:
        raise ValueError(f"messages of role {json.dumps(several)[:40]} name several participants ('name'), which "
                         "this model's chat turns cannot tell apart: put who speaks in the content")


def system_folded(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """`turns` without a "system" turn, for a format without the role (Gemma's): a first system turn's text
    prepended to the first user turn. Raises ValueError where that cannot be (a later system turn, or a first one
    that no user turn follows)."""
    late = next((i for i, (role, _) in enumerate(turns) if role == "system" and i > 0), None)
    if late is not None:
        raise ValueError(f"message {late} is a system message; this chat format has no system role, so one is "
                         "accepted only as the first message (it opens the first user turn)")
    if not turns or turns[0][0] != "system":
        return list(turns)
    if len(turns) < 2 or turns[1][0] != "user":
        raise ValueError("a system message must be followed by a user message (this chat format has no system "
                         "role: it is prepended to the first user turn)")
    (_, system), (role, first), *rest = turns
    return [(role, "\n\n".join(text for text in (system.strip(), first.strip()) if text)), *rest]


def _turns(messages: Any) -> tuple[Turns, str]:
    """The prompt turns and the response of a "messages" record; raises ValueError with the reason."""
    turns = conversation(messages)
    if turns[-1][0] != "model":
        raise ValueError("the last message must be the assistant (or model) turn to learn as the response")
    *turns, (_, response) = turns
    if not turns or turns[-1][0] != "user":  # two model turns in a row: the prompt would end in an answer, a shape
        # the server and `encdec generate` never give the model (they answer a user message)
        raise ValueError("the message before the response must be a user message: the response answers it")
    return tuple(turns), response


def _pair(record: Any, source: str) -> Pair:
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}; accepted: {SHAPES}")
    record = without_nulls(record, ("messages", "prompt", "response"))
    if "messages" in record:
        if "prompt" in record or "response" in record:
            raise ValueError(f"both 'messages' and 'prompt'/'response': give one of the two; accepted: {SHAPES}")
        turns, response = _turns(record["messages"])
    else:
        missing = [f for f in ("prompt", "response") if f not in record]
        if missing:
            raise ValueError(f"missing {' and '.join(map(repr, missing))}; accepted: {SHAPES}")
        for field in ("prompt", "response"):
            if not isinstance(record[field], str):
                raise ValueError(f"field {field!r} must be a string, got {type(record[field]).__name__}")
        turns, response = (("user", record["prompt"]),), record["response"]
    if not response.strip():
        raise ValueError("the response is empty")
    if any(lone_surrogate(text) for _, text in turns) or lone_surrogate(response):
        raise ValueError("a text holds a \\uD800-\\uDFFF escape that is not half of a pair: not a character, so no "
                         "tokenizer can read it")
    return Pair(turns=turns, response=response.strip(), source=source)


def without_nulls(record: dict, fields: tuple[str, ...]) -> dict:
    """`record` without those of `fields` that are null: absent, as a parquet export of a dataset mixing both record
    shapes writes the other shape's columns (a messages record with "prompt": null was refused as holding both)."""
    return {k: v for k, v in record.items() if not (v is None and k in fields)}


def _jsonl_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = data_files(path, (".jsonl",))
        if not files:
            raise EncdecError(f"{path}: no .jsonl files in this directory")
        return files
    if not path.exists():
        raise EncdecError(f"{spec}: no such file or directory; expected a .jsonl file of {SHAPES}, or a directory of them")
    if path.suffix.lower() != ".jsonl":
        raise EncdecError(f"{path}: unsupported file type {path.suffix!r}; expected a .jsonl file or a directory of them")
    return [path]


def check_instruction_files(specs: Sequence[str]) -> None:
    """The .jsonl files of `specs`, each a regular file that can be opened, checked before a model loads."""
    for spec in specs:
        for path in _jsonl_files(spec):
            try:
                open_regular(path).close()
            except OSError as e:
                raise EncdecError(f"cannot read {path} ({e.strerror or e})") from None


def _read_file(path: Path) -> list[Pair]:
    pairs = []
    for number, record in json_lines(path):
        try:
            pairs.append(_pair(record, f"{path}:{number}"))
        except ValueError as e:
            raise EncdecError(f"{path}, line {number}: {e}") from None
    if not pairs:
        raise EncdecError(f"{path}: empty, no records in it; expected one JSON object per line: {SHAPES}")
    return pairs


def read_instructions(paths: list[str]) -> list[Pair]:
    """All pairs of the given .jsonl files and directories (their .jsonl files, sorted), in file order."""
    if not paths:
        raise EncdecError(f"no instruction data given; expected .jsonl files of {SHAPES}")
    seen: set[Path] = set()
    return [pair for spec in paths for path in distinct_files(_jsonl_files(spec), seen) for pair in _read_file(path)]


def answer_end(tokenizer: Any, chat: ChatFormat, eos_id: int, max_input: int, max_target: int) -> list[int]:
    """The ids closing every answer of `chat` (its end-of-turn text, then EOS unless that text ends with it), once
    --enc-len (`max_input`) and --dec-len (`max_target`) are known to hold BOS and them besides a token."""
    end = tokenizer(chat.end, add_special_tokens=False)["input_ids"]
    end += [] if end[-1:] == [eos_id] else [eos_id]  # SmolLM2's and Qwen's <|im_end|> is their EOS: once, not twice
    if max_input < 2 or max_target < len(end) + 1:
        kept = f"BOS, {chat.end} and EOS" if chat.end else "BOS and EOS"
        raise EncdecError(f"--enc-len must be at least 2 and --dec-len at least {len(end) + 1} "
                          f"(to keep {kept}), got {max_input} and {max_target}")
    return end


def chat_example(pair: Pair, tokenizer: Any, *, eos_id: int, max_input: int, max_target: int,
                 chat: ChatFormat | None = None, cut: Counter | None = None) -> Example:
    """Token ids for the encoder (BOS, where the tokenizer puts one before every text, + the rendered turns)
    and the decoder targets (response + the end-of-turn text, "<end_of_turn>" in Gemma's format, + EOS unless
    that text ends with it), cut
    to `max_input` / `max_target` tokens. `chat`: the tokenizer's chat format (`ChatFormat.of(tokenizer)`,
    computed once per run by the caller). `cut`: counts "prompt" and "response" where either was cut.

    Long prompts lose their beginning (the question and the open model turn are at the end), long
    responses their end; BOS stays first and the end-of-turn text + EOS stay last, since fine-tuning
    without a final EOS teaches the model never to stop.
    """
    from encdec.data.chat import ChatFormat, ConversationRefused

    chat = chat or ChatFormat.of(tokenizer)
    bos = [] if chat.bos is None else [chat.bos]
    end = answer_end(tokenizer, chat, eos_id, max_input, max_target)
    try:
        prompt = chat.encode(list(pair.turns))[len(bos):]  # a message's text never reads as control tokens
        chat.check_message("model", pair.response)  # (read as the marker, it would teach the model to write it)
    except ConversationRefused as e:
        raise EncdecError(f"{pair.source}: {e}") from None
    # an answer that spells a control token ("<end_of_turn>" in a text about chat formats) spells it in text, as
    # its prompt does: read as the marker, it would teach the model to end its turn there
    response = tokenizer(pair.response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if cut is not None:
        cut.update(["prompt"] * (len(bos) + len(prompt) > max_input)
                   + ["response"] * (len(response) + len(end) > max_target))
    return Example(inputs=bos + prompt[max(0, len(prompt) - (max_input - len(bos))):],
                   targets=response[: max_target - len(end)] + end)
