"""`encdec serve` as a real process on a loopback port, driven by the real `openai` client and httpx:
completions, chat, streaming, continuous batching equal to solo generation, bad requests, disconnects, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

import encdec
from encdec.data.instructions import chat_prompt
from encdec.serve.app import DISCONNECT_POLL_S
from encdec.sources import load_tokenizer

HOST = "127.0.0.1"
LONG = 200  # a budget long enough to still be running when the test acts on it
# 2,048 inputs of 24 tokens: hundreds of encoder passes of the module server's --max-batch (4) inputs
LONG_EMBEDDING_REQUEST = {"input": [[5 + i % 50] * 24 for i in range(2048)], "encoding_format": "float"}
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _metric(base: str, name: str, verify: ssl.SSLContext | bool = True) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10, verify=verify).text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Server:
    """An `encdec serve` subprocess on a free loopback port."""

    def __init__(self, checkpoint, *options: str, verify: ssl.SSLContext | None = None) -> None:
        """`verify`: a context trusting the server's certificate, for a server given one (HTTPS)."""
        self.port = _free_port()
        self.base = f"{'https' if verify is not None else 'http'}://{HOST}:{self.port}"
        self.verify = verify if verify is not None else True
        self.process = subprocess.Popen(
            [sys.executable, "-m", "encdec.cli", "serve", str(checkpoint), "--host", HOST, "--port", str(self.port),
             *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            _wait_for(self._up, START_TIMEOUT_S, "the server to answer /health")
        except BaseException:  # a server that never answers is not left running after the test
            self.close()
            raise

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited: {self.process.stdout.read()}")
        try:
            return httpx.get(f"{self.base}/health", timeout=2, verify=self.verify).status_code == 200
        except httpx.TransportError:
            return False

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=60,
                             http_client=httpx.Client(verify=self.verify))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=30)


@pytest.fixture(scope="module")
def checkpoint(sources, tmp_path_factory):
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    out = tmp_path_factory.mktemp("serve") / "tiny"
    encdec.save(model, out, tokenizer_dir=sources["gemma3"])
    return out


@pytest.fixture(scope="module")
def local(checkpoint):
    return encdec.load(checkpoint), load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint, "--max-batch", "4", "--max-queue", "16", "--max-input-tokens", "24",
               "--max-new-tokens", str(LONG))
    yield s
    s.close()


def _app(local, tokenizer=None, limits: tuple[int, int] = (24, 8), **settings):
    """The server's app in this process over the tiny model (httpx's ASGI transport talks to it, no socket)."""
    from encdec.serve.app import Settings, create_app
    from encdec.serve.protocol import Limits

    model, loaded = local
    return create_app(model, tokenizer or loaded,
                      Settings("tiny", max_batch=2, max_queue=2, limits=Limits(*limits), **settings))


def _asked(app, ask, *, scheduler: bool = True):
    """What `ask(client)` returns, `client` talking to `app` in this process, with its scheduler running."""
    import asyncio

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{HOST}") as client:
            return await ask(client)

    if not scheduler:
        return asyncio.run(run())
    app.state.service.scheduler.start()
    try:
        return asyncio.run(run())
    finally:
        app.state.service.scheduler.stop(5)


def _solo_tokens(local, text: str, max_tokens: int, **sampling) -> list[int]:
    model, tokenizer = local
    return model.generate(torch.tensor([tokenizer(text).input_ids]), max_new_tokens=max_tokens, **sampling)[0].tolist()


def _solo(local, text: str, max_tokens: int, **sampling) -> str:
    return local[1].decode(_solo_tokens(local, text, max_tokens, **sampling), skip_special_tokens=True)


def _endless(local, framed) -> str:
    """A text whose greedy continuation (of `framed(text)`) has no stop token within LONG tokens."""
    model, tokenizer = local
    candidates = [f"w{start} w{start + 1}" for start in range(10, 42)]  # all 3 tokens long: one batch
    out = model.generate(torch.tensor([tokenizer(framed(text)).input_ids for text in candidates]), max_new_tokens=LONG)
    turn_end = tokenizer.get_vocab().get("<end_of_turn>")  # the server stops on it too, where the vocabulary has it
    stop_ids = [*model.config.eos_token_ids, *([] if turn_end is None else [turn_end])]
    ended = torch.isin(out, torch.tensor(stop_ids)).any(1)
    for text, stops in zip(candidates, ended):
        if out.shape[1] == LONG and not stops:
            return text
    raise AssertionError("no prompt without an early EOS")


@pytest.fixture(scope="module")
def endless_prompt(local) -> str:
    """A prompt whose greedy continuation has no EOS within LONG tokens, so it is still running when acted on."""
    return _endless(local, lambda text: text)


def test_completion_chat_and_models_equal_solo_generation(server, local):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [str(server.process.args[4])]
    assert client.models.list().data[0].max_model_len == 24  # --max-input-tokens, as vLLM's field
    model_id = server.process.args[4]
    done = client.completions.create(model=model_id, prompt="w1 w2 w3", max_tokens=8, user="ignored",
                                     temperature=0)
    assert done.choices[0].text == _solo(local, "w1 w2 w3", 8)
    assert done.usage.prompt_tokens == 4  # BOS + 3 words
    assert done.usage.completion_tokens == len(local[1](done.choices[0].text).input_ids) - 1
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "w4 w5"}], max_tokens=6,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == _solo(local, chat_prompt([("user", "w4 w5")]), 6)
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_ignore_eos_generates_past_the_models_stop_tokens_and_metrics_describe_the_process(server, local):
    """vLLM's `ignore_eos` (the openai client's extra_body): a prompt whose answer ends early with EOS runs to its
    max_tokens, the same tokens as generating without stop tokens; /metrics has the process's own series too."""
    model, tokenizer = local
    candidates = [f"w{i} w{i + 3}" for i in range(40)]
    ended = next(text for text in candidates if len(_solo_tokens(local, text, 24)) < 24)  # trailing pads: none
    client = server.client()
    plain = client.completions.create(model=server.process.args[4], prompt=ended, max_tokens=24, temperature=0)
    assert plain.choices[0].finish_reason == "stop"
    kept_on = client.completions.create(model=server.process.args[4], prompt=ended, max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert kept_on.choices[0].finish_reason == "length" and kept_on.usage.completion_tokens == 24
    expected = _solo_tokens(local, ended, 24, eos_token_ids=[])
    assert kept_on.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    scored = client.completions.create(model=server.process.args[4], prompt=ended, max_tokens=24, temperature=0,
                                       logprobs=0, extra_body={"ignore_eos": True})
    assert len(scored.choices[0].logprobs.token_logprobs) == 24  # the stop tokens it went past listed too
    refused = httpx.post(f"{server.base}/v1/completions", json={"prompt": ended, "ignore_eos": 1}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "ignore_eos"
    assert _metric(server.base, "process_resident_memory_bytes") > 2**20


def test_streaming_sends_the_same_text_then_usage_and_done(server, local):
    client = server.client()
    pieces, usage, finish = [], None, None
    stream = client.chat.completions.create(model=server.process.args[4], stream=True, max_tokens=7, temperature=0,
                                            messages=[{"role": "system", "content": "w9"},
                                                      {"role": "user", "content": "w4 w5"}])
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == _solo(local, chat_prompt([("user", "w9\n\nw4 w5")]), 7)
    assert usage is not None and usage.completion_tokens <= 7 and finish in ("length", "stop")
    raw = httpx.post(f"{server.base}/v1/completions",
                     json={"prompt": "w1", "max_tokens": 3, "stream": True, "temperature": 0},
                     timeout=30)
    events = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    # every chunk has a choice (clients index chunk.choices[0]); the usage rides on the last, the finish
    assert all(c["choices"] for c in chunks)
    assert [("usage" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    apart = httpx.post(f"{server.base}/v1/completions", timeout=30, json={
        "prompt": "w1", "max_tokens": 3, "stream": True, "temperature": 0, "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in apart.text.splitlines() if line.startswith("data: {")]
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)  # as the OpenAI API streams it
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == chunks[-1]["usage"] | {"completion_tokens": 3}
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "".join(c["choices"][0]["text"] for c in
                                                                          [json.loads(e[6:]) for e in events[:-1]])


@pytest.mark.parametrize("options", [{"include_usage": False}, {}, {"include_usage": None}])  # OpenAI's include_usage defaults to false
def test_a_stream_asked_without_usage_has_none(server, options):
    reply = httpx.post(f"{server.base}/v1/completions", timeout=30, json={
        "prompt": "w1", "max_tokens": 3, "stream": True, "temperature": 0, "stream_options": options})
    chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    assert chunks and all(c["choices"] for c in chunks) and not any("usage" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # not held back by a proxy (nginx buffers a response unless told), nor cached
    assert reply.headers["x-accel-buffering"] == "no" and reply.headers["cache-control"] == "no-cache"


def test_top_p_zero_keeps_the_likeliest_token_and_empty_tools_are_no_tools(server, local):
    """OpenAI accepts top_p 0 (the likeliest token alone) and an empty tools list, as clients send them."""
    client = server.client()
    model_id = server.process.args[4]
    sampled = client.completions.create(model=model_id, prompt="w1 w2 w3", max_tokens=8, temperature=1.5, top_p=0,
                                        seed=3)
    assert sampled.choices[0].text == _solo(local, "w1 w2 w3", 8)
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "w4 w5"}],
                                          max_tokens=6, temperature=0, tools=[])
    assert chat.choices[0].message.content == _solo(local, chat_prompt([("user", "w4 w5")]), 6)

def test_concurrent_requests_each_equal_solo_generation(server, local):
    """More requests than batch slots, of different lengths and sampling settings, arriving together."""
    client = server.client()
    requests = [(" ".join(f"w{(7 * i + j) % 60}" for j in range(1 + 3 * i % 17)), 5 + 3 * i % 11, i % 3 == 0, i)
                for i in range(10)]

    def ask(request):
        prompt, max_tokens, sample, seed = request
        options = {"temperature": 1.3, "extra_body": {"top_k": 40}, "seed": seed} if sample else {"temperature": 0}
        return client.completions.create(model=server.process.args[4], prompt=prompt, max_tokens=max_tokens,
                                         **options).choices[0].text

    single, steps = (_metric(server.base, name) for name in ('encdec_batch_size_bucket{le="1.0"}',
                                                              "encdec_batch_size_count"))
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(ask, requests))
    for (prompt, max_tokens, sample, seed), answer in zip(requests, answers):
        options = {"do_sample": True, "temperature": 1.3, "top_k": 40, "seed": seed} if sample else {}
        assert answer == _solo(local, prompt, max_tokens, **options), prompt
    single = _metric(server.base, 'encdec_batch_size_bucket{le="1.0"}') - single
    assert single < _metric(server.base, "encdec_batch_size_count") - steps  # some of these steps decoded several


def test_stop_strings_cut_the_text(server, local):
    full = _solo(local, "w1 w2 w3", 8)
    stop = full.split()[3]
    cut = server.client().completions.create(model=server.process.args[4], prompt="w1 w2 w3", max_tokens=8, stop=[stop],
                                              temperature=0)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]
    # an empty list (some clients send one) is no stop string: it was a 500 (max() of nothing)
    whole = server.client().completions.create(model=server.process.args[4], prompt="w1 w2 w3", max_tokens=8, stop=[],
                                               temperature=0)
    assert whole.choices[0].text == full


def test_log_probabilities_end_with_the_stop_cut_and_stream_with_their_text(server, local):
    """A stop string across two tokens: the tokens after the cut are not listed (they were, leaking the stop text),
    the one the cut runs through is; streamed, an entry comes once its text has been sent, never before."""
    for prompt in (f"w{a} w{a + 1} w{a + 2}" for a in range(1, 60)):  # one whose answer does not repeat at once
        words = (full := _solo(local, prompt, 8)).split()
        if len(words) >= 5 and words[3] not in words[:3]:
            break
    stop = f"{words[3]} {words[4][:2]}"  # the fourth word whole, the start of the fifth: a stop across two tokens
    client, model_id = server.client(), server.process.args[4]
    options = {"prompt": prompt, "max_tokens": 8, "stop": [stop], "temperature": 0, "logprobs": 1}
    done = client.completions.create(model=model_id, **options).choices[0]
    text, listed = done.text, done.logprobs
    assert done.finish_reason == "stop" and text == full[: full.index(stop)] and text.split() == words[:3]
    assert all(offset < len(text) for offset in listed.text_offset) and len(listed.tokens) in (3, 4)
    assert "".join(listed.tokens).startswith(text) and not "".join(listed.tokens).endswith(words[4][:2])
    streamed, entries = "", []
    for chunk in client.completions.create(model=model_id, stream=True, **options):
        for c in chunk.choices:
            streamed += c.text or ""
            for token, offset in zip(c.logprobs.tokens, c.logprobs.text_offset) if c.logprobs else ():
                entries.append((token, offset))
                assert c.finish_reason is not None or offset + len(token) <= len(streamed)  # its text was sent
    assert streamed == text and entries == list(zip(listed.tokens, listed.text_offset))


def test_n_choices_are_requests_of_their_own(server, local):
    """n choices: a seeded request's choice i is the one-choice request with seed + i (choice 0 is that request
    itself), greedy choices are all the same; streamed, the choices interleave with their indices and each ends."""
    client, model_id = server.client(), server.process.args[4]
    encoded = _metric(server.base, "encdec_prompt_tokens_total")
    done = client.completions.create(model=model_id, prompt="w1 w2", max_tokens=6, n=3, seed=7, temperature=1.5)
    assert [c.index for c in done.choices] == [0, 1, 2]
    # the prompt is encoded once for its three choices, and counted once, in the usage and the metric alike
    assert _metric(server.base, "encdec_prompt_tokens_total") - encoded == done.usage.prompt_tokens == 3
    solo = [_solo_tokens(local, "w1 w2", 6, do_sample=True, temperature=1.5, seed=7 + i) for i in range(3)]
    assert [c.text for c in done.choices] == [local[1].decode(tokens, skip_special_tokens=True) for tokens in solo]
    assert len({c.text for c in done.choices}) > 1
    assert done.usage.completion_tokens == sum(len(tokens) for tokens in solo)
    greedy = client.completions.create(model=model_id, prompt="w1 w2", max_tokens=6, n=2, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text == _solo(local, "w1 w2", 6)
    prompts = ["w1 w2 w3", "w4", [2, 9, 10]]  # several prompts: choice p * n + i is prompt p's choice i
    both = client.completions.create(model=model_id, prompt=prompts, max_tokens=4, n=2, temperature=0)
    solo = [_solo(local, p, 4) for p in ("w1 w2 w3", "w4", local[1].decode([9, 10]))]
    assert [c.text for c in both.choices] == [text for text in solo for _ in range(2)]
    assert [c.index for c in both.choices] == list(range(6)) and both.usage.prompt_tokens == 4 + 2 + 3
    messages = [{"role": "user", "content": "w4 w5"}]
    whole = client.chat.completions.create(model=model_id, messages=messages, max_tokens=5, n=2, seed=3)
    texts, finished = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(model=model_id, messages=messages, max_tokens=5, n=2, seed=3,
                                                stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason is not None:
                finished[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finished == {c.index: c.finish_reason for c in whole.choices}


def test_penalties_and_logit_bias_equal_solo_generation(server, local):
    client, model_id = server.client(), server.process.args[4]
    settings = {"frequency_penalty": 2.0, "presence_penalty": -0.5, "logit_bias": {"7": 3.0}}
    for sampled in (False, True):
        options = {"temperature": 1.3, "seed": 4} if sampled else {"temperature": 0}
        done = client.completions.create(model=model_id, prompt="w1 w2 w3", max_tokens=10, **options, **settings,
                                         extra_body={"repetition_penalty": 1.3})
        solo = {"do_sample": True, "temperature": 1.3, "seed": 4} if sampled else {}
        assert done.choices[0].text == _solo(local, "w1 w2 w3", 10, frequency_penalty=2.0, presence_penalty=-0.5,
                                             logit_bias={7: 3.0}, repetition_penalty=1.3, **solo)
    assert done.choices[0].text != _solo(local, "w1 w2 w3", 10, do_sample=True, temperature=1.3, seed=4)


def test_embeddings_are_the_encoders_pooled_states(server, local):
    """/v1/embeddings through the openai client (which asks for base64) and as floats: the mean of the encoder's
    final states over each input, at unit length; token-id inputs; more inputs than --max-batch, in chunks."""
    model, tokenizer = local
    client, model_id = server.client(), server.process.args[4]
    texts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10"]
    done = client.embeddings.create(model=model_id, input=texts)
    assert [d.index for d in done.data] == [0, 1, 2]
    with torch.no_grad():
        for text, vector in zip(texts, done.data):
            states = model.encode(torch.tensor([tokenizer(text).input_ids]))[0]
            torch.testing.assert_close(torch.tensor(vector.embedding), F.normalize(states.mean(0), dim=0), atol=1e-5,
                                       rtol=1e-5)
    assert done.usage.prompt_tokens == done.usage.total_tokens == sum(len(tokenizer(t).input_ids) for t in texts)
    ids = tokenizer("w1 w2 w3").input_ids
    raw = httpx.post(f"{server.base}/v1/embeddings", timeout=30,
                     json={"input": [[5, 6, 7]] * 6 + [ids], "encoding_format": "float"}).json()
    vectors = [torch.tensor(d["embedding"]) for d in raw["data"]]
    assert len(vectors) == 7 and len(vectors[0]) == model.config.encoder.hidden_size
    torch.testing.assert_close(vectors[6], torch.tensor(done.data[0].embedding), atol=1e-5, rtol=1e-5)
    assert all(torch.allclose(v, vectors[0], atol=1e-6) for v in vectors[1:6])
    assert _metric(server.base, 'encdec_requests_total{endpoint="/v1/embeddings",status="200"}') >= 2


def _reference_logprobs(local, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """The model's float32 log-softmax at each generated position, teacher-forced on the generated tokens."""
    model, _ = local
    decoder = torch.tensor([[model.config.bos_token_id, *tokens[:-1]]])
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids]), decoder_input_ids=decoder).logits[0].float()
    return torch.log_softmax(logits, -1)


def test_special_tokens_chosen_add_no_logprob_text_and_are_named_as_alternatives(server, local):
    """The answer's text leaves out a special token the model picks (here <bos>, forced); its logprob entry has
    empty text too, so the entries still join into the answer, while a special alternative is named."""
    _, tokenizer = local
    client, model_id = server.client(), server.process.args[4]
    bos = tokenizer.bos_token_id
    done = client.completions.create(model=model_id, prompt="w1 w2", max_tokens=4, temperature=0, logprobs=2,
                                     logit_bias={str(bos): 100})
    choice = done.choices[0]
    assert choice.logprobs.tokens == [""] * 4 and choice.text == "" and choice.logprobs.text_offset == [0] * 4
    best = _reference_logprobs(local, tokenizer("w1 w2").input_ids, [bos] * 4).topk(2).indices  # unbiased
    named = [[tokenizer.decode([t]) for t in [*row.tolist(), *[bos] * (bos not in row)]] for row in best]
    assert [list(top) for top in choice.logprobs.top_logprobs] == named  # the sampled token too, named, as OpenAI's
    assert any(bos not in row for row in best.tolist())  # (at least once past the top 2)
    assert any(tokenizer.decode([t], skip_special_tokens=True) == "" for t in best.flatten().tolist())  # one is named
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "w3"}], max_tokens=2,
                                          temperature=0, logprobs=True, top_logprobs=1, logit_bias={str(bos): 100})
    assert [(e.token, e.bytes) for e in chat.choices[0].logprobs.content] == [("", [])] * 2


