"""Runs survive crashes and damage: finite checkpoints only, --overwrite after validation, one run per
directory, --resume past damaged files, temporaries of killed writes removed, damaged token caches rebuilt."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_training import _config, _metrics
from tiny import make_tokenizer

from encdec.checkpoint import read_metadata
from encdec.cli import main
from encdec.data.tokens import token_stream
from encdec.errors import EncdecError
from encdec.files import EARLIER_HOST, HOST, MACHINE, atomic_dir, atomic_write, read_weights
from encdec.logs import setup
from encdec.training import checkpointing, loop, rundir, step
from encdec.training.optim import warmup_then_decay
from encdec.training.plain_state import read_state

DEAD_PID = 2**22 + 12345  # above Linux's largest pid: no process has it


def _pretrain_args(model, out, corpus, *extra: str) -> list[str]:
    return ["pretrain", "--model", str(model), "--data", str(corpus), "--out", str(out), "--enc-len", "16",
            "--dec-len", "16", "--batch-size", "2", "--eval-windows", "4", "--precision", "fp32", *extra]


def _lines(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


def _all_finite(checkpoint) -> bool:
    return all(torch.isfinite(t).all() for t in read_weights(checkpoint).values())


def test_a_nan_gradient_stops_before_the_update_and_names_a_finite_checkpoint(adapted, corpus, tmp_path,
                                                                           monkeypatch):
    original = step.chunked_loss
    calls = {"n": 0}

    def nan_gradient(*args, **kwargs):  # the loss stays finite, its gradient is NaN at step 4 (a saving step)
        parts = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            parts.loss.register_hook(lambda g: g * float("nan"))
        return parts

    monkeypatch.setattr(step, "chunked_loss", nan_gradient)
    with pytest.raises(EncdecError, match=r"gradient norm became nan at step 4.*step-000002") as stop:
        loop.train(_config(adapted, tmp_path / "run", corpus, eval_every=0))
    named = checkpointing.checkpoints(tmp_path / "run")
    assert [p.name for p in named] == ["step-000002"] and str(named[0]) in str(stop.value)
    assert _all_finite(named[0])


def test_weights_that_became_infinite_are_never_saved(adapted, corpus, tmp_path, monkeypatch):
    original = loop.build_optimizer

    def overflowing(*args, **kwargs):  # the fourth update overflows one weight (finite loss and gradient)
        optimizer = original(*args, **kwargs)
        updates = {"n": 0}

        def overflow(opt, *_):
            updates["n"] += 1
            if updates["n"] == 4:
                with torch.no_grad():
                    opt.param_groups[0]["params"][0].view(-1)[0] = float("inf")

        optimizer.register_step_post_hook(overflow)
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", overflowing)
    with pytest.raises(EncdecError, match=r"became NaN or inf \(not saved\) at step 4.*step-000002"):
        loop.train(_config(adapted, tmp_path / "run", corpus, eval_every=0))
    assert [p.name for p in checkpointing.checkpoints(tmp_path / "run")] == ["step-000002"]


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(adapted, corpus, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    original, writes = checkpointing.write_state, {"n": 0}

    def full_disk(directory, name, state):  # the second checkpoint's optimizer state finds the disk full
        writes["n"] += name == "optimizer"
        if writes["n"] == 2 and name == "optimizer":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(directory, name, state)

    monkeypatch.setattr(checkpointing, "write_state", full_disk)
    out = tmp_path / "run"
    with pytest.raises(EncdecError, match=r"could not write the checkpoint of step 4 \(.*No space left on device.*\); "
                                          r"stopped \(the last good checkpoint is .*step-000002\)\. Free space"):
        loop.train(_config(adapted, out, corpus, eval_every=0))
    assert [p.name for p in checkpointing.checkpoints(out)] == ["step-000002"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no half-written step-000004
    monkeypatch.undo()
    loop.train(_config(adapted, out, corpus, eval_every=0, resume=True))
    assert (out / "model").is_dir()


def test_overwrite_deletes_nothing_when_the_inputs_are_bad(adapted, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "2", "--save-every", "1")) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert main(_pretrain_args(tmp_path / "no-model", out, corpus, "--steps", "2", "--overwrite")) == 2
    assert len(_lines(capsys.readouterr().err, "error:")) == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize("name, planted, said", [
    ("model", "net.py", "a model no run saved: its encdec.json records no training"),
    ("checkpoints", "epoch=3.ckpt", "it holds epoch=3.ckpt"),  # another tool's checkpoints folder
    ("tensorboard", "notes.txt", "it holds notes.txt"),
])
def test_overwrite_refuses_a_folder_that_only_shares_a_run_outputs_name(adapted, corpus, tmp_path, capsys, name,
                                                                        planted, said):
    """--overwrite deletes OUT's model/, checkpoints/ and tensorboard/: only when they hold what a run writes
    there (the error even advised --overwrite for a folder of someone's code named model)."""
    out = tmp_path / "exp"
    (out / name).mkdir(parents=True)
    (out / name / planted).write_text("someone's work")
    for overwrite in ("--overwrite", None):  # without it, the error once advised it
        assert main(_pretrain_args(adapted, out, corpus, "--steps", "1", *filter(None, [overwrite]))) == 2
        (line,) = _lines(capsys.readouterr().err, "error:")
        assert f"{out / name} is not what a run writes there ({said})" in line, line
        assert (out / name / planted).read_text() == "someone's work"


def test_another_tools_metrics_file_in_out_is_neither_deleted_nor_cut_back(adapted, corpus, tmp_path, capsys):
    """Any file named metrics.jsonl was taken for a run's: --overwrite deleted another tool's, and --resume (without
    a checkpoint, as a job script passing it always may) cut it to nothing, with a warning of "unreadable lines"."""
    out = tmp_path / "exp"
    out.mkdir()
    theirs = '{"epoch": 1, "val_acc": 0.91}\n{"epoch": 2, "val_acc": 0.93}\n'
    (out / "metrics.jsonl").write_text(theirs)
    for flag in ("--overwrite", "--resume", None):
        assert main(_pretrain_args(adapted, out, corpus, "--steps", "1", *filter(None, [flag]))) == 2
        (line,) = _lines(capsys.readouterr().err, "error:")
        assert f"{out / 'metrics.jsonl'} is not what a run writes there (its first line is no training step" in line
        assert (out / "metrics.jsonl").read_text() == theirs
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.2')  # a run's, its first line cut short by a crash
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "1", "--overwrite")) == 0


def test_resume_refuses_outputs_no_run_writes(adapted, corpus, tmp_path, capsys):
    """--resume rewrites OUT/metrics.jsonl and appends to OUT/tensorboard: a pipe there made it wait for ever, a
    folder there (or a file named tensorboard) was a traceback after the step's checkpoint was written."""
    out = tmp_path / "run"
    args = _pretrain_args(adapted, out, corpus, "--steps", "1", "--save-every", "1", "--tensorboard")
    assert main(args) == 0
    shutil.rmtree(out / "model")  # a run that stopped after its checkpoint
    capsys.readouterr()
    for name, make, said in (("metrics.jsonl", os.mkfifo, "not a file"),
                             ("tensorboard", lambda path: path.write_text("notes"), "not a directory")):
        kept = out / name
        moved = kept.rename(out / f"kept-{name}")
        make(kept)
        resumed = [*args, "--resume", "--steps", "2"]
        done = subprocess.run([sys.executable, "-c", "import sys, encdec.cli; sys.exit(encdec.cli.main())", *resumed],
                              capture_output=True, text=True, timeout=120, check=False)  # apart: a pipe waits
        assert done.returncode == 2, done.stderr
        (line,) = _lines(done.stderr, "error:")
        assert f"{kept} is not what a run writes there ({said}): --resume continues" in line, line
        kept.unlink()
        moved.rename(kept)
    assert main([*args, "--resume", "--steps", "2"]) == 0


