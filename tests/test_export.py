"""`encdec export --to ctranslate2`: CTranslate2's own converter and `Translator` against our generation."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import ctranslate2
import pytest
import torch
from tiny import make_source

import encdec
from encdec.cli import main
from encdec.errors import EncdecError
from encdec.sources import load_tokenizer

NEW_TOKENS = 12
# Where CTranslate2 4.8.5 computes something else than transformers and we do, the sources avoid it
# (each found on these tiny models; see README "Export to CTranslate2"):
# - sliding windows: its tokens differed once prompt or output outgrew the window (the conftest
#   sources have 4 tokens), in the T5Gemma 2 layout once the prompt outgrew half of it (the encoder's
#   window is split over both sides; 256 tokens on the 270M); here the window is longer than twice
#   prompt + output;
# - attention logit soft-capping (Gemma 2): it has none, so the Gemma 2 source here has none either;
# - padding: its T5Gemma 2 batches of prompts of different lengths differ from each prompt alone,
#   so the prompts here have one length.
WINDOW = 64
# int8 weights (CTranslate2's compute_type "int8") against our float32 tokens: measured 100% of the
# 36 tokens for both layouts on CPUs with VNNI (AVX-512 or AVX-VNNI); the bound, loose since int8 may flip
# near-ties, is 3 in 4. Without VNNI (an AVX2-only AMD EPYC) CTranslate2 4.8.5 multiplies unsigned by signed
# int8 through oneDNN and its T5Gemma 2 tokens agreed 10 in 36 (its Gemma 2 layout 36 in 36; its float32
# tokens still equal ours): there the test asserts the agreement of the Gemma 2 layout only.
INT8_AGREEMENT = 0.75
VNNI = bool({"avx512_vnni", "avx_vnni"} & set(Path("/proc/cpuinfo").read_text().split())) if Path("/proc/cpuinfo").exists() else True


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def adapted(request, tmp_path_factory) -> tuple[str, Path]:
    """A tiny balanced model saved by `encdec adapt`: gemma2 -> T5Gemma layout, gemma3 -> T5Gemma 2."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    source = make_source(root / "source", request.param, window=WINDOW, attn_softcap=None)
    out = root / "adapted"
    assert main(["adapt", "--encoder", str(source), "--out", str(out)]) == 0
    return {"gemma2": "t5gemma", "gemma3": "t5gemma2"}[request.param], out


@pytest.fixture(scope="module")
def t5gemma2_dir(sources, tmp_path_factory) -> Path:
    """The conftest Gemma 3 source adapted (T5Gemma 2 layout), for what does not compare tokens."""
    out = tmp_path_factory.mktemp("export") / "adapted"
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)]) == 0
    return out


def _prompts() -> torch.Tensor:
    """Three prompts of 11 tokens, BOS first."""
    ids = torch.randint(3, 96, (3, 11), generator=torch.Generator().manual_seed(7))
    ids[:, 0] = 2
    return ids


def _ours(model_dir: Path) -> list[list[int]]:
    ids = _prompts()
    return encdec.load(model_dir).generate(ids, torch.ones_like(ids), max_new_tokens=NEW_TOKENS, eos_token_ids=[-1]).tolist()


def _translated(ct2_dir: Path, compute_type: str) -> list[list[int]]:
    """Greedy tokens of CTranslate2's Translator, which takes the source as token strings."""
    tokenizer = load_tokenizer(ct2_dir)
    source = [tokenizer.convert_ids_to_tokens(row) for row in _prompts().tolist()]
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type=compute_type)
    results = translator.translate_batch(source, beam_size=1, max_decoding_length=NEW_TOKENS, end_token=[])
    return [tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]


