"""Cross-entropy and logit distillation through the tied LM head, fused and computed over chunks of tokens.

Gemma's 262k-entry vocabulary makes full logits the biggest tensor of a step (2048 tokens x 262k x
4 bytes = 2 GB, twice with a teacher). The head and the loss are one autograd function: each chunk's
logits are computed once, turned in place into their gradient (softmax - one-hot, plus the
distillation term), multiplied into the gradients of the hidden states and of the head's weight,
and dropped. Nothing is recomputed in the backward pass, at most one chunk of logits exists at a
time, and no log-softmax over the vocabulary is kept for autograd. The price is that the weight's
gradient (the size of the embedding) exists from the forward pass on.

Gemma ties the head to the input embedding, so the same table is also read by the encoder's and
the decoder's lookups. Left to autograd, each lookup would make a zero-filled gradient the size of
the table and add it to the head's; `TiedLookups` adds the looked-up rows' gradients in place into
the head's gradient instead, and hands the total to autograd once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encdec.model import lm_logits
from encdec.training.vocab import Negatives

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Distillation:
    """Loss = alpha * KL(teacher || student) * tau^2 + (1 - alpha) * cross-entropy."""

    alpha: float = 0.5
    tau: float = 1.0
    top_k: int = 0  # keep the teacher's k most likely tokens, renormalised; 0 keeps all


@dataclass
class LossParts:
    loss: torch.Tensor  # what is optimised (mean over tokens)
    ce: float  # mean cross-entropy per target token
    kl: float | None  # mean KL per distilled token


@dataclass
class _Terms:
    """What one call needs besides the tensors autograd tracks."""

    chunk: int
    softcap: float | None
    ce_scale: float  # d loss / d (summed cross-entropy)
    kl_scale: float  # d loss / d (summed KL)
    distillation: Distillation | None
    teacher_hidden: torch.Tensor | None
    teacher_head: Head | None
    distill_mask: torch.Tensor | None
    tied: TiedLookups | None  # lookups in the head's table whose gradients join the head's
    negatives: Negatives | None  # frozen rows joined to the softmax after the head's (trimmed vocabularies)
    gradients: bool  # whether the call was made with gradients enabled (no_grad: the logits' product alone)


class TiedLookups:
    """Lookups in the head's weight whose gradients are added in place into the head's gradient.

    Run the model's forward pass under `routing(table)` and pass it to `chunked_loss`. The fused loss computes the head's
    gradient in its forward pass and leaves it here; every lookup adds its rows into it during the
    backward pass (which reaches the lookups after the loss), and the last one to do so returns the
    total to autograd as the weight's gradient, so that gradient hooks (DDP, FSDP2) see it once and
    whole. A lookup whose output takes no part in the loss would never run backward and the weight
    would get no gradient: use it only where every lookup feeds the loss, as training does.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.pending = 0  # lookups made whose backward has not run yet
        self.grad: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.pending += 1
        return _TiedLookup.apply(self.weight, ids, self)

    @contextlib.contextmanager
    def routing(self, table: nn.Embedding) -> Iterator[None]:
        """While open, every lookup in `table` (whose weight is the head's) goes through these tied lookups:
        a forward hook replaces the table's output, so the model needs no training-only argument."""
        assert table.weight is self.weight
        handle = table.register_forward_hook(lambda module, args, out: self(args[0]))
        try:
            yield
        finally:
            handle.remove()


def routed(tied: TiedLookups | None, table: nn.Embedding) -> contextlib.AbstractContextManager:
    """Lookups in `table` routed through `tied` while open (nothing to route when `tied` is None)."""
    return contextlib.nullcontext() if tied is None else tied.routing(table)