def test_overwrite_refuses_a_model_kept_in_out_that_no_run_saved(adapted, corpus, tmp_path, capsys):
    """Any checkpoint in OUT/model was taken for the run's final model: `pretrain --out ~/proj --overwrite` deleted
    the adapted model kept in ~/proj/model (and the refusal without --overwrite advised it)."""
    out = tmp_path / "proj"
    out.mkdir()
    shutil.copytree(adapted, out / "model")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for overwrite in ("--overwrite", None):
        assert main(_pretrain_args(adapted, out, corpus, "--steps", "1", *filter(None, [overwrite]))) == 2
        (line,) = _lines(capsys.readouterr().err, "error:")
        assert f"{out / 'model'} is not what a run writes there (a model no run saved: its" in line, line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_resume_refuses_a_model_in_out_that_no_run_saved(adapted, corpus, tmp_path, capsys):
    """--overwrite refused to delete a model put in OUT/model, but --resume replaced it at its end without a word."""
    out = tmp_path / "run"
    args = _pretrain_args(adapted, out, corpus, "--steps", "1", "--save-every", "1")
    assert main(args) == 0
    shutil.rmtree(out / "model")
    shutil.copytree(adapted, out / "model")
    (out / "model" / "MY_NOTES.txt").write_text("mine")
    before = sorted(p.relative_to(out) for p in (out / "model").rglob("*"))
    capsys.readouterr()
    assert main([*args, "--resume", "--steps", "2"]) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert f"{out / 'model'} is not what a run writes there (a model no run saved: its" in line, line
    assert "--resume continues" in line and (out / "model" / "MY_NOTES.txt").read_text() == "mine"
    assert sorted(p.relative_to(out) for p in (out / "model").rglob("*")) == before
    shutil.rmtree(out / "model")  # the run's own final model is resumed over, as before
    assert main([*args, "--resume", "--steps", "2"]) == 0 and main([*args, "--resume", "--steps", "3"]) == 0


def test_a_folder_kept_in_a_runs_model_is_refused_before_the_run_not_at_its_end(adapted, corpus, tmp_path, capsys):
    """An export kept in RUN/model (`encdec export RUN/model --out RUN/model/ct2`): --resume trained every step, then
    the final model's save refused the folder; --overwrite deleted it with the model."""
    out = tmp_path / "run"
    args = _pretrain_args(adapted, out, corpus, "--steps", "1", "--save-every", "1")
    assert main(args) == 0
    (out / "model" / "ct2").mkdir()
    (out / "model" / "ct2" / "model.bin").write_bytes(b"mine")
    capsys.readouterr()
    for again in (["--resume", "--steps", "2"], ["--overwrite"]):
        assert main([*args, *again]) == 2
        (line,) = _lines(capsys.readouterr().err, "error:")
        assert f"{out / 'model'} is not what a run writes there (it holds the folder ct2, which the run's" in line
    assert (out / "model" / "ct2" / "model.bin").read_bytes() == b"mine"
    assert checkpointing.checkpoints(out) == [out / "checkpoints" / "step-000001"]  # nothing trained


def test_a_checkpoint_name_of_other_digits_is_not_a_step(adapted, corpus, tmp_path, capsys):
    """str.isdigit() takes "²", which int() refuses: checkpoints/step-² was a traceback of --resume."""
    from encdec.training.checkpointing import checkpoints, is_step_name

    names = ("step-12", "step-\u00b2", "step-\u0663", "step-", "step-1a")
    assert [is_step_name(n) for n in names] == [True] + [False] * 4
    out = tmp_path / "run"
    args = _pretrain_args(adapted, out, corpus, "--steps", "1", "--save-every", "1")
    assert main(args) == 0
    (out / "checkpoints" / "step-\u00b2").mkdir()
    assert checkpoints(out) == [out / "checkpoints" / "step-000001"]
    assert main([*args, "--resume", "--steps", "2"]) == 0  # resumed from step 1, the folder left as it is
    assert (out / "checkpoints" / "step-\u00b2").is_dir() and out / "checkpoints" / "step-000002" in checkpoints(out)


def test_overwrite_replaces_a_decoder_only_runs_model(sources, corpus, tmp_path):
    """A decoder-only run saves its model in its family's layout (no encoder-decoder config.json): a run's all the
    same, which --overwrite replaces."""
    out = tmp_path / "run"
    assert main(_pretrain_args(sources["gemma3"], out, corpus, "--steps", "1")) == 0
    assert (out / "model" / "encdec.json").is_file()
    assert main(_pretrain_args(sources["gemma3"], out, corpus, "--steps", "1", "--overwrite")) == 0


def test_overwrite_replaces_a_run_with_its_checkpoints_and_tensorboard_events(adapted, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "2", "--save-every", "1", "--tensorboard")) == 0
    events = {p.name for p in (out / "tensorboard").iterdir()}
    (out / "checkpoints" / ".step-000003.tmp-host-1-x").mkdir()  # what a crash leaves of an atomic write
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "1", "--overwrite", "--tensorboard")) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert events and not events & {p.name for p in (out / "tensorboard").iterdir()}


def test_tensorboard_missing_or_broken_is_said_before_overwrite_deletes_anything(adapted, corpus, tmp_path, capsys,
                                                                                 monkeypatch):
    """It was found when the metrics opened, after --overwrite had removed the previous run (and by the first
    process alone, the others going on into the first step's collectives); a package there but broken (a protobuf
    of another version: a TypeError on import) passed the check, then deleted the run and failed as a traceback."""
    import types

    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise TypeError("Descriptors cannot be created directly")

    out = tmp_path / "run"
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "1")) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for module in (None, Broken("torch.utils.tensorboard")):
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
        capsys.readouterr()
        assert main(_pretrain_args(adapted, out, corpus, "--steps", "1", "--overwrite", "--tensorboard")) == 2
        (line,) = _lines(capsys.readouterr().err, "error:")
        assert "--tensorboard needs a working tensorboard package (pip install -e '.[tensorboard]')" in line
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_refused_run_leaves_nothing_that_blocks_the_corrected_command(adapted, corpus, tmp_path):
    out = tmp_path / "run"
    assert main(_pretrain_args(tmp_path / "no-model", out, corpus, "--steps", "1")) == 2
    assert not out.exists()
    # nor the parents it made for OUT (`--out runs/x` in a fresh directory left an empty runs/)
    assert main(_pretrain_args(tmp_path / "no-model", tmp_path / "runs" / "deeper" / "x", corpus, "--steps", "1")) == 2
    assert not (tmp_path / "runs").exists()
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "1")) == 0


def test_a_run_whose_new_directories_a_refused_neighbour_removes_makes_them_again(tmp_path, monkeypatch):
    """Two runs under a fresh runs/: the refused one removes the empty runs/ the other is about to lock in."""
    from encdec.training import distributed

    out, real, removed = tmp_path / "runs" / "b", rundir._acquire, []

    def neighbour_removes_first(path, name):
        if not removed:
            removed.append(path)
            path.rmdir()
            path.parent.rmdir()
        return real(path, name)

    monkeypatch.setattr(rundir, "_acquire", neighbour_removes_first)
    with rundir.locked(out, distributed.Dist()):
        assert (out / rundir.LOCK).is_file()
    assert removed == [out] and not (tmp_path / "runs").exists()