def test_float32_tokens_equal_ours(adapted, tmp_path, capsys):
    layout, model_dir = adapted
    out = tmp_path / "ct2"
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(out)]) == 0
    assert f"({layout})" in capsys.readouterr().out
    assert {"model.bin", "config.json", "shared_vocabulary.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ours = _ours(model_dir)
    assert all(len(row) == NEW_TOKENS for row in ours)
    assert _translated(out, "float32") == ours


def _edited_copy(model_dir: Path, to: Path, config: dict | None = None, metadata: dict | None = None) -> Path:
    """A copy of a checkpoint with `config` set at config.json's top level and in its decoder, and `metadata` added
    to its provenance."""
    import json

    shutil.copytree(model_dir, to)
    data = json.loads((to / "config.json").read_text())
    data.update(config or {})
    data["decoder"].update(config or {})
    (to / "config.json").write_text(json.dumps(data))
    if metadata:
        provenance = json.loads((to / "encdec.json").read_text()) if (to / "encdec.json").exists() else {}
        (to / "encdec.json").write_text(json.dumps({**provenance, **metadata}))
    return to


def test_told_the_stop_tokens_export_names_ctranslate2_stops_where_we_do(adapted, tmp_path, capsys):
    """CTranslate2's converter keeps the tokenizer's EOS alone: a model that also stops at another token (Gemma 3
    IT's <end_of_turn>) went on in CTranslate2, silently. Export names the end_token to pass."""
    _, model_dir = adapted
    ids = _prompts()
    free = _ours(model_dir)
    stop = free[0][0]  # a token the model writes (first, in one row at least): now one of its EOS ids
    copy = _edited_copy(model_dir, tmp_path / "model", {"eos_token_id": [1, stop]})
    assert main(["export", str(copy), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 0
    said = capsys.readouterr().err
    tokenizer = load_tokenizer(copy)
    end_token = tokenizer.convert_ids_to_tokens(sorted([1, stop]))
    assert (f"it stops at '<eos>' alone, where encdec generate stops at {end_token}: pass end_token={end_token} and "
            "min_decoding_length=0 to translate_batch") in said
    ours = [[t for t in row if t != 0] for row in encdec.load(copy).generate(ids, torch.ones_like(ids),
                                                                               max_new_tokens=NEW_TOKENS).tolist()]
    cut = [row[: next((k + 1 for k, t in enumerate(row) if t in (1, stop)), len(row))] for row in free]
    assert ours == cut and min(map(len, ours)) < NEW_TOKENS  # stopped at it
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    source = [tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
    results = translator.translate_batch(source, beam_size=1, max_decoding_length=NEW_TOKENS, end_token=end_token,
                                         min_decoding_length=0, return_end_token=True)
    assert [tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results] == ours


def test_told_a_ul2_models_framing_ctranslate2_gives_our_tokens(adapted, tmp_path, capsys):
    """A UL2-pretrained model reads a prompt with a sentinel after it and after the decoder's start (encdec
    generate and serve frame it so); CTranslate2, given plain tokens, read what the model was never trained on."""
    from encdec.inference.loading import model_framing

    _, model_dir = adapted
    copy = _edited_copy(model_dir, tmp_path / "model", metadata={
        "pretrained": {"objective": "ul2", "settings": {"mixture": "t5gemma2"}}})
    assert main(["export", str(copy), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 0
    said = capsys.readouterr().err
    tokenizer = load_tokenizer(copy)
    framing = model_framing(copy, tokenizer)
    sentinel = tokenizer.convert_ids_to_tokens(list(framing.after))
    assert framing.after and framing.decoder == framing.after
    assert f"give it {sentinel} at the source's end, {sentinel} as each row's target_prefix" in said
    framed = torch.tensor([framing.prompt(row, 2) for row in _prompts().tolist()])
    ours = encdec.load(copy).generate(framed, torch.ones_like(framed), max_new_tokens=NEW_TOKENS, eos_token_ids=[-1],
                                      decoder_prefix=framing.decoder).tolist()
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    source = [tokenizer.convert_ids_to_tokens(row) for row in framed.tolist()]
    results = translator.translate_batch(source, target_prefix=[sentinel] * len(source), beam_size=1,
                                         max_decoding_length=NEW_TOKENS + len(sentinel), end_token=[])
    assert [tokenizer.convert_tokens_to_ids(r.hypotheses[0])[len(sentinel):] for r in results] == ours


def test_int8_runs_and_mostly_agrees(adapted, tmp_path):
    family, model_dir = adapted
    out = tmp_path / "ct2-int8"
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(out), "--quantization", "int8"]) == 0
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(tmp_path / "ct2-float32")]) == 0
    weights = {name: (tmp_path / name / "model.bin").stat().st_size for name in ("ct2-int8", "ct2-float32")}
    assert weights["ct2-int8"] < 0.6 * weights["ct2-float32"]  # the projections' weights a byte each, not four
    ours, theirs = _ours(model_dir), _translated(out, "int8")
    assert [len(row) for row in theirs] == [NEW_TOKENS] * 3
    same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
    # without VNNI only the T5Gemma 2 layout's int8 tokens drift (see INT8_AGREEMENT): the T5Gemma one is held to it
    assert same / (3 * NEW_TOKENS) >= INT8_AGREEMENT or (not VNNI and family == "t5gemma2")


def test_existing_output_kept_unless_overwrite(t5gemma2_dir, tmp_path, capsys):
    model_dir = t5gemma2_dir
    out = tmp_path / "ct2"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    # not an earlier export: --overwrite does not replace a folder of other files either
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(out), "--overwrite"]) == 2
    assert "holds mine.txt but none of what this command writes there" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    # nor another model (a mistyped --out): its config.json is not what an export writes
    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(other), "--overwrite"]) == 2
    assert "none of what this command writes there (model.bin)" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    # nor another project's CTranslate2 model (a Whisper one): a model.bin alone does not make an encdec export
    whisper = tmp_path / "faster-whisper"
    whisper.mkdir()
    for name, text in (("model.bin", "weights"), ("config.json", '{"suppress_ids": []}'), ("notes.txt", "mine")):
        (whisper / name).write_text(text)
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(whisper), "--overwrite"]) == 2
    assert "is not a CTranslate2 model written by encdec export" in capsys.readouterr().err
    assert sorted(p.name for p in whisper.iterdir()) == ["config.json", "model.bin", "notes.txt"]
    (out / "mine.txt").unlink()
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(out)]) == 2  # empty: still --overwrite
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(out), "--overwrite"]) == 0
    (out / "notes.txt").write_text("mine")  # an earlier export, with a file of the user's beside it
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(out), "--overwrite"]) == 0
    assert "notes.txt" not in {p.name for p in out.iterdir()} and (out / "model.bin").is_file()
    # a provenance the framing cannot read is refused before converting, the earlier export kept (it was replaced)
    odd = _edited_copy(model_dir, tmp_path / "odd", metadata={
        "pretrained": {"objective": "ul2", "settings": {"mixture": "t5gemma3"}}})
    kept = (out / "model.bin").stat()
    capsys.readouterr()
    assert main(["export", str(odd), "--to", "ctranslate2", "--out", str(out), "--overwrite"]) == 2
    now = (out / "model.bin").stat()
    assert "t5gemma3" in capsys.readouterr().err and (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_export_names_where_ctranslate2_computes_something_else(sources, tmp_path, capsys, family):
    """The conftest sources have what CTranslate2 gets wrong (see the top of this file): said at export."""
    model_dir = tmp_path / "adapted"
    assert main(["adapt", "--encoder", str(sources[family]), "--out", str(model_dir)]) == 0
    capsys.readouterr()
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 0
    said = capsys.readouterr().err
    window = "prompts longer than 2 tokens" if family == "gemma3" else "longer than its sliding window (4 tokens)"
    assert window in said
    assert ("soft-capped (at 5.0)" in said) == (family == "gemma2")
    assert ("final logits are soft-capped (at 3.0)" in said) == (family == "gemma2")
    assert ("prompts of different lengths" in said) == (family == "gemma3")


def test_a_t5gemma2_prompt_of_half_the_window_still_agrees(tmp_path, capsys):
    """The export's caution names the longest prompt CTranslate2 reads as we do in the T5Gemma 2 layout, (W + 1)
    // 2 tokens: the prompts here have that many (it once said W, and prompts past W / 2 already differed)."""
    source = make_source(tmp_path / "source", "gemma3", window=22, attn_softcap=None)
    model_dir, out = tmp_path / "adapted", tmp_path / "ct2"
    assert main(["adapt", "--encoder", str(source), "--out", str(model_dir)]) == 0
    capsys.readouterr()
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(out)]) == 0
    assert f"prompts longer than {_prompts().shape[1]} tokens" in capsys.readouterr().err
    assert _translated(out, "float32") == _ours(model_dir)


