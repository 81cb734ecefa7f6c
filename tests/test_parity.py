"""Logits parity with transformers' own T5Gemma / T5Gemma2 classes on identical weights (fp32)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import valid

import encdec

TOL = 1e-4


def _hf_logits(directory, batch):
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        return model(**batch).logits, model


@pytest.mark.parametrize(
    "encoder, decoder, layers, expected_class",
    [
        ("gemma3", None, None, "T5Gemma2ForConditionalGeneration"),  # balanced, merged
        ("gemma2", None, None, "T5GemmaForConditionalGeneration"),  # balanced, cross
        ("gemma2", "gemma2-small", None, "T5GemmaForConditionalGeneration"),  # unbalanced: smaller decoder
        ("gemma2", None, [0, 2, 3], "T5GemmaForConditionalGeneration"),  # unbalanced: layer subset
        ("gemma3", None, [1, 3], "T5Gemma2ForConditionalGeneration"),  # merged, fewer decoder layers
    ],
)
def test_logits_match_transformers(sources, batch, tmp_path, encoder, decoder, layers, expected_class):
    model = encdec.adapt(
        encdec.load_source(str(sources[encoder])),
        encdec.load_source(str(sources[decoder])) if decoder else None,
        layers,
    )
    encdec.save(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [expected_class]
    ref, hf_model = _hf_logits(tmp_path / "out", batch)
    assert type(hf_model).__name__ == expected_class
    with torch.no_grad():
        ours = model(**batch).logits
    mask = batch["decoder_attention_mask"]
    assert (valid(ours, mask) - valid(ref, mask)).abs().max().item() <= TOL
    # and the encoder alone, at real tokens
    with torch.no_grad():
        enc_ref = hf_model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        enc = model.encode(batch["input_ids"], batch["attention_mask"])
    m = batch["attention_mask"].bool()
    assert (enc[m] - enc_ref.last_hidden_state[m]).abs().max().item() <= TOL
    # the prompts padded on the left instead: the same logits, here and in transformers
    pads = (~m).sum(1)
    left = {**batch, "input_ids": torch.stack([row.roll(int(n)) for row, n in zip(batch["input_ids"], pads)]),
            "attention_mask": torch.stack([row.roll(int(n)) for row, n in zip(batch["attention_mask"], pads)])}
    assert not left["attention_mask"][1, 0]
    with torch.no_grad():
        ours_left, ref_left = model(**left).logits, hf_model(**left).logits
    assert (valid(ours_left, mask) - valid(ref_left, mask)).abs().max().item() <= TOL
    assert (valid(ours_left, mask) - valid(ours, mask)).abs().max().item() <= TOL


def test_released_t5gemma2_layout_with_vision_tower(tmp_path, batch):
    """A checkpoint saved by transformers itself (random weights, real vision tower) loads, minus the tower."""
    torch.manual_seed(0)
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    config = tf.T5Gemma2Config(
        encoder=tf.T5Gemma2EncoderConfig(text_config=tf.T5Gemma2TextConfig(**text), vision_config=vision,
                                         mm_tokens_per_image=16),
        decoder=tf.T5Gemma2DecoderConfig(**text),
    )
    hf_model = tf.T5Gemma2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    hf_model.save_pretrained(str(tmp_path / "released"))
    loaded = encdec.load_checkpoint(tmp_path / "released")
    assert loaded.format == "t5gemma2"
    assert any("vision tower" in note for note in loaded.notes)
    with torch.no_grad():
        ref = hf_model(**batch).logits
        ours = loaded.model(**batch).logits
    mask = batch["decoder_attention_mask"]
    assert (valid(ours, mask) - valid(ref, mask)).abs().max().item() <= TOL


def test_released_t5gemma_layout(tmp_path, batch):
    torch.manual_seed(0)
    module = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8)
    config = tf.T5GemmaConfig(encoder=tf.T5GemmaModuleConfig(**module), decoder=tf.T5GemmaModuleConfig(**module))
    hf_model = tf.T5GemmaForConditionalGeneration(config).eval()
    with torch.no_grad():  # weights that matter: at transformers' initialisation (norms 0, std 0.02) the logits stay
        for name, p in hf_model.named_parameters():  # under 0.4, and losing either soft-cap moved them by < 1e-4
            p.normal_(0, 0.3 if "norm" in name else 0.15)
    hf_model.save_pretrained(str(tmp_path / "released"))
    model = encdec.load(tmp_path / "released")
    with torch.no_grad():
        ref = hf_model(**batch).logits
        ours = model(**batch).logits
    mask = batch["decoder_attention_mask"]
    assert valid(ref, mask).abs().max().item() > 2  # large enough for the caps to act (the final one is at 30)
    assert (valid(ours, mask) - valid(ref, mask)).abs().max().item() <= TOL

    # a tied copy stored with values of its own: transformers computes with it (it does not tie them), so reading
    # the tie built a model 20 apart from it, unsaid; refused, and a stored copy that is one still loads
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "released" / "model.safetensors")
    embed = weights["model.decoder.embed_tokens.weight"]
    for stored, fine in ((embed.clone(), True), (embed + 0.05 * torch.randn_like(embed), False)):
        save_file({**weights, "lm_head.out_proj.weight": stored}, tmp_path / "released" / "model.safetensors",
                  metadata={"format": "pt"})
        if fine:
            logits = encdec.load(tmp_path / "released")(**batch).logits
            assert (valid(logits, mask) - valid(ref, mask)).abs().max() <= TOL
            continue
        with pytest.raises(encdec.EncdecError, match="the checkpoint's lm_head.out_proj.weight differs from "
                           r"model.decoder.embed_tokens.weight, which config.json ties it to \(tie_word_embeddings\)"):
            encdec.load(tmp_path / "released")

