"""Chunked cross-entropy and distillation; the teacher reads exactly what the student predicts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import encdec
from encdec.model import Segments, lm_logits
from encdec.objectives import Example
from encdec.training.data import make_batch
from encdec.training.loss import Distillation, TiedLookups, chunked_loss, kl_to_teacher
from encdec.training.step import LossModule, teacher_states
from encdec.training.teacher import load_teacher


def _head(weight):
    return lambda h: h @ weight.T


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_cross_entropy_and_gradients_equal_the_plain_ones(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (30,), generator=g)
    parts = chunked_loss(hidden, weight, labels, chunk=chunk)
    parts.loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    F.cross_entropy(hidden @ weight.T, labels).backward()
    assert abs(parts.ce - F.cross_entropy(hidden @ weight.T, labels).item()) < 1e-5
    assert torch.allclose(got[0], hidden.grad, atol=1e-6) and torch.allclose(got[1], weight.grad, atol=1e-6)


def _reference_loss(hidden, weight, labels, softcap, teacher_logits, mask, d):
    """The loss written plainly: full logits, autograd through log-softmax."""
    logits = hidden @ weight.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    ce = F.cross_entropy(logits, labels)
    if d is None:
        return ce
    kl = kl_to_teacher(logits[mask], teacher_logits[mask], d.tau, d.top_k) / int(mask.sum())
    return d.alpha * kl * d.tau**2 + (1 - d.alpha) * ce


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("distillation", [None, Distillation(alpha=0.3, tau=2.0), Distillation(alpha=0.7, tau=1.0, top_k=4)])
def test_fused_loss_and_gradients_equal_autograd_through_the_plain_formula(softcap, distillation):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(23, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)
    teacher_weight = torch.randn(40, 6, generator=g)
    teacher_hidden = torch.randn(23, 6, generator=g)
    labels = torch.randint(0, 40, (23,), generator=g)
    mask = torch.rand(23, generator=g) > 0.3
    teacher = dict(teacher_hidden=teacher_hidden, teacher_head=_head(teacher_weight), distill_mask=mask,
                   distillation=distillation) if distillation else {}
    parts = chunked_loss(hidden * 1.0, weight, labels, chunk=5, softcap=softcap, **teacher)
    (2.5 * parts.loss).backward()  # an upstream gradient other than 1 is passed through
    got = parts.loss.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = _reference_loss(hidden, weight, labels, softcap, teacher_hidden @ teacher_weight.T, mask, distillation)
    (2.5 * expected).backward()
    assert torch.allclose(got[0], expected.detach(), atol=1e-5)
    assert torch.allclose(got[1], hidden.grad, atol=1e-5) and torch.allclose(got[2], weight.grad, atol=1e-5)
    assert parts.kl is None if distillation is None else parts.kl > 0


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("distillation", [None, Distillation(alpha=0.3, tau=2.0), Distillation(alpha=0.7, tau=1.0, top_k=4)])
def test_negatives_join_the_softmax_with_their_offset(softcap, distillation):
    """Sampled untrained rows (trimmed vocabularies): the loss over [head rows | negatives], each negative's
    logit raised by the offset after the cap and after the temperature; the negatives take no gradient."""
    from encdec.training.vocab import Negatives

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(19, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    rows = torch.randn(12, 8, generator=g)
    teacher_weight, teacher_rows = torch.randn(30, 6, generator=g), torch.randn(12, 6, generator=g)
    teacher_hidden = torch.randn(19, 6, generator=g)
    labels = torch.randint(0, 30, (19,), generator=g)
    mask = torch.rand(19, generator=g) > 0.3
    offset = 1.7
    negatives = Negatives(rows, teacher_rows, softcap, offset)
    teacher = dict(teacher_hidden=teacher_hidden, distill_mask=mask, distillation=distillation,
                   teacher_head=lambda h: lm_logits(h, teacher_weight, softcap)) if distillation else {}
    parts = chunked_loss(hidden * 1.0, weight, labels, chunk=6, softcap=softcap, negatives=negatives, **teacher)
    parts.loss.backward()
    got = parts.loss.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    def capped(h, w):
        out = h @ w.T
        return out if softcap is None else torch.tanh(out / softcap) * softcap

    raised = torch.cat([torch.zeros(30), torch.full((12,), offset)])
    logits = capped(hidden, torch.cat([weight, rows]))
    expected = F.cross_entropy(logits + raised, labels)
    if distillation is not None:
        d = distillation
        t = capped(teacher_hidden, torch.cat([teacher_weight, teacher_rows]))
        # kl_to_teacher divides by tau: an offset of tau * o before it is o after it
        kl = kl_to_teacher((logits + d.tau * raised)[mask], (t + d.tau * raised)[mask], d.tau, d.top_k) / int(mask.sum())
        expected = d.alpha * kl * d.tau**2 + (1 - d.alpha) * expected
    expected.backward()
    assert torch.allclose(got[0], expected.detach(), atol=1e-5)
    assert torch.allclose(got[1], hidden.grad, atol=1e-5) and torch.allclose(got[2], weight.grad, atol=1e-5)


def test_untrained_rows_are_sampled_reproducibly_without_replacement():
    from encdec.training.vocab import UntrainedRows

    rows = torch.arange(50.0)[:, None].expand(50, 3)
    untrained = UntrainedRows(rows, sample_size=10, seed=0)
    a, b = untrained.sample(5, 0), untrained.sample(5, 0)
    assert torch.equal(a.rows, b.rows) and not torch.equal(a.rows, untrained.sample(6, 0).rows)
    assert not torch.equal(a.rows, untrained.sample(5, 1).rows)  # each micro-batch of a step its own negatives
    assert len(set(a.rows[:, 0].tolist())) == 10 and abs(a.offset - math.log(5)) < 1e-12
    assert untrained.every().offset == 0 and len(untrained.every().rows) == 50
    assert UntrainedRows(rows, sample_size=0, seed=0).sample(1, 0) is None


def test_fused_loss_skips_the_gradients_nobody_needs_and_runs_under_bfloat16_autocast():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(12, 8, generator=g, requires_grad=True), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (12,), generator=g)
    chunked_loss(hidden, weight, labels, chunk=4).loss.backward()  # a frozen head: only the states get a gradient
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        assert not chunked_loss(hidden, weight, labels, chunk=4).loss.requires_grad
    weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = chunked_loss(hidden.bfloat16(), weight, labels, chunk=4)
    parts.loss.backward()
    assert weight.grad.dtype == torch.float32
    assert abs(parts.ce - F.cross_entropy(hidden @ weight.T, labels).item()) < 0.05


def test_fused_loss_under_no_grad_computes_only_the_logits():
    """Held-out batches are scored under no_grad with a head that requires a gradient: the function's
    needs_input_grad still says True there, and every evaluation made an embedding-sized gradient and two
    more vocabulary-sized products per chunk, then dropped them."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(12, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (12,), generator=g)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        parts = chunked_loss(hidden, weight, labels, chunk=4)
    assert flops.get_total_flops() == 2 * 12 * 30 * 8  # the logits' product alone
    assert abs(parts.ce - F.cross_entropy(hidden @ weight.T, labels).item()) < 1e-5
    with FlopCounterMode(display=False) as flops:
        chunked_loss(hidden, weight, labels, chunk=4)
    assert flops.get_total_flops() > 2 * 2 * 12 * 30 * 8  # and the gradients' products when they are wanted


