"""The training loop of pretraining and instruction tuning, assembled from this package's components."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encdec.checkpoint import is_checkpoint, load_checkpoint, read_metadata, save
from encdec.data.tokens import token_stream, windows
from encdec.errors import EncdecError
from encdec.files import portable_path
from encdec.model import CausalLM, EncoderDecoder, Lookup, Segments
from encdec.objectives import Example
from encdec.report import part_of
from encdec.sources import DecoderOnlySource, load_tokenizer
from encdec.training import checkpointing, distributed, rundir
from encdec.training.allocator import keep_freed_memory
from encdec.training.config import TrainConfig
from encdec.training.data import Batch, ExampleStream, example_maker, make_batch, window_length
from encdec.training.loss import Distillation, LossParts, chunked_loss, tied_lookups
from encdec.training.metrics import Metrics
from encdec.training.optim import build_optimizer, build_scheduler
from encdec.training.precision import autocast_dtype
from encdec.training.vocab import always_kept, kept_tokens, remap_table, trim_model, trim_teacher, untrim

log = logging.getLogger("encdec")


class LossModule(nn.Module):
    """Student forward and chunked loss as one module, so that DDP / FSDP2 wrap all a step touches."""

    def __init__(self, model: EncoderDecoder, chunk: int, distillation: Distillation | None) -> None:
        super().__init__()
        self.model, self.chunk, self.distillation = model, chunk, distillation
        self.teacher_head = None

    def forward(self, batch: Batch, teacher_hidden: torch.Tensor | None = None) -> LossParts:
        r = batch.rows
        tied = tied_lookups(self.model.embed.weight)
        out = self.model(r.input_ids, decoder_input_ids=r.decoder_input_ids, segment_ids=r.segment_ids,
                         positions=r.positions, decoder_segment_ids=r.decoder_segment_ids,
                         decoder_positions=r.decoder_positions, return_logits=False, lookup=tied)
        targets = r.labels != -100
        labels = r.labels[targets]
        distill_mask = None
        if teacher_hidden is not None:  # the teacher cannot know where a window was cut: no KL on the EOS target
            distill_mask = labels != self.model.config.eos_token_ids[0]
        return chunked_loss(out.decoder_hidden_states[targets], self.model.embed.weight, labels, chunk=self.chunk,
                            softcap=self.model.config.final_logit_softcap, teacher_hidden=teacher_hidden,
                            teacher_head=self.teacher_head, distill_mask=distill_mask, distillation=self.distillation,
                            tied=tied)


class CausalLossModule(nn.Module):
    """A decoder-only model trained on the same examples: it reads each example's inputs + targets
    causally (the teacher's packed rows) and is scored on the target tokens only."""

    def __init__(self, model: CausalLM, chunk: int) -> None:
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, batch: Batch, teacher_hidden: torch.Tensor | None = None) -> LossParts:
        labels = batch.rows.labels[batch.rows.labels != -100]
        tied = tied_lookups(self.model.embed.weight)
        return chunked_loss(causal_states(self.model, batch, tied), self.model.embed.weight, labels, chunk=self.chunk,
                            softcap=self.model.final_logit_softcap, tied=tied)


def causal_states(model: CausalLM, batch: Batch, lookup: Lookup | None = None) -> torch.Tensor:
    """A decoder-only model's final states predicting each target token of the batch, in the student's order."""
    t = batch.teacher
    hidden = model.hidden(t.input_ids, Segments(t.segment_ids, t.positions), lookup)
    targets = batch.rows.labels != -100
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[targets]
    return hidden[rows, t.target_positions[targets]]


def teacher_states(teacher: CausalLM, batch: Batch) -> torch.Tensor:
    with torch.inference_mode():
        return causal_states(teacher, batch).clone()


class StopRequest:
    """SIGINT / SIGTERM: finish the step, write a checkpoint, stop."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _tokens(batch: Batch) -> int:
    return int((batch.rows.segment_ids != 0).sum() + (batch.rows.decoder_segment_ids != 0).sum())


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a pretraining or instruction-tuning run; returns the directory of the final model."""
    d = distributed.init()
    try:
        with rundir.locked(Path(cfg.out), d):
            final = _train(cfg, d)
        distributed.barrier(d)  # nobody tears the group down while rank 0 still writes the final model
        return final
    finally:
        distributed.close(d)


@dataclass
class Plan:
    """What a run trains and on what: the model, the example stream and the held-out examples."""

    model: nn.Module  # EncoderDecoder, or CausalLM when instruction-tuning a decoder-only model
    stream: ExampleStream
    eval_examples: list[Example]
    keep: np.ndarray | None  # kept token ids when the vocabulary is trimmed
    vocab_size: int  # of the full vocabulary (the teacher's)
    source: DecoderOnlySource | None = None  # the decoder-only model's source (config, tokenizer)

    @property
    def causal(self) -> bool:
        return isinstance(self.model, CausalLM)


