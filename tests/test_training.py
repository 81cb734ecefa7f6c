"""The pretraining loop on a tiny model: learning, resuming, stopping, warm-up, averaging, configuration."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import write_corpus

import encdec
from encdec.cli import main
from encdec.errors import EncdecError
from encdec.training import checkpointing, loop, step
from encdec.training.config import TrainConfig
from encdec.training.metrics import Metrics
from encdec.training.plain_state import read_state


def _config(model, out, corpus, **overrides) -> TrainConfig:
    base = dict(model=str(model), out=str(out), data=[str(corpus)], enc_len=16, dec_len=16, batch_size=2, steps=6,
                lr=3e-3, warmup_steps=2, eval_every=3, eval_windows=4, save_every=2, precision="fp32")
    return TrainConfig(**{**base, **overrides})


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def _sigterm_during(step: int, monkeypatch) -> Iterator[None]:
    """Training runs inside get a SIGTERM during `step`: the real signal path (the step finishes, is checkpointed,
    and the run stops)."""
    original_log = Metrics.log

    def log_then_signal(self, record, **kw):
        original_log(self, record, **kw)
        if record["step"] == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Metrics, "log", log_then_signal)
    try:
        yield
    finally:
        monkeypatch.setattr(Metrics, "log", original_log)


def _stopped_during(step: int, cfg: TrainConfig, monkeypatch) -> None:
    with _sigterm_during(step, monkeypatch), pytest.raises(KeyboardInterrupt):
        loop.train(cfg)


@pytest.mark.parametrize("objective, distill, factor", [("prefixlm", True, 0.8), ("prefixlm", False, 0.8),
                                                        ("ul2", False, 0.9)])
def test_loss_falls_and_the_final_model_loads(adapted, corpus, tmp_path, objective, distill, factor):
    cfg = _config(adapted, tmp_path / "run", corpus, objective=objective, distill=distill, steps=20, eval_every=10)
    final = loop.train(cfg)
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 21))
    assert {"loss", "lr", "tokens_per_s", "ce"} <= records[0].keys()
    assert ("kl" in records[0]) == distill
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < factor * first
    assert records[-1]["eval_loss"] < records[9]["eval_loss"] + 0.5
    model = encdec.load(final)
    # the last held-out loss is the final model's mean cross-entropy per target token over the held-out examples,
    # each scored alone by a plain forward pass (not packed, not shared among processes)
    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    total, count = 0.0, 0
    for example in build_plan(cfg, Dist())[0].eval_examples:
        decoder = torch.tensor([[model.config.bos_token_id, *example.targets[:-1]]])
        with torch.no_grad():
            logits = model(torch.tensor([example.inputs]), decoder_input_ids=decoder).logits[0]
        total += F.cross_entropy(logits.float(), torch.tensor(example.targets), reduction="sum").item()
        count += len(example.targets)
    assert records[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-4)
    import transformers as tf

    assert type(tf.AutoModelForSeq2SeqLM.from_pretrained(str(final))).__name__ == "T5Gemma2ForConditionalGeneration"
    run = encdec.checkpoint.read_metadata(final)["pretrained"]
    assert run["objective"] == objective  # and every setting that made it, paths as found again from anywhere
    assert run["settings"]["objective"] == objective and run["settings"]["lr"] == cfg.lr
    assert run["settings"]["data"] == [str(Path(corpus).resolve())] and "out" not in run["settings"]
    assert model.config == encdec.load(adapted).config


def test_resume_reproduces_the_uninterrupted_run(adapted, corpus, tmp_path, monkeypatch):
    """Also what is kept and averaged: the checkpoint written when the run stopped (step 5, off the schedule of
    every 2 steps) is neither kept by --keep-last nor averaged by --average-last once step 6 is written."""
    options = dict(distill=True, keep_last=2, average_last=2)
    straight = tmp_path / "straight"
    loop.train(_config(adapted, straight, corpus, **options))
    expected = [r["loss"] for r in _metrics(straight)]

    interrupted = tmp_path / "interrupted"
    _stopped_during(5, _config(adapted, interrupted, corpus, **options), monkeypatch)
    assert [p.name for p in checkpointing.checkpoints(interrupted)] == ["step-000002", "step-000004", "step-000005"]
    with pytest.raises(EncdecError, match=r"holds a run \(checkpoints, metrics.jsonl\); pass --resume"):
        loop.train(_config(adapted, interrupted, corpus, **options))
    loop.train(_config(adapted, interrupted, corpus, resume=True, **options))
    assert [r["loss"] for r in _metrics(interrupted)] == expected
    assert [p.name for p in checkpointing.checkpoints(interrupted)] == ["step-000004", "step-000006"]
    assert [p.name for p in checkpointing.checkpoints(straight)] == ["step-000004", "step-000006"]
    a = encdec.load(straight / "model").state_dict()
    b = encdec.load(interrupted / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_during_the_last_step_still_writes_the_final_model(adapted, corpus, tmp_path, monkeypatch, capsys):
    """Every step done, the run stopped with "continue with --resume", and a resumed run was needed only to write
    the final model (a pre-empted job submitted again for it)."""
    with _sigterm_during(3, monkeypatch):  # the last step
        final = loop.train(_config(adapted, tmp_path / "run", corpus, steps=3, eval_every=0))
    assert final == tmp_path / "run" / "model" and encdec.load(final)
    assert [p.name for p in checkpointing.checkpoints(tmp_path / "run")] == ["step-000002", "step-000003"]
    # on stderr, as every other message: stdout holds what a run hands on (the final model's path)
    assert "stop requested during the last step (3): writing the final model" in capsys.readouterr().err


def test_a_second_signal_during_the_last_step_stops_the_final_model(adapted, corpus, tmp_path, monkeypatch, capsys):
    """The second signal, during the rest of the last step (its evaluation, its checkpoint: minutes for a large
    model), was swallowed and the final model written with exit status 0; now it stops there, and --resume writes
    the final model."""
    original_log = Metrics.log

    def log_then_signal_twice(self, record, **kw):
        original_log(self, record, **kw)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Metrics, "log", log_then_signal_twice)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_config(adapted, tmp_path / "run", corpus, steps=3, eval_every=0))
    monkeypatch.setattr(Metrics, "log", original_log)
    assert not (tmp_path / "run" / "model").exists()
    assert [p.name for p in checkpointing.checkpoints(tmp_path / "run")][-1] == "step-000003"
    assert "stopped at step 3; continue with --resume" in capsys.readouterr().err
    final = loop.train(_config(adapted, tmp_path / "run", corpus, steps=3, eval_every=0, resume=True))
    assert final == tmp_path / "run" / "model" and encdec.load(final)


def test_a_run_started_outside_the_main_thread_trains_without_stop_handling(adapted, corpus, tmp_path, caplog):
    """Python takes signal handlers in the main thread only: train() called from a worker thread (a thread pool, a
    UI's callback) failed with a ValueError's traceback after loading everything and clearing --overwrite's run."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool, caplog.at_level("WARNING", logger="encdec"):
        final = pool.submit(loop.train, _config(adapted, tmp_path / "run", corpus, steps=2, eval_every=0)).result()
    assert final == tmp_path / "run" / "model" and encdec.load(final)
    assert "outside the main thread: SIGINT / SIGTERM / SIGHUP do not stop it" in caplog.text


def test_auto_precision_is_decided_once_and_a_resumed_run_keeps_it(adapted, corpus, tmp_path, monkeypatch):
    """--precision auto is decided at every launch (by the CPU's instructions, or timed), so a run resumed on
    another machine could go on in the other dtype, unlike the uninterrupted run and unsaid. The run's verdict is
    kept in its checkpoints."""
    from encdec.training import precision

    bf16_faster = {"now": True}
    monkeypatch.setattr(precision, "_bf16_instructions", lambda: bf16_faster["now"])
    options = dict(precision="auto", steps=4)
    straight = tmp_path / "straight"
    loop.train(_config(adapted, straight, corpus, **options))
    expected = [r["loss"] for r in _metrics(straight)]

    interrupted = tmp_path / "interrupted"
    _stopped_during(3, _config(adapted, interrupted, corpus, **options), monkeypatch)
    bf16_faster["now"] = False  # timed now, float32 would win
    loop.train(_config(adapted, interrupted, corpus, resume=True, **options))
    assert [r["loss"] for r in _metrics(interrupted)] == expected
    assert read_state(checkpointing.checkpoints(interrupted)[-1], "trainer")["precision"] == "bf16"


def test_auto_precision_asks_the_cpu_and_times_only_where_pytorch_cannot_say(monkeypatch):
    """Timing three small products made "auto" flip on a busy machine: a classification search resumed in the
    other dtype scored every trial again."""
    from encdec.training import precision

    cpu = torch.device("cpu")
    timed: list[torch.dtype] = []
    monkeypatch.setattr(precision, "_seconds", lambda dtype: timed.append(dtype) or (0.1 if dtype == torch.bfloat16
                                                                                   else 1.0))
    for flags, expected in (((True, False), torch.bfloat16), ((False, True), torch.bfloat16), ((False, False), None)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda f=flags: f[0])
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda f=flags: f[1])
        assert precision.autocast_dtype("auto", cpu) == expected
    assert timed == []
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert precision.autocast_dtype("auto", cpu) == torch.bfloat16 and timed == [torch.bfloat16, torch.float32]
    assert precision.autocast_dtype("fp32", cpu) is None and precision.autocast_dtype("bf16", cpu) == torch.bfloat16


