"""Checkpoint directories: formats, bit-exact round trips, atomic and refusing writes."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import valid

import encdec
import encdec.files
from encdec.cli import main
from encdec.errors import EncdecError


@pytest.mark.parametrize(
    "family, decoder, attention, fmt",
    [
        ("gemma3", None, "merged", "t5gemma2"),
        ("gemma2", None, "cross", "t5gemma"),
        ("gemma2", "gemma2-small", "cross", "t5gemma"),
        ("gemma3", None, "cross", "encdec"),
        ("gemma3", "gemma3-small", "cross", "encdec"),
        ("gemma2", None, "merged", "encdec"),
    ],
)
def test_round_trip_is_bit_exact(sources, batch, tmp_path, family, decoder, attention, fmt):
    dec = encdec.load_source(str(sources[decoder])) if decoder else None
    model = encdec.adapt(encdec.load_source(str(sources[family])), dec, attention=attention)
    assert encdec.save(model, tmp_path / "out") == fmt
    loaded = encdec.load_checkpoint(tmp_path / "out")
    assert loaded.format == fmt
    before, after = model.state_dict(), loaded.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded.model(**batch).logits)
    if fmt == "encdec":
        assert json.loads((tmp_path / "out" / "config.json").read_text())["format"] == "encdec"


@pytest.mark.parametrize("family, attention", [("gemma2", "cross"), ("gemma3", "merged")])
def test_an_untied_head_is_saved_in_encdecs_format(sources, tmp_path, family, attention):
    """T5Gemma and T5Gemma 2 tie their LM head to the embedding: a model with its own head (built in Python, or
    a hand-edited config.json) was taken for theirs, and saving it failed with a bare KeyError."""
    import dataclasses

    from encdec.model import EncoderDecoder

    adapted = encdec.adapt(encdec.load_source(str(sources[family])), attention=attention)
    model = EncoderDecoder(dataclasses.replace(adapted.config, tied_head=False))
    assert encdec.save(model, tmp_path / "out") == "encdec"
    loaded = encdec.load_checkpoint(tmp_path / "out").model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items()) and "lm_head.weight" in loaded


@pytest.mark.parametrize("version, loads", [(None, True), (1, True), (2, False), ("1", False), (True, False)])
def test_a_checkpoint_a_newer_encdec_wrote_is_refused_not_misread(sources, tmp_path, capsys, version, loads):
    """The native format's format_version was written and never read: a checkpoint of a later version, whose field
    meant something else, loaded as the first without a word."""
    import dataclasses

    from encdec.model import EncoderDecoder

    adapted = encdec.adapt(encdec.load_source(str(sources["gemma3"])), attention="cross")
    model = EncoderDecoder(dataclasses.replace(adapted.config, tied_head=False))
    assert encdec.save(model, tmp_path / "out") == "encdec"
    file = tmp_path / "out" / "config.json"
    data = json.loads(file.read_text())
    data.pop("format_version") if version is None else data.update(format_version=version)
    file.write_text(json.dumps(data))
    if loads:
        assert encdec.load(tmp_path / "out").config.tied_head is False
        return
    assert main(["info", str(tmp_path / "out")]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert f"{file} has format_version {version!r}; this encdec reads 1 (written by a newer encdec?" in line


@pytest.mark.parametrize("family, attention", [("gemma2", "cross"), ("gemma3", "merged")])
@pytest.mark.parametrize("side", ["encoder", "decoder"])
@pytest.mark.parametrize("change", [{"activation": "silu"}, {"rope_llama3": [8.0, 1.0, 4.0, 64.0]},
                                    {"norm_offset": 0.0}, {"embed_scale": False}, {"qk_norm": "flip"},
                                    {"query_pre_attn_scalar": 7.5}, {"num_heads": 6}])
def test_a_stack_the_t5gemma_formats_cannot_hold_is_saved_in_encdecs_format(sources, batch, tmp_path, family,
                                                                             attention, side, change):
    """The T5Gemma formats have no field for these settings: a stack changed from its family's (built in Python, or a
    hand-edited config.json) was written as T5Gemma without them, and transformers (and encdec.load) ran another
    model. The native format keeps it, logits and all. (transformers' strict configurations type the query scale an
    int and check that the hidden size is a multiple of the heads: saving failed with a traceback.)"""
    import dataclasses

    from encdec.model import EncoderDecoder

    adapted = encdec.adapt(encdec.load_source(str(sources[family])), attention=attention)
    cfg = adapted.config
    stack = getattr(cfg, side)
    changed = {k: (not stack.qk_norm if v == "flip" else v) for k, v in change.items()}
    torch.manual_seed(0)
    model = EncoderDecoder(dataclasses.replace(cfg, **{side: dataclasses.replace(stack, **changed)})).eval()
    assert encdec.save(model, tmp_path / "out") == "encdec"
    loaded = encdec.load_checkpoint(tmp_path / "out").model
    assert getattr(loaded.config, side) == getattr(model.config, side)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_a_source_config_of_whole_numbers_for_floats_saves_as_t5gemma(sources, batch, tmp_path):
    """A Gemma 2 config.json may write its soft-caps and epsilon as whole numbers (50, not 50.0): transformers' strict
    T5Gemma configuration refused them, and `encdec adapt` ended in a traceback after adapting."""
    import transformers as tf

    source = tmp_path / "source"
    shutil.copytree(sources["gemma2"], source)
    config = json.loads((source / "config.json").read_text())
    assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (5.0, 3.0)
    text = (source / "config.json").read_text()
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        text = re.sub(rf'"{name}": (\d+)\.0', rf'"{name}": \1', text)
    (source / "config.json").write_text(text)
    assert '"attn_logit_softcapping": 5,' in text
    model = encdec.adapt(encdec.load_source(str(source)), attention="cross")
    # its tokenizer too: transformers builds it with the source's configuration, which it refused the same way (the
    # model adapted, then saving with its tokenizer failed and wrote nothing)
    assert encdec.save(model, tmp_path / "out", tokenizer=encdec.load_tokenizer(source)) == "t5gemma"
    theirs = encdec.load_tokenizer(sources["gemma2"])
    assert encdec.load_tokenizer(source)("w1 w2").input_ids == theirs("w1 w2").input_ids
    reference = tf.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        ours, theirs = (valid(m(**batch).logits, batch["decoder_attention_mask"]) for m in (model, reference))
    assert (ours - theirs).abs().max() < 1e-4


def test_a_checkpoint_whose_config_json_starts_with_a_byte_order_mark_generates(adapted, tmp_path, capsys):
    """encdec reads such a config.json (an editor's BOM); transformers' tokenizer loading does not, and the tokenizer
    was said to be unloadable."""
    model = tmp_path / "model"
    shutil.copytree(adapted, model)
    (model / "config.json").write_bytes(b"\xef\xbb\xbf" + (model / "config.json").read_bytes())
    assert main(["generate", str(model), "--prompt", "w1", "--max-new-tokens", "2"]) == 0
    assert "w1 -> " in capsys.readouterr().out


@pytest.mark.parametrize("attention", ["cross", "merged"])
def test_a_compiled_model_saves_as_the_model_itself(sources, batch, tmp_path, attention):
    """torch.compile's wrapper prefixes every weight's name: the project's format saved a checkpoint that no load
    read, the T5Gemma layouts a KeyError; anything else is one line."""
    model = encdec.adapt(encdec.load_source(str(sources["gemma2"])), attention=attention)
    encdec.save(torch.compile(model), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(encdec.load(tmp_path / "out")(**batch).logits, model(**batch).logits)
    with pytest.raises(EncdecError, match="not a Linear"):
        encdec.save(torch.nn.Linear(2, 2), tmp_path / "other")


@pytest.mark.parametrize("family, fmt, attention", [("gemma2", "t5gemma", "cross"), ("gemma3", "t5gemma2", "merged"),
                                                     ("gemma2", "encdec", "merged")])
def test_an_end_of_turn_named_in_generation_config_alone_is_read_and_kept(sources, tmp_path, family, fmt, attention):
    """An instruct checkpoint names its end of turn in generation_config.json alone (as a decoder-only source may,
    which encdec reads): a T5Gemma checkpoint's was dropped, so generation ran past it, and saving again lost it;
    a native checkpoint's too."""
    model = encdec.adapt(encdec.load_source(str(sources[family])), attention=attention)
    assert encdec.save(model, tmp_path / "out") == fmt
    path = tmp_path / "out" / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": [1, 7]}))
    loaded = encdec.load(tmp_path / "out")
    assert loaded.config.eos_token_ids == [1, 7]
    encdec.save(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text())["eos_token_id"] == [1, 7]


def test_sharded_weights_round_trip(sources, tmp_path, monkeypatch):
    import transformers as tf

    monkeypatch.setattr(encdec.files, "SHARD_BYTES", 20_000)
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    encdec.save(model, tmp_path / "out")
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    loaded = encdec.load(tmp_path / "out")
    ours, again = model.state_dict(), loaded.state_dict()
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    # transformers reads the shards too: every weight found in them (it fills a missing one at random, and warns)
    theirs, info = tf.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        expected = loaded(ids, decoder_input_ids=ids).logits
        assert torch.allclose(theirs.eval()(input_ids=ids, decoder_input_ids=ids).logits, expected, atol=1e-4)


def test_bfloat16_save(sources, tmp_path):
    model = encdec.adapt(encdec.load_source(str(sources["gemma2"])))
    encdec.save(model, tmp_path / "out", dtype=torch.bfloat16)
    loaded = encdec.load(tmp_path / "out", dtype=None)
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.embed.weight, model.embed.weight.to(torch.bfloat16))
    # by name, as transformers takes it (a traceback: "Invalid device string"); an integer type truncated every
    # weight into a checkpoint that loaded without a word; a tokenizer given twice saved one of them in silence
    encdec.save(model, tmp_path / "named", dtype="bfloat16")
    assert encdec.load(tmp_path / "named", dtype=None).embed.weight.dtype == torch.bfloat16
    for dtype in (torch.int8, "int8", torch.complex64):
        with pytest.raises(EncdecError, match=r"encdec.save writes weights in float32, bfloat16, float16, float64 "):
            encdec.save(model, tmp_path / "bad", dtype=dtype)
    with pytest.raises(EncdecError, match="a tokenizer or a tokenizer_dir, not both"):
        encdec.save(model, tmp_path / "bad", tokenizer=object(), tokenizer_dir=sources["gemma2"])
    assert not (tmp_path / "bad").exists()


