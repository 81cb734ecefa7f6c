"""The real packaged Gemma 3 270M, SmolLM2-135M-Instruct (Llama architecture) and Qwen2.5-Coder-0.5B-Instruct
(Qwen2): about three minutes; the first use of each dequantizes and caches its GGUF (about a minute each)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import encdec
from encdec.cli import main
from encdec.data.corpus import heldout_passages

pytestmark = pytest.mark.real_model


def _adapted(name: str):
    """The source, its adaptation, transformers' own model of the source, the tokenizer, and real text's ids."""
    source = encdec.load_source(name)
    tokenizer = encdec.load_tokenizer(source.directory)
    reference = tf.AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=torch.float32).eval()
    ids = tokenizer(heldout_passages(1)[0], return_tensors="pt").input_ids[:, :48]
    return source, encdec.adapt(source), reference, tokenizer, ids


@pytest.fixture(scope="module")
def real():
    return _adapted("gemma-3-270m")


@pytest.fixture(scope="module")
def smollm2():
    return _adapted("smollm2-135m")


@pytest.fixture(params=["real", "smollm2"])
def each_real(request):
    return request.getfixturevalue(request.param)


def test_invariants_on_real_text(each_real):
    _, model, reference, _, ids = each_real
    with torch.no_grad():
        ref = reference(input_ids=ids, output_hidden_states=True)
        masked = model(ids, torch.zeros_like(ids), ids).logits
        causal = model.encode(ids, causal=True)
    assert (masked - ref.logits).abs().max().item() < 1e-3
    assert (causal - ref.hidden_states[-1]).abs().max().item() < 1e-3


def test_greedy_generation(each_real):
    _, model, _, tokenizer, _ = each_real
    batch = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    cached = model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=5, eos_token_ids=[-1])
    uncached = model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=5, eos_token_ids=[-1], use_cache=False)
    assert cached.shape == (2, 5) and torch.equal(cached, uncached)
    assert ((cached >= 0) & (cached < model.config.vocab_size)).all()


def test_cli_adapt_generate_and_vanilla_transformers(real, tmp_path, capsys):
    _, model, _, tokenizer, ids = real
    out = tmp_path / "t5gemma2-270m"
    assert main(["adapt", "--out", str(out)]) == 0  # default encoder: gemma-3-270m
    assert "T5Gemma2ForConditionalGeneration" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "Hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Hello -> ")
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "T5Gemma2ForConditionalGeneration"
    assert tf.AutoTokenizer.from_pretrained(str(out))("Hello").input_ids == tokenizer("Hello").input_ids
    dec = ids[:, :20]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
        ours = model(ids, torch.ones_like(ids), dec).logits
    # transformers runs SDPA, ours plain products for a sequence this short on CPU: float32 rounding
    # differs (2.4e-3 apart; ours 1.9e-3 and SDPA 1.2e-3 from a float64 run, on logits of magnitude 35)
    assert (ref - ours).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_smollm2_is_the_llama_family_and_adapts_with_merged_attention(smollm2):
    source, model, *_ = smollm2
    stack = source.stack
    assert (source.family, stack.num_layers, stack.hidden_size, source.vocab_size) == ("llama", 30, 576, 49152)
    assert model.config.attention == "merged" and not model.config.encoder.post_norms


def test_cli_adapt_smollm2_saves_the_project_format_that_transformers_loads_with_remote_code(smollm2, tmp_path,
                                                                                             capsys):
    _, model, _, tokenizer, ids = smollm2
    out = tmp_path / "smollm2-enc-dec"
    assert main(["adapt", "--encoder", "smollm2-135m", "--out", str(out)]) == 0
    assert "format encdec" in capsys.readouterr().out
    dec = ids[:, :20]
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(str(out), trust_remote_code=True).eval()
    with torch.no_grad():
        ours = model(ids, torch.ones_like(ids), dec).logits
        assert torch.equal(encdec.load(out)(ids, torch.ones_like(ids), dec).logits, ours)
        assert torch.equal(hf(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits, ours)
    assert encdec.load_tokenizer(out)("Hello").input_ids == tokenizer("Hello").input_ids


@pytest.mark.parametrize("name", ["real", "smollm2"])
def test_pretraining_text_that_spells_control_tokens_stays_text(request, name, tmp_path):
    """A document quoting the EOS token or a UL2 sentinel ("<unused3>" in Gemma's vocabulary) must neither end
    mid-way nor collide with span corruption's sentinels: the stream's only control tokens are the ones the
    tokenizer puts around every text and each document's closing EOS."""
    from encdec.data.tokens import token_stream

    tokenizer = request.getfixturevalue(name)[3]
    data = tmp_path / "a.txt"
    data.write_text(f"Tokens such as {tokenizer.eos_token} or <unused3> are text here.\n\nSecond.\n")
    stream = token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache").tolist()
    control = set(tokenizer.all_special_ids) | {tokenizer.get_vocab().get("<unused3>", -1)}
    around = [t for t in tokenizer("Second.").input_ids if t in control]
    assert [t for t in stream if t in control] == (around + [tokenizer.eos_token_id]) * 2


@pytest.mark.parametrize("name", ["real", "smollm2"])
def test_an_answer_that_spells_a_control_token_keeps_it_as_text(request, name):
    """Fine-tuning targets: the turn's end and EOS close the answer once; the same text inside the answer is text
    (it was read as the marker, teaching the model to end its turn mid-answer)."""
    from encdec.data.chat import ChatFormat
    from encdec.data.instructions import Pair, chat_example

    tokenizer = request.getfixturevalue(name)[3]
    chat = ChatFormat.of(tokenizer)
    marker = "<end_of_turn>" if name == "real" else "<|im_end|>"
    pair = Pair(turns=(("user", f"What is {marker}?"),), response=f"It is written {marker} and ends a turn.",
                source="test")
    example = chat_example(pair, tokenizer, eos_id=tokenizer.eos_token_id, max_input=64, max_target=64, chat=chat)
    control = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(marker)}
    closing = [t for t in example.targets if t in control]
    assert closing == example.targets[-len(closing):] and len(closing) <= 2  # the end of the turn, EOS: last only