HOLD = """
import sys
from pathlib import Path
from encdec.training import distributed, rundir
with rundir.locked(Path(sys.argv[1]), distributed.Dist()):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_one_run_per_directory_and_a_dead_holder_is_taken_over(adapted, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(_pretrain_args(adapted, out, corpus, "--steps", "1")) == 2
        (line,) = _lines(capsys.readouterr().err, "error:")
        assert f"is being written by process {holder.pid} on" in line
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its lock file stays behind
        holder.wait()
    assert json.loads((out / rundir.LOCK).read_text())["pid"] == holder.pid
    setup()
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "1")) == 0
    err = capsys.readouterr().err
    assert len(_lines(err, f"taking over the lock of process {holder.pid}")) == 1, err
    assert not (out / rundir.LOCK).exists()
    # a handed run's lock file nested too deeply for json: a RecursionError's traceback where its holder is told
    (out / rundir.LOCK).write_text("[" * 100_000)
    assert rundir._holder(out / rundir.LOCK) == "another process"


def test_every_process_of_a_distributed_run_stops_on_a_held_lock(adapted, corpus, tmp_path):
    from test_distributed import launcher

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        command = [*launcher("torchrun"), *_pretrain_args(adapted, out, corpus, "--steps", "1")[:]]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)  # a hang fails
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert result.returncode != 0
    refusals = _lines(result.stderr, "error:")
    # torchrun ends the other worker once one exits, so it may not get to print its own line (seen under load):
    # what matters is that no process hangs in a collective (the timeout above) and each line is the refusal
    assert 1 <= len(refusals) <= 2 and all("is being written by process" in line or "could not lock it" in line
                                           for line in refusals), result.stderr[-2000:]


def test_checkpoints_are_ordered_by_step_past_a_million(tmp_path):
    for step in (999_998, 1_000_000, 2, 999_999):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-notes").mkdir()
    assert [p.name for p in checkpointing.checkpoints(tmp_path)] == [
        "step-000002", "step-999998", "step-999999", "step-1000000"]


def test_resuming_with_other_settings_is_warned_of_by_name(adapted, corpus, tmp_path, capsys, monkeypatch):
    """More steps (or other checkpoint and logging intervals) continue the same run; another seed or learning
    rate makes the next steps differ from an uninterrupted run's: one warning line naming them. The data's path
    given from another directory is the same data."""
    out = tmp_path / "run"
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "1", "--save-every", "1", "--eval-every", "0")) == 0
    capsys.readouterr()
    monkeypatch.chdir(corpus.parent)
    assert main(_pretrain_args(adapted, out, corpus.name, "--steps", "2", "--save-every", "2", "--dist-timeout", "60",
                               "--resume")) == 0
    assert not _lines(capsys.readouterr().err, "settings other than")  # a wait limit changes no step either
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "3", "--seed", "5", "--lr", "0.001",
                               "--weight-decay", "0.5", "--save-every", "3", "--resume")) == 0
    warned = _lines(capsys.readouterr().err, "settings other than")
    assert len(warned) == 1 and "--lr 3e-05 -> 0.001" in warned[0] and "--seed 0 -> 5" in warned[0], warned
    # and the new rate and decay are the ones trained with (the checkpoint's optimizer state held the old ones)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    third = next(record for record in logged if record["step"] == 3)
    assert third["lr"] == pytest.approx(0.001 * warmup_then_decay(10, 3, 0.1)(2))
    groups = read_state(checkpointing.checkpoints(out)[-1], "optimizer")["param_groups"]
    assert sorted({group["weight_decay"] for group in groups}) == [0.0, 0.5]


def test_resuming_on_another_number_of_processes_compares_the_global_batch(adapted, corpus, tmp_path):
    """A step reads --batch-size rows on each process: a run resumed on fewer processes with the same command
    line trained on a smaller global batch without a word, and one given the --batch-size that keeps the global
    batch (and its course: losses equal an uninterrupted run's) was warned of a change."""
    loop.train(_config(adapted, tmp_path / "run", corpus, steps=1, save_every=1, eval_every=0))
    (checkpoint,) = checkpointing.checkpoints(tmp_path / "run")
    saved = read_state(checkpoint, "trainer")
    assert saved["processes"] == 1 and saved["config"]["batch_size"] == 2
    two = {**saved["config"], "batch_size": 1}  # as written by 2 processes of --batch-size 1

    def now(batch_size: int):  # the run's settings as the loop compares them (distillation decided)
        return _config(adapted, tmp_path / "run", corpus, batch_size=batch_size, distill=saved["config"]["distill"])

    assert rundir.changed_settings(two, now(2), (2, 1)) == []
    (line,) = rundir.changed_settings(two, now(1), (2, 1))
    assert line == "the global batch (--batch-size x processes) 1 x 2 = 2 rows -> 1 x 1 = 1"
    assert rundir.changed_settings(saved["config"], now(2), (1, 1)) == []
    # sharded or not (--fsdp), the update is the same: not warned of as a change of the run's course
    assert rundir.changed_settings(two, dataclasses.replace(now(1), fsdp=True), (2, 2)) == []


@pytest.mark.parametrize("options", [{"steps": 4, "save_every": 2, "eval_every": 0},
                                     {"steps": 6, "save_every": 2, "log_every": 4, "eval_every": 0}],
                         ids=["logged-before", "first-line"])
def test_a_crash_between_a_checkpoint_and_its_metrics_line_loses_no_line(adapted, corpus, tmp_path, monkeypatch,
                                                                         options):
    """The step's line is kept in its checkpoint and put back on resume (it was missing from metrics.jsonl for good),
    also where it was to be the file's first line (a checkpoint before any logged step: it was not put back)."""
    from encdec.training.metrics import Metrics

    loop.train(_config(adapted, tmp_path / "straight", corpus, **options))
    original = Metrics.log

    def crash_before_step_2s_line(self, record, **kw):
        if record["step"] == 2:
            raise RuntimeError("the machine went away")
        original(self, record, **kw)

    monkeypatch.setattr(Metrics, "log", crash_before_step_2s_line)
    with pytest.raises(RuntimeError, match="went away"):
        loop.train(_config(adapted, tmp_path / "crashed", corpus, **options))
    monkeypatch.setattr(Metrics, "log", original)
    logged = tmp_path / "crashed" / "metrics.jsonl"
    assert [r["step"] for r in _metrics(tmp_path / "crashed")] == [1] if "log_every" not in options \
        else not logged.exists()
    loop.train(_config(adapted, tmp_path / "crashed", corpus, resume=True, **options))
    assert [(r["step"], r["loss"]) for r in _metrics(tmp_path / "crashed")] == \
        [(r["step"], r["loss"]) for r in _metrics(tmp_path / "straight")]


def test_resume_skips_a_damaged_checkpoint_and_a_truncated_metrics_line(adapted, corpus, tmp_path, capsys):
    straight = tmp_path / "straight"
    loop.train(_config(adapted, straight, corpus, steps=4, save_every=1, eval_every=0))
    damaged = tmp_path / "damaged"
    shutil.copytree(straight, damaged)
    shutil.rmtree(damaged / "model")
    (checkpointing.checkpoints(damaged)[-1] / "model.safetensors").write_bytes(b"")  # step-000004: empty file
    with (damaged / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a crash in the middle of a line
    leftover = damaged / "checkpoints" / f".step-000005.tmp-{HOST}-{DEAD_PID}-abcd1234"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    setup()
    assert main(_pretrain_args(adapted, damaged, corpus, "--steps", "4", "--save-every", "1", "--eval-every", "0",
                               "--lr", "3e-3", "--warmup-steps", "2", "--resume")) == 0
    err = capsys.readouterr().err
    assert len(_lines(err, "skipping damaged checkpoint step-000004")) == 1, err
    assert len(_lines(err, "dropped 1 unreadable line(s)")) == 1, err
    assert "resuming from" in err and "step-000003 (step 3)" in err
    assert [r["loss"] for r in _metrics(damaged)] == [r["loss"] for r in _metrics(straight)]
    assert not leftover.exists()
    assert _all_finite(checkpointing.checkpoints(damaged)[-1])


def test_resume_skips_a_checkpoint_whose_step_is_not_its_names_and_a_metrics_line_past_any_step(
        adapted, corpus, tmp_path, capsys):
    """trainer.json's step as a string (a TypeError escaped at the --steps check) or another number than the
    directory's name (a copied step directory resumed from the wrong step); a metrics line {"step": 1e999} (an
    OverflowError escaped)."""
    out = tmp_path / "run"
    loop.train(_config(adapted, out, corpus, steps=4, save_every=1, eval_every=0))
    shutil.rmtree(out / "model")
    for step, recorded in ((4, "4"), (3, 2)):
        trainer = out / "checkpoints" / f"step-{step:06d}" / "trainer.json"
        data = json.loads(trainer.read_text())
        data["state"]["step"] = recorded
        trainer.write_text(json.dumps(data))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1e999}\n')
    setup()
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "4", "--save-every", "1", "--eval-every", "0",
                               "--resume")) == 0
    err = capsys.readouterr().err
    assert "records step '4', not the step of its name" in err and "records step 2, not the step" in err, err
    assert "step-000002 (step 2)" in err and "dropped 1 unreadable line(s)" in err, err