def test_logprobs_are_the_models_own_and_stream_as_they_complete(server, local):
    """Every token's log-probability and its likeliest alternatives, for a greedy and a sampled completion,
    equal the model's teacher-forced log-softmax; chat gives the same numbers in its shape, streamed or not."""
    model, tokenizer = local
    client, model_id = server.client(), server.process.args[4]
    prompt = "w1 w2 w3"
    ids = tokenizer(prompt).input_ids
    for options in ({"temperature": 0}, {"temperature": 1.3, "seed": 5}):
        done = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, logprobs=3, **options)
        choice = done.choices[0]
        choice_logprobs = choice.logprobs
        tokens = tokenizer(choice.text, add_special_tokens=False).input_ids
        assert len(choice_logprobs.tokens) == len(tokens) == done.usage.completion_tokens - (choice.finish_reason == "stop")
        assert "".join(choice_logprobs.tokens) == choice.text
        reference = _reference_logprobs(local, ids, tokens)
        for position, (token, given, top) in enumerate(zip(tokens, choice_logprobs.token_logprobs,
                                                           choice_logprobs.top_logprobs)):
            assert given == pytest.approx(reference[position, token].item(), abs=1e-4)
            best = reference[position].topk(3)  # each alternative's text: what it would have added to the answer
            listed = [*best.indices.tolist(), *[token] * (token not in best.indices)]  # and the sampled token's
            before = tokenizer.decode(tokens[:position])
            assert [before + text for text in top] == [tokenizer.decode([*tokens[:position], t]) for t in listed]
            assert list(top.values()) == pytest.approx(reference[position, listed].tolist(), abs=1e-4)
        offsets = choice_logprobs.text_offset
        assert offsets[0] == 0 and all(choice.text[o:].startswith(t) for o, t in zip(offsets, choice_logprobs.tokens))
    messages = [{"role": "user", "content": "w4 w5"}]
    chat = client.chat.completions.create(model=model_id, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
               and bytes(entry.bytes) == entry.token.encode() for entry in content)
    streamed = []
    for chunk in client.chat.completions.create(model=model_id, messages=messages, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        for c in chunk.choices:
            streamed += c.logprobs.content if c.logprobs is not None else []
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = client.chat.completions.create(model=model_id, messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content


BAD = [
    ("{not json", 400, None),
    ({"messages": [{"role": ["user"], "name": "a", "content": "w1"}]}, 400, "messages"),  # unhashable: was a 500
    ('["a list"]', 400, None),
    ({"prompt": "w1", "max_tokens": "8"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "w1"}], "max_completion_tokens": 2, "max_tokens": "8"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "w1"}], "max_completion_tokens": LONG + 1}, 400,
     "max_completion_tokens"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ["w1", 5]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "w1", "n": 0}, 400, "n"),
    ({"prompt": "w1", "n": 65}, 400, "n"),
    ({"prompt": ["w1"] * 11, "n": 2}, 400, "n"),  # 22 generations: more than --max-batch 4 + --max-queue 16 hold
    ({"prompt": ["w1"] * 21}, 400, "prompt"),  # 21 prompts, one choice each: the prompts asked for them
    ({"prompt": "w1", "best_of": 2}, 400, "best_of"),
    ({"prompt": "w1", "echo": True}, 400, "echo"),
    ({"prompt": "w1", "echo": 0}, 400, "echo"),  # (0 == False in Python: passed as false)
    ({"prompt": "w1", "best_of": True}, 400, "best_of"),
    ({"prompt": "w1", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "w1", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "w1", "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    ({"prompt": "w1", "stream": True, "stream_options": True}, 400, "stream_options"),
    ({"prompt": "w1", "stream_options": {"include_usage": True}}, 400, "stream_options"),  # without stream
    ({"messages": [{"role": "user", "content": "w1"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "w1"}], "logprobs": True, "top_logprobs": -1}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "w1"}], "logprobs": 3}, 400, "logprobs"),
    ({"prompt": "w1", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "w1", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "w1", "logit_bias": {"w1": 1}}, 400, "logit_bias"),
    ({"prompt": "w1", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": "w1", "logit_bias": {"96": 1}}, 400, "logit_bias"),
    ({"prompt": "w1", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "w1", "temperature": -1}, 400, "temperature"),
    ({"prompt": "w1", "top_p": -0.1}, 400, "top_p"),
    ({"prompt": "w1", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "w1", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"prompt": "w1", "top_k": -2}, 400, "top_k"),
    ({"prompt": "w1", "seed": 2**70}, 400, "seed"),
    ({"prompt": "w1", "max_tokens": LONG + 1}, 400, "max_tokens"),
    ({"prompt": "w1", "stream": "yes"}, 400, "stream"),
    ({"prompt": "w1", "stop": [""]}, 400, "stop"),
    ({"prompt": "w1", "stop": ["w1", "w" * 1001]}, 400, "stop"),
    ({"prompt": " ".join(["w1"] * 30)}, 400, "prompt"),
    ({"prompt": [5, 96]}, 400, "prompt"),
    ({"prompt": "w1", "model": "other"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "w1"}]}, 400, "messages"),
    ({"messages": "w1"}, 400, "messages"),
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [1.5]}, 400, "input"),
    ({"input": " ".join(["w1"] * 30)}, 400, "input"),
    ({"input": [[5, 96]]}, 400, "input"),
    ({"input": "w1", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "w1", "encoding_format": 0}, 400, "encoding_format"),  # read as "float", as null is
    ({"input": "w1", "encoding_format": ""}, 400, "encoding_format"),
    ({"input": "w1", "dimensions": 3}, 400, "dimensions"),
    ({"input": "w1", "temperature": 0}, 400, "temperature"),
    ({"input": "w1", "model": "other"}, 404, "model"),
    ({"prompt": "w1", "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),  # a digit to str.isdigit, not to int()
    ({"prompt": "w1", "logit_bias": {"7": 1, "07": 1}}, 400, "logit_bias"),  # token 7 twice, under two keys
    ({"prompt": "w1", "logit_bias": {"1" * 4301: 1}}, 400, "logit_bias"),  # too long for int(): it answered 500
    ('{"prompt": "w1", "temperature": 1' + "0" * 400 + "}", 400, "temperature"),  # math.isfinite raised: a 500
    ('{"prompt": "w1", "presence_penalty": NaN}', 400, None),  # Python's json reads NaN; JSON has none
    ('{"prompt": "w1", "temperature": 1e400}', 400, "temperature"),  # read as inf
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, None),  # nested too deeply to read
    ('{"prompt": "w1", "max_tokens": ' + "9" * 5000 + "}", 400, None),  # over Python's 4300 digits
    ('{"input": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, None),
    # half a surrogate pair, which no tokenizer reads and no answer can carry: a field's name gave a plain-text 500
    ('{"prompt": "w1", "\\ud800": 1}', 400, None),
    ('{"prompt": "w1 \\ud800"}', 400, "prompt"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', 400, "messages"),
    ('{"input": ["w1", "\\ud800 w2"]}', 400, "input"),
    ('{"prompt": "w1", "stop": ["\\ud83d"]}', 400, "stop"),
]
ENDPOINTS = {"messages": "chat/completions", "input": "embeddings"}


def test_half_a_surrogate_pair_is_found_however_the_body_writes_it_and_ids_are_not_walked(monkeypatch):
    """Every value of every body was walked for half a surrogate pair: millions of token ids took seconds on the one
    thread that parses every request. Only a body whose bytes can hold one is walked: an escape, the UTF-8 bytes
    of one (json decodes them), or a body in UTF-16 or UTF-32."""
    from encdec.serve import protocol
    from encdec.serve.protocol import APIError, Limits, parse

    limits = Limits(24, 8)
    for raw in ('{"prompt": "w1 \\ud800"}'.encode(), '{"prompt": "w1 \ud800"}'.encode("utf-8", "surrogatepass"),
                '{"prompt": "w1 \ud800"}'.encode("utf-16", "surrogatepass")):
        with pytest.raises(APIError, match="not half of a pair"):
            parse(raw, "completions", limits)
    walked = []
    real = protocol.lone_surrogate
    monkeypatch.setattr(protocol, "lone_surrogate", lambda text: walked.append(text) or real(text))
    parse(json.dumps({"prompt": [5] * 100_000, "max_tokens": 2}).encode(), "completions", limits)  # (refused later
    assert walked == []  # for its length, --max-input-tokens, once tokens are counted)


def test_errors_say_back_a_short_part_of_what_was_sent(local):
    """A model name, a field name or a chat role of megabytes came back whole in the error (38 MiB answers for a 40
    MB request, each encoded on the event loop); every other value was cut to 40 characters."""
    huge = "x" * 1_000_000

    async def ask(client):
        bodies = [("/v1/completions", {"prompt": "w1", "model": huge}),
                  ("/v1/completions", {"prompt": "w1", huge: 1}),
                  ("/v1/chat/completions", {"messages": [{"role": huge, "content": "w1"}]}),
                  ("/v1/embeddings", {"input": "w1", huge: 1}),
                  ("/v1/completions", {"prompt": "w1", "logit_bias": {"5": huge}})]
        return [await client.post(path, json=body) for path, body in bodies] + [
            await client.post("/v1/completions", content=b'{"prompt": "w1", "\\ud800' + huge.encode() + b'": 1}',
                              headers={"Content-Type": "application/json"})]

    answers = _asked(_app(local), ask)
    assert [a.status_code for a in answers] == [404, 400, 400, 400, 400, 400]
    assert all(len(a.content) < 1000 for a in answers), [len(a.content) for a in answers]


def test_an_unsupported_value_is_quoted_whole_or_cut_with_an_ellipsis():
    from encdec.serve.protocol import APIError, Limits, parse

    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with pytest.raises(APIError) as refused:
        parse(json.dumps({"prompt": "w1", "tools": tools}).encode(), "completions", Limits(24, 8))
    assert refused.value.message == ("""'tools' = [{"type": "function", "function": {"n... is not supported by this """
                                     "server (accepted: null or [])")
    with pytest.raises(APIError) as refused:
        parse(json.dumps({"prompt": "w1", "tools": [1]}).encode(), "completions", Limits(24, 8))
    assert refused.value.message.startswith("'tools' = [1] is not supported by this server")


def test_what_clients_send_at_values_that_change_nothing_is_accepted_and_the_rest_named():
    """Fields the openai client models (prompt_cache_retention, verbosity...) and vLLM's own at their defaults
    (clients written for vLLM send them) were refused as unrecognized; an unknown field given as null changes
    nothing either. Text parts join as vLLM joins them; a speaker's name, which the chat turns cannot carry, and
    vLLM's usage on every chunk are refused by name."""
    from encdec.serve.protocol import APIError, Limits, parse

    def parsed(kind: str = "chat", **fields):
        body = {"messages": [{"role": "user", "content": "w1"}]} if kind == "chat" else {"prompt": "w1"}
        return parse(json.dumps({**body, **fields}).encode(), kind, Limits(24, 8))

    plain = parsed()
    neutral = {"prompt_cache_retention": "24h", "verbosity": None, "web_search_options": None, "moderation": None,
               "reasoning_effort": "none", "skip_special_tokens": True, "include_stop_str_in_output": False,
               "add_generation_prompt": True, "continue_final_message": False, "min_tokens": 0, "min_p": 0.0,
               "stop_token_ids": [], "spaces_between_special_tokens": True, "chat_template_kwargs": {},
               "use_beam_search": False, "length_penalty": 1.0, "priority": 0, "bad_words": [],
               "return_tokens_as_token_ids": False, "some_future_field": None}
    assert parsed(**neutral) == plain
    assert parsed("completions", **neutral) == parsed("completions")
    # vLLM's add_special_tokens at its defaults (a completion's prompt read with the tokenizer's BOS, a conversation
    # as its template writes it), its request_id, and no alternatives asked without logprobs
    assert parsed(add_special_tokens=False, request_id="r1", top_logprobs=0) == plain
    assert parsed("completions", add_special_tokens=True, request_id="r1") == parsed("completions")
    for kind, value in (("chat", True), ("completions", False)):
        with pytest.raises(APIError) as refused:
            parsed(kind, add_special_tokens=value)
        assert (refused.value.status, refused.value.param) == (400, "add_special_tokens"), refused.value.message
    parts = parsed(messages=[{"role": "user", "content": [{"type": "text", "text": "w1"}, {"type": "text",
                                                                                          "text": "w2"}]}])
    assert parts.turns == parsed(messages=[{"role": "user", "content": "w1\nw2"}]).turns
    named = [{"role": "system", "name": "rules", "content": "w0"}, {"role": "user", "name": "alice", "content": "w1"}]
    assert parsed(messages=named).turns == parsed(messages=[{k: v for k, v in m.items() if k != "name"}
                                                           for m in named]).turns  # one name a role: nothing lost
    for fields, param in (({"min_tokens": 3}, "min_tokens"), ({"skip_special_tokens": False}, "skip_special_tokens"),
                          ({"use_beam_search": True}, "use_beam_search"), ({"bad_words": ["w2"]}, "bad_words"),
                          ({"verbosity": "low"}, "verbosity"), ({"some_future_field": 1}, "some_future_field"),
                          ({"messages": [{"role": "user", "name": "alice", "content": "w1"}, {"role": "assistant",
                                                                                                "content": "w2"},
                                         {"role": "user", "name": "bob", "content": "w3"}]}, "messages"),
                          ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options")):
        with pytest.raises(APIError) as refused:
            parsed(**fields)
        assert (refused.value.status, refused.value.param) == (400, param), refused.value.message


def test_embeddings_accept_what_the_completions_accept_at_values_that_change_nothing():
    """A vLLM client's /v1/embeddings body (truncate_prompt_tokens null, add_special_tokens true: its defaults)
    was refused as unrecognized, where /v1/completions accepts the same fields."""
    from encdec.serve.protocol import APIError, parse_embeddings

    def parsed(**fields):
        return parse_embeddings(json.dumps({"input": ["w1", "w2"], **fields}).encode(), 64)

    assert parsed(truncate_prompt_tokens=None, add_special_tokens=True, priority=0, some_future_field=None) == parsed()
    for fields, param in (({"add_special_tokens": False}, "add_special_tokens"), ({"some_future_field": 1},
                                                                                   "some_future_field")):
        with pytest.raises(APIError) as refused:
            parsed(**fields)
        assert (refused.value.status, refused.value.param) == (400, param), refused.value.message


@pytest.mark.parametrize("body, status, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(server, body, status, param):
    fields = body if isinstance(body, dict) else body[:12]  # a raw body: its first field's name
    endpoint = next((ENDPOINTS[key] for key in ENDPOINTS if key in fields), "completions")
    content = body if isinstance(body, str) else json.dumps(body)
    answer = httpx.post(f"{server.base}/v1/{endpoint}", content=content, timeout=30,
                        headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["param"] == param
    if param in ("prompt", "input") and isinstance(body, dict) and isinstance(body[param], str) and body[param]:
        # the --max-input-tokens limit is named, as OpenAI's API says a context overflows (clients trim on it)
        assert "This model's maximum context length is 24 tokens" in error["message"]
        assert error["code"] == "context_length_exceeded"
    ok = httpx.post(f"{server.base}/v1/completions", json={"prompt": "w1", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_a_body_not_declared_json_is_refused_as_a_browser_sends_it_from_any_page(server):
    """A web page can POST text/plain, form and multipart bodies, or one without a type, to a server on the user's
    own machine without the browser asking it first: every such body was read as JSON and generated from."""
    bodies = {"/v1/completions": {"prompt": "w1", "max_tokens": 2}, "/v1/embeddings": {"input": "w1"},
              "/tokenize": {"prompt": "w1"}, "/detokenize": {"tokens": [5]},
              "/v1/chat/completions": {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 2}}
    for path, fields in bodies.items():
        body = json.dumps(fields)
        for kind in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                     None):
            headers = {"origin": "https://elsewhere.example"} | ({"content-type": kind} if kind else {})
            answer = httpx.post(f"{server.base}{path}", content=body, headers=headers, timeout=30)
            assert answer.status_code == 415, (path, kind, answer.text)
            assert "Content-Type: application/json" in answer.json()["error"]["message"]
        for kind in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"):
            answer = httpx.post(f"{server.base}{path}", content=body, headers={"content-type": kind}, timeout=30)
            assert answer.status_code == 200, (path, kind, answer.text)


def test_a_host_header_naming_another_server_is_refused_on_loopback_without_a_key(server, local):
    """DNS rebinding: a page whose own name its DNS server turns to 127.0.0.1 is of the same origin as the server, free
    to send it JSON and read the answers; the server answered whatever the Host header named."""
    body = {"prompt": "w1", "max_tokens": 2}
    foreign = httpx.post(f"{server.base}/v1/completions", json=body, timeout=30,
                         headers={"host": f"rebind.example:{server.port}"})
    assert foreign.status_code == 403, foreign.text
    assert "'rebind.example', not this server" in foreign.json()["error"]["message"]
    assert "--allowed-hosts" in foreign.json()["error"]["message"]
    for own in (f"localhost:{server.port}", f"LocalHost.:{server.port}", f"127.0.0.1:{server.port}", "[::1]:1",
                "x.localhost"):
        answer = httpx.post(f"{server.base}/v1/completions", json=body, headers={"host": own}, timeout=30)
        assert answer.status_code == 200, (own, answer.text)

    async def ask(client):
        return [(await client.get("/v1/models", headers={"host": host})).status_code
                for host in ("proxy.example", "api.proxy.example", "proxy.example.evil", "other.example")]

    assert _asked(_app(local, allowed_hosts=("proxy.example",)), ask, scheduler=False) == [200, 403, 403, 403]
    assert _asked(_app(local, allowed_hosts=(".proxy.example",)), ask, scheduler=False) == [200, 200, 403, 403]
    assert _asked(_app(local), ask, scheduler=False) == [200, 200, 200, 200]  # not on loopback, or with a key


def test_allowed_hosts_is_checked_and_applies_on_loopback_without_a_key(monkeypatch):
    from encdec.errors import EncdecError
    from encdec.serve.app import check_hosts

    assert check_hosts(None, "127.0.0.1", None) == () and check_hosts(None, "::1", None) == ()
    assert check_hosts("Proxy.Example., .corp.example, é.example", "localhost", None) == (
        "proxy.example", ".corp.example", "xn--9ca.example")
    assert check_hosts(None, "0.0.0.0", None) is None and check_hosts(None, "127.0.0.1", "key") is None
    assert check_hosts("*", "127.0.0.1", None) is None
    from encdec.serve import app as served

    warned = []
    monkeypatch.setattr(served.log, "warning", lambda message, *args: warned.append(message % args))
    assert check_hosts("api.example", "0.0.0.0", None) is None and check_hosts("api.example", "::1", "k") is None
    assert len(warned) == 2 and "the option is ignored" in warned[0]  # given, and read by nothing: said
    for bad in ("a b", "http://x", "x:80", "*.example", ""):
        with pytest.raises(EncdecError, match="--allowed-hosts: .* is not a host name"):
            check_hosts(bad, "127.0.0.1", None)
    # other spellings of a loopback address, and names that resolve to one alone (the machine's own, in /etc/hosts),
    # listen on loopback too: they had no Host check (a page whose name its DNS points at 127.0.0.1 was answered)
    address = {"workstation": "127.0.1.1", "lan-name": "10.0.0.5"}
    monkeypatch.setattr("socket.getaddrinfo", lambda host, *a, **k: [(2, 1, 6, "", (address.get(host, "127.0.0.1"), 0))])
    assert check_hosts(None, "127.1", None) == ("127.1",) and check_hosts(None, "LOCALHOST", None) == ()
    assert check_hosts(None, "workstation", None) == ("workstation",)  # (its own name: clients may use it)
    assert check_hosts("api.example", "Workstation.", None) == ("api.example", "workstation")
    assert check_hosts(None, "lan-name", None) is None
    assert served.host_allowed("workstation", ("workstation",)) and not served.host_allowed("evil.example",
                                                                                            ("workstation",))


def test_max_completion_tokens_replaces_max_tokens_whose_range_is_not_checked_then(server):
    """Both were range-checked: a client sending max_completion_tokens 2 beside an old max_tokens past
    --max-new-tokens (or 0) was refused, for a budget that was valid; vLLM checks the one it uses."""
    for old in (1000, 0):
        answer = httpx.post(f"{server.base}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "w1"}], "max_completion_tokens": 2, "max_tokens": old})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] <= 2


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(server):
    """Characters past what --max-input-tokens tokens can spell: tokenizing 20 MB took 20 s and 4 GB on the event
    loop, and /health and every stream waited for it."""
    for endpoint, field in (("completions", "prompt"), ("embeddings", "input")):
        answer = httpx.post(f"{server.base}/v1/{endpoint}", json={field: "w1 " * 400_000}, timeout=30)
        assert answer.status_code == 400, answer.text
        message = answer.json()["error"]["message"]
        assert "1200000 characters" in message and "24 tokens" in message
    chat = httpx.post(f"{server.base}/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "w1 " * 400_000}]})
    assert chat.status_code == 400 and "characters" in chat.json()["error"]["message"]
    # more turns than tokens: refused before a template renders them (2 M empty messages took 16 s to render)
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}] * 20_000
    chat = httpx.post(f"{server.base}/v1/chat/completions", timeout=30,
                      json={"messages": [*turns, {"role": "user", "content": "w1"}]})
    assert chat.status_code == 400, chat.text
    assert "'messages' has 40001 turns, more than this server's limit of 24 tokens" in chat.json()["error"]["message"]
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}] * 11  # the turns' markup counts
    chat = httpx.post(f"{server.base}/v1/chat/completions", timeout=30,
                      json={"messages": [*turns, {"role": "user", "content": "w1"}]})
    assert chat.status_code == 400 and "'messages' has 48 tokens" in chat.json()["error"]["message"], chat.text
    assert chat.json()["error"]["code"] == "context_length_exceeded"


def test_a_body_larger_than_accepted_is_refused_unread(server):
    from encdec.serve.app import MAX_BODY_BYTES

    with socket.create_connection((HOST, server.port), timeout=30) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n{" % (MAX_BODY_BYTES + 1))
        answer = b""  # no more of the body is sent: the answer must not wait for it
        while not answer.endswith(b"}}"):
            chunk = raw.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"MiB" in answer.split(b"\r\n\r\n", 1)[1]
    assert httpx.get(f"{server.base}/health", timeout=30).status_code == 200


def test_a_body_that_stops_arriving_gets_408(local, monkeypatch):
    """A client that sends its headers and part of its body, then nothing: it was waited for without end, holding
    its connection (hundreds of them exhaust the server's files) and keeping a draining server up."""
    import asyncio

    from encdec.serve import app as served

    monkeypatch.setattr(served, "BODY_TIMEOUT_S", 0.5)
    app = _app(local)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-length", b"100"),
                                                                 (b"content-type", b"application/json")],
             "client": (HOST, 1), "server": (HOST, 80)}
    sent: list[dict] = []

    async def receive() -> dict:
        if not sent and not getattr(receive, "started", False):
            receive.started = True
            return {"type": "http.request", "body": b'{"prompt"', "more_body": True}
        await asyncio.sleep(3600)  # the rest never comes

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    assert sent[0]["status"] == 408
    assert "did not arrive within 0.5 s" in json.loads(sent[1]["body"])["error"]["message"]


def test_errors_outside_the_endpoints_have_the_apis_shape(server):
    counted = {(endpoint, status): f'encdec_requests_total{{endpoint="{endpoint}",status="{status}"}}'
               for endpoint, status in (("other", 404), ("other", 405), ("/v1/models", 200), ("/v1/models", 404))}
    before = {key: _metric(server.base, name) for key, name in counted.items()}
    other = httpx.post(f"{server.base}/v1/completions", json={"prompt": "w1", "model": "other"}, timeout=30).json()
    assert other["error"]["code"] == "model_not_found" and other["error"]["type"] == "invalid_request_error"
    for answer, status in ((httpx.get(f"{server.base}/v1/nowhere", timeout=30), 404),
                           (httpx.get(f"{server.base}/v1/completions", timeout=30), 405)):
        assert answer.status_code == status and "/v1/completions" in answer.json()["error"]["message"]
    assert answer.headers["allow"] == "POST"  # the 405's, which HTTP requires
    model_id = server.process.args[4]
    assert server.client().models.retrieve(model_id).id == model_id
    assert [m.id for m in server.client().models.list()] == [model_id]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        server.client().models.retrieve("other")
    # every answer is counted by endpoint and status: unknown paths and methods as "other"
    assert {key: _metric(server.base, name) - before[key] for key, name in counted.items()} == {
        ("other", 404): 1, ("other", 405): 1, ("/v1/models", 200): 2, ("/v1/models", 404): 1}


def test_extreme_sampling_values_leave_the_batch_working(server, local):
    """A tiny repetition penalty overflows a logit and a tiny temperature would divide by zero in float32: the
    request still samples (the largest logit), and a request sharing its steps is unaffected."""
    client, model_id = server.client(), server.process.args[4]
    with ThreadPoolExecutor(3) as pool:
        other = pool.submit(client.completions.create, model=model_id, prompt="w1 w2 w3", max_tokens=12, temperature=0)
        extreme = [pool.submit(client.completions.create, model=model_id, prompt="w2 w3", max_tokens=12,
                               temperature=1, seed=1, extra_body={"repetition_penalty": 1e-40}),
                   pool.submit(client.completions.create, model=model_id, prompt="w2 w3", max_tokens=12,
                               temperature=1e-30)]
        assert other.result().choices[0].text == _solo(local, "w1 w2 w3", 12)
        for done in extreme:
            assert done.result().usage.completion_tokens > 0
    penalized = _solo(local, "w2 w3", 12, do_sample=True, temperature=1.0, seed=1, repetition_penalty=1e-40)
    assert extreme[0].result().choices[0].text == penalized  # as alone, the penalty applied:
    assert penalized != _solo(local, "w2 w3", 12, do_sample=True, temperature=1.0, seed=1)  # (it changes the draws)
    assert extreme[1].result().choices[0].text == _solo(local, "w2 w3", 12)  # below 1e-5: greedy


def test_without_max_tokens_a_completion_has_16_and_a_chat_answer_the_servers_limit(server, local, endless_prompt):
    done = httpx.post(f"{server.base}/v1/completions", json={"prompt": endless_prompt, "temperature": 0}, timeout=60)
    assert done.json()["usage"]["completion_tokens"] == 16  # the OpenAI API's default
    endless_turn = _endless(local, lambda text: chat_prompt([("user", text)]))
    chat = httpx.post(f"{server.base}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": endless_turn}], "temperature": 0, "max_tokens": None})
    tokens, finish = chat.json()["usage"]["completion_tokens"], chat.json()["choices"][0]["finish_reason"]
    assert (tokens, finish) == (LONG, "length")  # --max-new-tokens