def test_a_start_model_replaced_during_the_run_stops_the_final_model_and_keeps_the_checkpoints(adapted, corpus,
                                                                                                 tmp_path, monkeypatch):
    """The final model reads the --model directory again at the run's end (its configuration, metadata, and the
    untrained rows after --trim-vocab): replaced meanwhile (a new `encdec adapt --overwrite` there), it silently
    took the other model's."""
    start = tmp_path / "start"
    shutil.copytree(adapted, start)
    original_log = Metrics.log

    def replace_start(self, record, **kw):
        original_log(self, record, **kw)
        if record["step"] == 2:  # the same text in a new file: what a rewrite leaves
            text = (start / "config.json").read_text()
            (start / "config.json").unlink()
            (start / "config.json").write_text(text)

    monkeypatch.setattr(Metrics, "log", replace_start)
    out = tmp_path / "run"
    with pytest.raises(EncdecError, match=r"start changed while the run trained.*--resume"):
        loop.train(_config(start, out, corpus, steps=2, eval_every=0))
    monkeypatch.setattr(Metrics, "log", original_log)
    assert [p.name for p in checkpointing.checkpoints(out)] == ["step-000002"] and not (out / "model").exists()
    loop.train(_config(start, out, corpus, steps=2, eval_every=0, resume=True))
    assert encdec.load(out / "model").config == encdec.load(start).config

    def touch_start(self, record, **kw):  # the same files, their permissions changed and hard-linked elsewhere
        original_log(self, record, **kw)
        if record["step"] == 2:
            (tmp_path / "backup").mkdir()
            for path in start.iterdir():
                path.chmod(0o640)
                os.link(path, tmp_path / "backup" / path.name)

    monkeypatch.setattr(Metrics, "log", touch_start)
    loop.train(_config(start, tmp_path / "run-2", corpus, steps=2, eval_every=0))
    assert encdec.load(tmp_path / "run-2" / "model").config == encdec.load(start).config


def test_a_decoder_only_source_replaced_during_the_run_stops_the_final_model(sources, corpus, tmp_path, monkeypatch):
    """The same for a decoder-only run, whose final model takes its source's config.json again: edited meanwhile, it
    was saved with the source's weights' layers under a config of other layers."""
    start = tmp_path / "source"
    shutil.copytree(sources["gemma3"], start)
    original_log = Metrics.log

    def edit_start(self, record, **kw):
        original_log(self, record, **kw)
        if record["step"] == 2:
            config = json.loads((start / "config.json").read_text())
            (start / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))

    monkeypatch.setattr(Metrics, "log", edit_start)
    out = tmp_path / "run"
    with pytest.raises(EncdecError, match=r"source changed while the run trained.*--resume"):
        loop.train(_config(start, out, corpus, steps=2, eval_every=0, distill=False))
    assert not (out / "model").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(adapted, corpus, tmp_path, monkeypatch):
    original = step.chunked_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        parts = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            parts.loss = parts.loss * float("nan")
        return parts

    monkeypatch.setattr(step, "chunked_loss", poisoned)
    with pytest.raises(EncdecError, match=r"loss became nan at step 3.*step-000002"):
        loop.train(_config(adapted, tmp_path / "run", corpus))
    assert [p.name for p in checkpointing.checkpoints(tmp_path / "run")] == ["step-000002"]
    assert not (tmp_path / "run" / "model").exists()


def test_a_run_that_fails_in_its_first_step_leaves_an_out_the_next_run_takes(adapted, corpus, tmp_path, monkeypatch):
    """An out-of-memory error or a NaN in the first step left an empty metrics.jsonl (and TensorBoard's events): the
    next run, with a smaller batch and no flags, was refused as "holds a run; pass --resume or --overwrite"."""
    original = step.chunked_loss

    def poisoned(*args, **kwargs):
        parts = original(*args, **kwargs)
        parts.loss = parts.loss * float("nan")
        return parts

    monkeypatch.setattr(step, "chunked_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(EncdecError, match=r"loss became nan at step 1"):
        loop.train(_config(adapted, out, corpus, steps=2, tensorboard=True))
    assert not out.exists()
    monkeypatch.undo()
    loop.train(_config(adapted, out, corpus, steps=2, tensorboard=True))
    assert (out / "model").is_dir() and len((out / "metrics.jsonl").read_text().splitlines()) >= 1


def test_off_a_terminal_progress_is_a_line_a_minute(tmp_path, capsys, monkeypatch):
    """Under nohup or Slurm the bar is off (a line of it every step filled the log), and nothing replaced it: a
    job's log said nothing of its progress for the whole run."""
    from encdec.training import metrics

    monkeypatch.setattr(metrics, "PLAIN_EVERY_S", 0.0)
    m = metrics.Metrics(tmp_path / "run", total=4, start=0, tensorboard=False, enabled=True, desc="pretrain")
    assert m.bar.disable  # captured: no terminal
    for k in range(1, 5):
        m.log({"step": k, "loss": 4.0 - k / 10, "tokens_per_s": 1000.0}, write=k % 2 == 0)
    m.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("encdec: pretrain: step")]
    assert len(lines) == 4 and lines[1].startswith("encdec: pretrain: step 2/4 (50%), loss 3.8, tokens_per_s 1000,")
    assert "steps/s, about" in lines[1] and lines[-1].endswith("about 0 s left")
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    m = metrics.Metrics(tmp_path / "distilled", total=1, start=0, tensorboard=False, enabled=True, desc="pretrain")
    m.log({"step": 1, "loss": 2.8, "ce": 4.9, "kl": 0.4, "eval_loss": 5.0, "tokens_per_s": 1000.0})
    m.close()  # its loss mixes in the teacher's KL: shown with the cross-entropy eval_loss compares with
    assert "step 1/1 (100%), loss 2.8, ce 4.9, eval_loss 5, tokens_per_s 1000," in capsys.readouterr().err
    monkeypatch.setattr(metrics, "PLAIN_EVERY_S", 3600.0)
    capsys.readouterr()
    m = metrics.Metrics(tmp_path / "quiet", total=4, start=0, tensorboard=False, enabled=True)
    for k in range(1, 4):
        m.log({"step": k, "loss": 1.0}, write=False)
    m.close()
    assert "step" not in capsys.readouterr().err and not (tmp_path / "quiet").exists()  # nothing written, no file


