"""The chat format a model was instruction-tuned with, read from its tokenizer.

Conversations are (role, text) turns, whatever the source (data files, Natural Instructions, requests to
the server). A tokenizer without Gemma's turn markers but with its own chat template (SmolLM2, Qwen,
Llama 3 ...) renders them with its template (on a fixed date, where it writes one), and its answers are closed
by the template's own end-of-turn token (by EOS alone where that text is no one token); a tokenizer with neither
gets Gemma's format (`instructions.chat_prompt`), its answers closed by
<end_of_turn> where that is one of its tokens, else by EOS alone (Llama 2's and Mistral's base tokenizers
spell it in 7 pieces, which generation cannot stop at: served and evaluated answers ended with the text).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from jinja2.exceptions import TemplateError

from encdec.data.instructions import END, START, chat_prompt, system_folded
from encdec.data.tokens import leading_bos
from encdec.errors import EncdecError, first_line

_ROLE = {"user": "user", "model": "assistant", "system": "system"}
_MARK = "\x00answer\x00"  # stands for an answer when finding the text a template puts after one
_SLOT = re.compile("\ue000(\\d+)\ue001")  # stands for a message's text in a rendering (private-use characters)
# a template's turn markers among its text: <|im_start|>, <end_of_turn>, [INST], [/INST] ...
_MARKER = re.compile(r"<\|?[A-Za-z_/][\w/.-]*\|?>|\[/?[A-Z][A-Z_]*\]")


_MENDED = "fix or remove chat_template in the model's tokenizer_config.json (or its chat_template.jinja)"
# the date a template that writes one (Llama 3's "Today Date: ...") is given, its own fallback: with today's, the
# training examples changed with the calendar (a run resumed the next day was refused as reading other data) and
# served prompts were not those trained
TEMPLATE_DATE = "26 Jul 2024"
# Python lines a template may run to write the probe exchange (`ChatFormat.of`): real ones take thousands; a handed
# one of nested loops ran for ever, for every command that reads the tokenizer
PROBE_LINES = 10_000_000  # (Qwen2.5's template: 141k, SmolLM2's 52k)


class _TooLong(Exception):
    """A template that ran past PROBE_LINES lines."""


def _bounded(render: Callable[[], str], lines: int = PROBE_LINES) -> str:
    """`render()`, stopped (`_TooLong`) once the Python it runs (Jinja compiles a template to Python) has run `lines`
    lines: traced, so this is for one short rendering, not for every request."""
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        count += 1
        if count > lines:
            raise _TooLong(f"it ran past {lines:,} lines of Python for two short turns (a loop without end?)")
        return trace

    before = sys.gettrace()
    sys.settrace(trace)
    try:
        return render()
    finally:
        sys.settrace(before)


class ConversationRefused(ValueError):
    """The chat format refused the turns: the tokenizer's template (Mistral's and Llama 2's raise unless roles
    alternate), or Gemma's format, which has no system role, a system message it cannot fold into a user turn."""