def test_a_stop_string_ending_is_counted_as_a_stop(server, local):
    full = _solo(local, "w1 w2 w3", 8)
    before = {r: _metric(server.base, f'encdec_generations_finished_total{{reason="{r}"}}') for r in ("stop", "cancelled")}
    httpx.post(f"{server.base}/v1/completions", json={"prompt": "w1 w2 w3", "max_tokens": 8, "temperature": 0,
                                                      "stop": [full.split()[2]]}, timeout=60).raise_for_status()
    _wait_for(lambda: _metric(server.base, 'encdec_generations_finished_total{reason="stop"}') == before["stop"] + 1,
              10, "the stop to be counted")
    assert _metric(server.base, 'encdec_generations_finished_total{reason="cancelled"}') == before["cancelled"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_completed_by_the_last_allowed_token_is_a_stop_in_the_answer_and_the_metric(
        server, local, endless_prompt, stream):
    whole = _solo(local, endless_prompt, 4)  # the stop is the whole answer: it completes on token 4 of 4
    reasons = ("stop", "length")
    before = {r: _metric(server.base, f'encdec_generations_finished_total{{reason="{r}"}}') for r in reasons}
    body = {"prompt": endless_prompt, "max_tokens": 4, "temperature": 0, "stop": [whole], "stream": stream}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as reply:
        reply.raise_for_status()
        chunks = [json.loads(line[6:]) for line in reply.iter_lines()
                  if line.startswith("data: {")] if stream else [json.loads(reply.read())]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ""
    _wait_for(lambda: _metric(server.base, 'encdec_generations_finished_total{reason="stop"}') == before["stop"] + 1,
              10, "the stop to be counted")
    assert _metric(server.base, 'encdec_generations_finished_total{reason="length"}') == before["length"]

def byte_fallback_tokenizer():
    """Gemma's kind of tokenizer in miniature: rare characters spelled by <0xNN> byte tokens."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"<0x{b:02X}>": 4 + b for b in range(256)}}
    for word in ("A", "\u2581B", "\u2581x", "y"):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    spelled = [vocab["A"], *(4 + b for b in "\ua66e".encode()), vocab["\u2581B"], vocab["\u2581x"],
               *(4 + b for b in "\U0001d518".encode()), vocab["y"]]
    return fast, spelled


@pytest.mark.parametrize("stop", [[], ["\U0001d518y"], ["\ua66e"]])
def test_characters_spelled_by_byte_tokens_stream_whole_and_log_probabilities_join(stop):
    from encdec.inference.engine import Emitted
    from encdec.serve.logprobs import TokenLogprobs
    from encdec.serve.text import TextStream

    tokenizer, spelled = byte_fallback_tokenizer()
    final = tokenizer.decode(spelled)
    assert final == "A\ua66e B x\U0001d518y"
    expected = final[: min([final.index(s) for s in stop], default=len(final))]
    text, logprobs = TextStream(tokenizer, stop), TokenLogprobs(tokenizer, "completions", frozenset({1}))
    pieces = []
    for token in spelled:
        logprobs.add(Emitted(None, token, -1.0, ((token, -1.0), (4, -2.0))), text.detokenizer, len(text.text))
        pieces.append(text.add(token))
        if text.stopped:
            break
    pieces.append("" if text.stopped else text.finish())
    assert "".join(pieces) == text.text == expected and "\ufffd" not in "".join(pieces)
    if text.stopped:  # as the server does: the tokens from the cut on are not the answer's
        logprobs.stop_at(len(text.text))
    rendered = logprobs.render()
    assert "".join(rendered["tokens"]) == expected  # (here the cut runs through no token)
    offsets = rendered["text_offset"]
    assert offsets == sorted(offsets) and all(final[o:].startswith(t) for o, t in zip(offsets, rendered["tokens"]))


def test_a_stop_string_that_the_answers_end_completes_cuts_its_log_probabilities_too():
    """The answer ends inside a character ("A" and the first of its 3 bytes): its end is written as U+FFFD, which
    completes the stop string "\ufffd"; the text was cut there but its log-probabilities still listed the byte."""
    from encdec.inference.engine import Emitted
    from encdec.serve.app import Answer
    from encdec.serve.logprobs import TokenLogprobs
    from encdec.serve.text import TextStream

    tokenizer, spelled = byte_fallback_tokenizer()
    answer = Answer(TextStream(tokenizer, ["\ufffd"]), TokenLogprobs(tokenizer, "completions", frozenset({1})))
    for token in spelled[:2]:
        assert not answer.add(Emitted(None, token, -1.0, ((token, -1.0),)))
    assert answer.settle() == "" and answer.text.stopped and answer.text.text == "A"
    assert answer.logprobs.render()["tokens"] == ["A"]


def test_a_token_of_no_text_at_a_stop_strings_cut_is_listed_streamed_or_not_alike():
    """Answer "xa", a special token (no text), "a", "Z" with the stop string "aZ": the streamed text reached the
    special token's place (2) before the stop cut the answer there, and it was listed streamed, not otherwise."""
    from encdec.serve.logprobs import Entry, Piece, TokenLogprobs

    logprobs, streamed = TokenLogprobs(None, "completions", frozenset()), []
    for text, offset, sent in (("xa", 0, 1), ("", 2, 1), ("a", 2, 2), ("Z", 3, 2)):  # sent: what the stream let out
        logprobs.entries.append(Entry(Piece(text, list(text.encode()), -1.0), [], offset))
        taken = logprobs.take(sent)
        streamed += taken["tokens"] if taken else []
    logprobs.stop_at(2)
    taken = logprobs.take(None)
    streamed += taken["tokens"] if taken else []
    assert streamed == logprobs.render()["tokens"] == ["xa"]


def _streamed(tokenizer, ids: list[int]) -> str:
    from encdec.serve.text import TextStream

    stream = TextStream(tokenizer, [])
    pieces = [stream.add(token) for token in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == stream.text
    return stream.text


def test_a_token_after_special_tokens_keeps_its_leading_space():
    """A token is decoded after the few before it, for its leading space; special tokens decode to nothing, so
    after four of them it was decoded as an answer's first token, whose space Llama 2's decoder strips."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "\u2581Hello": 5, "\u2581world": 6}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], additional_special_tokens=["[INST]", "[/INST]"])
    for ids in ([5, 3, 4, 6], [5, 3, 4, 3, 4, 6], [3, 4, 3, 4, 3, 5, 6]):
        assert _streamed(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_a_byte_level_added_token_outside_the_byte_alphabet_is_its_own_text():
    """tokenizers' byte-level decoder reads a token with any character outside its byte alphabet as plain text:
    "caf\u00e9 au lait", added to a vocabulary, streamed as "caf\ufffd au lait" (its '\u00e9' read as a byte). A
    token all of whose characters are in the alphabet ("Gr\u00f6\u00dfe") is read as bytes, by both."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer, backend.decoder = pre.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_tokens([AddedToken("caf\u00e9 au lait", special=False), AddedToken("Gr\u00f6\u00dfe", special=False)])
    ids = tokenizer("Hcaf\u00e9 au laitHGr\u00f6\u00dfe \u00e9", add_special_tokens=False).input_ids
    assert _streamed(tokenizer, ids) == tokenizer.decode(ids) == "Hcaf\u00e9 au laitHGr\ufffd\ufffde \u00e9"


def test_alternatives_of_one_text_keep_the_likeliest_logprob():
    """Two lead bytes of different characters both add '' so far: the completions API's dict of alternatives kept
    the last (least likely) one's log-probability for that text."""
    from encdec.inference.engine import Emitted
    from encdec.serve.logprobs import TokenLogprobs
    from encdec.serve.text import Detokenizer

    tokenizer, _ = byte_fallback_tokenizer()
    leads = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0xE4, 0xF0)]
    logprobs = TokenLogprobs(tokenizer, "completions", frozenset({1}))
    logprobs.add(Emitted(None, leads[0], -0.5, ((leads[0], -0.5), (leads[1], -2.5))), Detokenizer(tokenizer), 0)
    assert logprobs.render()["top_logprobs"] == [{"": -0.5}]


