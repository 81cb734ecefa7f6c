"""Bad sources and bad adaptation requests: one clear line, exit status 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import write_corpus

import encdec
from encdec.cli import main
from encdec.errors import EncdecError


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> None:
    """A cache of the test's own: a refused GGUF file leaves its conversion's lock file in the cache."""
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))


def _gguf(path: Path, arch: str, truncate: int | None = None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate:
        path.write_bytes(path.read_bytes()[:-truncate])
    return path


def _hf_dir(path: Path, config: dict, source: Path | None = None) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if source is not None:
        shutil.copy(source / "model.safetensors", path / "model.safetensors")
    return path


def _run_adapt(capsys, tmp_path: Path, *args: str) -> str:
    out = tmp_path / "out"
    code = main(["adapt", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert not out.exists(), "nothing may be written on bad input"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    message = [line for line in err if "error:" in line]
    assert len(message) == 1, err
    return message[0]


def test_mixture_of_experts_checkpoint_directory(capsys, tmp_path):
    src = _hf_dir(tmp_path / "mixtral", {"model_type": "mixtral", "hidden_size": 32})
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "holds a mixtral model; supported: Gemma 2, Gemma 3, Llama" in line and "Qwen3" in line


def test_a_config_without_model_type(capsys, tmp_path):
    src = _hf_dir(tmp_path / "nameless", {"hidden_size": 32})
    assert "has no model_type in its config.json; supported: Gemma 2" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_a_model_type_that_is_not_a_name(capsys, tmp_path):
    """A list there was looked up in a dict: "unhashable type: 'list'" as a traceback, here and in every command
    that asks a directory's format first."""
    src = _hf_dir(tmp_path / "listed", {"model_type": ["llama"], "hidden_size": 32})
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "has model_type ['llama'] in its config.json, not a name; supported: Gemma 2" in line
    assert main_exit(["generate", str(src), "--prompt", "w1"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert str(src) in line and "['llama']" in line


def test_vision_only_config(capsys, tmp_path):
    src = _hf_dir(tmp_path / "siglip", {"model_type": "siglip_vision_model", "hidden_size": 32})
    assert "siglip_vision_model model; supported" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_gemma3_multimodal_without_text_model(capsys, tmp_path):
    src = _hf_dir(tmp_path / "mm", {"model_type": "gemma3", "vision_config": {}})
    assert "without a text model" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_missing_source(capsys, tmp_path):
    line = _run_adapt(capsys, tmp_path, "--encoder", str(tmp_path / "nowhere"))
    assert "no such file or directory" in line and "GGUF file" in line


@pytest.mark.parametrize(("text", "expected"), [("{not json", "config.json is not valid JSON"),
                                              ("[1, 2]", "holds a JSON list; expected a JSON object")])
def test_config_json_that_is_not_a_json_object(capsys, tmp_path, sources, text, expected):
    src = tmp_path / "broken"
    shutil.copytree(sources["gemma3"], src)
    (src / "config.json").write_text(text)
    assert expected in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_a_generation_config_whose_eos_is_no_token_id(capsys, tmp_path, sources):
    source = tmp_path / "source"
    shutil.copytree(sources["gemma2"], source)
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": "<end_of_turn>"}))
    message = _run_adapt(capsys, tmp_path, "--encoder", str(source))
    assert "generation_config.json" in message and "eos_token_id must be a token id or a list of them" in message


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_a_packaged_model_whose_package_lost_its_file(capsys, tmp_path, monkeypatch, name):
    """An installed package without its GGUF (or part) ended in a bare StopIteration traceback."""
    import encdec.sources

    empty = tmp_path / "package"
    empty.mkdir()
    monkeypatch.setattr(encdec.sources, "_package_dir", lambda module, name: empty)
    message = _run_adapt(capsys, tmp_path, "--encoder", name)
    assert f"'{name}'" in message and "reinstall it" in message


def test_truncated_safetensors(capsys, tmp_path, sources):
    src = tmp_path / "truncated"
    shutil.copytree(sources["gemma3"], src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert "truncated or corrupt" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def _with_weights(source: Path, src: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of `source` at `src` whose weights `edit` changed in place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, src)
    weights = load_file(str(src / "model.safetensors"))
    edit(weights)
    save_file(weights, str(src / "model.safetensors"))
    return src


def test_missing_weights(capsys, tmp_path, sources):
    src = _with_weights(sources["gemma3"], tmp_path / "partial", lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    assert "lacks 1 weight(s) such as model.layers.1.mlp.up_proj.weight" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_a_bidirectional_gemma_is_no_source(capsys, tmp_path, sources):
    """EmbeddingGemma's config is a Gemma 3 text config with use_bidirectional_attention: read as causal before."""
    src = tmp_path / "embedding-gemma"
    shutil.copytree(sources["gemma3"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "use_bidirectional_attention": True}))
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "is a bidirectional Gemma (use_bidirectional_attention: an embedding model), not a language model" in line


def test_weights_a_source_has_no_place_for_are_one_line(capsys, tmp_path, sources):
    """They reached the strict load_state_dict, whose RuntimeError named neither the checkpoint nor the cause."""
    src = _with_weights(sources["gemma3"], tmp_path / "extra",
                        lambda w: w.update({"model.layers.0.mlp.gate_proj.bias": torch.zeros(48)}))
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "has 1 weight(s) a gemma3 model of its config.json has no place for, such as " \
           "model.layers.0.mlp.gate_proj.bias" in line


def test_the_rope_frequencies_older_llama_checkpoints_saved_are_dropped(tmp_path, sources):
    """Llama 2 checkpoints hold each layer's rotary_emb.inv_freq buffer, which the config gives."""
    import encdec

    def add_buffers(weights: dict[str, torch.Tensor]) -> None:
        layers = {int(name.split(".")[2]) for name in weights if name.startswith("model.layers.")}
        weights.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in layers})

    src = _with_weights(sources["llama"], tmp_path / "llama2-style", add_buffers)
    adapted = encdec.adapt(encdec.load_source(str(src))).state_dict()
    plain = encdec.adapt(encdec.load_source(str(sources["llama"]))).state_dict()
    assert adapted.keys() == plain.keys() and all(torch.equal(adapted[k], plain[k]) for k in plain)


@pytest.mark.usefixtures("own_cache")
def test_mixture_of_experts_gguf(capsys, tmp_path):
    src = _gguf(tmp_path / "qwen3moe.gguf", "qwen3moe")
    assert "holds a qwen3moe model; supported" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


@pytest.mark.usefixtures("own_cache")
def test_truncated_gguf(capsys, tmp_path):
    src = _gguf(tmp_path / "gemma.gguf", "gemma3", truncate=100)
    assert "truncated" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


@pytest.mark.usefixtures("own_cache")
def test_a_gguf_whose_tokenizer_transformers_cannot_build(capsys, tmp_path, monkeypatch):
    """Its ValueError was a traceback, after the weights were dequantized."""
    import gguf
    from tiny import make_source, write_gguf

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    add = gguf.GGUFWriter.add_tokenizer_model
    monkeypatch.setattr(gguf.GGUFWriter, "add_tokenizer_model", lambda self, model: add(self, "unigram-of-its-own"))
    source = make_source(tmp_path / "llama", "llama", rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    path = write_gguf(source, tmp_path / "llama.gguf")
    message = _run_adapt(capsys, tmp_path, "--encoder", str(path))
    assert "llama.gguf: transformers cannot build a tokenizer from this GGUF (Cannot build a tokenizer" in message


def test_not_a_gguf(capsys, tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"PK\x03\x04 definitely a zip")
    assert "not a GGUF file" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


@pytest.mark.parametrize("encoder, decoder", [("gemma3", "gemma2"), ("llama", "qwen2"), ("qwen3", "gemma3")])
def test_different_families(capsys, tmp_path, sources, encoder, decoder):
    line = _run_adapt(capsys, tmp_path, "--encoder", str(sources[encoder]), "--decoder", str(sources[decoder]))
    assert f"encoder is {encoder} but decoder is {decoder}" in line


@pytest.mark.usefixtures("own_cache")
def test_gguf_architecture_transformers_cannot_read(capsys, tmp_path):
    src = _gguf(tmp_path / "mistral.gguf", "mistral")  # llama.cpp writes Mistral models as "llama"
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "holds a mistral model; supported GGUF architectures: gemma2, gemma3, llama, qwen2, qwen3" in line


def test_too_little_memory_to_dequantize_a_gguf_is_said_as_such(capsys, tmp_path, sources, monkeypatch):
    """An allocation failure is a RuntimeError too: it was reported as shapes transformers cannot map."""
    import transformers
    from tiny import write_gguf

    src = write_gguf(sources["gemma3"], tmp_path / "source.gguf")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 4194304 bytes.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", out_of_memory)
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "too little memory to dequantize this gemma3 GGUF" in line and "GiB in float32" in line
    assert "shapes" not in line

    def numpy_out_of_memory(*args, **kwargs):  # dequantizing goes through numpy, whose failure is a MemoryError
        raise MemoryError("Unable to allocate 1.00 GiB for an array with shape (262144, 1024) and data type float32")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", numpy_out_of_memory)
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "too little memory to dequantize this gemma3 GGUF (Unable to allocate 1.00 GiB" in line


def test_vocabularies_that_differ_by_an_alias_or_an_absent_id_are_said_in_words(monkeypatch):
    """The first differing id was found from id -> token maps: a tokenizer spelling an id twice (an added alias)
    made them equal, and the refusal a ValueError of min() on nothing; an id on one side only was 'None'."""
    from types import SimpleNamespace

    from encdec.adapt import check_same_vocabulary

    vocabularies = {"a": {"x": 0, "y": 1, "alias": 1}, "b": {"x": 0, "alias": 1}, "c": {"x": 0}}
    monkeypatch.setattr(encdec.sources, "load_tokenizer",
                        lambda directory: SimpleNamespace(get_vocab=lambda: vocabularies[str(directory)]))
    with pytest.raises(EncdecError, match=r"\(3 and 2 tokens; 'y' is token 1 of the encoder's alone\); they must"):
        check_same_vocabulary(Path("a"), Path("b"))
    with pytest.raises(EncdecError, match=r"token 1 is 'alias' in the encoder's, absent in the decoder's\)"):
        check_same_vocabulary(Path("b"), Path("c"))
    check_same_vocabulary(Path("b"), Path("b"))


@pytest.mark.parametrize("name", ["model.gguf", "model.bin"])
def test_a_source_file_that_cannot_be_read_is_one_line(capsys, tmp_path, monkeypatch, name):
    """Another user's file (umask 077) was a PermissionError traceback where its magic number was read."""
    import encdec.files

    source = tmp_path / name
    source.write_bytes(b"GGUF" + bytes(60))

    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(encdec.files, "open_regular", denied)
    line = _run_adapt(capsys, tmp_path, "--encoder", str(source))
    assert line.endswith(f"cannot read {source}: Permission denied"), line


def test_different_vocabularies(capsys, tmp_path, monkeypatch):
    """Tables of one size can hold different vocabularies (Llama 2's and OpenLLaMA's 32,000 tokens): only the table
    sizes were compared, and the decoder generated ids of its vocabulary read in the encoder's."""
    from tiny import make_source

    a = make_source(tmp_path / "a", "gemma2")
    b = make_source(tmp_path / "b", "gemma2", hidden=24, reserved=False)  # plain words in place of <unusedK>
    loaded = []
    monkeypatch.setattr(encdec.sources, "load_source", lambda *args, **kwargs: loaded.append(args))
    line = _run_adapt(capsys, tmp_path, "--encoder", str(a), "--decoder", str(b))
    # said of one id, before either source's weights were read (two 9B sources: 64 GB); it named "token None"
    assert ("the encoder's and the decoder's tokenizers spell different vocabularies (96 and 96 tokens; token 4 is "
            "'<unused0>' in the encoder's, 'plain0' in the decoder's); they must share one vocabulary") in line
    assert loaded == []
    monkeypatch.undo()
    for source in (b, a):  # without tokenizers, the tables' sizes are all there is to compare
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (source / name).unlink(missing_ok=True)
        if source == b:  # one side without: they went through unsaid (a checkpoint copied without its tokenizer)
            assert main(["adapt", "--encoder", str(a), "--decoder", str(b), "--out", str(tmp_path / "kept")]) == 0
            warned = [x for x in capsys.readouterr().err.splitlines() if "vocabularies were not compared" in x]
            assert len(warned) == 1 and f"the decoder's ({b}) has no tokenizer; both tables have 96 rows" in warned[0]
    cfg = json.loads((b / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(str(b / "model.safetensors"))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:80].clone()
    cfg["vocab_size"] = 80
    save_file(weights, str(b / "model.safetensors"))
    (b / "config.json").write_text(json.dumps(cfg))
    assert "encoder vocabulary has 96 tokens, decoder's 80; they must share one vocabulary" in _run_adapt(
        capsys, tmp_path, "--encoder", str(a), "--decoder", str(b))


@pytest.mark.parametrize("attention", ["merged", None])  # merged: the default for Gemma 3
def test_merged_attention_with_another_decoder_is_refused_before_the_sources_load(capsys, tmp_path, sources,
                                                                                   monkeypatch, attention):
    """Refused once both sources had loaded (32 GB of float32 weights for a 9B encoder), though their configs
    tell it; a decoder of another family too."""
    monkeypatch.setattr("encdec.sources.load_source", lambda *a, **k: pytest.fail("the sources were loaded"))
    line = _run_adapt(capsys, tmp_path, "--encoder", str(sources["gemma3"]), "--decoder", str(sources["gemma3-small"]),
                      *(["--attention", attention] if attention else []))
    assert "use --attention cross" in line
    line = _run_adapt(capsys, tmp_path, "--encoder", str(sources["gemma3"]), "--decoder", str(sources["gemma2"]),
                      "--attention", "cross")
    assert "encoder is gemma3 but decoder is gemma2; both must be the same family" in line


@pytest.mark.parametrize("layers, message", [("0,9", "out of range"), ("3,1", "distinct and increasing"),
                                             ("a,b", "expected a comma list"), ("5:", "selects no layer")])
def test_bad_decoder_layers(capsys, tmp_path, sources, monkeypatch, layers, message):
    monkeypatch.setattr("encdec.sources.load_source", lambda *a, **k: pytest.fail("the source was loaded"))
    assert message in _run_adapt(capsys, tmp_path, "--encoder", str(sources["gemma3"]), "--decoder-layers", layers)


def test_decoder_layers_from_python_may_be_numpy_integers(sources):
    """np.arange(0, 3, 2) was refused as "layer(s) [np.int64(0), np.int64(2)] out of range"."""
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])), decoder_layers=np.arange(0, 3, 2))
    assert model.config.decoder.num_layers == 2


