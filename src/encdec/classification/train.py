"""Tokenizing, fine-tuning all parameters (or all but the embedding) with AdamW, and predicting probabilities.

Fine-tuning is a plain epoch loop over the training package's components: its AdamW (fused) and
warm-up schedule, its padding, its choice of autocast dtype, and on CPU its allocator setting. The
classifier's loss needs none of the LM-head fusion: its head has a few outputs, not a vocabulary.

Inputs begin as the backbone's tokenizer begins a text (Gemma's BOS; nothing for SmolLM2 or Qwen, whose
tokenizers name a BOS they never put first) and are cut from the left to `max_len` tokens (that first
token kept): the end of every task's text carries what is asked (BoolQ's question, the hypothesis, COPA's
options), and the last-token pooling reads it there. Rows are right-padded, so the last real token sits at
index mask.sum(1) - 1.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from encdec.allocator import keep_freed_memory
from encdec.classification.classifier import Classifier
from encdec.data.tokens import outside_vocabulary
from encdec.errors import EncdecError
from encdec.files import atomic_dir
from encdec.inference.onednn import packed_while_inferring
from encdec.training.checkpointing import MAX_STEPS
from encdec.training.data import length_grouped, pad_rows
from encdec.training.optim import (
    build_optimizer,
    build_scheduler,
    check_saved_moments,
    group_settings,
    resume_schedule,
)
from encdec.training.plain_state import read_state, write_state
from encdec.training.precision import PRECISIONS, autocast_dtype

log = logging.getLogger("encdec")

# a text past max_len x this many characters is tokenized from its end (`_tail_ids`): tokens are 3-5 characters of
# text, so shorter texts are tokenized whole, as before
TAIL_CHARS_PER_TOKEN = 64
TAIL_MAX_CHARS = 1 << 20  # the widest window (about 150 MB of a tokenizer's working memory)
TAIL_STAGGER = 997  # characters between the two windows compared: a prime, no chunk size divides it
SAVE_EVERY_S = 600.0  # how often a fit with `progress` saves it: a kill loses at most this much training


@dataclass
class Hyper:
    """Fine-tuning settings (the CLI's defaults are these)."""

    lr: float = 1e-5  # the backbone's peak learning rate: typical for full fine-tuning
    head_lr: float = 1e-4  # the new head starts at zero and has only its own signal: a larger rate
    weight_decay: float = 0.01  # decoupled; not on norms, embeddings, biases
    epochs: int = 3
    steps: int | None = None  # optimizer steps; overrides epochs when given
    batch_size: int = 8
    max_len: int = 256
    warmup: float = 0.1  # share of the steps with a linear warm-up; then linear decay to zero
    seed: int = 0
    # autocast of the forward's matrix products (weights stay float32): fp32 keeps earlier results; bf16, or auto
    # (bf16 where it is faster, as pretraining chooses), made steps 1.5-1.7x faster on an AVX512-BF16 CPU
    precision: str = "fp32"
    # keep the token embedding as it is: on the 270M it is 168M of the 268M parameters, so this drops its dense
    # gradient and AdamW state (2 GB) and their work (about 0.2 s of a profiled 3-4 s step); the rest still trains
    freeze_embeddings: bool = False
    # batches of alike lengths (`length_grouped`): on BoolQ at 192 tokens a third fewer slots to compute than in
    # random batches; off by default, so that a seed gives the batches it gave before
    group_by_length: bool = False

    def check(self) -> None:
        if self.batch_size < 1 or self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise EncdecError("--batch-size, --epochs and --steps must be positive")
        if max(self.epochs, self.steps or 0) > MAX_STEPS:  # past a float's range: a traceback of the schedule
            raise EncdecError(f"--epochs and --steps must be at most {MAX_STEPS:,}, got {self.epochs} and {self.steps}")
        if self.max_len < 2:
            raise EncdecError(f"--max-len {self.max_len}: needs room for BOS and at least one token")
        if not (0 < self.lr < math.inf and 0 < self.head_lr < math.inf and 0 <= self.warmup < 1):
            raise EncdecError("--lr and --head-lr must be positive finite numbers and --warmup in [0, 1)")
        if not 0 <= self.weight_decay <= 1:
            raise EncdecError(f"--weight-decay must be in [0, 1], got {self.weight_decay}")
        if self.precision not in PRECISIONS:
            raise EncdecError(f"--precision {self.precision!r}: accepted: {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def encode(tokenizer, texts: list[str], max_len: int, first: int | None, vocab_size: int | None = None,
           named: str = "input") -> list[list[int]]:
    """Token ids of each text: `first` (the token the tokenizer puts before a text, `leading_bos`; None for
    none), then the text's last tokens, max_len in all; each checked to be in the model's `vocab_size` (a
    tokenizer's token past the embedding, Gemma 3's <image_soft_token>, is an IndexError in the middle of a fit)."""
    bos = [] if first is None else [first]
    keep = max_len - len(bos)
    width = keep * TAIL_CHARS_PER_TOKEN
    short = [i for i, text in enumerate(texts) if len(text) <= width]
    ids = dict(zip(short, tokenizer([texts[i] for i in short], add_special_tokens=False)["input_ids"])) if short else {}
    rows = []
    for i, text in enumerate(texts):
        tokens = ids[i] if i in ids else _tail_ids(tokenizer, text, keep, width)
        rows.append(bos + tokens[len(tokens) - keep:] if len(tokens) > keep else bos + tokens)
    for n, row in enumerate(rows, 1):
        if not row:
            raise EncdecError(f"{named} #{n} is empty and the tokenizer puts no BOS token before a text to stand for "
                              "it; give it some text")
        if vocab_size is not None and (bad := outside_vocabulary(row, vocab_size)) is not None:
            raise EncdecError(f"{named} #{n}: token {tokenizer.convert_ids_to_tokens(bad)!r} (id {bad}) is outside "
                              f"the model's vocabulary (0 to {vocab_size - 1}); remove it from the text")
    return rows


def _tail_ids(tokenizer, text: str, keep: int, width: int) -> list[int]:
    """The last `keep` tokens of a long `text`, tokenized from windows at its end: two, TAIL_STAGGER characters apart,
    whose last `keep` tokens agree (a cut changes only the tokens near it; a run of one character, tokenized in
    chunks of a few dozen, is cut at two phases), else twice as wide, up to TAIL_MAX_CHARS: a handed 64 MB text
    (--predict --input) was tokenized whole, GBs of memory, for 256 tokens. A text that has not settled by then (a
    run of one character longer than that) keeps the widest window's tokens."""
    def tail(chars: int) -> list[int] | None:
        window = tokenizer(text[-chars:], add_special_tokens=False)["input_ids"]
        return window[len(window) - keep:] if len(window) > keep else None  # (its first token may be cut in two)

    while width + TAIL_STAGGER < len(text):
        near, far = tail(width), tail(width + TAIL_STAGGER)
        if near is not None and (near == far or width > TAIL_MAX_CHARS):
            return far if far is not None else near
        width *= 2
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def padding_id(tokenizer, vocab_size: int) -> int:
    """The id that padding slots hold: masked out, but still looked up in the embedding, so the tokenizer's pad
    id only where the embedding has it (a <pad> added to a fine-tune's tokenizer past it was an IndexError)."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None and 0 <= pad < vocab_size else 0


class Diverged(EncdecError):
    """A fit whose loss, gradients or parameters stopped being finite numbers."""


def _diverged(desc: str, step: int, total: int, what: str) -> Diverged:
    return Diverged(f"{desc}: the fit diverged at step {step + 1} of {total} ({what}); lower the learning rates (--lr, "
                    "--head-lr; with --search, the grid's) or warm up longer")


def fine_tune(classifier: Classifier, rows: list[list[int]], labels: list[int], hp: Hyper, *, pad_id: int,
              desc: str, seed: int, progress: Path | None = None, save_every: float = SAVE_EVERY_S,
              keep_finished: bool = False) -> list[float]:
    """Train every parameter (but the embedding with `hp.freeze_embeddings`) on (rows, labels) with cross-entropy;
    returns the mean loss of each epoch.

    With `progress` (a directory), the fit's state is saved there every `save_every` seconds and a fit that finds
    it resumes from it, repeating the uninterrupted fit's steps (a BoolQ fit takes an hour on a CPU); the directory
    is removed once the fit is done, or with `keep_finished` holds the finished fit until its caller removes it (the
    caller scores it next, for minutes: killed then, a rerun finds the fit done instead of training it again)."""
    device = next(classifier.parameters()).device
    if device.type == "cpu":
        keep_freed_memory()  # as CPU pretraining does: no page faults on the embedding-sized gradients
    classifier.backbone.embed.weight.requires_grad_(not hp.freeze_embeddings)
    steps_per_epoch = math.ceil(len(rows) / hp.batch_size)
    total = hp.steps if hp.steps is not None else hp.epochs * steps_per_epoch
    # AdamW's default betas, as classification always had (pretraining uses 0.95), and the head at its own rate
    optimizer = build_optimizer(classifier, lr=hp.lr, weight_decay=hp.weight_decay, betas=(0.9, 0.999),
                                prefix_lr={"head.": hp.head_lr})
    scheduler = build_scheduler(optimizer, warmup=round(hp.warmup * total), total=total, min_ratio=0.0, decay="linear")
    compute_dtype = autocast_dtype(hp.precision, device)
    autocast = torch.autocast(device.type, dtype=compute_dtype or torch.bfloat16, enabled=compute_dtype is not None)
    rng = random.Random(seed)
    classifier.train()
    fit = _FitProgress(progress, save_every, classifier, optimizer, scheduler, total)
    step, epoch, losses, epoch_losses, skip = 0, 0, [], [], 0
    if (resumed := fit.resume()) is not None:
        step, epoch, losses, epoch_losses, skip = (resumed[k] for k in ("step", "epoch", "losses", "epoch_losses",
                                                                         "within"))
        rng.setstate(resumed["rng"])
        log.info("%s: resumed at step %d of %d from %s", desc, step, total, progress)
    with tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True, leave=False, disable=None) as bar:
        while step < total:
            epoch_start = rng.getstate()
            order = list(range(len(rows)))
            rng.shuffle(order)
            batches = (length_grouped(order, [len(row) for row in rows], hp.batch_size, rng) if hp.group_by_length
                       else [order[start: start + hp.batch_size] for start in range(0, len(order), hp.batch_size)])
            for within, chosen in enumerate(batches[skip:], start=skip):
                if step == total:
                    break
                ids, mask = (t.to(device) for t in pad_rows([rows[i] for i in chosen], pad_id))
                with autocast:
                    logits = classifier(ids, mask)  # float32 whatever the autocast
                loss = F.cross_entropy(logits, torch.tensor([labels[i] for i in chosen], device=device))
                if not math.isfinite(value := loss.item()):  # its predictions would all be label 0 (NaN's argmax)
                    fit.done()  # its saved progress would only diverge again: not kept (gigabytes)
                    raise _diverged(desc, step, total, f"loss {value}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # non-finite gradients with a finite loss: clipping would make them NaN (inf * 0) and the update too
                if not math.isfinite(norm := torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0).item()):
                    fit.done()
                    raise _diverged(desc, step, total, f"gradient norm {norm}")
                optimizer.step()
                scheduler.step()
                step += 1
                epoch_losses.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                if step < total:
                    fit.maybe_save({"step": step, "epoch": epoch, "losses": losses, "epoch_losses": epoch_losses,
                                    "within": within + 1, "rng": epoch_start})
            skip = 0
            epoch += 1
            losses.append(sum(epoch_losses) / len(epoch_losses))
            tqdm.write(f"encdec: {desc}: epoch {epoch}: mean loss {losses[-1]:.4f} over {len(epoch_losses)} steps",
                       file=sys.stderr)
            epoch_losses = []
    # the loss checks each update's parameters at the next step: the last update's have no next step
    if not all(bool(p.isfinite().all()) for p in classifier.parameters() if p.requires_grad):
        fit.done()  # as a diverged loss's: not kept
        raise _diverged(desc, total - 1, total, "parameters no longer finite numbers")
    if keep_finished:
        fit.save({"step": step, "epoch": epoch, "losses": losses, "epoch_losses": [], "within": 0,
                  "rng": rng.getstate()})
    else:
        fit.done()
    classifier.eval()
    return losses


class _FitProgress:
    """A fit's saved state (trained parameters, AdamW, schedule, position in the data): plain JSON and safetensors
    through `training.plain_state`, written whole through a renamed directory. A directory that cannot be read back
    or belongs to another fit is a warning, and the fit starts over; one that cannot be written, a warning too."""

    def __init__(self, directory: Path | None, every: float, classifier: Classifier,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, total: int) -> None:
        self.directory, self.every, self.total = directory, every, total
        self.classifier, self.optimizer, self.scheduler = classifier, optimizer, scheduler
        self.last, self.saving = time.monotonic(), True

    def _trained(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.classifier.named_parameters() if p.requires_grad}

    def resume(self) -> dict[str, Any] | None:
        if self.directory is None or not self.directory.is_dir():
            return None
        fresh = copy.deepcopy(self.optimizer.state_dict()), self.scheduler.state_dict()
        try:
            state = read_state(self.directory, "fit")
            trained = self._trained()
            saved, rng = state["model"], state["torch_rng"]
            if state["total"] != self.total or {k: v.shape for k, v in saved.items()} != \
                    {k: v.shape for k, v in trained.items()}:
                raise EncdecError("it was saved by a fit of other settings")
            settings = group_settings(self.optimizer)
            check_saved_moments(self.optimizer, state["optimizer"])  # (the fused AdamW wrote past a smaller one)
            self.optimizer.load_state_dict(state["optimizer"])
            # the saved step alone, and this fit's settings (as a resumed training run reads them: `resume_schedule`)
            resume_schedule(self.optimizer, self.scheduler, state["scheduler"], settings)
            torch.set_rng_state(rng)
        except (EncdecError, KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            # (AttributeError: a saved "model" that is no mapping) what was loaded before the failure goes: a fresh
            # fit's optimizer held the saved moments and steps
            self.optimizer.load_state_dict(fresh[0])
            self.scheduler.load_state_dict(fresh[1])
            log.warning("not resuming from %s (%s); the fit starts over", self.directory, e)
            return None
        with torch.no_grad():
            for name, value in saved.items():
                trained[name].copy_(value)
        return state

    def maybe_save(self, position: dict[str, Any]) -> None:
        if time.monotonic() - self.last >= self.every:
            self.save(position)

    def save(self, position: dict[str, Any]) -> None:
        if self.directory is None or not self.saving:
            return
        state = {**position, "total": self.total, "model": self._trained(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        try:
            with atomic_dir(self.directory, overwrite=True) as tmp:
                write_state(tmp, "fit", state)
        except (OSError, EncdecError) as e:  # a full or read-only disk, a cache root that is a file: it goes on
            log.warning("could not save the fit's progress in %s (%s); it goes on without", self.directory, e)
            self.saving = False  # an earlier save is still there, and `done` removes it
        self.last = time.monotonic()

    def done(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def batches_by_length(rows: list[list[int]], batch_size: int, pad_id: int, desc: str,
                      device: torch.device | None = None):
    """(positions, padded ids, mask) of batches of rows sorted by length (less padding than in the given order),
    on `device`."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False, disable=None):
        chosen = order[start: start + batch_size]
        yield (chosen, *(t.to(device) for t in pad_rows([rows[i] for i in chosen], pad_id)))


@torch.inference_mode()
def predict(classifier: Classifier, rows: list[list[int]], *, pad_id: int, batch_size: int,
            desc: str = "predicting") -> list[list[float]]:
    """Label probabilities of each row, in the order given."""
    classifier.eval()
    probs: list[list[float]] = [[] for _ in rows]
    with packed_while_inferring(classifier.backbone):  # the head has a few outputs: nothing to gain
        device = next(classifier.parameters()).device
        for chosen, ids, mask in batches_by_length(rows, batch_size, pad_id, desc, device):
            for i, p in zip(chosen, torch.softmax(classifier(ids, mask), -1).tolist()):
                probs[i] = p
    return probs