def test_cross_attention_warmup_freezes_everything_else(sources, corpus, tmp_path):
    out = tmp_path / "unbalanced"
    assert main(["adapt", "--encoder", str(sources["gemma2"]), "--decoder", str(sources["gemma2-small"]),
                 "--out", str(out)]) == 0
    before = encdec.load(out).state_dict()
    loop.train(_config(out, tmp_path / "run", corpus, steps=2, cross_warmup_steps=2, save_every=1, weight_decay=0.1))
    after = encdec.load(tmp_path / "run" / "model").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("cross_" in k for k in changed), sorted(k for k in changed if "cross_" not in k)
    assert any("cross_attn.k_proj" in k for k in changed)


def test_cross_attention_warmup_is_refused_for_merged_attention(adapted, corpus, tmp_path, sources, monkeypatch):
    """A merged-attention model has no cross-attention: every parameter would be frozen, and nothing trained. Such
    recipes, and an encoder's on a decoder-only model, are refused before the data is read (after the corpus was
    tokenized, minutes of a large one); so are fine-tuning lengths too short to hold an answer's end."""
    from encdec.data import instructions

    monkeypatch.setattr("encdec.training.plan.token_stream", lambda *a, **k: pytest.fail("the data was read"))
    monkeypatch.setattr(instructions, "read_instructions", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(EncdecError, match="has none .* would train nothing"):
        loop.train(_config(adapted, tmp_path / "run", corpus, steps=2, cross_warmup_steps=2))
    with pytest.raises(EncdecError, match="need an encoder-decoder model; this one is decoder-only"):
        loop.train(_config(sources["gemma3"], tmp_path / "run", corpus, steps=2, freeze_encoder_steps=1))
    pairs = tmp_path / "pairs.jsonl"  # (a data file of the right kind: files are checked before the model loads)
    pairs.write_text('{"prompt": "w1", "response": "w2"}\n')
    with pytest.raises(EncdecError, match="--enc-len must be at least 2 and --dec-len at least 2"):
        loop.train(_config(adapted, tmp_path / "run", pairs, steps=2, objective="instruct", enc_len=1))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_final_model_averages_the_last_checkpoints(adapted, corpus, tmp_path, monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(loop.log, "info", lambda message, *args: said.append(message % args))
    loop.train(_config(adapted, tmp_path / "run", corpus, steps=4, save_every=1, average_last=2))
    # its last held-out loss is step 4's alone, which the line says (it read as the final model's)
    assert any("average of 2 checkpoints: the held-out losses above are of single steps" in line for line in said)
    paths = checkpointing.checkpoints(tmp_path / "run")[-2:]
    assert [p.name for p in paths] == ["step-000003", "step-000004"]
    weights = [encdec.files.read_weights(p) for p in paths]
    final = encdec.load(tmp_path / "run" / "model").state_dict()
    for name in ("embed.weight", "decoder.layers.0.mlp.up_proj.weight"):
        assert torch.allclose(final[name], (weights[0][name] + weights[1][name]) / 2)
        assert not torch.equal(final[name], weights[1][name])


def test_bfloat16_autocast_trains_float32_master_weights(adapted, corpus, tmp_path):
    final = loop.train(_config(adapted, tmp_path / "bf16", corpus, steps=12, precision="bf16"))
    loop.train(_config(adapted, tmp_path / "fp32", corpus, steps=1, precision="fp32"))
    bf16, fp32 = _metrics(tmp_path / "bf16"), _metrics(tmp_path / "fp32")
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2)  # same batch, bfloat16 products
    assert bf16[0]["loss"] != fp32[0]["loss"]  # ... which did run in bfloat16
    assert sum(r["loss"] for r in bf16[-3:]) < 0.9 * sum(r["loss"] for r in bf16[:3])
    state = read_state(checkpointing.checkpoints(tmp_path / "bf16")[-1], "optimizer")
    assert {t.dtype for s in state["state"].values() for t in s.values() if t.dim() > 0} == {torch.float32}
    assert {t.dtype for t in encdec.files.read_weights(final).values()} == {torch.float32}


def test_logged_records_hold_the_rate_each_step_used_and_the_bar_counts_every_step(adapted, corpus, tmp_path,
                                                                                 monkeypatch):
    """--log-every 3: a record's lr is the rate its step ran at (it was the next step's), and the progress bar
    moves every step (it moved once per record: a third of the run). A step that evaluated or saved is written too
    (a held-out loss off the --log-every steps was only printed)."""
    from encdec.training.optim import warmup_then_decay

    shown = []
    original_close = Metrics.close

    def close(self):
        shown.append(self.bar.n)
        original_close(self)

    monkeypatch.setattr(Metrics, "close", close)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # the bar is a terminal's only
    cfg = _config(adapted, tmp_path / "run", corpus, log_every=3, eval_every=4, save_every=5)
    loop.train(cfg)
    factor = warmup_then_decay(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    records = _metrics(tmp_path / "run")  # every third step, and the steps that evaluated (4, 6) or saved (5, 6)
    assert [(r["step"], r["lr"]) for r in records] == [(s, pytest.approx(cfg.lr * factor(s - 1))) for s in (3, 4, 5, 6)]
    assert ["eval_loss" in r for r in records] == [False, True, False, True]
    assert shown == [6]


@pytest.mark.parametrize("save_every, crash", [(2, "after logging step 3"), (4, "after logging step 3"),
                                               (2, "before logging step 2")])
def test_tensorboard_logs_hold_the_metrics_of_every_step(adapted, corpus, tmp_path, monkeypatch, save_every, crash):
    """Also after a crash: the resumed run's events replace those logged after its checkpoint, as metrics.jsonl's;
    also when the crash came before the first checkpoint (save_every 4), whose events were kept twice; and when it
    came between the checkpoint and its step's line, which metrics.jsonl got back from the checkpoint and
    TensorBoard never had."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    original_log = Metrics.log
    after, step = crash.startswith("after"), int(crash[-1])

    def log_then_crash(self, record, **kw):
        if after or record["step"] != step:
            original_log(self, record, **kw)
        if record["step"] == step:
            self.writer.flush()
            raise RuntimeError(f"the machine went away {crash}")

    options = dict(steps=4, eval_every=2, save_every=save_every, tensorboard=True)
    from tensorboard.summary.writer import event_file_writer

    # the crashed run's event file ...9, the resumed one's ...10 (TensorBoard's counter, not zero-padded): in the
    # same second, the resumed one's name sorted first and its steps were purged as out of order (a flaky failure)
    monkeypatch.setattr(event_file_writer, "_global_uid", type(event_file_writer._global_uid)(9))
    monkeypatch.setattr(Metrics, "log", log_then_crash)
    with pytest.raises(RuntimeError, match="went away"):
        loop.train(_config(adapted, tmp_path / "run", corpus, **options))
    monkeypatch.setattr(Metrics, "log", original_log)
    loop.train(_config(adapted, tmp_path / "run", corpus, resume=True, **options))
    records = _metrics(tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "tokens_per_s", "eval_loss"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert [e.step for e in events.Scalars("eval_loss")] == [2, 4]
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_yaml_config_with_command_line_overrides(adapted, corpus, tmp_path, monkeypatch, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {adapted}\nout: {tmp_path / 'run'}\ndata: [{corpus}]\nsteps: 2\nenc_len: 16\n"
                      "dec-len: 16\nbatch_size: 2\neval_windows: 4\nprecision: fp32\nlr: 0.5\n")
    monkeypatch.setenv("RANK", "1")  # left in the shell: the process runs alone, and says its one line of stdout
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["pretrain", "--config", str(config), "--steps", "3", "--lr", "0.001"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"final model: {tmp_path / 'run' / 'model'}"
    records = _metrics(tmp_path / "run")
    assert len(records) == 3
    settings = encdec.checkpoint.read_metadata(tmp_path / "run" / "model")["pretrained"]["settings"]
    # the command line's two, and each of the file's others (a hyphenated key too), not the defaults
    assert (settings["steps"], settings["lr"]) == (3, 0.001)
    assert (settings["enc_len"], settings["dec_len"], settings["batch_size"]) == (16, 16, 2)
    assert (settings["eval_windows"], settings["precision"]) == (4, "fp32")
    warmup = settings["warmup_steps"]
    assert records[0]["lr"] == pytest.approx(0.001 * min(1, 1 / warmup) if warmup else 0.001)  # step 1 of warm-up


def test_the_command_line_wins_over_the_file_and_repeats_add_up(tmp_path):
    """Repeated --data accumulate; a number YAML 1.1 reads as text (3e-5) is a number; a flag of the command line
    clears the file's setting that excludes it; finetune refuses in the file what it has no option for."""
    import argparse

    from encdec.errors import EncdecError
    from encdec.training.config import (
        FINETUNE_DEFAULTS,
        FINETUNE_HIDDEN,
        FINETUNE_NOT_IN_FILE,
        add_arguments,
        from_arguments,
    )

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = tmp_path / "run.yaml"
    config.write_text("lr: 3e-5\noverwrite: true\ndistill: true\nmodel: m\n")
    cfg = from_arguments(parser.parse_args(["--config", str(config), "--data", "a.txt", "--data", "b", "c"]))
    assert cfg.data == ["a.txt", "b", "c"] and cfg.lr == 3e-5 and cfg.overwrite and cfg.distill
    cfg = from_arguments(parser.parse_args(["--config", str(config), "--resume", "--objective", "ul2"]))
    assert cfg.resume and not cfg.overwrite and not cfg.distill and cfg.objective == "ul2"
    config.write_text("resume: true\n")
    assert from_arguments(parser.parse_args(["--config", str(config), "--overwrite"])).resume is False
    with pytest.raises(EncdecError, match="--distill works with --objective prefixlm only"):  # both said so
        from_arguments(parser.parse_args(["--objective", "ul2", "--distill"]))
    parser = argparse.ArgumentParser()
    add_arguments(parser, FINETUNE_DEFAULTS, FINETUNE_HIDDEN)
    config.write_text("alpha: 0.3\nsteps: 5\n")
    with pytest.raises(EncdecError, match=r"unknown option\(s\) \['alpha'\] for `encdec finetune`"):
        from_arguments(parser.parse_args(["--config", str(config)]), FINETUNE_DEFAULTS, "finetune",
                       FINETUNE_NOT_IN_FILE)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_second_config_file_is_refused_not_read_in_place_of_the_first(tmp_path, capsys, command):
    """`--config base.yaml --config over.yaml` read over.yaml alone: base.yaml's data and steps were dropped without
    a word, and the run trained on the default corpus for the default steps."""
    base, over = tmp_path / "base.yaml", tmp_path / "over.yaml"
    base.write_text("steps: 7\n")
    over.write_text("lr: 0.001\n")
    argv = [command, *(["m"] if command == "finetune" else []), "--config", str(base), "--config", str(over)]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert f"--config given twice ({base}, {over}): one file is read" in capsys.readouterr().err


def test_a_configuration_file_is_read_as_meant(tmp_path, caplog):
    """Integers written as YAML 1.1 reads text (1e3) are numbers; a key given twice (or as batch-size and
    batch_size) is refused rather than the last one kept; a finetune file's model, which MODEL overrides, is said
    to be unused."""
    import argparse
    import logging

    from encdec.errors import EncdecError
    from encdec.training.config import FINETUNE_DEFAULTS, FINETUNE_NOT_IN_FILE, add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = tmp_path / "run.yaml"
    config.write_text("steps: 1e3\nwarmup_steps: 2e1\nlr: 3e-5\n")
    cfg = from_arguments(parser.parse_args(["--config", str(config)]))
    assert (cfg.steps, cfg.warmup_steps, cfg.lr) == (1000, 20, 3e-5) and isinstance(cfg.steps, int)
    config.write_text("steps: 2.5e0\n")
    with pytest.raises(EncdecError, match="--steps must be an integer"):
        from_arguments(parser.parse_args(["--config", str(config)]))
    for text in ("steps: 1\nsteps: 3\n", "batch-size: 3\nbatch_size: 2\n"):
        config.write_text(text)
        with pytest.raises(EncdecError, match=r"line 2, column 1: '(steps|batch_size)' is given twice"):
            from_arguments(parser.parse_args(["--config", str(config)]))
    config.write_text("<<: {lr: 1.0e-4, steps: 7}\nsteps: 2\n")  # a merged key may be overridden
    cfg = from_arguments(parser.parse_args(["--config", str(config)]))
    assert (cfg.steps, cfg.lr) == (2, 1e-4)
    config.write_text("? [a, b]\n: 1\nsteps: 1\n")
    with pytest.raises(EncdecError, match="found unhashable key"):
        from_arguments(parser.parse_args(["--config", str(config)]))
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    add_arguments(parser, FINETUNE_DEFAULTS, ("model", "objective"))
    config.write_text("model: elsewhere\nsteps: 1\n")
    with caplog.at_level(logging.WARNING, logger="encdec"):
        cfg = from_arguments(parser.parse_args(["mine", "--config", str(config)]), FINETUNE_DEFAULTS, "finetune",
                             FINETUNE_NOT_IN_FILE)
    assert cfg.model == "mine" and "model 'elsewhere' is not used; `encdec finetune` trains MODEL" in caplog.text
    caplog.clear()  # the same model spelt otherwise (~, ./): said to be another
    config.write_text("model: ./mine\nsteps: 1\n")
    with caplog.at_level(logging.WARNING, logger="encdec"):
        from_arguments(parser.parse_args(["mine", "--config", str(config)]), FINETUNE_DEFAULTS, "finetune",
                       FINETUNE_NOT_IN_FILE)
    assert "is not used" not in caplog.text


def test_a_leading_tilde_is_the_home_directory_wherever_a_path_is_given(adapted, tmp_path, monkeypatch):
    """As a shell expands it: from a YAML file (out: ~/runs/x wrote a ./~ folder) or a quoted argument."""
    import shutil

    from encdec.training.config import TrainConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrainConfig(model="~/model", out="~/runs/x", data=["~/a.txt", "hf:name"], teacher="~/t")
    assert (cfg.model, cfg.out, cfg.data, cfg.teacher) == (f"{tmp_path}/model", f"{tmp_path}/runs/x",
                                                           [f"{tmp_path}/a.txt", "hf:name"], f"{tmp_path}/t")
    shutil.copytree(adapted, tmp_path / "model")
    assert encdec.load("~/model").config == encdec.load(adapted).config


def test_bad_configuration(adapted, corpus, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model: x\nstepz: 3\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    assert "unknown option(s) ['stepz']" in capsys.readouterr().err
    config.write_text("model: x\nper_task: 3\n")  # finetune's, which pretrain has no flag for: ignored in a file
    assert main(["pretrain", "--config", str(config)]) == 2
    assert "unknown option(s) ['per_task'] for `encdec pretrain`" in capsys.readouterr().err
    config.write_text("model: x\nlr: " + "1" * 400 + "\n")  # past every float: an OverflowError's traceback
    assert main(["pretrain", "--config", str(config)]) == 2
    assert "--lr must be a positive finite number, got 1111111111" in capsys.readouterr().err
    config.write_text("1: 2\n")  # a key that is no option name at all
    assert main(["pretrain", "--config", str(config)]) == 2
    assert "expected a mapping of option names to values" in capsys.readouterr().err
    assert main(["pretrain", "--model", str(adapted), "--objective", "ul2", "--distill"]) == 2
    assert "--distill works with --objective prefixlm only" in capsys.readouterr().err
    assert main(["pretrain", "--model", str(adapted), "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "none.txt: no such file or directory" in capsys.readouterr().err
    model = shutil.copytree(adapted, tmp_path / "no-eos")  # a tokenizer naming no EOS put None in the token stream
    settings = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "eos_token"}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "w1", "response": "w2"}\n')
    for command, data in ((["pretrain", "--model", str(model)], corpus), (["finetune", str(model)], pairs)):
        assert main([*command, "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
        assert "its tokenizer names no EOS token, which ends every document and answer" in capsys.readouterr().err


@pytest.mark.parametrize("objective, trim_vocab", [("prefixlm", 0), ("prefixlm", 30), ("ul2", 0)])
def test_every_example_starts_as_the_tokenizer_starts_a_text(adapted, corpus, tmp_path, objective, trim_vocab):
    """Windows begin mid-document, but the encoder (and the teacher, which reads inputs + targets) must read
    BOS first, as it does at inference: the source reading windows without it is ~1.3 nats worse."""
    from encdec.training.data import make_batch
    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    cfg = _config(adapted, tmp_path / "run", corpus, objective=objective, trim_vocab=trim_vocab, random_split=True)
    plan, tokenizer = build_plan(cfg, Dist())
    bos = tokenizer.bos_token_id if plan.trimmed is None else int(plan.trimmed.table[tokenizer.bos_token_id])
    examples = plan.stream.next_examples(64) + plan.eval_examples
    assert all(ex.inputs[0] == bos and len(ex.inputs) <= cfg.enc_len for ex in examples)
    assert sum(bos in ex.inputs[1:] for ex in examples) < len(examples) // 2  # mostly windows from mid-document
    if objective == "prefixlm":
        batch = make_batch(plan.stream.next_examples(8), enc_len=cfg.enc_len, dec_len=cfg.dec_len, pad_id=0, bos_id=bos,
                           with_teacher=True)
        starts = batch.teacher.positions == 0
        assert starts.any() and (batch.teacher.input_ids[starts & (batch.teacher.segment_ids > 0)] == bos).all()


def test_a_trimmed_vocabulary_keeps_every_sentinel_a_ul2_window_wants(adapted, corpus, tmp_path, monkeypatch):
    """--trim-vocab kept 128 sentinels (here made 2) where the full vocabulary offers thousands (Gemma 3: 6,239): at
    windows that want more spans (a UL2 denoiser of rate 0.5 and mean span 3 at 1,024 tokens wants 171) the same
    command posed another objective with and without it, its spans longer than their mean."""
    from encdec.objectives import special_token_ids
    from encdec.training import plan as plan_module
    from encdec.training.distributed import Dist

    monkeypatch.setattr(plan_module, "UL2_SENTINELS", 2)  # the floor build_plan takes (it passes it on)

    def spans(trim_vocab: int) -> list[int]:
        cfg = _config(adapted, tmp_path / "run", corpus, objective="ul2", enc_len=64, dec_len=64, trim_vocab=trim_vocab)
        plan, tokenizer = plan_module.build_plan(cfg, Dist())
        sentinels = special_token_ids(tokenizer.get_vocab())[1]
        if plan.trimmed is not None:
            sentinels = {int(plan.trimmed.table[i]) for i in sentinels} - {plan.trimmed.unk_id}
        return [sum(t in set(sentinels) for t in ex.inputs) for ex in plan.stream.next_examples(64)]

    full, trimmed = spans(0), spans(60)
    assert max(full) > 2 and trimmed == full


def test_trimmed_vocabulary_trains_and_maps_back(adapted, corpus, tmp_path):
    from encdec.training.vocab import kept_tokens, remap_table, trim_model

    full = encdec.load(adapted)
    keep = kept_tokens(torch.randint(3, 96, (500,)).numpy(), 40, [0, 1, 2, 3], 96)
    table = remap_table(keep, 96, 3)
    trimmed = trim_model(full, keep, table)
    ids = torch.as_tensor(keep[torch.randint(0, len(keep), (2, 7))])
    with torch.no_grad():  # same logits for the kept tokens, before any training
        a = full(ids, decoder_input_ids=ids).logits[..., torch.as_tensor(keep)]
        b = trimmed(torch.as_tensor(table[ids.numpy()]).long(), decoder_input_ids=torch.as_tensor(table[ids.numpy()]).long()).logits
    assert torch.allclose(a, b, atol=1e-5)

    final = loop.train(_config(adapted, tmp_path / "run", corpus, steps=4, trim_vocab=30, distill=True))
    state = read_state(checkpointing.checkpoints(tmp_path / "run")[-1], "trainer")
    kept = torch.as_tensor(state["kept_tokens"])
    assert len(kept) <= 30 and kept[:3].tolist() == [0, 1, 2]
    model = encdec.load(final)
    assert model.config.vocab_size == 96
    dropped = torch.tensor([i for i in range(96) if i not in set(kept.tolist())])
    assert torch.equal(model.embed.weight[dropped], full.embed.weight[dropped])  # untouched rows kept
    assert not torch.equal(model.embed.weight[kept], full.embed.weight[kept])  # trained rows written back
    assert model.generate(torch.tensor([[2, 40, 41]]), max_new_tokens=3).shape[0] == 1


def test_trimmed_vocabulary_is_counted_on_training_windows_only(adapted, tmp_path):
    """A word frequent only in the held-out windows (the data's last) is not kept: held-out text must not shape
    what the model trains on."""
    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    data = write_corpus(tmp_path / "data.txt", documents=80, words=40)  # w0..w39
    data.write_text(data.read_text() + "\n" + " ".join(["w60"] * 200) + "\n")  # the last document: held out
    plan, tokenizer = build_plan(_config(adapted, tmp_path / "run", data, trim_vocab=30, eval_windows=10), Dist())
    kept = set(plan.trimmed.keep.tolist())
    assert tokenizer.convert_tokens_to_ids("w60") not in kept
    assert tokenizer.convert_tokens_to_ids("w0") in kept


def test_a_grown_vocabulary_starts_its_new_rows_at_the_mean_row(sources):
    """UL2 on a vocabulary without reserved tokens grows the tables (`grow_vocabulary`): the old rows as they were,
    each new row of the embeddings and of an untied head the mean of its table, the model's outputs over the old
    tokens unchanged."""
    from encdec.training.vocab import grow_vocabulary

    model = encdec.adapt(encdec.load_source(str(sources["llama"])))  # an untied head
    assert model.lm_head is not None
    grown = grow_vocabulary(model, 100)
    assert grown.config.vocab_size == 100
    for name in ("embed.weight", "lm_head.weight"):
        old, new = model.state_dict()[name], grown.state_dict()[name]
        assert new.shape == (100, old.shape[1]) and torch.equal(new[:96], old)
        assert torch.equal(new[96:], old.mean(0, keepdim=True).expand(4, -1))
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        before, after = model(ids, decoder_input_ids=ids).logits, grown(ids, decoder_input_ids=ids).logits
    assert torch.allclose(after[..., :96], before, atol=1e-5)


def test_a_special_token_past_the_embeddings_is_not_kept_by_a_trimmed_vocabulary(adapted, corpus, tmp_path):
    """Gemma 3's tokenizers name <image_soft_token> (id 262144) special, past the text models' 262,144 rows: no
    row of its own to keep (and no text holds it), where trimming raised numpy's IndexError."""
    import copy
    import shutil

    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    model_dir = tmp_path / "model"
    shutil.copytree(adapted, model_dir)
    tokenizer = copy.deepcopy(encdec.load_tokenizer(model_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    tokenizer.save_pretrained(model_dir)
    assert tokenizer.convert_tokens_to_ids("<image_soft_token>") == 96  # the tiny model has 96 rows
    plan, _ = build_plan(_config(model_dir, tmp_path / "run", corpus, trim_vocab=30), Dist())
    assert len(plan.trimmed.keep) <= 30 and int(plan.trimmed.keep.max()) < 96


def test_trimmed_vocabulary_of_instruction_tuning_is_counted_on_training_examples_only(adapted, tmp_path):
    """Each record has a word of its own: the 8 held-out records' words are not kept, the 32 training ones' are."""
    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    data = tmp_path / "instructions.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w1 w{10 + i} w2", "response": "w4 w5"}) + "\n" for i in range(40)))
    cfg = _config(adapted, tmp_path / "run", data, objective="instruct", trim_vocab=80, eval_windows=8, enc_len=32)
    plan, tokenizer = build_plan(cfg, Dist())
    kept = set(plan.trimmed.keep.tolist())
    own = [tokenizer.convert_tokens_to_ids(f"w{10 + i}") for i in range(40)]
    assert sum(token in kept for token in own) == 32


def test_trimmed_run_stays_good_over_the_full_vocabulary(adapted, tmp_path):
    """A trimmed run mapped back must be about as good in full-vocabulary use as an untrimmed run of the
    same steps. Trained naively (no untrained rows in the softmax) it was 0.44 nats worse here (3.68 vs
    3.24): its hidden states drift while the untrained rows of the tied head stay put."""
    from encdec.evaluation.nll import PrefixSuffix, encdec_suffix_nll

    corpus = write_corpus(tmp_path / "corpus.txt", documents=80, words=30)  # 30 of the 68 words: all kept
    held = write_corpus(tmp_path / "held.txt", documents=12, seed=1, words=30).read_text().split("\n\n")
    tok = encdec.load_tokenizer(adapted)
    rows = torch.tensor([ids[:24] for ids in (tok(t).input_ids for t in held) if len(ids) >= 24])
    data = PrefixSuffix(rows[:, :12], rows[:, 12:])

    def nll(name: str, **extra) -> float:
        cfg = _config(adapted, tmp_path / name, corpus, steps=20, eval_every=20, save_every=20, distill=True, **extra)
        return encdec_suffix_nll(encdec.load(loop.train(cfg)), data)

    full, trimmed = nll("full"), nll("trimmed", trim_vocab=40)
    assert trimmed < full + 0.2, (trimmed, full)
    # the trimmed run's held-out loss is over the full vocabulary too: it agrees with the untrimmed run's
    assert abs(_metrics(tmp_path / "trimmed")[-1]["eval_loss"] - _metrics(tmp_path / "full")[-1]["eval_loss"]) < 0.2


def test_eval_data_is_a_second_held_out_set_reported_beside_the_first(adapted, corpus, tmp_path):
    other = write_corpus(tmp_path / "other.txt", documents=30, seed=5, words=20)
    loop.train(_config(adapted, tmp_path / "run", corpus, steps=4, eval_every=2, eval_data=[str(other)], trim_vocab=50))
    evaluated = [r for r in _metrics(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    assert all(r["eval_data_loss"] > 0 and r["eval_data_loss"] != r["eval_loss"] for r in evaluated)
    with pytest.raises(EncdecError, match="heldout:nonsense: unknown packaged text; known: heldout:python-docs"):
        loop.train(_config(adapted, tmp_path / "bad", corpus, eval_data=["heldout:nonsense"]))
    with pytest.raises(EncdecError, match="--eval-data works with pretraining objectives only"):
        _config(adapted, tmp_path / "ft", corpus, objective="instruct", eval_data=[str(other)])


def test_distillation_is_the_default_for_prefixlm_whenever_a_teacher_is_known(adapted, corpus, tmp_path, capfd):
    import shutil

    from encdec import logs

    logs.setup()  # info lines, as the CLI shows them

    def distilled(model, **options) -> bool:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        loop.train(_config(model, out, corpus, steps=1, **options))
        return "kl" in _metrics(out)[0]

    assert distilled(adapted)  # the source `encdec adapt` recorded
    assert not distilled(adapted, distill=False) and not distilled(adapted, objective="ul2")
    anonymous = tmp_path / "anonymous"  # an encoder-decoder that records no source (e.g. from another tool)
    shutil.copytree(adapted, anonymous)
    (anonymous / "encdec.json").write_text("{}")
    assert not distilled(anonymous)
    assert "records no source model (--teacher SRC distils from one)" in "".join(capfd.readouterr())
    assert distilled(anonymous, teacher=str(json.loads((adapted / "encdec.json").read_text())["adapted_from"]["encoder"]))


def test_clip_0_clips_nothing(adapted, corpus, tmp_path):
    """As transformers' max_grad_norm 0 and litgpt's max_norm None: --clip 0 was refused, and only a huge number
    turned clipping off."""
    weights = {}
    for clip in (0, 1e9, 1e-12):
        loop.train(_config(adapted, tmp_path / str(clip), corpus, steps=1, distill=False, clip=clip))
        weights[clip] = encdec.load(tmp_path / str(clip) / "model").embed.weight
        assert _metrics(tmp_path / str(clip))[0]["grad_norm"] > 1e-3  # the norm before clipping, logged either way
    assert torch.equal(weights[0], weights[1e9]) and not torch.equal(weights[0], weights[1e-12])
    for bad in (-1.0, math.inf):
        with pytest.raises(EncdecError, match=r"--clip must be a finite number, 0 or more \(0: no clipping\)"):
            _config(adapted, tmp_path / "bad", corpus, clip=bad)


@pytest.mark.parametrize("options", [{"distill": False}, {"distill": True}, {"distill": True, "trim_vocab": 30}],
                         ids=["ce", "distilled", "distilled-trimmed"])
def test_gradient_accumulation_matches_one_larger_batch(adapted, corpus, tmp_path, options):
    """Exactly, also where micro-batches hold different numbers of scored tokens (examples' last targets are not
    distilled, targets outside a trimmed vocabulary are not scored): each averages over the whole step's tokens."""
    loop.train(_config(adapted, tmp_path / "big", corpus, steps=1, batch_size=2, grad_accum=1, eval_windows=4, **options))
    loop.train(_config(adapted, tmp_path / "accum", corpus, steps=1, batch_size=1, grad_accum=2, eval_windows=4,
                       **options))
    big, accum = _metrics(tmp_path / "big")[0], _metrics(tmp_path / "accum")[0]
    assert abs(big["loss"] - accum["loss"]) < 1e-5 and abs(big["grad_norm"] - accum["grad_norm"]) < 1e-4
    assert abs(big.get("kl", 0) - accum.get("kl", 0)) < 1e-5 and ("kl" in big) == options["distill"]
    a = encdec.load(tmp_path / "big" / "model").state_dict()
    b = encdec.load(tmp_path / "accum" / "model").state_dict()
    # Adam's first step divides by |g| + 1e-8: elements whose gradient is near 1e-8 turn float rounding
    # (another summation order) into visible differences (seen: 3e-6 on 2 of 65k elements, updates ~1e-3)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


_PAGE_FAULTS = """
import resource, sys, torch
from encdec.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20)  # 256 MB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min(faults() for _ in range(6)))  # the heap settles within a few rounds
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_kept_freed_memory_is_reused_without_page_faults():
    """The allocator setting of CPU training: a big tensor allocated again soon reuses the freed pages."""
    def second_allocation_faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    pages = 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert second_allocation_faults("default") > pages // 2  # glibc unmapped it: every page faults again
    assert second_allocation_faults("keep") < pages // 100


def test_encoder_curriculum_opens_from_causal_to_bidirectional(adapted):
    from encdec.model import Segments, attention_masks
    from encdec.training.recipe import encoder_lookahead

    cfg = TrainConfig(model="m", enc_len=16, encoder_curriculum_steps=4)
    assert [encoder_lookahead(cfg, t) for t in range(6)] == [0, 4, 8, 12, None, None]
    model = encdec.load(adapted)
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        causal, bidirectional = model.encode(ids, causal=True), model.encode(ids)
        model.encoder_lookahead = encoder_lookahead(cfg, 0)
        assert torch.equal(model.encode(ids), causal)  # step 0: the encoder is its causal source
        model.encoder_lookahead = 3
        partly = model.encode(ids)
        model.encoder_lookahead = encoder_lookahead(cfg, 4)
        assert torch.equal(model.encode(ids), bidirectional)  # step K on: fully bidirectional
    assert not torch.allclose(partly, causal) and not torch.allclose(partly, bidirectional)
    seg = Segments.of(ids, None, None, None)
    full = attention_masks(seg, seg, causal=False, window=4, lookahead=3)["full"][0, 0]
    d = torch.arange(11)[:, None] - torch.arange(11)[None, :]
    assert torch.equal(full, d >= -3)  # keys up to 3 positions ahead of each query
    # a local layer's window (8, T5Gemma 2's split: 3 behind, 4 ahead) slides from the causal one (7 behind) ahead,
    # its 8 keys kept: it first fell to the final window's 3 behind, the query seeing 5 keys at lookahead 1
    for lookahead, (behind, ahead) in {1: (6, 1), 3: (4, 3), 4: (3, 4), 10: (3, 4)}.items():
        local = attention_masks(seg, seg, causal=False, window=8, convention="t5gemma2",
                                lookahead=lookahead)["sliding"][0, 0]
        assert torch.equal(local, (d <= behind) & (d >= -ahead)), lookahead


def test_frozen_encoder_does_not_change_and_the_rest_learns(adapted, corpus, tmp_path):
    before = encdec.load(adapted).state_dict()
    loop.train(_config(adapted, tmp_path / "run", corpus, steps=2, freeze_encoder_steps=2, weight_decay=0.1))
    after = encdec.load(tmp_path / "run" / "model").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not {k for k in changed if k.startswith("encoder.")}
    assert any(k.startswith("decoder.") for k in changed) and "embed.weight" in changed


def test_a_frozen_encoder_with_an_embedding_of_its_own_keeps_it_too(sources, corpus, tmp_path):
    """An unbalanced model's encoder reads its own table (encoder_embed), which --freeze-encoder-steps left to learn:
    the encoder's output drifted while it was meant to stand still."""
    out = tmp_path / "unbalanced"
    assert main(["adapt", "--encoder", str(sources["gemma2"]), "--decoder", str(sources["gemma2-small"]),
                 "--out", str(out)]) == 0
    before = encdec.load(out).state_dict()
    assert any(k.startswith("encoder_embed.") for k in before)
    loop.train(_config(out, tmp_path / "run", corpus, steps=2, freeze_encoder_steps=2, weight_decay=0.1))
    after = encdec.load(tmp_path / "run" / "model").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not {k for k in changed if k.startswith("encoder")}, sorted(changed)
    assert any(k.startswith("decoder.") for k in changed)


@pytest.mark.parametrize("stop", [2, 4], ids=["encoder-still-frozen", "after"])
def test_resume_is_exact_with_the_recipe_options(adapted, corpus, tmp_path, monkeypatch, stop):
    """Sampled negatives of a trimmed vocabulary, a frozen encoder and the curriculum are functions of the
    step: a resumed run takes the same steps as an uninterrupted one. Stopped while the encoder is frozen, the
    checkpoint has no optimizer state for it (no gradient yet), and the resumed run creates none either."""
    options = dict(trim_vocab=40, trim_negatives=16, freeze_encoder_steps=2, encoder_curriculum_steps=4, steps=5)
    loop.train(_config(adapted, tmp_path / "straight", corpus, **options))
    _stopped_during(stop, _config(adapted, tmp_path / "resumed", corpus, **options), monkeypatch)
    loop.train(_config(adapted, tmp_path / "resumed", corpus, resume=True, **options))
    assert [r["loss"] for r in _metrics(tmp_path / "resumed")] == [r["loss"] for r in _metrics(tmp_path / "straight")]
    a, b = (encdec.load(tmp_path / name / "model").state_dict() for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_settings_a_run_will_not_use_are_named_when_it_starts():
    """Not refused (a short trial run may mean them), but said: phases as long as the run, options of another
    objective or mode."""
    from encdec.training.recipe import idle_settings

    assert idle_settings(TrainConfig(model="m", out="o", steps=10)) == []  # the warm-up reaches --lr at step 10
    assert idle_settings(TrainConfig(model="m", out="o", steps=3)) == [
        "--warmup-steps 10 is as long as the run or longer (--steps 3): the learning rate never reaches --lr"]
    notes = idle_settings(TrainConfig(model="m", out="o", steps=100, warmup_steps=5, freeze_encoder_steps=100,
                                      distill=False, alpha=0.9, tau=2.0, mixture="ul2", trim_negatives=5))
    assert notes == [("--freeze-encoder-steps 100 is as long as the run or longer (--steps 100): the encoder's layers "
                      "stay frozen for the whole run"),
                     "--alpha, --tau apply to distillation, which this run does not do (--distill): ignored",
                     "--mixture applies to --objective ul2: ignored", "--trim-negatives applies to --trim-vocab: ignored"]
    assert idle_settings(TrainConfig(model="m", out="o", objective="ul2", random_split=True, mixture="ul2")) == [
        "--random-split applies to --objective prefixlm: ignored"]
    assert idle_settings(TrainConfig(model="m", out="o", distill=True, alpha=0.9, trim_vocab=100, trim_negatives=5)) == []
    assert idle_settings(TrainConfig(model="m", out="o", objective="instruct", window=64, text_field="body",
                                     data=["a.jsonl"], per_task=5)) == [  # said nothing of them
        "--window, --text-field apply to pretraining (--objective prefixlm or ul2): ignored",
        "--per-task applies to instruction tuning without --data (Natural-Instructions): ignored"]
    assert idle_settings(TrainConfig(model="m", out="o", per_task=5)) == [
        "--per-task applies to instruction tuning without --data (Natural-Instructions): ignored"]
    assert idle_settings(TrainConfig(model="m", out="o", objective="instruct", per_task=5)) == []
    assert idle_settings(TrainConfig(model="m", out="o", steps=100, save_every=100, average_last=5)) == [
        "--average-last 5: the run saves 1 scheduled checkpoint(s) (--steps 100, --save-every 100); the final model "
        "averages 1"]
    assert idle_settings(TrainConfig(model="m", out="o", steps=101, save_every=20, average_last=6)) == []
    assert idle_settings(TrainConfig(model="m", out="o", fsdp=True)) == [  # wrap() leaves one process's model whole
        "--fsdp shards the model across processes, and this run has one: it trains unsharded (start several with "
        "torchrun or accelerate launch)"]
    assert idle_settings(TrainConfig(model="m", out="o", fsdp=True), processes=2) == []
    # long input, short output: PrefixLM's middle split left three quarters of the encoder's slots empty, unsaid
    assert idle_settings(TrainConfig(model="m", out="o", enc_len=256, dec_len=64)) == [
        "--enc-len 256 and --dec-len 64: PrefixLM splits each window in its middle (the paper's way), so a window is "
        "at most about 128 tokens and some 75% of the encoder's slots hold padding; equal lengths fill both sides"]
    # UL2's corrupted windows shortened to fit unequal rows dropped a third of the corpus, unsaid
    assert idle_settings(TrainConfig(model="m", out="o", objective="ul2", enc_len=512, dec_len=128)) == [(
        "--enc-len 512 and --dec-len 128: a UL2 example whose corrupted window does not fit a row is made again from "
        "a shorter window, and what that drops is not trained on: about 35% of the corpus with the t5gemma2 "
        "mixture; equal lengths use every window whole")]
    assert idle_settings(TrainConfig(model="m", out="o", objective="ul2", enc_len=128, dec_len=128)) == []
    (note,) = idle_settings(TrainConfig(model="m", out="o", objective="ul2", enc_len=256, dec_len=64))
    assert "PrefixLM" not in note and "about 38% of the corpus" in note


def test_shorter_ul2_windows_pack_several_examples_a_row(adapted, corpus, tmp_path):
    """--window: UL2 corrupts windows of that many tokens, and each step's rows take several of them (first fit)
    where the default half-row windows leave one a row; the rows are fuller for it."""
    from encdec.training.data import make_batch, window_length
    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    def step_rows(window: int) -> tuple[int, int]:
        cfg = _config(adapted, tmp_path / f"run{window}", corpus, objective="ul2", enc_len=32, dec_len=32, window=window)
        plan, tokenizer = build_plan(cfg, Dist())
        examples = plan.stream.next_examples(8)
        rows = make_batch(examples, enc_len=32, dec_len=32, pad_id=0, bos_id=tokenizer.bos_token_id,
                          with_teacher=False).rows
        assert rows.input_ids.shape[0] == 8
        return len(examples), int((rows.segment_ids != 0).sum() + (rows.decoder_segment_ids != 0).sum())

    assert window_length("ul2", 32, 32) == 32
    (default_examples, default_filled), (short_examples, short_filled) = step_rows(0), step_rows(16)
    assert default_examples == 8 < short_examples
    assert short_filled > default_filled


def test_a_trimmed_vocabulary_keeps_the_ids_the_config_names_absent_from_the_data(adapted, corpus, tmp_path):
    """The targets end with the config's first EOS and the decoder starts from its BOS, which need not be the
    tokenizer's nor occur in the data (Llama 3 Instruct lists three EOS ids, its tokenizer names one): dropped,
    every target ended with an unscored <unk> and the run never learned to stop."""
    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    model = tmp_path / "model"
    shutil.copytree(adapted, model)
    settings = json.loads((model / "config.json").read_text())
    for named in (settings, settings["decoder"]):  # w62 and w63, which this corpus of w0..w39 never holds
        named.update(eos_token_id=[90, 1], bos_token_id=91)
    (model / "config.json").write_text(json.dumps(settings))
    corpus = write_corpus(tmp_path / "corpus.txt", words=40)
    plan, _ = build_plan(_config(model, tmp_path / "run", corpus, trim_vocab=40), Dist())
    table, unk = plan.trimmed.table, plan.trimmed.unk_id
    assert {90, 91} <= set(plan.trimmed.keep.tolist()) and unk not in (table[90], table[91])
    assert plan.eos_id == table[90] and all(e.targets[-1] == plan.eos_id for e in plan.eval_examples)
    assert plan.model.config.bos_token_id == table[91] and plan.model.config.eos_token_ids == [table[90], table[1]]
    # an end id past the table (a generation config may name one; EncDecConfig allows it) has no row to keep
    for named in (settings, settings["decoder"]):
        named.update(eos_token_id=[90, 1, 106])
    (model / "config.json").write_text(json.dumps(settings))
    plan, _ = build_plan(_config(model, tmp_path / "run2", corpus, trim_vocab=40), Dist())
    assert plan.model.config.eos_token_ids == [plan.trimmed.table[90], plan.trimmed.table[1]]


def test_data_of_fewer_examples_than_processes_asks_for_more_data_not_a_batch_of_zero():
    from encdec.training.config import TrainConfig

    cfg = TrainConfig(model="m", out="o", batch_size=1)
    with pytest.raises(EncdecError, match=r"^the data holds 1 training windows/examples, fewer than the 2 processes"):
        cfg.check_fit(None, 96, 1, 2)
    with pytest.raises(EncdecError, match=r"needs more rows a step than the 3 training windows/examples .* use at "
                                          r"most --batch-size 1 \(or a lower --grad-accum\)$"):
        TrainConfig(model="m", out="o", batch_size=2).check_fit(None, 96, 3, 2)
    # the micro-batches of a step count too: 2 x 8 rows a step from 10 windows repeated rows within each step
    with pytest.raises(EncdecError, match=r"--batch-size 2 x --grad-accum 8 x 1 process\(es\) needs more rows a step "
                                          r"than the 10 .* use at most --batch-size 1 "):
        TrainConfig(model="m", out="o", batch_size=2, grad_accum=8).check_fit(None, 96, 10, 1)
    TrainConfig(model="m", out="o", batch_size=2, grad_accum=5).check_fit(None, 96, 10, 1)
    # --grad-accum alone past the data: no batch size fits it (the advice was --batch-size 1, refused as well)
    with pytest.raises(EncdecError, match=r"use at most --grad-accum 10 at --batch-size 1$"):
        TrainConfig(model="m", out="o", batch_size=1, grad_accum=20).check_fit(None, 96, 10, 1)


def test_the_rate_schedule_at_hand_computed_steps():
    """Linear warm-up from 1 / warmup to 1, then a cosine or linear decay reaching min_lr_ratio at step --steps
    (just past the last, --steps - 1, as transformers' schedules do) and staying there (a resumed run may go past
    it)."""
    import math

    from encdec.training.optim import warmup_then_decay

    cosine, linear = (warmup_then_decay(4, 14, 0.1, decay) for decay in ("cosine", "linear"))
    assert [cosine(s) for s in range(5)] == [linear(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert cosine(9) == pytest.approx(0.55) and linear(9) == pytest.approx(0.55)  # halfway: half the way down
    assert cosine(6) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.2)) / 2)
    assert linear(6) == pytest.approx(0.82)
    assert cosine(14) == cosine(40) == pytest.approx(0.1) and linear(14) == linear(40) == pytest.approx(0.1)