def _tied_step(weight, mix, enc_ids, dec_ids, labels, tied, scale):
    """A toy encoder-decoder on a tied table: the head reads states built from two lookups in it;
    without `tied`, plain lookups and the plain formula through autograd."""
    lookup = tied if tied is not None else (lambda ids: F.embedding(ids, weight))
    hidden = torch.tanh(lookup(dec_ids) @ mix + lookup(enc_ids).mean(0))
    if tied is not None:
        loss = chunked_loss(hidden, weight, labels, chunk=4, softcap=2.0, tied=tied).loss
    else:
        loss = _reference_loss(hidden, weight, labels, 2.0, None, None, None) if len(labels) else hidden.sum() * 0
    (scale * loss).backward()


@pytest.mark.parametrize("targets", [9, 0])
def test_tied_lookups_give_the_gradient_autograd_gives_once_per_backward(targets):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    mix = torch.randn(8, 8, generator=g, requires_grad=True)
    enc_ids, dec_ids = torch.randint(0, 30, (6,), generator=g), torch.randint(0, 30, (9,), generator=g)
    dec_ids = dec_ids[:targets]
    labels = torch.randint(0, 30, (targets,), generator=g)
    arrivals = []
    weight.register_hook(lambda grad: arrivals.append(grad.clone()))
    for _ in range(2):  # two backward passes accumulate, as gradient accumulation does
        _tied_step(weight, mix, enc_ids, dec_ids, labels, TiedLookups(weight), scale=0.37)
    got = weight.grad.clone(), mix.grad.clone()
    assert len(arrivals) == 2 and torch.allclose(arrivals[0] + arrivals[1], got[0])  # whole, once per backward
    weight.grad = mix.grad = None
    for _ in range(2):
        _tied_step(weight, mix, enc_ids, dec_ids, labels, None, scale=0.37)
    assert torch.allclose(got[0], weight.grad, atol=1e-6) and torch.allclose(got[1], mix.grad, atol=1e-6)


