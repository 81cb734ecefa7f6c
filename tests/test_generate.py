"""Generation: the cached path equals the uncached one; batching, EOS and sampling options."""

from __future__ import annotations

import pytest
import torch

import encdec
from encdec.errors import EncdecError


@pytest.fixture(scope="module", params=[("gemma3", "merged"), ("gemma2", "cross")], ids=["merged", "cross"])
def model(request, sources):
    family, attention = request.param
    return encdec.adapt(encdec.load_source(str(sources[family])), attention=attention)


def _prompts():
    ids = torch.randint(3, 96, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, :3] = 0  # left padding works too
    return ids, mask


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 3}])
def test_cached_equals_uncached(model, sampling):
    ids, mask = _prompts()
    cached = model.generate(ids, mask, max_new_tokens=12, eos_token_ids=[-1], **sampling)
    uncached = model.generate(ids, mask, max_new_tokens=12, eos_token_ids=[-1], use_cache=False, **sampling)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, uncached)


def test_batched_equals_one_by_one(model):
    ids, mask = _prompts()
    batched = model.generate(ids, mask, max_new_tokens=8, eos_token_ids=[-1])
    for row in range(3):
        keep = mask[row].bool()
        alone = model.generate(ids[row][keep][None], max_new_tokens=8, eos_token_ids=[-1])
        assert torch.equal(alone[0], batched[row])


def test_stops_at_eos_and_pads_after(model):
    ids, mask = _prompts()
    free = model.generate(ids, mask, max_new_tokens=10, eos_token_ids=[-1])
    eos = int(free[0, 2])
    out = model.generate(ids, mask, max_new_tokens=10, eos_token_ids=[eos])
    first = (free == eos).int().argmax(1)
    for row in range(3):
        if (free[row] == eos).any():
            end = int(first[row])
            assert torch.equal(out[row, : end + 1], free[row, : end + 1])
            assert (out[row, end + 1 :] == model.config.pad_token_id).all()
    if all((free[r] == eos).any() for r in range(3)):
        assert out.shape[1] == int(first.max()) + 1


def test_sampling_options(model):
    ids, mask = _prompts()
    greedy = model.generate(ids, mask, max_new_tokens=6, eos_token_ids=[-1])
    top1 = model.generate(ids, mask, max_new_tokens=6, eos_token_ids=[-1], do_sample=True, top_k=1, seed=0)
    assert torch.equal(greedy, top1)
    a = model.generate(ids, mask, max_new_tokens=10, eos_token_ids=[-1], do_sample=True, seed=1, temperature=2.0)
    b = model.generate(ids, mask, max_new_tokens=10, eos_token_ids=[-1], do_sample=True, seed=1, temperature=2.0)
    c = model.generate(ids, mask, max_new_tokens=10, eos_token_ids=[-1], do_sample=True, seed=2, temperature=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"do_sample": True, "temperature": 0.0}, {"top_p": 1.5}, {"top_k": 0}])
def test_bad_generation_options(model, bad):
    ids, mask = _prompts()
    with pytest.raises(EncdecError):
        model.generate(ids, mask, **{"max_new_tokens": 4, **bad})