@pytest.mark.parametrize("layers, message", [([], "selects no layer"), ([3, 1], "distinct and increasing"),
                                             ([0, 7], "out of range"), ([-1], "out of range"),
                                             ([0.5], "layer indices are integers, got [0.5]"),
                                             ([0, 2.0], "layer indices are integers, got [2.0]")])
def test_bad_decoder_layers_from_python(sources, layers, message):
    """encdec.adapt took any list: [] built the whole decoder, [3, 1] stacked its layers reversed, [0, 7] and [-1]
    ended in tracebacks."""
    source = encdec.load_source(str(sources["gemma3"]))

    with pytest.raises(EncdecError, match="decoder_layers: |decoder_layers selects") as refused:
        encdec.adapt(source, decoder_layers=layers)
    assert message in str(refused.value)


@pytest.mark.parametrize("layers", ["0,,3", "::0", "1:2:3:4", "x:", "1,1", "0,3,1"])
def test_decoder_layers_written_wrong_are_refused_before_the_source_is_read(capsys, tmp_path, monkeypatch, layers):
    monkeypatch.setattr("encdec.sources.load_source", lambda *a, **k: pytest.fail("the source was read"))
    line = _run_adapt(capsys, tmp_path, "--encoder", "gemma-3-270m", "--decoder-layers", layers)
    expected = "layers must be distinct and increasing" if "," in layers and "" not in layers.split(",") else \
        "expected a comma list like 0,3,6 or a slice like ::3"
    assert f"--decoder-layers '{layers}': {expected}" in line


def test_existing_output_directory(capsys, tmp_path, sources):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    code = main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "already exists; pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_an_out_that_is_a_link_is_written_through_with_the_guards_where_it_leads(capsys, tmp_path, sources):
    """--out LINK --overwrite replaced the link by a directory, whatever its target held, and skipped the check
    that refuses to replace a folder of other files; `generate --out` writes through a link. Now the output goes
    where the link leads, the link stays, and the target is checked as an --out given plainly would be."""
    big = tmp_path / "big" / "mymodels"
    big.mkdir(parents=True)
    (big / "notes.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(big)
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(link), "--overwrite"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"output directory {big} holds notes.txt but none of what this command writes there" in line
    assert link.is_symlink() and (big / "notes.txt").read_text() == "mine"
    (big / "notes.txt").unlink()
    big.rmdir()
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(link)]) == 0  # a link to nothing yet
    assert link.is_symlink() and (big / "config.json").is_file()
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and (big / "config.json").is_file() and encdec.load(link) is not None


def test_an_out_that_is_a_mount_point_is_refused_before_any_work(capsys, tmp_path, sources, monkeypatch):
    """A container's volume given as --out: the output, written beside it, could not be renamed into its place,
    which was said once the model had been adapted and written (and an empty folder was left beside it)."""
    import os.path

    out = tmp_path / "volume"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == out or real(path))
    monkeypatch.setattr("encdec.sources.load_source", lambda *a, **k: pytest.fail("the source was loaded"))
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out), "--overwrite"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"output directory {out} is a mount point" in line and f"such as {out / 'model'}" in line
    # the quickstart writes into its --out (adapted/, pretrain/), as pretrain does: a volume is a place for it
    from encdec.files import check_output_dir

    check_output_dir(out, True, replaces=("adapted", "pretrain"), into=True)


def test_an_output_that_cannot_be_moved_aside_leaves_nothing_beside_it(tmp_path, monkeypatch):
    from encdec import files

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    real = os.replace

    def busy(src, dst):
        if Path(src) == out:
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", busy)
    with pytest.raises(files.WriteFailed, match="busy"), \
            files.atomic_dir(out, overwrite=True, replaces=("config.json",)) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_an_earlier_output_not_another_folder(capsys, tmp_path, sources):
    """`--out ~/models --overwrite`, meant as "into ~/models", replaced the whole folder."""
    out = tmp_path / "models"
    out.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (out / name).write_text("x")
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out), "--overwrite"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"output directory {out} holds a.gguf, b.gguf but none of what this command writes there" in line
    assert sorted(p.name for p in out.iterdir()) == ["a.gguf", "b.gguf"]
    # a folder with a config.json that is no earlier output: a decoder-only source, a project (replaced whole)
    source = shutil.copytree(sources["gemma2"], tmp_path / "gemma2")
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")
    (project / "main.py").write_text("print()")
    adapted = tmp_path / "adapted"
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(adapted)]) == 0
    for command in (["adapt", "--encoder", str(sources["gemma3"]), "--out", str(source)],
                    ["adapt", "--encoder", str(sources["gemma3"]), "--out", str(project)],
                    ["export-encoder", str(adapted), "--out", str(source)],
                    ["export-encoder", str(adapted), "--out", str(shutil.copytree(adapted, tmp_path / "run-model"))]):
        capsys.readouterr()
        assert main([*command, "--overwrite"]) == 2, command
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert f"output directory {command[-1]} is not an " in line and "what this command writes there" in line
    assert sorted(p.name for p in project.iterdir()) == ["config.json", "main.py"]
    assert encdec.load_source(str(source)).family == "gemma2" and encdec.load(tmp_path / "run-model") is not None
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(adapted), "--overwrite"]) == 0


def test_empty_decoder_layers(capsys, tmp_path, sources):
    line = _run_adapt(capsys, tmp_path, "--encoder", str(sources["gemma3"]), "--decoder-layers", "")
    assert "--decoder-layers is empty" in line


