"""The OpenAI request bodies the server accepts, checked field by field, and its OpenAI-style errors.

Fields are read from the raw JSON rather than through a schema so that every refusal names the field
and what is accepted: harmless OpenAI fields (`user`, `metadata`, ...) are accepted and ignored, ones
that would change the result and are not supported (`best_of`, `echo`, tools ...) are
refused by name, and unknown fields are refused as the OpenAI API does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from encdec.data.instructions import conversation
from encdec.data.text import lone_surrogate
from encdec.files import parse_json
from encdec.inference.sampling import MIN_TEMPERATURE, Sampling


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier",
           "prompt_cache_retention", "prompt_cache_options", "request_id"}
# field -> the value(s) that leave the result unchanged; any other value is refused (an unknown field is accepted
# only as null). OpenAI's, then vLLM's own at their defaults (clients written for vLLM send them)
NEUTRAL = {"best_of": (1, None), "echo": (False, None), "suffix": (None, ""),
           "tools": (None, []), "tool_choice": (None, "none"),
           "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
           "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
           "reasoning_effort": (None, "none"), "verbosity": (None,), "web_search_options": (None,),
           "moderation": (None,),
           "skip_special_tokens": (True, None), "spaces_between_special_tokens": (True, None),
           "include_stop_str_in_output": (False, None), "add_generation_prompt": (True, None),
           "continue_final_message": (False, None), "min_tokens": (0, None), "min_p": (0, None),
           "stop_token_ids": ([], None), "chat_template_kwargs": ({}, None), "use_beam_search": (False, None),
           "length_penalty": (1.0, None), "priority": (0, None), "bad_words": ([], None),
           "return_tokens_as_token_ids": (False, None)}
# vLLM's add_special_tokens at its defaults: a completion's prompt (or an input to embed) read with the tokenizer's
# BOS, a conversation as its chat template writes it
KIND_NEUTRAL = {"completions": {"add_special_tokens": (True, None)}, "chat": {"add_special_tokens": (False, None)}}
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
                   "n", "ignore_eos",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"}
FIELDS = {"completions": SAMPLING_FIELDS | {"prompt", "logprobs"},
          "chat": SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}}
MAX_INPUTS = 2048  # prompts of a completions request, inputs of an embeddings request: the OpenAI API's limit
MAX_CHOICES = 64  # the largest n a request may ask for (each choice takes a place in the queue)
MAX_STOP_CHARS = 1000  # a stop string's length: each token compares the answer's end with its beginnings
MAX_TOP_LOGPROBS = 20  # the chat API's limit (the completions API's is 5; this server allows 20 for both)
COMPLETION_DEFAULT_TOKENS = 16  # a completion's max_tokens when none is given (the OpenAI API's and vLLM's)
# a logit_bias key, written as json writes an integer: str.isdigit would pass "²", which int() refuses, and "007"
# would bias token 7 a second time under another key (so a map holds at most one entry per token of the vocabulary)
TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,17}")  # 18 digits at most: int() refuses past 4,300


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int
    max_new_tokens: int


@dataclass
class Parsed:
    """A valid request: the text the encoder reads, or its token ids, and how to generate."""

    kind: str  # "completions" or "chat"
    model: str | None
    prompts: list[str | list[int]]  # completions: one or more prompts (texts or token ids); chat: none
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    stream: bool
    logprobs: int | None = None  # None: no log-probabilities; k: each token's and its k likeliest alternatives'
    n: int = 1  # choices, each generated as a request of its own
    turns: list[tuple[str, str]] | None = None  # chat: the (role, text) turns, "user" or "model", the last a user's
    # a stream's usage: on the last choice's finish chunk ("inline", unasked), in a last chunk of its own with no
    # choices ("apart", stream_options.include_usage true, as OpenAI sends it), or not at all ("none", false)
    stream_usage: str = "inline"
    ignore_eos: bool = False  # vLLM's extension: the model's stop tokens do not end the answer (benchmarks, tests)


def _typed(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(value)[:40]}", name)
    return value


def _number(body: dict, name: str, low: float, high: float, default: float, *, open_low: bool = False) -> float:
    value = _typed(body, name, (int, float), "a number")
    if value is None:
        return default
    # an integer is compared as it is: math.isfinite(10**400) raises (a 500), where it is just out of range
    infinite = isinstance(value, float) and not math.isfinite(value)
    if infinite or value < low or value > high or (open_low and value == low):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise APIError(400, f"'{name}' must be in {interval}, got {json.dumps(value)[:40]}", name)
    return float(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    # each token checks the text's end against every stop's beginnings; an empty list (clients send one) is no stop
    if max(map(len, stops), default=0) > MAX_STOP_CHARS:
        raise APIError(400, f"'stop': a stop string has at most {MAX_STOP_CHARS} characters", "stop")
    return stops


def _logprobs(body: dict, kind: str) -> int | None:
    """completions: `logprobs` = k alternatives (0 to MAX_TOP_LOGPROBS); chat: `logprobs` true, `top_logprobs` = k."""
    if kind == "completions":
        count = _typed(body, "logprobs", (int,), "an integer")
        name = "logprobs"
    else:
        wanted = _typed(body, "logprobs", (bool,), "true or false")
        count = _typed(body, "top_logprobs", (int,), "an integer")
        name = "top_logprobs"
        if count and not wanted:  # (0 asks for nothing: vLLM's default, which its clients send)
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", name)
        if not wanted:
            return None
        count = count or 0
    if count is not None and not 0 <= count <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"'{name}' must be between 0 and {MAX_TOP_LOGPROBS}, got {count}", name)
    return count


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """{"token id": bias in [-100, 100]} (token ids as JSON object keys, as the OpenAI API writes them)."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    what = "an object mapping token ids to numbers in [-100, 100]"
    if not isinstance(bias, dict):
        raise APIError(400, f"'logit_bias' must be {what}", "logit_bias")
    pairs = []
    for key, value in bias.items():
        if (not TOKEN_ID.fullmatch(key) or isinstance(value, bool) or not isinstance(value, (int, float))
                or not -100 <= value <= 100):
            raise APIError(400, f"'logit_bias' must be {what}, got {json.dumps(cut(key))}: {cut(json.dumps(value))}",
                           "logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _inputs(body: dict, name: str, *, empty_text: bool) -> list[str | list[int]]:
    """Field `name` as a list of texts or token-id lists: a string, a list of token ids, or a list of either
    (completions' prompts, embeddings' inputs); empty strings only where `empty_text`."""
    value = body.get(name)
    items = [value] if isinstance(value, str) or _token_ids(value) else value
    if not isinstance(items, list) or not items or not all(
            (isinstance(i, str) and (empty_text or i)) or _token_ids(i) for i in items):
        text = "a string" if empty_text else "a non-empty string"
        raise APIError(400, f"'{name}' must be {text}, a list of token ids, or a non-empty list of either", name)
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"'{name}' has {len(items)} items; at most {MAX_INPUTS} per request", name)
    return items