@pytest.mark.parametrize("name", ["real", "smollm2"])
def test_instruction_inputs_begin_as_served_prompts_do(request, name):
    """Gemma's tokenizer puts BOS before every text, SmolLM2's names one (<|im_start|>) but puts none: the
    encoder's fine-tuning inputs are what `encdec serve` feeds it for the same conversation (its tokenizer's
    own encoding of the prompt), not the prompt after a BOS of its own."""
    from encdec.data.chat import ChatFormat
    from encdec.data.instructions import Pair, chat_example

    tokenizer = request.getfixturevalue(name)[3]
    chat = ChatFormat.of(tokenizer)
    pair = Pair(turns=(("user", "Name a colour."),), response="Blue.", source="test")
    example = chat_example(pair, tokenizer, eos_id=tokenizer.eos_token_id, max_input=256, max_target=16, chat=chat)
    assert example.inputs == tokenizer(chat.render(list(pair.turns))).input_ids
    if name == "real":  # Gemma's BOS, put there by its tokenizer
        assert example.inputs[0] == tokenizer.bos_token_id and example.inputs[1] != tokenizer.bos_token_id
    else:  # the template's first marker, text of the prompt (not stripped as if it were an added BOS), once
        start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert chat.render(list(pair.turns)).startswith("<|im_start|>system\n")
        assert example.inputs[0] == start and example.inputs[1] != start
    cut = chat_example(pair, tokenizer, eos_id=tokenizer.eos_token_id, max_input=6, max_target=16, chat=chat)
    # a long prompt loses its beginning; BOS, where there is one, stays first
    assert cut.inputs == ([tokenizer.bos_token_id] + example.inputs[-5:] if name == "real" else example.inputs[-6:])