def test_the_openai_client_sees_the_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="'best_of'"):
        client.completions.create(model=server.process.args[4], prompt="w1", best_of=3)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=server.process.args[4], messages=[{"role": "user", "content": "w1"}],
                                       temperature=3)


def test_a_client_leaving_mid_stream_frees_its_slot(server, endless_prompt):
    prompt = endless_prompt
    before = _metric(server.base, 'encdec_generations_finished_total{reason="cancelled"}')
    generated = _metric(server.base, "encdec_generated_tokens_total")
    with httpx.stream("POST", f"{server.base}/v1/completions", timeout=30,
                      json={"prompt": prompt, "max_tokens": LONG, "stream": True, "temperature": 0}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    _wait_for(lambda: _metric(server.base, 'encdec_generations_finished_total{reason="cancelled"}') == before + 1,
              20, "the cancelled generation to be counted")
    _wait_for(lambda: _metric(server.base, "encdec_running_requests") == 0, 20, "the batch to empty")
    assert generated < _metric(server.base, "encdec_generated_tokens_total") < generated + LONG  # stopped early


def test_an_embedding_request_whose_client_leaves_is_not_encoded_further(server):
    """2,048 inputs take hundreds of encoder passes of --max-batch (4) inputs; the client gives up at once, the
    server notices within its poll interval and encodes none of the rest, and answers the next request."""
    tokens = 'encdec_prompt_tokens_total'
    before = _metric(server.base, tokens)
    body = LONG_EMBEDDING_REQUEST
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.base}/v1/embeddings", json=body, timeout=httpx.Timeout(30, read=0.2))
    time.sleep(2 * DISCONNECT_POLL_S)
    stopped = _metric(server.base, tokens)
    time.sleep(1)
    assert _metric(server.base, tokens) == stopped < before + 2048 * 24
    done = httpx.post(f"{server.base}/v1/embeddings", json={"input": "w1 w2"}, timeout=30)
    assert done.status_code == 200 and len(done.json()["data"]) == 1


def test_a_non_streaming_client_that_leaves_is_noticed_while_tokens_still_flow(server, endless_prompt):
    """The server asks whether the client is still there on a clock, not only when tokens stall: with the decoding
    slowed by a long embedding request (a pass of it after every step), a completion whose client left is
    cancelled within the poll interval, long before its 200 tokens are done."""
    cancelled = 'encdec_generations_finished_total{reason="cancelled"}'
    before = _metric(server.base, cancelled)
    body = LONG_EMBEDDING_REQUEST

    def occupy() -> None:  # gives up after 8 s: the server then drops the rest of it (the test above)
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{server.base}/v1/embeddings", json=body, timeout=httpx.Timeout(30, read=8))

    slow = threading.Thread(target=occupy)
    slow.start()
    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.base}/v1/completions", timeout=httpx.Timeout(30, read=0.3),
                   json={"prompt": endless_prompt, "max_tokens": LONG, "temperature": 0})
    _wait_for(lambda: _metric(server.base, cancelled) == before + 1, 3 * DISCONNECT_POLL_S,
              "the completion to be cancelled")
    generated = _metric(server.base, "encdec_generated_tokens_total")
    assert time.monotonic() - started < 4 * DISCONNECT_POLL_S
    slow.join()
    assert _metric(server.base, "encdec_generated_tokens_total") == generated  # nothing decoded for it since


def test_queue_full_then_sigterm_finishes_running_requests_and_exits(checkpoint, endless_prompt):
    prompt = endless_prompt
    server = Server(checkpoint, "--max-batch", "1", "--max-queue", "1", "--max-new-tokens", str(LONG))
    try:
        results: dict[str, httpx.Response] = {}

        def queued():
            results["queued"] = httpx.post(f"{server.base}/v1/completions", timeout=120,
                                           json={"prompt": prompt, "max_tokens": 5, "temperature": 0})

        with httpx.stream("POST", f"{server.base}/v1/completions", timeout=120,
                          json={"prompt": prompt, "max_tokens": LONG, "stream": True, "temperature": 0}) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # the one slot is taken
            waiter = threading.Thread(target=queued)
            waiter.start()
            _wait_for(lambda: _metric(server.base, "encdec_queue_length") == 1, 20, "the second request to queue")
            full = httpx.post(f"{server.base}/v1/completions", json={"prompt": "w1", "max_tokens": 2}, timeout=30)
            assert full.status_code == 429 and "--max-queue" in full.json()["error"]["message"]
            # a client that stalls its body: uvicorn waited for its connection to close, and never exited
            stalled = socket.create_connection((HOST, server.port), timeout=30)
            stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n{")
            time.sleep(1)  # for the server to read its headers and start the request
            server.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        waiter.join(120)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == LONG  # it ran to its end
        assert results["queued"].status_code == 200  # accepted before SIGTERM: served too
        assert results["queued"].json()["usage"]["completion_tokens"] == 5
        server.process.wait(60)
        stalled.close()
        assert server.process.returncode in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.base}/health", timeout=5)
    finally:
        server.close()


