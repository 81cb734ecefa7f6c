"""Initialisation of the encoder-decoder from decoder-only sources."""

from __future__ import annotations

import logging

import pytest
import torch

import encdec
from encdec.adapt import parse_layers
from encdec.errors import EncdecError


def test_balanced_cross_attention_starts_as_self_attention(sources):
    model = encdec.adapt(encdec.load_source(str(sources["gemma2"])))
    for block in model.decoder.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(block.cross_attn, name).weight, getattr(block.attn, name).weight)
        assert torch.equal(block.cross_norm.weight, block.attn_norm.weight)
        assert torch.equal(block.post_cross_norm.weight, block.post_attn_norm.weight)
    first = model.decoder.layers[0]
    with torch.no_grad():
        first.cross_attn.q_proj.weight.add_(1.0)
    assert not torch.equal(first.cross_attn.q_proj.weight, first.attn.q_proj.weight)  # separate tensors
    assert model.encoder_embed is not None  # T5Gemma keeps separate tables


def test_the_encoder_source_named_again_as_decoder_is_balanced(sources, tmp_path):
    """`--decoder` naming the encoder's own source (or every one of its layers) is the balanced model, whose
    cross-attention starts from self-attention, not a random one needing a warm-up; also when the path is
    spelled another way (through a link: it was compared as spelled)."""
    source = encdec.load_source(str(sources["gemma2"]))
    balanced = encdec.adapt(source).state_dict()
    every_layer = list(range(source.stack.num_layers))
    (tmp_path / "link").symlink_to(sources["gemma2"])
    linked = encdec.load_source(str(tmp_path / "link"))
    merged = encdec.adapt(source, attention="merged").state_dict()
    for model, expected in ((encdec.adapt(source, encdec.load_source(str(sources["gemma2"]))), balanced),
                            (encdec.adapt(source, linked), balanced),
                            (encdec.adapt(source, linked, attention="merged"), merged),  # was refused
                            (encdec.adapt(source, decoder_layers=every_layer), balanced)):
        state = model.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def test_unbalanced_cross_attention_is_new_and_reads_the_encoder_width(sources, caplog):
    big, small = encdec.load_source(str(sources["gemma2"])), encdec.load_source(str(sources["gemma2-small"]))
    with caplog.at_level(logging.INFO, logger="encdec"):
        model = encdec.adapt(big, small, seed=7)
    assert "cross-attention starts random: the papers train it alone first" in caplog.text  # the warm-up is opt-in
    block = model.decoder.layers[0]
    assert block.cross_attn.k_proj.weight.shape == (small.stack.num_kv_heads * 8, big.stack.hidden_size)
    assert block.cross_attn.q_proj.weight.shape[1] == small.stack.hidden_size
    std = block.cross_attn.q_proj.weight.std().item()
    assert 0.01 < std < 0.03
    for layer in model.decoder.layers:  # new norms at scale 1: Gemma's RMSNorm multiplies by 1 + weight
        assert not layer.cross_norm.weight.any() and not layer.post_cross_norm.weight.any()
    again = encdec.adapt(big, small, seed=7)
    assert torch.equal(again.decoder.layers[0].cross_attn.v_proj.weight, block.cross_attn.v_proj.weight)
    assert torch.equal(model.embed.weight, small.weights["model.embed_tokens.weight"])
    assert torch.equal(model.encoder_embed.weight, big.weights["model.embed_tokens.weight"])