def _folded(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`system_folded(turns)`, its refusal (a system turn where the format cannot put one) a ConversationRefused."""
    try:
        return system_folded(turns)
    except ValueError as e:
        raise ConversationRefused(str(e)) from None


@dataclass(frozen=True)
class ChatFormat:
    """How prompts are written and answers closed for one tokenizer (None template: Gemma's own format)."""

    tokenizer: Any
    templated: bool
    end: str  # the text that closes an answer, before EOS
    # the token the encoder's inputs start with: the one the tokenizer puts before every text (Gemma's and
    # Llama's BOS), so that tuned prompts begin as served ones do (`tokenizer(text)`); None for Qwen, which adds none
    bos: int | None
    # the format's turn markers that are no token of the tokenizer's (Gemma's format on Llama 2's tokenizer): plain
    # text, so a message holding one would write a turn of its own (`encode` refuses it)
    plain_markers: tuple[str, ...] = ()
    # the template's turn markers that are added tokens not flagged special (DeepSeek-R1's <｜User｜>): the tokenizer
    # reads them as their tokens in any text, a message's too (`encode` refuses them, as `plain_markers`)
    unsplit_markers: tuple[str, ...] = ()

    @classmethod
    def of(cls, tokenizer: Any) -> ChatFormat:
        bos = leading_bos(tokenizer)
        vocab = tokenizer.get_vocab()
        template = getattr(tokenizer, "chat_template", None)
        # Gemma's own format where there is no template or the template is Gemma's (its turns); a Gemma fine-tune's
        # vocabulary keeps <start_of_turn> whatever template it was tuned with, which is then the one used
        if not template or START in vocab and START in str(template):
            plain = tuple(m for m in (START, END) if m not in vocab)
            return cls(tokenizer, False, END if END in vocab else "", bos, plain)
        exchange = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
        try:
            answered = _bounded(lambda: tokenizer.apply_chat_template(exchange, tokenize=False,
                                                                      date_string=TEMPLATE_DATE))
        except Exception as e:  # noqa: BLE001 - a Jinja syntax error, a template's raise_exception, or a handed
            # template's own failure ({{ 1/0 }}, a string too large for memory): every command reading the tokenizer
            raise EncdecError(f"the tokenizer's chat template cannot write a user turn and its answer "
                              f"({type(e).__name__}: {first_line(e)}); {_MENDED}") from None
        if _MARK not in answered:
            raise EncdecError(f"the tokenizer's chat template leaves out the answer of a user turn; {_MENDED}")
        end = answered.split(_MARK, 1)[1].strip()
        markup = answered.replace(_MARK, " ").replace("?", " ")  # the template's own text
        plain = tuple(dict.fromkeys(m for m in _MARKER.findall(markup) if m not in vocab))
        # markers both of a written exchange and of a prompt (a user turn and the answer's opening): not markup a
        # template writes in an answer alone (Qwen3's <think>) or in the opening alone (DeepSeek-R1's, after its
        # <｜Assistant｜>), which reasoning data, answers sent back and questions about it hold
        try:
            prompt = _bounded(lambda: tokenizer.apply_chat_template(exchange[:1], add_generation_prompt=True,
                                                                    tokenize=False, date_string=TEMPLATE_DATE))
        except Exception:  # noqa: BLE001 - its answer was written above: a template that needs one writes no prompt
            prompt = markup
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        unsplit = tuple(t.content for t in added if not t.special and t.content.strip() and t.content in markup
                        and t.content in prompt.replace("?", " "))
        # an end of turn that is no one token of the vocabulary (a ChatML template on a tokenizer without
        # <|im_end|>) cannot stop generation: trained, every answer ended with its text; EOS alone closes them
        return cls(tokenizer, True, end if end in vocab else "", bos, plain, unsplit)

    def render(self, turns: list[tuple[str, str]]) -> str:
        """The encoder's text for (role, text) turns ("user", "model" or "system"), ending with an open
        answer: Gemma's chat format (the system text in the first user turn), or the tokenizer's template (with the
        system role where it has one; without the BOS text some templates start with, when the encoder's inputs get
        `bos` as a token anyway; SmolLM2's tokenizer names its first marker, <|im_start|>, as BOS but never puts it
        first, so there the marker stays text)."""
        if not self.templated:
            return chat_prompt(_folded(turns))
        try:
            text = self._templated(turns)
        except TemplateError as e:  # a template that checks the turns (roles must alternate user/assistant, ...)
            if all(role != "system" for role, _ in turns):
                raise ConversationRefused(f"the tokenizer's chat template refuses this conversation ({e})") from None
            try:  # a template without a system role (Gemma 2's, Mistral's first) reads it in the first user turn
                text = self._templated(system_folded(turns))
            except (TemplateError, ValueError):  # (ValueError: no fold of a later system turn) the template's words
                raise ConversationRefused(f"the tokenizer's chat template refuses this conversation ({e})") from None
        except Exception as e:  # noqa: BLE001 - a handed template's own failure on these turns ({{ 1/0 }} for a
            # system message): a traceback of generate --input and finetune, a 500 of the server
            raise ConversationRefused(f"the tokenizer's chat template failed on this conversation "
                                      f"({type(e).__name__}: {first_line(e)})") from None
        bos = self.tokenizer.bos_token
        return text.removeprefix(bos) if bos and self.bos is not None else text

    def _templated(self, turns: list[tuple[str, str]]) -> str:
        messages = [{"role": _ROLE[role], "content": text.strip()} for role, text in turns]  # trimmed as Gemma's
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  date_string=TEMPLATE_DATE)

    def encode(self, turns: list[tuple[str, str]]) -> list[int]:
        """The token ids of `render(turns)`, the tokenizer's leading BOS first where it puts one, except that a
        message's text is never read as the tokenizer's control tokens: "<end_of_turn>" typed in a message is text,
        so that a client cannot close its turn and write the model's (transformers' templates and vLLM read it as
        the marker). Prompts without such text are tokenized whole, as before. A message holding a turn marker that
        the tokenizer has no token for (`plain_markers`), or reads as its token in any text (`unsplit_markers`), is
        refused: there it is the marker."""
        for role, text in turns:
            self.check_message(role, text)
        tok, bos = self.tokenizer, [] if self.bos is None else [self.bos]
        if not any(self._spells_control(text) for _, text in turns):
            return bos + tok(self.render(turns), add_special_tokens=False)["input_ids"]
        rendered = self.render(turns)
        turns = self._as_rendered(turns)  # folded on the texts, as `render` folds them (on placeholders, a blank
        # system message left its "\n\n" between two, which stripping the whole text removes)
        texts = [text.strip() for _, text in turns]
        slotted = self.render([(role, f"\ue000{i}\ue001") for i, (role, _) in enumerate(turns)])
        pieces = _SLOT.split(slotted)  # template text, message index, template text, ...
        if "".join(texts[int(piece)] if k % 2 else piece for k, piece in enumerate(pieces)) != rendered:
            # the template rewrites what messages say (Qwen3's drops an earlier answer's <think>...</think>): each
            # message put back whole would be another prompt than the conversation's
            raise ConversationRefused("a message spells a control token of this tokenizer, which is kept as text by "
                                      "putting each message in the template's rendering as given, but this template "
                                      "rewrites messages' texts (an earlier answer's reasoning dropped, say): leave "
                                      "the control token out of the message")
        ids = list(bos)
        for k, piece in enumerate(pieces):
            if k % 2:
                ids += tok(texts[int(piece)], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            elif piece:
                ids += tok(piece, add_special_tokens=False)["input_ids"]
        return ids

    def check_message(self, role: str, text: str) -> None:
        """ConversationRefused where `text` holds a turn marker that no tokenizing can keep as text in it."""
        unsplit = "this tokenizer reads as its token wherever it is (an added token not marked special)"
        for markers, why in ((self.plain_markers, "is plain text to this tokenizer (no token of its own)"),
                             (self.unsplit_markers, unsplit)):
            marker = next((m for m in markers if m in text), None)
            if marker is not None:
                raise ConversationRefused(f"a {role} message holds {marker!r}, which marks turns in this chat format "
                                          f"and {why}: it would write a turn of its own; leave it out of the message")

    def _as_rendered(self, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """`turns` as `render` places them: a system message in the first user turn where the format has no system
        role (Gemma's; a template that refuses the role)."""
        if not self.templated:
            return _folded(turns)
        if all(role != "system" for role, _ in turns):
            return turns
        try:
            self._templated(turns)
        except TemplateError:
            with contextlib.suppress(ValueError):  # no fold: `render` refuses the conversation in its words
                return system_folded(turns)
        except Exception:  # noqa: BLE001, S110 - `render` says a handed template's failure in its words
            pass
        return turns

    def stop_ids(self, eos_token_ids: list[int]) -> frozenset[int]:
        """The tokens that end an answer: the model's EOS ids, and the text closing a turn where it is one token
        (<end_of_turn>), which ends a plain completion too."""
        end = self.tokenizer.get_vocab().get(self.end) if self.end else None
        return frozenset(eos_token_ids) | ({end} if end is not None else set())

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        """The tokenizer's special (control) tokens."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {})
        return frozenset({*self.tokenizer.all_special_ids, *(i for i, t in added.items() if t.special)})

    def _spells_control(self, text: str) -> bool:
        """Whether the tokenizer reads a control token in `text`: asked of the tokenizer itself, which finds its
        added tokens in one pass (a search for each of Gemma's 6,249 special texts took 54 ms of a 31 KB message,
        on the server's request thread)."""
        return not self._special_ids.isdisjoint(self.tokenizer(text, add_special_tokens=False)["input_ids"])
