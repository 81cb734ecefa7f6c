"""What one training step computes: the student's forward pass and its fused head loss, wrapped as
one module (so that DDP / FSDP2 wrap everything a step touches), and the teacher's states."""

from __future__ import annotations

import torch
from torch import nn

from encdec.model import CausalLM, EncoderDecoder, EncoderState, Segments
from encdec.training.data import Batch, example_ends
from encdec.training.loss import Distillation, LossParts, TiedLookups, chunked_loss, routed, tied_lookups
from encdec.training.vocab import Negatives


class _HeadLoss(nn.Module):
    """What both kinds of student share: the final states at the target tokens through the fused head + loss,
    distilled where a teacher is given (never on an example's last target, the EOS appended where its window was
    cut, which the teacher cannot know; an EOS inside the targets, a document's end, is distilled)."""

    def __init__(self, chunk: int, distillation: Distillation | None) -> None:
        super().__init__()
        self.chunk, self.distillation = chunk, distillation
        self.teacher_head = None

    def head_loss(self, hidden: torch.Tensor, batch: Batch, head: torch.Tensor, softcap: float | None,
                  tied: TiedLookups | None, teacher_hidden: torch.Tensor | None, negatives: Negatives | None,
                  counts: tuple[float, float] | None) -> LossParts:
        targets = batch.rows.labels != -100
        labels = batch.rows.labels[targets]
        distill_mask = None if teacher_hidden is None else ~example_ends(batch.rows)[targets]
        return chunked_loss(hidden, head, labels, chunk=self.chunk, softcap=softcap, teacher_hidden=teacher_hidden,
                            teacher_head=self.teacher_head, distill_mask=distill_mask, distillation=self.distillation,
                            tied=tied, negatives=negatives, counts=counts)

    def target_counts(self, batches: list[Batch]) -> tuple[int, int]:
        """Target tokens, and those distilled, of the micro-batches of one step: what their losses average over."""
        targets = sum(b.target_tokens for b in batches)
        return targets, targets - sum(int(example_ends(b.rows).sum()) for b in batches)


class LossModule(_HeadLoss):
    """Student forward and chunked loss as one module, so that DDP / FSDP2 wrap all a step touches."""

    def __init__(self, model: EncoderDecoder, chunk: int, distillation: Distillation | None = None) -> None:
        super().__init__(chunk, distillation)
        self.model = model

    def forward(self, batch: Batch, teacher_hidden: torch.Tensor | None = None, negatives: Negatives | None = None,
                counts: tuple[float, float] | None = None) -> LossParts:
        r, model = batch.rows, self.model
        tied = tied_lookups(model.embed.weight) if model.config.tied_head else None
        with routed(tied, model.embed):
            enc_seg = Segments(r.segment_ids, r.positions)
            encoder = EncoderState(model.encode_segments(r.input_ids, enc_seg), enc_seg)
            hidden = model.decode(r.decoder_input_ids, encoder, Segments(r.decoder_segment_ids, r.decoder_positions))
        return self.head_loss(hidden[r.labels != -100], batch, model.head_weight, model.config.final_logit_softcap,
                              tied, teacher_hidden, negatives, counts)


class CausalLossModule(_HeadLoss):
    """A decoder-only model trained on the same examples: it reads each example's inputs + targets
    causally (the teacher's packed rows) and is scored on the target tokens only."""

    def __init__(self, model: CausalLM, chunk: int, distillation: Distillation | None = None) -> None:
        super().__init__(chunk, distillation)
        self.model = model

    def forward(self, batch: Batch, teacher_hidden: torch.Tensor | None = None, negatives: Negatives | None = None,
                counts: tuple[float, float] | None = None) -> LossParts:
        tied = tied_lookups(self.model.embed.weight) if self.model.lm_head is None else None
        with routed(tied, self.model.embed):
            hidden = causal_states(self.model, batch)
        return self.head_loss(hidden, batch, self.model.head_weight, self.model.final_logit_softcap, tied,
                              teacher_hidden, negatives, counts)


def causal_states(model: CausalLM, batch: Batch) -> torch.Tensor:
    """A decoder-only model's final states predicting each target token of the batch, in the student's order."""
    t = batch.teacher
    hidden = model.hidden(t.input_ids, Segments(t.segment_ids, t.positions))
    targets = batch.rows.labels != -100
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[targets]
    return hidden[rows, t.target_positions[targets]]


def teacher_states(teacher: CausalLM, batch: Batch) -> torch.Tensor:
    with torch.inference_mode():
        return causal_states(teacher, batch).clone()