def test_a_damaged_checkpoint_past_a_shorter_resumed_run_is_neither_kept_nor_averaged(adapted, corpus, tmp_path):
    """An earlier attempt's step-4, skipped as damaged, counted as the newest scheduled checkpoint of a run resumed
    to 3 steps: --keep-last 1 deleted the good step-2 for it, and the final model took its weights."""
    out = tmp_path / "run"
    loop.train(_config(adapted, out, corpus, steps=4, save_every=2, eval_every=0))
    (out / "checkpoints" / "step-000004" / "trainer.json").write_text('{"format": "encdec-train-state", "vers')
    setup()
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "3", "--save-every", "2", "--eval-every", "0",
                               "--keep-last", "1", "--resume")) == 0
    assert read_metadata(out / "model")["pretrained"]["averaged_checkpoints"] == ["step-000003"]
    assert [p.name for p in checkpointing.checkpoints(out)] == ["step-000003"]


def test_a_damaged_checkpoint_the_resumed_run_does_not_write_again_is_set_aside(adapted, corpus, tmp_path, capsys):
    """Step 9 damaged, the run resumed from step 6 with --save-every 2: step 9 stayed on the schedule (a multiple of
    its own interval), so --keep-last 2 deleted the good step 8 for it and --average-last 2 read its weights."""
    out = tmp_path / "run"
    loop.train(_config(adapted, out, corpus, steps=9, save_every=3, eval_every=0))
    (out / "checkpoints" / "step-000009" / "model.safetensors").write_bytes(b"")
    setup()
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "10", "--save-every", "2", "--eval-every", "0",
                               "--keep-last", "2", "--average-last", "2", "--resume")) == 0
    assert [p.name for p in checkpointing.checkpoints(out)] == ["step-000008", "step-000010"]
    assert read_metadata(out / "model")["pretrained"]["averaged_checkpoints"] == ["step-000008", "step-000010"]
    (aside,) = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-000009.damaged-")]
    assert (aside / "model.safetensors").stat().st_size == 0  # kept for a look, under a name no schedule lists
    assert "set aside the damaged step-000009" in capsys.readouterr().err


def test_a_run_resumed_with_another_save_every_keeps_the_earlier_intervals_checkpoints(adapted, corpus, tmp_path):
    """The checkpoints of the earlier --save-every were no longer on the schedule: the first save deleted them,
    unsaid (--keep-last 3 kept two), and --average-last averaged fewer than asked."""
    out = tmp_path / "run"
    loop.train(_config(adapted, out, corpus, steps=4, save_every=2, eval_every=0))
    setup()
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "9", "--save-every", "3", "--eval-every", "0",
                               "--keep-last", "3", "--average-last", "3", "--resume")) == 0
    assert [p.name for p in checkpointing.checkpoints(out)] == ["step-000004", "step-000006", "step-000009"]
    assert read_metadata(out / "model")["pretrained"]["averaged_checkpoints"] == [
        "step-000004", "step-000006", "step-000009"]


def test_the_schedule_is_each_checkpoints_interval_and_the_current_one(tmp_path):
    """A checkpoint written as the run stopped (step 8, every 3) that the resumed run's --save-every 4 schedules is
    kept: it is the one the run resumed from."""
    for step, every in ((3, 3), (6, 3), (8, 3), (12, 4), (14, 4)):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step:06d}" / "trainer.json").write_text(
            json.dumps({"format": "encdec-train-state", "version": 1, "state": {"config": {"save_every": every}}}))
    assert [checkpointing.step_of(p) for p in checkpointing.scheduled(tmp_path, 4, 16)] == [3, 6, 8, 12]


def test_an_extended_run_keeps_the_last_checkpoint_of_the_run_it_extends(tmp_path):
    """A run of 5 steps saving every 3, resumed for 8: its step 5 (its last, the final model it wrote) stays on
    the schedule, so --keep-last 2 kept steps 3 and 6 over it at the next save; a checkpoint written as a run
    stopped (step 4) is still not on it."""
    for n in (3, 4, 5):
        (tmp_path / "checkpoints" / f"step-{n:06d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{n:06d}" / "trainer.json").write_text(json.dumps(
            {"format": "encdec-train-state", "version": 1, "state": {"config": {"save_every": 3, "steps": 5}}}))
    assert [checkpointing.step_of(p) for p in checkpointing.scheduled(tmp_path, 3, 8)] == [3, 5]


def test_resume_with_no_usable_checkpoint_stops_with_one_line(adapted, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    loop.train(_config(adapted, out, corpus, steps=2, save_every=1, eval_every=0))
    for checkpoint in checkpointing.checkpoints(out):
        (checkpoint / "trainer.json").write_text('{"format": "encdec-train-state", "vers')
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "3", "--resume")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "none of the 2 checkpoint(s)" in line and "--overwrite" in line



@pytest.mark.parametrize("damage", [{"cursor": -3}, {"epoch": "1"}, {"pending": [[5] * 999, [1]]}, {"rng": "x"},
                                    {"pending": [[5, 6], [5000]]},  # past the vocabulary: an IndexError mid-training
                                    {"rng": {"bit_generator": "MT19937", "state": {"key": [1], "pos": 0}}},
                                    {"rng": None}, {"epoch": None}])
def test_a_resumed_data_position_no_stream_could_write_is_one_line(adapted, corpus, tmp_path, capsys, damage):
    """A handed run whose trainer.json put the stream at cursor -3 re-read items silently; a random state that is
    not its generator's (or a missing field) ended in a traceback."""
    out = tmp_path / "run"
    loop.train(_config(adapted, out, corpus, steps=2, save_every=1, eval_every=0))
    trainer = checkpointing.checkpoints(out)[-1] / "trainer.json"
    state = json.loads(trainer.read_text())
    stream = next(value for value in _dicts(state) if {"epoch", "cursor", "pending"} <= set(value))
    stream.update(damage)
    for key in [k for k, v in damage.items() if v is None]:
        del stream[key]
    trainer.write_text(json.dumps(state))
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "3", "--resume")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "step-000002: the data stream's saved" in line


def test_a_resumed_global_random_state_that_cannot_be_restored_is_one_line(adapted, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    loop.train(_config(adapted, out, corpus, steps=2, save_every=1, eval_every=0))
    trainer = checkpointing.checkpoints(out)[-1] / "trainer.json"
    state = json.loads(trainer.read_text())
    rng = next(value for value in _dicts(state) if {"torch", "numpy", "python"} <= set(value))
    rng["python"] = [3, "not a state"]
    trainer.write_text(json.dumps(state))
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "3", "--resume")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "step-000002: its random states cannot be restored" in line