def test_https_and_a_drain_that_runs_out_of_time(checkpoint, local, endless_prompt, tmp_path):
    """With --ssl-certfile / --ssl-keyfile the server speaks HTTPS: the openai client, trusting the certificate's
    authority, gets the same text as solo generation. With --shutdown-timeout 0, SIGTERM ends what is still
    running or queued at once: a stream of 16 generations decoded one at a time (seconds of work) ends with an
    error event naming the option, then [DONE]; an embedding request of thousands of inputs gets a 503; the
    process exits without finishing them."""
    import trustme

    authority = trustme.CA()
    issued = authority.issue_cert(HOST)
    issued.private_key_pem.write_to_path(tmp_path / "key.pem")
    (tmp_path / "chain.pem").write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    server = Server(checkpoint, "--ssl-certfile", str(tmp_path / "chain.pem"), "--ssl-keyfile",
                    str(tmp_path / "key.pem"), "--shutdown-timeout", "0", "--max-batch", "1",
                    "--max-new-tokens", str(LONG), verify=trusting)
    try:
        with pytest.raises(httpx.TransportError):  # only TLS is spoken there
            httpx.get(f"http://{HOST}:{server.port}/health", timeout=5)
        answer = server.client().completions.create(model=str(checkpoint), prompt="w1 w2 w3", max_tokens=8,
                                                    temperature=0)
        assert answer.choices[0].text == _solo(local, "w1 w2 w3", 8)
        results: dict[str, httpx.Response] = {}

        def embed() -> None:
            results["embed"] = httpx.post(f"{server.base}/v1/embeddings", json=LONG_EMBEDDING_REQUEST, timeout=120,
                                          verify=trusting)

        body = {"prompt": [endless_prompt] * 16, "max_tokens": LONG, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=120, verify=trusting) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")
            waiter = threading.Thread(target=embed)
            waiter.start()
            _wait_for(lambda: _metric(server.base, "encdec_queue_length", trusting) == 16, 20,
                      "15 generations and the embedding request to queue")
            server.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        waiter.join(120)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])["error"]
        assert "--shutdown-timeout 0" in error["message"] and error["type"] == "server_error"
        finished = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-2]]
        assert finished.count("length") < 16  # (some choices may have ended before the signal)
        assert results["embed"].status_code == 503 and "--shutdown-timeout 0" in results["embed"].text
        server.process.wait(30)
        assert server.process.returncode in (0, -signal.SIGTERM)
    finally:
        server.close()


def test_bad_serve_options_get_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    from encdec.cli import main

    assert main(["serve", str(checkpoint), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--served-model-name", " "]) == 2
    assert "--served-model-name is empty" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--host", ""]) == 2  # `--host "$HOST"` unset: every interface, unsaid
    assert "--host is empty; give an address to listen on" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--api-key", ""]) == 2  # `--api-key "$KEY"` with KEY unset: not open
    assert "the API key is empty" in capsys.readouterr().err
    monkeypatch.setenv("ENCDEC_API_KEY", " ")
    assert main(["serve", str(checkpoint)]) == 2
    assert "the API key is empty" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "1", "--api-key", "clé"]) == 2  # httpx, openai cannot send it
    assert "printable ASCII characters only" in capsys.readouterr().err
    monkeypatch.setenv("ENCDEC_API_KEY", "s3cret\n")  # from a file: stripped (read up to the address taken below)
    assert main(["serve", str(tmp_path), "--port", "1"]) == 2
    assert "surrounding spaces or newlines" in capsys.readouterr().err
    monkeypatch.delenv("ENCDEC_API_KEY")
    assert main(["serve", str(tmp_path), "--port", "1", "--timeout-keep-alive", "0"]) == 2  # (no server if not)
    assert "--timeout-keep-alive must be at least 1, got 0" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "1"]) == 2
    assert "holds no config.json; expected an encoder-decoder checkpoint directory" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such directory; expected an encoder-decoder checkpoint directory" in capsys.readouterr().err
    import socket
    import time

    with socket.socket() as taken:  # a port in use is said before the model loads, in one line, status 2
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr("encdec.inference.loading.load_for_inference", lambda *a, **k: pytest.fail("loaded"))
        start = time.monotonic()
        assert main(["serve", str(checkpoint), "--port", str(port)]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port} (Address already in use)" in lines[0], lines
        assert time.monotonic() - start < 10
    assert main(["serve", str(checkpoint), "--host", "no-such-host.invalid"]) == 2
    assert "--host no-such-host.invalid" in capsys.readouterr().err


def test_https_cors_and_drain_options_are_checked_before_the_model_loads(tmp_path, capsys):
    import trustme
    from cryptography.hazmat.primitives import serialization

    from encdec.cli import main

    nowhere = str(tmp_path)  # no checkpoint: an option accepted gets as far as saying so
    pem = tmp_path / "certificate.pem"
    pem.write_text("not a certificate\n")
    issued = trustme.CA().issue_cert(HOST)
    issued.cert_chain_pems[0].write_to_path(tmp_path / "chain.pem")
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    (tmp_path / "encrypted.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    cases = [(["--ssl-certfile", str(pem)], "needs both --ssl-certfile"),
             (["--ssl-certfile", str(pem), "--ssl-keyfile", str(pem)], "cannot load them"),
             (["--ssl-certfile", str(tmp_path / "chain.pem"), "--ssl-keyfile", str(tmp_path / "encrypted.pem")],
              "the key is encrypted"),
             (["--ssl-certfile", str(tmp_path / "none.pem"), "--ssl-keyfile", str(pem)], "No such file"),
             (["--allowed-origins", "https://app.example/chat"], "'https://app.example/chat' is not an origin"),
             (["--allowed-origins", "app.example"], "'app.example' is not an origin"),
             (["--allowed-origins", "http://app.example:port"], "'http://app.example:port' is not an origin"),
             (["--allowed-origins", "http://app.example:"], "'http://app.example:' is not an origin"),
             (["--allowed-origins", "*,https://app.example"], "'*' allows every origin; give it alone"),
             (["--allowed-origins", "http://[::1"], "'http://[::1' is not an origin"),  # these were tracebacks
             (["--allowed-origins", "http://[localhost]:3000"], "'http://[localhost]:3000' is not an origin"),
             (["--allowed-origins", "https://ex ample.com"], "'https://ex ample.com' is not an origin"),  # never sent
             (["--allowed-origins", "http://a.example:0"], "'http://a.example:0' is not an origin"),
             (["--ssl-certfile", "~no-such-user-here/c.pem", "--ssl-keyfile", str(pem)], "give the paths without ~"),
             (["--shutdown-timeout", "-1"], "--shutdown-timeout must be a number of seconds, 0 or more"),
             (["--shutdown-timeout", "nan"], "--shutdown-timeout must be a number of seconds, 0 or more"),
             (["--shutdown-timeout", "1e10"], "at most 86400 (a day), got 10000000000.0"),
             (["--allowed-origins", "https://app.example, http://localhost:3000", "--shutdown-timeout", "0"],
              "holds no config.json")]
    for options, said in cases:
        assert main(["serve", nowhere, "--port", "1", *options]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(lines) == 1 and said in lines[0], (options, lines)
    from encdec.errors import EncdecError
    from encdec.serve.app import check_address, check_origins

    with pytest.raises(EncdecError, match=r"--host 127\.\.0\.0\.1: not a host name; give an address"):
        check_address("127..0.0.1", 0)  # an empty label: the idna codec's traceback

    # written as browsers send them (compared as strings): lower case, no default port
    assert check_origins("https://App.Example:443, http://localhost:80,http://[::1]:8080,https://app.example") == (
        "https://app.example", "http://localhost", "http://[::1]:8080")
    assert check_origins("http://é.example:3000") == ("http://xn--9ca.example:3000",)  # as a browser sends it


def test_allowed_origins_answer_a_browsers_preflight_and_its_requests(local):
    """--allowed-origins: a page of a listed origin may call the API (its preflight, which carries no key, is
    answered, and so is a 401, which the page can then read); another origin's preflight is refused; without the
    option no CORS header is sent."""
    page = {"Origin": "https://app.example"}
    preflight = {"Access-Control-Request-Method": "POST",  # and what the openai JavaScript client sends
                 "Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang,x-stainless-arch"}
    body = {"prompt": "w1 w2", "max_tokens": 2}

    async def ask(client) -> list[httpx.Response]:
        return [await client.options("/v1/completions", headers={**page, **preflight}),
                await client.options("/v1/completions", headers={"Origin": "https://other.example", **preflight}),
                await client.post("/v1/completions", json=body, headers=page),
                await client.post("/v1/completions", json=body, headers={**page, "Authorization": "Bearer k"}),
                # Chromium's Private Network Access: a public page calling a server on this machine (it was a 400)
                await client.options("/v1/completions", headers={**page, **preflight,
                                                                 "Access-Control-Request-Private-Network": "true"})]

    allowed, other, keyless, answered, private = _asked(
        _app(local, api_key="k", allowed_origins=("https://app.example",)), ask)
    assert private.status_code == 200 and private.headers["access-control-allow-private-network"] == "true"
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert {"authorization", "x-stainless-arch"} <= set(allowed.headers["access-control-allow-headers"].split(","))
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert keyless.status_code == 401 and keyless.headers["access-control-allow-origin"] == "https://app.example"
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "https://app.example"
    plain = _asked(_app(local), ask)
    assert plain[0].status_code == 405 and not any("access-control-allow-origin" in r.headers for r in plain)


VLLM_CHAT_DEFAULTS = {"add_special_tokens": False, "add_generation_prompt": True, "continue_final_message": False,
                      "return_token_strs": False, "chat_template": None, "chat_template_kwargs": None, "tools": None}


def test_tokenize_and_detokenize_read_as_the_server_does_behind_the_key(local):
    """vLLM's /tokenize gives the ids a prompt or a conversation is read as (what --max-input-tokens counts, with
    the limit: a prompt past it is counted, not refused) and /detokenize their text; both need the key."""
    model, tokenizer = local
    from encdec.data.chat import ChatFormat

    long = " ".join(f"w{i}" for i in range(30))  # 31 tokens, past the app's 24
    conversation = [{"role": "user", "content": "w4 w5"}]
    key = {"Authorization": "Bearer k"}

    async def ask(client) -> list[httpx.Response]:
        return [await client.post("/tokenize", json={"prompt": long}, headers=key),
                await client.post("/tokenize", json={"prompt": "w1 w2", "add_special_tokens": False}, headers=key),
                await client.post("/tokenize", json={"messages": conversation}, headers=key),
                await client.post("/detokenize", json={"tokens": tokenizer("w1 w2").input_ids}, headers=key),
                await client.post("/tokenize", json={"prompt": "w1"}),
                await client.post("/tokenize", json={"prompt": "w1", "messages": conversation}, headers=key),
                await client.post("/detokenize", json={"tokens": [len(tokenizer)]}, headers=key),
                await client.post("/tokenize", json={"prompt": "w1", "model": "other"}, headers=key),
                await client.get("/metrics"),
                # vLLM's request as its client serialises it, defaults included; a value that would change the result
                await client.post("/tokenize", json={"messages": conversation, **VLLM_CHAT_DEFAULTS}, headers=key),
                await client.post("/tokenize", json={"prompt": "w1 w2", "return_token_strs": True}, headers=key),
                await client.post("/tokenize", json={"messages": conversation, "add_generation_prompt": False},
                                  headers=key),
                await client.post("/detokenize", json={"tokens": [5] * 33}, headers=key),
                # judged as the chat endpoint judges them (empty tools accepted; 1 is not true there)
                await client.post("/tokenize", json={"messages": conversation, "chat_template_kwargs": {},
                                                     "tools": []}, headers=key),
                await client.post("/tokenize", json={"messages": conversation, "add_generation_prompt": 1},
                                  headers=key)]

    (counted, bare, chat, text, keyless, both, outside, other, metrics, defaults, strings, changed, many, empties,
     numeric) = _asked(_app(local, api_key="k"), ask)
    assert empties.json()["tokens"] == chat.json()["tokens"]
    assert numeric.status_code == 400 and numeric.json()["error"]["param"] == "add_generation_prompt"
    assert counted.json() == {"count": 31, "max_model_len": 24, "tokens": tokenizer(long).input_ids}
    assert bare.json()["tokens"] == tokenizer("w1 w2", add_special_tokens=False).input_ids
    assert chat.json()["tokens"] == ChatFormat.of(tokenizer).encode([("user", "w4 w5")])
    assert text.json() == {"prompt": tokenizer.decode(tokenizer("w1 w2").input_ids)}
    assert keyless.status_code == 401
    assert both.status_code == 400 and "one of them" in both.json()["error"]["message"]
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "tokens"
    assert other.status_code == 404
    assert 'encdec_requests_total{endpoint="/tokenize",status="200"} 3.0' in metrics.text
    assert defaults.json()["tokens"] == chat.json()["tokens"]
    assert strings.json()["token_strs"] == tokenizer.convert_ids_to_tokens(tokenizer("w1 w2").input_ids)
    assert changed.status_code == 400 and changed.json()["error"]["param"] == "add_generation_prompt"
    assert many.status_code == 400 and "at most 32" in many.json()["error"]["message"]  # the app's 24 + 8


def test_a_requests_body_is_parsed_and_tokenized_in_one_job_of_the_reader(local, monkeypatch):
    """Parsing and tokenizing were two jobs of the one reader thread: each parsed body (a list of token ids holds 6x
    the bytes of its JSON) waited for its second job behind every other request's parse, all of them held at once.
    Concurrent requests are read one after another now, each tokenized before the next is parsed."""
    import asyncio
    import time

    from encdec.serve import app as served

    events = []
    real_parse, app = served.parse, _app(local)
    real_tokens = app.state.service.tokens

    def parse(*args):
        events.append("parse")
        time.sleep(0.05)  # the other requests' bodies arrive meanwhile
        return real_parse(*args)

    monkeypatch.setattr(served, "parse", parse)
    monkeypatch.setattr(app.state.service, "tokens", lambda parsed: events.append("tokens") or real_tokens(parsed))

    async def ask(client):
        return await asyncio.gather(*(client.post("/v1/completions", json={"prompt": f"w{i}", "max_tokens": 1})
                                      for i in range(3)))

    assert [r.status_code for r in _asked(app, ask)] == [200] * 3
    assert events == ["parse", "tokens"] * 3


def test_requests_while_draining_get_503(local):
    """What a request still reaching the app after SIGTERM (on an open connection) gets: 503, as /health does."""
    app = _app(local)
    app.state.draining = True  # what DrainingServer.handle_exit sets on SIGTERM

    async def ask(client) -> tuple[httpx.Response, httpx.Response]:
        return await client.post("/v1/completions", json={"prompt": "w1"}), await client.get("/health")

    answer, health = _asked(app, ask, scheduler=False)
    assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
    assert health.status_code == 503


def test_a_conversation_the_chat_template_refuses_gets_400(local):
    """Mistral's and Llama 2's templates raise unless the roles alternate: the client gets a 400 naming
    'messages' and the template's words (it was a 500, which the openai client retries), and the server answers
    the next conversation."""
    import copy

    tokenizer = copy.deepcopy(local[1])  # never the loader's memoised one
    tokenizer.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                               "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                               "{{ m['content'] }} {% endfor %}")

    async def ask(client) -> tuple[httpx.Response, httpx.Response]:
        bad = [{"role": "user", "content": "w1"}, {"role": "user", "content": "w2"}]
        good = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"},
                {"role": "user", "content": "w3"}]
        return tuple([await client.post("/v1/chat/completions", json={"messages": m, "max_tokens": 2})
                      for m in (bad, good)])

    refused, answered = _asked(_app(local, tokenizer), ask)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "messages" and error["type"] == "invalid_request_error"
    assert "chat template refuses this conversation (Conversation roles must alternate" in error["message"]
    assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] == 2