def test_chat_format_is_smollm2s_own_template(smollm2):
    from encdec.data.chat import ChatFormat

    chat = ChatFormat.of(smollm2[3])
    assert chat.templated and chat.end == "<|im_end|>"
    prompt = chat.render([("user", "Name a colour.")])
    assert prompt.endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")


def test_qwen2_5_coder_adapts_keeps_both_invariants_and_generates():
    """The 0.5B Qwen2 model (q/k/v biases, untied head, 151k vocabulary) on real text. One function, not a module
    fixture, so that its 4 GB of float32 weights are freed before the next test."""
    source = encdec.load_source("qwen2.5-coder-0.5b")
    tokenizer = encdec.load_tokenizer(source.directory)
    ids = tokenizer(heldout_passages(1)[0], return_tensors="pt").input_ids[:, :48]
    reference = tf.AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reference(input_ids=ids, output_hidden_states=True)
    del reference
    assert (source.family, source.stack.num_layers, source.vocab_size) == ("qwen2", 24, 151936)
    model = encdec.adapt(source)
    del source
    with torch.no_grad():
        masked = model(ids, torch.zeros_like(ids), ids).logits
        causal = model.encode(ids, causal=True)
    assert (masked - ref.logits).abs().max().item() < 1e-3
    assert (causal - ref.hidden_states[-1]).abs().max().item() < 1e-3
    batch = tokenizer(["def fibonacci(n):", "The capital of France is"], return_tensors="pt", padding=True)
    cached = model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=4, eos_token_ids=[-1])
    uncached = model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=4, eos_token_ids=[-1], use_cache=False)
    assert cached.shape == (2, 4) and torch.equal(cached, uncached)


def test_logprob_texts_of_byte_spelled_characters_join_into_the_answer(real):
    """Gemma spells rare characters with byte tokens (<0xE4><0x80><0x80>), and transformers decodes a run of them
    as a whole (one U+FFFD per byte unless all of it is valid UTF-8): two such characters in a row lost the second
    from the server's logprob texts and gained a U+FFFD. Each token's text and bytes now join into the answer."""
    from encdec.inference.engine import Emitted
    from encdec.serve.logprobs import TokenLogprobs
    from encdec.serve.text import Detokenizer, TextStream

    tokenizer = real[3]
    for answer in ["a\u4000\u4000", "x\U00013000\U00013000 then text", "\U0001f9cc\U0001f9cc ok \U0001f9cc",
                   "h\u00e9llo \u4e16\u754c \U00013000y\u4000z"]:
        ids = tokenizer(answer, add_special_tokens=False).input_ids
        assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte-spelled, as meant
        logprobs, text = TokenLogprobs(tokenizer, "completions", frozenset()), TextStream(tokenizer, [])
        for token in ids:
            logprobs.add(Emitted(row=None, token=token, logprob=-1.0), text.detokenizer, len(text.text))  # as Answer.add
            text.add(token)
        rendered = logprobs.render()
        assert text.text == "".join(rendered["tokens"]) == answer
        assert all(answer[o:].startswith(t) for o, t in zip(rendered["text_offset"], rendered["tokens"]))
        chat, alone = TokenLogprobs(tokenizer, "chat", frozenset()), Detokenizer(tokenizer)
        for token in ids:
            chat.add(Emitted(row=None, token=token, logprob=-1.0), alone, 0)
            alone.push(token)
        assert b"".join(bytes(e["bytes"]) for e in chat.render()["content"]) == answer.encode()


