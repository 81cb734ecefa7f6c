"""Files a user is handed never run code or reach outside their directory: run directories, tokenizers,
transformers configurations, weight indexes, token caches, YAML configurations, links in a run directory."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from test_training import _config
from tiny import make_source, make_tokenizer, write_gguf

from encdec.cli import main
from encdec.data.tokens import token_stream
from encdec.errors import EncdecError
from encdec.logs import setup
from encdec.training import checkpointing, loop
from encdec.training.optim import warmup_then_decay
from encdec.training.plain_state import read_state, write_state


class Payload:
    """Unpickling it creates `marker`: what a crafted optimizer.pt does to whoever loads it with pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def run(adapted, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    loop.train(_config(adapted, out, corpus, steps=2, save_every=1, eval_every=0))
    return out


def test_training_state_round_trips_exactly(tmp_path):
    state = {"t": torch.arange(3.0), "rng": np.random.get_state(), "tuple": (1, 2.5, None), 3: {"$tuple": "x"},
             "nested": [{"a": torch.tensor(7, dtype=torch.int64)}], "keep": np.arange(4, dtype=np.int64), "nan": 1e308}
    write_state(tmp_path, "s", state)
    back = read_state(tmp_path, "s")
    assert back.keys() == state.keys() and back[3] == {"$tuple": "x"} and back["tuple"] == (1, 2.5, None)
    assert torch.equal(back["t"], state["t"]) and back["nested"][0]["a"].dtype == torch.int64
    assert back["rng"][0] == "MT19937" and np.array_equal(back["rng"][1], state["rng"][1])
    assert back["rng"][1].dtype == np.uint32 and np.array_equal(back["keep"], state["keep"])



@pytest.mark.parametrize("depth,error", [(100_000, "s.json is unreadable.*nested too deeply"),  # past the parser
                                         (200, "s.json does not match.*nested deeper than 64")])  # past the decoder's
def test_a_training_state_nested_too_deeply_is_one_error_not_a_recursion_crash(tmp_path, depth, error):
    write_state(tmp_path, "s", {"x": 1})
    text = (tmp_path / "s.json").read_text()
    (tmp_path / "s.json").write_text(text.replace('{"x": 1}', "[" * depth + "]" * depth, 1))
    with pytest.raises(EncdecError, match=error):
        read_state(tmp_path, "s")


def test_a_pickle_payload_in_a_run_directory_never_runs(run, adapted, corpus, tmp_path, capsys):
    handed = tmp_path / "handed"
    shutil.copytree(run, handed)
    marker = tmp_path / "pwned"
    for checkpoint in checkpointing.checkpoints(handed):  # the old format, crafted: optimizer.pt runs code
        for name in ("optimizer.json", "optimizer.safetensors"):
            (checkpoint / name).unlink()
        torch.save({"state": Payload(str(marker))}, checkpoint / "optimizer.pt")
    pickle.loads(pickle.dumps(Payload(str(tmp_path / "proof"))))  # the payload works when unpickled
    assert (tmp_path / "proof").exists()
    args = ["pretrain", "--model", str(adapted), "--data", str(corpus), "--out", str(handed), "--resume", "--steps", "3",
            "--enc-len", "16", "--dec-len", "16", "--eval-windows", "4", "--precision", "fp32"]
    assert main(args) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "none of the 2 checkpoint(s)" in lines[0], lines
    assert not marker.exists()


def test_an_old_format_checkpoint_is_refused_with_one_line(run, tmp_path):
    old = tmp_path / "step-000001"
    shutil.copytree(checkpointing.checkpoints(run)[0], old)
    (old / "trainer.pt").write_bytes(b"")
    with pytest.raises(EncdecError, match="old pickle format.*unpickling can run code"):
        checkpointing.read(old)


def _with_auto_map(directory, marker, config_name: str) -> None:
    """Point `auto_map` at a Python file shipped in the directory that creates `marker` when imported."""
    (directory / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                         "from transformers import PreTrainedTokenizerFast as CustomTokenizer\n"
                                         "from transformers import Gemma3ForCausalLM as CustomModel\n")
    file = directory / config_name
    config = json.loads(file.read_text())
    config["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", "custom.CustomTokenizer"],
                          "AutoModelForCausalLM": "custom.CustomModel"}
    if config_name == "tokenizer_config.json":
        config["tokenizer_class"] = "CustomTokenizer"
    file.write_text(json.dumps(config))