def test_a_text_holding_a_token_past_the_embeddings_gets_400(local):
    """A tokenizer's token past the model's embeddings (Gemma 3's <image_soft_token> in a text-only vocabulary) in a
    prompt's text: 400 naming it, before the step (on a GPU its index would fail the whole batch's step)."""
    import copy

    tokenizer = copy.deepcopy(local[1])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})

    async def ask(client) -> tuple[httpx.Response, httpx.Response]:
        return tuple([await client.post("/v1/completions", json={"prompt": p, "max_tokens": 2})
                      for p in ("w1 <image_soft_token>", "w1")])

    refused, answered = _asked(_app(local, tokenizer), ask)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
    assert "token id 96 ('<image_soft_token>') is outside the vocabulary (0 to 95)" in refused.json()["error"]["message"]
    assert answered.status_code == 200


def test_a_ul2_framed_model_is_served_in_its_framing(local):
    """`encdec serve` of a UL2-pretrained model (`model_framing`): the sentinel after every prompt and after the
    decoder's start, for completions and chat alike; the answer is what generate gives the framed prompt."""
    from encdec.objectives import Framing

    model, tokenizer = local
    app = _app(local, framing=Framing(after=(7,), decoder=(7,)))
    body = {"prompt": "w1 w2 w3", "max_tokens": 6, "temperature": 0}
    answer = _asked(app, lambda client: client.post("/v1/completions", json=body)).json()
    ids = tokenizer("w1 w2 w3").input_ids
    framed = model.generate(torch.tensor([ids + [7]]), max_new_tokens=6, decoder_prefix=[7])[0].tolist()
    assert answer["choices"][0]["text"] == tokenizer.decode(framed, skip_special_tokens=True)
    assert answer["usage"]["prompt_tokens"] == len(ids) + 1  # what the encoder read
    assert framed != _solo_tokens(local, "w1 w2 w3", 6)


def test_a_streaming_client_gone_before_its_stream_starts_frees_its_slot(local, endless_prompt):
    """The client hung up while its request was parsed: the response's first send fails (as ASGI 2.4 servers
    report it), so the stream's generator never runs, nor its `finally`; the job must be cancelled anyway."""
    import asyncio

    app = _app(local, limits=(24, LONG))
    service = app.state.service
    body = json.dumps({"prompt": endless_prompt, "max_tokens": LONG, "stream": True, "temperature": 0}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": (HOST, 1), "server": (HOST, 80)}

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(_: dict) -> None:
        raise OSError("the client is gone")

    async def serve_and_wait() -> None:  # the loop must outlive the job: the scheduler delivers to it
        with contextlib.suppress(Exception):
            await app(scope, receive, send)
        deadline = time.monotonic() + 20
        while service.metrics.running._value.get() or not service.metrics.finished.labels("cancelled")._value.get():
            assert time.monotonic() < deadline, "the generation was not cancelled"
            await asyncio.sleep(0.05)

    service.scheduler.start()
    try:
        asyncio.run(serve_and_wait())
        assert service.metrics.finished.labels("length")._value.get() == 0
    finally:
        service.scheduler.stop(5)


def test_a_failed_encoder_pass_fails_its_arrivals_and_not_the_running_requests(local, monkeypatch):
    """Arrivals whose encoder pass raised (a burst too large for the device's memory) failed every request already
    decoding as well, whose rows were intact."""
    import asyncio

    from encdec.inference.engine import Engine

    app, join, step = _app(local), Engine.join, Engine.step
    scheduler = app.state.service.scheduler
    marker = local[1]("w9", add_special_tokens=False).input_ids[-1]

    def failing_for_the_marker(engine, prompts, rows):
        if any(marker in list(p) for p in prompts):
            raise RuntimeError("out of memory")
        return join(engine, prompts, rows)

    def slow_step(engine):  # the running request still has steps to go when the other arrives
        time.sleep(0.05)
        return step(engine)

    monkeypatch.setattr(Engine, "join", failing_for_the_marker)
    monkeypatch.setattr(Engine, "step", slow_step)

    async def ask(client) -> tuple[httpx.Response, httpx.Response]:
        running = asyncio.create_task(client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 8}))
        while not scheduler.running:
            await asyncio.sleep(0.005)
        failed = await client.post("/v1/completions", json={"prompt": "w9", "max_tokens": 2})
        assert scheduler.running  # it arrived while the first one was decoding
        # and holds no slot from then on (it was counted as admitting through the next step: requests for the
        # slots still free were refused 429)
        assert scheduler.admitting == []
        return await running, failed

    running, failed = _asked(app, ask)
    assert failed.status_code == 500 and "out of memory" in failed.json()["error"]["message"]
    assert running.status_code == 200, running.text
    assert app.state.service.metrics.finished.labels("error")._value.get() == 1


def test_the_batch_histogram_reaches_the_servers_largest_batch():
    """Its buckets stopped at 128 rows where --max-batch goes to 4,096: larger steps showed in +Inf alone."""
    from prometheus_client import generate_latest

    from encdec.serve.metrics import Metrics, batch_buckets

    assert batch_buckets(1) == (1,) and batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(12) == (1, 2, 4, 8, 12)
    metrics = Metrics(256)
    metrics.batch.observe(200)
    text = generate_latest(metrics.registry).decode()
    assert 'encdec_batch_size_bucket{le="128.0"} 0.0' in text and 'encdec_batch_size_bucket{le="256.0"} 1.0' in text


def test_a_request_whose_scores_overflow_fails_alone(local, monkeypatch):
    """One row whose logits were not finite (an overflow in float16) made torch.multinomial raise for the whole
    batch: every request decoding with it got a 500. Its neighbour, seeded, now ends as it would alone; the row's
    own request gets the API's error, as does a greedy one (its NaN scores were answered as tokens, with
    log-probabilities JSON cannot hold: a bare 500 in plain text, uncounted)."""
    import asyncio

    from encdec.inference.engine import Engine

    hidden = Engine.hidden

    def poisoned(engine, n, seen):
        out = hidden(engine, n, seen)
        for slot, row in enumerate(engine.rows[:n]):
            if row.max_new_tokens == 7:
                out[slot] = float("nan")
        return out

    monkeypatch.setattr(Engine, "hidden", poisoned)
    seeded = {"prompt": "w1 w2", "max_tokens": 8, "temperature": 0.7, "seed": 1, "ignore_eos": True}

    async def ask(client) -> list[httpx.Response]:
        return await asyncio.gather(client.post("/v1/completions", json=seeded),
                                    client.post("/v1/completions", json={"prompt": "w3", "max_tokens": 7,
                                                                         "temperature": 0.7}))

    app = _app(local)
    fine, broken = _asked(app, ask)
    assert fine.status_code == 200, fine.text
    assert fine.json()["choices"][0]["text"] == _solo(local, "w1 w2", 8, do_sample=True, temperature=0.7, seed=1,
                                                      eos_token_ids=[])
    assert broken.status_code == 500 and "not finite" in broken.json()["error"]["message"]
    assert app.state.service.metrics.finished.labels("error")._value.get() == 1

    async def greedy(client) -> httpx.Response:
        return await client.post("/v1/completions", json={"prompt": "w3", "max_tokens": 7, "logprobs": 2,
                                                           "temperature": 0})

    app = _app(local)
    answer = _asked(app, greedy)  # greedy too: a NaN counted as the largest logit, and its tokens were answered
    assert answer.status_code == 500 and "not finite" in answer.json()["error"]["message"], answer.text
    assert app.state.service.metrics.finished.labels("error")._value.get() == 1
    embed = Engine.embed
    monkeypatch.setattr(Engine, "embed", lambda engine, prompts, pooling: embed(engine, prompts, pooling) * math.nan)

    async def vectors(client) -> httpx.Response:
        return await client.post("/v1/embeddings", json={"input": "w3"})

    app = _app(local)
    answer = _asked(app, vectors)
    assert answer.status_code == 500 and "JSON" in answer.json()["error"]["message"]
    assert app.state.service.metrics.requests.labels("/v1/embeddings", "500")._value.get() == 1


@pytest.mark.parametrize("stream", [False, True])
def test_the_other_choices_of_a_failed_request_are_counted_as_failed_not_as_cancelled(local, monkeypatch, stream):
    """One of n=2 choices fails (scores not finite): the other ended with the request, and was counted under
    "cancelled", whose help says the client went away, though the client was there for the error."""
    from encdec.inference.engine import Engine

    hidden = Engine.hidden

    def poisoned(engine, n, seen):  # the first slot's row, from its third token
        out = hidden(engine, n, seen)
        if n == 2 and len(engine.rows[0].tokens) >= 2:
            out[0] = float("nan")
        return out

    monkeypatch.setattr(Engine, "hidden", poisoned)
    app = _app(local)

    async def ask(client) -> httpx.Response:
        return await client.post("/v1/completions", json={"prompt": "w1 w2", "max_tokens": 8, "n": 2, "seed": 3,
                                                          "temperature": 0.7, "ignore_eos": True, "stream": stream})

    answer = _asked(app, ask)
    assert ("not finite" in answer.text) and (answer.status_code == (200 if stream else 500)), answer.text
    finished = app.state.service.metrics.finished
    deadline = time.monotonic() + 5  # (the other choice leaves the batch at the scheduler's next cycle)
    while finished.labels("error")._value.get() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (finished.labels("error")._value.get(), finished.labels("cancelled")._value.get()) == (2, 0)


def test_time_to_first_token_counts_from_the_request_not_from_its_queue_entry(local, monkeypatch):
    """Reading, parsing and tokenizing share one thread: under load a request waits there, and the histograms,
    which started once it was tokenized, left that wait out."""
    app = _app(local)
    service, tokens = app.state.service, app.state.service.tokens

    def slow_tokens(parsed):
        time.sleep(0.5)
        return tokens(parsed)

    monkeypatch.setattr(service, "tokens", slow_tokens)
    answer = _asked(app, lambda client: client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2}))
    assert answer.status_code == 200
    assert service.metrics.ttft._sum.get() >= 0.5 and service.metrics.latency._sum.get() >= 0.5


def test_a_request_in_its_encoder_pass_keeps_the_scheduler_busy(local, monkeypatch):
    """Taken from the queue and not yet decoding, a request counted as idle: SIGTERM's drain, which waits for
    idle, could close its connection during the encoder pass (seconds on a CPU)."""
    import asyncio

    from encdec.inference.engine import Engine

    app, join, entered, release = _app(local), Engine.join, threading.Event(), threading.Event()
    scheduler = app.state.service.scheduler

    def slow_join(engine, prompts, rows):
        entered.set()
        release.wait(10)
        return join(engine, prompts, rows)

    monkeypatch.setattr(Engine, "join", slow_join)

    async def ask(client) -> tuple[httpx.Response, bool]:
        answer = asyncio.create_task(client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2}))
        await asyncio.to_thread(entered.wait, 10)
        idle = scheduler.idle()
        release.set()
        return await answer, idle

    try:
        answer, idle_while_encoding = _asked(app, ask)
    finally:
        release.set()
    assert entered.is_set() and not idle_while_encoding
    assert answer.status_code == 200 and scheduler.idle()


def test_a_scheduler_that_died_fails_its_requests_and_says_so(local, monkeypatch):
    """An error while failing a step's requests (a lost CUDA context) ended the scheduler's thread: its requests
    waited for good, /health said ok and new requests queued for nobody."""
    import asyncio

    from encdec.inference.engine import Engine

    def lost(*args, **kwargs):
        raise RuntimeError("CUDA error: context lost")

    monkeypatch.setattr(Engine, "step", lost)
    monkeypatch.setattr(Engine, "cancel", lost)

    async def ask(client) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        body = {"prompt": "w1", "max_tokens": 2}
        first = await asyncio.wait_for(client.post("/v1/completions", json=body), 30)
        return first, await client.post("/v1/completions", json=body), await client.get("/health")

    app = _app(local)
    first, later, health = _asked(app, ask)
    assert first.status_code == 500 and "context lost" in first.json()["error"]["message"]
    assert later.status_code == 503 and "scheduler failed" in later.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["status"] == "failed"
    scheduler = app.state.service.scheduler
    assert not scheduler.thread.is_alive()
    # its engine still holds the row it could not cancel: a SIGTERM's drain waited for it for good
    assert scheduler.engine.rows and scheduler.idle()
    assert app.state.service.metrics.running._value.get() == 0 and app.state.service.metrics.queue._value.get() == 0
    # the failed request ended there: its client's leaving queued it for a thread that no longer runs
    assert scheduler.cancelled == []


@pytest.mark.parametrize("where", ["step", "join"])
def test_a_server_whose_scheduler_failed_stops_with_its_error(local, monkeypatch, where):
    """A lost device ends the scheduler at once (`device_lost`), and the server then stops, `serve` failing with the
    scheduler's error: it stayed up answering 503, which only a health probe would restart. Lost in a prompt's
    encoder pass (`join`), its request was left out of those the dying scheduler failed: no answer at all."""
    from encdec.inference.engine import Engine
    from encdec.serve import app as app_module

    def lost(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Engine, where, lost)
    monkeypatch.setattr(app_module, "FLUSH_AFTER_DRAIN_S", 0.1)
    with _serving(local, monkeypatch) as (port, thread, raised):
        answer = httpx.post(f"http://{HOST}:{port}/v1/completions", json={"prompt": "w1", "max_tokens": 2}, timeout=30)
        assert answer.status_code == 500 and "illegal memory access" in answer.text
        thread.join(30)
    assert not thread.is_alive() and raised and "its scheduler failed" in raised[0] and "illegal memory" in raised[0]


