"""Cross-entropy and logit distillation through the tied LM head, fused and computed over chunks of tokens.

Gemma's 262k-entry vocabulary makes full logits the biggest tensor of a step (2048 tokens x 262k x
4 bytes = 2 GB, twice with a teacher). The head and the loss are one autograd function: each chunk's
logits are computed once, turned in place into their gradient (softmax - one-hot, plus the
distillation term), multiplied into the gradients of the hidden states and of the head's weight,
and dropped. Nothing is recomputed in the backward pass, at most one chunk of logits exists at a
time, and no log-softmax over the vocabulary is kept for autograd. The price is that the weight's
gradient (the size of the embedding) exists from the forward pass on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def _kl_and_gradient(logits: torch.Tensor, teacher_logits: torch.Tensor, d: Distillation) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(teacher || student) over rows and its gradient with respect to the student's `logits`:
    (softmax(logits / tau) - teacher) / tau."""
    log_q = logits / d.tau
    log_q -= torch.logsumexp(log_q, dim=-1, keepdim=True)
    teacher = teacher_logits.float() / d.tau
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
    logits: torch.Tensor, labels: torch.Tensor, terms: _Terms, teacher: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and KL of one chunk; `logits` (float32, raw head output) is overwritten
    with the gradient of the loss with respect to it."""
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
        kl, kl_grad = _kl_and_gradient(logits[mask], teacher_logits, terms.distillation)
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()  # softmax, in place
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    ce = (top + total.log()).sum() - target.sum()
    probs[rows, labels] -= 1
    grad = probs.mul_(terms.ce_scale)
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
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
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
                        teacher = terms.teacher_head(terms.teacher_hidden[part][mask]), mask
                chunk_sums, grad = _loss_and_logit_gradient(logits_t.T, labels[part], terms, teacher)
                sums += chunk_sums
                grad_t = grad.T.to(dtype)  # [vocab, tokens], contiguous
                if need_hidden:
                    grad_hidden[part] = grad_t.T @ w
                if need_weight and grad_weight is None:
                    grad_weight = (grad_t @ h).to(weight.dtype)
                elif need_weight and dtype == weight.dtype:
                    grad_weight.addmm_(grad_t, h)
                elif need_weight:
                    grad_weight += grad_t @ h
            if need_weight and grad_weight is None:  # no target tokens
                grad_weight = torch.zeros_like(weight)
        ctx.grads = grad_hidden, grad_weight
        ctx.mark_non_differentiable(sums)
        return sums[0] * terms.ce_scale + sums[1] * terms.kl_scale, sums

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_sums: torch.Tensor):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # the weight's gradient is handed over (autograd can then add to it in place)
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None


def chunked_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk: int, softcap: float | None = None,
    teacher_hidden: torch.Tensor | None = None, teacher_head: Head | None = None, distill_mask: torch.Tensor | None = None,
    distillation: Distillation | None = None,
) -> LossParts:
    """`hidden` [N, d] are the student's final states at the N target tokens `labels` [N], read out by
    the head `weight` [vocab, d] (logits soft-capped at `softcap` where given); `teacher_hidden` [N, d']
    are the teacher's states predicting the same tokens, read out by `teacher_head`, used where `distill_mask`."""
    n = labels.numel()
    distilled = int(distill_mask.sum()) if distill_mask is not None and teacher_head is not None else 0
    alpha = distillation.alpha if distilled else 0.0
    kl_scale = alpha * distillation.tau**2 / distilled if distilled else 0.0
    terms = _Terms(chunk, softcap, (1 - alpha) / max(n, 1), kl_scale, distillation,
                   teacher_hidden if distilled else None, teacher_head if distilled else None, distill_mask)
    loss, sums = _FusedHeadLoss.apply(hidden, weight, labels, terms)
    sums = sums.tolist()
    return LossParts(loss, sums[0] / max(n, 1), sums[1] / distilled if distilled else None)