def test_a_tokenizer_asking_for_custom_code_is_refused_without_a_prompt(adapted, tmp_path):
    handed = tmp_path / "handed"
    shutil.copytree(adapted, handed)
    marker = tmp_path / "pwned"
    _with_auto_map(handed, marker, "tokenizer_config.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "encdec.cli", "generate", str(handed), "--prompt", "w1 w2"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert "[y/N]" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "auto_map" in errors[0] and "never" in errors[0], result.stderr
    assert not marker.exists()


def test_a_decoder_only_source_asking_for_custom_code_is_refused(sources, tmp_path):
    from encdec.evaluation.scoring import load_scorer

    handed = tmp_path / "handed"
    shutil.copytree(sources["gemma3"], handed)
    _with_auto_map(handed, tmp_path / "pwned", "config.json")
    with pytest.raises(EncdecError, match="config.json has an auto_map entry"):
        load_scorer(str(handed))
    assert not (tmp_path / "pwned").exists()


def test_a_weight_index_naming_a_file_outside_the_checkpoint_is_refused(adapted, tmp_path, capsys):
    handed = tmp_path / "handed"
    shutil.copytree(adapted, handed)
    shutil.copy(handed / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (handed / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}
    (handed / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["info", str(handed)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "'../elsewhere.safetensors'; only file names inside" in lines[0], lines


def test_a_decoder_only_sources_weight_index_naming_a_file_outside_it_is_refused_before_transformers(sources,
                                                                                                      tmp_path):
    """`encdec evaluate` scores a decoder-only source with transformers, which follows an index's paths anywhere."""
    from encdec.evaluation.scoring import load_scorer

    handed = tmp_path / "handed"
    shutil.copytree(sources["gemma3"], handed)
    os.replace(handed / "model.safetensors", tmp_path / "elsewhere.safetensors")
    names = safetensors.safe_open(tmp_path / "elsewhere.safetensors", "pt").keys()
    index = {"metadata": {}, "weight_map": {name: str(tmp_path / "elsewhere.safetensors") for name in names}}
    (handed / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EncdecError, match="elsewhere.safetensors'; only file names inside"):
        load_scorer(str(handed))


def test_a_decoder_only_source_naming_other_weights_for_transformers_is_refused(sources, tmp_path):
    """config.json's transformers_weights makes transformers load the file it names (here a pickle) instead of the
    safetensors encdec checks; `encdec evaluate` scores a decoder-only source with transformers."""
    from encdec.evaluation.scoring import load_scorer

    handed = tmp_path / "handed"
    shutil.copytree(sources["gemma3"], handed)
    torch.save({"weights": Payload(str(tmp_path / "pwned"))}, handed / "adapter_model.bin")
    config = json.loads((handed / "config.json").read_text())
    (handed / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(EncdecError, match="names transformers_weights 'adapter_model.bin', which encdec does not"):
        load_scorer(str(handed))
    assert not (tmp_path / "pwned").exists()


def test_a_gguf_of_a_few_bytes_claiming_a_huge_array_is_refused_at_once(tmp_path):
    """gguf's reader reads past the end of the file as empty arrays: an 84-byte file whose array field claims 2**62
    items was read for ever (in a process of its own here, killed by its time limit if that comes back)."""
    import struct

    bomb = tmp_path / "bomb.gguf"
    bomb.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 20) + b"general.architecture"
                     + struct.pack("<IIQ", 9, 0, 2**62) + b"\0" * 16)
    code = ("import sys; from pathlib import Path; from encdec.formats.gguf import architecture; "
            "architecture(Path(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert "is a truncated or corrupt GGUF file" in done.stderr
    assert "a metadata array claims 4,611,686,018,427,387,904 items" in done.stderr  # refused before it is read
    bomb.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 20) + b"general.architecture"
                     + struct.pack("<IQ", 8, 2**40) + b"\0" * 16)  # a string of a terabyte, in a file of 60 bytes
    done = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert "is a truncated or corrupt GGUF file" in done.stderr and "runs past the end of the file" in done.stderr


@pytest.mark.parametrize("claims, error", [
    ({"block_count": 10**7}, "declares 10000000 llama.block_count .at most 1024., its tensors hold 4 blocks"),
    ({"block_count": 5}, "declares 5 llama.block_count .at most 1024., its tensors hold 4 blocks"),
    ({"block_count": "4"}, "declares no integer llama.block_count"),
    ({"embedding_length": 10**6}, "a model of [0-9,]+ parameters, its tensors hold 37,152"),
    ({"embedding_length": 30}, "transformers cannot read this llama GGUF's metadata"),  # 30 over 4 heads
    ({"rename": ("blk.3.", "blk.x.")}, "declares 4 llama.block_count .at most 1024., its tensors hold 4 blocks"),
])
def test_a_gguf_whose_metadata_lies_about_its_tensors_is_refused_before_a_weight_is_built(tmp_path, monkeypatch,
                                                                                           capsys, claims, error):
    """transformers builds the model a GGUF's metadata declares and fills what the tensors lack with new weights:
    a file of a few kilobytes could ask for millions of layers or a width of millions (all the memory there is)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    plain = {"rope_type": "default", "rope_theta": 10000.0}
    source = make_source(tmp_path / "llama", "llama", rope_parameters=plain)
    path = write_gguf(source, tmp_path / "l.gguf", claims=claims)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were built"))
    assert main(["adapt", "--encoder", str(path), "--out", str(tmp_path / "out")]) == 2
    (line,) = _error_lines(capsys)
    assert re.search(error, line) and str(path) in line, line
    assert not (tmp_path / "out").exists()


def test_a_value_encdec_refuses_names_the_source_and_a_gguf_is_not_dequantized_for_it(tmp_path, monkeypatch, capsys):
    """A soft-cap of 0 (which would zero every logit) was refused by the model's configuration, naming no file; a
    GGUF holding it was first dequantized and cached (1.1 GB for the 270M, never read again)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    source = make_source(tmp_path / "gemma2", "gemma2")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 0.0}))
    assert main(["adapt", "--encoder", str(source), "--out", str(tmp_path / "out")]) == 2
    (line,) = _error_lines(capsys)
    assert f"{source / 'config.json'}: final_logit_softcap must be null or a positive number, got 0.0" in line, line
    path = write_gguf(source, tmp_path / "capped.gguf")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were built"))
    assert main(["adapt", "--encoder", str(path), "--out", str(tmp_path / "out")]) == 2
    (line,) = _error_lines(capsys)
    assert f"{path}: final_logit_softcap must be null or a positive number, got 0.0" in line, line
    assert not list((tmp_path / "cache").glob("gguf/*")) and not (tmp_path / "out").exists()


def test_a_gguf_architecture_that_is_not_text_is_one_line(tmp_path, monkeypatch, capsys):
    """A number there was printed as the name of an unsupported architecture: its bytes ("holds a \x03\x00\x00\x00
    model")."""
    import gguf

    written = gguf.GGUFWriter.write_header_to_file

    def numbered(self, *args, **kwargs):
        self.add_key_value("general.architecture", 3, gguf.GGUFValueType.UINT32)
        return written(self, *args, **kwargs)

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    source = make_source(tmp_path / "gemma3", "gemma3")
    monkeypatch.setattr(gguf.GGUFWriter, "write_header_to_file", numbered)
    path = write_gguf(source, tmp_path / "numbered.gguf")
    assert main(["adapt", "--encoder", str(path), "--out", str(tmp_path / "out")]) == 2
    (line,) = _error_lines(capsys)
    assert line.endswith(f"{path}: its general.architecture is not text; expected a name such as gemma3"), line


