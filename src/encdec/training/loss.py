"""Cross-entropy and logit distillation, computed over chunks of tokens.

Gemma's 262k-entry vocabulary makes full logits the biggest tensor of a step (2048 tokens x 262k x
4 bytes = 2 GB, twice with a teacher). Each chunk's logits are computed, used and dropped, and
recomputed in the backward pass (activation checkpointing), so at most one chunk exists at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Distillation:
    """Loss = alpha * KL(teacher || student) * tau^2 + (1 - alpha) * cross-entropy."""

    alpha: float = 0.5
    tau: float = 1.0
    top_k: int = 0  # keep the teacher's k most likely tokens, renormalised; 0 keeps all


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, top_k: int) -> torch.Tensor:
    """Summed KL(teacher || student) of temperature-softened distributions, rows = tokens."""
    log_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    teacher = teacher_logits.float() / tau
    if top_k:
        values, index = teacher.topk(top_k, dim=-1)
        log_teacher = F.log_softmax(values, dim=-1)
        return (log_teacher.exp() * (log_teacher - log_student.gather(-1, index))).sum()
    log_teacher = F.log_softmax(teacher, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum()


@dataclass
class LossParts:
    loss: torch.Tensor  # what is optimised (mean over tokens)
    ce: float  # mean cross-entropy per target token
    kl: float | None  # mean KL per distilled token


def chunked_loss(
    hidden: torch.Tensor, head: Head, labels: torch.Tensor, *, chunk: int,
    teacher_hidden: torch.Tensor | None = None, teacher_head: Head | None = None, distill_mask: torch.Tensor | None = None,
    distillation: Distillation | None = None,
) -> LossParts:
    """`hidden` [N, d] are the student's final states at the N target tokens `labels` [N];
    `teacher_hidden` [N, d] the teacher's states predicting the same tokens, used where `distill_mask`."""
    n = labels.numel()
    distilled = int(distill_mask.sum()) if distill_mask is not None else 0
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kl_sum = hidden.new_zeros((), dtype=torch.float32)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor, *teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h)
        ce = F.cross_entropy(logits.float(), y, reduction="sum")
        if not teacher:
            return ce, ce.new_zeros(())
        t, m = teacher
        with torch.no_grad():  # recomputed in the backward pass too: cheaper than keeping it
            teacher_logits = teacher_head(t[m])
        return ce, kl_to_teacher(logits[m], teacher_logits, distillation.tau, distillation.top_k)

    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        extra = (teacher_hidden[part], distill_mask[part]) if distilled and distill_mask[part].any() else ()
        if n <= chunk:  # one chunk: nothing to gain from recomputing it
            ce, kl = chunk_loss(hidden[part], labels[part], *extra)
        else:
            ce, kl = checkpoint(chunk_loss, hidden[part], labels[part], *extra, use_reentrant=False)
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
    ce = ce_sum / max(n, 1)
    if not distilled:
        return LossParts(ce, ce.item(), None)
    kl = kl_sum / distilled
    loss = distillation.alpha * kl * distillation.tau**2 + (1 - distillation.alpha) * ce
    return LossParts(loss, ce.item(), kl.item())