# one table for both stacks, or two; and the families without Gemma's norms (biases and an untied head in Qwen2)
@pytest.mark.parametrize("names", [["gemma3"], ["gemma2-small", "gemma2"], ["llama"], ["qwen2"]])
def test_loss_module_gradients_equal_autograd_through_plain_lookups_and_logits(sources, names):
    model = encdec.adapt(*[encdec.load_source(str(sources[name])) for name in names])
    examples = [Example([2, 30, 31, 32], [40, 41, 1]), Example([2, 50], [60, 61, 62, 1])]
    batch = make_batch(examples, enc_len=5, dec_len=5, pad_id=0, bos_id=2, with_teacher=False)
    LossModule(model, chunk=3, distillation=None)(batch).loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    r = batch.rows
    logits = model(r.input_ids, decoder_input_ids=r.decoder_input_ids, segment_ids=r.segment_ids, positions=r.positions,
                   decoder_segment_ids=r.decoder_segment_ids, decoder_positions=r.decoder_positions).logits
    F.cross_entropy(logits.flatten(0, 1), r.labels.flatten(), ignore_index=-100).backward()
    assert (model.encoder_embed is None) == (len(names) == 1)
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_distillation_is_cross_entropy_at_alpha_zero_and_zero_kl_for_the_teacher_itself():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(20, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (20,), generator=g)
    teacher = torch.randn(20, 8, generator=g)
    mask = torch.ones(20, dtype=torch.bool)
    ce = chunked_loss(hidden, weight, labels, chunk=6).loss
    at_zero = chunked_loss(hidden, weight, labels, chunk=6, teacher_hidden=teacher, teacher_head=_head(weight),
                           distill_mask=mask, distillation=Distillation(alpha=0.0, tau=2.0))
    assert torch.allclose(at_zero.loss, ce) and at_zero.kl > 0
    for top_k in (0, 5):
        same = chunked_loss(hidden, weight, labels, chunk=6, teacher_hidden=hidden, teacher_head=_head(weight),
                            distill_mask=mask, distillation=Distillation(alpha=1.0, tau=2.0, top_k=top_k))
        # the teacher's top k renormalised: what remains is the log of the probability mass the k leave out
        kept = torch.softmax(hidden @ weight.T / 2.0, -1).topk(top_k, -1).values.sum(-1) if top_k else torch.ones(20)
        assert abs(same.kl - (-kept.log().mean())) < 1e-5 and (top_k == 0 or same.kl > 0.1)
    logits = torch.randn(4, 10, generator=g)
    expected = F.kl_div(F.log_softmax(logits.flip(0) / 2, -1), F.log_softmax(logits / 2, -1), log_target=True,
                        reduction="sum")
    assert torch.allclose(kl_to_teacher(logits.flip(0), logits, tau=2.0, top_k=0), expected, atol=1e-5)


def test_a_documents_end_inside_the_targets_is_distilled_and_the_eos_ending_a_cut_window_is_not(sources):
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    teacher = load_teacher(str(sources["gemma3"]), 96, torch.float32, torch.device("cpu"))
    eos = model.config.eos_token_ids[0]
    examples = [Example([2, 30, eos, 31], [40, eos, 41, eos]), Example([2, 50], [60, eos])]
    batch = make_batch(examples, enc_len=6, dec_len=6, pad_id=0, bos_id=2, with_teacher=True)  # the last slot filled
    module = LossModule(model, chunk=3, distillation=Distillation(alpha=1.0, tau=1.0))
    module.teacher_head = teacher.logits
    r = batch.rows
    r.labels[0, 2] = -100  # 41 unscored, as outside a trimmed vocabulary: the example goes on
    with torch.no_grad():
        parts = module(batch, teacher_states(teacher, batch))
        logits = model(r.input_ids, decoder_input_ids=r.decoder_input_ids, segment_ids=r.segment_ids,
                       positions=r.positions, decoder_segment_ids=r.decoder_segment_ids,
                       decoder_positions=r.decoder_positions).logits[r.labels != -100]
        teacher_logits = teacher.logits(teacher_states(teacher, batch))
    per_token = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                         reduction="none").sum(-1)
    distilled = torch.tensor([True, True, False, True, False])  # the first example's second target: an EOS
    assert abs(parts.kl - per_token[distilled].mean().item()) < 1e-5
    assert module.target_counts([batch, batch]) == (10, 6)