@pytest.mark.parametrize("empty", ["--encoder", "--decoder"])
def test_an_empty_source_is_refused_not_read_as_here_or_as_balanced(capsys, tmp_path, sources, empty):
    """`--decoder "$DEC"` with DEC unset adapted a balanced model without a word (minutes and GBs for a 9B); an empty
    --encoder read the working directory."""
    given = {"--encoder": str(sources["gemma2"]), "--decoder": str(sources["gemma2"]), empty: ""}
    assert main_exit(["adapt", *[part for pair in given.items() for part in pair], "--out", str(tmp_path / "o")]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert f"argument {empty}: empty (an unset variable?)" in line, line
    assert not (tmp_path / "o").exists()


def test_a_slice_of_layers_from_the_end_is_read_as_a_value(tmp_path, sources):
    """argparse took -2: for an option ("expected one argument"); only --decoder-layers=-2: worked."""
    out = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma2"]), "--decoder-layers", "-2:", "--out", str(out)]) == 0
    assert encdec.load(out).config.decoder.num_layers == 2


def test_output_under_a_file(capsys, tmp_path, sources):
    (tmp_path / "file").write_text("mine")
    code = main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(tmp_path / "file" / "out")])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and f"{tmp_path / 'file'} is a file, not a directory" in line
    assert (tmp_path / "file").read_text() == "mine"


def test_source_tensor_of_the_wrong_shape(capsys, tmp_path, sources):
    name = "model.layers.2.self_attn.k_proj.weight"
    src = _with_weights(sources["gemma3"], tmp_path / "reshaped", lambda w: w.update({name: w[name][:8].clone()}))
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "tensor model.layers.2.self_attn.k_proj.weight has shape 8x32, config.json implies 16x32" in line


@pytest.mark.parametrize("change, message", [
    (lambda t: t.to(torch.int32), "model.embed_tokens.weight holds int32 values; a model's weights are floating"),
    (lambda t: t[0, 0].clone(), "tensor model.embed_tokens.weight has shape scalar, config.json implies Vx32")])
def test_source_embedding_of_integers_or_a_scalar(capsys, tmp_path, sources, change, message):
    """Both passed the shape checks or failed in them as tracebacks (an IndexError, load_state_dict's error)."""
    name = "model.embed_tokens.weight"
    src = _with_weights(sources["gemma3"], tmp_path / "odd", lambda w: w.update({name: change(w[name])}))
    assert message in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_an_untied_head_of_another_vocabulary_than_the_embedding(capsys, tmp_path, sources):
    """The head's rows were not compared with the embedding's: adapting crashed in load_state_dict."""
    head = "lm_head.weight"
    src = _with_weights(sources["llama"], tmp_path / "head",
                        lambda w: w.update({head: torch.cat([w[head], w[head][:4]])}))
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "tensor lm_head.weight has shape 100x32, the embedding table implies 96x32" in line


@pytest.mark.parametrize("eos", ["missing", None])
def test_a_llama_config_without_eos_is_one_line(capsys, tmp_path, sources, eos):
    """The EOS defaulted to Gemma's 1, a quotation mark in Llama 3's vocabulary: generation stopped at quotes."""
    src = tmp_path / "no-eos"
    shutil.copytree(sources["llama"], src)
    config = json.loads((src / "config.json").read_text())
    if eos == "missing":
        del config["eos_token_id"]
    else:
        config["eos_token_id"] = eos
    (src / "config.json").write_text(json.dumps(config))
    (src / "generation_config.json").unlink()  # where it may be named too (test_families: ...generation_config_alone)
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert f"{src / 'config.json'}: config.json names no eos_token_id" in line


def test_a_damaged_tokenizer_is_one_line(capsys, tmp_path, sources, monkeypatch):
    """JSON that the tokenizers library cannot map (a newer version's, or a damaged one): it raises a plain
    Exception, which came out as a traceback after the weights were read; it is read before adapting (minutes for
    a 9B), not when saving."""
    src = tmp_path / "damaged-tokenizer"
    shutil.copytree(sources["gemma3"], src)
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tokenizer["model"]["type"] = "NoSuchModel"
    (src / "tokenizer.json").write_text(json.dumps(tokenizer))
    monkeypatch.setattr(sys.modules["encdec.adapt"], "adapt", lambda *a, **k: pytest.fail("adapted first"))
    message = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "transformers cannot load its tokenizer" in message and str(src.name) in message