def test_a_pickle_in_the_token_cache_is_not_loaded_but_rebuilt(corpus, tmp_path, capsys):
    from transformers import AutoTokenizer

    setup()  # encdec's log lines to this test's stderr

    make_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    cache = tmp_path / "cache"
    expected = np.array(token_stream(tokenizer, [str(corpus)], cache_dir=cache))  # a copy: the cache is mapped
    (cached,) = cache.iterdir()
    marker = tmp_path / "pwned"
    cached.write_bytes(pickle.dumps(Payload(str(marker))))
    capsys.readouterr()
    assert np.array_equal(token_stream(tokenizer, [str(corpus)], cache_dir=cache), expected)
    assert not marker.exists()
    warned = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert len(warned) == 1 and "deleted, tokenizing again" in warned[0]
    assert np.array_equal(token_stream(tokenizer, [str(corpus)], cache_dir=cache), expected)  # rebuilt, readable
    # a damaged one that cannot be deleted (a read-only cache, another user's): the run stopped in a traceback
    cached.write_bytes(b"PK damaged")
    unlink = Path.unlink

    def read_only(self, *args, **kwargs):
        if self == cached:
            raise OSError(errno.EROFS, "Read-only file system")
        return unlink(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(Path, "unlink", read_only)
        assert np.array_equal(token_stream(tokenizer, [str(corpus)], cache_dir=cache), expected)
    warned = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert warned and all("cannot delete it (Read-only file system), tokenizing again" in w for w in warned), warned


def test_a_yaml_configuration_cannot_build_python_objects(tmp_path, capsys):
    marker = tmp_path / "pwned"
    config = tmp_path / "run.yaml"
    config.write_text(f"steps: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "cannot read the YAML configuration" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("name", [".encdec.lock", "metrics.jsonl", "checkpoints", "tensorboard", "model"])
def test_a_link_in_a_run_directory_is_not_written_through(adapted, corpus, tmp_path, capsys, name):
    """A run directory someone handed over, whose lock, metrics file or checkpoint folder links elsewhere: what the
    link names is neither created nor changed (--resume read another run's checkpoints there, set aside and deleted
    them), and the run stops with one line (the link need not point at anything yet)."""
    out, victim = tmp_path / "run", tmp_path / "victim"
    out.mkdir()
    (out / name).symlink_to(victim)
    assert main(["pretrain", "--model", str(adapted), "--data", str(corpus), "--out", str(out), "--steps", "1",
                 "--batch-size", "2", "--enc-len", "8", "--dec-len", "8", "--no-distill"]) == 2
    (line,) = _error_lines(capsys)
    assert f"{out / name} is a symbolic link" in line and "delete the link" in line
    assert not victim.exists()
    victim.write_text("kept")
    for resume in ([], ["--resume"]):  # a resumed run reads its metrics back before writing: not through a link
        setup()
        assert main(["pretrain", "--model", str(adapted), "--data", str(corpus), "--out", str(out), "--steps", "1",
                     "--batch-size", "2", "--enc-len", "8", "--dec-len", "8", "--no-distill", *resume]) == 2
        (line,) = _error_lines(capsys)  # without --resume a metrics file is a run's output: "holds a run"
        assert f"{out / name} is a symbolic link" in line or (name == "metrics.jsonl" and not resume
                                                               and f"{out} holds a run" in line), line
        assert victim.read_text() == "kept" and (out / name).is_symlink()


def test_layer_types_that_are_no_list_are_said_so(adapted):
    """A string there was counted by its characters: "layer_types has 4 entries for 4 layers"."""
    import dataclasses

    import encdec

    stack = encdec.load(adapted).config.encoder
    with pytest.raises(EncdecError, match="layer_types must be a list of 'sliding' and 'full', one a layer, got "
                                          "'full'"):
        dataclasses.replace(stack, layer_types="full")


def _set_everywhere(value, key: str, new) -> None:
    """Set `key` to `new` in every object nested in `value`."""
    if isinstance(value, dict):
        for k in value:
            if k == key:
                value[k] = new
            else:
                _set_everywhere(value[k], key, new)
    elif isinstance(value, list):
        for item in value:
            _set_everywhere(item, key, new)


@pytest.mark.parametrize("family", ["adapted", "gemma3", "llama", "qwen2"])
def test_a_config_declaring_millions_of_layers_is_refused_before_anything_is_built(adapted, sources, tmp_path, capsys,
                                                                                  family):
    """A 1 KB config.json must not make encdec build a skeleton of ten million layers (hundreds of GB)."""
    model = tmp_path / "model"
    shutil.copytree(adapted if family == "adapted" else sources[family], model)
    config = json.loads((model / "config.json").read_text())
    _set_everywhere(config, "num_hidden_layers", 10**7)
    _set_everywhere(config, "layer_types", None)
    (model / "config.json").write_text(json.dumps(config))
    command = ["info", str(model)] if family == "adapted" else ["adapt", "--encoder", str(model), "--out",
                                                                 str(tmp_path / "out")]
    assert main(command) == 2
    (line,) = _error_lines(capsys)
    assert "num_hidden_layers must be an integer from 1 to 1024, got 10000000" in line and "config.json" in line
    assert not (tmp_path / "out").exists()


def test_info_says_when_a_t5gemma_layout_checkpoint_names_code_of_its_own(sources, tmp_path, capsys):
    """transformers has the T5Gemma classes; an auto_map or a custom_generate/ a handed checkpoint adds would run
    in their place with trust_remote_code=True, and `encdec info` said nothing of them."""
    import encdec

    out = tmp_path / "model"
    assert encdec.save(encdec.adapt(encdec.load_source(str(sources["gemma3"]))), out) == "t5gemma2"

    def said() -> list[str]:
        assert main(["info", str(out)]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if "remote code:" in line]

    assert said() == []  # as written: nothing to say
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForSeq2SeqLM": "evil.M"}}))
    (line,) = said()
    assert "config.json maps to code shipped with the checkpoint" in line and "evil.M" in line
    (out / "config.json").write_text(json.dumps(config))
    (out / "custom_generate").mkdir()
    (out / "custom_generate" / "generate.py").write_text("import os\n")
    (line,) = said()
    assert "custom_generate/generate.py is there" in line


def test_info_says_whether_a_checkpoints_modeling_file_is_the_one_encdec_writes(sources, tmp_path, capsys):
    """transformers runs a project-format checkpoint's modeling_encdec.py with trust_remote_code=True: `encdec info`
    tells the file this encdec writes from an edited one, and saving the model again writes the right one back."""
    import encdec

    out = tmp_path / "model"
    encdec.save(encdec.adapt(encdec.load_source(str(sources["llama"]))), out, tokenizer_dir=sources["llama"],
                metadata={"pretrained": {"objective": "ul2"}}, dtype=torch.bfloat16)
    remote = out / "modeling_encdec.py"

    def said() -> str:
        assert main(["info", str(out)]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if "remote code:" in line)

    assert "is the file this encdec writes" in said()
    # a link whose target holds a terminal's sequences: printed raw, "\r\x1b[2K" rewrote the line as the verdict
    kept = remote.rename(tmp_path / "kept.py")
    remote.symlink_to("/tmp/x\r\x1b[2K  remote code: modeling_encdec.py is the file this encdec writes")
    line = said()
    assert "\x1b" not in line and "\r" not in line and "symbolic link to /tmp/x\\r\\x1b[2K" in line, line
    remote.unlink()
    kept.rename(remote)
    assert main(["info", str(tmp_path / "no\x1b[31mwhere")]) == 2  # an error line names the path: escaped too
    err = capsys.readouterr().err
    assert "\x1b" not in err and "no\\x1b[31mwhere" in err
    assert main(["info", str(tmp_path / "Shot 10.00\u202fAM \u3000x")]) == 2  # what is no control stays as it is
    assert "Shot 10.00\u202fAM \u3000x" in capsys.readouterr().err
    for name in ("config.json", "tokenizer_config.json"):  # what transformers follows, whatever the file holds
        original = (out / name).read_text()
        data = json.loads(original)
        (out / name).write_text(json.dumps({**data, "auto_map": {**data.get("auto_map", {}), "AutoConfig": "evil.C"}}))
        line = said()
        assert f"{name} maps to other code than this encdec's" in line and '"evil.C"' in line
        # the advice works: re-saving through encdec (as for an edited modeling file) is refused while the entry
        # stays, so it says to remove it first
        assert "remove the entry" in line and "encdec.save(" not in line
        with pytest.raises(EncdecError, match="auto_map"):
            encdec.save(encdec.load(out, dtype=None), tmp_path / "again", tokenizer_dir=out)
        assert ("put back this encdec's" in line) == (name == "config.json")  # (the tokenizer's has none of ours)
        if name == "config.json":  # the loading's own advice: put ours back (removing it was for a Gemma)
            with pytest.raises(EncdecError, match="auto_map entry: .* put back this encdec's"):
                from encdec.sources import refuse_custom_code

                refuse_custom_code(out)
        (out / name).write_text(original)
    # no auto_map at all (removed as that advice said): it "mapped to other code (null)", to be removed
    original = (out / "config.json").read_text()
    (out / "config.json").write_text(json.dumps({k: v for k, v in json.loads(original).items() if k != "auto_map"}))
    assert "config.json has no auto_map: transformers cannot load it (encdec can); put back" in said()
    tokenizer_config = (out / "tokenizer_config.json").read_text()  # ... unless the tokenizer's maps to code
    (out / "tokenizer_config.json").write_text(json.dumps({**json.loads(tokenizer_config), "auto_map": {
        "AutoTokenizer": ["evil.T", None]}}))
    assert "tokenizer_config.json maps to other code than this encdec's" in said()
    (out / "tokenizer_config.json").write_text(tokenizer_config)
    (out / "config.json").write_text(original)
    # an entry of null in tokenizer_config.json: info passed it, and the loading refused it
    original = (out / "tokenizer_config.json").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps({**json.loads(original), "auto_map": None}))
    assert "tokenizer_config.json maps to other code than this encdec's (null)" in said()
    (out / "tokenizer_config.json").write_text(original)
    assert "is the file this encdec writes" in said()
    # transformers 5 also runs custom_generate/generate.py as a trusted checkpoint loads: it was not mentioned
    (out / "custom_generate").mkdir()
    (out / "custom_generate" / "generate.py").write_text("import os\nos.system('echo pwned')\n")
    assert "custom_generate/generate.py is there: transformers would run it" in said()
    shutil.rmtree(out / "custom_generate")
    assert "is the file this encdec writes" in said()
    original = remote.read_text()
    with remote.open("r+b") as f:  # sparse, 300 MB: read whole to be compared
        f.truncate(300 << 20)
    tracemalloc.start()
    try:
        assert "DIFFERS from the file this encdec writes" in said()
        assert tracemalloc.get_traced_memory()[1] < 50 << 20
    finally:
        tracemalloc.stop()
    remote.write_text(original + "\nimport os\nos.system('echo pwned')\n")
    line = said()
    assert "DIFFERS from the file this encdec writes" in line and "read it first" in line
    # what it advises, run as written: the copy keeps the tokenizer and the provenance (a UL2 model's framing)
    advice = re.search(r"\((encdec\.save\(.*\)) writes this version's file\)", line).group(1)
    code = advice.replace("DIR", repr(str(out))).replace("NEW", repr(str(tmp_path / "again")))
    exec(code, {"encdec": encdec})  # noqa: S102 - the line encdec info prints, run as a user would paste it
    assert encdec.checkpoint.read_metadata(tmp_path / "again") == {"pretrained": {"objective": "ul2"}}
    assert encdec.load_tokenizer(tmp_path / "again").get_vocab() == encdec.load_tokenizer(out).get_vocab()
    again = encdec.load(tmp_path / "again", dtype=None)  # in the dtype it was saved in, not float32 at twice the size
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    assert (tmp_path / "again" / "modeling_encdec.py").read_text() + "\nimport os\nos.system('echo pwned')\n" == \
        remote.read_text()
    remote.unlink()
    assert "no modeling_encdec.py: transformers cannot load it" in said()
    remote.symlink_to(tmp_path / "again" / "modeling_encdec.py")  # even to the right file: what runs is elsewhere
    assert f"is a symbolic link to {tmp_path / 'again' / 'modeling_encdec.py'}: transformers would run" in said()


@pytest.mark.parametrize("entry", [
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},  # not a name: unhashable, a TypeError escaped
    {"dtype": "F32", "shape": [10**20], "data_offsets": [0, 8]},  # past what torch can size: another TypeError
    {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 8]},  # 4 TB asked of memory for 8 bytes
    {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]},  # 0 bytes, but no shape torch can make
], ids=["dtype-list", "shape-overflow", "shape-huge", "shape-mismatch", "empty-shape-overflow"])
def test_a_safetensors_header_that_lies_is_refused_before_anything_is_allocated(tmp_path, entry):
    from encdec.files import read_weights

    header = json.dumps({"w": entry}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(EncdecError, match=r"model.safetensors is not a readable safetensors file.*tensor w: "):
        read_weights(tmp_path)


def test_weights_that_are_a_pipe_or_carry_a_huge_header_are_one_error(tmp_path, monkeypatch):
    """A model.safetensors that is a named pipe (a handed tarball can hold one) was opened as a file: reading it
    waited for a writer for ever (here in a process of its own, killed by its time limit if that comes back). A
    header of 19 MB (300k empty tensors) held 300 MB parsed; the safetensors library refuses any over 100 MB."""
    from encdec import files

    os.mkfifo(tmp_path / "model.safetensors")
    for mapped in (False, True):
        code = ("import sys; from pathlib import Path; from encdec.files import read_weights; "
                f"read_weights(Path(sys.argv[1]), mapped={mapped})")
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                              timeout=120, check=False)
        assert "model.safetensors: not a regular file (a device, a pipe, a directory?)" in done.stderr, done.stderr
    (tmp_path / "model.safetensors").unlink()
    header = json.dumps({f"w{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(50)}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert len(files.read_weights(tmp_path)) == 50
    monkeypatch.setattr(files, "MAX_HEADER_BYTES", len(header) - 1)
    with pytest.raises(EncdecError, match=f"its header claims {len(header):,} bytes, more than the format's limit"):
        files.read_weights(tmp_path)


def test_a_checkpoint_a_killed_write_moved_aside_is_put_back_before_any_work(adapted, sources, tmp_path, capsys):
    """Killed between its two renames, a write leaves the previous version in .NAME.old-HOST-PID-XXXXXXXX: the next
    write put it back only as its own output took the place, and failed then, after all its work."""
    from encdec import files

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    aside = tmp_path / f".model.old-{files.HOST}-{int(done.stdout)}-abcd1234"
    aside.mkdir()
    shutil.copytree(adapted, aside / "model")
    before = sorted(p.relative_to(aside / "model") for p in (aside / "model").rglob("*"))
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(tmp_path / "model")]) == 2
    (line,) = _error_lines(capsys)  # (the check of the output, before the source is read)
    assert f"output directory {tmp_path / 'model'} already exists; pass --overwrite" in line, line
    assert sorted(p.relative_to(tmp_path / "model") for p in (tmp_path / "model").rglob("*")) == before
    assert not aside.exists()


