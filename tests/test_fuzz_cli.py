"""Fuzzed command-line values on tiny models: every run ends with exit 0, or exit 2 and one line, never a
traceback and never a partial output."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encdec.cli import main

ODD = ["", " ", "nan", "NaN", "inf", "-inf", "-0", "0", "-1", "1e308", "99999999999999999999", "0x10", "abc", "1,2",
       "::", "/", "..", "/dev/null", "é", "\t"]
VALUES = st.one_of(st.sampled_from(ODD), st.integers(-3, 40).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))
# values each option accepts, mixed in so that runs get past the first refusal (gemma3-small has 2 layers)
ACCEPTED = {"--dtype": ["float32", "bfloat16"], "--attention": ["merged", "cross"],
            "--decoder-layers": ["0", "1", "0,1", "::2", "1:", "0:1", "1,0", "0,0"], "--prompt": ["w4 w5", "é"],
            "--temperature": ["0.7", "1e-3"], "--top-p": ["0.9", "0.001"], "--top-k": ["5"], "--max-new-tokens": ["3"],
            "--tau": ["2.0"], "--alpha": ["0.5"], "--lr": ["1e-3"], "--clip": ["1.0"], "--min-lr-ratio": ["0.1"],
            "--trim-vocab": ["48", "96"], "--teacher-top-k": ["4"]}
FUZZ = settings(max_examples=24, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own exits
        return int(e.code)


def _check(capsys, code: int) -> str:
    """Exit 0, or exit 2 with exactly one line on stderr that says what was wrong; returns that line."""
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 0:
        return ""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def _options(names: list[str]):
    """Some of `names`, each with a fuzzed value or, as often, one it accepts."""
    def valued(name: str):
        accepted = ACCEPTED.get(name)
        value = st.booleans().flatmap(lambda ok: st.sampled_from(accepted) if ok else VALUES) if accepted else VALUES
        return st.tuples(st.just(name), value)

    return st.lists(st.sampled_from(names).flatmap(valued), max_size=3)


@pytest.fixture(scope="module")
def model(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "model"
    assert main(["adapt", "--encoder", str(sources["gemma3-small"]), "--out", str(out)]) == 0
    return out


@FUZZ
@given(options=_options(["--decoder-layers", "--seed", "--attention", "--dtype", "--out"]))
def test_adapt(capsys, sources, options):
    capsys.readouterr()
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "out"
        argv = ["adapt", "--encoder", str(sources["gemma3-small"]), "--out", str(out)]
        for name, value in options:
            argv += [name, str(Path(root) / value) if name == "--out" else value]
        code = _exit_code(argv)
        _check(capsys, code)
        written = list(Path(root).rglob("*"))
        assert not [p for p in written if ".tmp-" in p.name], written  # no temporary left
        if code == 2:
            assert written == [], written  # nothing half-written


@FUZZ
@given(options=_options(["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--prompt"]),
       sample=st.booleans())
def test_generate(capsys, model, options, sample):
    capsys.readouterr()
    argv = ["generate", str(model), "--prompt", "w1 w2 w3"] + (["--do-sample"] if sample else [])
    argv += [item for option in options for item in option]
    code = _exit_code(argv)
    printed = capsys.readouterr()
    assert code in (0, 2) and "Traceback" not in printed.err, printed.err
    if code == 2:
        assert len([line for line in printed.err.splitlines() if "error:" in line]) == 1, printed.err
        assert printed.out == ""  # no continuation printed before the error
    else:
        assert " -> " in printed.out


PRETRAIN = ["--steps", "--enc-len", "--dec-len", "--batch-size", "--save-every", "--log-every", "--eval-every",
            "--eval-windows", "--tau", "--alpha", "--lr", "--warmup-steps", "--keep-last", "--average-last", "--seed",
            "--trim-vocab", "--loss-chunk", "--grad-accum", "--teacher-top-k", "--clip", "--min-lr-ratio", "--out"]


@settings(FUZZ, max_examples=16)
@given(options=_options(PRETRAIN), distill=st.booleans())
def test_pretrain(capsys, model, corpus, options, distill):
    capsys.readouterr()
    root = Path(tempfile.mkdtemp())
    try:
        out = root / "run"
        argv = ["pretrain", "--model", str(model), "--data", str(corpus), "--out", str(out), "--enc-len", "16",
                "--dec-len", "16", "--eval-windows", "4", "--precision", "fp32", "--batch-size", "2", "--steps", "1"]
        argv += ["--distill"] if distill else []
        for name, value in options:
            if name == "--steps" and value.isdigit():
                value = str(min(int(value), 1))  # a run that works also takes time: one step at most
            argv += [name, str(root / value) if name == "--out" else value]
        code = _exit_code(argv)
        line = _check(capsys, code)
        if code == 2 and "stopped (" not in line:  # refused: nothing written (a NaN stop keeps its checkpoints)
            assert [p for p in root.rglob("*")] == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
