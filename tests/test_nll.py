"""Held-out suffix NLL: both model kinds are scored on the same suffix tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import encdec
from encdec.errors import EncdecError
from encdec.evaluation.nll import (
    PrefixSuffix,
    decoder_only_position_nll,
    decoder_only_suffix_nll,
    encdec_position_nll,
    encdec_suffix_nll,
)


def test_nll_matches_a_plain_computation(sources):
    g = torch.Generator().manual_seed(4)
    data = PrefixSuffix(torch.randint(3, 96, (5, 6), generator=g), torch.randint(3, 96, (5, 4), generator=g))
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    source = tf.AutoModelForCausalLM.from_pretrained(str(sources["gemma3"])).eval()
    with torch.no_grad():
        dec_in = torch.cat([torch.full((5, 1), 2), data.suffix[:, :-1]], 1)
        logp = model(data.prefix, decoder_input_ids=dec_in).logits.log_softmax(-1)
        per_token = -logp.gather(-1, data.suffix[..., None])[..., 0]
        expected = per_token.mean().item()
        full = source(input_ids=torch.cat([data.prefix, data.suffix], 1)).logits
        expected_src = F.cross_entropy(full[:, 5:-1].flatten(0, 1), data.suffix.flatten()).item()
        per_token_src = F.cross_entropy(full[:, 5:-1].transpose(1, 2), data.suffix, reduction="none")
    assert abs(encdec_suffix_nll(model, data, batch_size=2) - expected) < 1e-5
    assert abs(decoder_only_suffix_nll(source, data, batch_size=3) - expected_src) < 1e-5
    # by position: the mean over the passages at each suffix position, batches of any size
    assert torch.allclose(encdec_position_nll(model, data, batch_size=2).float(), per_token.mean(0), atol=1e-5)
    assert torch.allclose(decoder_only_position_nll(source, data, batch_size=3).float(), per_token_src.mean(0), atol=1e-5)


def test_a_framed_continuation_is_scored_on_the_same_suffix_tokens(sources):
    """UL2's framing adds a sentinel after the prompt and after the decoder's start; the NLL and the task scorer
    both score only the suffix, and agree with a plain forward pass of the framed rows."""
    from encdec.evaluation.scoring import Scorer
    from encdec.objectives import Framing

    g = torch.Generator().manual_seed(5)
    data = PrefixSuffix(torch.randint(3, 96, (4, 6), generator=g), torch.randint(3, 96, (4, 3), generator=g))
    data.prefix[:, 0] = 2  # BOS first, as split_passages tokenizes
    framing = Framing(before=(7,), after=(5,), decoder=(5,))
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    with torch.no_grad():
        enc = torch.cat([data.prefix[:, :1], torch.full((4, 1), 7), data.prefix[:, 1:], torch.full((4, 1), 5)], 1)
        dec = torch.cat([torch.tensor([[2, 5]]).expand(4, -1), data.suffix[:, :-1]], 1)
        logp = model(enc, decoder_input_ids=dec).logits[:, 1:].log_softmax(-1)
        per_token = -logp.gather(-1, data.suffix[..., None])[..., 0]
    framed = encdec_position_nll(model, data, batch_size=3, framing=framing).float()
    assert torch.allclose(framed, per_token.mean(0), atol=1e-5)
    assert not torch.allclose(encdec_position_nll(model, data, batch_size=3).float(), framed, atol=1e-3)
    scorer = Scorer("tiny", "encoder-decoder", model, tokenizer=None, framing=framing)
    scores = scorer.loglikelihoods([(row.tolist(), cont.tolist()) for row, cont in zip(data.prefix, data.suffix)], 3)
    assert [s for s, _ in scores] == pytest.approx((-per_token.sum(1)).tolist(), abs=1e-4)


def test_perplexity_scores_every_token_of_a_text_longer_than_max_len_once(sources, monkeypatch):
    """A text was cut at --max-len and its rest dropped: the perplexity then depended on --max-len and covered other
    tokens in every run. Now windows of max_len tokens each score what the one before did not; a text that fits is
    scored as before, in one pass."""
    from encdec.evaluation import nll
    from encdec.sources import load_tokenizer

    source = tf.AutoModelForCausalLM.from_pretrained(str(sources["gemma3"])).eval()
    tokenizer = load_tokenizer(sources["gemma3"])
    text = " ".join(f"w{i % 40}" for i in range(30))
    n = len(tokenizer(text).input_ids)
    windows, scored = [], []
    forward, cross_entropy = source.forward, F.cross_entropy
    monkeypatch.setattr(source, "forward", lambda input_ids, **kw: windows.append(input_ids.shape[1])
                        or forward(input_ids=input_ids, **kw))
    monkeypatch.setattr(nll.F, "cross_entropy", lambda logits, targets, **kw: scored.append(len(targets))
                        or cross_entropy(logits, targets, **kw))
    windows_of = nll.decoder_only_perplexity  # (`nll` is a number below)
    windowed = nll.decoder_only_perplexity(source, tokenizer, [text], max_len=8)
    assert n > 16 and sum(scored) == n - 1 and max(windows) == 8 and len(windows) > 2
    whole = nll.decoder_only_perplexity(source, tokenizer, [text], max_len=n)
    assert windows[-1] == n and scored[-1] == n - 1
    with torch.no_grad():
        ids = torch.tensor([tokenizer(text).input_ids])
        expected = torch.exp(cross_entropy(source(input_ids=ids).logits[0, :-1], ids[0, 1:])).item()
        # token by token: each token t scored once, in the window that ends first past it, read after the BOS and
        # the window's other tokens before t
        tokens, ends, nll = ids[0].tolist(), sorted({8, *range(12, n, 4), n}), 0.0
        for end, done in zip(ends, [1, *ends[:-1]]):
            begin = max(0, end - 8)
            window = tokens[:1] + tokens[begin + 1: end] if begin else tokens[:end]
            logits = source(input_ids=torch.tensor([window])).logits[0]
            nll += sum(cross_entropy(logits[t - begin - 1], torch.tensor(tokens[t])).item() for t in range(done, end))
    assert abs(whole - expected) < 1e-4 * expected and windowed != whole
    assert windowed == pytest.approx(math.exp(nll / (n - 1)), rel=1e-4)
    with pytest.raises(EncdecError, match="no text has the 2 tokens perplexity needs"):  # a ZeroDivisionError
        windows_of(source, tokenizer, [""])  # its BOS alone


def test_the_perplexity_of_a_diverged_model_is_infinite_not_an_overflow(sources):
    """A mean NLL above about 710 nats (a checkpoint that diverged) overflowed `math.exp` into a traceback that lost
    the model's other scored tasks; it reads as infinite, which the results file and table write."""
    from encdec.evaluation.nll import decoder_only_perplexity
    from encdec.sources import load_tokenizer

    source = tf.AutoModelForCausalLM.from_pretrained(str(sources["llama"])).eval()
    with torch.no_grad():
        source.lm_head.weight.mul_(20_000)
    text = " ".join(f"w{i % 40}" for i in range(30))
    assert decoder_only_perplexity(source, load_tokenizer(sources["llama"]), [text]) == float("inf")
    with torch.no_grad():  # NaN logits: not a number, not a model that diverged
        source.lm_head.weight.fill_(float("nan"))
    assert math.isnan(decoder_only_perplexity(source, load_tokenizer(sources["llama"]), [text]))
