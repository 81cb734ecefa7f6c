"""Answer matching for generative tasks: the final number of a chain of thought (GSM8K) and
normalised exact match (TriviaQA, NaturalQuestions)."""

from __future__ import annotations

import re
import string
import unicodedata

# between a digit and three more: LaTeX's {,} and \, and (narrow) no-break or thin spaces, as a chat model writes them
DIGIT_GROUPS = re.compile(r"(?<=\d)(?:\{,\}|\\,|[\u2009\u202f\u00a0])(?=\d{3}(?!\d))")
# ".5" too, read as 0.5, where the point follows no letter, digit or point (not the ".3" of "1.2.3" or "file.2");
# a minus sign only where it touches the number and follows no word or bracket ("23 - 15", "3-5" end on 15 and 5)
NUMBER = re.compile(r"(?:(?<![\w)\]])-(?=[$\d.]))?\$?\s?(?:\d[\d,]*(?:\.\d+)?|(?<![\w.])\.\d+)")
ANSWER_CUE = re.compile(r"answer(?:\s+is\s*:?|\s*:)", re.IGNORECASE)
# what a chat model writes between "the answer is" and its number: bold and italics, quotes, code ticks, LaTeX's
# math delimiters (\( \[ $ $$), an escaped dollar sign, \boxed{...} and \text{...}; read one way only and never
# given back, as the cue before it (a choice between "$" and "$$" for each made a run of dollars take exponential
# time, one between the cue's spaces and these quadratic)
MARKUP = r"(?:[\s*_\"'`$]|\\[(\[$]|\\(?:boxed|text|textbf|mathbf)\{)*+"
# a stated answer: the cue and its first number, or LaTeX's \boxed{...} (a chat model's way of saying it; which of
# them wins: `final_number`)
STATEMENT = re.compile("(?>" + ANSWER_CUE.pattern + ")" + MARKUP + "(" + NUMBER.pattern + ")", re.IGNORECASE)
BOXED = re.compile(r"\\boxed\{" + MARKUP + "(" + NUMBER.pattern + ")")
# a number that begins a calculation ("3 + 4", multiplication also written 3 x 4, 3 X 4, 3 · 4 or LaTeX's \times)
CALCULATES = re.compile(r"\s*(?:[-+*/=\u00d7\u00f7\u00b7x]|\\times|\\cdot|\\div)\s*[$(.\d\\]", re.IGNORECASE)
RESULT = re.compile(r"=" + MARKUP + "(" + NUMBER.pattern + ")")
# a sentence's end, or a line's unless the next goes on with the calculation (an operator, LaTeX's display math)
SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n(?!\s*(?:[-+*/=\u00d7\u00f7\u00b7\\]|\d[^\n]*=))")


def _clean_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5'; '7.' -> '7'; None when no digit remains."""
    text = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not re.fullmatch(r"-?\d*(?:\.\d+)?", text) or not any(c.isdigit() for c in text):
        return None
    text = re.sub(r"^(-?)\.", r"\g<1>0.", text)
    text = re.sub(r"^(-?)0+(?=\d)", r"\1", text)  # "08" is 8
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def final_number(text: str) -> str | None:
    """The number a chain of thought ends on: the last stated answer ("the answer is N", the few-shot examples'
    ending, or a \\boxed{N} after it) when there is one, else GSM8K's "#### N", else the last number. A statement
    written as a calculation ("so the answer is 3 x 4 = 12") gives its result: the number after the last "=" of its
    sentence. LaTeX's and typography's ways of writing thousands (1{,}000, 1\\,000, thin spaces) and the minus sign
    read as plain ones."""
    text = DIGIT_GROUPS.sub(lambda m: "," if m.group(0) == "{,}" else "", text).replace("\u2212", "-")
    cued, boxed = list(STATEMENT.finditer(text)), list(BOXED.finditer(text))
    # the last cue's answer, unless a \boxed one follows a cue that boxed none itself (a boxed check after "the answer
    # is \boxed{18}" does not undo it; "Answer: 9 eggs are left, ... so \boxed{18}" ends on 18)
    later_box = bool(boxed) and (not cued or "\\boxed" not in cued[-1].group(0)
                                 and boxed[-1].start() > cued[-1].start())
    last = boxed[-1] if later_box else cued[-1] if cued else None
    if last is not None:
        return _clean_number(_stated_answer(text, last))
    found = re.findall(r"####\s*(" + NUMBER.pattern + ")", text)
    if found:
        return _clean_number(found[-1])
    numbers = NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else None


def _stated_answer(text: str, statement: re.Match[str]) -> str:
    """A statement's number, or the result of the calculation it begins: the number after the last "=" of its
    sentence (its last number without one). The text's last number was read before, from any later sentence
    ("the answer is 3 x 4 = 12. Check: 12 / 4 = 3" gave 3), as it was for answers in markup not read as stated
    (\\$18, \\(18\\), "18")."""
    if not CALCULATES.match(text, statement.end()):
        return statement.group(1)
    end = SENTENCE_END.search(text, statement.end())
    sentence = text[statement.start(1) : end.start() if end else len(text)]
    results = RESULT.findall(sentence)
    return results[-1] if results else NUMBER.findall(sentence)[-1]


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD / TriviaQA convention). Punctuation is
    ASCII's and Unicode's: a model writing Bachelor’s or “Paris” (curly quotes, as instruction-tuned models
    type them) missed the answers Bachelor's and Paris."""
    text = "".join(ch for ch in text.lower()
                   if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    """Whether the prediction and an answer normalise alike; one that normalises to nothing (no answer, or
    punctuation alone) matches only the same characters: TriviaQA and NQ hold answers such as "+-*/" and "@", which
    normalise to nothing too and so matched an empty answer."""
    guess = normalise(prediction)
    if not guess:
        said = prediction.strip().lower()
        return bool(said) and any(said == a.strip().lower() for a in answers)
    return any(guess == normalise(a) for a in answers)


def first_line(text: str, stops: tuple[str, ...]) -> str:
    """A generation cut at the first stop string."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut].strip()