def _chat_turns(body: dict) -> list[tuple[str, str]]:
    try:  # (content given as parts: `conversation` joins their text)
        turns = conversation(body.get("messages"))
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    if turns[-1][0] != "user":
        raise APIError(400, "the last message must be a user message: the model answers it", "messages")
    return turns


def cut(text: str, limit: int = 40) -> str:
    """What an error says back of a client's text: at most `limit` characters (a name or a value of megabytes came
    back whole, encoded on the event loop)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _object(raw: bytes) -> dict:
    try:
        body = parse_json(raw, strict=True)
    except ValueError as e:
        raise APIError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    broken = _lone_surrogate_field(body) if _may_hold_surrogates(raw) else None
    if broken is not None:
        named = lone_surrogate(broken)  # the field's name is what is broken
        shown = cut(json.dumps(broken)) if named else repr(cut(broken))
        raise APIError(400, f"{shown} holds a \\uD800-\\uDFFF escape that is not half of a pair: not a character; text "
                       "must be valid Unicode", None if named else cut(broken))
    return body


# where a JSON text in UTF-8 can carry half a surrogate pair: a \uD800-\uDFFF escape, or the bytes of one
# (json.loads decodes with surrogatepass)
SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _may_hold_surrogates(raw: bytes) -> bool:
    """Whether the body's bytes can hold half a surrogate pair: walking every value of a body of millions of token
    ids took seconds, on the one thread that parses every request, where a search of its bytes takes milliseconds."""
    return json.detect_encoding(raw) != "utf-8" or SURROGATE_BYTES.search(raw) is not None


def _lone_surrogate_field(body: dict) -> str | None:
    """The top-level field whose name or value (at any depth) holds half a surrogate pair, which no tokenizer
    reads and no answer can carry in UTF-8; None when there is none. Walked without recursion: bodies are read
    up to the JSON parser's own nesting limit."""
    for name, value in body.items():
        if lone_surrogate(name):
            return name
        pending = [value]
        while pending:
            item = pending.pop()
            if isinstance(item, str) and lone_surrogate(item):
                return name
            if isinstance(item, dict):
                if any(lone_surrogate(key) for key in item):
                    return name
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)
    return None