def _trim(cfg: TrainConfig, model: EncoderDecoder, tokenizer, ids: np.ndarray, d: distributed.Dist):
    """The model over the N most frequent tokens of `ids`, and the id table mapping full ids to kept ones."""
    keep = kept_tokens(ids, cfg.trim_vocab, always_kept(tokenizer, cfg.objective), model.config.vocab_size)
    table = remap_table(keep, model.config.vocab_size, tokenizer.unk_token_id)
    if d.main:
        log.info("training on a vocabulary of %d tokens (of %d)", len(keep), len(table))
    return trim_model(model, keep, table), keep, table


def _pretraining_plan(cfg: TrainConfig, model: EncoderDecoder, tokenizer, d: distributed.Dist) -> Plan:
    stream_ids = token_stream(tokenizer, cfg.data, text_field=cfg.text_field)
    vocab, keep, vocab_size = tokenizer.get_vocab(), None, model.config.vocab_size
    if cfg.trim_vocab:
        model, keep, table = _trim(cfg, model, tokenizer, stream_ids, d)
        stream_ids = table[stream_ids]
        vocab = {token: int(table[i]) for token, i in vocab.items() if i < len(table) and keep[table[i]] == i}
    data = windows(stream_ids, window_length(cfg.objective, cfg.enc_len, cfg.dec_len))
    if len(data) <= cfg.eval_windows:
        raise EncdecError(f"the data makes {len(data)} windows, not more than --eval-windows {cfg.eval_windows}")
    make = example_maker(cfg.objective, eos_id=model.config.eos_token_ids[0], vocab=vocab, mixture=cfg.mixture,
                         random_split=cfg.random_split)
    stream = ExampleStream(data[: -cfg.eval_windows], lambda w, rng: make(w.tolist(), rng), seed=cfg.seed,
                           enc_len=cfg.enc_len, dec_len=cfg.dec_len)
    eval_rng = np.random.default_rng([cfg.seed, 2])
    return Plan(model, stream, [make(w.tolist(), eval_rng) for w in data[-cfg.eval_windows :]], keep, vocab_size)


def _instruction_plan(cfg: TrainConfig, model: nn.Module, tokenizer, d: distributed.Dist,
                      source: DecoderOnlySource | None) -> Plan:
    """Prompt -> response examples in Gemma's chat format (loss on the response, which ends with EOS)."""
    from encdec.data.instructions import chat_example, read_instructions
    from encdec.data.natural_instructions import natural_instructions

    pairs = read_instructions(cfg.data) if cfg.data else natural_instructions(cfg.per_task, seed=cfg.seed)
    order = np.random.default_rng([cfg.seed, 3]).permutation(len(pairs))
    eos = tokenizer.eos_token_id
    examples = [chat_example(pairs[i], tokenizer, eos_id=eos, max_input=cfg.enc_len, max_target=cfg.dec_len) for i in order]
    if len(examples) <= cfg.eval_windows:
        raise EncdecError(f"{len(examples)} instruction examples are not more than --eval-windows {cfg.eval_windows}")
    keep, vocab_size = None, model.embed.num_embeddings
    if cfg.trim_vocab:
        if isinstance(model, CausalLM):
            raise EncdecError("--trim-vocab works with encoder-decoder models only")
        ids = np.concatenate([np.asarray(e.inputs + e.targets) for e in examples])
        model, keep, table = _trim(cfg, model, tokenizer, ids, d)
        examples = [Example(table[e.inputs].tolist(), table[e.targets].tolist()) for e in examples]
    held_out = examples[-cfg.eval_windows :]
    stream = ExampleStream(examples[: -cfg.eval_windows], lambda e, rng: e, seed=cfg.seed, enc_len=cfg.enc_len,
                           dec_len=cfg.dec_len)
    if d.main:
        log.info("instruction tuning on %d examples (%d held out)", len(examples) - len(held_out), len(held_out))
    return Plan(model, stream, held_out, keep, vocab_size, source)


def _plan(cfg: TrainConfig, d: distributed.Dist) -> tuple[Plan, object]:
    """Load the model to train and its data."""
    if cfg.objective != "instruct":
        model_dir = Path(cfg.model)
        model = load_checkpoint(model_dir).model.train()
        tokenizer = load_tokenizer(model_dir)
        return _pretraining_plan(cfg, model, tokenizer, d), tokenizer
    if is_checkpoint(cfg.model):
        model, source = load_checkpoint(cfg.model).model.train(), None
        tokenizer = load_tokenizer(Path(cfg.model))
    else:
        from encdec.causal import load_causal

        model, source = load_causal(cfg.model)
        model.train()
        tokenizer = load_tokenizer(source.directory)
    return _instruction_plan(cfg, model, tokenizer, d, source), tokenizer