def test_own_format_refused_in_one_line(sources, tmp_path, capsys):
    model_dir = tmp_path / "cross"
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--attention", "cross", "--out", str(model_dir)]) == 0
    capsys.readouterr()
    out = tmp_path / "ct2"
    assert main(["export", str(model_dir), "--to", "ctranslate2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "own format" in err[0]
    assert "t5gemma (T5GemmaForConditionalGeneration)" in err[0] and "t5gemma2" in err[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["cross"]


def test_missing_ctranslate2_named(t5gemma2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2.converters", None)  # what an uninstalled package gives
    out = tmp_path / "ct2"
    assert main(["export", str(t5gemma2_dir), "--to", "ctranslate2", "--out", str(out)]) == 2
    assert "pip install -e '.[ctranslate2]'" in capsys.readouterr().err
    assert not out.exists()


def test_a_converter_error_that_says_nothing_is_still_one_line(t5gemma2_dir, tmp_path, capsys, monkeypatch):
    """The error's first line once indexed an empty message: a traceback instead of the line naming the model."""
    from ctranslate2.converters import TransformersConverter

    def fails(*args, **kwargs):
        raise ValueError()

    monkeypatch.setattr(TransformersConverter, "convert", fails)
    out = tmp_path / "ct2"
    assert main(["export", str(t5gemma2_dir), "--to", "ctranslate2", "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"CTranslate2's converter could not read {t5gemma2_dir} (ValueError)"), line
    assert not out.exists()


def test_commands_given_an_export_or_a_run_directory_say_what_to_give(t5gemma2_dir, tmp_path, capsys):
    """A CTranslate2 export read as a checkpoint said "model_type None ... must first go through encdec adapt"; a
    training run's directory, "config.json is missing"."""
    out = tmp_path / "ct2"
    assert main(["export", str(t5gemma2_dir), "--to", "ctranslate2", "--out", str(out)]) == 0
    run = tmp_path / "run"
    shutil.copytree(t5gemma2_dir, run / "model")
    (run / "metrics.jsonl").write_text("")
    capsys.readouterr()
    for given, said in ((out, f"{out} is a CTranslate2 export (model.bin), which CTranslate2's Translator runs"),
                        (run, f"{run} holds no config.json; expected an encoder-decoder checkpoint directory (")):
        assert main(["info", str(given)]) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
        assert said in line, line
    assert line.endswith(f"; the training run's model is {run / 'model'}")
    # export and export-encoder said only "not an encoder-decoder checkpoint" of the run's directory
    for command in (["export", str(run), "--to", "ctranslate2", "--out", str(tmp_path / "x")],
                    ["export-encoder", str(run), "--out", str(tmp_path / "x")]):
        assert main(command) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
        assert line.endswith(f"; the training run's model is {run / 'model'}"), line
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_whose_config_asks_for_a_quantization_library_is_one_line(t5gemma2_dir, tmp_path, capsys):
    """A quantization_config in config.json made transformers, under the converter, raise ImportError for
    bitsandbytes: a traceback. encdec's own reading refuses it now, before the converter."""
    model = shutil.copytree(t5gemma2_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "ct2"
    assert main(["export", str(model), "--to", "ctranslate2", "--out", str(out)]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert f"{model} is a quantized model (quantization_config: bitsandbytes)" in line, line
    assert not out.exists()


def test_a_config_transformers_typed_fields_refuse_is_one_line(t5gemma2_dir, tmp_path, capsys):
    """encdec reads a configuration whose number is of the other kind (an attention scale written 8.5, a soft-cap
    written 30); transformers' typed configuration, which the converter reads it with, refuses it: its
    StrictDataclassFieldValidationError, an Exception alone, was a traceback."""
    model = _with_a_fractional_scale(shutil.copytree(t5gemma2_dir, tmp_path / "model"))
    out = tmp_path / "ct2"
    assert main(["export", str(model), "--to", "ctranslate2", "--out", str(out)]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert f"CTranslate2's converter could not read {model} (it reads config.json through transformers" in line, line
    assert not out.exists()


def test_info_says_when_transformers_refuses_the_config(t5gemma2_dir, tmp_path, capsys):
    """`encdec info` named the layout's transformers class as the one that loads the checkpoint, also where
    transformers' typed configuration refuses its config.json (which encdec reads)."""
    assert main(["info", str(t5gemma2_dir)]) == 0
    assert "transformers loads it as T5Gemma2ForConditionalGeneration" in capsys.readouterr().out
    model = _with_a_fractional_scale(shutil.copytree(t5gemma2_dir, tmp_path / "model"))
    assert main(["info", str(model)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith(f"{model}: ")]
    assert "transformers loads it" not in line, line
    assert "transformers refuses its config.json (" in line and "query_pre_attn_scalar" in line, line


def _with_a_fractional_scale(model: Path) -> Path:
    """`model` with an attention scale of the other number kind (8.5 where transformers types an integer)."""
    config = json.loads((model / "config.json").read_text())

    def set_scale(node):
        for key, value in node.items():
            if key == "query_pre_attn_scalar":
                node[key] = float(value) + 0.5
            elif isinstance(value, dict):
                set_scale(value)

    set_scale(config)
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_a_config_with_a_byte_order_mark_is_one_line(t5gemma2_dir, tmp_path, capsys):
    """The export's own reading of config.json (for its cautions) took no byte-order mark, which every other reader
    takes: a JSONDecodeError's traceback. transformers refuses such a file under the converter: one line."""
    model = shutil.copytree(t5gemma2_dir, tmp_path / "model")
    (model / "config.json").write_bytes(b"\xef\xbb\xbf" + (model / "config.json").read_bytes())
    out = tmp_path / "ct2"
    assert main(["export", str(model), "--to", "ctranslate2", "--out", str(out)]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert f"CTranslate2's converter could not read {model} (" in line
    assert not out.exists()


def test_a_model_no_causal_lm_class_takes_is_one_line(tmp_path):
    """transformers' own refusal is a ValueError naming every causal-LM configuration class it knows."""
    from transformers import T5Config

    from encdec.sources import transformers_causal_lm

    T5Config(vocab_size=32, d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4).save_pretrained(tmp_path)
    with pytest.raises(EncdecError, match=r"is not a decoder-only model \(model_type 't5'\); expected an encoder"):
        transformers_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text('{"foo": 1}')  # no model_type at all: transformers' other ValueError
    with pytest.raises(EncdecError, match=r"is not a decoder-only model \(model_type None\)"):
        transformers_causal_lm(tmp_path)


def test_a_quantized_or_damaged_decoder_only_model_is_one_line(tmp_path):
    """Both passed the checks made before any model runs, then ended in transformers' ImportError of a kernel
    package, or safetensors' own error, as a traceback (after every model before them was scored)."""
    from encdec.sources import check_causal_lm, transformers_causal_lm

    source = make_source(tmp_path / "source", "gemma2", window=WINDOW, attn_softcap=None)
    config = json.loads((source / "config.json").read_text())
    quantized = shutil.copytree(source, tmp_path / "quantized")
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(EncdecError, match=r"is a quantized model \(quantization_config: awq\); encdec reads"):
        check_causal_lm(quantized)
    # adapting it said the same before reading a weight, where it named the quantized tensors as a truncated or
    # foreign checkpoint's, after reading every shard
    (quantized / "model.safetensors").write_bytes(b"")  # not read
    with pytest.raises(EncdecError, match=r"is a quantized model \(quantization_config: awq\); encdec reads"):
        encdec.load_source(str(quantized))
    # an encoder-decoder's too (a T5Gemma loaded in 8 bits and saved: int8 weights beside their scales)
    encoder_decoder = tmp_path / "t5gemma"
    encdec.save(encdec.adapt(encdec.load_source(str(source))), encoder_decoder)
    config = json.loads((encoder_decoder / "config.json").read_text())
    assert config["model_type"] == "t5gemma"
    bitsandbytes = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (encoder_decoder / "config.json").write_text(json.dumps({**config, "quantization_config": bitsandbytes}))
    (encoder_decoder / "model.safetensors").write_bytes(b"")
    with pytest.raises(EncdecError, match=r"is a quantized model \(quantization_config: bitsandbytes\); encdec"):
        encdec.load(encoder_decoder)
    damaged = shutil.copytree(source, tmp_path / "damaged")
    weights = next(damaged.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(EncdecError, match=r"damaged: transformers cannot load it \("):
        transformers_causal_lm(damaged)


def test_a_decoder_only_model_whose_weights_its_config_does_not_describe_is_refused(tmp_path):
    """A Qwen2 checkpoint labelled llama (q/k/v biases transformers has no place for) and an integer embedding
    table: adapt refuses both, but the source that evaluate scores was loaded with the biases dropped and the
    integers cast, in silence: the baseline column was another model."""
    from safetensors.torch import load_file, save_file

    from encdec.sources import transformers_causal_lm

    qwen = make_source(tmp_path / "qwen", "qwen2")
    relabelled = shutil.copytree(qwen, tmp_path / "relabelled")
    config = json.loads((relabelled / "config.json").read_text())
    (relabelled / "config.json").write_text(json.dumps({**config, "model_type": "llama",
                                                        "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(EncdecError, match=r"relabelled: its weights hold \d+ tensor\(s\) the LlamaForCausalLM of "
                                          r"its config.json has no place for \(such as "
                                          r"model.layers.0.self_attn.[kqv]_proj"):
        transformers_causal_lm(relabelled)
    integer = shutil.copytree(qwen, tmp_path / "integer")
    weights = load_file(integer / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].to(torch.int32)
    save_file(weights, integer / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EncdecError, match="integer: tensor model.embed_tokens.weight holds I32 values; a model's"):
        transformers_causal_lm(integer)
    assert transformers_causal_lm(qwen) is not None


def test_export_names_a_query_scale_and_rope_base_that_ctranslate2_reads_otherwise(tmp_path, capsys):
    """CTranslate2 scales queries by the head size, reads a T5Gemma model's RoPE base as 10000 and its positions
    unscaled; here its greedy tokens agreed 31 in 36 and 32 in 36 with ours (ours equal transformers'), and export
    said nothing."""
    source = make_source(tmp_path / "source", "gemma2", window=WINDOW, attn_softcap=None, query_pre_attn_scalar=16,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    assert main(["adapt", "--encoder", str(source), "--out", str(tmp_path / "adapted")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "adapted"), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 0
    said = capsys.readouterr().err
    assert "scaled by query_pre_attn_scalar (16)" in said and "RoPE base is 1e+06" in said
    assert "RoPE positions are scaled (linear factor 2)" in said


def test_an_encoder_alone_or_a_checkpoint_missing_a_weight_is_refused(tmp_path, capsys):
    """Both went through CTranslate2's converter (by way of transformers, which gives a weight it does not find
    random values, and says nothing) into a model with a random decoder, or a random projection."""
    from safetensors.torch import load_file, save_file

    source = make_source(tmp_path / "source", "gemma2", window=WINDOW, attn_softcap=None)
    full = tmp_path / "full"
    assert main(["adapt", "--encoder", str(source), "--out", str(full)]) == 0
    assert main(["export-encoder", str(full), "--out", str(tmp_path / "encoder")]) == 0
    capsys.readouterr()
    for command in (["export", str(tmp_path / "encoder"), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")],
                    ["info", str(tmp_path / "encoder")]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not an encoder-decoder checkpoint" in err[0], err
        # export's accepted formats are the two CTranslate2 converts (the project's, named, it then refused)
        assert ("this project's format" in err[0]) == (command[0] == "info"), err[0]
    assert "an encoder alone" in err[0]
    # read as a decoder-only source instead, evaluate gave transformers' traceback listing its causal-LM classes
    for command in (["evaluate", str(tmp_path / "encoder"), "--tasks", "copa", "--out", str(tmp_path / "ev")],
                    ["adapt", "--encoder", str(tmp_path / "encoder"), "--out", str(tmp_path / "again")]):
        assert main(command) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(err) == 1 and "is an encoder alone" in err[0] and "not a decoder-only source" in err[0], err
    assert not (tmp_path / "ev").exists() and not (tmp_path / "again").exists()
    weights = load_file(full / "model.safetensors")
    del weights["model.decoder.layers.0.self_attn.q_proj.weight"]
    save_file(weights, full / "model.safetensors", metadata={"format": "pt"})
    assert main(["export", str(full), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks 1 weight(s) such as model.decoder.layers.0.self_attn.q_proj.weight" in err[0]
    assert not (tmp_path / "ct2").exists()



@pytest.mark.real_model
def test_tokenizer_loads_from_the_export_without_a_false_regex_warning(tmp_path):
    """transformers took a directory with CTranslate2's config.json for an old Mistral checkpoint and advised
    `fix_mistral_regex=True`, which would rewrite the tokenizer's pre-tokenizer. It checks tokenizers of over 100k
    tokens only: the packaged Gemma 3 270M's here, on a tiny model of its vocabulary size."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    packaged = encdec.sources.resolve("gemma-3-270m")  # (its directory, converted once: no model loaded)
    reference = load_tokenizer(packaged)  # (once: each load of its 262k tokens takes seconds)
    source = make_source(tmp_path / "source", "gemma3", window=WINDOW, vocab_size=len(reference))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(packaged / name, source / name)
    adapted, out = tmp_path / "adapted", tmp_path / "ct2"
    assert main(["adapt", "--encoder", str(source), "--out", str(adapted)]) == 0
    assert main(["export", str(adapted), "--to", "ctranslate2", "--out", str(out)]) == 0
    # transformers' own handler writes to the stderr of its first import, which under pytest may be a capture file
    # capfd never reads: a handler of the test's own sees its warnings
    warned: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    level = transformers_logging.get_verbosity()  # encdec's CLI quiets transformers; a user's script does not
    transformers_logging.set_verbosity_warning()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        transformers_logging.get_logger("transformers.check").warning("seen")  # the handler hears warnings
    finally:
        transformers_logging.set_verbosity(level)
        library.removeHandler(handler)
    assert warned[-1] == "seen" and not [message for message in warned if "regex" in message], warned
    text = "Tokens, 12 of them: naïve text."
    assert tokenizer(text).input_ids == reference(text).input_ids
    translator = ctranslate2.Translator(str(out), device="cpu")  # still CTranslate2's to read
    assert len(translator.translate_batch([tokenizer.tokenize(text)], max_decoding_length=2)[0].hypotheses[0]) == 2


def test_cautions_read_the_configuration_as_the_model_is_read(sources, tmp_path):
    """Released T5Gemma configs leave out what equals transformers' defaults (soft-caps of 50 and 30): the cautions
    read config.json's keys, so the caps CTranslate2 does not apply went unsaid while the model applied them."""
    from encdec.checkpoint import read_config
    from encdec.formats.ctranslate2 import cautions

    model_dir = tmp_path / "adapted"
    assert main(["adapt", "--encoder", str(sources["gemma2"]), "--out", str(model_dir)]) == 0

    def without_caps(node):
        if isinstance(node, dict):
            return {k: without_caps(v) for k, v in node.items()
                    if k not in ("attn_logit_softcapping", "final_logit_softcapping")}
        return node

    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(without_caps(config)))
    said = " ".join(cautions(read_config(model_dir)[0], "t5gemma"))
    assert "attention logits are soft-capped (at 50.0)" in said and "final logits are soft-capped (at 30.0)" in said