def test_a_source_without_tokenizer_is_adapted_with_a_warning(capsys, tmp_path, sources):
    from encdec.logs import setup

    src = tmp_path / "no-tokenizer"
    shutil.copytree(sources["gemma3"], src)
    for file in src.glob("tokenizer*"):
        file.unlink()
    setup()
    out = tmp_path / "out"
    assert main(["adapt", "--encoder", str(src), "--out", str(out)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "has no tokenizer" in line]
    assert len(warned) == 1 and "`encdec generate` needs one: copy" in warned[0] and "tokenizer.json" in warned[0]
    assert main(["generate", str(out), "--prompt", "w1"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_a_bad_option_value_is_one_line(capsys, tmp_path):
    code = main_exit(["pretrain", "--steps", "three", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "argument --steps: invalid int value: 'three'" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_path_that_is_not_utf8_is_refused_before_any_work(adapted, corpus, sources, tmp_path, capsys, monkeypatch):
    """A Latin-1 name reaches Python with stand-ins (os.fsdecode's surrogates) that safetensors and tokenizers refuse:
    adapt read its sources and adapted before a traceback at the save; pretrain trained every step, then called its
    own checkpoints "truncated or corrupt"."""
    odd = str(tmp_path / os.fsdecode(b"caf\xe9"))
    said = "caf\\xe9: the path is not UTF-8 text, and the libraries that write and read models"
    said_of_model = "caf\\xe9-model: the path is not UTF-8 text"
    commands = (["adapt", "--encoder", str(sources["gemma3"]), "--out", odd],
                ["adapt", "--encoder", odd, "--out", str(tmp_path / "out")],
                ["pretrain", "--model", str(adapted), "--data", str(corpus), "--out", odd, "--steps", "1"],
                ["pretrain", "--model", odd, "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "1"],
                ["generate", str(shutil.copytree(adapted, odd + "-model")), "--prompt", "w1"],
                ["export", str(adapted), "--to", "ctranslate2", "--out", odd])
    for command in commands:
        try:
            code = main(command)
        except SystemExit as e:  # argparse's refusal of an argument's type
            code = e.code
        (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert code == 2 and (said in line or said_of_model in line), (command, line)
    monkeypatch.setenv("ENCDEC_CACHE", odd)
    assert main(["adapt", "--encoder", str(tiny_gguf(sources, tmp_path)), "--out", str(tmp_path / "out")]) == 2
    assert said in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [os.path.basename(odd) + "-model", "source.gguf"]


def tiny_gguf(sources, tmp_path: Path) -> Path:
    from tiny import write_gguf

    return write_gguf(sources["gemma3"], tmp_path / "source.gguf")


def test_a_nul_in_a_path_from_a_yaml_file_or_a_hand_edited_source_record_is_one_line(adapted, corpus, tmp_path,
                                                                                       capsys):
    """YAML spells a NUL character "\\0": a ValueError's traceback at the path's first use. And encdec.json's
    adapted_from, which names the default teacher, edited into a string: an AttributeError's traceback."""
    config = tmp_path / "run.yaml"
    config.write_text(f'model: {adapted}\ndata: [{corpus}]\nout: "{tmp_path}/nu\\0l"\n')
    assert main_exit(["pretrain", "--config", str(config)]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "--out " in line and "a path holds no NUL character" in line, line
    edited = shutil.copytree(adapted, tmp_path / "edited")
    metadata = json.loads((edited / "encdec.json").read_text())
    (edited / "encdec.json").write_text(json.dumps({**metadata, "adapted_from": "gemma"}))
    assert main_exit(["pretrain", "--model", str(edited), "--data", str(corpus), "--out", str(tmp_path / "run")]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "encdec.json: its adapted_from names no source model" in line and "--teacher SRC" in line, line


@pytest.mark.parametrize("argv", [["generate", "", "--prompt", "w1"], ["finetune", ""], ["serve", ""],
                                  ["evaluate", ""], ["classify", "", "--task", "cb"], ["export-encoder", ""],
                                  ["info", ""]])
def test_an_empty_model_argument_is_refused(argv, capsys, tmp_path, monkeypatch):
    """An unset $MODEL: the working directory was read as the model (finetune trained it and saved its copy)."""
    monkeypatch.chdir(tmp_path)
    assert main_exit([*argv, "--out", str(tmp_path / "out")] if argv[0] not in ("info", "serve") else argv) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "empty" in line and "unset variable" in line, line
    assert not (tmp_path / "out").exists()


def test_a_path_of_an_unknown_user_or_through_a_dangling_link_is_one_line(adapted, tmp_path, capsys, monkeypatch):
    """~nosuchuser/x: pathlib's RuntimeError (a traceback); a link on the way to --out that leads nowhere (a mount
    that is not there): every check passed, the work ran, then mkdir's FileExistsError (a traceback, all lost)."""
    for argv in (["info", "~no-such-user-here/x"], ["generate", str(adapted), "--prompt", "w1", "--out",
                                                    "~no-such-user-here/x.jsonl"],
                 ["generate", str(adapted), "--input", "~no-such-user-here/p.jsonl"],
                 ["generate", str(adapted), "--input", "~no-such-user-here/p.jsonl", "--out", str(tmp_path / "o")],
                 ["serve", "~no-such-user-here/m"], ["evaluate", "~no-such-user-here/m", "--tasks", "arc_easy"],
                 ["classify", "~no-such-user-here/m", "--task", "rte", "--out", str(tmp_path / "c")],
                 ["adapt", "--encoder", "~no-such-user-here/m", "--out", str(tmp_path / "a")]):
        assert main_exit(argv) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
        assert "no home directory is known for ~no-such-user-here" in line, line
    monkeypatch.setenv("ENCDEC_CACHE", "~no-such-user-here/cache")
    from encdec.sources import cache_root

    with pytest.raises(EncdecError, match="no home directory is known for ~no-such-user-here"):
        cache_root()
    monkeypatch.delenv("ENCDEC_CACHE")
    (tmp_path / "dangling").symlink_to(tmp_path / "not-mounted")
    monkeypatch.setattr("encdec.inference.loading.load_for_inference", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr("encdec.evaluation.harness.load_scorer", lambda *a, **k: pytest.fail("loaded"))
    for argv in (["generate", str(adapted), "--prompt", "w1", "--out", str(tmp_path / "dangling" / "x.jsonl")],
                 ["evaluate", str(adapted), "--tasks", "heldout", "--out", str(tmp_path / "dangling" / "res")],
                 ["adapt", "--encoder", str(adapted), "--out", str(tmp_path / "dangling" / "m")]):
        assert main_exit(argv) == 2, argv
        (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
        assert f"{tmp_path / 'dangling'} is a link to {tmp_path / 'not-mounted'}, which does not exist" in line, line
    from encdec.files import WriteFailed
    from encdec.sources import cache_lock

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "dangling" / "cache"))  # a write error, as callers expect
    with pytest.raises(WriteFailed, match="dangling is a link to .*not-mounted, which does not exist"):
        cache_lock("x")


def test_a_search_grid_inside_the_classify_output_is_refused(adapted, tmp_path, capsys):
    """--overwrite replaces OUT whole: the --grid file kept there was deleted with it."""
    out = tmp_path / "cls"
    out.mkdir()
    (out / "grid.yaml").write_text("lr: [1e-4]\n")
    assert main_exit(["classify", str(adapted), "--task", "cb", "--out", str(out), "--search", "--grid",
                      str(out / "grid.yaml"), "--overwrite"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "holds the input" in line and (out / "grid.yaml").exists(), line


def main_exit(argv: list[str]) -> int:
    """main(), with argparse's own exits turned into the exit status."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


PRETRAIN_BAD = [
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite starts it afresh"),
    (["--data", "no-such-text.txt"], ("no such file or directory; expected a .txt, .jsonl (one JSON object per line "
                                      "with a text field) or .parquet file, a directory of them, hf:NAME, or packaged "
                                      "text: corpus:python-docs, corpus:coqa-stories")),
    (["--save-every", "0"], "--save-every must be at least 1, got 0"),
    (["--log-every", "-1"], "--log-every must be at least 1"),
    (["--eval-every", "-2"], "--eval-every must be at least 0"),
    (["--eval-windows", "0"], "--eval-windows must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--enc-len", "-5"], "--enc-len must be at least 1"),
    (["--enc-len", "300"], "--enc-len 300: the model reads at most 256 positions"),
    (["--dec-len", "1"], "--dec-len must be at least 2, got 1"),
    (["--enc-len", "1"], "--enc-len 1 and --dec-len 64 leave 0 token(s) per window for --objective prefixlm after the "
                         "leading BOS; a window needs at least 2"),  # a ZeroDivisionError's traceback
    (["--objective", "ul2", "--enc-len", "1", "--dec-len", "2"], "leave 1 token(s) per window for --objective ul2;"),
    (["--objective", "ul2", "--dec-len", "2"], "--dec-len 2: UL2's targets hold at least a sentinel, a token of "
                                                "noise and EOS; give 3 or more"),  # else trained without EOS
    (["--objective", "ul2", "--enc-len", "2", "--dec-len", "8"], "a UL2 example of a 2-token window needs"),
    (["--window", "4"], "--window 4: 0 (the objective's own) or at least 8 tokens"),
    (["--objective", "ul2", "--window", "65"], "--window 65: at most 64 tokens for --objective ul2 at --enc-len 64"),
    (["--window", "127"], "--window 127: at most 126 tokens for --objective prefixlm at --enc-len 64 and --dec-len 64"),
    (["--batch-size", "100000"],
     "--batch-size 100000 x --grad-accum 1 x 1 process(es) needs more rows a step than the"),
    (["--distill", "--teacher-top-k", "1000"], "--teacher-top-k 1000 exceeds the 96 tokens of the vocabulary"),
    (["--distill", "--trim-vocab", "40", "--teacher-top-k", "90"],  # under the 96 a source has: the trimmed one's
     "tokens of the vocabulary trained on (--trim-vocab 40); 0 keeps them all"),
    # instruction tuning with pretraining's defaults (64 + 64 tokens, runs/pretrain) and the options finetune hides
    (["--objective", "instruct"], "--objective instruct: instruction tuning is `encdec finetune MODEL`"),
    # the teacher read example and target as one sequence past its positions: silently extrapolated
    (["--distill", "--enc-len", "200", "--dec-len", "100"], "--enc-len 200 + --dec-len 100: the distillation teacher "
     "(decoder-only) reads each example as one sequence of up to 299 positions, more than the 256 its source was"),
    (["--decoder-only", "--enc-len", "200", "--dec-len", "100"], "--enc-len 200 + --dec-len 100: the model "
     "(decoder-only) reads each example as one sequence of up to 299 positions, more than the 256"),
    (["--tau", "nan"], "--tau must be a positive finite number, got nan"),
    (["--tau", "0"], "--tau must be a positive finite number"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--dist-timeout", "0"], "--dist-timeout must be a positive finite number, got 0.0"),
    (["--alpha", "nan"], "--alpha must be in [0.0, 1.0], got nan"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--seed", str(2**64)], "--seed must be at most"),
    (["--data", ""], "--data ['']: an empty path"),
    (["--config", "steps: three\n"], "--steps must be an integer, got 'three' (str)"),
    (["--config", "data: corpus.txt\n"], "--data must be a list of paths, got 'corpus.txt'"),
    (["--config", "lr: [1]\n"], "--lr must be a number, got [1]"),
    (["--config", "distill: 1\n"], "--distill must be true or false, got 1"),
    (["--config", "lr: " + "[" * 2000 + "]" * 2000], "cannot read the YAML configuration (nested too deeply)"),
    (["--config", "out: 2024-02-30\n"], "cannot read the YAML configuration (day is out of range for month)"),
    (["--config", "steps: 0x_\n"], "cannot read the YAML configuration (invalid literal for int() with base 16"),
    (["--config", "model: [unclosed\n"],
     "cannot read the YAML configuration (line 2, column 1: expected ',' or ']', but got '<stream end>')"),
    (["--out-under-a-file"], "is a file, not a directory"),
    (["--eval-data", ""], "--eval-data ['']: an empty path"),  # read the working directory
    (["--dist-timeout", "1e14"], "--dist-timeout must be at most 31536000 seconds"),  # torch's OverflowError
]


@pytest.mark.parametrize("extra, message", PRETRAIN_BAD, ids=[" ".join(e)[:80] for e, _ in PRETRAIN_BAD])
def test_bad_pretraining_values(capsys, tmp_path, adapted, sources, extra, message):
    out = tmp_path / "run"
    model = adapted
    if extra[0] == "--decoder-only":
        model, extra = sources["gemma3"], extra[1:]
    if extra[0] == "--config":
        (tmp_path / "run.yaml").write_text(extra[1])
        extra = ["--config", str(tmp_path / "run.yaml")]
    if extra[0] == "--out-under-a-file":
        (tmp_path / "file").write_text("x")
        out, extra = tmp_path / "file" / "run", []
    capsys.readouterr()
    code = main_exit(["pretrain", "--model", str(model), "--out", str(out), *extra])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_a_window_past_the_rows_with_bos_is_refused_before_the_corpus_is_tokenized(capsys, tmp_path, adapted,
                                                                                  monkeypatch):
    """--window 128 at 64 + 128 tokens passes the options' check (no BOS: 128 fits) and is 2 too many with the
    tokenizer's BOS: that was said after the whole corpus was tokenized (minutes for a large one)."""
    monkeypatch.setattr("encdec.training.plan.token_stream", lambda *a, **k: pytest.fail("the corpus was tokenized"))
    code = main_exit(["pretrain", "--model", str(adapted), "--out", str(tmp_path / "run"), "--enc-len", "64",
                      "--dec-len", "128", "--window", "128"])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and "--window 128: at most 126 tokens for --objective prefixlm" in line


def test_a_mistyped_teacher_is_refused_before_the_corpus_is_tokenized(capsys, tmp_path, adapted, monkeypatch):
    monkeypatch.setattr("encdec.training.plan.token_stream", lambda *a, **k: pytest.fail("the corpus was tokenized"))
    code = main_exit(["pretrain", "--model", str(adapted), "--out", str(tmp_path / "run"), "--teacher",
                      str(tmp_path / "gemma-3-27m")])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and f"--teacher {tmp_path / 'gemma-3-27m'}: {tmp_path / 'gemma-3-27m'}: no such file" in line


def test_a_decoder_only_student_refuses_a_teacher_top_k_past_its_vocabulary(capsys, tmp_path, sources):
    """Checked for encoder-decoder students only: a decoder-only one failed in torch.topk at its first step."""
    corpus, out = tmp_path / "corpus.txt", tmp_path / "run"
    corpus.write_text(("w1 w2 w3 w4 w5 w6 w7 w8 " * 40 + "\n") * 10)
    code = main_exit(["pretrain", "--model", str(sources["gemma3"]), "--out", str(out), "--data", str(corpus),
                      "--distill", "--teacher-top-k", "1000", "--enc-len", "16", "--dec-len", "16", "--steps", "1"])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "--teacher-top-k 1000 exceeds the 96 tokens" in lines[0], lines
    assert not (out / "checkpoints").exists()


GENERATE_BAD = [
    (["--temperature", "nan"], "temperature (--temperature) must be a positive finite number, got nan"),
    (["--do-sample", "--temperature", "0"], "temperature (--temperature) must be a positive finite number, got 0.0"),
    (["--top-p", "nan"], "top_p (--top-p) must be in [0, 1], got nan"),
    (["--max-new-tokens", "0"], "max_new_tokens (--max-new-tokens) must be an integer of at least 1"),
    (["--max-new-tokens", "100000000000"], "at most 256 new tokens"),
    (["--seed", "-3"], "seed -3 out of range"),
    (["--repetition-penalty", "-1"],
     "repetition_penalty (--repetition-penalty) must be a positive finite number, got -1.0"),
    (["--presence-penalty", "nan"], "presence_penalty (--presence-penalty) must be in [-2, 2], got nan"),
    (["--prompt", " ".join(["w5"] * 300)], "the prompt has 301 tokens; this model reads at most 256"),
    (["--top-k", "-2"], "top_k (--top-k) must be at least 1 (0 or -1: no limit), got -2"),  # as the option spells it
    (["--quantize", "int8", "--dtype", "bfloat16"], "--quantize int8 runs on CPU in float32"),
]


@pytest.mark.parametrize("extra, message", GENERATE_BAD, ids=[" ".join(e)[:30] for e, _ in GENERATE_BAD])
def test_bad_generation_values(capsys, adapted, extra, message, monkeypatch):
    monkeypatch.setattr("encdec.inference.loading.load", lambda *a, **k: pytest.fail("the weights were read"))
    capsys.readouterr()
    code = main_exit(["generate", str(adapted), "--prompt", "w1 w2", *extra])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and message in lines[0], captured.err
    assert " -> " not in captured.out


def test_top_k_zero_is_no_limit_as_its_help_says(capsys, adapted):
    def sampled(*top_k: str) -> str:
        assert main(["generate", str(adapted), "--prompt", "w1 w2", "--do-sample", "--temperature", "2", "--seed", "1",
                     "--max-new-tokens", "8", *top_k]) == 0
        return capsys.readouterr().out

    unlimited = sampled()
    assert " -> " in unlimited and sampled("--top-k", "0") == unlimited
    assert sampled("--top-k", "1") != unlimited  # (a limit the seed's draws would show)


@pytest.mark.parametrize("command", [["evaluate", "{model}", "--tasks", "heldout"], ["export-encoder", "{model}"],
                                     ["classify", "{model}", "--task", "boolq"]])
def test_every_writing_command_refuses_an_output_under_a_file(capsys, tmp_path, adapted, command):
    (tmp_path / "file").write_text("mine")
    argv = [part.format(model=adapted) for part in command] + ["--out", str(tmp_path / "file" / "out")]
    assert main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert str(tmp_path / "file") in line and "not a directory" in line
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("command", [["adapt", "--encoder", "{model}"], ["export-encoder", "{model}"],
                                     ["classify", "{model}", "--task", "cb", "--limit", "8"],
                                     ["export", "{model}", "--to", "ctranslate2"]])
def test_no_command_writes_over_its_own_input(capsys, tmp_path, adapted, command):
    """--out naming the input (or a directory that holds it) would replace the input once --overwrite is given."""
    model = tmp_path / "model"
    shutil.copytree(adapted, model)
    before = sorted(p.name for p in model.iterdir())
    for out in (model, tmp_path):
        argv = [part.format(model=model) for part in command] + ["--out", str(out), "--overwrite"]
        assert main(argv) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert f"the input {model}" in line and "choose another --out" in line
    if command[0] != "adapt":  # nor inside it: the model's files name classify's feature cache and search journal,
        # and an export kept in the model's folder was deleted by the model's next --overwrite
        assert main([part.format(model=model) for part in command] + ["--out", str(model / "cb")]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert f"is inside the input {model}" in line
    assert sorted(p.name for p in model.iterdir()) == before


def test_training_refuses_an_output_that_holds_its_model(capsys, tmp_path, adapted):
    """`pretrain --overwrite` deletes OUT/model before training: it must not be the model being trained."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("w1 w2 w3 w4 w5 w6 w7 w8 " * 40 + "\n") * 10)
    run = tmp_path / "run"
    shutil.copytree(adapted, run / "model")
    argv = ["pretrain", "--model", str(run / "model"), "--out", str(run), "--overwrite", "--data", str(corpus),
            "--steps", "1"]
    assert main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"holds the input {run / 'model'}" in line
    assert (run / "model" / "config.json").exists()


def test_an_output_replaced_whole_keeps_the_folders_kept_inside_it(capsys, tmp_path, adapted, sources):
    """`adapt --overwrite` replaces its --out whole: a training run or an export kept inside the model's folder went
    with it, without a word (and a run could be started there: `pretrain --out MODEL/run`)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("w1 w2 w3 w4 w5 w6 w7 w8 " * 40 + "\n") * 10)
    model = shutil.copytree(adapted, tmp_path / "model")
    assert main(["pretrain", "--model", str(model), "--out", str(model / "run"), "--data", str(corpus),
                 "--steps", "1"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"is inside the input {model}" in line and not (model / "run").exists()
    (model / "encoder").mkdir()  # an export kept inside, say
    (model / "encoder" / "config.json").write_text("{}")
    before = sorted(p.relative_to(model) for p in model.rglob("*"))
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(model), "--overwrite"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"output directory {model} holds the folder encoder, which is no part of what this command writes" in line
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == before
    shutil.rmtree(model / "encoder")  # a tool's own hidden folder is no user's (`hf download --local-dir` makes one)
    (model / ".cache" / "huggingface").mkdir(parents=True)
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(model), "--overwrite"]) == 0


def test_training_refuses_an_output_that_holds_the_teacher_its_model_records(capsys, tmp_path, sources):
    """PrefixLM distills from the source `encdec adapt` recorded, read from outside the checkpoint: `pretrain
    --overwrite` into the run that holds that source deleted it (after loading it)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("w1 w2 w3 w4 w5 w6 w7 w8 " * 40 + "\n") * 10)
    run = tmp_path / "run"
    shutil.copytree(sources["gemma3"], run / "model")  # as a decoder-only run's final model
    assert main(["adapt", "--encoder", str(run / "model"), "--out", str(tmp_path / "adapted")]) == 0
    capsys.readouterr()
    argv = ["pretrain", "--model", str(tmp_path / "adapted"), "--out", str(run), "--overwrite", "--data", str(corpus),
            "--steps", "1"]
    assert main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"holds the input {run / 'model'}" in line
    assert (run / "model" / "config.json").exists()


def test_the_working_directory_is_no_output(capsys, tmp_path, sources, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", ".."):
        assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", out, "--overwrite"]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert "is the current directory or one above it" in line
    assert list(tmp_path.iterdir()) == []
    # a working directory deleted meanwhile (a scratch folder cleaned up under a long run): every write failed with
    # "No such file or directory", the run at its next checkpoint
    gone = tmp_path / "scratch"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), OSError(30, "Read-only file system")])
def test_a_full_disk_or_a_read_only_place_is_one_line_and_leaves_nothing(capsys, tmp_path, sources, monkeypatch,
                                                                        failure):
    import encdec.checkpoint

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(encdec.checkpoint, "write_weights", fail)
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(tmp_path / "out")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"cannot write {tmp_path / 'out'}: {failure.strerror}" in line
    assert list(tmp_path.iterdir()) == []


def test_an_input_that_cannot_be_read_while_writing_is_named_not_the_output(capsys, tmp_path, sources, monkeypatch):
    """The tokenizer is read while the checkpoint is written: a file of it the user may not read was said as
    "cannot write OUT"."""
    import encdec.checkpoint

    unreadable = sources["gemma3"] / "tokenizer.json"

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(unreadable))

    monkeypatch.setattr(encdec.checkpoint, "write_weights", fail)
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(tmp_path / "out")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.endswith(f"error: {unreadable}: Permission denied (while writing {tmp_path / 'out'})"), line
    assert list(tmp_path.iterdir()) == []


def test_a_killed_or_failed_text_write_leaves_no_temporary(tmp_path):
    from encdec.files import atomic_write

    (tmp_path / "taken.md").mkdir()  # a directory where the file should go
    with pytest.raises(EncdecError, match="cannot write .*taken.md: Is a directory"):
        atomic_write(tmp_path / "taken.md", "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.md"]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.__setitem__("encoder", "x"), "is not a usable configuration (AttributeError"),
    (lambda c: c["decoder"].__setitem__("num_key_value_heads", 0), "num_kv_heads must be a positive integer, got 0"),
    (lambda c: c["decoder"].__setitem__("hidden_size", None), "must be a positive integer, got None"),
    (lambda c: [c.clear(), c.update({"format": "encdec"})], "lacks the field 'config'"),
    (lambda c: [c.clear(), c.update({"format": "encdec", "config": {"encoder": {}}})], "is not a usable configuration"),
    # an integer beyond a float's range passed the finite-number check and overflowed later, a traceback
    (lambda c: c["encoder"]["text_config"].__setitem__("query_pre_attn_scalar", 10**400), "query_pre_attn_scalar"),
], ids=["encoder-a-string", "no-kv-heads", "no-width", "no-config", "empty-stack", "scale-beyond-floats"])
def test_a_damaged_checkpoint_config_is_one_line(capsys, tmp_path, adapted, edit, message):
    model = tmp_path / "model"
    shutil.copytree(adapted, model)
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))
    assert main(["info", str(model)]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert str(model / "config.json") in line and message in line, line


@pytest.mark.parametrize("edit, message", [
    ({"num_key_value_heads": 0}, "num_kv_heads must be a positive integer, got 0"),
    ({"head_dim": None, "num_attention_heads": 0}, "is not a usable configuration"),
    ({"hidden_size": None}, "hidden_size must be a positive integer, got None"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps must be a positive number"),
    # dict.fromkeys of them raised TypeError (unhashable) as a traceback, merging generation_config.json's ids
    ({"eos_token_id": {"a": 1}}, "eos_token_id must be a token id or a list of them, not {'a': 1}"),
    ({"eos_token_id": [[1]]}, "eos_token_id must be a token id or a list of them, not [[1]]"),
    # integers beyond a float's range: OverflowError tracebacks
    ({"query_pre_attn_scalar": 10**400}, "query_pre_attn_scalar must be a positive number"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 10**400, "rope_type": "default"},
                          "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}},
     "is not a usable configuration (OverflowError"),
    # read as no setting (the default RoPE, or layer pattern), where transformers refuses them: adapted in silence
    ({"rope_parameters": [1, 2]}, "rope_parameters must be a mapping of settings or null, got [1, 2]"),
    ({"rope_scaling": "linear"}, "rope_scaling must be a mapping of settings or null, got 'linear'"),
    ({"rope_parameters": {"full_attention": "linear", "sliding_attention": {"rope_type": "default"}}},
     "full_attention must be a mapping of settings or null, got 'linear'"),
    ({"layer_types": []}, "layer_types has 0 entries for 4 layers"),
    ({"family": "llama", "rope_scaling": "linear"}, "rope_scaling must be a mapping of settings or null"),
    ({"family": "llama", "rope_scaling": None, "rope_parameters": ["linear"]}, "rope_parameters must be a mapping"),
    ({"family": "qwen3", "use_sliding_window": True, "sliding_window": 8, "layer_types": []},
     "layer_types has 0 entries"),
], ids=["no-kv-heads", "no-heads", "no-width", "eps-a-string", "eos-an-object", "eos-nested", "scale-beyond-floats",
        "rope-base-beyond-floats", "rope-a-list", "scaling-a-string", "rope-of-a-type-a-string", "no-layer-types",
        "llama-scaling-a-string", "llama-rope-a-list", "qwen-no-layer-types"])
def test_a_damaged_source_config_is_one_line(capsys, tmp_path, sources, edit, message):
    source = tmp_path / "source"
    edit = dict(edit)
    shutil.copytree(sources[edit.pop("family", "gemma3")], source)
    config = json.loads((source / "config.json").read_text())
    config.update(edit)
    (source / "config.json").write_text(json.dumps(config))
    line = _run_adapt(capsys, tmp_path, "--encoder", str(source))
    assert str(source / "config.json") in line and message in line, line


def test_evaluation_output_names_are_checked_before_any_work(capsys, tmp_path, adapted, monkeypatch):
    from encdec.evaluation.harness import output_files

    monkeypatch.setattr("encdec.evaluation.harness.load_scorer", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "taken.md").mkdir()
    (tmp_path / "evd").mkdir()  # an existing folder: the results were written beside it, as evd.md and evd.json
    (tmp_path / "file").write_text("x")
    for out, message in ((".", "names a directory"), (str(tmp_path / "taken"), "taken.md is a directory"),
                         (str(tmp_path / "evd") + "/",
                          (f"names a directory (it ends with /); give a file or file prefix in it, such as "
                           f"{tmp_path}/evd/results")),
                         # a folder still to be made: the results went beside it, as new.md and new.json
                         (str(tmp_path / "new") + "/", "names a directory (it ends with /)"),
                         # found at the first write, after every task was scored (its results lost)
                         (str(tmp_path / ("r" * 245)), "its name is too long for the temporary written beside it"),
                         (str(tmp_path / "file" / "results"), f"{tmp_path}/file exists and is not a directory")):
        try:
            code = main(["evaluate", str(adapted), "--tasks", "heldout", "--out", out])
        except SystemExit as refused:  # (argparse's refusal of the option's form)
            code = refused.code
        assert code == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evd", "file", "taken.md"]
    # a dot inside the name is kept (model-v1.5 and model-v1.6 do not both write model-v1.md); .md / .json are read as
    # the prefix's own
    assert output_files(tmp_path / "model-v1.5") == (tmp_path / "model-v1.5.md", tmp_path / "model-v1.5.json")
    assert output_files(tmp_path / "results.md") == (tmp_path / "results.md", tmp_path / "results.json")


def test_evaluation_results_are_written_through_links_which_stay(tmp_path):
    """OUT.md and OUT.json that are links were replaced by plain files, their targets left with the old results
    (the README: an --out that is a link is written where it leads, the link stays; `generate --out` did so)."""
    from encdec.evaluation import harness

    (tmp_path / "keep").mkdir()
    harness.write({"models": [{"name": "old"}], "tasks": {}}, tmp_path / "keep" / "t")  # earlier results
    old = {suffix: (tmp_path / "keep" / f"t.{suffix}").read_text() for suffix in ("md", "json")}
    for suffix in ("md", "json"):
        (tmp_path / f"res.{suffix}").symlink_to(tmp_path / "keep" / f"t.{suffix}")
    written = harness.write({"models": [{"name": "m"}], "tasks": {}}, tmp_path / "res")
    assert written == (tmp_path / "keep" / "t.md", tmp_path / "keep" / "t.json")
    assert all((tmp_path / f"res.{suffix}").is_symlink() for suffix in ("md", "json"))
    assert all((tmp_path / f"res.{suffix}").read_text() != old[suffix] for suffix in ("md", "json"))
    assert '"name": "m"' in (tmp_path / "res.json").read_text()


@pytest.mark.parametrize("extra, message", [(["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                                            (["--steps", "-1"], "--steps must be at least 0"),
                                            (["--trim-vocab", "-5"], "--trim-vocab must be at least 0"),
                                            (["--prompt", "caf\udce9"], "--prompt: not UTF-8 text")])
def test_quickstart_checks_its_options_before_loading_anything(capsys, tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr("encdec.quickstart.load_source", lambda *a, **k: pytest.fail("the source was read"))
    assert main(["quickstart", "--out", str(tmp_path / "qs"), *extra]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert message in line
    assert not (tmp_path / "qs").exists()


def test_quickstart_says_a_trim_vocab_its_zero_steps_never_use(capsys, tmp_path, monkeypatch):
    """--trim-vocab trims the adaptation steps' vocabulary: with --steps 0 it was ignored without a word."""
    import encdec.quickstart

    given = []
    monkeypatch.setattr(encdec.quickstart, "run", lambda out, **settings: given.append(settings["trim_vocab"]))
    for extra in (["--steps", "0", "--trim-vocab", "100"], ["--steps", "0"], ["--trim-vocab", "100"], []):
        assert main(["quickstart", "--out", str(tmp_path / "qs"), *extra]) == 0
        said = capsys.readouterr().err
        assert ("--trim-vocab is ignored" in said) == (extra[:2] == ["--steps", "0"] and "--trim-vocab" in extra)
    assert given == [100, 8192, 100, 8192]


def test_quickstarts_default_out_is_followed_through_a_link_as_a_given_one(capsys, tmp_path, monkeypatch):
    """runs/quickstart a link (to a larger disk): given as --out it was written through, and by default refused as
    a link (argparse applies an option's type to a default given as text only)."""
    def reached(*args, **kwargs):
        raise EncdecError("past the checks of --out")

    monkeypatch.setattr("encdec.quickstart.load_source", reached)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    for given in ([], ["--out", "runs/quickstart"]):  # past the --out checks, to the source's loading, alike
        assert main(["quickstart", *given, "--overwrite"]) == 2  # (its place exists, empty)
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert "past the checks of --out" in line, line


def test_ctranslate2_export_of_damaged_weights_is_one_line(capsys, tmp_path, adapted):
    model = tmp_path / "model"
    shutil.copytree(adapted, model)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:100])
    assert main(["export", str(model), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "not a readable safetensors file" in line and str(model / "model.safetensors") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("cross_first", [False, True], ids=["merged-then-cross", "cross-then-merged"])
def test_resuming_with_another_model_is_one_line(capsys, tmp_path, sources, adapted, cross_first):
    """Either model has parameters the other lacks (cross-attention): weights or optimizer state that do not fit."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("w1 w2 w3 w4 w5 w6 w7 w8 " * 40 + "\n") * 10)
    run = tmp_path / "run"
    common = ["--data", str(corpus), "--steps", "2", "--save-every", "1", "--eval-every", "0", "--enc-len", "16",
              "--dec-len", "16", "--batch-size", "2"]
    other = tmp_path / "other"  # another shape: the merged-attention model against the cross-attention one
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--attention", "cross", "--out", str(other)]) == 0
    first, then = (other, adapted) if cross_first else (adapted, other)
    assert main(["pretrain", "--model", str(first), "--out", str(run), *common]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--model", str(then), "--out", str(run), "--resume", *common[:2], "--steps", "3",
                 *common[4:]]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "was saved by a run of another model" in line and "--overwrite" in line


def test_resuming_with_another_trimmed_vocabulary_is_one_line_naming_it(capsys, tmp_path, adapted):
    """The vocabulary is checked before the checkpoint is applied: its embedding rows no longer fitted, and the
    line said the run was of another model."""
    corpus = write_corpus(tmp_path / "corpus.txt")  # more tokens than either vocabulary keeps
    common = ["--model", str(adapted), "--out", str(tmp_path / "run"), "--data", str(corpus), "--save-every", "1",
              "--eval-every", "0", "--enc-len", "16", "--dec-len", "16", "--batch-size", "2", "--trim-negatives", "4"]
    assert main(["pretrain", *common, "--steps", "2", "--trim-vocab", "40"]) == 0
    capsys.readouterr()
    for other in (["--trim-vocab", "30"], []):
        assert main(["pretrain", *common, "--steps", "3", "--resume", *other]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert "step-000002 was trained on another vocabulary (different data or --trim-vocab)" in line, line


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_a_layer_type_encdec_does_not_know_is_named(capsys, tmp_path, sources, family):
    """A later family's kind of layer (chunked attention) was said as a missing field of that name."""
    source = tmp_path / "source"
    shutil.copytree(sources[family], source)
    config = json.loads((source / "config.json").read_text())
    config["layer_types"][1] = "chunked_attention"
    (source / "config.json").write_text(json.dumps(config))
    line = _run_adapt(capsys, tmp_path, "--encoder", str(source))
    assert f"{source / 'config.json'}: layer_types holds 'chunked_attention'; accepted: sliding_attention, " \
           "full_attention" in line, line


def test_eval_data_shorter_than_a_window_is_named(capsys, tmp_path, adapted):
    """Said of --eval-data, not of "the data" (the training data, which was long enough)."""
    (tmp_path / "short.txt").write_text("w1 w2 w3\n")
    assert main(["pretrain", "--model", str(adapted), "--out", str(tmp_path / "run"), "--data",
                 str(write_corpus(tmp_path / "corpus.txt")), "--eval-data", str(tmp_path / "short.txt"),
                 "--enc-len", "16", "--dec-len", "16", "--steps", "1"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "--eval-data has 5 tokens, fewer than one window of 30" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("eval_file", ["short.txt", "fields.jsonl"])
def test_eval_data_is_refused_before_the_training_data_is_tokenized(capsys, tmp_path, adapted, eval_file):
    """--eval-data that cannot make a window, or a file of it that reading would refuse, fails before the
    training corpus (hours of tokenizing on a large one) is tokenized, not after."""
    (tmp_path / "short.txt").write_text("w1 w2 w3\n")
    (tmp_path / "fields.jsonl").write_text('{"body": "no text field"}\n')
    corpus = write_corpus(tmp_path / "corpus.txt", seed=len(str(tmp_path)))  # not tokenized (cached) before
    with corpus.open("a") as f:
        f.write(f"\n{tmp_path.name}\n")
    assert main(["pretrain", "--model", str(adapted), "--out", str(tmp_path / "run"), "--data", str(corpus),
                 "--eval-data", str(tmp_path / eval_file), "--enc-len", "16", "--dec-len", "16", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--eval-data has 5 tokens" in err or "no field 'text'" in err, err
    assert f"tokenizing {corpus}" not in err, err


def test_a_failed_load_names_what_did_not_fit():
    """torch's first line names only the module; the line that says what did not fit is the one kept."""
    from encdec.errors import load_failure

    wrong = {"weight": torch.zeros(4, 2), "bias": torch.zeros(3), "x": torch.zeros(1)}
    with pytest.raises(RuntimeError) as caught:
        torch.nn.Linear(2, 3).load_state_dict(wrong)
    said = load_failure(caught.value)
    assert said.startswith("size mismatch for weight: copying a param with shape torch.Size([4, 2])"), said
    with pytest.raises(RuntimeError) as caught:
        torch.nn.Linear(2, 3).load_state_dict({"weight": torch.zeros(3, 2)})
    assert load_failure(caught.value) == 'Missing key(s) in state_dict: "bias".'
    assert load_failure(KeyError("no weight for 'x'")) == "\"no weight for 'x'\""


@pytest.mark.parametrize("argv, message", [
    (["classify", "--predict", "{dir}", "--task", "cb", "--text", "w1"], "drop --task"),
    (["classify", "{dir}", "--task", "cb", "--out", "{dir}/out", "--text", "w1"], "pass --predict too"),
    (["classify", "--predict", "{dir}", "--lr", "3e-5", "--text", "w1"], "--lr: options of training a classifier"),
    (["classify", "--predict", "{dir}", "--epochs", "2", "--probe", "--text", "w1"],
     "--epochs, --probe: options of training"),
])
def test_classify_flags_that_would_be_ignored_are_refused(capsys, tmp_path, argv, message):
    assert main([part.format(dir=tmp_path) for part in argv]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert message in line


def test_quickstart_refuses_a_trimmed_vocabulary_too_small_before_adapting(capsys, tmp_path, sources, monkeypatch):
    """--trim-vocab below the special tokens' count was refused by the training run, after minutes of loading,
    adapting and evaluating, with the adapted model already written (the tiny Gemma 3 stands in for the 270M)."""
    import encdec.quickstart

    monkeypatch.setattr(encdec.quickstart, "SOURCE", str(sources["gemma3"]))
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "1", "--trim-vocab", "2"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "--trim-vocab 2 is smaller than the" in line
    assert not (tmp_path / "qs").exists()


def test_a_quickstart_stopped_while_training_says_how_to_run_it_again(capsys, tmp_path, sources, monkeypatch):
    """Its training run said "continue with --resume", an option encdec quickstart does not have."""
    import encdec.quickstart
    from test_training import _sigterm_during

    monkeypatch.setattr(encdec.quickstart, "SOURCE", str(sources["gemma3"]))
    with _sigterm_during(2, monkeypatch):
        assert main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "3", "--trim-vocab", "0",
                     "--max-new-tokens", "2"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped at step 2; `encdec quickstart --overwrite` runs the whole job again" in err, err
    assert "--resume" not in err
    # nor a checkpoint of the stop (1.3-3.2 GB for the 270M) that nothing would read: --overwrite deletes it
    assert not list((tmp_path / "qs" / "pretrain").glob("checkpoints/step-*"))


def test_quickstart_overwrite_without_training_leaves_no_earlier_training(capsys, tmp_path, sources, monkeypatch):
    """--overwrite replaces the directory: with --steps 0 an earlier run's pretrain/ would sit beside the new
    adapted model as if it came from it (the tiny Gemma 3 stands in for the packaged 270M)."""
    import encdec.quickstart

    monkeypatch.setattr(encdec.quickstart, "SOURCE", str(sources["gemma3"]))
    out = tmp_path / "qs"
    (out / "pretrain" / "checkpoints").mkdir(parents=True)
    (out / "pretrain" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", "0", "--max-new-tokens", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapted"]
    # a run's outputs go, nothing else: a file of the user's stays (it was deleted), and a link to a folder
    # elsewhere goes alone (the folder was emptied, then rmdir raised a traceback)
    (out / "pretrain" / "checkpoints").mkdir(parents=True)
    (out / "pretrain" / "notes.txt").write_text("mine")
    assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", "0", "--max-new-tokens", "2"]) == 0
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == ["notes.txt"]
    shutil.rmtree(out / "pretrain")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    (out / "pretrain").symlink_to(tmp_path / "data")
    assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", "0", "--max-new-tokens", "2"]) == 0
    assert not (out / "pretrain").exists() and (tmp_path / "data" / "keep.txt").read_text() == "mine"
    # another folder of a run's name is refused before anything is loaded, as training's --overwrite refuses it
    (out / "pretrain" / "model").mkdir(parents=True)
    (out / "pretrain" / "model" / "photo.jpg").write_text("mine")
    capsys.readouterr()
    assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", "0", "--max-new-tokens", "2"]) == 2
    assert "is not what a run writes there" in capsys.readouterr().err
    assert (out / "pretrain" / "model" / "photo.jpg").exists()


def _another_models_run_in_runs_pretrain(tmp_path, sources, monkeypatch) -> tuple[Path, Path]:
    """TMP/runs/pretrain: a one-step `encdec pretrain` run of TMP/other (where `encdec pretrain` writes by default),
    with the quickstart's source the tiny Gemma 3. Returns (TMP/runs, TMP/other)."""
    import encdec.quickstart

    monkeypatch.setattr(encdec.quickstart, "SOURCE", str(sources["gemma3"]))
    out, other = tmp_path / "runs", tmp_path / "other"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("w1 w2 w3 w4 w5 w6 w7 w8\n\n" * 40)
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(other)]) == 0
    assert main(["pretrain", "--model", str(other), "--out", str(out / "pretrain"), "--data", str(corpus), "--steps",
                 "1", "--enc-len", "8", "--dec-len", "8", "--batch-size", "2", "--eval-windows", "1"]) == 0
    return out, other


def _quickstart_overwrite_refused(out: Path, other: Path, capsys) -> None:
    """`encdec quickstart --out OUT --overwrite`, with and without training, refuses OUT/pretrain's run of `other`
    in one line and leaves OUT as it was."""
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    for steps in ("0", "1"):
        assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", steps, "--max-new-tokens", "2"]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert f"holds a training run of {other}" in line and "choose another --out" in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_quickstart_overwrite_leaves_a_run_of_another_model_alone(capsys, tmp_path, sources, monkeypatch):
    """`encdec pretrain` writes to runs/pretrain by default: `encdec quickstart --out runs --overwrite` took it for
    the quickstart's own run and deleted it (with --steps 0; with training, its checkpoints and model)."""
    out, other = _another_models_run_in_runs_pretrain(tmp_path, sources, monkeypatch)
    _quickstart_overwrite_refused(out, other, capsys)
    # the same run reached through a link in OUT/pretrain: training followed the link and deleted the run's
    # checkpoints and model there (with --steps 0 the link alone goes, which leaves the run as it is)
    (out / "pretrain").rename(tmp_path / "kept")
    (out / "pretrain").symlink_to(tmp_path / "kept")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "kept").rglob("*"))
    assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", "1", "--max-new-tokens", "2"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"holds a training run of {other}" in line and "choose another --out" in line
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "kept").rglob("*")) == before


def test_quickstart_overwrite_replaces_its_own_run_recorded_from_another_directory(capsys, tmp_path, sources,
                                                                                  monkeypatch):
    """A run records its --model as typed: a relative OUT/adapted, resolved from another working directory, was
    taken for another model and the quickstart's own run refused."""
    import encdec.quickstart

    monkeypatch.setattr(encdec.quickstart, "SOURCE", str(sources["gemma3"]))
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("w1 w2 w3 w4 w5 w6 w7 w8\n\n" * 40)
    assert main(["quickstart", "--out", "qs", "--steps", "0", "--max-new-tokens", "2"]) == 0
    assert main(["pretrain", "--model", "qs/adapted", "--out", "qs/pretrain", "--data", str(corpus), "--steps", "1",
                 "--enc-len", "8", "--dec-len", "8", "--batch-size", "2", "--eval-windows", "1"]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--overwrite", "--steps", "0", "--max-new-tokens",
                 "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "qs").iterdir()) == ["adapted"]


def test_quickstart_overwrite_without_training_leaves_a_live_run_alone(capsys, tmp_path, sources, monkeypatch):
    """...but not while a quickstart still trains there: its run directory is locked."""
    import fcntl

    import encdec.quickstart

    monkeypatch.setattr(encdec.quickstart, "SOURCE", str(sources["gemma3"]))
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--steps", "1", "--max-new-tokens", "2", "--trim-vocab", "0"]) == 0
    assert "(64 + 64) tokens at lr 3e-05, the whole vocabulary" in capsys.readouterr().out  # it said "trimmed to 0"
    adapted = (out / "adapted" / "model.safetensors").stat()
    for steps in ("0", "1"):  # nor its start model, adapted/, replaced under it (found only when it came to train)
        with (out / "pretrain" / ".encdec.lock").open("a") as held:  # as the training process holds it
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", steps, "--max-new-tokens",
                         "2"]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert f"{out / 'pretrain'} is being written by" in line
        assert (out / "pretrain" / "model" / "config.json").exists() and (out / "pretrain" / "checkpoints").is_dir()
        now = (out / "adapted" / "model.safetensors").stat()
        assert (now.st_ino, now.st_mtime_ns) == (adapted.st_ino, adapted.st_mtime_ns)


def test_a_second_quickstart_into_the_same_out_is_refused_before_any_work(capsys, tmp_path, sources, monkeypatch):
    """Only training locked its directory: a second quickstart started a minute after the first loaded, adapted
    and wrote OUT/adapted under it, and was refused when it came to train, minutes later. A lock file a killed
    quickstart left behind is taken over (the kernel freed its lock), and OUT keeps nothing of it."""
    import encdec.quickstart
    from encdec.training import distributed, rundir

    def loading(*args, **kwargs):
        raise AssertionError("the source was loaded")

    out = tmp_path / "qs"
    with rundir.locked(out, distributed.Dist(), lock=encdec.quickstart.LOCK):  # as a running quickstart holds it
        monkeypatch.setattr(encdec.quickstart, "load_source", loading)
        assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", "0", "--max-new-tokens", "2"]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert f"{out} is being written by process {os.getpid()}" in line, line
        monkeypatch.undo()
    assert not out.exists()  # the holder made OUT and wrote nothing there
    out.mkdir()
    (out / encdec.quickstart.LOCK).write_text('{"pid": 999999999, "host": "gone", "since": "then"}')
    monkeypatch.setattr(encdec.quickstart, "SOURCE", str(sources["gemma3"]))
    assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", "0", "--max-new-tokens", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapted"]


def test_limits_said_before_a_model_loads(capsys, tmp_path, adapted, monkeypatch):
    """A batch or a budget past any sense was taken as given: `serve --max-batch 10^30` loaded the model and failed
    in the engine's first buffer, `quickstart --max-new-tokens 10^14` loaded, adapted and saved 1.5 GB first."""
    def loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    # the names each command loads through (bound where they are used)
    monkeypatch.setattr("encdec.inference.loading.load_for_inference", loading)
    monkeypatch.setattr("encdec.quickstart.load_source", loading)
    for argv, message in ((["serve", str(adapted), "--max-batch", str(10**30)], "--max-batch must be at most 4096"),
                          (["quickstart", "--out", str(tmp_path / "qs"), "--max-new-tokens", str(10**14)],
                           "--max-new-tokens must be at most 4096")):
        capsys.readouterr()
        assert main_exit(argv) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert message in line
    assert not (tmp_path / "qs").exists()


def test_a_path_no_file_can_have_is_one_line(capsys, tmp_path, adapted):
    """A name past the file system's limit (ENAMETOOLONG) as an input: a traceback, wherever it was read."""
    long = tmp_path / ("x" * 300)
    for argv in (["info", str(long)], ["generate", str(adapted), "--input", f"{long}.jsonl"],
                 ["pretrain", "--model", str(adapted), "--data", f"{long}.txt", "--out", str(tmp_path / "run")]):
        capsys.readouterr()
        assert main_exit(argv) == 2, argv
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert "File name too long" in line, line
    for argv in (["adapt", "--out", str(long)], ["quickstart", "--out", str(long)]):  # an output: read by argparse
        assert main_exit(argv) == 2, argv
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert f"--out: {long}: File name too long" in line, line


def test_a_grid_value_that_is_a_nest_of_aliases_is_refused_at_once(tmp_path):
    """YAML aliases make a list of 10^9 items out of 500 bytes: the refusal built its whole repr (for ever) before
    cutting it to 40 characters. Here 10^6 items, named by their type."""
    from encdec.classification.grid import read_grid

    levels = ["&a0 [" + ", ".join(["x"] * 10) + "]"] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]"
                                                          for i in range(1, 6)]
    (tmp_path / "grid.yaml").write_text(f"epochs: [[{', '.join(levels)}]]\n")
    with pytest.raises(EncdecError, match="epochs value of type list is not an integer"):
        read_grid(tmp_path / "grid.yaml", {})


def test_a_path_through_a_folder_this_user_cannot_enter_is_one_line(capsys, tmp_path, adapted, monkeypatch):
    """Another user's model under a home of mode 700: pathlib's checks raised PermissionError tracebacks (root, which
    runs the tests, enters every folder: the kernel's answer is given here as it would be)."""
    import pathlib

    locked, stat = tmp_path / "locked", pathlib.Path.stat

    def denied(path, *args, **kwargs):
        if str(path).startswith(f"{locked}/"):
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", denied)
    for argv in (["info", f"{locked}/m"], ["generate", f"{locked}/m", "--prompt", "w1"],
                 ["generate", str(adapted), "--input", f"{locked}/p.jsonl"]):
        capsys.readouterr()
        assert main_exit(argv) == 2, argv
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert f"cannot reach {locked}/" in line and "Permission denied" in line, line


def test_file_names_of_any_bytes_key_the_caches(tmp_path):
    """A file name that is not UTF-8 (Latin-1 é) failed to encode in the token cache's key and the GGUF cache's."""
    import os

    from encdec.data.tokens import source_fingerprint
    from encdec.sources import gguf_cache_dir

    name = os.fsdecode(b"caf\xe9")
    (tmp_path / f"{name}.txt").write_text("w1 w2 w3\n")
    (tmp_path / f"{name}.gguf").write_bytes(b"GGUF")
    assert source_fingerprint([str(tmp_path / f"{name}.txt")], "text") != source_fingerprint(
        [str(tmp_path / "other.txt")] if (tmp_path / "other.txt").write_text("w1\n") else [], "text")
    assert gguf_cache_dir(tmp_path / f"{name}.gguf").name.startswith(name)


def test_configuration_errors_said_before_training_and_short(capsys, tmp_path, adapted, monkeypatch):
    """A misspelt packaged text was said once the model had loaded and the data been tokenized; and a few lines of
    YAML aliases (9^9 items) made the one-line error a repr of all of them (minutes, gigabytes)."""
    import encdec.training.loop

    monkeypatch.setattr(encdec.training.loop, "train", lambda cfg: pytest.fail("training began"))
    (tmp_path / "bomb.yaml").write_text("lr:\n  - &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)))
    for extra, message in ((["--eval-data", "heldout:typo"], "heldout:typo: unknown packaged text; known: heldout:"),
                           (["--data", "corpus:typo"], "corpus:typo: unknown packaged text; known: corpus:"),
                           (["--config", str(tmp_path / "bomb.yaml")], "--lr must be a number, got [[")):
        capsys.readouterr()
        assert main_exit(["pretrain", "--model", str(adapted), "--out", str(tmp_path / "run"), *extra]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert message in line and len(line) < 300, line[:300]


def test_quickstart_overwrite_leaves_a_kept_final_model_of_another_run_alone(capsys, tmp_path, sources, monkeypatch):
    """A run whose checkpoints were deleted to save space keeps its final model, which records what it trained: the
    check read checkpoints only, and --overwrite deleted that model (with --steps 0, the whole run directory). A
    final model that records no origin is refused too; and OUT/adapted holding another folder is refused before
    the source is loaded."""
    out, other = _another_models_run_in_runs_pretrain(tmp_path, sources, monkeypatch)
    shutil.rmtree(out / "pretrain" / "checkpoints")
    _quickstart_overwrite_refused(out, other, capsys)
    (out / "pretrain" / "model" / "encdec.json").unlink()
    assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", "0", "--max-new-tokens", "2"]) == 2
    assert "a model no run saved: its encdec.json records no training" in capsys.readouterr().err
    shutil.rmtree(out / "pretrain")
    (out / "adapted").mkdir()
    (out / "adapted" / "notes.txt").write_text("mine")
    monkeypatch.setattr("encdec.quickstart.load_source", lambda *a, **k: pytest.fail("the source was read"))
    assert main(["quickstart", "--out", str(out), "--overwrite", "--steps", "0", "--max-new-tokens", "2"]) == 2
    assert "holds notes.txt but none of what this command writes there" in capsys.readouterr().err


def test_classify_overwrite_replaces_its_own_output_only(capsys, tmp_path, adapted, monkeypatch):
    """Any folder holding a results.json (another tool's, beside the user's notes) was replaced by --overwrite."""
    import json

    out = tmp_path / "experiment"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"accuracy": 0.9}))
    (out / "notes.md").write_text("mine")
    monkeypatch.setattr("encdec.classification.run.load_task", lambda *a: pytest.fail("the task was read"))
    assert main(["classify", str(adapted), "--task", "rte", "--probe", "--out", str(out), "--overwrite"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"output directory {out} is not an encdec classify output" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "results.json"]
    (out / "results.json").write_text(json.dumps({"task": "rte", "method": "probe", "predictions": []}))
    with pytest.raises(pytest.fail.Exception, match="the task was read"):  # its own: replaced (past the check)
        main(["classify", str(adapted), "--task", "rte", "--probe", "--out", str(out), "--overwrite"])


@pytest.mark.parametrize("command", ["adapt", "export"])
def test_an_output_folder_this_user_cannot_write_is_said_before_any_work(capsys, tmp_path, sources, adapted,
                                                                        monkeypatch, command):
    """A --out in a folder this user may not write into (another user's, a read-only mount) was found by the
    write at the end: after a 9B source had been loaded and adapted."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access
    # (root may write anywhere: the folder is refused as the system would refuse it to another user)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    monkeypatch.setattr(sys.modules["encdec.adapt"], "adapt", lambda *a, **k: pytest.fail("the sources were adapted"))
    try:
        argv = (["adapt", "--encoder", str(sources["gemma3"])] if command == "adapt"
                else ["export", str(adapted), "--to", "ctranslate2"])
        assert main([*argv, "--out", str(locked / "new" / "out")]) == 2
        assert f"cannot write {locked / 'new' / 'out'}: {locked} is not writable" in capsys.readouterr().err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_a_quickstart_writes_into_its_out_and_needs_no_more_than_that_writable(capsys, tmp_path, monkeypatch):
    """The quickstart writes inside OUT (its lock, adapted/, pretrain/): an OUT of one's own in a folder one may not
    write into was refused, as an output that replaces itself beside it would be."""
    def reached(*args, **kwargs):
        raise EncdecError("past the checks of --out")

    monkeypatch.setattr("encdec.quickstart.load_source", reached)
    shared = tmp_path / "shared"
    (shared / "mine").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != shared and real_access(path, mode, **kw))
    assert main(["quickstart", "--out", str(shared / "mine"), "--overwrite"]) == 2
    assert "past the checks of --out" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(shared / "new")]) == 2  # made beside the others: not writable there
    assert f"{shared} is not writable" in capsys.readouterr().err
