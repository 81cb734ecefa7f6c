"""Log-probabilities in the OpenAI shapes: the completions API's parallel lists (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and the chat API's `content` entries (`token`, `logprob`, `bytes`,
`top_logprobs`).

A token's text is what it adds to the answer (`encdec.serve.text.Detokenizer`, which decides the answer's
text token by token: the texts join into it, up to a stop string, after whose cut no token is listed); an
alternative's text is what it would have added there. A token that stands for bytes (`<0xE2>`, any token of a byte-level BPE vocabulary) has
them in `bytes`; its text is empty while the character it helps spell is unfinished, and the token with the
character's last byte carries the whole character (so offsets never go back). A character that the answer's end leaves unfinished adds its U+FFFDs
to the text after the last token. End-of-sequence tokens end the answer and are not listed. Other special
tokens (`<bos>`, `<start_of_turn>`) add nothing to the answer, whose text leaves them out: chosen, their
text is empty; as alternatives they are named (`<start_of_turn>`), since an empty text would not say which
token it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from encdec.inference.engine import Emitted
from encdec.serve.text import Detokenizer, utf8


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
        self.entries: list[Entry] = []
        self.sent = 0

    def add(self, item: Emitted, text: Detokenizer, offset: int) -> None:
        """`item` (a token and its scores) arrives after the tokens `text` has decoded; its text starts at `offset`
        of the answer."""
        if item.logprob is not None and item.token not in self.eos:
            top = list(item.top)
            if self.kind == "completions" and all(t != item.token for t, _ in top):  # up to logprobs + 1 entries,
                top.append((item.token, item.logprob))  # the sampled token among them, as OpenAI's API and vLLM give
            self.entries.append(Entry(self._piece(text, item.token, item.logprob, chosen=True),
                                      [self._piece(text, t, lp, chosen=False) for t, lp in top], offset))

    def _piece(self, text: Detokenizer, token: int, logprob: float, chosen: bool) -> Piece:
        if text.special(token):
            name = "" if chosen else self.tokenizer.decode([token])
            return Piece(name, list(name.encode("utf-8")), logprob)
        added, raw = text.text_of(token), text.raw_bytes(token)
        if raw is not None:  # the bytes it stands for (U+FFFDs of a character it breaks off are theirs)
            return Piece(added, list(raw), logprob)
        return Piece(added, list(added[len(utf8(text.unfinished, final=True)[0]):].encode("utf-8")), logprob)

    def stop_at(self, length: int) -> None:
        """A stop string cut the answer at `length` characters: tokens whose text starts at or after the cut are
        not the answer's (the one the cut runs through stays, its text whole)."""
        self.entries = [e for e in self.entries if e.offset < length]

    def take(self, sent: int | None) -> dict[str, Any] | None:
        """The entries since the last call whose text lies within the first `sent` characters of the answer (the
        text streamed so far: a token whose text is held back, as the start of a possible stop string, waits
        with it; one of no text waits for text after it, since a stop string cut there drops it, `stop_at`), or
        all of them (`sent` None, at the end), in the endpoint's shape (None when there are none)."""
        end = self.sent
        while end < len(self.entries) and (sent is None or (self.entries[end].offset < sent and self.entries[end].offset
                                                            + len(self.entries[end].chosen.text) <= sent)):
            end += 1
        new, self.sent = self.entries[self.sent : end], end
        return self.render(new) if new else None

    def render(self, entries: list[Entry] | None = None) -> dict[str, Any]:
        entries = self.entries if entries is None else entries
        if self.kind == "completions":
            return {"tokens": [e.chosen.text for e in entries], "token_logprobs": [e.chosen.logprob for e in entries],
                    "top_logprobs": [_by_text(e.top) for e in entries],
                    "text_offset": [e.offset for e in entries]}
        return {"content": [{**_chat(e.chosen), "top_logprobs": [_chat(p) for p in e.top]} for e in entries],
                "refusal": None}


def _chat(piece: Piece) -> dict[str, Any]:
    return {"token": piece.text, "logprob": piece.logprob, "bytes": piece.bytes}


def _by_text(top: list[Piece]) -> dict[str, float]:
    """The completions API's alternatives, keyed by text: of tokens with the same text (the bytes that begin a
    character, all ''), the likeliest's log-probability, as they come (best first)."""
    out: dict[str, float] = {}
    for piece in top:
        out.setdefault(piece.text, piece.logprob)
    return out