def test_an_idle_connection_is_kept_for_timeout_keep_alive(local, monkeypatch):
    """--timeout-keep-alive (uvicorn's 5 s otherwise, below load balancers' idle timeouts: 502s)."""
    with _serving(local, monkeypatch, keep_alive_s=1) as (port, _, _), \
            socket.create_connection((HOST, port), 30) as raw:
        def health() -> bytes:  # one answer, its headers and its body perhaps read apart
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):
                answer += raw.recv(65536) or b"}"
            return answer

        assert health().startswith(b"HTTP/1.1 200")
        time.sleep(0.5)
        assert health().startswith(b"HTTP/1.1 200")  # within the second: the same connection
        start = time.monotonic()
        assert raw.recv(65536) == b""  # then closed by the server
        assert 0.5 < time.monotonic() - start < 5


@contextlib.contextmanager
def _serving(local, monkeypatch, **settings) -> Iterator[tuple[int, threading.Thread, list[str]]]:
    """`serve` of the tiny model in a thread of this process, listening on a free port: its port, its thread, and
    the messages of the EncdecError it ends with, if it does; stopped (as by SIGTERM) at the end if it runs."""
    from encdec.errors import EncdecError
    from encdec.serve.app import DrainingServer, Settings, serve
    from encdec.serve.protocol import Limits

    port, raised, servers, run_server = _free_port(), [], [], DrainingServer.run
    monkeypatch.setattr(DrainingServer, "run", lambda self: servers.append(self) or run_server(self))

    def run() -> None:
        try:
            serve(*local, Settings("tiny", max_batch=2, max_queue=2, limits=Limits(24, 8), **settings), HOST, port)
        except EncdecError as e:
            raised.append(str(e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def answers() -> bool:
        try:
            return httpx.get(f"http://{HOST}:{port}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        _wait_for(answers, 60, "the server to listen")
        yield port, thread, raised
    finally:
        if thread.is_alive():
            servers[0].should_exit = True
            thread.join(30)


def test_an_abort_during_an_embedding_pass_encodes_none_of_that_cycles_arrivals(local, monkeypatch):
    """--shutdown-timeout's abort was read at the top of a cycle only: one that came during an embedding pass still
    let the completions taken in that cycle through an encoder pass and a step past the deadline (and past the
    clients' 503, when the process's end cut them first)."""
    import asyncio

    from encdec.inference.engine import Engine
    from encdec.serve.protocol import APIError

    app = _app(local)
    scheduler = app.state.service.scheduler
    embed, join, joined = Engine.embed, Engine.join, []

    def aborted_meanwhile(engine, prompts, pooling):
        scheduler.abort(APIError(503, "the drain ran past --shutdown-timeout 0", None))
        return embed(engine, prompts, pooling)

    monkeypatch.setattr(Engine, "embed", aborted_meanwhile)
    monkeypatch.setattr(Engine, "join",
                        lambda engine, prompts, rows: joined.append(prompts) or join(engine, prompts, rows))

    async def ask(client):  # both queued before the scheduler starts: one cycle takes both
        posted = [asyncio.create_task(client.post("/v1/embeddings", json={"input": "w1 w2"})),
                  asyncio.create_task(client.post("/v1/completions", json={"prompt": "w3", "max_tokens": 4}))]
        while not (scheduler.waiting and scheduler.embedding):
            await asyncio.sleep(0.005)
        scheduler.start()
        return await asyncio.gather(*posted)

    try:
        embedded, completed = _asked(app, ask, scheduler=False)
    finally:
        scheduler.stop(5)
    assert embedded.status_code == 200 and completed.status_code == 503 and joined == []
    assert "--shutdown-timeout 0" in completed.json()["error"]["message"]


def test_a_pass_running_at_the_drains_close_does_not_hold_the_process_past_it(local, monkeypatch):
    """uvicorn runs the app's shutdown once every connection has closed: it joined the scheduler for up to 600 s, so
    with the clients gone (their own timeouts) a long pass kept the process up past the S + 10 s a --shutdown-timeout
    drain promises. The join now ends at that close."""
    import asyncio

    from encdec.inference.engine import Engine

    app = _app(local)
    scheduler, step = app.state.service.scheduler, Engine.step

    def long_pass(engine):
        time.sleep(3)
        return step(engine)

    monkeypatch.setattr(Engine, "step", long_pass)

    async def run() -> float:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{HOST}") as client:
            async with app.router.lifespan_context(app):
                asked = asyncio.create_task(client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 4}))
                while not scheduler.running:
                    await asyncio.sleep(0.01)
                asked.cancel()  # its client went away
                app.state.close_by = time.monotonic() + 0.2  # as SIGTERM's drain sets it, its close near
                began = time.monotonic()
            return time.monotonic() - began

    try:
        assert asyncio.run(run()) < 2.0  # not the pass's 3 s, nor the rest of the request's
    finally:
        scheduler.stop(10)
    # the pass ended after the event loop had closed: its answer goes nowhere, and the thread ended without error
    assert not scheduler.thread.is_alive() and scheduler.failed is None


@pytest.mark.parametrize("failing", ["join", "step"])
def test_passes_failing_again_and_again_make_health_say_so_until_one_succeeds(local, monkeypatch, failing):
    """Passes that fail every time (a --max-batch whose caches never fit the memory) failed each request with a 500
    while /health said ok: after MAX_FAILURES_IN_A_ROW of them /health answers 503 "failing", the server still
    taking requests (a client retrying one too large must not stop it), and "ok" again once a step succeeds. A
    step failing each time after its admission succeeded counts as much as failed admissions."""
    from encdec.inference.engine import Engine
    from encdec.serve.scheduler import MAX_FAILURES_IN_A_ROW

    real, broken = getattr(Engine, failing), [True]

    def out_of_memory(*args, **kwargs):
        if broken[0]:
            raise RuntimeError("CUDA error: out of memory")  # of memory: not a lost device
        return real(*args, **kwargs)

    monkeypatch.setattr(Engine, failing, out_of_memory)

    async def ask(client) -> list[httpx.Response]:
        body = {"prompt": "w1", "max_tokens": 2}
        answers = []
        for _ in range(MAX_FAILURES_IN_A_ROW):
            answers += [await client.get("/health"), await client.post("/v1/completions", json=body)]
        answers.append(await client.get("/health"))
        broken[0] = False
        return [*answers, await client.post("/v1/completions", json=body), await client.get("/health")]

    *failed, failing_health, answered, healthy = _asked(_app(local), ask)
    assert [a.status_code for a in failed] == [200, 500] * MAX_FAILURES_IN_A_ROW
    assert failing_health.status_code == 503 and failing_health.json()["status"] == "failing"
    assert "out of memory" in failing_health.json()["error"]
    assert answered.status_code == 200 and healthy.status_code == 200


def test_a_failed_step_fails_its_requests_and_leaves_the_metrics_idle(local, monkeypatch):
    """The requests of a step that raised get a 500 and are counted as ended by an error; the running gauge went
    back to 0 (it stayed at its last value until the next request), and the next request is answered."""
    from encdec.inference.engine import Engine

    step, calls = Engine.step, []

    def failing_third(engine):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return step(engine)

    monkeypatch.setattr(Engine, "step", failing_third)

    async def ask(client) -> tuple[httpx.Response, httpx.Response]:
        failed = await client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 8, "temperature": 0})
        return failed, await client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2})

    app = _app(local)
    failed, ok = _asked(app, ask)
    assert failed.status_code == 500 and "out of memory" in failed.json()["error"]["message"]
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    metrics = app.state.service.metrics
    assert metrics.running._value.get() == 0 and metrics.finished.labels("error")._value.get() == 1
    assert metrics.finished.labels("length")._value.get() == 1


def test_a_failure_while_reading_the_answer_is_an_api_error_and_the_server_goes_on(local, monkeypatch):
    """An error of the server's own text handling (here its detokenizer) while a request's tokens arrive was a bare
    500 in plain text, uncounted, or a stream cut short with no event; the other choices' tasks of the request were
    left running. Now: the API's error shape, counted, an error event mid-stream, and the next request answered."""
    import asyncio

    from encdec.serve.text import TextStream

    add = TextStream.add
    failing_streams: list[TextStream] = []  # the first choice's of each request: only it fails

    def failing(self, token):
        if not failing_streams or failing_streams[-1] is self:
            failing_streams[-1:] = [self]
            raise ValueError("undecodable")
        return add(self, token)

    monkeypatch.setattr(TextStream, "add", failing)
    body = {"prompt": "w1", "max_tokens": LONG, "ignore_eos": True, "temperature": 1.0, "n": 2, "seed": 1}

    async def ask(client) -> tuple[httpx.Response, str, int, httpx.Response]:
        plain = await asyncio.wait_for(client.post("/v1/completions", json=body), 60)
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and "_collect" in repr(t)]
        failing_streams.clear()
        streamed = await asyncio.wait_for(client.post("/v1/completions", json={**body, "stream": True}), 60)
        monkeypatch.setattr(TextStream, "add", add)
        after = await client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2})
        return plain, streamed.text, len(leftovers), after

    app = _app(local, limits=(24, LONG))
    plain, streamed, leftovers, after = _asked(app, ask)
    assert plain.status_code == 500 and "undecodable" in plain.json()["error"]["message"], plain.text
    assert plain.json()["error"]["type"] == "server_error"
    assert '"error"' in streamed and "undecodable" in streamed
    assert streamed.endswith("data: [DONE]\n\n")  # after the error event, as after any stream
    assert leftovers == 0
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2
    metrics = app.state.service.metrics
    assert metrics.requests.labels("/v1/completions", "500")._value.get() == 1
    # the choice that did not fail left the batch with its request, in either form, long before its LONG tokens
    assert metrics.finished.labels("length")._value.get() == 1  # the request after
    assert metrics.generated._value.get() < 2 * LONG


def test_an_api_key_guards_the_api_but_not_health(local):
    """With --api-key the openai client needs the key (401, AuthenticationError, without it or with another);
    /health and /metrics stay open."""
    app = _app(local, api_key="s3cret")

    async def ask(http, key: str) -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"http://{HOST}/v1", api_key=key, http_client=http, max_retries=0)
        try:
            return [m.id for m in (await client.models.list()).data]
        except openai.AuthenticationError as e:
            assert e.status_code == 401 and "api key" in e.message.lower()
            return []
        finally:
            bare = await http.get("/v1/models")
            assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
            for n in range(5):  # paths a client without the key makes up add no series to the metrics
                assert (await http.get(f"/v1/made-up-{n}")).status_code == 401
            assert (await http.get("/health")).status_code == 200 and (await http.head("/health")).status_code == 200
            for page in ("/docs", "/redoc", "/openapi.json"):  # the API's description: not without the key either
                assert (await http.get(page)).status_code == 404
            metrics = (await http.get("/metrics")).text
            assert "made-up" not in metrics and 'endpoint="other",status="401"' in metrics

    assert _asked(app, lambda http: ask(http, "s3cret"), scheduler=False) == ["tiny"]
    assert _asked(app, lambda http: ask(http, "wrong"), scheduler=False) == []
    for header in ("Bearer  s3cret", "bearer\ts3cret"):  # RFC 6750: one or more spaces; the scheme in any case
        answer = _asked(app, lambda http, header=header: http.get("/v1/models", headers={"Authorization": header}),
                        scheduler=False)
        assert answer.status_code == 200, header


def test_the_limits_never_exceed_the_models_positions(checkpoint, monkeypatch, capsys):
    """--max-input-tokens and --max-new-tokens above what the model reads (the tiny model: 256 positions) let
    requests through that `encdec generate` refuses; the server lowers them, and says so."""
    from encdec.cli import main
    from encdec.logs import setup
    from encdec.serve import app

    started = []
    monkeypatch.setattr(app, "serve", lambda model, tokenizer, settings, host, port: started.append(settings))
    setup()
    assert main(["serve", str(checkpoint), "--max-input-tokens", "1000", "--max-new-tokens", "900"]) == 0
    assert (started[0].limits.max_input_tokens, started[0].limits.max_new_tokens) == (256, 256)
    err = capsys.readouterr().err
    assert "prompts are limited to 256 tokens" in err and "answers are limited to 256 tokens" in err
    assert main(["serve", str(checkpoint), "--max-input-tokens", "24", "--max-new-tokens", "8"]) == 0
    assert (started[1].limits.max_input_tokens, started[1].limits.max_new_tokens) == (24, 8)


def test_an_empty_prompt_of_a_tokenizer_without_bos_is_refused(local):
    """Qwen's tokenizer puts no BOS first, so "" has no token: the engine gave such a row a cross-attention over
    nothing, or over what its slot held before (its tokens depended on the server's history)."""
    import copy

    from tokenizers import processors

    from encdec.inference.engine import Engine, Row
    from encdec.serve.app import APIError, Service, Settings
    from encdec.serve.protocol import Limits

    model, tokenizer = local
    tokenizer = copy.deepcopy(tokenizer)  # never the loader's memoised one
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    assert tokenizer("").input_ids == []
    service = Service(model, tokenizer, Settings("tiny", max_batch=2, max_queue=2, limits=Limits(24, 8)))
    with pytest.raises(APIError, match="'prompt' has no tokens") as refused:
        service.ids("", "prompt")
    assert refused.value.status == 400
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        Engine(model, max_batch=2).join([[5, 6], []], [Row(4, frozenset()), Row(4, frozenset())])


def test_waiting_embedding_requests_share_encoder_passes(local, monkeypatch):
    """Many one-text requests are encoded together (up to --max-batch inputs a pass, oldest first), a large one
    over several passes; each request gets its own vectors, and one whose client left gets none."""
    import asyncio

    from encdec.inference.engine import Engine
    from encdec.serve.metrics import Metrics
    from encdec.serve.scheduler import EmbedJob, Scheduler

    model, _ = local
    engine = Engine(model, max_batch=4)
    passes = []
    embed = engine.embed
    monkeypatch.setattr(engine, "embed", lambda prompts, pooling: passes.append(len(prompts)) or embed(prompts, pooling))
    scheduler = Scheduler(engine, max_queue=16, metrics=Metrics())

    async def run() -> list:
        loop = asyncio.get_running_loop()
        jobs = [EmbedJob([[5, 6 + i]], loop) for i in range(3)] + [EmbedJob([[7, 8, 9]] * 6, loop), EmbedJob([[4]], loop)]
        scheduler.submit(*jobs)
        jobs[4].result.cancel()  # its client left
        while scheduler.embedding:
            scheduler._embed(list(scheduler.embedding))
            await asyncio.sleep(0)  # let the results settle
        return [await job.result for job in jobs[:4]]

    vectors = asyncio.run(run())
    assert passes == [4, 4, 1]  # 3 one-text requests + 1 input of the large one; 4 more; its last
    assert [len(v) for v in vectors] == [1, 1, 1, 6]
    for i in range(3):
        torch.testing.assert_close(vectors[i][0], engine.embed([[5, 6 + i]], "mean")[0], atol=1e-5, rtol=1e-5)
    assert all(torch.allclose(v, vectors[3][0], atol=1e-5) for v in vectors[3])