def test_a_model_saved_again_from_python_keeps_where_it_came_from(sources, tmp_path):
    """encdec.json (its sources; a UL2 run's objective, which the prompts' framing is read from) was written by the
    CLI alone: a model adapted from Python, or loaded and saved again, lost it, and a UL2-pretrained model then
    generated from prompts framed otherwise than it was trained on."""
    from encdec.inference.loading import model_framing
    from encdec.objectives import PLAIN
    from encdec.sources import load_tokenizer

    source = encdec.load_source(str(sources["gemma3"]))
    encdec.save(encdec.adapt(source, decoder_layers=[0, 2]), tmp_path / "a", tokenizer_dir=source.directory)
    written = json.loads((tmp_path / "a" / "encdec.json").read_text())
    assert written == {"adapted_from": {"encoder": str(sources["gemma3"]), "decoder": None, "decoder_layers": [0, 2],
                                        "attention": "merged"}}
    trained = {**written, "pretrained": {"objective": "ul2", "steps": 4}}
    (tmp_path / "a" / "encdec.json").write_text(json.dumps(trained))
    encdec.save(encdec.load(tmp_path / "a"), tmp_path / "b", tokenizer_dir=tmp_path / "a")
    assert json.loads((tmp_path / "b" / "encdec.json").read_text()) == trained
    tokenizer = load_tokenizer(tmp_path / "a")
    assert model_framing(tmp_path / "b", tokenizer) == model_framing(tmp_path / "a", tokenizer) != PLAIN
    encdec.save(encdec.load(tmp_path / "a"), tmp_path / "c", metadata={})  # metadata given: as given (none)
    assert not (tmp_path / "c" / "encdec.json").exists()