def tied_lookups(weight: torch.Tensor) -> TiedLookups | None:
    """Lookups whose gradients join the fused loss's head gradient, when there is a gradient to make."""
    return TiedLookups(weight) if torch.is_grad_enabled() and weight.requires_grad else None


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, tied: TiedLookups) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.tied = tied
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (ids,) = ctx.saved_tensors
        tied = ctx.tied
        if tied.grad is None:  # the loss made no gradient for the head (no target tokens, or not fused)
            tied.grad = torch.zeros_like(tied.weight)
        tied.grad.index_add_(0, ids.reshape(-1), grad_rows.reshape(-1, grad_rows.shape[-1]).to(tied.grad.dtype))
        tied.pending -= 1
        if tied.pending:
            return None, None, None
        total, tied.grad = tied.grad, None  # handed over whole: autograd can keep it as .grad without a copy
        return total, None, None


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, top_k: int) -> torch.Tensor:
    """Summed KL(teacher || student) of temperature-softened distributions, rows = tokens (the reference
    formula; `chunked_loss` computes the same value together with its gradient)."""
    log_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    teacher = teacher_logits.float() / tau
    if top_k:
        values, index = teacher.topk(top_k, dim=-1)
        log_teacher = F.log_softmax(values, dim=-1)
        return (log_teacher.exp() * (log_teacher - log_student.gather(-1, index))).sum()
    log_teacher = F.log_softmax(teacher, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum()


Offset = tuple[int, float]  # (first column, value): columns from there on stand for several tokens each


def _kl_and_gradient(logits: torch.Tensor, teacher_logits: torch.Tensor, d: Distillation,
                     offset: Offset | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(teacher || student) over rows and its gradient with respect to the student's `logits`:
    (softmax(logits / tau) - teacher) / tau. `offset` is added to both after the temperature."""
    log_q = logits / d.tau
    teacher = teacher_logits.float() / d.tau
    if offset is not None:
        log_q[:, offset[0] :] += offset[1]
        teacher[:, offset[0] :] += offset[1]
    log_q -= torch.logsumexp(log_q, dim=-1, keepdim=True)
    if d.top_k:
        values, index = teacher.topk(d.top_k, dim=-1)
        log_t = F.log_softmax(values, dim=-1)
        t = log_t.exp()
        kl = (t * (log_t - log_q.gather(-1, index))).sum()
        grad = log_q.exp_().scatter_add_(-1, index, -t)
    else:
        log_t = F.log_softmax(teacher, dim=-1)
        t = log_t.exp()
        kl = (t * (log_t - log_q)).sum()
        grad = log_q.exp_().sub_(t)
    return kl, grad.div_(d.tau)


def _loss_and_logit_gradient(
    logits: torch.Tensor, labels: torch.Tensor, terms: _Terms, teacher: tuple[torch.Tensor, torch.Tensor] | None,
    offset: Offset | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and KL of one chunk; `logits` (float32, raw head output) is overwritten
    with the gradient of the loss with respect to it. `offset`: see `Negatives`."""
    capped = None
    if terms.softcap is not None:  # logits = cap * tanh(raw / cap); d/d raw = 1 - tanh^2
        capped = logits.div_(terms.softcap).tanh_()
        slope = 1 - capped * capped
        logits = capped.mul_(terms.softcap)
    rows = torch.arange(labels.numel(), device=labels.device)
    target = logits[rows, labels]
    kl = logits.new_zeros(())
    kl_grad = None
    if teacher is not None:
        teacher_logits, mask = teacher
        kl, kl_grad = _kl_and_gradient(logits[mask], teacher_logits, terms.distillation, offset)
    if offset is not None:
        logits[:, offset[0] :] += offset[1]
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()  # softmax, in place, normalised below
    total = probs.sum(dim=-1, keepdim=True)
    ce = (top + total.log()).sum() - target.sum()
    grad = probs.mul_(terms.ce_scale / total)  # (softmax - one-hot) * d loss / d CE
    grad[rows, labels] -= terms.ce_scale
    if kl_grad is not None:
        grad[mask] += kl_grad.mul_(terms.kl_scale)
    if capped is not None:
        grad.mul_(slope)
    return torch.stack([ce, kl]), grad


class _FusedHeadLoss(torch.autograd.Function):
    """loss = ce_scale * sum CE + kl_scale * sum KL over tokens, through logits = hidden @ weight^T.
    Outputs (loss, [sum CE, sum KL]); the gradients are computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, terms: _Terms):
        # needs_input_grad follows requires_grad even under no_grad (held-out batches): asked of the caller too
        need_hidden, need_weight = (need and terms.gradients for need in ctx.needs_input_grad[:2])
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            negatives, offset = terms.negatives, None
            if negatives is not None:  # logits of the sampled rows follow the head's; they take no gradient
                offset = weight.shape[0], negatives.offset
                w = torch.cat([w, negatives.rows.to(dtype)])
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = None
            sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)
            n = labels.numel()
            # logits are computed vocabulary-major ([vocab, tokens]): faster products for the forward
            # logits and the weight's gradient; the loss math below reads them through a transposed view
            buffer = hidden.new_empty(w.shape[0] * min(terms.chunk, n), dtype=torch.float32)  # reused by every chunk
            for start in range(0, n, terms.chunk):
                part = slice(start, start + terms.chunk)
                h = hidden[part].to(dtype)
                logits_t = buffer[: w.shape[0] * h.shape[0]].view(w.shape[0], h.shape[0])
                if dtype == torch.float32:
                    torch.mm(w, h.T.contiguous(), out=logits_t)
                else:
                    logits_t.copy_(w @ h.T)
                teacher = None
                if terms.teacher_head is not None and terms.distill_mask[part].any():
                    mask = terms.distill_mask[part]
                    with torch.no_grad():
                        th = terms.teacher_hidden[part][mask]
                        teacher_logits = terms.teacher_head(th)
                        if negatives is not None:
                            extra = lm_logits(th, negatives.teacher_rows.to(th.dtype), negatives.teacher_softcap)
                            teacher_logits = torch.cat([teacher_logits, extra], -1)
                        teacher = teacher_logits, mask
                chunk_sums, grad = _loss_and_logit_gradient(logits_t.T, labels[part], terms, teacher, offset)
                sums += chunk_sums
                if not (need_hidden or need_weight):
                    continue
                grad_t = grad.T.to(dtype)  # [vocab, tokens], contiguous
                if need_hidden:
                    grad_hidden[part] = grad_t.T @ w
                grad_t = grad_t[: weight.shape[0]]  # the head's own rows
                if need_weight and grad_weight is None:
                    grad_weight = (grad_t @ h).to(weight.dtype)
                elif need_weight and dtype == weight.dtype:
                    grad_weight.addmm_(grad_t, h)
                elif need_weight:
                    grad_weight += grad_t @ h
            if need_weight and grad_weight is None and terms.tied is None:  # no target tokens
                grad_weight = torch.zeros_like(weight)
        if terms.tied is not None:  # the lookups' backward returns it, with their rows added
            terms.tied.grad = grad_weight
        ctx.grads = grad_hidden, grad_weight
        ctx.tied = terms.tied is not None
        ctx.mark_non_differentiable(sums)
        return sums[0] * terms.ce_scale + sums[1] * terms.kl_scale, sums

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_sums: torch.Tensor):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # the weight's gradient is handed over (autograd can then add to it in place)
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                _scale(grad, grad_loss)
        return grad_hidden, None if ctx.tied else grad_weight, None, None


def _scale(grad: torch.Tensor, by: torch.Tensor) -> None:
    """grad *= by, skipped on CPU when `by` is 1 (a plain backward): a pass over an embedding-sized
    gradient saved; elsewhere reading `by` would wait for the device."""
    if by.device.type != "cpu" or by.item() != 1.0:
        grad.mul_(by.to(grad.dtype))


def chunked_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk: int, softcap: float | None = None,
    teacher_hidden: torch.Tensor | None = None, teacher_head: Head | None = None, distill_mask: torch.Tensor | None = None,
    distillation: Distillation | None = None, tied: TiedLookups | None = None, negatives: Negatives | None = None,
    counts: tuple[float, float] | None = None,
) -> LossParts:
    """`hidden` [N, d] are the student's final states at the N target tokens `labels` [N], read out by
    the head `weight` [vocab, d] (logits soft-capped at `softcap` where given); `teacher_hidden` [N, d']
    are the teacher's states predicting the same tokens, read out by `teacher_head`, used where
    `distill_mask`. `tied`: the lookups in `weight` that made `hidden`, if routed through `TiedLookups`.
    `negatives`: frozen rows that join the softmax after `weight`'s (and the teacher's, when distilling).
    `counts`: the target and distilled tokens to average over, when this call is one micro-batch of a larger
    batch (gradient accumulation): the micro-batches' losses then add up to the whole batch's mean; with several
    processes, the mean count per process (their averaged gradients are then those of the global token mean)."""
    distilling = distill_mask is not None and teacher_head is not None
    n = labels.numel() if counts is None else counts[0]
    distilled = 0 if not distilling else int(distill_mask.sum()) if counts is None else counts[1]
    alpha = distillation.alpha if distilled else 0.0
    kl_scale = alpha * distillation.tau**2 / distilled if distilled else 0.0
    terms = _Terms(chunk, softcap, (1 - alpha) / (n or 1), kl_scale, distillation,
                   teacher_hidden if distilled else None, teacher_head if distilled else None, distill_mask,
                   tied if tied is not None and tied.weight is weight else None, negatives, torch.is_grad_enabled())
    loss, sums = _FusedHeadLoss.apply(hidden, weight, labels, terms)
    sums = sums.tolist()
    return LossParts(loss, sums[0] / (n or 1), sums[1] / distilled if distilled else None)
