"""Bad sources and bad adaptation requests: one clear line, exit status 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from encdec.cli import main


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


def test_llama_checkpoint_directory(capsys, tmp_path):
    src = _hf_dir(tmp_path / "llama", {"model_type": "llama", "hidden_size": 32})
    line = _run_adapt(capsys, tmp_path, "--encoder", str(src))
    assert "holds a llama model; supported: Gemma 2 and Gemma 3" in line


def test_vision_only_config(capsys, tmp_path):
    src = _hf_dir(tmp_path / "siglip", {"model_type": "siglip_vision_model", "hidden_size": 32})
    assert "siglip_vision_model model; supported" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_gemma3_multimodal_without_text_model(capsys, tmp_path):
    src = _hf_dir(tmp_path / "mm", {"model_type": "gemma3", "vision_config": {}})
    assert "without a text model" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_missing_source(capsys, tmp_path):
    line = _run_adapt(capsys, tmp_path, "--encoder", str(tmp_path / "nowhere"))
    assert "no such file or directory" in line and "GGUF file" in line


def test_corrupt_config_json(capsys, tmp_path, sources):
    src = tmp_path / "broken"
    shutil.copytree(sources["gemma3"], src)
    (src / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_truncated_safetensors(capsys, tmp_path, sources):
    src = tmp_path / "truncated"
    shutil.copytree(sources["gemma3"], src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert "truncated or corrupt" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_missing_weights(capsys, tmp_path, sources):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "partial"
    shutil.copytree(sources["gemma3"], src)
    weights = load_file(str(src / "model.safetensors"))
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, str(src / "model.safetensors"))
    assert "lacks 1 weight(s) such as model.layers.1.mlp.up_proj.weight" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_llama_gguf(capsys, tmp_path):
    src = _gguf(tmp_path / "llama.gguf", "llama")
    assert "holds a llama model; supported" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_truncated_gguf(capsys, tmp_path):
    src = _gguf(tmp_path / "gemma.gguf", "gemma3", truncate=100)
    assert "truncated" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_not_a_gguf(capsys, tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"PK\x03\x04 definitely a zip")
    assert "not a GGUF file" in _run_adapt(capsys, tmp_path, "--encoder", str(src))


def test_different_families(capsys, tmp_path, sources):
    line = _run_adapt(capsys, tmp_path, "--encoder", str(sources["gemma3"]), "--decoder", str(sources["gemma2"]))
    assert "encoder is gemma3 but decoder is gemma2" in line


def test_different_vocabularies(capsys, tmp_path):
    from tiny import make_source

    a = make_source(tmp_path / "a", "gemma2")
    b = make_source(tmp_path / "b", "gemma2", hidden=24)
    cfg = json.loads((b / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(str(b / "model.safetensors"))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:80].clone()
    cfg["vocab_size"] = 80
    save_file(weights, str(b / "model.safetensors"))
    (b / "config.json").write_text(json.dumps(cfg))
    assert "must share one vocabulary" in _run_adapt(capsys, tmp_path, "--encoder", str(a), "--decoder", str(b))


def test_merged_attention_with_another_decoder(capsys, tmp_path, sources):
    line = _run_adapt(capsys, tmp_path, "--encoder", str(sources["gemma3"]), "--decoder", str(sources["gemma3-small"]),
                      "--attention", "merged")
    assert "use --attention cross" in line


@pytest.mark.parametrize("layers, message", [("0,9", "out of range"), ("3,1", "distinct and increasing"),
                                             ("a,b", "expected a comma list"), ("5:", "selects no layer")])
def test_bad_decoder_layers(capsys, tmp_path, sources, layers, message):
    assert message in _run_adapt(capsys, tmp_path, "--encoder", str(sources["gemma3"]), "--decoder-layers", layers)


def test_existing_output_directory(capsys, tmp_path, sources):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    code = main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "already exists; pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
