"""The real packaged SmolLM2-135M-Instruct (Llama architecture, from its GGUF package): adapt, both invariants
on real text, generation, and the CLI's round trip through the project's checkpoint format (the first use
dequantizes and caches the GGUF: about a minute; later runs take seconds)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import encdec
from encdec.cli import main
from encdec.data.corpus import heldout_passages

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    source = encdec.load_source("smollm2-135m")
    tokenizer = encdec.load_tokenizer(source.directory)
    reference = tf.AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=torch.float32).eval()
    ids = tokenizer(heldout_passages(1)[0], return_tensors="pt").input_ids[:, :48]
    return source, encdec.adapt(source), reference, tokenizer, ids


def test_source_is_the_llama_family(smollm2):
    source, model, *_ = smollm2
    stack = source.stack
    assert (source.family, stack.num_layers, stack.hidden_size, source.vocab_size) == ("llama", 30, 576, 49152)
    assert model.config.attention == "merged" and not model.config.encoder.post_norms


def test_invariants_on_real_text(smollm2):
    _, model, reference, _, ids = smollm2
    with torch.no_grad():
        ref = reference(input_ids=ids, output_hidden_states=True)
        masked = model(ids, torch.zeros_like(ids), ids).logits
        causal = model.encode(ids, causal=True)
    assert (masked - ref.logits).abs().max().item() < 1e-3
    assert (causal - ref.hidden_states[-1]).abs().max().item() < 1e-3


def test_greedy_generation(smollm2):
    _, model, _, tokenizer, _ = smollm2
    batch = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    cached = model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=3, eos_token_ids=[-1])
    uncached = model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=3, eos_token_ids=[-1],
                              use_cache=False)
    assert cached.shape == (2, 3) and torch.equal(cached, uncached)


def test_cli_adapt_saves_the_project_format_and_loads_back(smollm2, tmp_path, capsys):
    _, model, _, tokenizer, ids = smollm2
    out = tmp_path / "smollm2-enc-dec"
    assert main(["adapt", "--encoder", "smollm2-135m", "--out", str(out)]) == 0
    assert "encdec" in capsys.readouterr().out
    loaded = encdec.load(out)
    dec = ids[:, :20]
    with torch.no_grad():
        assert torch.equal(loaded(ids, torch.ones_like(ids), dec).logits, model(ids, torch.ones_like(ids), dec).logits)
    assert encdec.load_tokenizer(out)("Hello").input_ids == tokenizer("Hello").input_ids


def test_chat_format_is_smollm2s_own_template(smollm2):
    from encdec.data.chat import ChatFormat
    from encdec.data.instructions import chat_prompt_text

    chat = ChatFormat.of(smollm2[3])
    assert chat.templated and chat.end == "<|im_end|>"
    prompt = chat.prompt(chat_prompt_text("Name a colour."))
    assert prompt.endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