@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m", "qwen2.5-coder-0.5b"])
def test_served_text_is_prefix_stable_and_equals_transformers_decoding(name):
    """The server decides each token's text once (encdec.serve.text): whatever tokens come (real text of rare
    characters, byte tokens, random ids), a streamed piece is never taken back, the pieces, the answer and the
    log-probability texts agree, and the answer is transformers' decoding of its tokens wherever that is
    valid UTF-8 (for byte-level vocabularies, SmolLM2's and Qwen's, everywhere). Re-decoding the whole answer,
    as the server did, turned an already streamed "\u00e9" into U+FFFDs when a stray byte token followed it."""
    import random

    from encdec.inference.engine import Emitted
    from encdec.serve.logprobs import TokenLogprobs
    from encdec.serve.text import TextStream

    tokenizer = encdec.load_tokenizer(encdec.load_source(name).directory)
    vocab = tokenizer.get_vocab()
    byte_tokens = sorted(vocab[t] for t in vocab if t.startswith("<0x")) or list(range(300))
    texts = ["h\u00e9llo w\u00f6rld", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "emoji \U0001f9cc\U0001f9cc ok \U0001f600",
             "\U00013000 glyph", "a\u4000\u4000", "  tabs\tand\n\nlines", "\u201cquotes\u201d \u2014 dash",
             "x = [1, 2];  # code", "\u00c0\u00c9\u00ce \u00df\u1e9e"]
    rng = random.Random(0)
    for _ in range(150):
        ids = []
        for _ in range(rng.randrange(1, 5)):
            draw = rng.random()
            if draw < 0.5:
                ids += tokenizer(rng.choice(texts)[rng.randrange(3):], add_special_tokens=False).input_ids
            else:
                ids.append(rng.choice(byte_tokens) if draw < 0.75 else rng.randrange(len(tokenizer)))
        stream, logprobs = TextStream(tokenizer, []), TokenLogprobs(tokenizer, "completions", frozenset())
        pieces, seen = [], []
        for token in ids:
            logprobs.add(Emitted(None, token, -1.0), stream.detokenizer, len(stream.text))
            pieces.append(stream.add(token))
            seen.append(stream.text)
        rest = stream.finish()
        final = stream.text
        assert "".join(pieces) + rest == final and all(final.startswith(text) for text in seen), ids
        assert "".join(logprobs.render()["tokens"]) + rest == final, ids
        reference = tokenizer.decode(ids, skip_special_tokens=True)
        if "\ufffd" not in reference or stream.detokenizer.byte_level:
            assert final == reference, ids


def test_a_long_text_to_classify_is_tokenized_from_its_end_to_the_same_tokens(real):
    """Classification keeps a text's last max_len tokens, but tokenized each text whole first: a handed 64 MB text
    took GBs. A long one is tokenized from windows at its end; the tokens kept are the whole text's, with Gemma's
    tokenizer (no split on spaces first) on prose, on a run without spaces and on one cut inside a word."""
    from encdec.classification.train import TAIL_CHARS_PER_TOKEN, TAIL_MAX_CHARS, encode

    tokenizer = real[3]
    prose = " ".join(heldout_passages(40))
    texts = [prose, "x" * 40_000 + prose[:3000], prose + "y" * 20_000, prose[: 64 * TAIL_CHARS_PER_TOKEN - 1],
             prose + " " * 20_001 + "end of document", *(prose + c * 20_003 for c in " =-*ay"), prose + "ab" * 9_001,
             "Some prose here. " * 20 + " " * 140_000 + " the end."]
    seen = []
    real_call = type(tokenizer).__call__

    class Spy(type(tokenizer)):
        def __call__(self, text, *args, **kwargs):
            seen.extend([text] if isinstance(text, str) else text)
            return real_call(self, text, *args, **kwargs)

    spied = copy.copy(tokenizer)
    spied.__class__ = Spy
    rows = encode(spied, texts, 64, 2)
    for text, row in zip(texts, rows):
        whole = tokenizer(text, add_special_tokens=False).input_ids
        assert row == [2] + whole[-63:]
    assert len(prose) > 64 * TAIL_CHARS_PER_TOKEN * 4 and prose not in seen  # read from windows, not whole
    seen.clear()  # a hostile text, one run of 4M spaces: windows of a bounded width, not the whole
    encode(spied, [" " * 4_000_000 + "the end"], 64, 2)
    assert max(map(len, seen)) <= 2 * TAIL_MAX_CHARS + 997