def test_saving_from_python_to_a_link_is_refused_not_replacing_it(sources, tmp_path):
    """The command line writes through a link to the directory it names; encdec.save replaced the link itself with a
    directory, what it named left as it was, unsaid."""
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    encdec.save(model, tmp_path / "target")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(EncdecError, match=f"output directory {tmp_path / 'link'} is a symbolic link; give the "
                                          f"directory it names \\({tmp_path / 'target'}\\)"):
        encdec.save(model, tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink()
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(tmp_path / "link"), "--overwrite"]) == 0
    assert (tmp_path / "link").is_symlink() and encdec.load(tmp_path / "link") is not None  # through it


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_existing_output_is_refused_then_replaced_with_overwrite(sources, tmp_path):
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(EncdecError, match="already exists; pass --overwrite"):
        encdec.save(model, out)
    assert _snapshot(out) == {"precious.txt": b"keep me"}
    # overwrite=True replaces an earlier output, not another folder (meant as "save into it"), as --overwrite
    with pytest.raises(EncdecError, match="holds precious.txt but none of what this command writes there"):
        encdec.save(model, out, overwrite=True)
    assert _snapshot(out) == {"precious.txt": b"keep me"}
    encdec.save(model, out / "model")
    (out / "model" / "stale.txt").write_text("from before")
    encdec.save(model, out / "model", overwrite=True)
    assert not (out / "model" / "stale.txt").exists() and (out / "model" / "config.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["model", "precious.txt"]  # no temporary leftovers


def test_failed_write_keeps_the_old_checkpoint(sources, tmp_path, monkeypatch):
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    out = tmp_path / "out"
    encdec.save(model, out)
    before = _snapshot(out)

    def broken(directory, weights):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(encdec.checkpoint, "write_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        encdec.save(model, out, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_not_an_encoder_decoder(sources):
    with pytest.raises(EncdecError, match="not an encoder-decoder checkpoint.*encdec adapt"):
        encdec.load(sources["gemma3"])


@pytest.mark.parametrize("family, attention", [("gemma2", "cross"), ("gemma3", "merged")])
def test_a_t5gemma_with_an_lm_head_of_its_own_is_refused(sources, tmp_path, family, attention):
    """Saved by transformers with tie_word_embeddings false: read as tied, its head was dropped without a word."""
    import transformers as tf

    encdec.save(encdec.adapt(encdec.load_source(str(sources[family])), attention=attention), tmp_path / "tied")
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    hf_class = getattr(tf, config["architectures"][0])
    model = hf_class.from_pretrained(str(tmp_path / "tied"), tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.out_proj.weight.mul_(2)  # a head that is not the embedding
    model.save_pretrained(str(tmp_path / "untied"))
    with pytest.raises(EncdecError, match="LM head of its own .tie_word_embeddings: false"):
        encdec.load(tmp_path / "untied")


def test_truncated_checkpoint_weights(sources, tmp_path):
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    encdec.save(model, tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(EncdecError, match="truncated or corrupt"):
        encdec.load(tmp_path / "out")


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process that map `path`."""
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            low, high = line.split()[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the mappings in /proc (Linux)")
def test_weights_are_read_like_safetensors_reads_them_and_into_memory_of_their_own(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2, 2).half(),
        "f64": torch.randn(4).double(), "i64": torch.arange(-3, 3), "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "f8": torch.randn(6).to(torch.float8_e4m3fn), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }
    file = tmp_path / "model.safetensors"
    save_file(tensors, str(file), metadata={"format": "pt"})
    read = encdec.files.read_weights(tmp_path)
    with safe_open(str(file), framework="pt") as f:
        assert sorted(read) == sorted(f.keys())
        for name in f.keys():
            expected = f.get_tensor(name)
            assert read[name].dtype == expected.dtype and read[name].shape == expected.shape
            assert torch.equal(read[name].reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name
    ranges = _mapped_ranges(file.resolve())
    assert ranges and all(not low <= t.data_ptr() < high for t in read.values() for low, high in ranges)
    mapped = encdec.files.read_weights(tmp_path, mapped=True)  # for weights copied elsewhere at once: the same values
    assert all(torch.equal(mapped[k].reshape(-1).view(torch.uint8), read[k].reshape(-1).view(torch.uint8)) for k in read)
    assert any(low <= mapped["f32"].data_ptr() < high for low, high in _mapped_ranges(file.resolve()))
    assert encdec.files.read_weights(tmp_path, torch.bfloat16)["f32"].dtype == torch.bfloat16
    assert encdec.files.read_weights(tmp_path, torch.bfloat16)["i64"].dtype == torch.int64


def test_an_empty_tensor_listed_after_its_neighbour_at_the_same_offset_is_read(tmp_path):
    """A header listing an empty tensor [0, 0] after a full one [0, 8] that starts at the same byte (writers that
    order tensors by name do): safetensors reads such a file, and so must encdec."""
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}
    text = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text
                                                 + torch.tensor([1.0, 2.0]).numpy().tobytes())
    read = encdec.files.read_weights(tmp_path)
    assert read["a"].tolist() == [1.0, 2.0] and read["b"].shape == (0,)


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("damage", ["header cut", "header not json", "offsets past the end", "size mismatch",
                                    "unknown dtype", "data cut", "shared bytes", "bytes no tensor names"])
def test_malformed_safetensors_files_are_refused(tmp_path, damage, mapped):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "model.safetensors"))
    raw = (tmp_path / "model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + length])
    if damage == "header cut":
        raw = raw[:4]
    elif damage == "header not json":
        raw = raw[:8] + b"{" * length + raw[8 + length:]
    elif damage == "data cut":
        raw = raw[:-5]
    elif damage == "shared bytes":  # a second tensor reading the first one's bytes: loaded silently before
        header["v"] = dict(header["w"])
        text = json.dumps(header).encode()
        raw = len(text).to_bytes(8, "little") + text + raw[8 + length:]
    elif damage == "bytes no tensor names":
        raw = raw + bytes(64)
    else:
        entry = header["w"]
        if damage == "offsets past the end":
            entry["data_offsets"] = [64, 128]
        elif damage == "size mismatch":
            entry["shape"] = [4, 5]
        else:
            entry["dtype"] = "Q4"
        text = json.dumps(header).encode()
        raw = len(text).to_bytes(8, "little") + text + raw[8 + length:]
    (tmp_path / "model.safetensors").write_bytes(raw)
    with pytest.raises(EncdecError, match="truncated or corrupt"):
        encdec.files.read_weights(tmp_path, mapped=mapped)


@pytest.mark.parametrize("edit, said", [
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"final_logit_softcap": 0.0}, "final_logit_softcap must be null or a positive number, got 0.0"),  # every logit 0
    ({"pad_token_id": 96}, "pad_token_id must be a token id in [0, 96) (the vocabulary), got 96"),
    ({"eos_token_ids": "1"}, "eos_token_ids must be a list of token ids, got 1"),
    ({"eos_token_ids": 1}, None),  # one id, as transformers' configurations may give it
    ({"decoder": {"rope_llama3": [8.0]}}, "rope_llama3 must be null or [factor, low_freq_factor, high_freq_factor"),
    ({"decoder": {"rope_llama3": [8.0, 1.0, 1.0, 8192]}}, "the two frequency factors apart; got [8.0, 1.0, 1.0, 8192]"),
    ({"encoder": {"qk_norm": "no"}}, "qk_norm must be true or false, got 'no'"),
    ({"tied_head": "false"}, "tied_head must be true or false, got 'false'"),  # named a missing lm_head weight
    ({"shared_embeddings": "false"}, "shared_embeddings must be true or false, got 'false'"),  # read as true
    ({"decoder": {"norm_offset": None}}, "norm_offset must be a number (1.0 for Gemma, 0.0 for the others), got None"),
], ids=["vocab-0", "softcap-0", "pad-past-vocabulary", "eos-text", "eos-one-id", "llama3-short", "llama3-equal",
        "qk-norm-text", "tied-text", "shared-text", "norm-offset-null"])
def test_a_hand_edited_configuration_is_checked_naming_the_file(sources, tmp_path, edit, said):
    """Unchecked, a single EOS id crashed generation and evaluation with a TypeError, a soft-cap of 0 made every
    output uniform without a word, and a short rope_llama3 failed in the first forward pass with a TypeError."""
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])), attention="cross")
    assert encdec.save(model, tmp_path / "out") == "encdec"
    file = tmp_path / "out" / "config.json"
    meta = json.loads(file.read_text())
    for key, value in edit.items():  # a stack's fields within it
        meta["config"][key] = {**meta["config"][key], **value} if key in ("encoder", "decoder") else value
    file.write_text(json.dumps(meta))
    if said is None:
        assert encdec.load(tmp_path / "out").config.eos_token_ids == [1]
        assert dataclasses.replace(model.config, eos_token_ids=(1, 5)).eos_token_ids == [1, 5]  # a tuple in Python
        return
    with pytest.raises(EncdecError, match=re.escape(said)) as caught:
        encdec.load(tmp_path / "out")
    assert str(file) in str(caught.value)


def test_a_checkpoint_holding_both_whole_and_sharded_weights_is_refused(sources, tmp_path, monkeypatch):
    """A sharded save over an unsharded one leaves model.safetensors beside the new index: transformers reads the
    whole file, encdec read the shards, each a different model without a word."""
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    encdec.save(model, tmp_path / "whole")
    monkeypatch.setattr(encdec.files, "SHARD_BYTES", 20_000)
    encdec.save(model, tmp_path / "sharded")
    for shard in (tmp_path / "sharded").glob("model*"):
        shard.rename(tmp_path / "whole" / shard.name)
    with pytest.raises(EncdecError, match="holds both model.safetensors and model.safetensors.index.json"):
        encdec.load(tmp_path / "whole")
    # transformers also loads whatever file config.json's transformers_weights names
    config = json.loads((tmp_path / "sharded" / "config.json").read_text())
    config["transformers_weights"] = "other.safetensors"
    (tmp_path / "sharded" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncdecError, match="names transformers_weights 'other.safetensors', which encdec does not read"):
        encdec.load(tmp_path / "sharded")


@pytest.mark.parametrize("family, fmt", [("gemma3", "t5gemma2"), ("gemma2", "t5gemma")])
def test_a_t5gemma_checkpoint_with_weights_or_settings_encdec_does_not_compute_is_refused(sources, tmp_path, family,
                                                                                          fmt):
    """transformers' T5Gemma computes q/k/v/o biases where attention_bias is true, and another activation where
    hidden_activation names one: the biases were dropped with a note, the activation never read."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "model"
    encdec.save(encdec.adapt(encdec.load_source(str(sources[family]))), out)
    weights = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    bias = next(n for n in weights if n.endswith("q_proj.weight")).replace("weight", "bias")
    save_file({**weights, bias: torch.zeros(len(weights[bias.replace("bias", "weight")]))}, out / "model.safetensors")
    with pytest.raises(EncdecError, match=f"holds 1 tensor.s. encdec does not read, such as {re.escape(bias)}: a "
                                          f"variant of {fmt}"):
        encdec.load(out)
    decoder = config["decoder"]
    for key, value, said in (("attention_bias", True, "attention_bias: true is not supported"),
                             ("hidden_activation", "gelu", "hidden_activation 'gelu' is not supported"),
                             ("sliding_window", None, "sliding_window is None; expected a positive number")):
        (out / "config.json").write_text(json.dumps({**config, "decoder": {**decoder, key: value}}))
        with pytest.raises(EncdecError, match=said):
            encdec.load(out)


def test_a_tokenizer_is_read_again_when_any_of_its_files_changes(tmp_path):
    """The tokenizer memo was keyed by the tokenizer* files alone: an edited chat_template.jinja (where transformers 5
    keeps the template) or special_tokens_map.json gave the old tokenizer back, and prompts the old template."""
    from tiny import make_tokenizer

    make_tokenizer(tmp_path)
    turns = [{"role": "user", "content": "w1"}]
    (tmp_path / "chat_template.jinja").write_text("A:{{ messages[0]['content'] }}")
    assert encdec.load_tokenizer(tmp_path).apply_chat_template(turns, tokenize=False) == "A:w1"
    (tmp_path / "chat_template.jinja").write_text("Bb:{{ messages[0]['content'] }}")
    assert encdec.load_tokenizer(tmp_path).apply_chat_template(turns, tokenize=False) == "Bb:w1"


def test_the_tokenizer_of_a_checkpoint_in_encdecs_format_loads_without_a_transformers_warning(sources, tmp_path):
    """transformers reads config.json before a tokenizer: for the model_type "encdec", which it does not know, it
    warned "You are using a model of type `encdec` to instantiate a model of type ``" at every load_tokenizer."""
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])), attention="cross")
    assert encdec.save(model, tmp_path / "out", tokenizer_dir=sources["gemma3"]) == "encdec"
    import logging

    warned: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    library = logging.getLogger("transformers")  # its own handlers, not propagated
    library.addHandler(handler)
    level = library.level
    library.setLevel(logging.WARNING)  # as a Python user has it (encdec's command line quiets transformers)
    try:
        tokenizer = encdec.load_tokenizer(tmp_path / "out")
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
    assert not [message for message in warned if "model of type" in message]
    reference = encdec.load_tokenizer(sources["gemma3"])
    assert tokenizer("w1 w2 <unused3>").input_ids == reference("w1 w2 <unused3>").input_ids
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (reference.eos_token_id,
                                                                                 reference.pad_token_id, len(reference))