def _dicts(value):
    """Every dictionary nested in `value`."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _dicts(item)

def test_the_next_write_removes_what_killed_writes_left_and_restores_a_moved_aside_output(tmp_path, caplog):
    out = tmp_path / "out"
    abandoned = tmp_path / f".out.tmp-{HOST}-{DEAD_PID}-abcd1234"
    aside = tmp_path / f".out.old-{HOST}-{DEAD_PID}-efgh5678"
    alive = tmp_path / f".out.tmp-{HOST}-{os.getpid()}-ijkl9012"  # this process is still writing it
    # a user's folders that merely look alike: no pid, not tempfile's 8 characters after it, or no machine's name
    # (as an older form of the temporaries had: ".vim.old-2024-original" was deleted as one)
    users = [tmp_path / name for name in (".settings.old-2024", ".photos.tmp-backup", ".other.tmp-k3j4h5g6",
                                          f".notes.old-{DEAD_PID}-2024", ".vim.old-2024-original",
                                          ".dotfiles.tmp-20241207-snapshot", f".out.tmp-{DEAD_PID}-abcd1234")]
    # another machine's (or container's) write into a shared directory: its pid means nothing here
    elsewhere = tmp_path / f".shared.tmp-other-host-{DEAD_PID}-mnop3456"
    ours_dead = tmp_path / f".mine.tmp-{HOST}-{DEAD_PID}-qrst7890"
    # marked as an encdec of before the machine-id was part of the mark marked this machine's (or another machine's
    # of this name): its previous version moved aside is put back, nothing of it deleted
    earlier = tmp_path / f".older.tmp-{EARLIER_HOST}-{DEAD_PID}-cdef4567"
    earlier_aside = tmp_path / f".older.old-{EARLIER_HOST}-{DEAD_PID}-cdef8901"
    # a container of this machine's name (host networking) with processes of its own: its pid means nothing here
    beside = tmp_path / f".box.tmp-{MACHINE}-ns1-{DEAD_PID}-uvwx1234"
    if os.path.exists("/proc/self/ns/pid"):  # its writes are marked with its namespace, as ours with ours
        assert HOST.startswith(MACHINE) and HOST.endswith(f"-ns{os.stat('/proc/self/ns/pid').st_ino}")
    # another machine of this one's name, in its own machine's PID namespace (the same id on every Linux): its
    # machine-id tells it apart
    clone = tmp_path / f".clone.tmp-{MACHINE}-m00000000-ns{HOST.rpartition('-ns')[2]}-{DEAD_PID}-yzab1234"
    if os.path.exists("/etc/machine-id"):
        assert "-m" in HOST.removeprefix(MACHINE)
    for directory in (abandoned, aside / "out", alive, elsewhere, ours_dead, earlier, earlier_aside / "older", beside,
                      clone,
                      *(u / "kept" for u in users)):
        directory.mkdir(parents=True)
    (aside / "out" / "model.safetensors").write_text("the previous version")
    with caplog.at_level("WARNING", logger="encdec"), atomic_dir(tmp_path / "next") as tmp:
        (tmp / "file").write_text("x")
    assert f"{earlier} is an interrupted write's, marked as an earlier encdec marked it" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name, beside.name, clone.name,
                                                                 earlier.name, earlier_aside.name, "older", "next",
                                                                 "out", *(u.name for u in users)])
    assert all((u / "kept").is_dir() for u in users)
    assert (out / "model.safetensors").read_text() == "the previous version"


def test_ctrl_c_between_the_renames_of_an_overwrite_leaves_the_new_version_in_place(tmp_path, monkeypatch):
    """Python raises a KeyboardInterrupt right after the call it arrived in: one after the first rename (the old
    version moved aside) deleted the new version and left the output's name empty, the old one hidden. The old
    version is put back, as when the second rename fails; after the second, the new one stays, with the old's mode."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")
    replace, renames, interrupt_after = os.replace, [], [1]

    def interrupted(src, dst):
        replace(src, dst)
        renames.append(dst)
        if len(renames) == interrupt_after[0]:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, just as that rename was done

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    out.chmod(0o700)
    renames.clear()
    interrupt_after[0] = 2
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new" and stat.S_IMODE(out.stat().st_mode) == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_link_named_like_a_killed_writes_folder_is_neither_followed_nor_removed(tmp_path):
    """A link named like a folder moved aside by a killed write (put in a shared output folder, or in a run
    directory handed over) made the next write move what it leads to into the output's folder: here ~/.ssh; and a
    process id too large for a pid_t failed every write there with a traceback."""
    home, shared = tmp_path / "home", tmp_path / "shared"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    shared.mkdir()
    link = shared / f"..ssh.old-{HOST}-{DEAD_PID}-abcdefgh"
    link.symlink_to(home)
    huge = shared / f".x.tmp-{HOST}-99999999999999999999-abcdefgh"
    huge.mkdir()
    with atomic_dir(shared / "project") as tmp:
        (tmp / "file").write_text("x")
    assert (home / ".ssh" / "id_ed25519").read_text() == "secret" and not (shared / ".ssh").exists()
    assert link.is_symlink() and huge.is_dir() and (shared / "project" / "file").exists()


def test_an_unfinished_output_holding_a_folder_of_its_own_name_is_removed_not_restored(tmp_path):
    """`encdec classify --out runs/classifier` writes its first fold's classifier to TMP/classifier: killed
    after that fold, the next write took that folder for the previous output moved aside and put it in place,
    where the rerun of the command then refused to replace it, hours later."""
    unfinished = tmp_path / f".classifier.tmp-{HOST}-{DEAD_PID}-abcd1234"
    (unfinished / "classifier").mkdir(parents=True)
    (unfinished / "classifier" / "head.safetensors").write_text("fold 0 of an unfinished run")
    with atomic_dir(tmp_path / "next") as tmp:
        (tmp / "file").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next"]


def test_a_failed_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    """The previous output, moved aside, stayed aside when the new one's rename failed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the previous version")
    real, renames = os.replace, []

    def second_fails(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="Input/output error"), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("the new version")
    monkeypatch.setattr(os, "replace", real)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "model.safetensors").read_text() == "the previous version"


def test_an_output_written_meanwhile_by_another_process_is_kept_without_overwrite(tmp_path):
    """The check for an existing output came only before the work: a second run writing the same --out replaced
    the first's finished output at its end, without --overwrite."""
    out = tmp_path / "out"
    with pytest.raises(EncdecError, match="written by another process while this one wrote it"), atomic_dir(out) as tmp:
        (tmp / "mine").write_text("this run's")
        out.mkdir()
        (out / "theirs").write_text("the other run's")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "theirs").read_text() == "the other run's"