def _train(cfg: TrainConfig, d: distributed.Dist) -> Path:
    out = Path(cfg.out)
    resume_from = rundir.resume_point(cfg, d)
    torch.manual_seed(cfg.seed)
    model_dir = Path(cfg.model)
    plan, tokenizer = _plan(cfg, d)
    cfg.check_fit(None if plan.causal else plan.model.config, len(plan.stream.items), d.world)
    model, stream, eval_examples, keep = plan.model.to(d.device), plan.stream, plan.eval_examples, plan.keep
    if plan.causal:  # a decoder-only model reads the teacher's view of the rows
        special = dict(pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id)
    else:
        special = dict(pad_id=model.config.pad_token_id, bos_id=model.config.bos_token_id)

    compute_dtype = autocast_dtype(cfg.precision, d.device)
    if d.main:
        log.info("matrix products in %s", "bfloat16 (autocast)" if compute_dtype else "float32")
    if d.device.type == "cpu" and cfg.keep_freed_memory:
        kept = keep_freed_memory()
        if kept and d.main:
            log.info("CPU memory: freed memory is kept for reuse (--no-keep-freed-memory returns it to the system)")
    teacher = None
    distillation = None
    if cfg.distill:
        from encdec.training.teacher import load_teacher, teacher_spec

        dtype = compute_dtype or torch.float32
        teacher = load_teacher(teacher_spec(model_dir, cfg.teacher), plan.vocab_size, dtype, d.device)
        if keep is not None:
            teacher = trim_teacher(teacher, keep)
        distillation = Distillation(cfg.alpha, cfg.tau, cfg.teacher_top_k)
    if plan.causal:
        module: nn.Module = CausalLossModule(model, cfg.loss_chunk)
        blocks = list(model.stack.layers)
    else:
        module = LossModule(model, cfg.loss_chunk, distillation)
        if teacher is not None:
            module.teacher_head = teacher.logits
        blocks = [*model.encoder.layers, *model.decoder.layers]
    wrapped = distributed.wrap(module, blocks, d, cfg.fsdp)
    optimizer = build_optimizer(wrapped, lr=cfg.lr, weight_decay=cfg.weight_decay, decay_all=cfg.decay_all)
    scheduler = build_scheduler(optimizer, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
    start = 0
    last_checkpoint: Path | None = resume_from.path if resume_from else None
    if resume_from is not None:
        state = checkpointing.apply(resume_from, wrapped, optimizer)
        del resume_from  # its tensors are in the model and the optimizer now
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
        if (keep is None) != (state.get("kept_tokens") is None) or (keep is not None and not np.array_equal(keep, state["kept_tokens"])):
            raise EncdecError(f"{last_checkpoint} was trained on another vocabulary (different data or --trim-vocab)")
        start = state["step"]
        if d.main:
            log.info("resuming from %s (step %d)", last_checkpoint, start)
    rundir.begin(cfg, start, d)

    autocast = torch.autocast(d.device.type, dtype=compute_dtype or torch.bfloat16, enabled=compute_dtype is not None)
    metrics = Metrics(out, total=cfg.steps, start=start, tensorboard=cfg.tensorboard, enabled=d.main,
                      desc="finetune" if cfg.objective == "instruct" else "pretrain")
    rows = cfg.batch_size
    with_teacher = teacher is not None
    teacher_rows = with_teacher or plan.causal

    def evaluate() -> float:
        """Mean held-out cross-entropy per target token; each process reads its share of the batches."""
        starts = range(0, len(eval_examples), rows)
        total, count = 0.0, 0
        with torch.no_grad(), autocast:
            for index in distributed.share(len(starts), d):
                start = starts[0 if index is None else index]  # a spare pass keeps FSDP2 in step; not counted
                batch = make_batch(eval_examples[start : start + rows], enc_len=cfg.enc_len, dec_len=cfg.dec_len,
                                   with_teacher=plan.causal, **special).to(d.device)
                ce = wrapped(batch).ce
                if index is not None:
                    total += ce * batch.target_tokens
                    count += batch.target_tokens
        return distributed.reduce_sum(total, d) / distributed.reduce_sum(count, d)

    def save_checkpoint(step: int) -> Path:
        trainer = {"scheduler": scheduler.state_dict(), "stream": stream.state_dict(), "config": vars(cfg),
                   "kept_tokens": keep}
        return checkpointing.save(out, step, wrapped, optimizer, trainer, d, cfg.keep_last, last_checkpoint)

    with StopRequest() as stop:
        for step in range(start, cfg.steps):
            began = time.perf_counter()
            loss_total, ce_total, kl_total, tokens = 0.0, 0.0, 0.0, 0
            for micro in range(cfg.grad_accum):
                examples = stream.next_examples(rows * d.world)
                batch = make_batch(examples, enc_len=cfg.enc_len, dec_len=cfg.dec_len, with_teacher=teacher_rows,
                                   **special).slice(d.rank * rows, (d.rank + 1) * rows)
                batch = batch.to(d.device)
                tokens += _tokens(batch)
                teacher_hidden = teacher_states(teacher, batch) if teacher is not None else None
                last_micro = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last_micro or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
                with sync:
                    with autocast:
                        parts = wrapped(batch, teacher_hidden)
                    (parts.loss / cfg.grad_accum).backward()
                loss_total += parts.loss.item() / cfg.grad_accum
                ce_total += parts.ce / cfg.grad_accum
                kl_total += (parts.kl or 0.0) / cfg.grad_accum
            loss = distributed.reduce_sum(loss_total, d) / d.world
            if not math.isfinite(loss):
                raise checkpointing.not_finite(f"the loss became {loss}", step + 1, last_checkpoint)
            if step < cfg.cross_warmup_steps:  # unbalanced warm-up: only cross-attention learns
                for name, p in wrapped.named_parameters():
                    if part_of(name) != "cross-attention":
                        p.grad = None
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in wrapped.parameters() if p.grad is not None], cfg.clip
            )
            if not math.isfinite(float(grad_norm)):  # the update would make the weights NaN
                raise checkpointing.not_finite(f"the gradient norm became {float(grad_norm)}", step + 1, last_checkpoint)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - began
            record = {
                "step": step + 1, "loss": loss, "ce": distributed.reduce_sum(ce_total, d) / d.world,
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                "tokens_per_s": distributed.reduce_sum(tokens, d) / seconds,
            }
            if with_teacher:
                record["kl"] = distributed.reduce_sum(kl_total, d) / d.world
            done = step + 1 == cfg.steps
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done:
                record["eval_loss"] = evaluate()
                metrics.message(f"step {step + 1}: held-out loss {record['eval_loss']:.4f}")
            saved = (step + 1) % cfg.save_every == 0 or done or stop.requested
            if saved:
                last_checkpoint = save_checkpoint(step + 1)
                if d.world > 1 and not cfg.fsdp:
                    record["ranks_in_sync"] = distributed.in_sync(model, d)
            if (step + 1) % cfg.log_every == 0 or done or "ranks_in_sync" in record:
                metrics.log(record)
            if stop.requested:
                if not saved:  # the signal came after this step's save decision
                    last_checkpoint = save_checkpoint(step + 1)
                metrics.message(f"stopped at step {step + 1}; continue with --resume (checkpoint {last_checkpoint})")
                metrics.close()
                raise KeyboardInterrupt
    metrics.close()
    return _final_model(cfg, out, model_dir, plan, d)


