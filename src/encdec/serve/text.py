"""Generated tokens turned into text as they arrive: whole characters only, and cut at stop strings.

A character that byte-fallback tokens spell (Gemma writes rare characters as 2-4 `<0xNN>` tokens) decodes
as one U+FFFD per byte until its last byte arrives, when the text gets shorter again: every trailing
U+FFFD is held back, so that what was sent is always the beginning of the final text. A streamed piece
never contains text that a stop string could still claim either: the tail of the text that is the
beginning of some stop string is held back until the next token settles it.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text that can be sent after `token`; sets `stopped` when a stop string appeared."""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._send(len(self.text))
        end = self.settled
        held = max((n for s in self.stop for n in range(1, len(s)) if self.text[:end].endswith(s[:n])), default=0)
        return self._send(end - held)

    @property
    def settled(self) -> int:
        """The length of the text that later tokens cannot change: all but a character still being spelled."""
        return len(self.text.rstrip("\ufffd"))

    def finish(self) -> str:
        """What is left to send once generation ended without a stop string."""
        return self._send(len(self.text))

    def _send(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece
