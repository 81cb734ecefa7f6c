"""The command line on tiny checkpoints: adapt, info, generate, help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from encdec.cli import build_parser, main
from encdec.errors import EncdecError


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
    assert "(2 local, window 4)" in info and "the t5gemma convention" in info
    # a model of global layers only (Llama): no "0 local, window 4096", no window convention of layers it lacks
    assert main(["adapt", "--encoder", str(sources["llama"]), "--out", str(tmp_path / "llama")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "llama")]) == 0
    info = capsys.readouterr().out
    assert "encoder      4 layers (all global)" in info and "convention" not in info


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


def test_serving_without_the_serve_extra_is_one_line(capsys, monkeypatch):
    """Installed without [serve], `encdec serve` ended in uvicorn's ModuleNotFoundError traceback."""
    for name in [n for n in sys.modules if n.startswith("encdec.serve")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve", "/nonexistent"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == "encdec serve: error: serving needs the serve extra (uvicorn is not installed): pip install -e " \
                   "'.[serve]'"


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_a_device_out_of_memory_is_one_line_naming_the_sizes_to_lower(capsys, monkeypatch, device):
    """A batch too large for a GPU printed torch's traceback, screens of it; on a CPU (a RuntimeError of its
    allocator's) it still did."""
    import torch

    def too_large(args):
        if device == "cpu":
            torch.empty(10**14)  # 400 TB: refused by the allocator (not left to the kernel's OOM killer)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    def parser_raising():
        import argparse

        parser = build_parser()
        next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["info"].set_defaults(
            func=too_large)
        return parser

    monkeypatch.setattr("encdec.cli.build_parser", parser_raising)
    assert main(["info", "x"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    if device == "cpu":
        assert line.startswith("encdec info: error: out of memory (DefaultCPUAllocator: can't allocate memory"), line
    else:
        assert line.startswith("encdec info: error: out of memory on the device (CUDA out of memory. Tried to allocate")
    assert "--batch-size" in line and "more detail" not in line


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
    assert main(["generate", str(out), "--prompt", "w1 w2 w3", "--prompt", "w7", "--max-new-tokens", "24",
                 "--do-sample", "--seed", "1", "--top-k", "5", "--repetition-penalty", "1.2", "--frequency-penalty", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" -> ")[0] for line in lines] == ["w1 w2 w3", "w7"]
    import torch

    from encdec.data.chat import ChatFormat
    from encdec.inference.loading import load_for_inference
    from encdec.sources import load_tokenizer

    model, tokenizer = load_for_inference(out, torch.float32, None), load_tokenizer(out)
    stop = list(ChatFormat.of(tokenizer).stop_ids(model.config.eos_token_ids))
    for i, (text, shown) in enumerate(zip(["w1 w2 w3", "w7"], lines)):  # prompt i samples with seed + i
        ids = model.generate(torch.tensor([tokenizer(text).input_ids]), max_new_tokens=24, do_sample=True, seed=1 + i,
                             top_k=5, repetition_penalty=1.2, frequency_penalty=1.0, eos_token_ids=stop)[0]
        assert shown == f"{text} -> {tokenizer.decode(ids, skip_special_tokens=True)}"
    unlimited = []  # --top-k 0 and -1 (vLLM's and the server's way): no limit (-1 was refused)
    for k in ("0", "-1"):
        assert main(["generate", str(out), "--prompt", "w1", "--max-new-tokens", "8", "--do-sample", "--seed", "2",
                     "--top-k", k]) == 0
        unlimited.append(capsys.readouterr().out)
    assert unlimited[0] == unlimited[1]
    likeliest = []  # --top-p 0: the likeliest token alone, as the server reads it (it was refused)
    for flags in (["--top-p", "0"], []):
        assert main(["generate", str(out), "--prompt", "w1", "--max-new-tokens", "8", *flags,
                     *(["--do-sample", "--seed", "2", "--temperature", "3"] if flags else [])]) == 0
        likeliest.append(capsys.readouterr().out)
    assert likeliest[0] == likeliest[1]
    assert main(["generate", str(out), "--prompt", "w1", "--do-sample", "--top-k", "-2"]) == 2
    assert "top_k (--top-k) must be at least 1" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "w1 w2 w3", "--max-new-tokens", "3", "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("w1 w2 w3 -> ")
    assert main(["generate", str(out), "--prompt", "w1", "--prompt", "w2", "--max-new-tokens", "2", "--quantize",
                 "int8"]) == 0
    assert "depend on the prompts and inputs computed with it" in capsys.readouterr().err
    # sampling settings without --do-sample: greedy, and said (transformers' generate warns alike)
    assert main(["generate", str(out), "--prompt", "w1", "--max-new-tokens", "2", "--temperature", "5", "--top-k", "3"]) == 0
    assert "--temperature, --top-k apply to sampling (--do-sample); greedy decoding ignores them" in capsys.readouterr().err
    # ... and with --do-sample at a temperature that is greedy decoding; --overwrite without a file; int8 one at a time
    assert main(["generate", str(out), "--prompt", "w1", "--max-new-tokens", "2", "--do-sample", "--temperature",
                 "1e-6", "--seed", "3", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "--temperature 1e-06 (below 1e-05) is greedy decoding, which ignores --seed" in err
    assert "--overwrite applies to an --out FILE; standard output ignores it" in err
    assert main(["generate", str(out), "--prompt", "w1", "--prompt", "w2", "--max-new-tokens", "2", "--quantize",
                 "int8", "--batch-size", "1"]) == 0
    assert "depend on the prompts and inputs computed with it" not in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "w1", "--quantize", "int8", "--dtype", "bfloat16"]) == 2
    assert "float32" in capsys.readouterr().err
    for tokenizer_file in out.glob("tokenizer*"):
        tokenizer_file.unlink()
    assert main(["generate", str(out), "--prompt", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_generate_over_a_file_keeps_the_order_and_each_prompt_s_solo_tokens(capsys, tmp_path, sources, monkeypatch):
    """--input: prompts join as rows end (--batch-size 2 for 5 prompts of different lengths), each line comes out in
    the prompts' order with the record's own fields, and its tokens are those of generating it alone."""
    import io
    import json

    import torch

    import encdec
    from encdec.data.chat import ChatFormat
    from encdec.data.instructions import conversation

    out = tmp_path / "model"
    main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    records = [{"id": "a", "prompt": "w1 w2 w3 w4 w5 w6 w7"}, {"prompt": "w7"},
               {"id": 3, "messages": [{"role": "system", "content": "w9"}, {"role": "user", "content": "w4 w5"}]},
               {"id": "d", "prompt": "w8 w8 w9"}, {"id": "e", "prompt": "w2", "reference": "w3"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    common = ["--max-new-tokens", "6", "--batch-size", "2"]
    assert main(["generate", str(out), "--input", str(prompts), "--out", str(tmp_path / "done.jsonl"), *common]) == 0
    lines = [json.loads(line) for line in (tmp_path / "done.jsonl").read_text().splitlines()]
    assert capsys.readouterr().out == ""
    assert [{k: v for k, v in line.items() if k in records[i]} for i, line in enumerate(lines)] == records
    model, tokenizer = encdec.load(out), encdec.load_tokenizer(out)
    chat = ChatFormat.of(tokenizer)
    for record, line in zip(records, lines):
        ids = (tokenizer(record["prompt"]).input_ids if "prompt" in record
               else chat.encode(conversation(record["messages"])))
        alone = model.generate(torch.tensor([ids]), max_new_tokens=6,
                               eos_token_ids=list(chat.stop_ids(model.config.eos_token_ids)))[0].tolist()
        alone = [t for t in alone if t != model.config.pad_token_id]
        assert line["completion"] == tokenizer.decode(alone, skip_special_tokens=True)
        assert (line["prompt_tokens"], line["completion_tokens"]) == (len(ids), len(alone))
        assert line["finish_reason"] == ("length" if len(alone) == 6 else "stop")
    # the same on standard output, and from standard input
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(prompts.read_bytes())))
    assert main(["generate", str(out), "--input", "-", *common]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines
    assert main(["generate", str(out), "--prompt", records[1]["prompt"], "--out", "-", *common]) == 0  # - : stdout
    assert json.loads(capsys.readouterr().out) == lines[1] and not (Path.cwd() / "-").exists()
    # a chat request as the server takes it (content parts, joined as vLLM joins them), logged and given again
    parted = {"id": 3, "messages": [{"role": "system", "content": [{"type": "text", "text": "w9"}]},
                                    {"role": "user", "content": [{"type": "text", "text": "w4"},
                                                                 {"type": "text", "text": "w5"}]}]}
    joined = {"id": 3, "messages": [{"role": "system", "content": "w9"}, {"role": "user", "content": "w4\nw5"}]}
    for record in (parted, joined):
        prompts.write_text(json.dumps(record) + "\n")
        assert main(["generate", str(out), "--input", str(prompts), "--out", "-", *common]) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["completion"] == second["completion"] and first["prompt_tokens"] == second["prompt_tokens"]
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}) + "\n")
    assert main(["generate", str(out), "--input", str(prompts), *common]) == 2
    assert "content parts must be {\"type\": \"text\", \"text\": ...}; this model reads text only" in \
        capsys.readouterr().err
    prompts.write_text(json.dumps({"text": "w1"}) + "\n")  # the roles accepted, all of them (developer too) said
    assert main(["generate", str(out), "--input", str(prompts), *common]) == 2
    assert '"role": "user|assistant|model|system|developer"' in capsys.readouterr().err


def test_generate_out_keeps_the_finished_completions_of_a_run_that_stops(capsys, tmp_path, adapted, monkeypatch):
    """--out was written once every prompt was done: out of memory in a late prompt's encoder pass, or Ctrl-C,
    lost every finished completion. They are kept in OUT.partial (OUT itself is not written: it would read as the
    whole run)."""
    import json

    import encdec.generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": k, "prompt": f"w{k} w{k + 1}"}) + "\n" for k in range(6)))
    real = encdec.generate.generate_each

    def stops_after_two(*args, **kwargs):
        for n, i in enumerate(real(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield i

    monkeypatch.setattr(encdec.generate, "generate_each", stops_after_two)
    out = tmp_path / "done.jsonl"
    assert main(["generate", str(adapted), "--input", str(prompts), "--out", str(out), "--batch-size", "1",
                 "--max-new-tokens", "3"]) == 130
    assert not out.exists()
    kept = [json.loads(line) for line in (tmp_path / "done.jsonl.partial").read_text().splitlines()]
    assert [line["id"] for line in kept] == [0, 1] and all("completion" in line for line in kept)
    assert "2 of 6 completion(s) finished before the run stopped: kept in" in capsys.readouterr().err
    # an earlier run's partial is not replaced unasked; with --overwrite, by this run's if it stops too
    assert main(["generate", str(adapted), "--input", str(prompts), "--out", str(out), "--max-new-tokens", "3"]) == 2
    assert "done.jsonl.partial holds the completions of an earlier run that stopped" in capsys.readouterr().err
    assert len((tmp_path / "done.jsonl.partial").read_text().splitlines()) == 2

    def finished_out_of_order(*args, **kwargs):  # prompt 0 still decoding when 2 and 3 end, then Ctrl-C
        list(real(*args, **kwargs))  # (every row's tokens made)
        yield from [1, 2, 3]
        raise KeyboardInterrupt

    monkeypatch.setattr(encdec.generate, "generate_each", finished_out_of_order)
    assert main(["generate", str(adapted), "--input", str(prompts), "--batch-size", "2",
                 "--max-new-tokens", "3"]) == 130
    printed = capsys.readouterr()
    assert [json.loads(line)["id"] for line in printed.out.splitlines()] == [1, 2, 3]  # none in order: 0 never ended
    assert "the last 3 line(s) printed finished behind a prompt still decoding" in printed.err


def test_generate_does_not_replace_an_out_written_while_it_ran(capsys, tmp_path, adapted, monkeypatch):
    """--out was checked before the model loaded and replaced at the end: a second run given the same --out (or the
    user's own file, made meanwhile) was overwritten without --overwrite. Now it stays, and the completions are
    kept in OUT.partial."""
    import encdec.generate

    out, real = tmp_path / "done.jsonl", encdec.generate.generate_each

    def meanwhile(*args, **kwargs):
        yield from real(*args, **kwargs)
        out.write_text("the user's own\n")

    monkeypatch.setattr(encdec.generate, "generate_each", meanwhile)
    assert main(["generate", str(adapted), "--prompt", "w1", "--out", str(out), "--max-new-tokens", "2"]) == 2
    assert out.read_text() == "the user's own\n" and "written by something else" in capsys.readouterr().err
    assert len(out.with_name("done.jsonl.partial").read_text().splitlines()) == 1


def test_generate_with_stderr_closed_ends_well(tmp_path, adapted, monkeypatch):
    """`2>&-`: every completion was written, then the summary line's print raised, and the run exited 1."""
    import errno
    import io

    class Closed(io.TextIOBase):  # as file descriptor 2 closed: every write fails with EBADF
        def write(self, text: str) -> int:
            raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr("sys.stderr", Closed())
    out = tmp_path / "done.jsonl"
    assert main(["generate", str(adapted), "--prompt", "w1", "--out", str(out), "--max-new-tokens", "2"]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_signals_ignored_by_the_parent_stay_ignored_and_a_second_one_is_not_caught(monkeypatch):
    """`nohup` starts a process with SIGHUP ignored: generate's handler replaced that, and a closed terminal
    stopped the run. A hung-up terminal's EIO where the held lines are printed replaced the stop with a traceback."""
    import errno
    import io
    import signal

    from encdec.cli import _keep_finished
    from encdec.signals import Signalled, signals_interrupt

    before = {sig: signal.signal(sig, handler) for sig, handler in ((signal.SIGHUP, signal.SIG_IGN),
                                                                    (signal.SIGTERM, signal.SIG_DFL))}
    try:
        with signals_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            handler = signal.getsignal(signal.SIGTERM)
            with pytest.raises(Signalled):
                handler(signal.SIGTERM, None)
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM ends the process
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)

    class HungUp(io.TextIOBase):
        def write(self, text: str) -> int:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("sys.stdout", HungUp())
    _keep_finished(None, ["line 0", None, "line 2"], 0)  # (no exception: what stopped the run is said)


def test_generate_stopped_by_sigterm_keeps_its_finished_completions(capsys, tmp_path, adapted, monkeypatch):
    """SIGTERM (a batch system's time limit, `timeout`, `docker stop`) and SIGHUP ended the process at once: with
    --out nothing was written, without it the lines held behind a prompt still decoding were lost. Stopped as
    Ctrl-C stops it, exit status 128 + the signal's number; a reader gone with the pipe loses nothing but them."""
    import json
    import os
    import signal
    import time

    import encdec.generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": k, "prompt": f"w{k} w{k + 1}"}) + "\n" for k in range(4)))
    real = encdec.generate.generate_each

    def signalled_after_two(sig):
        def each(*args, **kwargs):
            for n, i in enumerate(real(*args, **kwargs)):
                if n == 2:
                    os.kill(os.getpid(), sig)
                    time.sleep(30)  # (the signal's handler raises here)
                    pytest.fail("the signal did not stop the run")
                yield i
        return each

    class Unhandled(Exception):  # the signal reached this test's own handler: the run did not take it
        pass

    def unhandled(signum, frame):
        raise Unhandled(signum)

    before = {sig: signal.signal(sig, unhandled) for sig in (signal.SIGTERM, signal.SIGHUP)}  # (not pytest's end)
    try:
        for sig, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
            out = tmp_path / f"{sig.name}.jsonl"
            monkeypatch.setattr(encdec.generate, "generate_each", signalled_after_two(sig))
            assert main(["generate", str(adapted), "--input", str(prompts), "--out", str(out), "--batch-size", "1",
                         "--max-new-tokens", "3"]) == code
            kept = [json.loads(line)["id"] for line in out.with_name(f"{out.name}.partial").read_text().splitlines()]
            assert kept == [0, 1] and not out.exists()
            assert f"encdec generate: stopped by {sig.name}" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is unhandled  # put back once the run is over
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    # an --out that is another user's link to nothing: its target was made, wherever the link (planted in a shared
    # /tmp) pointed (one's own link to a file still to be made is written through)
    from encdec.files import check_output_file

    planted = tmp_path / "planted.jsonl"
    planted.symlink_to(tmp_path / "elsewhere" / "x.jsonl")
    with monkeypatch.context() as patch:
        patch.setattr(os, "getuid", lambda: planted.lstat().st_uid + 1)  # as the run of another user than its owner
        with pytest.raises(EncdecError, match="planted.jsonl is another user's link to .*elsewhere"):
            check_output_file(planted, (), False)
    assert check_output_file(planted, (), False) == tmp_path / "elsewhere" / "x.jsonl"  # one's own: through it
    assert not (tmp_path / "elsewhere").exists()
    # an output folder's --out alike (adapt, export, classify...): followed, the folder was made where it pointed
    folder = tmp_path / "planted-model"
    folder.symlink_to(tmp_path / "elsewhere" / "model")
    with monkeypatch.context() as patch:
        patch.setattr(os, "getuid", lambda: folder.lstat().st_uid + 1)
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            main(["adapt", "--out", str(folder)])
        assert refused.value.code == 2 and "planted-model is another user's link to" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("command", ["generate", "adapt"])
def test_an_out_name_too_long_for_its_temporary_is_refused_before_any_work(capsys, tmp_path, adapted, sources,
                                                                           command):
    """The final name fitted the filesystem's 255 bytes, the temporary written beside it (.NAME.tmp-HOST-PID-...)
    did not: every completion was generated, then the write failed, nothing kept (the .partial too long as well)."""
    out = tmp_path / ("b" * 235 + ".jsonl")
    arguments = ([str(adapted), "--prompt", "w1", "--out", str(out)] if command == "generate"
                 else ["--encoder", str(sources["gemma3"]), "--out", str(out)])
    assert main([command, *arguments]) == 2
    err = capsys.readouterr().err
    assert "its name is too long for the temporary written beside it" in err and "loading" not in err
    assert list(tmp_path.iterdir()) == []


GENERATE_INPUT_BAD = [
    ('{"prompt": "w1"}\n{"text": "w2"}\n', [], "prompts.jsonl, line 2: give either 'prompt' or 'messages'"),
    ('{"prompt": "w1"}\n{"prompt": 3}\n', [], "line 2: 'prompt' must be a string, got int"),
    ('{"messages": [{"role": "assistant", "content": "w1"}]}\n', [], "line 1: the last message must be a user message"),
    ('{"prompt": "w1"\n', [], "line 1: not valid JSON"),
    ("", [], "no prompts in it"),
    ('{"prompt": "w1"}\n', ["--prompt", "w2"], "as --prompt TEXT (repeatable) or as --input FILE, not both"),
    ('{"prompt": "w1", "completion": "w2", "id": 1}\n', [], "line 1: the record has 'completion', which its output"),
    ('{"prompt": "w1", "score": NaN}\n', [], "line 1: not valid JSON"),
    ('{"prompt": "w1", "score": 1e400}\n', [], "line 1: a number too large for a float"),
    ('{"prompt": "w1 \\ud800"}\n', [], "line 1: a string holds a \\uD800-\\uDFFF escape that is not half"),
    ('{"prompt": "w1", "id": "\\ud800"}\n', [], "line 1: a string holds a \\uD800-\\uDFFF escape"),  # written back
    ('{"messages": [{"role": "user", "content": "w1", "name": "\\udc00"}]}\n', [], "line 1: a string holds a"),
    ('{"prompt": "w1"}\n', ["--out", "{model}/config.json"], "is inside the input"),
    ('{"prompt": "w1"}\n', ["--out", "{input}/x.jsonl"], "exists and is not a directory"),
    ('{"prompt": "w1"}\n', ["--out", "{model}"], "is the input"),
    ('{"prompt": "w1"}\n', ["--out", "{input}"], "is the input"),
    ('{"prompt": "w1"}\n', ["--batch-size", "0"], "--batch-size must be in 1..4096 (rows decoded together"),
    ('{"prompt": "w1"}\n', ["--batch-size", "4097"], "--batch-size must be in 1..4096"),  # (out of memory)
    ('{"prompt": "w1"}\n', ["--out", "{pipe}"], "pipe is not a regular file"),  # (a device too: /dev/null was replaced)
    ('{"prompt": "w1"}\n{"prompt": "' + " ".join(["w5"] * 300) + '"}\n', [],
     "prompts.jsonl:2: the prompt has 301 tokens; this model reads at most 256"),
    ('{"prompt": "' + " ".join(["w5"] * 300) + '"}\n', [], "prompts.jsonl:1: the prompt has 301 tokens"),
    ('{"prompt": "w1"}\n', ["--max-new-tokens", "300"], "--max-new-tokens 300: this model's decoder reads at most"),
]


@pytest.mark.parametrize("text, extra, message", GENERATE_INPUT_BAD, ids=[m[:30] for _, _, m in GENERATE_INPUT_BAD])
def test_a_bad_prompt_file_is_one_line_and_writes_nothing(capsys, tmp_path, sources, text, extra, message):
    out = tmp_path / "model"
    main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(text)
    capsys.readouterr()
    os.mkfifo(tmp_path / "pipe")  # never /dev/null here: a regression would replace it for the whole machine
    extra = [e.format(input=prompts, model=out, pipe=tmp_path / "pipe") for e in extra]
    before = {p: p.read_bytes() for p in out.iterdir()}
    assert main(["generate", str(out), "--input", str(prompts), *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], lines
    assert "loading" not in err  # refused before the model is loaded
    assert prompts.read_text() == text and (tmp_path / "pipe").is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pipe", "prompts.jsonl"]
    assert {p: p.read_bytes() for p in out.iterdir()} == before


def test_generate_out_through_a_link_to_a_pipe_is_refused_before_generating(capsys, tmp_path, sources):
    """`--out /dev/stdout | cat`: the link names /proc/PID/fd/pipe:[N], which no path reaches; the checks passed,
    and the write failed with a traceback once every completion was generated."""
    out = tmp_path / "model"
    main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    read, write = os.pipe()
    try:
        (tmp_path / "stdout").symlink_to(f"/proc/{os.getpid()}/fd/{write}")  # what /dev/stdout is in a pipeline
        capsys.readouterr()
        assert main(["generate", str(out), "--prompt", "w1", "--out", str(tmp_path / "stdout")]) == 2
    finally:
        os.close(read)
        os.close(write)
    err = capsys.readouterr().err
    assert "leads to a device, a pipe or a socket, not a file; - writes to standard output" in err
    assert "loading" not in err


def test_generate_samples_each_prompt_apart_writes_through_a_link_and_refuses_a_token_past_the_vocabulary(
        capsys, tmp_path, sources, monkeypatch):
    """With --seed the n-th prompt samples from seed + n - 1 (the same prompt twice gave the same sample); --out a
    symbolic link writes the file it names; `~` is the home folder in MODEL and --out=; a tokenizer's token past
    the model's embeddings (Gemma 3's <image_soft_token>) is one line before loading, not the embedding's
    IndexError."""
    import copy
    import json

    import encdec

    out = tmp_path / "model"
    main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    target, link = tmp_path / "kept" / "samples.jsonl", tmp_path / "link.jsonl"
    target.parent.mkdir()
    link.symlink_to(target)
    sampled = ["--do-sample", "--seed", "3", "--max-new-tokens", "8"]
    assert main(["generate", str(out), "--prompt", "w1", "--prompt", "w1", *sampled, "--out", str(link)]) == 0
    assert link.is_symlink() and link.resolve() == target
    first, second = [json.loads(line)["completion"] for line in target.read_text().splitlines()]
    assert first != second
    capsys.readouterr()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["generate", "~/model", "--prompt", "w1", *sampled, "--out=~/alone.jsonl"]) == 0
    assert json.loads((tmp_path / "alone.jsonl").read_text())["completion"] == first  # the first: the seed itself
    # an existing --out is an earlier run's completions: replaced with --overwrite only (it was replaced unasked)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w2", "--out", str(link)]) == 2
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert [json.loads(line)["completion"] for line in target.read_text().splitlines()] == [first, second]
    assert main(["generate", str(out), "--prompt", "w2", "--out", str(link), "--overwrite"]) == 0
    assert json.loads(target.read_text())["prompt"] == "w2" and link.is_symlink()
    tokenizer = copy.deepcopy(encdec.load_tokenizer(out))  # never the loader's memoised one
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    tokenizer.save_pretrained(out)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w1 <image_soft_token>"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "--prompt 1: token '<image_soft_token>' (id 96) is outside this model's vocabulary" in \
        lines[0] and "loading" not in err, err


def test_a_prompt_whose_scores_overflow_fails_alone_and_the_others_are_written(capsys, tmp_path, adapted,
                                                                              monkeypatch):
    """Scores that are not finite numbers (an overflow) in one prompt's sampling lost the whole run, every
    completion generated so far, without naming the prompt."""
    import json
    import math

    import encdec.inference.loading

    load = encdec.inference.loading.load_for_inference

    def overflowing_once(*args, **kwargs):
        model, calls = load(*args, **kwargs), []
        logits = model.logits

        def scores(hidden):  # the first step's (the first prompt's, at --batch-size 1) overflow
            calls.append(hidden)
            return logits(hidden) * (math.inf if len(calls) == 1 else 1)

        monkeypatch.setattr(model, "logits", scores)
        return model

    monkeypatch.setattr(encdec.inference.loading, "load_for_inference", overflowing_once)
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(adapted), "--prompt", "w1", "--prompt", "w2", "--batch-size", "1", "--do-sample",
                 "--seed", "0", "--max-new-tokens", "3", "--out", str(out)]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "1 prompt(s) stopped early, their scores (logits) not finite" in line and "--prompt 1" in line
    first, second = (json.loads(x) for x in out.read_text().splitlines())
    assert (first["finish_reason"], first["completion_tokens"]) == ("error", 0)
    assert second["finish_reason"] in ("length", "stop") and second["completion_tokens"] > 0


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m['content'] }{% endfor %}", "cannot write a user turn and its answer (Template"),
    (("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no answers') }}{% endif %}"
      "{{ m['content'] }}{% endfor %}"), "cannot write a user turn and its answer (TemplateError: no answers)"),
    ("{% for m in messages if m['role'] == 'user' %}{{ m['content'] }}{% endfor %}", "leaves out the answer"),
    # a handed template's own failure: ZeroDivisionError's traceback, for every command reading the tokenizer
    ("{% for m in messages %}{{ m['content'] }}{{ 1 / 0 }}{% endfor %}",
     "cannot write a user turn and its answer (ZeroDivisionError"),
    # ... or one that never ends (Jinja's sandbox bounds range(), not loops inside loops): every command hung
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "cannot write a user turn and its answer (_TooLong: it ran past 10,000,000 lines of Python")])
def test_a_broken_chat_template_is_one_line_and_plain_prompts_generate_without_it(capsys, tmp_path, sources,
                                                                                  template, message):
    """A tokenizer's chat template that fails to render an exchange was a traceback, after the model loaded, for
    plain prompts too (which never use it)."""
    import copy

    import encdec

    out = tmp_path / "model"
    main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    tokenizer = copy.deepcopy(encdec.load_tokenizer(out))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w1", "--max-new-tokens", "2"]) == 0
    said = capsys.readouterr()
    assert message in said.err and "generation stops at EOS alone" in said.err and "w1 -> " in said.out
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w1"}\n{"messages": [{"role": "user", "content": "w2"}]}\n')
    assert main(["generate", str(out), "--input", str(prompts), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert message in line and "fix or remove chat_template" in line and "loading" not in err


def test_a_ul2_pretrained_model_generates_from_its_objectives_framing(capsys, tmp_path, sources):
    """`encdec pretrain --objective ul2` (T5Gemma 2's mixture) always gave the encoder a sentinel after the text and
    began the decoder's answer with it: `encdec generate` reads the saved provenance and does the same."""
    import json

    import torch

    import encdec
    from encdec.objectives import special_token_ids

    out = tmp_path / "model"
    main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    meta = json.loads((out / "encdec.json").read_text())
    (out / "encdec.json").write_text(json.dumps({**meta, "pretrained": {"objective": "ul2",
                                                                        "settings": {"mixture": "t5gemma2"}}}))
    tokenizer, model = encdec.load_tokenizer(out), encdec.load(out)
    sentinel = special_token_ids(tokenizer.get_vocab())[1][0]
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--out", "-"]) == 0
    line = json.loads(capsys.readouterr().out)
    ids = tokenizer("w1 w2 w3").input_ids
    framed = model.generate(torch.tensor([ids + [sentinel]]), max_new_tokens=5, decoder_prefix=[sentinel])[0]
    plain = model.generate(torch.tensor([ids]), max_new_tokens=5)[0]
    assert line["completion"] == tokenizer.decode(framed, skip_special_tokens=True)
    assert line["completion"] != tokenizer.decode(plain, skip_special_tokens=True)
    # what the encoder read, the sentinel included, as `encdec serve`'s usage counts it (it was the text's alone)
    assert line["completion_tokens"] == 5 and line["prompt_tokens"] == len(ids) + 1


def test_generate_reads_the_paragraphs_of_a_text_file_and_names_the_accepted_files(capsys, tmp_path, sources):
    import json

    out = tmp_path / "model"
    main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    (tmp_path / "prompts.txt").write_text("w1 w2\nw3\n\n\nw4\n")
    capsys.readouterr()
    assert main(["generate", str(out), "--input", str(tmp_path / "prompts.txt"), "--max-new-tokens", "2"]) == 0
    assert [json.loads(line)["prompt"] for line in capsys.readouterr().out.splitlines()] == ["w1 w2\nw3", "w4"]
    (tmp_path / "prompts.csv").write_text("w1\n")
    assert main(["generate", str(out), "--input", str(tmp_path / "prompts.csv")]) == 2
    assert "prompts.csv: unsupported type; expected a .jsonl file of" in capsys.readouterr().err


def test_generated_json_lines_stay_json_on_an_ascii_terminal(tmp_path, sources):
    """Standard output that cannot write a character escaped it as \\xe9, which no JSON reader accepts."""
    import json
    import subprocess
    import sys

    out = tmp_path / "model"
    main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)])
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "caf\u00e9 w1", "note": "\u2713"}) + "\n")
    done = subprocess.run([sys.executable, "-m", "encdec.cli", "generate", str(out), "--input", str(tmp_path / "p.jsonl"),
                           "--max-new-tokens", "2"], check=False, capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout)
    assert record["prompt"] == "caf\u00e9 w1" and record["note"] == "\u2713" and record["completion_tokens"] == 2


def test_a_prompt_without_tokens_is_refused_where_it_was_given(tmp_path, sources):
    """A tokenizer that puts no BOS first (Qwen's) gives an empty text no tokens: nothing for the encoder to read."""
    import copy

    from tokenizers import processors

    import encdec
    from encdec.data.prompts import read_prompts, texts_as_prompts
    from encdec.errors import EncdecError

    tokenizer = copy.deepcopy(encdec.load_tokenizer(sources["gemma3"]))  # never the loader's memoised one
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    with pytest.raises(EncdecError, match="^--prompt 2: the prompt has no tokens; a prompt needs at least one$"):
        texts_as_prompts(["w1", ""], tokenizer)
    # bytes a terminal passed that are not UTF-8 (Python keeps them as lone surrogates): the tokenizer's TypeError
    with pytest.raises(EncdecError, match="^--prompt 2: not UTF-8 text"):
        texts_as_prompts(["w1", "caf\udce9"], tokenizer)
    (tmp_path / "p.jsonl").write_text('{"prompt": "w1"}\n\n{"prompt": ""}\n')
    with pytest.raises(EncdecError, match="p.jsonl:3: the prompt has no tokens"):
        read_prompts(str(tmp_path / "p.jsonl"), tokenizer)


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
    import dataclasses

    from encdec.training.config import FINETUNE_DEFAULTS, TrainConfig

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    # pretrain's and finetune's options default to SUPPRESS (only those given override --config): their help
    # names the training configuration's default, which is checked here by value
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for action in sub._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        if action.default is argparse.SUPPRESS and action.dest in fields:
            f = fields[action.dest]
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = FINETUNE_DEFAULTS.get(action.dest, value) if command == "finetune" else value
            if value not in (None, ""):  # (an empty default, as --model's, is no default to show)
                assert f"(default: {value!r})" in action.help, f"{command} {action.option_strings[0]}: {action.help}"
                checked += 1
        elif action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, list):
            shown = sub.formatter_class(command)._get_help_string(action)
            assert "(default:" in shown or "%(default)" in action.help, \
                f"{command} {action.option_strings[0]} does not show its default {action.default!r}"
            checked += 1
    least = {"pretrain": 20, "finetune": 20, "info": 0, "export-encoder": 0}.get(command, 1)  # (those two have no
    # option with a default)
    assert checked >= least, f"{command}: {checked} defaults checked"


def test_finetune_help_speaks_of_instructions(capsys):
    """finetune shares pretraining's options but not their help: its --data takes instruction records, not corpora."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    data = capsys.readouterr().out.split("--data PATH")[-1].split("\n  --")[0]
    assert ".jsonl" in data and "corpus:" not in data and "Natural-Instructions" in data


def test_compile_without_a_compiler_is_one_line(adapted, monkeypatch, capsys):
    """A slim image without g++: inductor's InvalidCxxCompiler, a RuntimeError, ended `generate --compile` (and
    `serve --compile`, which warms its step up the same way) in a traceback."""
    import torch._inductor.exc

    from encdec.inference import engine

    def no_compiler(step, **options):
        def call(*args):
            raise torch._inductor.exc.InvalidCxxCompiler()
        return call

    monkeypatch.setattr(engine, "compiled_step", no_compiler)
    assert main(["generate", str(adapted), "--prompt", "w1", "--compile", "--max-new-tokens", "2"]) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "--compile could not build the compiled step (No working C++ compiler found" in line
    assert "leave --compile out" in line


def test_an_adapt_seed_that_seeds_nothing_is_said_to_be_ignored(sources, tmp_path, capsys):
    """From one source nothing is drawn at random: --seed 5 gave the weights of --seed 0, unsaid."""
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(tmp_path / "m"), "--seed", "5"]) == 0
    assert "--seed seeds the cross-attention a --decoder SRC model draws at random" in capsys.readouterr().err
    assert main(["adapt", "--encoder", str(sources["gemma2"]), "--decoder", str(sources["gemma2-small"]), "--out",
                 str(tmp_path / "u"), "--seed", "5"]) == 0
    assert "--seed seeds" not in capsys.readouterr().err


def test_cpu_kernels_beside_int8_are_said_to_be_ignored(adapted, capsys):
    """int8's dynamic layers compute their own products: --cpu-kernels changed nothing there, unsaid."""
    assert main(["generate", str(adapted), "--prompt", "w1", "--quantize", "int8", "--cpu-kernels", "blas",
                 "--max-new-tokens", "2"]) == 0
    assert "--cpu-kernels blas: --quantize int8 computes with PyTorch's dynamic int8 layers; ignored" in \
        capsys.readouterr().err
    assert main(["generate", str(adapted), "--prompt", "w1", "--quantize", "int8", "--max-new-tokens", "2"]) == 0
    assert "--cpu-kernels" not in capsys.readouterr().err
    import argparse

    import torch

    from encdec import cli

    with pytest.MonkeyPatch.context() as patch:  # a host with a GPU, where the model runs
        patch.setattr("encdec.inference.loading.compute_device", lambda: torch.device("cuda"))
        assert cli._cpu_kernels(argparse.Namespace(quantize=None, cpu_kernels="blas")) == "blas"
    assert "--cpu-kernels blas: the model runs on the GPU; ignored" in capsys.readouterr().err