def test_an_overwritten_checkpoint_keeps_its_permissions(adapted, tmp_path):
    """A private checkpoint (0700, its files 0600) came back with the umask's modes (0755, 0644) after --overwrite."""
    import encdec

    model = shutil.copytree(adapted, tmp_path / "model")
    names = [path.name for path in model.iterdir()]
    for name in names:
        (model / name).chmod(0o600)
    model.chmod(0o700)
    encdec.save(encdec.load(model), model, overwrite=True)
    assert model.stat().st_mode & 0o777 == 0o700 and "model.safetensors" in names
    assert {name: (model / name).stat().st_mode & 0o777 for name in names} == dict.fromkeys(names, 0o600)


def test_a_metadata_file_past_a_configurations_size_is_refused_unread(adapted, tmp_path, capsys):
    """A configuration or metadata file was read up to 1 GiB, and parsed takes about 22 times its size: a handed
    encdec.json of [{}, {}, ...] near that size took 25 GB (30 MB of it: 1.1 GB)."""
    model = shutil.copytree(adapted, tmp_path / "model")
    with (model / "encdec.json").open("r+b") as f:
        f.truncate(65 << 20)  # sparse
    assert main(["info", str(model)]) == 2
    (line,) = _error_lines(capsys)
    assert f"cannot read {model / 'encdec.json'}: 68,157,440 bytes, more than a configuration file holds" in line