def _statuses(scheduler, loop, count: int) -> list[int]:
    """The status each of `count` one-generation requests gets from `scheduler.submit` (200: queued)."""
    from encdec.inference.engine import Row
    from encdec.serve.protocol import APIError
    from encdec.serve.scheduler import Job

    statuses = []
    for _ in range(count):
        try:
            scheduler.submit(Job([5, 6], Row(2, frozenset()), loop))
            statuses.append(200)
        except APIError as e:
            statuses.append(e.status)
    return statuses


def test_the_queue_limit_counts_requests_waiting_for_a_slot_not_those_headed_for_free_ones(local):
    """--max-queue 1 with 4 free slots: an idle server answered 429 to the second of a burst, every one of them
    queued until the scheduler's next cycle (and a request of 2 generations was refused 400 outright). And requests
    just admitted counted twice (admitting and running) for the step after: 429 with slots free and --max-queue 0."""
    import asyncio

    from encdec.inference.engine import Engine, Row
    from encdec.serve.metrics import Metrics
    from encdec.serve.protocol import APIError
    from encdec.serve.scheduler import Job, Scheduler

    scheduler = Scheduler(Engine(local[0], max_batch=4), max_queue=1, metrics=Metrics())  # its thread not started

    async def burst() -> list[int]:
        return _statuses(scheduler, asyncio.get_running_loop(), 7)

    assert asyncio.run(burst()) == [200] * 5 + [429] * 2  # 4 slots + 1 waiting
    with pytest.raises(APIError, match=r"holds at most 5 \(--max-batch 4 \+ --max-queue 1\)"):
        scheduler.check_size(6, "n")
    scheduler.check_size(5, "n")

    second = Scheduler(Engine(local[0], max_batch=4), max_queue=0, metrics=Metrics())

    async def admitted_then_more() -> list[int]:  # two admitted as the thread admits them, in the step after
        loop = asyncio.get_running_loop()
        first = [Job([5, 6], Row(2, frozenset()), loop) for _ in range(2)]
        second.submit(*first)
        second.admitting = [second.waiting.popleft() for _ in first]
        second._admit(second.admitting)
        return _statuses(second, loop, 3)  # 2 slots free, no queue: they were counted twice, the next refused

    assert asyncio.run(admitted_then_more()) == [200, 200, 429]


def test_an_int8_server_says_that_batching_moves_its_tokens(checkpoint, monkeypatch, capsys):
    """Dynamic int8 products share one activation scale across their rows, so a request's tokens depend on the
    requests decoded with it; the server says so when it starts (float32 does not depend on them: tested above)."""
    import encdec.serve.app
    from encdec.checkpoint import _converted_for_inference
    from encdec.cli import main

    started = []  # how the served model's products were converted: int8 only when asked
    monkeypatch.setattr(encdec.serve.app, "serve", lambda model, *a: started.append(_converted_for_inference(model)))
    assert main(["serve", str(checkpoint), "--quantize", "int8"]) == 0
    assert started == ["quantized to int8"]
    assert "depend on the prompts and inputs computed with it" in capsys.readouterr().err
    assert main(["serve", str(checkpoint)]) == 0
    assert started[1] != "quantized to int8" and "int8" not in capsys.readouterr().err


def test_a_compiled_step_is_built_before_the_server_takes_requests(sources, monkeypatch):
    """`encdec serve --compile`: the scheduler runs one row's and two rows' steps (first positions and later ones)
    through the compiled step as it starts, in its own thread with its own thread count (dynamo compiles again for
    another: warmed up in the main thread, with one, the first requests waited for a compilation), and leaves the
    engine as it found it: a prompt then gets the eager engine's tokens."""
    from encdec.inference.engine import Row
    from encdec.serve.app import Service, Settings
    from encdec.serve.protocol import Limits

    model = encdec.adapt(encdec.load_source(str(sources["gemma3-two-layers"])))
    tokenizer = load_tokenizer(sources["gemma3-two-layers"])
    calls, real = [], torch.compile

    def compile_(fn, **options):  # dynamo's capture, without inductor's code generation (a minute on CPU)
        compiled = real(fn, backend="eager", **options)
        return lambda n, seen: calls.append((n, seen, threading.current_thread().name,
                                                  torch.get_num_threads())) or compiled(n, seen)

    monkeypatch.setattr(torch, "compile", compile_)
    settings = Settings("tiny", max_batch=2, max_queue=2, limits=Limits(24, 8), compile_step=True, threads=3)
    scheduler = Service(model, tokenizer, settings).scheduler
    assert not calls  # not before the server starts
    scheduler.start()
    scheduler.stop(10)
    engine = scheduler.engine
    assert {c[0] for c in calls} == {1, 2} and {c[1] for c in calls} == {1, 2, 3}
    assert {c[2:] for c in calls} == {("encdec-scheduler", 3)}
    assert not engine.rows
    prompt = tokenizer("w12 w13").input_ids
    row = Row(6, frozenset({-1}))
    engine.join([prompt], [row])
    while engine.rows:
        engine.step()
    assert row.tokens == model.generate(torch.tensor([prompt]), max_new_tokens=6, eos_token_ids=[-1])[0].tolist()


def test_a_failed_warm_up_is_raised_where_the_scheduler_is_started(local, monkeypatch):
    """`encdec serve --compile` starts the scheduler (whose thread warms the step up) before uvicorn runs: what the
    warm-up raised is raised there (a second start neither starts another thread nor hides it), and `serve` says
    it in one line."""
    from encdec.errors import EncdecError
    from encdec.inference.engine import Engine
    from encdec.serve.app import Service, Settings, serve
    from encdec.serve.protocol import Limits

    def broken(self):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(Engine, "warm_up", broken)
    model, tokenizer = local
    scheduler = Service(model, tokenizer, Settings("tiny", max_batch=2, max_queue=2, limits=Limits(24, 8),
                                                   compile_step=True)).scheduler
    for _ in range(2):
        with pytest.raises(RuntimeError, match="no compiler here"):
            scheduler.start()
    assert not scheduler.thread.is_alive()
    settings = Settings("tiny", max_batch=2, max_queue=2, limits=Limits(24, 8), compile_step=True)
    with pytest.raises(EncdecError, match=r"^--compile: compiling the decoding step failed \(RuntimeError: no "
                                          r"compiler here\); serve without --compile$"):
        serve(model, tokenizer, settings, HOST, 1)  # before uvicorn binds anything


def test_max_connections_turns_away_what_is_past_it_and_takes_it_again_once_freed(checkpoint):
    """--max-connections 1: while a client holds the one connection (open, sending nothing), an API request gets
    503 in the API's error shape, while /health and /metrics still answer (a probe must not fail for load); once
    it lets go, the server answers again. (--served-model-name, while a server with options of its own runs: the
    name in place of the checkpoint's path.)"""
    s = Server(checkpoint, "--max-connections", "1", "--served-model-name", "t5gemma-tiny")
    try:
        with socket.create_connection((HOST, s.port)):
            _wait_for(lambda: httpx.get(f"{s.base}/v1/models", timeout=10).status_code == 503, 20, "the 503")
            refused = httpx.get(f"{s.base}/v1/models", timeout=10)
            assert "--max-connections" in refused.json()["error"]["message"]
            assert httpx.get(f"{s.base}/health", timeout=10).status_code == 200
            assert _metric(s.base, 'encdec_requests_total{endpoint="/v1/models",status="503"}') >= 2
        _wait_for(lambda: httpx.get(f"{s.base}/v1/models", timeout=10).status_code == 200, 20, "the slot to free")
        assert [m["id"] for m in httpx.get(f"{s.base}/v1/models", timeout=10).json()["data"]] == ["t5gemma-tiny"]
        named = httpx.post(f"{s.base}/v1/completions", json={"model": "t5gemma-tiny", "prompt": "w1", "max_tokens": 1})
        path = httpx.post(f"{s.base}/v1/completions", json={"model": str(checkpoint), "prompt": "w1", "max_tokens": 1})
        assert named.status_code == 200 and named.json()["model"] == "t5gemma-tiny"
        assert path.status_code == 404 and "t5gemma-tiny" in path.json()["error"]["message"]
    finally:
        s.close()


def test_a_streamed_choice_ended_by_a_stop_string_leaves_the_batch_before_its_last_piece_is_sent(
        local, endless_prompt, monkeypatch):
    """The stream waits at each event until it is sent (a slow reader: until the socket drains); a choice its stop
    string had ended was cancelled only after its last piece was out, decoding on (up to max_tokens) meanwhile."""
    from encdec.serve import app as app_module
    from encdec.serve.scheduler import Scheduler

    model, tokenizer = local
    tokens = _solo_tokens(local, endless_prompt, 12)
    texts = [tokenizer.decode(tokens[:i], skip_special_tokens=True) for i in range(len(tokens) + 1)]
    # a token whose text ends with a character seen nowhere before: a stop on that character cuts inside the token,
    # so that the token's text before it is the piece sent as the stop ends the choice
    at = next(i for i in range(2, len(tokens)) if len(texts[i]) - len(texts[i - 1]) >= 2
              and texts[i][-1] not in texts[i][:-1] and texts[i].startswith(texts[i - 1]))
    stop = texts[at][-1]
    said = []
    choice, cancel = app_module._choice, Scheduler.cancel
    monkeypatch.setattr(app_module, "_choice", lambda kind, index, text, *rest: said.append(("text", text))
                        or choice(kind, index, text, *rest))
    monkeypatch.setattr(Scheduler, "cancel", lambda self, job, reason="cancelled": said.append(("cancel", reason))
                        or cancel(self, job, reason))

    async def ask(client):
        body = {"prompt": endless_prompt, "max_tokens": LONG, "temperature": 0, "stop": [stop], "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            return [line async for line in reply.aiter_lines()]

    lines = _asked(_app(local, limits=(24, LONG)), ask)
    assert "data: [DONE]" in lines
    streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines if line.startswith("data: {"))
    assert streamed == texts[at][:-1]
    last_piece = max(i for i, (what, text) in enumerate(said) if what == "text" and text)
    assert ("cancel", "stop") in said[:last_piece], said


def test_answers_are_written_as_json_off_the_event_loop(local, monkeypatch):
    """Every stream and /health wait while the event loop works: the JSON of a large answer (2,048 inputs'
    embeddings as floats, many choices' log-probabilities) took seconds on it."""
    import threading

    from encdec.serve import app as app_module
    from encdec.serve.logprobs import TokenLogprobs

    rendered = []
    render = app_module.JSONResponse.render
    monkeypatch.setattr(app_module.JSONResponse, "render", lambda self, content: rendered.append(
        (content.get("object"), threading.current_thread().name)) or render(self, content))
    listed = TokenLogprobs.render  # the log-probabilities' own objects too (a second for 64 chat choices of 512)
    monkeypatch.setattr(TokenLogprobs, "render", lambda self: rendered.append(
        ("logprobs", threading.current_thread().name)) or listed(self))

    async def ask(client):
        for path, body in (("/v1/embeddings", {"input": ["w1 w2", "w3"]}),
                           ("/v1/completions", {"prompt": "w1 w2", "max_tokens": 3, "logprobs": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 3,
                                                     "logprobs": True, "top_logprobs": 2})):
            (await client.post(path, json=body)).raise_for_status()

    _asked(_app(local), ask)
    assert [what for what, _ in rendered] == ["list", "logprobs", "text_completion", "logprobs", "chat.completion"]
    assert all(thread.startswith("encdec-read") for _, thread in rendered), rendered


def test_requests_arriving_together_at_an_idle_server_share_one_encoder_pass(local, monkeypatch):
    """The event loop hands a burst to the queue one request at a time: an idle scheduler that encoded the first
    at once held the others up for that pass. It waits while arrivals keep coming (here up to 0.3 s apart), but
    not for a batch that is already full."""
    import asyncio

    from encdec.inference.engine import Engine, Row
    from encdec.serve import scheduler as scheduling
    from encdec.serve.metrics import Metrics

    model, _ = local
    engine, joined = Engine(model, max_batch=4), []
    join = engine.join
    monkeypatch.setattr(engine, "join", lambda prompts, rows: joined.append(len(prompts)) or join(prompts, rows))
    scheduler = scheduling.Scheduler(engine, max_queue=16, metrics=Metrics())

    async def burst(gaps: list[float]) -> list[list[int]]:
        loop, jobs = asyncio.get_running_loop(), []
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            jobs.append(scheduling.Job([5, 6 + i], Row(2, frozenset()), loop))
            scheduler.submit(jobs[-1])
        for job in jobs:
            while await job.tokens.get() is not None:
                pass
        return [job.row.tokens for job in jobs]

    monkeypatch.setattr(scheduling, "GATHER_QUIET_S", 0.3)
    monkeypatch.setattr(scheduling, "GATHER_MAX_S", 3.0)
    scheduler.start()
    try:
        tokens = asyncio.run(burst([0, 0.05, 0.05]))
        assert joined == [3] and all(len(t) == 2 for t in tokens)
        monkeypatch.setattr(scheduling, "GATHER_QUIET_S", 60.0)
        monkeypatch.setattr(scheduling, "GATHER_MAX_S", 60.0)
        began = time.perf_counter()
        asyncio.run(burst([0, 0, 0, 0]))  # as many as the batch holds: no wait
        assert joined == [3, 4] and time.perf_counter() - began < 30
    finally:
        scheduler.stop(10)


def test_a_request_gone_during_an_encoder_pass_that_an_abort_ends_is_counted_once_under_its_reason(local):
    """A client left while its request was being admitted, and a --shutdown-timeout abort came during the same
    pass: the request, queued again, was counted as finished for reason "None" (and not again at the abort)."""
    import asyncio

    from encdec.inference.engine import Engine, Row
    from encdec.serve import scheduler as scheduling
    from encdec.serve.metrics import Metrics
    from encdec.serve.protocol import APIError

    model, _ = local
    metrics = Metrics()
    scheduler = scheduling.Scheduler(Engine(model, max_batch=4), max_queue=16, metrics=metrics)
    loop = asyncio.new_event_loop()
    try:
        job = scheduling.Job([5, 6], Row(2, frozenset()), loop)
        scheduler.admitting = [job]  # taken from the queue for the pass (`_run`), not yet in the batch
        scheduler.cancel(job)
        scheduler.waiting.appendleft(job)  # the abort's branch puts the pass's arrivals back in the queue
        scheduler.admitting = []
        scheduler.abort(APIError(503, "shutting down"))
        scheduler._end_if_aborting()
    finally:
        loop.close()
    counted = {s.labels["reason"]: s.value for s in metrics.finished.collect()[0].samples
               if s.name.endswith("_total")}
    assert counted == {"shutdown": 1.0}, counted
