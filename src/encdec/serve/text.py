"""Generated tokens turned into text as they arrive: each token's text decided once, whole characters only,
and cut at stop strings.

Decoding the whole answer again after every token is not prefix-stable: transformers decodes a run of
byte-fallback tokens (Gemma spells rare characters as 2-4 `<0xNN>` tokens) as a whole, as one U+FFFD per
byte unless all of it is valid UTF-8, so a stray byte after a spelled character turned the character,
already streamed, into U+FFFDs. Here each token adds text after what is there and never changes it. Tokens
that stand for bytes (byte-fallback tokens; every token of a byte-level BPE vocabulary, SmolLM2's and
Qwen's) go through an incremental UTF-8 decoder: a character's bytes add nothing until its last one
arrives, and bytes that cannot finish one add U+FFFDs (one per maximal invalid sequence, as Python and
Rust write them). Other tokens (SentencePiece pieces, whole characters) are decoded after the few tokens
that add text before them, for a word's leading space. Wherever the tokens spell valid UTF-8 the text
equals transformers' decoding of the whole answer (tested on the real Gemma, SmolLM2 and Qwen tokenizers),
but for a tokenizer that cleans up tokenization spaces (`clean_up_tokenization_spaces`, which rewrites
text before a token: " ' " becomes "'"; none of the supported families does), decoded here without it.

A streamed piece never holds text that a stop string could still claim either: the tail of the text that
is the beginning of some stop string is held back until the next token settles it.
"""

from __future__ import annotations

import codecs
import re
from functools import cache
from typing import Any

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
CONTEXT_TOKENS = 4  # tokens before a token that it is decoded with, for a leading space


@cache
def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (the GPT-2 convention): printable Latin-1 bytes stand
    for themselves, the others for the code points from U+0100 up, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(others)}}


def utf8(data: bytes, final: bool) -> tuple[str, bytes]:
    """The characters `data` finishes, and the bytes of one begun but not finished (none when `final`)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text = decoder.decode(data, final)
    return text, decoder.getstate()[0]


class Detokenizer:
    """The text each token of an answer adds after the tokens before it (module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import decoders

        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)
        self.tokens: list[int] = []
        self.texted: list[int] = []  # the tokens that are not special: the context of the next one
        self.unfinished = b""  # the bytes of a character begun and not finished
        self._raw: dict[int, bytes | None] = {}
        self._special: dict[int, bool] = {}  # token -> whether the answer's text leaves it out
        # at the current position (until a token is added): each token's step, and the context's own text, so
        # that the chosen token of a logprob entry, asked for first, is not decoded again when it is added
        self._next: dict[int, tuple[str, bytes]] = {}
        self._before: str | None = None

    def push(self, token: int) -> str:
        """Add `token`; the text it adds."""
        text, self.unfinished = self._stepped(token)
        self._next, self._before = {}, None
        self.tokens.append(token)
        if not self.special(token):
            self.texted.append(token)
        return text

    def text_of(self, token: int) -> str:
        """The text `token` would add after the tokens so far ('' for a special token, or for bytes that begin
        or continue a character not yet finished)."""
        return self._stepped(token)[0]

    def flush(self) -> str:
        """What the answer's end adds: U+FFFDs for a character left unfinished."""
        return utf8(self.unfinished, final=True)[0]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def raw_bytes(self, token: int) -> bytes | None:
        """The bytes `token` stands for, if it stands for bytes (`<0xE4>`, or any token of a byte-level BPE
        vocabulary), else None."""
        if token not in self._raw:
            name = self.tokenizer.convert_ids_to_tokens(token) or ""
            byte = BYTE_TOKEN.fullmatch(name)
            if byte:
                self._raw[token] = bytes([int(byte.group(1), 16)])
            elif self.byte_level:  # a token with a character outside the alphabet (an added token such as "café au
                alphabet = byte_level_alphabet()  # lait") stands for its own UTF-8, as tokenizers' decoder reads it
                fits = all(c in alphabet for c in name)
                self._raw[token] = bytes(alphabet[c] for c in name) if fits else name.encode()
            else:
                self._raw[token] = None
        return self._raw[token]

    def special(self, token: int) -> bool:
        """Whether the answer's text leaves `token` out (`<bos>`, `<start_of_turn>`)."""
        if token not in self._special:
            self._special[token] = self.decode([token]) == "" and self.tokenizer.decode([token]) != ""
        return self._special[token]

    def _stepped(self, token: int) -> tuple[str, bytes]:
        if token not in self._next:
            self._next[token] = self._step(token)
        return self._next[token]

    def _step(self, token: int) -> tuple[str, bytes]:
        """The text `token` adds, and the bytes of an unfinished character after it."""
        if self.special(token):  # left out of the text, as transformers' skip_special_tokens does
            return "", self.unfinished
        raw = self.raw_bytes(token)
        if raw is not None:
            return utf8(self.unfinished + raw, final=False)
        broken = utf8(self.unfinished, final=True)[0]
        context = self.texted[-CONTEXT_TOKENS:]  # special tokens decode to nothing: a context of them is none
        if self._before is None:
            self._before = self.decode(context)
        before, joined = self._before, self.decode([*context, token])
        return broken + (joined[len(before):] if joined.startswith(before) else self.decode([token])), b""


class TextStream:
    """One answer's text, and the part of it that can be sent."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.detokenizer = Detokenizer(tokenizer)
        self.stop = stop
        self.text, self.sent = "", 0
        self.stopped = False

    @property
    def tokens(self) -> list[int]:
        return self.detokenizer.tokens

    def add(self, token: int) -> str:
        """The new text that can be sent after `token`; sets `stopped` when a stop string appeared."""
        return self._extend(self.detokenizer.push(token), final=False)

    def finish(self) -> str:
        """What is left to send once generation ended without a stop string."""
        return self._extend(self.detokenizer.flush(), final=True)

    def _extend(self, piece: str, final: bool) -> str:
        self.text += piece
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._send(len(self.text))
        end = len(self.text)
        unsent = end - self.sent  # only text not yet sent can be held back: a bound on the suffixes to try
        held = 0 if final else max((n for s in self.stop for n in range(1, min(len(s), unsent + 1))
                                    if self.text.endswith(s[:n])), default=0)
        return self._send(end - held)

    def _send(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece
