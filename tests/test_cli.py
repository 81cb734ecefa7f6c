"""The command line on tiny checkpoints: adapt, info, generate, help."""

from __future__ import annotations

import os

import pytest

from encdec.cli import build_parser, main


def test_adapt_then_info(capsys, tmp_path, sources):
    out = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma2"]), "--decoder-layers", "::2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transformers loads it as T5GemmaForConditionalGeneration" in printed
    assert "cross-attention" in printed
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "T5GemmaForConditionalGeneration" in info
    assert "decoder      2 layers" in info and "encoder      4 layers" in info
    for part in ("embeddings", "encoder", "decoder", "cross-attention", "total"):
        assert f"  {part}" in info


def test_output_into_a_closed_pipe_ends_quietly(tmp_path, sources):
    """`encdec info M | head -1`: the reader leaves, and Python's exit printed a BrokenPipeError traceback."""
    import subprocess
    import sys

    out = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma2"]), "--out", str(out)]) == 0
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line is written
    try:
        done = subprocess.run([sys.executable, "-m", "encdec.cli", "info", str(out)], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    finally:
        os.close(write)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr



def test_a_command_started_with_standard_output_closed_works(tmp_path, sources, monkeypatch):
    """Python starts such a process with sys.stdout None, where print() writes nothing; main's flush crashed."""
    out = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma2"]), "--out", str(out)]) == 0
    monkeypatch.setattr("sys.stdout", None)
    assert main(["info", str(out)]) == 0


def test_a_closed_socket_on_standard_output_ends_quietly(tmp_path, sources, monkeypatch, capsys):
    """A socket's peer leaving is a hang-up, not a pipe's error: both are a reader that has what it wanted."""
    import socket

    out = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma2"]), "--out", str(out)]) == 0
    ours, theirs = socket.socketpair()
    theirs.close()
    monkeypatch.setattr("sys.stdout", open(ours.fileno(), "w", closefd=False))  # noqa: SIM115
    try:
        assert main(["info", str(out)]) == 1
    finally:
        ours.close()
    assert "error" not in capsys.readouterr().err


def test_a_pipe_other_than_standard_output_breaking_is_said(capsys, monkeypatch):
    """Only a reader of standard output leaving is quiet; another broken pipe (a worker, a socket) is an error."""
    import argparse

    def broken(args: argparse.Namespace) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    parser = build_parser()
    monkeypatch.setattr("encdec.cli.build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["info"].set_defaults(func=broken)
    assert main(["info", "x"]) == 1
    assert "encdec info: error: [Errno 32] Broken pipe" in capsys.readouterr().err


def test_own_format_is_reported(capsys, tmp_path, sources):
    out = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--attention", "cross", "--out", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    assert "format encdec" in capsys.readouterr().out


def test_generate_prints_continuations_and_needs_a_tokenizer(capsys, tmp_path, sources):
    out = tmp_path / "model"
    main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w1 w2 w3", "--prompt", "w7", "--max-new-tokens", "4",
                 "--do-sample", "--seed", "1", "--top-k", "5", "--repetition-penalty", "1.2", "--frequency-penalty", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" -> ")[0] for line in lines] == ["w1 w2 w3", "w7"]
    assert main(["generate", str(out), "--prompt", "w1 w2 w3", "--max-new-tokens", "3", "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("w1 w2 w3 -> ")
    # sampling settings without --do-sample: greedy, and said (transformers' generate warns alike)
    assert main(["generate", str(out), "--prompt", "w1", "--max-new-tokens", "2", "--temperature", "5", "--top-k", "3"]) == 0
    assert "--temperature, --top-k apply to sampling (--do-sample); greedy decoding ignores them" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "w1", "--quantize", "int8", "--dtype", "bfloat16"]) == 2
    assert "float32" in capsys.readouterr().err
    for tokenizer_file in out.glob("tokenizer*"):
        tokenizer_file.unlink()
    assert main(["generate", str(out), "--prompt", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


COMMANDS = ["adapt", "generate", "serve", "info", "quickstart", "pretrain", "finetune", "evaluate", "classify",
            "export", "export-encoder"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_every_option_with_its_default(command, capsys):
    """As the README says: every option of --help has a line of help, and its default where it has one."""
    import argparse

    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: encdec " + command in capsys.readouterr().out
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        has_default = action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, list)
        if has_default:
            shown = sub.formatter_class(command)._get_help_string(action)
            assert "(default:" in shown or "%(default)" in action.help, \
                f"{command} {action.option_strings[0]} does not show its default {action.default!r}"


def test_finetune_help_speaks_of_instructions(capsys):
    """finetune shares pretraining's options but not their help: its --data takes instruction records, not corpora."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    data = capsys.readouterr().out.split("--data PATH")[-1].split("\n  --")[0]
    assert ".jsonl" in data and "corpus:" not in data and "Natural-Instructions" in data


def test_negative_numbers_in_scientific_notation_are_values():
    """argparse took -1e-4 for an option ('expected one argument') while it took -0.5 as a value."""
    from encdec.cli import build_parser

    args = build_parser().parse_args(["generate", "d", "--prompt", "x", "--presence-penalty", "-1e-1",
                                      "--frequency-penalty", "-.5E+0"])
    assert (args.presence_penalty, args.frequency_penalty) == (-0.1, -0.5)
    assert build_parser().parse_args(["pretrain", "--lr", "-1e-4"]).lr == -1e-4  # then refused as not positive
    assert main(["pretrain", "--lr", "-1e-4"]) == 2