@pytest.mark.parametrize("hard_links", [True, False])
def test_an_exclusive_file_write_never_replaces_a_file_made_after_any_check(tmp_path, monkeypatch, hard_links):
    """`encdec generate --out` checked that no file had appeared and then renamed: one made between the check and
    the rename was replaced. Now the name is given by a hard link, which fails where a name exists (where the
    filesystem has no hard links, checked just before the rename), and nothing of this write is left."""
    out = tmp_path / "out.jsonl"

    def another_writer_first(real):  # the other run's file appears at the last instant: after every check
        def call(*args, **kwargs):
            if not out.exists():
                out.write_text("the other run's\n")
            return real(*args, **kwargs)
        return call

    if hard_links:
        monkeypatch.setattr(os, "link", another_writer_first(os.link))
        monkeypatch.setattr(os, "replace", another_writer_first(os.replace))
    else:
        monkeypatch.setattr(os, "fsync", another_writer_first(os.fsync))
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    with pytest.raises(FileExistsError):
        atomic_write(out, "this run's\n", exclusive=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"] and out.read_text() == "the other run's\n"
    monkeypatch.undo()
    atomic_write(tmp_path / "new.jsonl", "this run's\n", exclusive=True)  # nothing there: written as before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "out.jsonl"]
    assert (tmp_path / "new.jsonl").read_text() == "this run's\n"


@pytest.mark.parametrize("command", ["adapt", "export-encoder"])
def test_overwrite_never_replaces_a_training_run(adapted, sources, tmp_path, capsys, command):
    """A command that replaces its --out whole deleted a training run's checkpoints and metrics (and a live run's
    lock) when pointed at it with --overwrite."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / ".encdec.lock").write_text("{}")
    args = ["adapt", "--encoder", str(sources["gemma3"])] if command == "adapt" else ["export-encoder", str(adapted)]
    assert main([*args, "--out", str(run), "--overwrite"]) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "holds a training run (.encdec.lock, checkpoints, metrics.jsonl)" in line
    assert sorted(p.name for p in run.iterdir()) == [".encdec.lock", "checkpoints", "metrics.jsonl"]


def test_overwrite_of_a_run_whose_checkpoints_are_a_link_starts_afresh(adapted, corpus, tmp_path):
    """checkpoints/ as a link (to a bigger disk) survived --overwrite (rmtree refuses links, and its error was
    ignored): the new run's final model was the old run's last checkpoint."""
    out, elsewhere = tmp_path / "run", tmp_path / "big-disk"
    loop.train(_config(adapted, out, corpus, steps=4, save_every=2, eval_every=0))
    shutil.move(out / "checkpoints", elsewhere)
    (out / "checkpoints").symlink_to(elsewhere)
    loop.train(_config(adapted, out, corpus, steps=2, save_every=2, eval_every=0, overwrite=True))
    run = json.loads((out / "model" / "encdec.json").read_text())["pretrained"]
    assert run["steps"] == 2 and run["averaged_checkpoints"] == ["step-000002"]
    assert not (out / "checkpoints").is_symlink() and (elsewhere / "step-000004").is_dir()  # the link went, not its target


def test_a_token_cache_that_cannot_be_written_is_a_warning_and_leaves_nothing(corpus, tmp_path, capsys, monkeypatch):
    import errno

    from transformers import AutoTokenizer

    setup()
    make_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))

    def full_disk(file, **arrays):
        file.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    stream = token_stream(tokenizer, [str(corpus)], cache_dir=tmp_path / "cache")
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(stream) > 100 and len(left) == 1 and left[0].endswith(".npz.unwritten")  # no partial file left, only
    # the empty mark that tells processes waiting for the cache to tokenize at once
    assert (tmp_path / "cache" / left[0]).stat().st_size == 0
    assert len(_lines(capsys.readouterr().err, "could not cache the tokens")) == 1


def test_a_damaged_token_cache_is_deleted_and_rebuilt_with_one_line(corpus, tmp_path, capsys):
    from transformers import AutoTokenizer

    setup()
    make_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    expected = np.array(token_stream(tokenizer, [str(corpus)], cache_dir=tmp_path / "cache"))  # the cache is mapped
    (cached,) = (tmp_path / "cache").iterdir()
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the token ids
    cached.write_bytes(bytes(data))
    capsys.readouterr()
    assert np.array_equal(token_stream(tokenizer, [str(corpus)], cache_dir=tmp_path / "cache"), expected)
    assert len(_lines(capsys.readouterr().err, "is damaged (")) == 1
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    assert np.array_equal(token_stream(tokenizer, [str(corpus)], cache_dir=tmp_path / "cache"), expected)
    assert len(_lines(capsys.readouterr().err, "is damaged (")) == 1


def test_outputs_get_the_modes_a_plain_write_would_give(tmp_path):
    """Temporary files and directories are private (0600, 0700) while written; the outputs they become are not."""
    import numpy as np
    from safetensors.numpy import save_file

    from encdec.files import atomic_write, write_cache, write_weights
    from encdec.training.plain_state import write_state

    previous = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "file").write_text("x")
            write_weights(tmp, {"w": torch.zeros(2)})  # safetensors creates its files 0600: another account's server,
            write_state(tmp, "optimizer", {"m": torch.zeros(2)})  # or a shared cache's next user, could not read them
        atomic_write(tmp_path / "table.md", "text")
        write_cache(tmp_path / "features.safetensors", lambda t: save_file({"x": np.zeros(2)}, str(t)), "x", "y")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    for path in ("table.md", "features.safetensors", "out/file", "out/model.safetensors", "out/optimizer.safetensors"):
        assert (tmp_path / path).stat().st_mode & 0o777 == 0o644, path
    os.chmod(tmp_path / "table.md", 0o600)  # a user's private file (generate --out of private prompts) stays private
    atomic_write(tmp_path / "table.md", "again")
    assert (tmp_path / "table.md").stat().st_mode & 0o777 == 0o600


def test_a_cache_is_written_through_no_planted_link_and_a_full_disk_is_a_warning(tmp_path, monkeypatch):
    """Cache temporaries had names anyone could foresee (.NAME.HOST.PID.tmp): a link planted there in a shared cache
    made the write truncate and chmod the file it led to; and safetensors' own error for a full disk was a
    traceback (a probe's computed features lost), where a cache that cannot be written is a warning."""
    import safetensors

    from encdec import files

    private = tmp_path / "private.txt"
    private.write_text("mine")
    private.chmod(0o600)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f".tokens.npz.{files.HOST}.{os.getpid()}.tmp").symlink_to(private)  # the token cache's writer opens
    assert files.write_cache(cache / "tokens.npz", lambda t: t.write_bytes(b"tokens"), "x", "y")  # its path
    assert private.read_text() == "mine" and private.stat().st_mode & 0o777 == 0o600
    assert (cache / "tokens.npz").read_bytes() == b"tokens" and not (cache / "tokens.npz").is_symlink()

    def full(tensors, filename):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    warned = []
    monkeypatch.setattr(files.log, "warning", lambda *args: warned.append(args[0] % args[1:]))
    assert not files.write_cache(cache / "other.safetensors", lambda t: full({}, str(t)), "the features", "computed")
    assert "could not cache the features" in warned[0] and "No space left on device" in warned[0]
    assert sorted(p.name for p in cache.iterdir() if not p.is_symlink()) == ["tokens.npz"]


def test_a_cache_write_removes_what_a_killed_write_of_it_left(tmp_path):
    """A cache temporary's name said nothing of its writer, so one that an out-of-memory kill left (the dequantized
    GGUF's, a gigabyte) stayed in the cache for good. The next write of the same file removes those of dead
    processes of this machine; a live writer's, a link named like one, and another file's temporaries stay."""
    from encdec import files

    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / f".tokens.npz.tmp-{files.HOST}-{DEAD_PID}-abcd1234"
    dead.write_bytes(b"x" * 1000)
    live = cache / f".tokens.npz.tmp-{files.HOST}-{os.getpid()}-abcd1234"
    live.write_bytes(b"being written")
    (tmp_path / "elsewhere").write_text("mine")
    link = cache / f".tokens.npz.tmp-{files.HOST}-{DEAD_PID}-linkedxx"
    link.symlink_to(tmp_path / "elsewhere")
    other = cache / f".features.safetensors.tmp-{files.HOST}-{DEAD_PID}-abcd1234"
    other.write_bytes(b"another file's")
    elsewhere = cache / f".tokens.npz.tmp-another-machine-{DEAD_PID}-abcd1234"
    elsewhere.write_bytes(b"a write on another machine sharing the cache")
    assert files.write_cache(cache / "tokens.npz", lambda t: t.write_bytes(b"tokens"), "x", "y")
    assert sorted(p.name for p in cache.iterdir()) == sorted([live.name, link.name, other.name, elsewhere.name,
                                                               "tokens.npz"])
    assert (tmp_path / "elsewhere").read_text() == "mine"

    def killed(tmp) -> None:  # as a kill leaves it: the temporary stays, named after this process
        raise SystemExit

    with pytest.raises(SystemExit):
        files.write_cache(cache / "more.npz", killed, "x", "y")
    assert not [p for p in cache.iterdir() if p.name.startswith(".more.npz")]  # removed on the way out, though


def test_a_kept_final_model_is_a_run_that_only_overwrite_replaces(adapted, corpus, tmp_path, capsys, monkeypatch):
    """A user who deleted a finished run's checkpoints and metrics to free disk keeps its final model: a new run
    into that directory is refused until --overwrite, and no run fills the working directory itself."""
    out = tmp_path / "run"
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "1")) == 0
    shutil.rmtree(out / "checkpoints")
    (out / "metrics.jsonl").unlink()
    kept = sorted(p.name for p in (out / "model").iterdir())
    capsys.readouterr()
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "1")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "holds a run (model)" in line and "--overwrite" in line
    assert sorted(p.name for p in (out / "model").iterdir()) == kept
    monkeypatch.chdir(out)
    assert main(_pretrain_args(adapted, ".", corpus, "--steps", "1", "--overwrite")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "is the current directory or one above it" in line
    assert sorted(p.name for p in (out / "model").iterdir()) == kept


def test_resuming_with_fewer_steps_than_the_checkpoint_is_one_line(adapted, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "2", "--save-every", "2", "--eval-every", "0")) == 0
    final = read_weights(out / "model")
    capsys.readouterr()
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "1", "--resume")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "--steps 1 is below the step of the checkpoint to resume" in line and "--steps 2 or more" in line
    assert all(torch.equal(t, final[k]) for k, t in read_weights(out / "model").items())


def test_resume_without_a_checkpoint_says_the_run_starts_afresh(adapted, corpus, tmp_path, capsys):
    """A job script may pass --resume every time; a mistyped --out must not restart training unseen."""
    out = tmp_path / "run"
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "1", "--eval-every", "0", "--resume")) == 0
    err = capsys.readouterr().err
    assert len(_lines(err, "holds no checkpoint to resume: the run starts from step 0")) == 1
    assert len(_lines(err, "--warmup-steps 10 is as long as the run or longer (--steps 1)")) == 1  # said, not refused
    # a finished run whose checkpoints were deleted (to free the disk): resumed from step 0 it emptied its metrics
    # and replaced its model
    shutil.rmtree(out / "checkpoints")
    model, metrics = read_weights(out / "model"), (out / "metrics.jsonl").read_text()
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "2", "--eval-every", "0", "--resume")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "holds a finished run's model but no checkpoint to resume" in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_text() == metrics and metrics
    assert all(torch.equal(t, model[k]) for k, t in read_weights(out / "model").items())