def _same(given: Any, neutral: Any) -> bool:
    """JSON's equality: true is not 1 and 0 is not false, as Python's == has it ("echo": 0 passed as false)."""
    if isinstance(given, bool) or isinstance(neutral, bool):
        return type(given) is type(neutral) and given == neutral
    return given == neutral


def parse(raw: bytes, kind: str, limits: Limits) -> Parsed:
    """The request of endpoint `kind` ("completions" or "chat"), or an APIError saying what is wrong."""
    body = _known(_object(raw), FIELDS[kind], {**NEUTRAL, **KIND_NEUTRAL[kind]})
    model = _typed(body, "model", (str,), "a string")
    stream = _typed(body, "stream", (bool,), "true or false") or False
    stream_usage = _stream_usage(body)
    if body.get("stream_options") is not None and not stream:  # as the OpenAI API answers it
        raise APIError(400, "'stream_options' is only allowed with \"stream\": true", "stream_options")
    budget = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    for name in ("max_tokens", "max_completion_tokens"):  # both typed; the range of the one used (as vLLM: a client
        value = _typed(body, name, (int,), "an integer")  # may send an old max_tokens beside max_completion_tokens)
        if name == budget and value is not None and not 1 <= value <= limits.max_new_tokens:
            raise APIError(400, f"'{name}' must be between 1 and {limits.max_new_tokens} (this server's "
                           f"--max-new-tokens), got {value}", name)
    max_tokens = body.get(budget)
    if max_tokens is None:  # the OpenAI API's defaults: 16 tokens for a completion, a chat answer up to the limit
        max_tokens = limits.max_new_tokens if kind == "chat" else min(COMPLETION_DEFAULT_TOKENS, limits.max_new_tokens)
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    top_k = _typed(body, "top_k", (int,), "an integer")
    if top_k is not None and top_k < -1:
        raise APIError(400, f"'top_k' must be at least 1 (0 or -1: no limit), got {top_k}", "top_k")
    seed = _typed(body, "seed", (int,), "an integer")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise APIError(400, f"'seed' must be in [-2**63, 2**64), got {seed}", "seed")
    stop = _stop(body)
    prompts = _inputs(body, "prompt", empty_text=True) if kind == "completions" else []
    turns = _chat_turns(body) if kind == "chat" else None
    greedy = temperature < MIN_TEMPERATURE
    sampling = Sampling(do_sample=not greedy, temperature=1.0 if greedy else temperature,
                        top_k=top_k, top_p=top_p, seed=seed,  # top_p 0 or top_k -1 read as Sampling reads them
                        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
                        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
                        repetition_penalty=_number(body, "repetition_penalty", 0.0, 100.0, 1.0, open_low=True),
                        logit_bias=_logit_bias(body))
    n = _typed(body, "n", (int,), "an integer")
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"'n' must be between 1 and {MAX_CHOICES}, got {n}", "n")
    return Parsed(kind, model, prompts, max_tokens, sampling, stop, stream, _logprobs(body, kind), n or 1, turns,
                  stream_usage, bool(_typed(body, "ignore_eos", (bool,), "true or false")))


def _stream_usage(body: dict) -> str:
    """Parsed.stream_usage from stream_options.include_usage (vLLM's continuous_usage_stats refused, others
    ignored): without stream_options the usage rides on the last chunk; with them, as OpenAI's API
    reads them (include_usage false unless given)."""
    options = _typed(body, "stream_options", (dict,), "an object")
    if options is None:
        return "inline"
    value = options.get("include_usage")  # null: not given
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"'stream_options.include_usage' must be true or false, got {json.dumps(value)[:40]}",
                       "stream_options")
    if options.get("continuous_usage_stats"):  # vLLM's usage on every chunk
        raise APIError(400, "'stream_options.continuous_usage_stats' is not supported: usage comes once, with the "
                       "last chunk (include_usage)", "stream_options")
    return "apart" if value else "none"


@dataclass
class EmbeddingRequest:
    """A valid /v1/embeddings request: its inputs (texts, or token ids) and how the vectors are written."""

    model: str | None
    inputs: list[str | list[int]]
    base64: bool


EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions"}
EMBEDDING_NEUTRAL = {**KIND_NEUTRAL["completions"], "priority": NEUTRAL["priority"]}  # vLLM's, at their defaults
TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "return_token_strs"}
# vLLM's other /tokenize fields, at the values (its defaults among them) that leave the result as this server gives it
# (those the chat endpoint has too at the values it accepts: a client tokenizing the body it sends there was refused)
TOKENIZE_NEUTRAL = {**{name: NEUTRAL[name] for name in ("add_generation_prompt", "continue_final_message",
                                                        "chat_template_kwargs", "tools")}, "chat_template": (None,)}
DETOKENIZE_FIELDS = {"model", "tokens"}


def _known(body: dict, accepted: set[str], neutral: dict[str, tuple] | None = None) -> dict:
    """`body`, refused with a 400 naming the first field that is a `neutral` one (field -> the values that leave the
    result unchanged) at another value, or neither `accepted`, ignored (IGNORED), neutral nor null."""
    neutral = neutral or {}
    for name, given in body.items():
        if name in neutral and not any(_same(given, value) for value in neutral[name]):
            raise APIError(400, f"'{name}' = {cut(json.dumps(given))} is not supported by this server "  # (a tool list
                           f"(accepted: {' or '.join(json.dumps(v) for v in neutral[name])})", name)  # can be pages)
        if name not in accepted | IGNORED | set(neutral) and given is not None:
            raise APIError(400, f"unrecognized request argument '{cut(name)}'; accepted: {', '.join(sorted(accepted))}",
                           cut(name))
    return body


def parse_embeddings(raw: bytes, width: int) -> EmbeddingRequest:
    """The /v1/embeddings request, or an APIError saying what is wrong; `width` is the model's (and the
    vectors') size, the only `dimensions` accepted."""
    body = _known(_object(raw), EMBEDDING_FIELDS, EMBEDDING_NEUTRAL)
    inputs = _inputs(body, "input", empty_text=False)
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding  # (null alone: 0, false or "" are no format)
    if encoding not in ("float", "base64"):
        raise APIError(400, f"'encoding_format' must be \"float\" or \"base64\", got {json.dumps(encoding)[:40]}",
                       "encoding_format")
    dimensions = _typed(body, "dimensions", (int,), "an integer")
    if dimensions is not None and dimensions != width:
        raise APIError(400, f"'dimensions' must be this model's width, {width} (vectors are not shortened), "
                       f"got {dimensions}", "dimensions")
    return EmbeddingRequest(_typed(body, "model", (str,), "a string"), inputs, encoding == "base64")


@dataclass
class TokenizeRequest:
    """A valid /tokenize request (vLLM's): a completion's text, or a chat's conversation."""

    model: str | None
    prompt: str | None
    turns: list[tuple[str, str]] | None
    add_special_tokens: bool = True  # the tokenizer's BOS before a text (as a completion's prompt is read)
    token_strs: bool = False  # each id's token as the vocabulary spells it, too


def parse_tokenize(raw: bytes) -> TokenizeRequest:
    body = _known(_object(raw), TOKENIZE_FIELDS, TOKENIZE_NEUTRAL)
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise APIError(400, "give 'prompt' (a completion's text) or 'messages' (a chat's conversation), one of them",
                       "prompt")
    add = _typed(body, "add_special_tokens", (bool,), "true or false")
    if add and body.get("messages") is not None:  # false is vLLM's default for a conversation, and what is done
        raise APIError(400, "'add_special_tokens' true applies to a 'prompt'; a conversation is tokenized in the chat "
                       "format, as /v1/chat/completions reads it", "add_special_tokens")
    return TokenizeRequest(_typed(body, "model", (str,), "a string"), _typed(body, "prompt", (str,), "a string"),
                           _chat_turns(body) if body.get("messages") is not None else None,
                           True if add is None else add,
                           bool(_typed(body, "return_token_strs", (bool,), "true or false")))


def parse_detokenize(raw: bytes, limit: int) -> tuple[str | None, list[int]]:
    """A valid /detokenize request (vLLM's): its model and its token ids, at most `limit` of them (the most a
    request here reads and writes: a list of 64 MiB held the reading thread for seconds)."""
    body = _known(_object(raw), DETOKENIZE_FIELDS)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not (tokens == [] or _token_ids(tokens)):
        raise APIError(400, "'tokens' must be a list of token ids", "tokens")
    if len(tokens) > limit:
        raise APIError(400, f"'tokens' has {len(tokens)} ids; at most {limit} (--max-input-tokens + "
                       "--max-new-tokens)", "tokens")
    return _typed(body, "model", (str,), "a string"), tokens
