"""The FastAPI application: OpenAI-compatible endpoints over the scheduler, and the uvicorn server that
drains on SIGTERM (no new requests, the running ones finish, or end with a 503 once --shutdown-timeout has passed,
then the process exits)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from encdec.data.chat import ChatFormat, ConversationRefused
from encdec.data.tokens import outside_vocabulary, text_ids
from encdec.errors import EncdecError, described
from encdec.inference.engine import Emitted, Engine, Row
from encdec.model import EncoderDecoder
from encdec.objectives import PLAIN, Framing
from encdec.serve.logprobs import TokenLogprobs
from encdec.serve.metrics import Metrics
from encdec.serve.protocol import (
    APIError,
    Limits,
    Parsed,
    TokenizeRequest,
    cut,
    parse,
    parse_detokenize,
    parse_embeddings,
    parse_tokenize,
)
from encdec.serve.scheduler import EmbedJob, Job, Scheduler
from encdec.serve.text import TextStream

log = logging.getLogger("encdec")
DISCONNECT_POLL_S = 1.0  # how often a non-streaming request checks that its client is still there
SHUTDOWN_WAIT_S = 600.0
MAX_BODY_BYTES = 64 * 2**20  # 2,048 prompts of 2,048 token ids each fit; more is refused unread (413)
BODY_TIMEOUT_S = 60.0  # a body not all there by then is refused (408): a stalled client holds no connection for good
FLUSH_AFTER_DRAIN_S = 10.0  # after SIGTERM, once nothing is queued or running: for the last answers to be read
# A token spells at most the vocabulary's longest piece; x 4 leaves room for normalizers that compose characters
# (NFC). A longer text cannot fit --max-input-tokens, and is refused before it is tokenized.
CHARS_PER_TOKEN_BOUND = 4


@dataclass(frozen=True)
class Settings:
    model_id: str  # the name /v1/models lists and requests may give
    max_batch: int
    max_queue: int
    limits: Limits
    pooling: str = "mean"  # how /v1/embeddings pools the encoder's states: "mean" or "last"
    api_key: str | None = None  # when set, /v1/ requests must send "Authorization: Bearer <api_key>"
    threads: int | None = None  # intra-op threads of the scheduler's thread (None: the process's setting)
    compile_step: bool = False  # the engine's step compiled with torch.compile (while the server starts)
    max_connections: int | None = None  # open connections (and requests in flight) past which the API answers 503
    keep_alive_s: int = 5  # how long an idle connection waits for its next request (uvicorn's timeout_keep_alive)
    framing: Framing = PLAIN  # how the model reads a prompt (a UL2-pretrained model's sentinel: `model_framing`)
    # after SIGTERM, seconds the queued and running requests have to finish before they end with a 503 (None: as
    # long as they take)
    shutdown_timeout_s: float | None = None
    allowed_origins: tuple[str, ...] = ()  # web pages (origins, or "*") whose scripts may call the API (CORS)
    # host names (besides addresses and localhost) the Host header may give, the --host name among them: checked on a
    # loopback address (or a name of loopback addresses alone) without an API key, where a web page could reach the
    # server under a name of its own (`check_hosts`); None: no check
    allowed_hosts: tuple[str, ...] | None = None
    tls: tuple[str, str] | None = None  # HTTPS: the certificate chain's file and its private key's
    access_log: bool = True  # uvicorn's line per request


class Service:
    """What the endpoints share: the tokenizer, the scheduler, the metrics, and the stop tokens."""

    def __init__(self, model: EncoderDecoder, tokenizer: Any, settings: Settings) -> None:
        self.tokenizer, self.settings, self.metrics = tokenizer, settings, Metrics(settings.max_batch)
        self.vocab_size = model.config.vocab_size
        self.chat = ChatFormat.of(tokenizer)  # Gemma's turns, or the tokenizer's own chat template
        self.eos = self.chat.stop_ids(model.config.eos_token_ids)
        engine = Engine(model, settings.max_batch, settings.compile_step)
        self.scheduler = Scheduler(engine, settings.max_queue, self.metrics, settings.pooling, threads=settings.threads,
                                   warm_up=settings.compile_step)
        self.created = int(time.time())
        longest = max(map(len, tokenizer.get_vocab()), default=1)
        self.max_chars = settings.limits.max_input_tokens * longest * CHARS_PER_TOKEN_BOUND
        # bodies are parsed and tokenized, and large answers written as JSON, on a thread of their own, one at a
        # time: a large one keeps the event loop (every stream, /health) waiting no longer than a step
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="encdec-read")

    async def off_loop(self, work: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.reader, work, *args)

    def logprobs(self, request: Parsed) -> TokenLogprobs | None:
        if request.logprobs is None:
            return None  # a stop token ends the answer and is not listed, unless it did not end it (ignore_eos)
        return TokenLogprobs(self.tokenizer, request.kind, frozenset() if request.ignore_eos else self.eos)

    def tokens(self, request: Parsed) -> list[list[int]]:
        """Each prompt's token ids (chat: the turns in the chat format)."""
        outside = [token for token, _ in request.sampling.logit_bias if token >= self.vocab_size]
        if outside:
            raise APIError(400, f"'logit_bias': token id {outside[0]} is outside the vocabulary (0 to "
                           f"{self.vocab_size - 1})", "logit_bias")
        if request.kind == "chat":
            prompts = [self.ids(self.chat_ids(request.turns), "messages")]
        else:
            prompts = [self.ids(prompt, "prompt") for prompt in request.prompts]
        return [self.settings.framing.prompt(ids, self.chat.bos) for ids in prompts]

    def chat_ids(self, turns: list[tuple[str, str]]) -> list[int]:
        """A conversation's token ids in the chat format (a message's text never reads as control tokens:
        ChatFormat.encode), refused unread past what --max-input-tokens can spell."""
        self.short_enough(sum(len(text) for _, text in turns), "messages")
        limit = self.settings.limits.max_input_tokens
        if len(turns) > limit:  # a turn's markup is a token at least: 2 M empty messages took 16 s to render
            raise too_long(f"'messages' has {len(turns)} turns, more than this server's limit of {limit} tokens can "
                           "hold", "messages", limit)
        try:  # the turns' markup counts too: 40,000 empty messages were 1.4 M characters to tokenize
            self.short_enough(len(self.chat.render(turns)), "messages")
            return self.chat.encode(turns)
        except ConversationRefused as e:
            raise APIError(400, str(e), "messages") from None

    def tokenized(self, request: TokenizeRequest) -> list[int]:
        """/tokenize: what the limit counts of a prompt or a conversation, without the limit applied."""
        if request.turns is not None:
            return self.chat_ids(request.turns)
        self.short_enough(len(request.prompt), "prompt")
        if request.add_special_tokens:
            return text_ids(self.tokenizer, request.prompt)
        return self.tokenizer(request.prompt, add_special_tokens=False).input_ids

    def ids(self, prompt: str | list[int], param: str) -> list[int]:
        """The encoder's input: text tokenized, or token ids checked; no longer than --max-input-tokens."""
        if isinstance(prompt, list):
            ids = prompt
        else:
            self.short_enough(len(prompt), param)
            ids = text_ids(self.tokenizer, prompt)
        if (bad := outside_vocabulary(ids, self.vocab_size)) is not None:  # given, or a token of the text
            named = "" if isinstance(prompt, list) else f" ({self.tokenizer.convert_ids_to_tokens(bad)!r})"
            raise APIError(400, f"token id {bad}{named} is outside the vocabulary (0 to {self.vocab_size - 1})", param)
        if not ids:  # an empty text, from a tokenizer that puts no BOS first (Qwen's): nothing for the encoder to read
            raise APIError(400, f"'{param}' has no tokens; a prompt needs at least one", param)
        limit = self.settings.limits.max_input_tokens
        if len(ids) > limit:
            raise too_long(f"'{param}' has {len(ids)} tokens, more than this server's limit of {limit}", param, limit)
        return ids

    def short_enough(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            limit = self.settings.limits.max_input_tokens
            raise too_long(f"'{param}' has {chars} characters, more than this server's limit of {limit} tokens can "
                           "spell", param, limit)


def too_long(said: str, param: str, limit: int) -> APIError:
    """A prompt past --max-input-tokens, in the words and code OpenAI's API (and vLLM) use for a context that
    overflows: clients recognise that error by them, and trim the conversation or fall back to another model."""
    return APIError(400, f"This model's maximum context length is {limit} tokens (--max-input-tokens); however, "
                    f"{said}. Please reduce the length of the {param}.", param,
                    code="context_length_exceeded")


def _check_json_type(request: Request) -> None:
    """415 unless the body is declared JSON (application/json or a +json type), as FastAPI's own bodies and vLLM
    require: a browser sends a text/plain, form or multipart body, or one without a type, to any address without
    asking it first (CORS asks only for other types), so a web page the user opened could make a server on their
    machine (loopback, no --api-key: the defaults) generate, were every body read as JSON."""
    given = request.headers.get("content-type")
    kind = (given or "").split(";", 1)[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json'; got "
                       f"{'no Content-Type' if given is None else repr(given[:100])} (curl: add "
                       "-H 'Content-Type: application/json')")


async def read_body(request: Request) -> bytes:
    """The request's body: 415 unless declared JSON, 413 past MAX_BODY_BYTES (before reading it, when its length is
    declared), 408 when it is not all there within BODY_TIMEOUT_S."""
    _check_json_type(request)
    refused = APIError(413, f"the request body is larger than this server accepts ({MAX_BODY_BYTES // 2**20} MiB)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise refused
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise refused
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s") from None
    except ClientDisconnect:
        raise APIError(499, "the client went away before sending its body") from None
    return b"".join(chunks)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(kind: str, index: int, text: str | None, finish: str | None, stream: bool,
            logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    if kind == "completions":
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    if stream:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish}


def _prompt_tokens(jobs: list[Job], parsed: Parsed) -> int:
    """The request's prompt tokens, each prompt counted once however many choices it has."""
    return sum(len(job.prompt) for job in jobs[:: parsed.n])


@dataclass
class Answer:
    """One choice being written: its text, its log-probabilities, and how it ended."""

    text: TextStream
    logprobs: TokenLogprobs | None
    finish: str | None = None
    piece: str = ""  # the text that the last token settled

    def add(self, item: Emitted) -> bool:
        """Take the next token; True when a stop string ended the choice."""
        if self.logprobs is not None:
            self.logprobs.add(item, self.text.detokenizer, len(self.text.text))
        self.piece = self.text.add(item.token)
        if self.text.stopped and self.logprobs is not None:
            self.logprobs.stop_at(len(self.text.text))
        return self.text.stopped

    def settle(self) -> str:
        """The text left once generation ended (`TextStream.finish`: the end of an unfinished character, written as
        U+FFFD); a stop string that this completes cuts the log-probabilities too, as `add` does."""
        rest = self.text.finish()
        if self.text.stopped and self.logprobs is not None:
            self.logprobs.stop_at(len(self.text.text))
        return rest

    def pending(self, ended: bool = False) -> dict[str, Any] | None:
        """The log-probabilities of the tokens since the last call whose text was sent (streaming); all that are
        left once the choice `ended`."""
        return self.logprobs and self.logprobs.take(None if ended else self.text.sent)


def _server_failed(error: Exception) -> APIError:
    return APIError(500, f"the server failed: {error}", kind="server_error")


def _token(item: Emitted | Exception | None) -> Emitted | None:
    """A delivered token, None at the end; a failed step becomes a server error (an APIError is its own: a drain
    that ran out of time)."""
    if isinstance(item, APIError):
        raise item
    if isinstance(item, Exception):
        raise APIError(500, f"generation failed: {item}", kind="server_error")
    return item


class EventStream(StreamingResponse):
    """Server-sent events whose requests are released however the response ends: when the client is gone before
    the first event (the first send fails, or the disconnect is seen first), the events' generator never runs,
    nor its own `finally`, and the requests would decode to their last token for nobody."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None]) -> None:
        # (not cached; and not buffered by an nginx in front, whose proxy_buffering held the events back to the end)
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.release = release

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


API_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/tokenize",
                       "/detokenize"})  # metric labels


PROBE_PATHS = frozenset({"/health", "/metrics"})  # for probes and scrapers: open without the key, answered at any load


def behind_key(path: str) -> bool:
    """Whether a request to `path` needs the API key (--api-key): the API's (PROBE_PATHS stay open)."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


async def _refused(answer: Callable[[str, Response], Response], error: APIError, scope: dict, receive: Any,
                   send: Any) -> None:
    """A middleware's refusal in the API's error shape, counted under the request's path where it is one of the
    API's, else "other" (any path would let a client refused add series to /metrics without end)."""
    endpoint = scope["path"] if scope["path"] in API_PATHS else "other"
    await answer(endpoint, _error(error))(scope, receive, send)


class APIKeyCheck:
    """With --api-key, the API's endpoints answer only requests that carry the key (health and metrics stay
    open to probes and scrapers, as vLLM leaves them).

    A plain ASGI middleware: Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`) wraps the request's
    `receive`, and behind it `request.is_disconnected()` never saw a client leave, so requests whose clients
    had gone kept their slots and encoder passes to the end."""

    def __init__(self, app: Any, key: str, answer: Callable[[str, Response], Response]) -> None:
        self.app, self.key, self.answer = app, key.encode(), answer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and behind_key(scope["path"]):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, given = (header.split(None, 1) + [b"", b""])[:2]  # one or more spaces or tabs between (RFC 6750)
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                message = "a valid API key is required: send 'Authorization: Bearer <key>' (encdec serve --api-key)"
                await _refused(self.answer, APIError(401, message, code="invalid_api_key"), scope, receive, send)
                return
        await self.app(scope, receive, send)


class HostCheck:
    """A server on a loopback address without an API key answers the requests whose Host header names this machine
    (an address, localhost, the --host name) or an --allowed-hosts name: a web page whose own name its DNS server
    turns to 127.0.0.1 (DNS rebinding) is then no longer a page of the same origin as the server, free to use it and
    read its answers (a request body's JSON type, which 415 asks for, does not stop a page of the same origin)."""

    def __init__(self, app: Any, allowed: tuple[str, ...], answer: Callable[[str, Response], Response]) -> None:
        self.app, self.allowed, self.answer = app, allowed, answer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host")
            name = None if header is None else host_name(header.decode("latin-1"))
            if name is not None and not host_allowed(name, self.allowed):
                message = (f"the Host header names {name[:100]!r}, not this server: it listens on a loopback "
                           "address, where a web page may reach it under a name of its own that resolves there (DNS "
                           "rebinding); another name of this server (a reverse proxy's): encdec serve --allowed-hosts "
                           "NAME, or --api-key")
                await _refused(self.answer, APIError(403, message), scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """The name or address of a Host header (host[:port], [v6][:port]), lower case, without a final dot."""
    header = header.strip().lower()
    name = header[1:].split("]", 1)[0] if header.startswith("[") else header.rsplit(":", 1)[0]
    return name.rstrip(".")


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header's `name` is this machine's or an allowed one ("*": any; ".example.com": that domain
    and those under it)."""
    import ipaddress

    try:
        ipaddress.ip_address(name)  # an address is no name a page's DNS server can point elsewhere
        return True
    except ValueError:
        pass
    return (name == "localhost" or name.endswith(".localhost") or "*" in allowed or name in allowed
            or any(a.startswith(".") and (name == a[1:] or name.endswith(a)) for a in allowed))


def check_hosts(given: str | None, host: str, api_key: str | None) -> tuple[str, ...] | None:
    """--allowed-hosts as the names the Host header may give (None: no check): checked only on a loopback address
    without an API key; names are written as the header gives them (lower case, idna)."""
    names = []
    for name in ([] if given is None else [n.strip().lower().rstrip(".") for n in given.split(",")]):
        try:  # browsers send a name of other letters in its ASCII form (é.com: xn--9ca.com)
            written = name if name.isascii() else name.encode("idna").decode("ascii")
        except UnicodeError:
            written = ""
        if not written or any(c.isspace() or c in "/:@[]" for c in written) or ("*" in written and written != "*"):
            raise EncdecError(f"--allowed-hosts: {name!r} is not a host name; give a comma list of names (a leading "
                              "dot allows a domain and the names under it), or '*' for any")
        names.append(written)
    loopback = _loopback_only(host)
    if names and "*" not in names and (not loopback or api_key is not None):  # given, and read by nothing
        log.warning("--allowed-hosts applies on a loopback --host without --api-key (where a web page could reach "
                    "the server under a name of its own): here every Host is answered, the option is ignored")
    if not loopback or api_key is not None or "*" in names:
        return None
    own = host.lower().rstrip(".")
    if not host_allowed(own, tuple(names)):  # the name it was started with is the machine's own: clients may use it
        names.append(own)
    return tuple(names)


def _loopback_only(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback one: not only localhost and 127.0.0.1 but 127.1,
    LOCALHOST, and the machine's own name where /etc/hosts maps it to 127.0.1.1 (a server started on one of those had
    no Host check). A name that does not resolve is no loopback (check_address refuses it)."""
    import ipaddress
    import socket

    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM) if host else []
    except (socket.gaierror, UnicodeError, ValueError):
        return False
    return bool(found) and all(ipaddress.ip_address(address[0].split("%")[0]).is_loopback for *_, address in found)


class ConnectionLimit:
    """--max-connections, counted as uvicorn's limit_concurrency counts (the connections open, this one included, and
    the requests in flight), but past it only the API's requests get 503, in its error shape: /health and /metrics
    answer whatever the load (with uvicorn's own limit a liveness probe failed at capacity, and the orchestrator
    restarted a server for being busy; the scrape that would have shown the load was refused with it).

    `count` (set once the server exists, `serve`) says how many are open; None (the app without uvicorn) sets no
    limit."""

    def __init__(self, app: Any, limit: int, count: Callable[[], Callable[[], int] | None],
                 answer: Callable[[str, Response], Response]) -> None:
        self.app, self.limit, self.count, self.answer = app, limit, count, answer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        count = self.count()
        if scope["type"] == "http" and scope["path"] not in PROBE_PATHS and count is not None \
                and count() > self.limit:
            endpoint = scope["path"] if scope["path"] in API_PATHS else "other"
            refused = APIError(503, f"the server holds {self.limit} connection(s), its limit (--max-connections); "
                               "retry later", kind="server_error")
            await self.answer(endpoint, _error(refused))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(model: EncoderDecoder, tokenizer: Any, settings: Settings) -> FastAPI:
    service = Service(model, tokenizer, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        service.scheduler.start()
        yield
        # uvicorn runs this once every connection has closed, unless a drain forced its exit (`_close_the_rest`,
        # with the scheduler idle or aborted by then: its thread, a daemon, ends with the process); a pass still
        # running must not keep the process past the close a --shutdown-timeout drain promised (clients gone)
        close_by = app.state.close_by
        wait = SHUTDOWN_WAIT_S if close_by is None else max(0.0, close_by - time.monotonic())
        await asyncio.to_thread(service.scheduler.stop, wait)

    # FastAPI's pages of the API (/docs, /redoc, /openapi.json) lie outside /v1/, where the key is asked: served
    # only without one; /health answers HEAD too (load balancers' checks)
    hidden = {"docs_url": None, "redoc_url": None, "openapi_url": None} if settings.api_key is not None else {}
    app = FastAPI(title="encdec", lifespan=lifespan, **hidden)
    app.state.service, app.state.draining = service, False
    app.state.close_by = None  # with --shutdown-timeout, once draining: when the process closes at the latest
    app.state.open_connections = None  # () -> the connections open and requests in flight, once uvicorn serves

    def open_for_requests() -> None:
        if app.state.draining:
            raise APIError(503, "the server is shutting down", kind="server_error")

    def served(name: str | None) -> None:
        if name is not None and name != settings.model_id:
            raise APIError(404, f"the model {json.dumps(cut(name))} is not served here; this server serves "
                           f"{settings.model_id!r}",
                           "model", code="model_not_found")

    def answer(endpoint: str, response: Response) -> Response:
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    if settings.max_connections is not None:
        app.add_middleware(ConnectionLimit, limit=settings.max_connections, answer=answer,
                           count=lambda: app.state.open_connections)
    if settings.api_key is not None:
        app.add_middleware(APIKeyCheck, key=settings.api_key, answer=answer)
    if settings.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=settings.allowed_hosts, answer=answer)
    if settings.allowed_origins:  # added last, so outermost: a browser's preflight carries no key, and a 401 gets
        # the headers that let the page read it
        # any request header: the openai JavaScript client sends headers of its own (X-Stainless-*) with every call
        # a page of an allowed origin calling a server on this machine or network: Chromium's preflight asks for the
        # private network too (Private Network Access), and was refused, 400 (a Starlette of before the option: none)
        private = ({"allow_private_network": True}
                   if "allow_private_network" in inspect.signature(CORSMiddleware.__init__).parameters else {})
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600, **private)

    async def generate(request: Request, kind: str) -> Response:
        endpoint = f"/v1/{'chat/' if kind == 'chat' else ''}completions"
        arrived = time.perf_counter()  # latency and time to first token count reading, parsing and tokenizing too
        try:
            open_for_requests()

            # parsed, checked and tokenized in one job of the reader thread: as two, a parsed body (token ids: 6x its
            # bytes) waited for its second job behind the other requests' parses, all of them held at once
            def read(raw: bytes) -> tuple[Parsed, list[list[int]]]:
                parsed = parse(raw, kind, settings.limits)
                served(parsed.model)
                service.scheduler.check_size(max(len(parsed.prompts), 1) * parsed.n, "n" if parsed.n > 1 else "prompt")
                return parsed, service.tokens(parsed)

            parsed, prompts = await service.off_loop(read, await read_body(request))
            loop = asyncio.get_running_loop()
            stops = frozenset() if parsed.ignore_eos else service.eos
            jobs = [Job(prompt, Row(parsed.max_tokens, stops, parsed.sampling.nth(i),
                                    logprobs=parsed.logprobs, decoder_prefix=settings.framing.decoder), loop,
                        arrived=arrived)
                    for prompt in prompts for i in range(parsed.n)]
            service.scheduler.submit(*jobs, param="n" if parsed.n > 1 else "prompt")
        except APIError as e:
            return answer(endpoint, _error(e))
        except Exception as e:  # a bug, answered in the API's shape and counted, not a bare 500
            log.exception("request failed")
            return answer(endpoint, _error(_server_failed(e)))
        meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": settings.model_id}
        if parsed.stream:
            return answer(endpoint, EventStream(_stream(jobs, parsed, meta), lambda: release(jobs)))
        return answer(endpoint, await _complete(request, jobs, parsed, meta))

    def release(jobs: list[Job], failed: bool = False) -> None:
        """End a request's choices still generating (a job already ended is left alone): "cancelled" when its client
        went away, "error" when another of its choices failed the request (it was counted as the client's leaving)."""
        for job in jobs:
            service.scheduler.cancel(job, "error" if failed else "cancelled")

    async def _collect(request: Request, job: Job, parsed: Parsed) -> Answer | None:
        """One choice's tokens until it ends; None when the client went away (asked every DISCONNECT_POLL_S,
        whether or not tokens are arriving)."""
        out = Answer(TextStream(tokenizer, parsed.stop), service.logprobs(parsed))
        checked = time.monotonic()
        while True:
            try:
                item, arrived = _token(await asyncio.wait_for(job.tokens.get(), DISCONNECT_POLL_S)), True
            except TimeoutError:
                item, arrived = None, False
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    return None
                checked = time.monotonic()
            if not arrived:
                continue
            if item is None:
                break
            if out.add(item):
                service.scheduler.cancel(job, "stop")
                break
        if not out.text.stopped:
            out.settle()  # the end of an unfinished character
        out.finish = "stop" if out.text.stopped else job.row.finish_reason
        service.scheduler.count(job, out.finish)
        return out

    async def _complete(request: Request, jobs: list[Job], parsed: Parsed, meta: dict) -> Response:
        tasks = [asyncio.ensure_future(_collect(request, job, parsed)) for job in jobs]
        failed = False
        try:
            answers = await asyncio.gather(*tasks)
        except APIError as e:
            failed = True
            return _error(e)
        except Exception as e:  # a bug while reading the answers: in the API's shape, not a bare 500
            failed = True
            log.exception("request failed")
            return _error(_server_failed(e))
        finally:
            release(jobs, failed)
            for task in tasks:  # the other choices of a request that failed: not left running, their errors read
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if any(a is None for a in answers):
            return Response(status_code=499)
        def response() -> JSONResponse:
            return JSONResponse({
                **meta, "object": "chat.completion" if parsed.kind == "chat" else "text_completion",
                "choices": [_choice(parsed.kind, i, a.text.text, a.finish, False, a.logprobs and a.logprobs.render())
                            for i, a in enumerate(answers)],
                "usage": _usage(_prompt_tokens(jobs, parsed), sum(len(a.text.tokens) for a in answers))})

        try:  # many choices' log-probabilities, rendered (a second for 64 chat choices of 512) and encoded: not on
            return await service.off_loop(response)  # the event loop, where every other stream would wait for them
        except Exception as e:  # a value JSON cannot hold: in the API's shape, not a bare 500
            log.exception("request failed")
            return _error(_server_failed(e))

    async def _stream(jobs: list[Job], parsed: Parsed, meta: dict) -> AsyncIterator[str]:
        """Server-sent events of every choice's text as it settles (choices interleaved, each with its index),
        each choice's finish, the usage, then [DONE] (after an error event too). The usage rides on the last
        choice's finish chunk, so that every chunk has a choice (clients read `chunk.choices[0]`), unless the
        request asked for it apart (stream_options.include_usage true, as the OpenAI API sends it: `"usage": null`
        on every chunk, then a chunk with no choices) or not at all (include_usage false)."""
        obj = "chat.completion.chunk" if parsed.kind == "chat" else "text_completion"
        apart = {"usage": None} if parsed.stream_usage == "apart" else {}

        def event(choices: list, **extra: Any) -> str:
            return f"data: {json.dumps({**meta, 'object': obj, 'choices': choices, **apart, **extra})}\n\n"

        def usage() -> dict:
            return _usage(_prompt_tokens(jobs, parsed), sum(len(a.text.tokens) for a in answers))

        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: Job) -> None:
            while True:
                item = await job.tokens.get()
                await merged.put((index, item))
                if not isinstance(item, Emitted):
                    return

        pumps = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        answers = [Answer(TextStream(tokenizer, parsed.stop), service.logprobs(parsed)) for _ in jobs]
        failed = False
        try:
            if parsed.kind == "chat":
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(jobs))])
            while any(a.finish is None for a in answers):
                index, item = await merged.get()
                out = answers[index]
                if out.finish is not None:  # tokens (or a later step's error) still queued when a stop string ended it
                    continue
                item = _token(item)
                stopped = item is not None and out.add(item)
                if stopped:  # out of the batch before the last piece is sent (a slow reader holds the stream there)
                    service.scheduler.cancel(jobs[index], "stop")
                piece = out.piece if item is not None else ""
                if piece:  # with the stop's cut, the rest of the answer's tokens (the one the cut runs through)
                    yield event([_choice(parsed.kind, index, piece, None, True, out.pending(ended=stopped))])
                if item is not None and not stopped:
                    continue
                rest = "" if stopped else out.settle()
                if rest:
                    yield event([_choice(parsed.kind, index, rest, None, True, out.pending(ended=True))])
                out.finish = "stop" if out.text.stopped else jobs[index].row.finish_reason
                service.scheduler.count(jobs[index], out.finish)
                last = all(a.finish is not None for a in answers)
                yield event([_choice(parsed.kind, index, None, out.finish, True, out.pending(ended=True))],
                            **({"usage": usage()} if last and parsed.stream_usage == "inline" else {}))
            if parsed.stream_usage == "apart":
                yield event([], usage=usage())
            yield "data: [DONE]\n\n"
        except APIError as e:  # an error event, then [DONE] as after any stream (a reader may wait for it)
            failed = True
            yield f"data: {json.dumps(e.body())}\n\ndata: [DONE]\n\n"
        except Exception as e:  # a bug mid-stream: an error event, as for a failed step
            failed = True
            log.exception("request failed")
            yield f"data: {json.dumps(_server_failed(e).body())}\n\ndata: [DONE]\n\n"
        finally:  # the client went away mid-stream (the task is cancelled): free the slots at once
            release(jobs, failed)
            for task in pumps:
                task.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        """The encoder's states of each input, pooled (--pooling) and scaled to unit length."""
        try:
            open_for_requests()

            def read(raw: bytes) -> tuple[list[list[int]], bool]:  # one job, as generate's (there)
                parsed = parse_embeddings(raw, model.config.encoder.hidden_size)
                served(parsed.model)
                return [service.ids(text, "input") for text in parsed.inputs], parsed.base64

            prompts, as_base64 = await service.off_loop(read, await read_body(request))
            job = EmbedJob(prompts, asyncio.get_running_loop())
            service.scheduler.submit(job)
            while True:
                try:
                    vectors = (await asyncio.wait_for(asyncio.shield(job.result), DISCONNECT_POLL_S)).numpy()
                    break
                except TimeoutError:
                    if await request.is_disconnected():
                        job.result.cancel()  # the scheduler encodes nothing more for it
                        return answer("/v1/embeddings", Response(status_code=499))
        except APIError as e:
            return answer("/v1/embeddings", _error(e))
        except Exception as e:  # noqa: BLE001 - the encoder pass failed: the scheduler logged it
            return answer("/v1/embeddings", _error(APIError(500, f"embedding failed: {e}", kind="server_error")))
        tokens = sum(len(p) for p in prompts)

        def body() -> Response:  # off the event loop: the JSON of 2,048 inputs' floats takes seconds
            data = [{"object": "embedding", "index": i, "embedding":
                     base64.b64encode(v.astype("<f4").tobytes()).decode() if as_base64 else v.tolist()}
                    for i, v in enumerate(vectors)]
            return JSONResponse({"object": "list", "data": data, "model": settings.model_id,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

        try:
            return answer("/v1/embeddings", await service.off_loop(body))
        except Exception as e:  # vectors JSON cannot hold (not finite): in the API's shape, counted
            log.exception("request failed")
            return answer("/v1/embeddings", _error(_server_failed(e)))

    async def answered(endpoint: str, request: Request, work: Callable[[bytes], Response]) -> Response:
        """`work` on the request's body, off the event loop, and its answer; errors in the API's shape, counted."""
        try:
            open_for_requests()
            return answer(endpoint, await service.off_loop(work, await read_body(request)))
        except APIError as e:
            return answer(endpoint, _error(e))
        except Exception as e:  # a bug, answered in the API's shape and counted, not a bare 500
            log.exception("request failed")
            return answer(endpoint, _error(_server_failed(e)))

    def tokenized(raw: bytes) -> Response:
        parsed = parse_tokenize(raw)
        served(parsed.model)
        ids = service.tokenized(parsed)
        strings = {"token_strs": tokenizer.convert_ids_to_tokens(ids)} if parsed.token_strs else {}
        return JSONResponse({"count": len(ids), "max_model_len": settings.limits.max_input_tokens, "tokens": ids,
                             **strings})

    def detokenized(raw: bytes) -> Response:
        name, ids = parse_detokenize(raw, settings.limits.max_input_tokens + settings.limits.max_new_tokens)
        served(name)
        if (bad := outside_vocabulary(ids, len(tokenizer))) is not None:
            raise APIError(400, f"token id {bad} is outside the tokenizer's vocabulary (0 to {len(tokenizer) - 1})",
                           "tokens")
        return JSONResponse({"prompt": tokenizer.decode(ids)})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        """vLLM's: the token ids of a completion's `prompt` or a chat's `messages`, as the server reads them (what
        --max-input-tokens counts: a UL2-pretrained model's sentinel, added after, is not among them), and the
        limit, so that a client can fit its prompt before sending it."""
        return await answered("/tokenize", request, tokenized)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        """vLLM's: the text of token ids (special tokens written out)."""
        return await answered("/detokenize", request, detokenized)

    @app.exception_handler(HTTPException)
    async def not_here(_: Request, e: HTTPException) -> Response:
        """Unknown paths (404) and methods (405) answered in the API's error shape (counted as "other")."""
        response = _error(APIError(e.status_code, f"{e.detail}: this server answers /v1/completions, "
                                   "/v1/chat/completions, /v1/embeddings, /v1/models, /tokenize, /detokenize, /health "
                                   "and /metrics"))
        response.headers.update(e.headers or {})  # a 405's Allow, which HTTP requires
        return answer("other", response)

    def described() -> dict:  # with vLLM's max_model_len (what a prompt may hold: clients size their inputs by it)
        return {"id": settings.model_id, "object": "model", "created": service.created, "owned_by": "encdec",
                "max_model_len": settings.limits.max_input_tokens}

    @app.get("/v1/models")
    async def models() -> Response:
        return answer("/v1/models", JSONResponse({"object": "list", "data": [described()]}))

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> Response:  # counted with /v1/models: a label per name would not be bounded
        try:
            served(name)
        except APIError as e:
            return answer("/v1/models", _error(e))
        return answer("/v1/models", JSONResponse(described()))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if app.state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if service.scheduler.failed is not None:  # requests would get 503: a probe should see it and restart us
            return JSONResponse({"status": "failed", "error": repr(service.scheduler.failed)[:200]}, status_code=503)
        failing = service.scheduler.failing()
        if failing is not None:  # every pass fails (caches too large for the memory?): requests get 500s
            return JSONResponse({"status": "failing", "error": repr(failing)[:200]}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, on SIGTERM / SIGINT, first marks the app as draining (new requests get 503), and
    exits FLUSH_AFTER_DRAIN_S after the last queued or running request ended: uvicorn would wait for every
    connection to close, and one client that stalls (a body that never arrives, a stream it stops reading)
    would keep the process up for good."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.encdec_app = app
        self.watch: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._drain()
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        """Stop taking requests, and start the watch that ends the server once they are done (on the event loop's
        thread, where signals are handled)."""
        scheduler = self.encdec_app.state.service.scheduler
        timeout = self.encdec_app.state.service.settings.shutdown_timeout_s
        if not self.encdec_app.state.draining and timeout is not None:
            self.encdec_app.state.close_by = time.monotonic() + timeout + FLUSH_AFTER_DRAIN_S
        self.encdec_app.state.draining = True
        scheduler.stop_accepting()
        if self.watch is None:
            self.watch = threading.Thread(target=self._exit_when_drained, daemon=True,
                                          args=(scheduler, asyncio.get_running_loop()))
            self.watch.start()

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (every 0.1 s), which also stops the server once its scheduler has failed: it could only
        answer 503 from then on, and a process that stays up is restarted by nothing but a health probe (vLLM's
        API server exits when its engine dies too); `serve` then fails with the scheduler's error. Not through
        `handle_exit`, whose signal uvicorn raises again once it has stopped: the process died by SIGTERM before
        `serve` could say why (and systemd's Restart=on-failure takes such a death for a clean stop)."""
        if self.encdec_app.state.service.scheduler.failed is not None and not self.encdec_app.state.draining:
            log.error("the scheduler failed: the server stops, for whatever supervises it to start it again")
            self._drain()
            self.should_exit = True
        return await super().on_tick(counter)

    def _exit_when_drained(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
        """Once nothing is queued or running, FLUSH_AFTER_DRAIN_S for the answers to be read, then close what is still
        open. With --shutdown-timeout S: at S, what is left ends with a 503, and the server closes at S +
        FLUSH_AFTER_DRAIN_S at the latest, a pass still running then (a long encoder pass) or not."""
        timeout = self.encdec_app.state.service.settings.shutdown_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        aborted = None
        while not scheduler.idle():
            now = time.monotonic()
            if aborted is None and deadline is not None and now >= deadline:
                log.warning("--shutdown-timeout %g s: the requests still queued or running end now", timeout)
                scheduler.abort(APIError(503, f"the server shut down before this request finished (--shutdown-timeout "
                                              f"{timeout:g} s); send it again", kind="server_error"))
                aborted = now
            if aborted is not None and now - aborted >= FLUSH_AFTER_DRAIN_S:
                log.warning("the scheduler is still in a pass %g s after --shutdown-timeout: closing without it",
                            FLUSH_AFTER_DRAIN_S)
                break
            time.sleep(0.1)
        flush = FLUSH_AFTER_DRAIN_S if aborted is None else FLUSH_AFTER_DRAIN_S - (time.monotonic() - aborted)
        time.sleep(max(flush, 0.0))
        loop.call_soon_threadsafe(self._close_the_rest)

    def _close_the_rest(self) -> None:
        """Stop waiting for the connections still open, and drop them (from Python 3.12 on, the listening server
        waits for its connections to close too): aborted, not closed, since a close waits to send what is buffered,
        which a client that stopped reading a stream never takes."""
        if self.server_state.connections:
            log.warning("closing %d connection(s) still open %g s after the last request ended",
                        len(self.server_state.connections), FLUSH_AFTER_DRAIN_S)
        self.force_exit = True
        for connection in list(self.server_state.connections):
            connection.transport.abort()


def check_address(host: str, port: int) -> None:
    """Refuse, before a model is loaded, an address the server could not listen on (a port in use, a host name that
    does not resolve), binding it as asyncio's create_server will for uvicorn: every address the host resolves
    to, IPv6 ones alone (IPV6_V6ONLY), families this machine lacks skipped; then released."""
    import socket

    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError) as e:  # UnicodeError: an empty or overlong label (127..0.1)
        reason = e.strerror if isinstance(e, socket.gaierror) else "not a host name"
        raise EncdecError(f"--host {host}: {reason}; give an address of this machine (127.0.0.1, 0.0.0.0, "
                          "::1, a host name)") from None
    if port == 0:  # any free port: nothing to be taken
        return
    for family, kind, proto, _, address in found:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:  # an address family this kernel lacks: asyncio skips it too
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as e:
                shown = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
                raise EncdecError(f"cannot listen on {shown}:{port} ({e.strerror}); choose another --port or "
                                  "--host") from None


def check_tls(certfile: str | None, keyfile: str | None) -> tuple[str, str] | None:
    """(certfile, keyfile) for HTTPS, both given and loadable (refused before the model loads, in one line, rather
    than by uvicorn's traceback once it has); None for neither."""
    import ssl

    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise EncdecError("HTTPS needs both --ssl-certfile (the certificate chain, PEM) and --ssl-keyfile (its "
                          "private key, PEM); give both, or neither for plain HTTP")
    try:
        certfile, keyfile = (str(Path(f).expanduser()) for f in (certfile, keyfile))
    except RuntimeError as e:  # ~nouser/, or ~/ without a HOME
        raise EncdecError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: {e}; give the paths without ~ "
                          "there") from None

    def encrypted() -> bytes:  # else OpenSSL asks for the passphrase on the terminal, and a service waits for good
        raise EncdecError(f"--ssl-keyfile {keyfile}: the key is encrypted; give it decrypted (openssl pkey -in KEY "
                          "-out KEY.pem), readable by this server's user only")

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile, password=encrypted)
    except (OSError, ssl.SSLError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise EncdecError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: cannot load them ({reason}); "
                          "expected a PEM certificate chain and the PEM private key that matches it") from None
    return certfile, keyfile


def check_origins(given: str | None) -> tuple[str, ...]:
    """--allowed-origins as a tuple: "*", or a comma list of origins written as browsers send them in the Origin
    header (compared as strings): scheme://host[:port], lower case, without the scheme's default port or a path.
    Other spellings of an origin are written that way; what is no origin is refused: a mistyped one would fail
    every browser request without a word."""
    from urllib.parse import urlsplit

    if given is None:
        return ()
    origins = [o.strip() for o in given.split(",")]
    if "*" in origins:
        if len(origins) > 1:
            raise EncdecError("--allowed-origins: '*' allows every origin; give it alone, or list the origins")
        return ("*",)
    written = []
    for origin in origins:
        try:
            parts = urlsplit(origin)
            port = parts.port
            # browsers send a name of other letters in its ASCII form (é.com: xn--9ca.com)
            hostname = (parts.hostname or "").encode("idna").decode("ascii")
        except (ValueError, UnicodeError):  # a port that is no number or out of range; [::1 unclosed; a bad label
            parts, port, hostname = None, 0, ""
        if parts is None or parts.scheme not in ("http", "https") or not hostname or port == 0 \
                or origin.endswith(":") or parts.path or parts.query or parts.fragment or parts.username is not None \
                or "*" in origin or any(c.isspace() for c in origin):
            raise EncdecError(f"--allowed-origins: {origin!r} is not an origin; give '*' or a comma list of "
                              "scheme://host[:port] (e.g. https://app.example.com,http://localhost:3000), no paths")
        host = f"[{hostname}]" if ":" in hostname else hostname
        default = {"http": 80, "https": 443}[parts.scheme]
        written.append(f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else ""))
    return tuple(dict.fromkeys(written))


def serve(model: EncoderDecoder, tokenizer: Any, settings: Settings, host: str, port: int) -> None:
    app = create_app(model, tokenizer, settings)
    # the scheduler's warm-up (--compile: minutes) before uvicorn takes the signals: Ctrl-C stops it, and a failure
    # is this command's error, not an application that failed to start
    try:
        app.state.service.scheduler.start()
    except Exception as e:  # only --compile's warm-up runs there
        raise EncdecError(f"--compile: compiling the decoding step failed ({described(e)}); serve "
                          "without --compile") from e
    certfile, keyfile = settings.tls or (None, None)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=None,
                            timeout_keep_alive=settings.keep_alive_s, ssl_certfile=certfile, ssl_keyfile=keyfile,
                            access_log=settings.access_log)
    server = DrainingServer(config, app)
    state = server.server_state
    app.state.open_connections = lambda: max(len(state.connections), len(state.tasks))  # (--max-connections)
    server.run()
    failed = app.state.service.scheduler.failed
    if failed is not None:
        raise EncdecError(f"the server stopped: its scheduler failed ({failed!r:.300}); start it again")