def test_resuming_on_other_data_is_one_line(adapted, corpus, tmp_path, capsys):
    """Text added to the data (or a corpus that changed) between stop and resume: the saved place then pointed at
    other windows, and the held-out windows, the last of the stream, moved into training, without a word."""
    out, data = tmp_path / "run", tmp_path / "data.txt"
    data.write_text(corpus.read_text())
    assert main(_pretrain_args(adapted, out, data, "--steps", "1", "--save-every", "1", "--eval-every", "0")) == 0
    data.write_text(corpus.read_text() + "\n\nw9 w8 w7 w6 w5 w4 w3 w2 w1 " * 40)
    capsys.readouterr()
    assert main(_pretrain_args(adapted, out, data, "--steps", "2", "--resume")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "step-000001: the training data differs from the run's (" in line and "--overwrite" in line
    assert [p.name for p in checkpointing.checkpoints(out)] == ["step-000001"]
    data.write_text(corpus.read_text())  # the run's data again: it resumes
    # another --eval-windows changes the items that train (the held-out ones are cut from the data's end): said as
    # that, where the line blamed the data
    assert main(_pretrain_args(adapted, out, data, "--steps", "2", "--resume", "--eval-windows", "3")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "the run held out --eval-windows 4, this resume 3, which changes the items it trains on" in line, line
    # so do the row lengths (the windows are cut to --enc-len + --dec-len): said as that, not as other data
    assert main(_pretrain_args(adapted, out, data, "--steps", "2", "--resume", "--enc-len", "12")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "they are made by settings this resume changes (--enc-len 16 -> 12)" in line, line
    assert "differs from the run's" not in line and "resume with the run's settings" in line, line
    assert main(_pretrain_args(adapted, out, data, "--steps", "2", "--resume")) == 0


def test_resuming_after_the_start_model_was_replaced_is_one_line(adapted, corpus, tmp_path, capsys):
    """`encdec adapt ... --overwrite` between stop and resume: the checkpoint's weights loaded, and the tokenizer,
    the teacher, the untrained rows and the final model's configuration came from the new model, unsaid. A copy
    of the same model elsewhere is the same model."""
    import encdec

    start, out = tmp_path / "start", tmp_path / "run"
    shutil.copytree(adapted, start)
    assert main(_pretrain_args(start, out, corpus, "--steps", "1", "--save-every", "1", "--eval-every", "0")) == 0
    moved = tmp_path / "moved"
    shutil.copytree(start, moved)
    model = encdec.load(start)
    with torch.no_grad():
        model.decoder.norm.weight.add_(0.5)
    encdec.save(model, start, tokenizer_dir=moved, overwrite=True)
    capsys.readouterr()
    assert main(_pretrain_args(start, out, corpus, "--steps", "2", "--resume")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert f"step-000001 was trained from another model than {start} holds now" in line and "--overwrite" in line
    assert main(_pretrain_args(moved, out, corpus, "--steps", "2", "--resume")) == 0


def test_resuming_after_the_teacher_was_replaced_is_one_line(adapted, sources, corpus, tmp_path, capsys):
    """The checkpoint fingerprinted its start model, not its distillation teacher: the same --teacher path holding
    other weights taught the resumed steps otherwise (the losses of the resumed steps differed), unsaid."""
    teacher, out = tmp_path / "teacher", tmp_path / "run"
    shutil.copytree(sources["gemma3"], teacher)
    args = _pretrain_args(adapted, out, corpus, "--save-every", "1", "--eval-every", "0", "--teacher", str(teacher))
    assert main([*args, "--steps", "1"]) == 0
    shutil.rmtree(out / "model")
    config = teacher / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    capsys.readouterr()
    assert main([*args, "--steps", "2", "--resume"]) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert f"step-000001 was distilled from another teacher than {teacher} holds now" in line, line
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    assert main([*args, "--steps", "2", "--resume"]) == 0  # the run's teacher again: it resumes


def test_a_start_model_given_as_a_file_or_a_name_is_fingerprinted_too(sources, tmp_path):
    """Only a directory's --model was fingerprinted: a decoder-only run begun from one GGUF resumed from another of
    the same shapes (another quantization, a fine-tune) without a word, its teacher, untrained rows and final
    model's configuration taken from the new file. (The tiny GGUFs' byte-level tokenizers read no text, so no run
    trains on one here.)"""
    from tiny import write_gguf

    from encdec.errors import EncdecError
    from encdec.training import rundir

    other = tmp_path / "other-source"
    shutil.copytree(sources["gemma3"], other)
    (other / "config.json").write_text((other / "config.json").read_text().replace('"rms_norm_eps": 1e-06',
                                                                                   '"rms_norm_eps": 1e-05'))
    first, second = write_gguf(sources["gemma3"], tmp_path / "a.gguf"), write_gguf(other, tmp_path / "b.gguf")
    assert first.stat().st_size == second.stat().st_size
    shutil.copy(first, tmp_path / "copy.gguf")
    saved = {"start_model": rundir.start_model_digest(str(first))}
    assert rundir.start_model_digest(str(tmp_path / "copy.gguf")) == saved["start_model"]  # a copy is the same
    rundir.check_start_model(saved, str(tmp_path / "copy.gguf"), tmp_path / "step-000001")
    with pytest.raises(EncdecError, match=f"step-000001 was trained from another model than {second} holds now"):
        rundir.check_start_model(saved, str(second), tmp_path / "step-000001")
    named = {"start_model": rundir.start_model_digest("gemma-3-270m")}  # a name: the name, not its files
    rundir.check_start_model(named, "gemma-3-270m", tmp_path / "step-000001")
    with pytest.raises(EncdecError, match="another model than"):
        rundir.check_start_model(named, str(first), tmp_path / "step-000001")


def test_a_metrics_line_that_cannot_be_written_is_one_line(adapted, corpus, tmp_path, capsys, monkeypatch):
    """A full disk at a metrics line (a checkpoint took the last space) was a traceback; with several processes
    the first stopped alone and the others waited in the next step's collective for --dist-timeout."""
    import errno

    from encdec.training import metrics

    log = metrics.Metrics.log

    def full_disk(self, record, *, write=True):
        if write and record["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return log(self, record, write=write)

    monkeypatch.setattr(metrics.Metrics, "log", full_disk)
    out = tmp_path / "run"
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "3", "--save-every", "1", "--eval-every", "0")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert f"cannot write {out / 'metrics.jsonl'}: No space left on device" in line
    assert [p.name for p in checkpointing.checkpoints(out)] == ["step-000001", "step-000002"]  # --resume goes on


def test_a_checkpoint_whose_write_back_fails_is_not_taken_for_written(adapted, corpus, tmp_path, capsys, monkeypatch):
    """Network and quota-limited file systems often report a full disk or an I/O error only at fsync (safetensors
    ignores errors at close): every fsync error was passed over, the unsynced step-2 renamed into place and, with
    --keep-last 1, the good step-1 deleted; --resume then found no usable checkpoint. A system that cannot fsync
    a path (EINVAL) is still passed over."""
    fsync = os.fsync

    def failing(errno_: int):
        def sync(fd: int) -> None:
            if "step-000002" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno_, os.strerror(errno_))
            fsync(fd)
        return sync

    out = tmp_path / "run"
    monkeypatch.setattr(os, "fsync", failing(errno.EIO))
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "3", "--save-every", "1", "--keep-last", "1",
                               "--eval-every", "0")) == 2
    (line,) = _lines(capsys.readouterr().err, "error:")
    assert "Input/output error" in line
    assert [p.name for p in checkpointing.checkpoints(out)] == ["step-000001"]
    monkeypatch.setattr(os, "fsync", failing(errno.EINVAL))
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "3", "--save-every", "1", "--keep-last", "1",
                               "--eval-every", "0", "--resume")) == 0
    assert [p.name for p in checkpointing.checkpoints(out)] == ["step-000003"]