def test_save_reads_a_home_relative_path_as_load_does(sources, tmp_path, monkeypatch):
    """encdec.save(model, "~/m") from Python writes under the home folder, where load("~/m") reads (it wrote
    ./~/m, and load read an older model at ~/m)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    encdec.save(model, "~/m")
    assert (tmp_path / "home" / "m" / "config.json").is_file() and not (tmp_path / "~").exists()
    loaded = encdec.load_checkpoint("~/m").model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())


def test_a_config_that_cannot_be_read_is_one_line(sources, tmp_path):
    """A directory where config.json should be (or a file only its owner may read) is said, not a traceback."""
    (tmp_path / "m" / "config.json").mkdir(parents=True)
    with pytest.raises(EncdecError, match=r"cannot read .*m/config.json: Is a directory"):
        encdec.load_checkpoint(tmp_path / "m")


def test_a_checkpoint_saved_again_in_place_keeps_its_tokenizer(adapted, tmp_path, monkeypatch):
    """load, change, save(..., overwrite=True) into the same directory: it was replaced whole, its tokenizer with
    it, and generate and serve refused the model. A dtype copy of every weight was also made before an existing
    output was refused."""
    from encdec.sources import has_tokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(adapted, model_dir)
    before = (model_dir / "tokenizer.json").read_text()
    encdec.save(encdec.load(model_dir), model_dir, overwrite=True)
    assert has_tokenizer(model_dir) and (model_dir / "tokenizer.json").read_text() == before
    other = tmp_path / "other"  # one given is the one saved
    encdec.save(encdec.load(model_dir), other)
    assert not has_tokenizer(other)
    # another model saved over a checkpoint does not take its tokenizer (another vocabulary, maybe): saved without
    encdec.save(encdec.load(other), model_dir, overwrite=True)
    assert not has_tokenizer(model_dir)
    shutil.rmtree(model_dir)
    shutil.copytree(adapted, model_dir)
    model = encdec.load(model_dir)
    monkeypatch.setattr(torch.Tensor, "to", lambda *a, **k: pytest.fail("weights copied before the refusal"))
    with pytest.raises(EncdecError, match="already exists"):
        encdec.save(model, model_dir, dtype="bfloat16")
