"""What one training step computes: the student's forward pass and its fused head loss, wrapped as
one module (so that DDP / FSDP2 wrap everything a step touches), and the teacher's states."""

from __future__ import annotations

import torch
from torch import nn

from encdec.model import CausalLM, EncoderDecoder, EncoderState, Segments
from encdec.training.data import Batch
from encdec.training.loss import Distillation, LossParts, chunked_loss, routed, tied_lookups
from encdec.training.vocab import Negatives


class LossModule(nn.Module):
    """Student forward and chunked loss as one module, so that DDP / FSDP2 wrap all a step touches."""

    def __init__(self, model: EncoderDecoder, chunk: int, distillation: Distillation | None) -> None:
        super().__init__()
        self.model, self.chunk, self.distillation = model, chunk, distillation
        self.teacher_head = None

    def forward(self, batch: Batch, teacher_hidden: torch.Tensor | None = None,
                negatives: Negatives | None = None) -> LossParts:
        r, model = batch.rows, self.model
        tied = tied_lookups(model.embed.weight) if model.config.tied_head else None
        with routed(tied, model.embed):
            enc_seg = Segments(r.segment_ids, r.positions)
            encoder = EncoderState(model.encode_segments(r.input_ids, enc_seg), enc_seg)
            hidden = model.decode(r.decoder_input_ids, encoder, Segments(r.decoder_segment_ids, r.decoder_positions))
        targets = r.labels != -100
        labels = r.labels[targets]
        distill_mask = None
        if teacher_hidden is not None:  # the teacher cannot know where a window was cut: no KL on the EOS target
            distill_mask = labels != self.model.config.eos_token_ids[0]
        return chunked_loss(hidden[targets], model.head_weight, labels, chunk=self.chunk,
                            softcap=self.model.config.final_logit_softcap, teacher_hidden=teacher_hidden,
                            teacher_head=self.teacher_head, distill_mask=distill_mask, distillation=self.distillation,
                            tied=tied, negatives=negatives)


class CausalLossModule(nn.Module):
    """A decoder-only model trained on the same examples: it reads each example's inputs + targets
    causally (the teacher's packed rows) and is scored on the target tokens only."""

    def __init__(self, model: CausalLM, chunk: int) -> None:
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, batch: Batch, teacher_hidden: torch.Tensor | None = None) -> LossParts:
        labels = batch.rows.labels[batch.rows.labels != -100]
        tied = tied_lookups(self.model.embed.weight) if self.model.lm_head is None else None
        with routed(tied, self.model.embed):
            hidden = causal_states(self.model, batch)
        return chunked_loss(hidden, self.model.head_weight, labels, chunk=self.chunk,
                            softcap=self.model.final_logit_softcap, tied=tied)


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