def test_sources_of_one_tokenizer_whose_tables_are_padded_apart_keep_the_smaller_table(sources, tmp_path, capsys):
    """Qwen2.5 7B and up pad their table to 152,064 rows, 0.5B-3B to 151,936, Gemma 3 4B and up to 262,208, 1B and
    270M to 262,144: one tokenizer, and the big-encoder / small-decoder pairs the method is about were refused as
    different vocabularies. Both keep the smaller table; the model is the one adapted from an unpadded encoder.
    The decoder's tokenizer is saved (the model takes its special tokens)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from encdec.cli import main

    padded = tmp_path / "padded"
    shutil.copytree(sources["gemma2"], padded)
    weights = load_file(str(padded / "model.safetensors"))
    table = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = torch.cat([table, torch.randn(32, table.shape[1])])
    save_file(weights, str(padded / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**cfg, "vocab_size": table.shape[0] + 32}))
    settings = json.loads((padded / "tokenizer_config.json").read_text())  # one vocabulary, its own settings
    (padded / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 12345}))
    small = encdec.load_source(str(sources["gemma2-small"]))
    model = encdec.adapt(encdec.load_source(str(padded)), small, seed=7)
    plain = encdec.adapt(encdec.load_source(str(sources["gemma2"])), small, seed=7)
    assert model.config.vocab_size == table.shape[0] == plain.config.vocab_size
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
    for encoder, decoder in ((padded, sources["gemma2-small"]), (sources["gemma2-small"], padded)):  # either side
        out = tmp_path / f"out-{encoder.name}"
        assert main(["adapt", "--encoder", str(encoder), "--decoder", str(decoder), "--out", str(out)]) == 0
        assert encdec.load(out).config.vocab_size == table.shape[0]
        saved = json.loads((out / "tokenizer_config.json").read_text())["model_max_length"]
        assert (saved == 12345) == (decoder == padded)
    # PrefixLM distils from the recorded encoder source, whose table is the longer: it keeps the student's rows
    from tiny import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    assert main(["pretrain", "--model", str(tmp_path / "out-padded"), "--out", str(run), "--data", str(corpus),
                 "--steps", "2", "--enc-len", "16", "--dec-len", "16", "--batch-size", "2", "--eval-windows", "2",
                 "--distill", "--precision", "fp32"]) == 0
    assert encdec.load(run / "model").config.vocab_size == table.shape[0]
    assert "cut to the student's" in capsys.readouterr().err


def test_unbalanced_adaptation_in_bfloat16_is_bfloat16_throughout_and_runs(sources):
    """Sources loaded in bfloat16 (a 9B encoder source, to save memory): the new cross-attention was float32, and
    the model's first product failed on the mix."""
    big = encdec.load_source(str(sources["gemma2"]), torch.bfloat16)
    small = encdec.load_source(str(sources["gemma2-small"]), torch.bfloat16)
    model = encdec.adapt(big, small, seed=7)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    float32 = encdec.adapt(encdec.load_source(str(sources["gemma2"])), encdec.load_source(str(sources["gemma2-small"])),
                           seed=7)  # the same start, rounded
    block, exact = model.decoder.layers[0].cross_attn, float32.decoder.layers[0].cross_attn
    assert torch.equal(block.q_proj.weight, exact.q_proj.weight.to(torch.bfloat16))
    ids = torch.tensor([[2, 5, 6, 7]])
    assert torch.isfinite(model(ids, decoder_input_ids=ids).logits.float()).all()
    # one source of each dtype: a model of both (its first product failed), saved as the dtype of its first weight
    with pytest.raises(EncdecError, match=r"loaded in different dtypes \(torch.bfloat16, torch.float32\); load both"):
        encdec.adapt(big, encdec.load_source(str(sources["gemma2-small"])))


def test_decoder_layer_subset_copies_those_layers(sources, caplog):
    """Their cross-attention too starts as a copy of each kept layer's self-attention, as a balanced model's (it
    was random: 0.07 / 0.24 nats worse after 40 steps on the 270M, docs/adaptation.md)."""
    source = encdec.load_source(str(sources["gemma3"]))
    with caplog.at_level(logging.INFO, logger="encdec"):
        model = encdec.adapt(source, decoder_layers=[1, 2], attention="cross")
    assert "starts random" not in caplog.text
    assert model.config.decoder.layer_types == [source.stack.layer_types[1], source.stack.layer_types[2]]
    for dst, src in enumerate([1, 2]):
        layer = model.decoder.layers[dst]
        assert torch.equal(layer.mlp.up_proj.weight, source.weights[f"model.layers.{src}.mlp.up_proj.weight"])
        self_keys = source.weights[f"model.layers.{src}.self_attn.k_proj.weight"]
        assert torch.equal(layer.cross_attn.k_proj.weight, self_keys)
        assert torch.equal(layer.post_cross_norm.weight, layer.post_attn_norm.weight)
    assert model.encoder_embed is None  # Gemma 3 from one source: one shared table


def test_a_decoder_subset_without_full_attention_layers_is_warned_about(sources, caplog):
    source = encdec.load_source(str(sources["gemma3"]))
    full = [i for i, kind in enumerate(source.stack.layer_types) if kind == "full"]
    local = [i for i, kind in enumerate(source.stack.layer_types) if kind == "sliding"]
    assert full and local
    with caplog.at_level("WARNING", logger="encdec"):
        encdec.adapt(source, decoder_layers=local[:2], attention="cross")
    assert f"full-attention layers are {full}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="encdec"):
        encdec.adapt(source, decoder_layers=[local[0], full[0]], attention="cross")
    assert caplog.text == ""


def test_encoder_copies_every_source_layer(sources):
    source = encdec.load_source(str(sources["gemma3"]))
    model = encdec.adapt(source)
    for i, block in enumerate(model.encoder.layers):
        assert torch.equal(block.attn.k_norm.weight, source.weights[f"model.layers.{i}.self_attn.k_norm.weight"])
        assert torch.equal(block.post_mlp_norm.weight, source.weights[f"model.layers.{i}.post_feedforward_layernorm.weight"])


@pytest.mark.parametrize("text, expected", [("0,3,6", [0, 3, 6]), ("::3", [0, 3, 6, 9]), ("1:4", [1, 2, 3]), ("-2:", [10, 11])])
def test_parse_layers(text, expected):
    assert parse_layers(text, 12) == expected