def _final_model(cfg: TrainConfig, out: Path, model_dir: Path, plan: Plan, d: distributed.Dist) -> Path:
    """OUT/model: the last checkpoint, or the average of the last N, saved like `encdec adapt` saves
    (over the full vocabulary again after trimming); a decoder-only model in the Gemma layout."""
    final = out / "model"
    if not d.main:
        return final
    paths = checkpointing.checkpoints(out)[-cfg.average_last :]
    weights = checkpointing.average(paths)
    run = {"from": portable_path(cfg.model), "objective": cfg.objective, "distill": cfg.distill, "steps": cfg.steps,
           "averaged_checkpoints": [p.name for p in paths]}
    key = "finetuned" if cfg.objective == "instruct" else "pretrained"
    if plan.causal:
        from encdec.causal import save_causal

        plan.model.load_state_dict(weights, strict=True)
        save_causal(plan.model, plan.source, final, overwrite=True, metadata={key: run})
    else:
        start = load_checkpoint(model_dir).model
        if plan.keep is not None:
            weights = untrim(weights, start.state_dict(), plan.keep)
        with torch.device("meta"):
            model = EncoderDecoder(start.config)
        model.load_state_dict(weights, strict=True, assign=True)
        save(model, final, tokenizer_dir=model_dir, overwrite=True, metadata={**read_metadata(model_dir), key: run})
    log.info("final model: %s (average of %d checkpoint(s))", final, len(paths))
    return final