def test_a_teacher_of_another_tokenizer_with_a_table_of_the_same_size_is_refused(sources, tmp_path):
    """Llama 2 and Mistral both have 32,000 tokens, spelt differently: only the table's size was compared, so the
    teacher's distribution over its token i was distilled into the student's token i."""
    from tiny import make_source

    from encdec.errors import EncdecError
    from encdec.sources import load_tokenizer

    student = load_tokenizer(sources["gemma3"])
    other = make_source(tmp_path / "other", "gemma3", reserved=False)  # 96 tokens too, other words at 4-27
    with pytest.raises(EncdecError, match="has another tokenizer than the student's"):
        load_teacher(str(other), 96, torch.float32, torch.device("cpu"), student)
    teacher = load_teacher(str(sources["gemma3"]), 96, torch.bfloat16, torch.device("cpu"), student)
    assert teacher.embed.weight.dtype == torch.bfloat16 and teacher.embed.num_embeddings == 96


def test_a_student_with_ul2_tokens_added_to_its_teachers_vocabulary(tmp_path):
    """UL2 on a vocabulary that reserves no tokens adds its mode tokens and sentinels to the student's tokenizer: a
    PrefixLM run distilling from the source afterwards was refused as having "another tokenizer". In spare rows of
    the teacher's table it distills; in a grown table it is refused, saying why."""
    import copy

    from tiny import make_source

    from encdec.errors import EncdecError
    from encdec.sources import load_tokenizer

    source = make_source(tmp_path / "llama", "llama", vocab_size=100)  # a 96-token tokenizer, 4 spare rows
    student = copy.deepcopy(load_tokenizer(source))
    student.add_tokens(["[NLU]", "[NLG]"], special_tokens=True)
    teacher = load_teacher(str(source), 100, torch.float32, torch.device("cpu"), student)
    assert teacher.embed.num_embeddings == 100
    student.add_tokens(["[S2S]", "<extra_id_0>", "<extra_id_1>"], special_tokens=True)  # ids 96-100: one past the table
    with pytest.raises(EncdecError, match=r"adds 5 token\(s\) to teacher .*\(such as \[NLU\].* 1 in rows its 100-row "
                                          "table does not have"):
        load_teacher(str(source), 101, torch.float32, torch.device("cpu"), student)


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen2"])
def test_teacher_states_predict_each_target_like_the_source_model(sources, family):
    teacher = load_teacher(str(sources[family]), 96, torch.float32, torch.device("cpu"))
    source = tf.AutoModelForCausalLM.from_pretrained(str(sources[family])).eval()
    examples = [Example([2, 30, 31, 32], [40, 41, 1]), Example([2, 50], [60, 61, 62, 1]), Example([2, 70, 71], [72, 1])]
    batch = make_batch(examples, enc_len=6, dec_len=7, pad_id=0, bos_id=2, with_teacher=True)
    states = teacher_states(teacher, batch)
    logits = teacher.logits(states)
    row = 0
    labels = batch.rows.labels[batch.rows.labels != -100]
    assert len(labels) == len(states) == sum(len(e.targets) for e in examples)
    for example in examples:
        ids = torch.tensor([example.inputs + example.targets[:-1]])
        with torch.no_grad():
            ref = source(input_ids=ids).logits[0, len(example.inputs) - 1 :]
        assert torch.allclose(logits[row : row + len(example.targets)], ref, atol=1e-4)
        row += len(example.targets)
    with torch.no_grad():
        plain = teacher.hidden(torch.tensor([[2, 30, 31]]), Segments.of(torch.tensor([[2, 30, 31]]), None, None, None))
    assert plain.shape == (1, 3, 32)
