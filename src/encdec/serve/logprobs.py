"""Log-probabilities in the OpenAI shapes: the completions API's parallel lists (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and the chat API's `content` entries (`token`, `logprob`, `bytes`,
`top_logprobs`).

A token's text is what it adds to the answer after the tokens before it (decoded with the last few of
them, so that a word's leading space or a merged character comes out as in the answer: the answer's
tokens' texts join into its text, up to a stop string). An alternative's text is what it would have
added there. A byte-fallback token (`<0xE2>`) has that byte in `bytes`; its text is empty while the
character it helps spell is incomplete, and the token with the character's last byte carries the whole
character (so offsets never go back and the texts still join). End-of-sequence tokens end the answer
and are not listed. Other special tokens (`<bos>`, `<start_of_turn>`) add nothing to the answer, whose text
leaves them out: chosen, their text is empty; as alternatives they are named (`<start_of_turn>`), since an
empty text would not say which token it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from encdec.inference.engine import Emitted

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
CONTEXT_TOKENS = 4  # tokens before a token that its text is decoded with (see `TokenLogprobs._context`)


@dataclass(frozen=True)
class Piece:
    text: str
    bytes: list[int]
    logprob: float


@dataclass(frozen=True)
class Entry:
    chosen: Piece
    top: list[Piece]
    offset: int  # where the token's text starts in the answer


class TokenLogprobs:
    """The log-probabilities of one answer's tokens as they arrive; `take` hands out those not yet sent."""

    def __init__(self, tokenizer: Any, kind: str, eos: frozenset[int]) -> None:
        self.tokenizer, self.kind, self.eos = tokenizer, kind, eos
        self.tokens: list[int] = []
        self.entries: list[Entry] = []
        self.sent = 0
        self.special: dict[int, bool] = {}  # token -> whether the answer's text leaves it out
        self.bytes: dict[int, int] = {}  # token -> the byte a byte-fallback token stands for, or -1

    def add(self, item: Emitted, offset: int) -> None:
        """`item` (a token and its scores) arrived; its text starts at `offset` of the answer (the settled text's
        length, `TextStream.settled`)."""
        if item.logprob is not None and item.token not in self.eos:
            tail = self._context(item.token)
            before = self._decode(tail)
            self.entries.append(Entry(self._piece(tail, before, item.token, item.logprob, chosen=True),
                                      [self._piece(tail, before, t, lp, chosen=False) for t, lp in item.top], offset))
        self.tokens.append(item.token)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)  # as the answer's text is (TextStream)

    def _context(self, token: int) -> list[int]:
        """The tokens before `token` that its text is decoded with. transformers decodes a run of byte tokens as a
        whole, and as one U+FFFD per byte unless the whole run is valid UTF-8, so a byte token's context holds no
        complete byte-spelled character: only the first bytes of the one it continues (none at a boundary). Another
        token's context never starts inside such a character."""
        if self._byte(token) < 0:
            start = max(0, len(self.tokens) - CONTEXT_TOKENS)
            while start > 0 and 0x80 <= self._byte(self.tokens[start]) < 0xC0:
                start -= 1
            return self.tokens[start:]
        start = len(self.tokens)
        while start > 0 and 0x80 <= self._byte(self.tokens[start - 1]) < 0xC0:  # continuation bytes
            start -= 1
        lead = self._byte(self.tokens[start - 1]) if start > 0 else -1
        if lead >= 0xC0 and len(self.tokens) - start + 1 < (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4):
            return self.tokens[start - 1 :]  # an unfinished character, which `token` continues
        return []

    def _byte(self, token: int) -> int:
        """The byte a byte-fallback token (`<0xE4>`) stands for; -1 for any other token."""
        if token not in self.bytes:
            byte = BYTE_TOKEN.fullmatch(self.tokenizer.convert_ids_to_tokens(token) or "")
            self.bytes[token] = int(byte.group(1), 16) if byte else -1
        return self.bytes[token]

    def _is_special(self, token: int) -> bool:
        if token not in self.special:
            self.special[token] = self._decode([token]) == "" and self.tokenizer.decode([token]) != ""
        return self.special[token]

    def _piece(self, tail: list[int], before: str, token: int, logprob: float, chosen: bool) -> Piece:
        if self._is_special(token):
            text = "" if chosen else self.tokenizer.decode([token])
            return Piece(text, list(text.encode("utf-8")), logprob)
        settled = before.rstrip("\ufffd")  # a character still being spelled by byte tokens is not text yet
        joined = self._decode([*tail, token]).rstrip("\ufffd")
        text = joined[len(settled):] if joined.startswith(settled) else self._decode([token])
        byte = self._byte(token)
        return Piece(text, [byte] if byte >= 0 else list(text.encode("utf-8")), logprob)

    def take(self) -> dict[str, Any] | None:
        """The entries since the last call, in the endpoint's shape (None when there are none)."""
        new, self.sent = self.entries[self.sent :], len(self.entries)
        return self.render(new) if new else None

    def render(self, entries: list[Entry] | None = None) -> dict[str, Any]:
        entries = self.entries if entries is None else entries
        if self.kind == "completions":
            return {"tokens": [e.chosen.text for e in entries], "token_logprobs": [e.chosen.logprob for e in entries],
                    "top_logprobs": [{p.text: p.logprob for p in e.top} for e in entries],
                    "text_offset": [e.offset for e in entries]}
        return {"content": [{**_chat(e.chosen), "top_logprobs": [_chat(p) for p in e.top]} for e in entries],
                "refusal": None}


def _chat(piece: Piece) -> dict[str, Any]:
    return {"token": piece.text, "logprob": piece.logprob, "bytes": piece.bytes}