def test_the_size_check_leaves_out_what_a_class_lets_a_checkpoint_lack(tmp_path):
    """transformers loads an AXK1 checkpoint without its e_score_correction_bias (the class's
    _keys_to_ignore_on_load_missing): the headers' check counted it and refused a model transformers reads whole."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    from encdec.sources import check_causal_lm

    config = tf.AutoConfig.for_model("axk1")
    sizes = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 128, "n_routed_experts": 4,
             "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 16,
             "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "head_dim": 8}
    for key, value in sizes.items():
        if hasattr(config, key):
            setattr(config, key, value)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    stored = load_file(weights)
    assert any("e_score_correction_bias" in name for name in stored)
    kept = {k: v for k, v in stored.items() if "e_score_correction_bias" not in k}
    save_file(kept, weights, metadata={"format": "pt"})
    check_causal_lm(tmp_path)


def test_a_decoder_only_model_lacking_weights_or_with_millions_of_layers_is_not_evaluated(sources, tmp_path, capsys):
    """transformers fills a missing tensor with random values and says so only in a log encdec silences: `evaluate`
    scored a damaged source as if whole; 10 million declared layers were built (minutes), then scored at random."""
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(sources["gemma3"], tmp_path / "lacking")
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "layers.1.mlp" not in k}, str(model / "model.safetensors"),
              metadata={"format": "pt"})
    assert main(["evaluate", str(model), "--tasks", "copa", "--limit", "2", "--out", str(tmp_path / "r")]) == 2
    (line,) = _error_lines(capsys)
    assert "none is stored as model.layers.1.mlp.down_proj.weight, for one" in line and "would fill the rest" in line
    other = shutil.copytree(sources["gemma3"], tmp_path / "other")  # weights of 96 rows, a config of 200
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    assert main(["evaluate", str(other), "--tasks", "copa", "--limit", "2", "--out", str(tmp_path / "r")]) == 2
    (line,) = _error_lines(capsys)  # transformers raised (a traceback) before the shapes were compared
    assert "its weights hold model.embed_tokens.weight in shape [96, 32], where its config.json declares [200, 32]" \
        in line
    # sizes a few-KB edit declares were allocated and filled before the weights were found to lack them
    wide = shutil.copytree(sources["gemma3"], tmp_path / "wide")
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "intermediate_size": 400_000}))
    assert main(["evaluate", str(wide), "--tasks", "copa", "--limit", "2", "--out", str(tmp_path / "r")]) == 2
    (line,) = _error_lines(capsys)  # (said by the check of the headers, before transformers builds the model)
    assert "its weights hold model.layers.0.mlp.down_proj.weight in shape" in line and "declares [32, 400000]" in line
    many = shutil.copytree(sources["gemma3"], tmp_path / "many")
    config = json.loads((many / "config.json").read_text())
    config["num_hidden_layers"], config["layer_types"] = 10**7, None
    (many / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", str(many), "--tasks", "copa", "--limit", "2", "--out", str(tmp_path / "r")]) == 2
    (line,) = _error_lines(capsys)
    assert "num_hidden_layers must be an integer from 1 to 1024, got 10000000" in line
    import transformers as tf  # GPT-2 names its count n_layer: it went unchecked, and 10 million blocks were built

    gpt2 = tmp_path / "gpt2"
    tiny = tf.GPT2Config(vocab_size=96, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    tf.GPT2LMHeadModel(tiny).save_pretrained(gpt2)
    make_tokenizer(gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "n_layer": 2000}))  # (over the limit, quick to build)
    assert main(["evaluate", str(gpt2), "--tasks", "copa", "--limit", "2", "--out", str(tmp_path / "r")]) == 2
    (line,) = _error_lines(capsys)
    assert "n_layer must be an integer from 1 to 1024, got 2000" in line


def test_a_tokenizer_config_naming_a_tokenizer_outside_its_directory_is_refused(adapted, tmp_path):
    """transformers joins each fast_tokenizer_files entry onto the directory: '../elsewhere/tokenizer.1.0.json'
    read (and `save` copied into new checkpoints) a tokenizer outside it."""
    import encdec

    model = shutil.copytree(adapted, tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    for entry in ("../elsewhere/tokenizer.1.0.json", str(tmp_path / "tokenizer.1.0.json")):
        config["fast_tokenizer_files"] = [entry]
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(EncdecError, match="only file names inside"):
            encdec.load_tokenizer(model)
    config["fast_tokenizer_files"] = ["tokenizer.1.0.json"]  # a name inside it: transformers' own convention
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(model / "tokenizer.json", model / "tokenizer.1.0.json")
    assert encdec.load_tokenizer(model) is not None


def test_a_chat_template_named_as_a_path_is_refused_when_read_not_at_the_save(capsys, tmp_path, sources):
    """A named chat template is saved as additional_chat_templates/NAME.jinja: '../../escape' loaded, and the
    save at the end of the adaptation (its weights read, its work done) failed with transformers' traceback.
    A plain name still adapts, its template carried over."""
    source = shutil.copytree(sources["gemma3"], tmp_path / "source")
    config = json.loads((source / "tokenizer_config.json").read_text())
    for name, fine in (("../../escape", False), ("tool_use", True)):
        templates = [{"name": "default", "template": "{{ messages }}"}, {"name": name, "template": "x"}]
        (source / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": templates}))
        out = tmp_path / f"out-{fine}"
        code = main(["adapt", "--encoder", str(source), "--out", str(out)])
        if fine:
            assert code == 0 and (out / "additional_chat_templates" / "tool_use.jinja").read_text() == "x"
            continue
        (line,) = _error_lines(capsys)
        assert code == 2 and "names a chat template '../../escape'; a template's name is a plain file name" in line
        assert not out.exists()


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_a_config_that_is_a_device_or_a_pipe_is_one_line(adapted, tmp_path, capsys, target):
    """A config.json linked to /dev/zero (an archive can carry the link) was read until memory ran out; to a
    pipe, forever."""
    model = shutil.copytree(adapted, tmp_path / "model")
    (model / "config.json").unlink()
    if target == "fifo":
        os.mkfifo(model / "config.json")
    else:
        (model / "config.json").symlink_to(target)
    assert main(["info", str(model)]) == 2
    (line,) = _error_lines(capsys)
    assert "not a regular file" in line and "config.json" in line


def test_a_yaml_config_or_grid_that_is_a_device_is_one_line_and_a_pipe_is_read(adapted, tmp_path, capsys,
                                                                               monkeypatch):
    """--config and --grid read YAML without the JSON readers' checks: /dev/zero was read until memory ran out (a
    MemoryError's traceback). A device is refused unread; a pipe (`--config <(envsubst < run.yaml)`) is read."""
    zero = tmp_path / "config.yaml"
    zero.symlink_to("/dev/zero")
    for argv in (["pretrain", "--config", str(zero), "--out", str(tmp_path / "run")],
                 ["classify", str(adapted), "--task", "rte", "--out", str(tmp_path / "c"), "--search", "--grid",
                  str(zero)]):
        assert main(argv) == 2
        (line,) = _error_lines(capsys)
        assert "not a file or a pipe" in line and "config.yaml" in line, line
    read, write = os.pipe()
    os.write(write, b"no_such_option: 1\n")
    os.close(write)
    try:
        assert main(["pretrain", "--config", f"/proc/self/fd/{read}", "--out", str(tmp_path / "run")]) == 2
    finally:
        os.close(read)
    (line,) = _error_lines(capsys)
    assert "no_such_option" in line, line  # read, and its option judged
    read, write = os.pipe()  # ... but not under a launcher: each process reads it, one of them gets it all
    os.close(write)
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        assert main(["pretrain", "--config", f"/proc/self/fd/{read}", "--out", str(tmp_path / "run")]) == 2
    finally:
        os.close(read)
    (line,) = _error_lines(capsys)
    assert "not a file; each process of a distributed run reads the configuration" in line, line
    assert main(["pretrain", "--config", str(tmp_path / "typo.yaml"), "--out", str(tmp_path / "run")]) == 2
    (line,) = _error_lines(capsys)  # a file that is not there is said so, as without a launcher
    assert "No such file or directory" in line, line


