"""The training loop of pretraining and instruction tuning, assembled from this package's components."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encdec.allocator import keep_freed_memory
from encdec.checkpoint import load_checkpoint, read_metadata, save
from encdec.errors import EncdecError
from encdec.files import portable_path, written
from encdec.objectives import Example
from encdec.signals import Signalled
from encdec.training import checkpointing, distributed, rundir
from encdec.training.config import TrainConfig
from encdec.training.data import Batch, make_batch
from encdec.training.loss import Distillation
from encdec.training.metrics import Metrics
from encdec.training.optim import (
    build_optimizer,
    build_scheduler,
    group_settings,
    resume_schedule,
    warmup_then_decay,
)
from encdec.training.plan import Plan, build_plan
from encdec.training.precision import autocast_dtype
from encdec.training.recipe import drop_frozen_gradients, encoder_lookahead, frozen_parts, idle_settings
from encdec.training.step import CausalLossModule, LossModule, teacher_states
from encdec.training.teacher import check_teacher, load_teacher, recorded_source, teacher_spec, wants_distillation
from encdec.training.vocab import full_vocabulary_model, grow_vocabulary, ignore_unknown_targets, trim_teacher

log = logging.getLogger("encdec")

# the settings that make the training items (the windows' length and what a pretraining objective makes of them, the
# vocabulary their ids are in, the field of a record that holds the text, the Natural Instructions taken per task;
# an instruction's prompt and response cut to the row's sides): a resume that changes one of them has other items,
# refused as data that changed unless it is named
CUTTING_FLAGS = {"--enc-len", "--dec-len", "--window", "--objective", "--trim-vocab", "--text-field", "--per-task"}


class StopRequest:
    """SIGINT, SIGTERM or SIGHUP: finish the step, write a checkpoint, stop (`stopped`: KeyboardInterrupt for
    Ctrl-C, `Signalled` for the others, whose exit status, 128 + N, a batch system reads). A closed terminal's
    SIGHUP killed the run, its steps since the last checkpoint lost; one set to be ignored (`nohup`) stays so."""

    def __init__(self) -> None:
        self.requested: int | None = None  # the first signal's number
        self.repeated = False  # a second signal came: the final model, left after the last step, is not written
        self.previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may take signals
            log.warning("train() runs outside the main thread: SIGINT / SIGTERM / SIGHUP do not stop it at a "
                        "checkpoint")
            return self
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
                continue
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.repeated = self.requested is not None
        self.requested = self.requested or signum

    def stopped(self) -> KeyboardInterrupt:
        return KeyboardInterrupt() if self.requested in (None, signal.SIGINT) else Signalled(self.requested)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _say_schedule_change(saved: dict, cfg: TrainConfig, step: int) -> None:
    """A resumed run given another --steps follows the schedule of the new length from its step on: said with the
    learning rate before and after, since the rate jumps where the schedules differ (--steps 1000 resumed at 900
    with --steps 2000: 3.7e-6 -> 1.9e-5, five times the rate Adam's moments were following). The run's rate is its
    own schedule's (`saved`: its config), where --lr, --warmup-steps or --min-lr-ratio changed too."""
    steps = saved.get("steps")
    if type(steps) is not int or steps == cfg.steps or steps < 1:
        return

    def setting(name: str, kind: type) -> float:
        value = saved.get(name)
        try:  # (an integer of 400 digits in a hand-edited trainer.json: past every float)
            usable = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:
            usable = False
        return value if usable else getattr(cfg, name)

    new = cfg.lr * warmup_then_decay(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)(step)
    old = setting("lr", float | int) * warmup_then_decay(setting("warmup_steps", int), steps,
                                                         setting("min_lr_ratio", float | int))(step)
    log.warning("--steps %d -> %d: the learning-rate schedule is that of a %d-step run from step %d on, its rate %.3g "
                "where the run's was %.3g", steps, cfg.steps, cfg.steps, step, new, old)


def _tokens(batch: Batch) -> int:
    return int((batch.rows.segment_ids != 0).sum() + (batch.rows.decoder_segment_ids != 0).sum())


def train(cfg: TrainConfig, again: str | None = None) -> Path:
    """Run (or resume) a pretraining or instruction-tuning run; returns the directory of the final model. `again`:
    what a run stopped by a signal tells the user to do, for a command that runs this one and cannot resume it
    (the quickstart): such a run writes no checkpoint when stopped (one of GBs that nothing would read)."""
    d = distributed.init(cfg.dist_timeout)
    try:
        cfg = rundir.elastic_restart(cfg, d)
        # the teacher a checkpoint records is an input too, when it may distill (--overwrite must not delete it)
        distills = cfg.objective == "prefixlm" and cfg.distill is not False
        teacher = cfg.teacher or (recorded_source(Path(cfg.model)) if distills else "")
        with rundir.locked(Path(cfg.out), d, (cfg.model, teacher), (*cfg.data, *cfg.eval_data)):
            final = _train(cfg, d, again)
        distributed.barrier(d)  # nobody tears the group down while rank 0 still writes the final model
        return final
    finally:
        distributed.close(d)


def _train(cfg: TrainConfig, d: distributed.Dist, again: str | None) -> Path:
    out = Path(cfg.out)
    resume_from = rundir.resume_point(cfg, d)
    torch.manual_seed(cfg.seed)
    model_dir = Path(cfg.model)
    start_files = rundir.start_model_files(model_dir) if d.main and model_dir.is_dir() else None
    start_digest = rundir.start_model_digest(cfg.model) if d.main else None
    if cfg.teacher and cfg.objective == "prefixlm" and cfg.distill is not False:  # before minutes of tokenizing
        check_teacher(cfg.teacher)
    plan, tokenizer = build_plan(cfg, d)
    # each process builds the whole global batch and takes its rows: their streams must be one (another copy of the
    # data on one node, another Python's packaged corpus, another --trim-vocab choice trained on other batches)
    if d.world > 1 and not distributed.same_everywhere(int(plan.stream.fingerprint()[:12], 16), d):
        raise EncdecError("the processes read different training data (a digest of their tokens differs): every "
                          "process must read the same files with the same tokenizer and versions")
    cfg = dataclasses.replace(cfg, distill=wants_distillation(cfg.distill, cfg.objective, cfg.teacher, model_dir,
                                                              plan.causal))
    cfg.check_fit(None if plan.causal else plan.model.config, plan.model.embed.num_embeddings, len(plan.stream.items),
                  d.world, joined=plan.model.cfg if plan.causal else None)
    if d.main:
        for note in idle_settings(cfg, d.world):
            log.warning("%s", note)
    model, stream, eval_examples, keep = plan.model.to(d.device), plan.stream, plan.eval_examples, plan.keep
    untrained = None if plan.trimmed is None else plan.trimmed.untrained
    unk_id = None if plan.trimmed is None else plan.trimmed.unk_id
    if untrained is not None:
        untrained.rows = untrained.rows.to(d.device)
    if plan.causal:  # a decoder-only model reads the teacher's view of the rows
        tokens = plan.source.special_tokens  # with fallbacks where a tokenizer has no pad or BOS (Llama 3, Qwen)
        ids = [tokens["pad_token_id"], tokens["bos_token_id"]]
        pad_id, bos_id = ids if plan.trimmed is None else [int(plan.trimmed.table[i]) for i in ids]
        special = {"pad_id": pad_id, "bos_id": bos_id}
    else:
        special = dict(pad_id=model.config.pad_token_id, bos_id=model.config.bos_token_id)

    # "auto" is timed once per run, by the first process, and kept in the checkpoints: every process, and a resumed
    # run, computes in the dtype the run began with (timed again, a busy machine's verdict could flip)
    began_in = resume_from.trainer.get("precision") if resume_from is not None else None
    precision = began_in if cfg.precision == "auto" and began_in in ("bf16", "fp32") else cfg.precision
    compute_dtype = distributed.from_main(autocast_dtype(precision, d.device) if d.main else None, d)
    if d.main:
        log.info("matrix products in %s", "bfloat16 (autocast)" if compute_dtype else "float32")
    if d.device.type == "cpu" and cfg.keep_freed_memory:
        kept = keep_freed_memory()
        if kept and d.main:
            log.info("CPU memory: freed memory is kept for reuse (--no-keep-freed-memory returns it to the system)")
    teacher = None
    distillation = None
    teacher_digest = None  # a checkpoint records its teacher as its start model: resumed, it must be the same
    if cfg.distill:
        dtype = compute_dtype or torch.float32
        # a decoder-only model is distilled from itself as it started, unless --teacher says otherwise
        spec = teacher_spec(model_dir, cfg.teacher or (cfg.model if plan.causal else ""))
        teacher_digest = rundir.start_model_digest(spec)  # every process's own view: each checks on --resume
        teacher = load_teacher(spec, plan.vocab_size, dtype, d.device, tokenizer)
        cfg.check_joined(teacher.cfg, "the distillation teacher")
        if keep is not None:
            teacher = trim_teacher(teacher, keep, untrained)
        distillation = Distillation(cfg.alpha, cfg.tau, cfg.teacher_top_k)
    if plan.causal:
        module: nn.Module = CausalLossModule(model, cfg.loss_chunk, distillation)
        blocks = list(model.stack.layers)
    else:
        module = LossModule(model, cfg.loss_chunk, distillation)
        blocks = [*model.encoder.layers, *model.decoder.layers]
    if teacher is not None:
        module.teacher_head = teacher.logits
    wrapped = distributed.wrap(module, blocks, d, cfg.fsdp)
    optimizer = build_optimizer(wrapped, lr=cfg.lr, weight_decay=cfg.weight_decay, decay_all=cfg.decay_all)
    scheduler = build_scheduler(optimizer, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
    start = 0
    last_checkpoint: Path | None = resume_from.path if resume_from else None
    state: dict = {}
    resumes: list = []  # (step, settings changed) of each time the run was resumed, kept in its checkpoints
    if resume_from is not None:
        # what changed is said before the checkpoint is applied: a changed vocabulary or data make it fail there
        saved = resume_from.trainer
        kept = saved.get("kept_tokens")
        if (keep is None) != (kept is None) or (keep is not None and not np.array_equal(keep, kept)):
            raise EncdecError(f"{last_checkpoint} was trained on another vocabulary (different data or --trim-vocab); "
                              "resume with the run's, or start afresh with --overwrite")
        # (a checkpoint that does not say how many processes wrote it: taken as this run's number)
        # precision compared as each run computes ("auto" resumes in the precision the run began with, and one that
        # began with "auto" recorded what it chose): --precision 'fp32' -> 'auto' changed nothing
        began = {**saved.get("config", {}), **({"precision": began_in} if began_in in ("bf16", "fp32") else {})}
        changed = rundir.changed_settings(began, dataclasses.replace(cfg, precision=precision),
                                          (saved.get("processes", d.world), d.world))
        earlier, planned = saved.get("resumes"), saved.get("config", {}).get("steps")
        # another --steps is no warning (its schedule takes over) but it is the run's history: the provenance says it
        lengthened = [f"--steps {planned!r} -> {cfg.steps!r}"] if planned not in (None, cfg.steps) else []
        resumes = [*(earlier if isinstance(earlier, list) else []),
                   {"step": saved["step"], "changed": lengthened + changed}]
        if d.main:
            if changed:
                log.warning("resuming with settings other than the run's (its next steps differ from those of an "
                            "uninterrupted run): %s", "; ".join(changed))
            _say_schedule_change(saved.get("config", {}), cfg, saved["step"])
        settings = group_settings(optimizer)
        windows = saved.get("config", {}).get("eval_windows", cfg.eval_windows)
        seed = saved.get("config", {}).get("seed", cfg.seed)
        state = checkpointing.apply(resume_from, wrapped, optimizer)  # weights of another shape: refused there
        rundir.check_start_model(saved, cfg.model, last_checkpoint)
        if cfg.distill:
            rundir.check_start_model(saved, spec, last_checkpoint, teacher=teacher_digest)
        del resume_from, saved  # its tensors are in the model and the optimizer now
        resume_schedule(optimizer, scheduler, state["scheduler"], settings)
        try:
            stream.load_state_dict(state["stream"], model.embed.num_embeddings)
        except EncdecError as e:
            if windows != cfg.eval_windows:  # the held-out windows are cut from the data: the rest trains
                raise EncdecError(f"{last_checkpoint}: the run held out --eval-windows {windows!r}, this resume "
                                  f"{cfg.eval_windows}, which changes the items it trains on; resume with "
                                  f"--eval-windows {windows!r}, or start afresh with --overwrite") from None
            if seed != cfg.seed and cfg.objective == "instruct" and "training data differs" in str(e):
                # the seed orders the examples before the held-out ones are cut
                raise EncdecError(f"{last_checkpoint}: the training examples differ from the run's: its --seed "
                                  f"{seed!r} ordered them before the held-out ones were cut, and --seed {cfg.seed} "
                                  f"holds out others (or the data changed); resume with --seed {seed!r} and the run's "
                                  "data, or start afresh with --overwrite") from None
            cut_by = [c for c in changed if c.split(" ", 1)[0] in CUTTING_FLAGS]
            if cut_by and "training data differs" in str(e):
                raise EncdecError(f"{last_checkpoint}: the training items differ from the run's: they are made by "
                                  f"settings this resume changes ({'; '.join(cut_by)}) (or the data changed); resume "
                                  "with the run's settings and data, or start afresh with --overwrite") from None
            raise EncdecError(f"{last_checkpoint}: {e}") from None
        start = state["step"]
        if d.main:
            log.info("resuming from %s (step %d)", last_checkpoint, start)
    with distributed.stopping_together(d):  # only the first process writes OUT's files
        rundir.begin(cfg, start, d, state.get("record"))
        metrics = Metrics(out, total=cfg.steps, start=start, tensorboard=cfg.tensorboard, enabled=d.main,
                          desc="finetune" if cfg.objective == "instruct" else "pretrain", restored=state.get("record"))

    autocast = torch.autocast(d.device.type, dtype=compute_dtype or torch.bfloat16, enabled=compute_dtype is not None)
    precision_used = "fp32" if compute_dtype is None else "bf16"  # what "auto" chose: recorded, not "auto"
    ignored = distributed.accelerate_settings_ignored(cfg.fsdp, precision_used, cfg.grad_accum)
    if ignored and d.main:
        log.warning("accelerate launch's settings are not read, encdec's own options are: %s", "; ".join(ignored))
    rows = cfg.batch_size
    with_teacher = teacher is not None
    teacher_rows = with_teacher or plan.causal

    def batch_of(examples: list[Example], with_teacher: bool) -> Batch:
        batch = make_batch(examples, enc_len=cfg.enc_len, dec_len=cfg.dec_len, with_teacher=with_teacher, **special)
        if unk_id is not None:
            ignore_unknown_targets(batch.rows.labels, unk_id)
        return batch

    def evaluate(eval_examples: list[Example]) -> float:
        """Mean held-out cross-entropy per target token; each process reads its share of the batches."""
        starts = range(0, len(eval_examples), rows)
        total, count = 0.0, 0
        lookahead = getattr(model, "encoder_lookahead", None)
        if lookahead is not None:  # scored as it will be used: bidirectional, whatever the curriculum's step
            model.encoder_lookahead = None
        with torch.no_grad(), autocast:
            for index in distributed.share(len(starts), d):
                start = starts[0 if index is None else index]  # a spare pass keeps FSDP2 in step; not counted
                batch = batch_of(eval_examples[start : start + rows], plan.causal).to(d.device)
                ce = (wrapped(batch) if untrained is None else wrapped(batch, None, untrained.every())).ce
                if index is not None:
                    total += ce * batch.target_tokens
                    count += batch.target_tokens
        if lookahead is not None:
            model.encoder_lookahead = lookahead
        return distributed.reduce_sum(total, d) / distributed.reduce_sum(count, d)

    def save_checkpoint(step: int, record: dict) -> Path:
        trainer = {"scheduler": scheduler.state_dict(), "stream": stream.state_dict(), "config": vars(cfg),
                   "processes": d.world, "kept_tokens": keep, "record": record, "start_model": start_digest,
                   "teacher": teacher_digest, "precision": precision_used, "resumes": resumes,
                   "elastic_run": rundir.elastic_run()}
        return checkpointing.save(out, step, wrapped, optimizer, trainer, d, (cfg.keep_last, cfg.save_every, cfg.steps),
                                  last_checkpoint)

    with StopRequest() as stop:
        for step in range(start, cfg.steps):
            began = time.perf_counter()
            loss_total, ce_total, kl_total, tokens = 0.0, 0.0, 0.0, 0
            if not plan.causal:
                model.encoder_lookahead = encoder_lookahead(cfg, step)
            batches = [batch_of(stream.next_examples(rows * d.world), teacher_rows)
                       .slice(d.rank * rows, (d.rank + 1) * rows).to(d.device) for _ in range(cfg.grad_accum)]
            counts = module.target_counts(batches)  # the micro-batches' losses add up to the step's mean
            if d.world > 1:  # DDP / FSDP2 average the ranks' gradients: dividing each rank's sum by the mean count
                counts = tuple(distributed.reduce_sum(c, d) / d.world for c in counts)  # makes it the global mean
            for micro, batch in enumerate(batches):
                tokens += _tokens(batch)
                teacher_hidden = teacher_states(teacher, batch) if teacher is not None else None
                last_micro = micro == cfg.grad_accum - 1
                # DDP all-reduces once, at the last micro-batch; FSDP2 (no no_sync) reduce-scatters each one: its
                # gradients stay sharded, where held whole until the last they would take the memory FSDP saves
                sync = contextlib.nullcontext() if last_micro or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
                negatives = None if untrained is None else untrained.sample(step, micro)
                with sync:
                    with autocast:
                        parts = wrapped(batch, teacher_hidden, negatives, counts)
                    parts.loss.backward()
                loss_total += parts.loss.item()
                ce_total += parts.ce
                kl_total += parts.kl or 0.0
            loss = distributed.reduce_sum(loss_total, d) / d.world
            if not math.isfinite(loss):
                raise checkpointing.not_finite(f"the loss became {loss}", step + 1, last_checkpoint)
            drop_frozen_gradients(wrapped.named_parameters(), frozen_parts(cfg, step))
            grad_norm = torch.nn.utils.clip_grad_norm_(  # --clip 0: the norm alone, nothing clipped
                [p for p in wrapped.parameters() if p.grad is not None], cfg.clip or math.inf
            )
            if not math.isfinite(float(grad_norm)):  # the update would make the weights NaN
                raise checkpointing.not_finite(f"the gradient norm became {float(grad_norm)}", step + 1, last_checkpoint)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step used (after scheduler.step(), the next one's)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if d.device.type == "cuda":  # the update's kernels are queued: timed here, not in the next step's seconds
                torch.cuda.synchronize(d.device)
            seconds = time.perf_counter() - began
            record = {
                "step": step + 1, "loss": loss, "ce": distributed.reduce_sum(ce_total, d) / d.world,
                "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": distributed.reduce_sum(tokens, d) / seconds,
            }
            if with_teacher:
                record["kl"] = distributed.reduce_sum(kl_total, d) / d.world
            done = step + 1 == cfg.steps
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done:
                record["eval_loss"] = evaluate(eval_examples)
                message = f"step {step + 1}: held-out loss {record['eval_loss']:.4f}"
                if plan.extra_eval:
                    record["eval_data_loss"] = evaluate(plan.extra_eval)
                    message += f", --eval-data held-out loss {record['eval_data_loss']:.4f}"
                metrics.message(message)
            # one decision for every process (a signal may reach one alone, or some before the others): a process
            # saving, or checking the ranks, alone would wait forever in those collectives
            stopping = distributed.reduce_sum(float(stop.requested is not None), d) > 0
            saving = (step + 1) % cfg.save_every == 0 or done or stopping and again is None
            if saving:
                if d.world > 1 and not cfg.fsdp:  # before the checkpoint keeps the line
                    record["ranks_in_sync"] = distributed.in_sync(model, d)
                    if not record["ranks_in_sync"] and d.main:  # the field alone said it
                        log.warning("step %d: the processes' copies of the model differ (nondeterministic kernels, "
                                    "or a process that computed otherwise): checkpoints and the final model keep "
                                    "the first process's", step + 1)
                last_checkpoint = save_checkpoint(step + 1, record)
            # every --log-every steps, and every step that evaluated or saved (a resumed run puts a checkpoint's
            # line back: `rundir.begin`)
            if (step + 1) % cfg.log_every == 0 or saving or "eval_loss" in record:
                # the first process alone writes: a full disk stops every process with its line
                with distributed.stopping_together(d), written(out / "metrics.jsonl"):
                    metrics.log(record)
            else:
                metrics.log(record, write=False)
            # every step is done: the final model is what is left, rather than a run to start again for it alone;
            # unless a second signal came during the step (one that comes while it is written stops it), decided
            # for every process: --resume writes it then
            if stopping and done and distributed.reduce_sum(float(stop.repeated), d) == 0:
                metrics.message(f"stop requested during the last step ({step + 1}): writing the final model")
            elif stopping:
                metrics.message(f"stopped at step {step + 1}; continue with --resume (checkpoint {last_checkpoint})"
                                if again is None else f"stopped at step {step + 1}; {again}")
                metrics.close()
                raise stop.stopped()  # (a process the signal did not reach: as Ctrl-C)
    metrics.close()
    with distributed.stopping_together(d):  # the others would wait at train()'s barrier for a first process gone
        recorded = dataclasses.replace(cfg, precision=precision_used)
        return _final_model(recorded, out, model_dir, plan, d, start_files, resumes)


def _final_model(cfg: TrainConfig, out: Path, model_dir: Path, plan: Plan, d: distributed.Dist,
                 start_files: list[str] | None, resumes: list) -> Path:
    """OUT/model: the last checkpoint, or the average of the last N, saved like `encdec adapt` saves
    (over the full vocabulary again after trimming); a decoder-only model in its family's layout."""
    final = out / "model"
    if not d.main:
        return final
    paths = checkpointing.scheduled(out, cfg.save_every, cfg.steps)[-cfg.average_last :]
    weights = checkpointing.average(paths)
    run = {"from": portable_path(cfg.model), "objective": cfg.objective, "distill": cfg.distill, "steps": cfg.steps,
           "averaged_checkpoints": [p.name for p in paths], "settings": rundir.recorded_settings(cfg),
           **({"resumes": resumes} if resumes else {})}  # the settings are the last run's: where they changed
    key = "finetuned" if cfg.objective == "instruct" else "pretrained"
    # a directory's: it would take another model's config, silently (a decoder-only source's too: 4 layers of
    # weights saved under a config of 2)
    if start_files is not None and rundir.start_model_files(model_dir) != start_files:
        raise EncdecError(f"{model_dir} changed while the run trained (its files were replaced or removed), and "
                          "the final model takes its configuration and metadata from the model the run began "
                          f"with: put that model back there and run again with --resume (the checkpoints in "
                          f"{out} are kept)")
    if plan.causal:
        from encdec.causal import causal_from_source, save_causal

        model = full_vocabulary_model(weights, causal_from_source(plan.source), plan.keep)
        save_causal(model, plan.source, final, overwrite=True, metadata={key: run}, tokenizer=plan.tokenizer)
    else:
        start = load_checkpoint(model_dir).model
        if start.config.vocab_size < plan.vocab_size:  # UL2 grew the embeddings for its added tokens
            start = grow_vocabulary(start, plan.vocab_size)
        model = full_vocabulary_model(weights, start, plan.keep)
        save(model, final, tokenizer=plan.tokenizer, overwrite=True, metadata={**read_metadata(model_dir), key: run})
    if len(paths) > 1:  # the held-out losses logged were each step's own weights'
        log.info("final model: %s (average of %d checkpoints: the held-out losses above are of single steps; "
                 "`encdec evaluate %s` scores the average)", final, len(paths), final)
    else:
        log.info("final model: %s (average of 1 checkpoint)", final)
    return final