def test_a_run_inside_its_data_folder_is_refused(adapted, corpus, tmp_path, capsys):
    """`--data dd --out dd/run`: the run's metrics.jsonl was read as data when it ran again (--resume refused
    "dd/run/metrics.jsonl, line 1: no field 'text'")."""
    data = tmp_path / "dd"
    data.mkdir()
    shutil.copy(corpus, data / "corpus.txt")
    setup()
    assert main(_pretrain_args(adapted, data / "run", data, "--steps", "1")) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert f"--out {data / 'run'} is inside the data folder {data}" in line
    assert sorted(p.name for p in data.iterdir()) == ["corpus.txt"]


def test_a_checkpoints_optimizer_settings_and_scheduler_keys_are_not_taken_on_resume(adapted, corpus, tmp_path):
    """Resuming took every AdamW setting of the checkpoint's optimizer.json (an edited `maximize: true` trained by
    gradient ascent, silently; `eps: "x"` failed a step later with a traceback) and copied every key of its
    scheduler's state onto the scheduler (`get_last_lr: 1` replaced the method). This run's settings, and the
    checkpoint's step in the schedule alone, are read: the edited run resumes as the unedited one does."""
    loop.train(_config(adapted, tmp_path / "run", corpus, steps=4, save_every=2, eval_every=0))
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "run", edited)
    step = checkpointing.checkpoints(edited)[-1]
    optimizer = json.loads((step / "optimizer.json").read_text())
    for group in optimizer["state"]["param_groups"]:
        group.update(maximize=True, eps="x", betas=[0.5, 0.5])
    (step / "optimizer.json").write_text(json.dumps(optimizer))
    trainer = json.loads((step / "trainer.json").read_text())
    trainer["state"]["scheduler"]["get_last_lr"] = 1
    (step / "trainer.json").write_text(json.dumps(trainer))
    for out in (tmp_path / "run", edited):
        loop.train(_config(adapted, out, corpus, steps=6, save_every=2, eval_every=0, resume=True))
    assert [r["loss"] for r in _metrics(edited)] == [r["loss"] for r in _metrics(tmp_path / "run")]
    kept, theirs = (read_weights(checkpointing.checkpoints(out)[-1]) for out in (tmp_path / "run", edited))
    assert all(torch.equal(kept[name], theirs[name]) for name in kept)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["term", "hup"])
def test_a_run_stopped_by_a_signal_keeps_its_step_and_exits_with_the_signals_status(adapted, corpus, tmp_path,
                                                                                    monkeypatch, capsys, sig):
    """SIGTERM (a batch system's time limit, `docker stop`) stopped a run as Ctrl-C does, exit status 130 and
    "interrupted"; SIGHUP (a closed terminal) killed it, the steps since its last checkpoint lost. Both now finish
    the step, write its checkpoint and exit with 128 + N, as `encdec generate` does."""
    from encdec.training.metrics import Metrics

    original = Metrics.log

    def signal_after_step_1(self, record, **kw):
        original(self, record, **kw)
        if record["step"] == 1:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(Metrics, "log", signal_after_step_1)
    out = tmp_path / "run"
    assert main(_pretrain_args(adapted, out, corpus, "--steps", "4", "--save-every", "100", "--eval-every", "0")) \
        == 128 + sig
    assert f"encdec pretrain: stopped by {sig.name}" in capsys.readouterr().err
    assert [p.name for p in checkpointing.checkpoints(out)] == ["step-000002"]


def test_an_elastic_restart_with_overwrite_resumes_from_the_failed_attempts_checkpoints(adapted, corpus, tmp_path,
                                                                                        monkeypatch, caplog):
    """torchrun --max-restarts starts the workers again with the same command line: with --overwrite every restart
    deleted the failed attempt's checkpoints and began again at step 0. A restart resumes from them; the first
    attempt (and a restart before any checkpoint) still starts afresh."""
    import logging

    out = tmp_path / "run"
    loop.train(_config(adapted, out, corpus, steps=2, save_every=1, eval_every=0, overwrite=True))
    earlier = (out / "metrics.jsonl").read_text()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")  # this job's first attempt, then its restart
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # an attempt that failed before replacing an earlier
    loop.train(_config(adapted, out, corpus, steps=2, save_every=1, eval_every=0, overwrite=True))  # run's: replaced
    assert (out / "metrics.jsonl").read_text() != earlier
    kept = (out / "metrics.jsonl").read_text().splitlines()
    with caplog.at_level(logging.WARNING, logger="encdec"):
        loop.train(_config(adapted, out, corpus, steps=4, save_every=1, eval_every=0, overwrite=True))
    assert "restart 1 of an elastic run" in caplog.text
    assert (out / "metrics.jsonl").read_text().splitlines()[:2] == kept  # the first attempt's steps, not redone
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metadata(out / "model")["pretrained"]["resumes"]] == [2]
    other = tmp_path / "fresh"  # no checkpoint yet: --overwrite as asked
    loop.train(_config(adapted, other, corpus, steps=1, save_every=5, eval_every=0, overwrite=True))
    assert "resumes" not in read_metadata(other / "model")["pretrained"]


def test_jobs_launched_without_a_rendezvous_id_are_told_apart_by_their_launcher(adapted, corpus, tmp_path,
                                                                               monkeypatch):
    """torchrun's --rdzv-id defaults to "none" (a static rendezvous: several nodes, or --master-port): every such
    job had the same id, and a restart of today's --overwrite job, failed before replacing yesterday's run,
    resumed yesterday's run with today's settings. Such a job is its launcher (the workers' parent) on its host."""
    out = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setattr(rundir.os, "getppid", lambda: 4_000_001)  # yesterday's torchrun
    loop.train(_config(adapted, out, corpus, steps=2, save_every=1, eval_every=0, overwrite=True))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setattr(rundir.os, "getppid", lambda: 4_000_002)  # today's, restarted
    loop.train(_config(adapted, out, corpus, steps=3, save_every=1, eval_every=0, overwrite=True))
    assert "resumes" not in read_metadata(out / "model")["pretrained"]  # afresh, as --overwrite asked
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # the same launcher's next restart: its own checkpoints
    loop.train(_config(adapted, out, corpus, steps=4, save_every=1, eval_every=0, overwrite=True))
    assert [r["step"] for r in read_metadata(out / "model")["pretrained"]["resumes"]] == [3]


@pytest.mark.parametrize("newest", ["damaged", "unreadable"])
def test_an_elastic_restart_does_not_delete_the_jobs_checkpoints_when_its_newest_does_not_read(
        adapted, corpus, tmp_path, monkeypatch, newest):
    """Only the newest checkpoint was asked whose job wrote it, any error reading it taken for "not this job's":
    a damaged newest one (the failed attempt's last write) or one unreadable for a moment made the restart delete
    the job's good older checkpoints and begin again at step 0. A damaged one is passed over (the older one is the
    job's: resumed from); an unreadable one counts as the job's (resuming reports it)."""
    from encdec.errors import ReadFailed

    out = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    loop.train(_config(adapted, out, corpus, steps=2, save_every=1, eval_every=0, overwrite=True))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    last = out / "checkpoints" / "step-000002"
    if newest == "damaged":
        (last / "trainer.safetensors").write_bytes(b"")
        loop.train(_config(adapted, out, corpus, steps=3, save_every=1, eval_every=0, overwrite=True))
        assert [r["step"] for r in read_metadata(out / "model")["pretrained"]["resumes"]] == [1]
        return
    real = rundir.read_state

    def unreadable(directory, name):
        if directory == last:
            raise ReadFailed(f"cannot read {directory / name}.json: Stale file handle")
        return real(directory, name)

    monkeypatch.setattr(rundir, "read_state", unreadable)
    loop.train(_config(adapted, out, corpus, steps=3, save_every=1, eval_every=0, overwrite=True))
    assert [r["step"] for r in read_metadata(out / "model")["pretrained"]["resumes"]] == [2]