def test_sizes_no_tensor_can_hold_are_one_line(adapted, tmp_path, capsys):
    model = shutil.copytree(adapted, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    _set_everywhere(config, "vocab_size", 2**62)
    (model / "config.json").write_text(json.dumps(config))
    assert main(["info", str(model)]) == 2
    (line,) = _error_lines(capsys)
    assert "config.json" in line and ("declares sizes no tensor can hold" in line or "vocab_size" in line), line


def test_a_trainer_state_missing_or_mangling_what_resuming_reads_is_set_aside(run, adapted, corpus, tmp_path, capsys):
    """A trainer.json without its scheduler stopped a resumed run with a KeyError's traceback; one claiming 10**12
    processes multiplied a string into terabytes when the settings were compared; a scheduler without its
    lr_lambdas, or a path setting that is a number, were a KeyError's and a TypeError's tracebacks."""
    # and a scheduler's fields, or an optimizer state, of other types or past every step: TypeError's and
    # OverflowError's tracebacks
    for change in ({"drop": "scheduler"}, {"processes": 10**12}, {"scheduler": {"last_epoch": 2}},
                   {"config": {"teacher": 5}}, {"in scheduler": {"_step_count": None}},
                   {"in scheduler": {"lr_lambdas": [1]}}, {"in scheduler": {"last_epoch": 10**400}},
                   {"optimizer": {"state": 5}}, {"optimizer": {"param_groups": 5}}):
        out = shutil.copytree(run, tmp_path / f"run-{len(list(tmp_path.iterdir()))}")
        newest = checkpointing.checkpoints(out)[-1]
        name = "optimizer" if "optimizer" in change else "trainer"
        saved = json.loads((newest / f"{name}.json").read_text())
        if "drop" in change:
            del saved["state"][change["drop"]]
        elif "config" in change:
            saved["state"]["config"].update(change["config"])
        elif "in scheduler" in change:
            saved["state"]["scheduler"].update(change["in scheduler"])
        else:
            saved["state"].update(change.get("optimizer", change))
        (newest / f"{name}.json").write_text(json.dumps(saved))
        said = ("does not hold a training state" if name == "optimizer" else
                "trainer.json lacks or mangles (scheduler|processes|config's paths)")
        with pytest.raises(EncdecError, match=said):
            checkpointing.read(newest)
        loop.train(_config(adapted, out, corpus, steps=3, save_every=1, eval_every=0, resume=True))  # from step 1
        assert (out / "model").is_dir()


def test_a_checkpoints_optimizer_moments_of_other_shapes_or_shared_are_set_aside(run, adapted, corpus, tmp_path):
    """AdamW's moments are not checked by torch: one smaller than its parameter made the fused AdamW write past its
    memory (a segmentation fault on the resumed run's first step); one tensor named for two parameters' moments was
    shared by both, and the next save failed; a metrics record that is no JSON failed writing metrics.jsonl."""
    from safetensors.torch import load_file, save_file

    for change in ("smaller", "not finite", "shared", "record", "record of no step", "resumes"):
        out = shutil.copytree(run, tmp_path / change.replace(" ", "-"))
        newest = checkpointing.checkpoints(out)[-1]
        meta = json.loads((newest / "optimizer.json").read_text())
        tensors = load_file(newest / "optimizer.safetensors")
        states = list(meta["state"]["state"].values())
        first = states[0]["exp_avg"]["$tensor"]
        if change == "smaller":
            tensors[first] = torch.zeros(1)
        elif change == "not finite":
            tensors[first] = torch.full_like(tensors[first], float("nan"))
        elif change == "shared":
            states[1]["exp_avg"]["$tensor"] = first
        elif change == "resumes":  # copied into the final encdec.json: the run failed there, after its steps
            trainer = json.loads((newest / "trainer.json").read_text())
            trainer["state"]["resumes"] = [{"$tensor": "planted"}]
            (newest / "trainer.json").write_text(json.dumps(trainer))
            save_file({**load_file(newest / "trainer.safetensors"), "planted": torch.zeros(2)},
                      newest / "trainer.safetensors")
        elif change == "record of no step":  # (its step was read when the line was written to TensorBoard again)
            trainer = json.loads((newest / "trainer.json").read_text())
            trainer["state"]["record"] = {"loss": 1.0}
            (newest / "trainer.json").write_text(json.dumps(trainer))
        else:
            trainer = json.loads((newest / "trainer.json").read_text())
            trainer["state"]["record"] = {"$tensor": "planted"}
            (newest / "trainer.json").write_text(json.dumps(trainer))
            save_file({**load_file(newest / "trainer.safetensors"), "planted": torch.zeros(2)},
                      newest / "trainer.safetensors")
        save_file(tensors, newest / "optimizer.safetensors")
        (newest / "optimizer.json").write_text(json.dumps(meta))
        said = {"smaller": r"exp_avg has shape \(1,\), not its parameter", "not finite": "exp_avg holds NaN or inf",
                "shared": "is not in the file, or is named twice", "record": "lacks or mangles record",
                "record of no step": "lacks or mangles record", "resumes": "lacks or mangles resumes"}[change]
        with pytest.raises(EncdecError, match=said):
            checkpointing.read(newest)
        loop.train(_config(adapted, out, corpus, steps=3, save_every=1, eval_every=0, resume=True))  # from step 1
        assert (out / "model").is_dir()


def test_checkpoints_averaged_into_the_final_model_are_checked_as_a_resumed_one_is(adapted, corpus, tmp_path):
    """--average-last summed the older checkpoints unread: NaN weights in one reached the final model (exit 0), and
    one of other names ended a finished run with a RuntimeError's traceback."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    loop.train(_config(adapted, out, corpus, steps=2, save_every=1, keep_last=3, eval_every=0))
    first = checkpointing.checkpoints(out)[0]
    weights = load_file(first / "model.safetensors")
    name = next(iter(weights))
    save_file({**weights, name: torch.full_like(weights[name], float("nan"))}, first / "model.safetensors")
    shutil.rmtree(out / "model")
    with pytest.raises(EncdecError, match=f"step-000001: --average-last reads it, and it has weight {name}, which "
                                          "holds NaN or inf; the run's checkpoints are kept"):
        loop.train(_config(adapted, out, corpus, steps=3, save_every=1, keep_last=3, average_last=3, eval_every=0,
                           resume=True))
    assert not (out / "model").exists()
    loop.train(_config(adapted, out, corpus, steps=3, save_every=1, keep_last=3, average_last=2, eval_every=0,
                       resume=True))
    assert all(torch.isfinite(t).all() for t in load_file(out / "model" / "model.safetensors").values())


def test_resuming_with_another_steps_says_how_the_learning_rate_moves(run, adapted, corpus, tmp_path, monkeypatch):
    """--steps may change on --resume, and the schedule of the new length takes over: the rate jumped (five times
    at step 900 of 1000 resumed with 2000) and nothing said so."""
    from encdec.training import loop as loop_module

    out = shutil.copytree(run, tmp_path / "run")
    warned: list[str] = []
    monkeypatch.setattr(loop_module.log, "warning", lambda message, *args: warned.append(message % args))
    loop.train(_config(adapted, out, corpus, steps=6, save_every=1, eval_every=0, resume=True))
    (said,) = [w for w in warned if w.startswith("--steps")]
    assert said.startswith("--steps 2 -> 6: the learning-rate schedule is that of a 6-step run from step 2 on")
    # the final model's provenance gave the last invocation's settings as the whole run's, and precision "auto"
    warned.clear()
    cfg = _config(adapted, out, corpus, steps=8, save_every=1, eval_every=0, resume=True, lr=1e-3, precision="auto")
    loop.train(cfg)
    (said,) = [w for w in warned if w.startswith("--steps")]  # the run's rate is that of its own --lr (3e-3)
    old, new = (lr * warmup_then_decay(cfg.warmup_steps, total, cfg.min_lr_ratio)(6) for lr, total in ((3e-3, 6),
                                                                                                      (1e-3, 8)))
    assert said.endswith(f"its rate {new:.3g} where the run's was {old:.3g}"), said
    run = json.loads((out / "model" / "encdec.json").read_text())["pretrained"]
    assert [r["step"] for r in run["resumes"]] == [2, 6]  # each --steps recorded: the schedules of their steps
    assert run["resumes"][0]["changed"] == ["--steps 2 -> 6"] and run["resumes"][1]["changed"][0] == "--steps 6 -> 8"
    assert any(c.startswith("--lr 0.003 -> 0.001") for c in run["resumes"][1]["changed"]), run["resumes"]
    assert run["settings"]["precision"] in ("fp32", "bf16")
    # the default "auto" resumes in the precision the run began with (fp32): it changed nothing, and was said as
    # "--precision 'fp32' -> 'auto'"
    assert not [c for c in run["resumes"][1]["changed"] if "precision" in c] and run["settings"]["precision"] == "fp32"
    assert not [w for w in warned if "--precision" in w], warned


def test_a_tokenizer_pattern_that_backtracks_past_its_limit_is_one_line(adapted, tmp_path, capsys):
    """The tokenizers library stops such a pattern with a Rust panic, a BaseException past every `except
    Exception`: a traceback (and the Rust backtrace) where a line was due."""
    model = shutil.copytree(adapted, tmp_path / "model")
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(.*a){20}c"}, "behavior": "Isolated",
                                  "invert": False}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert main(["generate", str(model), "--prompt", "a" * 30, "--max-new-tokens", "1"]) == 1
    (line,) = _error_lines(capsys)
    assert "a native library stopped on this input" in line and "retry-limit" in line


def test_a_gguf_of_millions_of_metadata_items_or_with_rope_bytes_that_are_no_text_is_one_line(tmp_path, monkeypatch,
                                                                                               capsys):
    """gguf reads an array item by item, a few Python objects each: 1 million empty strings (8 MB) took 1.6 GB and
    21 s, twice; four arrays of 200k each, under the limit of one, 1.4 GB. Here the limits are lowered under the tiny
    file's 96-token vocabulary. And a RoPE scaling type of
    bytes that are no UTF-8 text ended in a UnicodeDecodeError's traceback."""
    from encdec.formats import gguf as gguf_format

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    plain = {"rope_type": "default", "rope_theta": 10000.0}
    source = make_source(tmp_path / "llama", "llama", rope_parameters=plain)
    path = write_gguf(source, tmp_path / "l.gguf")
    monkeypatch.setattr(gguf_format, "MAX_ARRAY_ITEMS", 50)
    assert main(["adapt", "--encoder", str(path), "--out", str(tmp_path / "out")]) == 2
    (line,) = _error_lines(capsys)
    assert "a metadata array claims 96 items, more than any model's 50" in line
    monkeypatch.setattr(gguf_format, "MAX_ARRAY_ITEMS", 100)  # arrays under it, their values together over the total
    monkeypatch.setattr(gguf_format, "MAX_VALUES", 200)
    assert main(["adapt", "--encoder", str(path), "--out", str(tmp_path / "out")]) == 2
    (line,) = _error_lines(capsys)
    assert "its metadata holds more than 200 values, more than any model's" in line
    monkeypatch.undo()
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    odd = write_gguf(source, tmp_path / "odd.gguf", claims={"rope.scaling.type": "QZQZ"})
    odd.write_bytes(odd.read_bytes().replace(b"QZQZ", b"\xff\xfe\xff\xfe"))
    assert main(["adapt", "--encoder", str(odd), "--out", str(tmp_path / "out")]) == 2
    (line,) = _error_lines(capsys)
    assert "llama.rope.scaling.type is neither text nor a number" in line, line


def test_a_checkpoint_that_cannot_be_read_for_now_is_not_set_aside_as_damaged(run, adapted, corpus, tmp_path,
                                                                                 monkeypatch):
    """An I/O error (a stale NFS handle, EIO, a permission) made the newest checkpoint "damaged": the run resumed
    from an older one, trained its steps again, and renamed the good one aside for good."""
    import errno

    from encdec.training import plain_state

    out = shutil.copytree(run, tmp_path / "run")
    newest = checkpointing.checkpoints(out)[-1]
    real = plain_state.read_small

    def stale(path):
        if path.parent == newest:
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(path)

    monkeypatch.setattr(plain_state, "read_small", stale)
    with pytest.raises(EncdecError, match="Stale file handle; nothing is set aside"):
        loop.train(_config(adapted, out, corpus, steps=3, save_every=1, eval_every=0, resume=True))
    assert [p.name for p in checkpointing.checkpoints(out)][-1] == newest.name
    assert not [p for p in (out / "checkpoints").iterdir() if ".damaged-" in p.name]
    # an optimizer state that is a pipe: safetensors' open waited for a writer for ever (here in a process of its
    # own, killed by its time limit if that comes back); read as unreadable for now, not as damaged
    (newest / "optimizer.safetensors").unlink()
    os.mkfifo(newest / "optimizer.safetensors")
    code = ("import sys; from pathlib import Path; from encdec.training.plain_state import read_state; "
            "from encdec.errors import ReadFailed\n"
            "try: read_state(Path(sys.argv[1]), 'optimizer')\nexcept ReadFailed as e: sys.exit(f'ReadFailed: {e}')")
    done = subprocess.run([sys.executable, "-c", code, str(newest)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert "ReadFailed: cannot read" in done.stderr and "not a regular file" in done.stderr, done.stderr


def test_a_resumed_run_removes_half_written_checkpoints_of_any_machine(run, adapted, corpus, tmp_path):
    """A save killed mid-write leaves .step-N.tmp-HOST-PID-xxxxxxxx (weights and two optimizer moments); only a
    later save from the same machine and container removed it, so a job restarted on another node kept its
    predecessor's for good. Under the run's lock none can still be written. A previous version moved aside by a
    write killed between its renames is put back, and a folder of the user's stays."""
    out = shutil.copytree(run, tmp_path / "run")
    checkpoints = out / "checkpoints"
    leftover = checkpoints / ".step-000003.tmp-othernode-ns4026531836-4242-abcd1234"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    kept = checkpoints / ".step-000001.old-othernode-4242-abcd1234"
    kept.mkdir()
    (checkpoints / "step-000001").rename(kept / "step-000001")
    mine = checkpoints / ".my-notes"
    mine.mkdir()
    loop.train(_config(adapted, out, corpus, steps=3, save_every=1, eval_every=0, resume=True))
    assert not leftover.exists() and not kept.exists() and mine.is_dir()
    assert {p.name for p in checkpointing.checkpoints(out)} >= {"step-000002", "step-000003"}