def test_pretrain_help_offers_only_its_objectives(capsys):
    """`encdec pretrain --help` showed --objective {prefixlm,ul2,instruct}, then refused instruct (finetune's); it
    still answers instruct with the line that names `encdec finetune`."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--help"])
    assert "--objective {prefixlm,ul2}" in capsys.readouterr().out
    assert build_parser().parse_args(["pretrain", "--objective", "instruct"]).objective == "instruct"


def test_version_names_encdec_torch_and_transformers():
    """`encdec --version` runs as a command of its own (no sub-command needed), as accelerate's and pip's do."""
    from importlib.metadata import version

    result = subprocess.run([sys.executable, "-m", "encdec.cli", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"encdec {version('encdec')} (torch {version('torch')}, transformers "
                                     f"{version('transformers')})")


def test_negative_numbers_in_scientific_notation_are_values(capsys):
    """argparse took -1e-4 for an option ('expected one argument') while it took -0.5 as a value."""
    from encdec.cli import build_parser

    args = build_parser().parse_args(["generate", "d", "--prompt", "x", "--presence-penalty", "-1e-1",
                                      "--frequency-penalty", "-.5E+0"])
    assert (args.presence_penalty, args.frequency_penalty) == (-0.1, -0.5)
    assert build_parser().parse_args(["pretrain", "--lr", "-1e-4"]).lr == -1e-4  # then refused as not positive
    assert main(["pretrain", "--lr", "-1e-4"]) == 2
    assert "--lr must be a positive finite number, got -0.0001" in capsys.readouterr().err
    # a list of layers starting with a negative one: "expected one argument", where -1 alone is said out of range
    assert build_parser().parse_args(["adapt", "--encoder", "e", "--decoder-layers", "-3,-1", "--out", "o"]) \
        .decoder_layers == "-3,-1"


def test_an_unknown_option_points_to_its_sub_commands_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "some/model", "--promt", "hi"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "encdec generate: error: unrecognized arguments: --promt hi (see encdec generate --help)"]
    with pytest.raises(SystemExit):  # anything before the command: encdec's help
        main(["--bogus", "generate", "some/model"])
    assert "(see encdec --help)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--verbose", "info", "MISSING"], ["info", "MISSING", "--verbose"],
                                  ["info", "MISSING"]])
def test_verbose_goes_before_or_after_the_command(argv, capsys):
    from encdec.cli import build_parser

    assert build_parser().parse_args(argv).verbose == ("--verbose" in argv)
    assert main(argv) == 2 and "no such directory" in capsys.readouterr().err


def test_task_names_are_read_in_any_case_as_evaluate_reads_them():
    from encdec.cli import build_parser

    assert build_parser().parse_args(["classify", "m", "--task", "BoolQ", "--out", "o"]).task == "boolq"


def test_a_yaml_configuration_given_as_config_equals_tilde_is_found(tmp_path, monkeypatch):
    """The shell expands `~` in `--config ~/run.yaml`, not in `--config=~/run.yaml`: every other path option
    expanded it, --config said the file did not exist."""
    from encdec.cli import build_parser
    from encdec.training.config import from_arguments

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run.yaml").write_text("steps: 7\nlr: 0.002\n")
    args = build_parser().parse_args(["pretrain", "--config=~/run.yaml", "--lr", "1e-3"])
    config = from_arguments(args)
    assert (config.steps, config.lr) == (7, 1e-3)  # the file's, and the command line over it
    assert build_parser().parse_args(["finetune", "m", "--config=~/run.yaml"]).config == tmp_path / "run.yaml"


def test_a_whole_number_in_the_yaml_configuration_is_an_integer_however_written(tmp_path):
    """PyYAML reads 1e3 as text (taken as 1000) but 1.0e+3 and 100.0 as floats, which --steps refused."""
    from encdec.cli import build_parser
    from encdec.training.config import from_arguments

    for written, steps in (("1e3", 1000), ("1.0e+3", 1000), ("100.0", 100), ("7", 7)):
        (tmp_path / "run.yaml").write_text(f"steps: {written}\n")
        assert from_arguments(build_parser().parse_args(["pretrain", "--config", str(tmp_path / "run.yaml")])).steps \
            == steps
    for written in ("1.5", ".inf", ".nan"):
        (tmp_path / "run.yaml").write_text(f"steps: {written}\n")
        with pytest.raises(EncdecError, match="--steps must be an integer"):
            from_arguments(build_parser().parse_args(["pretrain", "--config", str(tmp_path / "run.yaml")]))


def test_a_list_from_the_yaml_configuration_is_cleared_by_its_option_alone(tmp_path):
    """`--data` (or `--eval-data`) with no value: none, the default corpus, over the file's list (the option needed
    at least one value, and "" was refused, so a file's list could not be undone from the command line)."""
    from encdec.cli import build_parser
    from encdec.training.config import from_arguments

    (tmp_path / "run.yaml").write_text("data: [a.txt]\neval_data: [heldout:python-docs]\n")
    parse = build_parser().parse_args
    assert from_arguments(parse(["pretrain", "--config", str(tmp_path / "run.yaml")])).data == ["a.txt"]
    config = from_arguments(parse(["pretrain", "--config", str(tmp_path / "run.yaml"), "--data", "--eval-data"]))
    assert (config.data, config.eval_data) == ([], [])
    assert from_arguments(parse(["pretrain", "--data", "a.txt", "--data", "b.txt", "c.txt"])).data == [
        "a.txt", "b.txt", "c.txt"]
    with pytest.raises(EncdecError, match="--data needs at least one value"):  # `--data $UNSET`, no file to clear
        from_arguments(parse(["pretrain", "--data"]))


def test_generate_out_written_as_a_folder_is_refused(capsys, tmp_path, adapted):
    """`--out results/` for a folder still to be made wrote a file named results (Path drops the slash)."""
    with pytest.raises(SystemExit) as refused:
        main(["generate", str(adapted), "--prompt", "w1", "--out", f"{tmp_path / 'results'}/", "--max-new-tokens", "1"])
    assert refused.value.code == 2 and "names a directory (it ends with /)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
