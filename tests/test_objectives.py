"""Pre-training objectives (encdec.objectives): PrefixLM, span corruption, UL2 mixtures, special tokens, packing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from encdec.objectives import (
    MIXTURES,
    MODE_TOKENS,
    PLAIN,
    T5GEMMA2_MIXTURE,
    UL2_MIXTURE,
    Denoiser,
    Example,
    Framing,
    Mixture,
    apply_denoiser,
    continuation_framing,
    pack,
    prefix_lm,
    span_corruption,
    too_few_sentinels,
    special_token_ids,
    trained_framing,
)
from encdec.training.data import example_maker, window_length

PAD, EOS, BOS = 0, 1, 2
MODE_IDS = {"[NLU]": 10, "[NLG]": 11, "[S2S]": 12}
SENTINELS = list(range(100, 400))
TOKEN = st.integers(1000, 1999)  # ordinary tokens never collide with the special ids above
SEED = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=100, deadline=None)


def denoise(tokens, mixture, *, rng, **options):
    """One example from a mixture: its denoiser drawn, then applied, as the UL2 data pipeline does."""
    return apply_denoiser(tokens, mixture.draw(rng), rng=rng, **options)


def _expected_counts(length: int, rate: float, mean_span: float | None, n_sentinels: int) -> tuple[int, int]:
    """T5's noise-token and span counts, computed independently of the implementation."""
    num_noise = min(max(round(length * rate), 1), length - 1)
    num_spans = 1 if mean_span is None else round(num_noise / mean_span)
    return num_noise, max(1, min(num_spans, num_noise, length - num_noise, n_sentinels))


def _noise_spans(targets: list[int], sentinels: set[int]) -> list[tuple[int, list[int]]]:
    """(sentinel, span) pairs of a span-corruption target, in order; checks it ends with one EOS."""
    assert targets[-1] == EOS and EOS not in targets[:-1]
    spans: list[tuple[int, list[int]]] = []
    for t in targets[:-1]:
        if t in sentinels:
            spans.append((t, []))
        else:
            assert spans, "targets must start with a sentinel"
            spans[-1][1].append(t)
    return spans


def _reconstruct(inputs: list[int], targets: list[int], sentinels: set[int]) -> list[int]:
    """The original sequence: every sentinel in the inputs replaced by the span that follows it in the targets."""
    spans = dict(_noise_spans(targets, sentinels))
    return [tok for t in inputs for tok in (spans[t] if t in sentinels else [t])]


# --- PrefixLM ----------------------------------------------------------------------------------------------------


@FAST
@given(st.lists(TOKEN, min_size=2, max_size=200))
def test_prefix_lm_even_split(tokens):
    ex = prefix_lm(tokens, eos_id=EOS)
    assert len(ex.inputs) == len(tokens) // 2
    assert len(ex.targets) == len(tokens) - len(tokens) // 2 + 1
    assert ex.inputs + ex.targets[:-1] == tokens
    assert ex.targets[-1] == EOS


@FAST
@given(st.lists(TOKEN, min_size=2, max_size=200), SEED)
def test_prefix_lm_random_split_in_range(tokens, seed):
    ex = prefix_lm(tokens, eos_id=EOS, rng=np.random.default_rng(seed))
    assert 1 <= len(ex.inputs) <= len(tokens) - 1
    assert ex.inputs + ex.targets[:-1] == tokens
    assert ex.targets[-1] == EOS


def test_prefix_lm_random_split_covers_every_point():
    rng = np.random.default_rng(0)
    splits = Counter(len(prefix_lm([1000] * 5, eos_id=EOS, rng=rng).inputs) for _ in range(2000))
    assert set(splits) == {1, 2, 3, 4}
    assert all(abs(n / 2000 - 0.25) < 0.05 for n in splits.values())


@FAST
@given(st.lists(TOKEN, min_size=2, max_size=200), SEED, st.integers(1, 64))
def test_prefix_lm_long_prefix_keeps_the_tokens_the_targets_continue(tokens, seed, max_inputs):
    """A cut prefix keeps its end: the encoder's last token is the one right before the first target."""
    whole = prefix_lm(tokens, eos_id=EOS, rng=np.random.default_rng(seed))
    cut = prefix_lm(tokens, eos_id=EOS, rng=np.random.default_rng(seed), max_inputs=max_inputs)
    assert cut.targets == whole.targets
    assert cut.inputs == whole.inputs[-max_inputs:]
    assert cut.inputs + cut.targets[:-1] == tokens[len(tokens) - len(cut.targets) + 1 - len(cut.inputs):]


@FAST
@given(st.lists(TOKEN, min_size=2, max_size=200), SEED, st.integers(1, 64))
def test_prefix_lm_long_continuation_keeps_its_start_and_the_eos(tokens, seed, max_targets):
    whole = prefix_lm(tokens, eos_id=EOS, rng=np.random.default_rng(seed))
    cut = prefix_lm(tokens, eos_id=EOS, rng=np.random.default_rng(seed), max_targets=max_targets)
    assert cut.inputs == whole.inputs
    assert cut.targets == whole.targets[:-1][:max_targets] + [EOS]


@FAST
@given(st.lists(TOKEN, min_size=2, max_size=200), SEED, st.integers(2, 64))
def test_s_denoiser_prefix_fits_with_its_mode_token(tokens, seed, max_inputs):
    s_only = Mixture((Denoiser(rate=0.25, mean_span=None, mode="[S2S]", prefix_lm=True),), (1.0,))
    ex = denoise(tokens, s_only, sentinels=SENTINELS, mode_ids=MODE_IDS, eos_id=EOS, rng=np.random.default_rng(seed),
                 max_inputs=max_inputs)
    assert ex.inputs[0] == MODE_IDS["[S2S]"] and 2 <= len(ex.inputs) <= max_inputs
    assert ex.inputs[1:] + ex.targets[:-1] == tokens[len(tokens) - len(ex.targets) + 2 - len(ex.inputs):]


def test_stream_random_split_prefixes_end_where_targets_start():
    """Through the training stream's example maker: short prefixes occur, and long ones lose their start, not
    the tokens next to the targets (a head cut to the encoder's length left a gap before the continuation)."""
    window = list(range(1000, 1126))  # consecutive ids: contiguity is visible
    make = example_maker("prefixlm", eos_id=EOS, vocab={}, enc_len=64, dec_len=64, random_split=True)
    rng = np.random.default_rng(0)
    examples = [make(window, rng) for _ in range(500)]
    assert min(len(ex.inputs) for ex in examples) < 8 and max(len(ex.inputs) for ex in examples) == 64
    assert all(ex.inputs[-1] + 1 == ex.targets[0] for ex in examples)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(MIXTURES)), st.integers(8, 128), st.integers(8, 128), SEED)
def test_ul2_examples_fit_their_row_whole(mixture, enc_len, dec_len, seed):
    """Whatever the encoder and decoder lengths, a UL2 example fits as made: every sentinel of its targets is in
    its inputs (cutting an overlong example's inputs left targets whose spans had no place in the encoder)."""
    vocab = {f"<unused{k}>": 100 + k for k in range(300)}
    make = example_maker("ul2", eos_id=EOS, vocab=vocab, enc_len=enc_len, dec_len=dec_len, bos_id=BOS, mixture=mixture)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        start = int(rng.integers(1000, 5000))  # ordinary tokens, apart from the special ids
        ex = make(list(range(start, start + window_length("ul2", enc_len, dec_len))), rng)
        assert ex.inputs[0] == BOS and len(ex.inputs) <= enc_len and len(ex.targets) <= dec_len
        assert {t for t in ex.targets if 100 <= t < 400} <= set(ex.inputs)


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 128), st.integers(4, 128), SEED)
def test_prefix_lm_random_split_examples_fit_their_row_and_end_with_eos(enc_len, dec_len, seed):
    """A random split of a window that fills a row leaves up to twice the decoder's length to the targets: they
    keep their start and the EOS (the row used to cut them, and the EOS with them, in about half the examples)."""
    make = example_maker("prefixlm", eos_id=EOS, vocab={}, enc_len=enc_len, dec_len=dec_len, bos_id=BOS,
                         random_split=True)
    rng = np.random.default_rng(seed)
    window = list(range(1000, 1000 + window_length("prefixlm", enc_len, dec_len)))
    for _ in range(20):
        ex = make(window, rng)
        assert ex.inputs[0] == BOS and len(ex.inputs) <= enc_len and len(ex.targets) <= dec_len
        assert ex.targets[-1] == EOS and ex.inputs[-1] + 1 == ex.targets[0]


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 128), st.integers(4, 128), st.booleans())
def test_prefix_lm_windows_are_trained_on_whole(enc_len, dec_len, bos):
    """Every token of a PrefixLM window is read by the encoder or predicted by the decoder, whatever the row
    shape: with a leading BOS and a shorter encoder row the window's first token fell out of both."""
    make = example_maker("prefixlm", eos_id=EOS, vocab={}, enc_len=enc_len, dec_len=dec_len,
                         bos_id=BOS if bos else None)
    window = list(range(1000, 1000 + window_length("prefixlm", enc_len, dec_len, bos)))
    ex = make(window, np.random.default_rng(0))
    assert ex.inputs[bos:] + ex.targets[:-1] == window and len(ex.inputs) <= enc_len and len(ex.targets) <= dec_len


@pytest.mark.parametrize("tokens", [[], [1000]])
def test_prefix_lm_too_short(tokens):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        prefix_lm(tokens, eos_id=EOS)


# --- span corruption ---------------------------------------------------------------------------------------------


@FAST
@given(
    tokens=st.lists(TOKEN, min_size=2, max_size=300),
    rate=st.floats(0.01, 0.99),
    mean_span=st.one_of(st.none(), st.floats(1.0, 64.0)),
    n_sentinels=st.integers(1, len(SENTINELS)),
    seed=SEED,
)
def test_span_corruption_properties(tokens, rate, mean_span, n_sentinels, seed):
    sentinels = SENTINELS[:n_sentinels]
    ex = span_corruption(tokens, rate=rate, mean_span=mean_span, sentinels=sentinels, eos_id=EOS,
                         rng=np.random.default_rng(seed))
    num_noise, num_spans = _expected_counts(len(tokens), rate, mean_span, n_sentinels)
    sset = set(sentinels)
    spans = _noise_spans(ex.targets, sset)

    assert sum(len(span) for _, span in spans) == num_noise
    assert len(ex.inputs) == len(tokens) - num_noise + num_spans
    assert len(ex.targets) == num_noise + num_spans + 1
    assert _reconstruct(ex.inputs, ex.targets, sset) == tokens  # nothing lost, nothing duplicated
    assert [t for t in ex.inputs if t in sset] == sentinels[:num_spans]
    assert [s for s, _ in spans] == sentinels[:num_spans]
    assert all(span for _, span in spans)  # noise spans are never empty
    assert ex.inputs[0] == tokens[0] and ex.inputs[0] not in sset  # starts with non-noise
    assert ex.inputs[-1] in sset  # ... and alternates, so it ends with a noise span
    assert not any(a in sset and b in sset for a, b in zip(ex.inputs, ex.inputs[1:]))  # non-noise spans non-empty


@FAST
@given(st.lists(TOKEN, min_size=2, max_size=300), st.floats(0.01, 0.99), SEED)
def test_span_corruption_without_mean_span_is_one_span(tokens, rate, seed):
    ex = span_corruption(tokens, rate=rate, mean_span=None, sentinels=SENTINELS, eos_id=EOS,
                         rng=np.random.default_rng(seed))
    num_noise, _ = _expected_counts(len(tokens), rate, None, len(SENTINELS))
    assert [t for t in ex.inputs if t in SENTINELS] == [SENTINELS[0]]
    assert ex.targets[0] == SENTINELS[0] and len(ex.targets) == num_noise + 2


def test_span_corruption_spans_capped_by_sentinels():
    ex = span_corruption(list(range(1000, 1100)), rate=0.5, mean_span=3, sentinels=[100, 101], eos_id=EOS,
                         rng=np.random.default_rng(0))
    assert ex.targets[0] == 100 and ex.targets.count(101) == 1
    assert len(ex.inputs) == 50 + 2 and len(ex.targets) == 50 + 2 + 1


def test_a_window_wanting_more_spans_than_sentinels_is_said():
    """At the papers' lengths the UL2 mixtures want more spans than a vocabulary's reserved tokens give; their
    spans then grow longer than their mean without a word (the defaults, 64 + 64 tokens, stay under the cap)."""
    assert too_few_sentinels("t5gemma2", 64, 128) == too_few_sentinels("ul2", 64, 128) == []
    said = too_few_sentinels("t5gemma2", 4096, 128)
    assert said == ["UL2 denoiser (mean span 3, rate 0.15) wants 205 spans in a 4096-token window and the vocabulary "
                    "has 128 sentinels: its spans average 4.8 tokens",
                    "UL2 denoiser (mean span 12, rate 0.5) wants 171 spans in a 4096-token window and the vocabulary "
                    "has 128 sentinels: its spans average 16.0 tokens"]
    noise, spans = 614, 128  # what span_corruption draws there: as many spans as sentinels, the noise kept
    ex = span_corruption(list(range(4096)), rate=0.15, mean_span=3, sentinels=list(range(10_000, 10_128)), eos_id=EOS,
                         rng=np.random.default_rng(0))
    assert len(ex.targets) == noise + spans + 1


def test_span_corruption_uses_randomness_and_seed_reproduces():
    tokens = list(range(1000, 1200))

    def run(seed):
        return span_corruption(tokens, rate=0.5, mean_span=5, sentinels=SENTINELS, eos_id=EOS,
                               rng=np.random.default_rng(seed))

    lengths = [len(span) for _, span in _noise_spans(run(0).targets, set(SENTINELS))]
    assert len(lengths) == 20 and len(set(lengths)) > 1  # span lengths vary around the mean of 5
    assert run(0) == run(0)
    assert run(0) != run(1)


def test_span_corruption_span_lengths_are_uniform_compositions():
    # L=8, rate .5, mean 2: 4 noise tokens in 2 spans -> first span 1, 2 or 3 tokens, each with probability 1/3;
    # same for the first non-noise span.
    rng = np.random.default_rng(0)
    noise, keep = Counter(), Counter()
    for _ in range(3000):
        ex = span_corruption(list(range(1000, 1008)), rate=0.5, mean_span=2, sentinels=SENTINELS, eos_id=EOS, rng=rng)
        noise[ex.targets.index(SENTINELS[1]) - 1] += 1
        keep[ex.inputs.index(SENTINELS[0])] += 1
    for counts in (noise, keep):
        assert set(counts) == {1, 2, 3}
        assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in counts.values())


@pytest.mark.parametrize("tokens", [[], [1000]])
def test_span_corruption_too_short(tokens):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        span_corruption(tokens, rate=0.5, mean_span=3, sentinels=SENTINELS, eos_id=EOS, rng=np.random.default_rng(0))


# --- mixtures ------------------------------------------------------------------------------------------------------


def test_mixture_definitions():
    t5g2 = [(d.mean_span, d.rate, d.mode, d.prefix_lm) for d in T5GEMMA2_MIXTURE.denoisers]
    assert t5g2 == [(3, 0.15, None, False), (12, 0.5, None, False), (32, 0.15, None, False), (32, 0.5, None, False),
                    (None, 0.75, None, False)]
    assert T5GEMMA2_MIXTURE.weights == (1, 1, 1, 1, 4)
    ul2 = [(d.mean_span, d.rate, d.mode, d.prefix_lm) for d in UL2_MIXTURE.denoisers]
    assert ul2 == [(3, 0.15, "[NLU]", False), (8, 0.15, "[NLU]", False), (3, 0.5, "[NLG]", False),
                   (8, 0.5, "[NLG]", False), (64, 0.15, "[NLG]", False), (64, 0.5, "[NLG]", False),
                   (None, 0.25, "[S2S]", True)]
    assert UL2_MIXTURE.weights == (1,) * 7
    assert MIXTURES == {"t5gemma2": T5GEMMA2_MIXTURE, "ul2": UL2_MIXTURE}
    assert MODE_TOKENS == ("[NLU]", "[NLG]", "[S2S]")


def test_mixture_and_denoiser_validation():
    with pytest.raises(ValueError):
        Mixture(denoisers=(Denoiser(0.15, 3),), weights=(1.0, 1.0))
    with pytest.raises(ValueError):
        Mixture(denoisers=(Denoiser(0.15, 3),), weights=(0.0,))
    with pytest.raises(ValueError):
        Denoiser(rate=1.5, mean_span=3)
    with pytest.raises(ValueError):
        Denoiser(rate=0.5, mean_span=0)


def test_denoise_sampling_follows_weights():
    mixture = Mixture(denoisers=(Denoiser(0.15, 3, mode="a"), Denoiser(0.5, 8, mode="b"), Denoiser(0.5, None, mode="c")),
                      weights=(1.0, 2.0, 5.0))
    mode_ids = {"a": 10, "b": 11, "c": 12}
    rng = np.random.default_rng(0)
    n = 4000
    counts = Counter(denoise(list(range(1000, 1040)), mixture, sentinels=SENTINELS, mode_ids=mode_ids, eos_id=EOS,
                             rng=rng).inputs[0] for _ in range(n))
    for token, p in zip((10, 11, 12), (1 / 8, 2 / 8, 5 / 8)):
        assert abs(counts[token] / n - p) < 0.03


def test_denoise_t5gemma2_mixture():
    # L=100: the denoisers corrupt 15, 50, 15, 50 and 75 tokens, so the noise count tells the (grouped) denoiser apart.
    tokens = list(range(1000, 1100))
    rng, n, sset = np.random.default_rng(1), 4000, set(SENTINELS)
    noise = Counter()
    for _ in range(n):
        ex = denoise(tokens, T5GEMMA2_MIXTURE, sentinels=SENTINELS, mode_ids=MODE_IDS, eos_id=EOS, rng=rng)
        assert ex.inputs[0] == tokens[0]  # no mode token
        assert _reconstruct(ex.inputs, ex.targets, sset) == tokens
        noise[sum(len(span) for _, span in _noise_spans(ex.targets, sset))] += 1
    assert set(noise) == {15, 50, 75}
    for count, p in ((15, 0.25), (50, 0.25), (75, 0.5)):
        assert abs(noise[count] / n - p) < 0.03


def test_denoise_ul2_prepends_mode_token():
    tokens = list(range(1000, 1200))
    rng, n, sset = np.random.default_rng(2), 2100, set(SENTINELS)
    modes = Counter()
    for _ in range(n):
        ex = denoise(tokens, UL2_MIXTURE, sentinels=SENTINELS, mode_ids=MODE_IDS, eos_id=EOS, rng=rng)
        mode = ex.inputs[0]
        modes[mode] += 1
        if mode == MODE_IDS["[S2S]"]:
            assert not sset & set(ex.inputs + ex.targets)
            assert ex.inputs[1:] + ex.targets[:-1] == tokens and ex.targets[-1] == EOS
        else:
            assert mode in (MODE_IDS["[NLU]"], MODE_IDS["[NLG]"])
            assert _reconstruct(ex.inputs[1:], ex.targets, sset) == tokens
    for name, p in (("[NLU]", 2 / 7), ("[NLG]", 4 / 7), ("[S2S]", 1 / 7)):
        assert abs(modes[MODE_IDS[name]] / n - p) < 0.04


def test_denoise_unknown_mode():
    mixture = Mixture(denoisers=(Denoiser(0.15, 3, mode="[NLU]"),), weights=(1.0,))
    with pytest.raises(ValueError, match="NLU"):
        denoise(list(range(1000, 1010)), mixture, sentinels=SENTINELS, mode_ids={}, eos_id=EOS,
                rng=np.random.default_rng(0))


# --- special tokens --------------------------------------------------------------------------------------------------


def test_special_token_ids_from_unused_tokens():
    rng = np.random.default_rng(0)
    ids = rng.choice(np.arange(50, 300_000), size=12, replace=False).tolist()  # scattered, not sorted
    entries = [(f"<unused{k}>", ids[k]) for k in range(12)]
    entries += [("<pad>", 0), ("<unused>", 1), ("unused5", 2), ("<unused-1>", 3), ("<unused5 >", 4), ("hello", 5)]
    order = rng.permutation(len(entries))
    vocab = dict(entries[i] for i in order)
    mode_ids, sentinels = special_token_ids(vocab)
    assert mode_ids == {"[NLU]": ids[0], "[NLG]": ids[1], "[S2S]": ids[2]}
    assert sentinels == ids[3:]  # ordered by k numerically (<unused10> after <unused9>)


def test_special_token_ids_too_few():
    with pytest.raises(ValueError, match="no reserved tokens"):
        special_token_ids({"<unused0>": 6, "<unused1>": 7, "<unused2>": 8, "<pad>": 0})


# --- packing -----------------------------------------------------------------------------------------------------------


def _segments(ids: torch.Tensor, segment_ids: torch.Tensor) -> list[list[int]]:
    """The tokens of segments 1, 2, ... of one row, after checking they are contiguous, in order, then padding."""
    seg = segment_ids.tolist()
    used = [s for s in seg if s]
    assert seg == used + [0] * (len(seg) - len(used))  # padding only at the end
    assert used == sorted(used) and sorted(set(used)) == list(range(1, len(set(used)) + 1))
    return [[t for t, s in zip(ids.tolist(), seg) if s == k] for k in range(1, len(set(used)) + 1)]


EXAMPLES = st.lists(
    st.builds(Example, inputs=st.lists(TOKEN, min_size=1, max_size=20), targets=st.lists(TOKEN, min_size=1, max_size=20)),
    min_size=1, max_size=30,
)


@FAST
@given(EXAMPLES, st.integers(1, 24), st.integers(1, 24))
def test_pack_properties(examples, enc_len, dec_len):
    p = pack(examples, enc_len=enc_len, dec_len=dec_len, pad_id=PAD, bos_id=BOS)
    rows = p.input_ids.shape[0]
    for t in (p.input_ids, p.segment_ids, p.positions):
        assert t.shape == (rows, enc_len) and t.dtype == torch.long
    for t in (p.decoder_input_ids, p.decoder_segment_ids, p.decoder_positions, p.labels):
        assert t.shape == (rows, dec_len) and t.dtype == torch.long

    placed: list[Example] = []
    row_sizes = []
    for r in range(rows):
        enc = _segments(p.input_ids[r], p.segment_ids[r])
        dec_in = _segments(p.decoder_input_ids[r], p.decoder_segment_ids[r])
        labels = _segments(p.labels[r], p.decoder_segment_ids[r])
        assert len(enc) == len(dec_in) == len(labels) >= 1  # segment k pairs encoder and decoder sides
        for k, (inputs, d, y) in enumerate(zip(enc, dec_in, labels), start=1):
            assert d == [BOS] + y[:-1]
            assert p.positions[r][p.segment_ids[r] == k].tolist() == list(range(len(inputs)))
            assert p.decoder_positions[r][p.decoder_segment_ids[r] == k].tolist() == list(range(len(y)))
            placed.append(Example(inputs, y))
        row_sizes.append((sum(map(len, enc)), sum(map(len, labels)), len(placed)))
    # every example exactly once, in order, truncated only when longer than a row
    assert placed == [Example(e.inputs[:enc_len], e.targets[:dec_len]) for e in examples]
    # greedy: a row was closed only because its successor's first example did not fit
    for enc_used, dec_used, end in row_sizes[:-1]:
        nxt = placed[end]
        assert enc_used + len(nxt.inputs) > enc_len or dec_used + len(nxt.targets) > dec_len

    enc_pad, dec_pad = p.segment_ids == 0, p.decoder_segment_ids == 0
    assert (p.input_ids[enc_pad] == PAD).all() and (p.positions[enc_pad] == 0).all()
    assert (p.decoder_input_ids[dec_pad] == PAD).all() and (p.decoder_positions[dec_pad] == 0).all()
    assert torch.equal(p.labels == -100, dec_pad)
    n_enc = sum(len(e.inputs[:enc_len]) for e in examples)
    n_dec = sum(len(e.targets[:dec_len]) for e in examples)
    assert p.padding_waste() == pytest.approx((1 - n_enc / (rows * enc_len), 1 - n_dec / (rows * dec_len)))


def test_pack_small_example_exactly():
    examples = [Example([1000, 1001], [1002, EOS]), Example([1003], [1004, 1005, EOS]), Example([1006] * 6, [1007])]
    p = pack(examples, enc_len=4, dec_len=5, pad_id=PAD, bos_id=BOS)
    assert p.input_ids.tolist() == [[1000, 1001, 1003, PAD], [1006] * 4]
    assert p.segment_ids.tolist() == [[1, 1, 2, 0], [1, 1, 1, 1]]
    assert p.positions.tolist() == [[0, 1, 0, 0], [0, 1, 2, 3]]
    assert p.decoder_input_ids.tolist() == [[BOS, 1002, BOS, 1004, 1005], [BOS, PAD, PAD, PAD, PAD]]
    assert p.decoder_segment_ids.tolist() == [[1, 1, 2, 2, 2], [1, 0, 0, 0, 0]]
    assert p.decoder_positions.tolist() == [[0, 1, 0, 1, 2], [0, 0, 0, 0, 0]]
    assert p.labels.tolist() == [[1002, EOS, 1004, 1005, EOS], [1007, -100, -100, -100, -100]]
    assert p.padding_waste() == (1 / 8, 4 / 10)


def test_pack_rejects_empty():
    with pytest.raises(ValueError, match="no examples"):
        pack([], enc_len=4, dec_len=4, pad_id=PAD, bos_id=BOS)
    with pytest.raises(ValueError, match="empty"):
        pack([Example([], [EOS])], enc_len=4, dec_len=4, pad_id=PAD, bos_id=BOS)


@pytest.mark.parametrize("mixture, enc_len, dec_len", [("t5gemma2", 256, 64), ("ul2", 64, 256), ("ul2", 64, 64)])
def test_examples_that_do_not_fit_keep_their_denoiser(monkeypatch, mixture, enc_len, dec_len):
    """A corrupted window too long for its row is shortened and corrupted again by the same denoiser, so the
    examples follow the mixture's weights whatever the row shapes (drawing again gave the T5Gemma 2 mixture's
    3/4-span denoiser a tenth of the examples instead of half at 256 + 64 tokens)."""
    from encdec.objectives import MIXTURES
    from encdec.training import data

    used = []
    original = data.apply_denoiser
    monkeypatch.setattr(data, "apply_denoiser", lambda *a, **kw: used.append(a[1]) or original(*a, **kw))
    vocab = {**{f"<unused{k}>": 6 + k for k in range(99)}, "[NLU]": 200, "[NLG]": 201, "[S2S]": 202}
    make = example_maker("ul2", eos_id=EOS, vocab=vocab, enc_len=enc_len, dec_len=dec_len, bos_id=2, mixture=mixture)
    rng, n, final = np.random.default_rng(0), 1400, Counter()
    for _ in range(n):
        used.clear()
        example = make(list(rng.integers(1000, 2000, size=window_length("ul2", enc_len, dec_len))), rng)
        assert len(set(used)) == 1 and len(example.inputs) <= enc_len and len(example.targets) <= dec_len
        final[used[-1]] += 1
    chosen = MIXTURES[mixture]
    for denoiser, weight in zip(chosen.denoisers, chosen.weights):
        assert abs(final[denoiser] / n - weight / sum(chosen.weights)) < 0.045, (denoiser, final[denoiser] / n)


@pytest.mark.parametrize("enc_len, dec_len", [(512, 128), (128, 512)])
def test_the_s_denoisers_split_stays_uniform_whatever_the_row_shapes(enc_len, dec_len):
    """UL2's S-denoiser splits its window uniformly and keeps the continuation's start (with EOS) as PrefixLM does:
    without a cap on its targets, a split the decoder's row could not hold shortened the whole window and split it
    again, biasing the split towards long prefixes and using 233 of a 320-token window's tokens on average."""
    vocab = {f"<unused{k}>": 6 + k for k in range(99)}
    s2s = special_token_ids(vocab)[0]["[S2S]"]
    make = example_maker("ul2", eos_id=EOS, vocab=vocab, enc_len=enc_len, dec_len=dec_len, bos_id=2, mixture="ul2")
    rng, length, splits = np.random.default_rng(0), window_length("ul2", enc_len, dec_len), []
    window = list(range(1000, 1000 + length))
    for _ in range(10_000):
        example = make(window, rng)
        if example.inputs[1] != s2s:  # another denoiser's
            continue
        prefix, continuation = example.inputs[2:], example.targets[:-1]
        assert example.targets[-1] == EOS and len(example.inputs) <= enc_len and len(example.targets) <= dec_len
        k = prefix[-1] - 999 if prefix else 0
        assert prefix == window[k - len(prefix) : k] and continuation == window[k : k + len(continuation)]
        assert len(continuation) == min(length - k, dec_len - 1)  # the continuation cut only by the row
        splits.append(k)
    assert len(splits) > 400
    assert abs(np.mean(splits) - length / 2) < length * 0.05, (np.mean(splits), length)


# --- how a pretrained model reads a continuation ---------------------------------------------------------------------

GEMMA_LIKE = {"<bos>": BOS, "<eos>": EOS, **{f"<unused{k}>": 100 + k for k in range(12)}}


@pytest.mark.parametrize("mixture", ["t5gemma2", "ul2"])
def test_the_framing_is_the_format_the_objective_trains(mixture):
    """The framing a UL2-trained model is scored with is the shape of one of its own training examples: T5Gemma 2's
    single-span denoiser (start kept, a sentinel, then the rest), UL2's S-denoiser (its mode token, then the prefix)."""
    framing = continuation_framing("ul2", mixture, GEMMA_LIKE)
    make = example_maker("ul2", eos_id=EOS, vocab=GEMMA_LIKE, enc_len=64, dec_len=64, bos_id=BOS, mixture=mixture)
    window = list(range(1000, 1064))
    matching = 0
    for seed in range(60):
        example = make(window, np.random.default_rng(seed))
        kept = [t for t in example.inputs if t >= 1000]
        if kept and kept == window[:len(kept)] and example.targets[len(framing.decoder):-1] == window[len(kept):]:
            assert example.inputs == framing.prompt([BOS, *kept], BOS)
            assert example.targets[:len(framing.decoder)] == list(framing.decoder)
            matching += 1
    assert matching >= 5  # the continuation-like denoiser is drawn often (4 in 8 and 1 in 7 of the draws)
    if mixture == "t5gemma2":
        assert framing == Framing(after=(103,), decoder=(103,))  # <unused3>: the first sentinel
    else:
        assert framing == Framing(before=(102,))  # <unused2>: "[S2S]"


@pytest.mark.parametrize("mixture", ["t5gemma2", "ul2"])
def test_a_window_starting_at_its_documents_bos_reads_one_bos_first(mixture):
    """UL2's mode token went before such a window's BOS, and a BOS was added before it: [BOS, mode, BOS, text], a
    start no served prompt has (`Framing.prompt` gives [BOS, mode, text])."""
    make = example_maker("ul2", eos_id=EOS, vocab=GEMMA_LIKE, enc_len=64, dec_len=64, bos_id=BOS, mixture=mixture)
    window = [BOS, *range(1000, 1063)]
    for seed in range(60):
        example = make(window, np.random.default_rng(seed))
        assert example.inputs[0] == BOS and example.inputs.count(BOS) == 1, example.inputs[:4]
        assert len(example.inputs) <= 64 and len(example.targets) <= 64


def test_a_model_reads_plainly_unless_ul2_was_its_last_training():
    ul2 = {"pretrained": {"objective": "ul2", "settings": {"mixture": "t5gemma2"}}}
    assert trained_framing(ul2, GEMMA_LIKE) == Framing(after=(103,), decoder=(103,))
    assert trained_framing({**ul2, "finetuned": {"objective": "instruct"}}, GEMMA_LIKE) == PLAIN
    assert trained_framing({"pretrained": {"objective": "prefixlm", "settings": {}}}, GEMMA_LIKE) == PLAIN
    assert trained_framing({"adapted_from": {"encoder": "gemma-3-270m"}}, GEMMA_LIKE) == PLAIN
    with pytest.raises(TypeError, match="settings are a str, not a mapping"):  # hand-edited: an AttributeError escaped
        trained_framing({"pretrained": {"objective": "ul2", "settings": "x"}}, GEMMA_LIKE)
    assert continuation_framing("prefixlm", "ul2", GEMMA_LIKE) == PLAIN
    # the BOS stays first, the mode token after it; a prompt without BOS (Qwen's tokenizer) gets it first
    assert Framing(before=(7,), after=(8,)).prompt([BOS, 5, 6], BOS) == [BOS, 7, 5, 6, 8]
    assert Framing(before=(7,), after=(8,)).prompt([5, 6], None) == [7, 5, 6, 8]



def test_the_framing_of_a_mistyped_path_is_an_error_not_plain(tmp_path):
    """model_framing reads the checkpoint's provenance: a path with none there must not pass as a PrefixLM model."""
    from encdec.errors import EncdecError
    from encdec.inference.loading import model_framing

    class Vocab:
        def get_vocab(self):
            return GEMMA_LIKE

    with pytest.raises(EncdecError, match="ul2-typo: no such checkpoint directory"):
        model_framing(tmp_path / "ul2-typo", Vocab())
    assert model_framing(tmp_path, Vocab()) == PLAIN  # a directory without provenance: plain, as before


@pytest.mark.parametrize("settings, vocab, message", [
    ({"mixture": "t5gemma9"}, GEMMA_LIKE, "names the UL2 mixture 't5gemma9'; known: "),
    ({"mixture": "t5gemma2"}, {"<bos>": 2, "hello": 3}, "the vocabulary has no reserved tokens"),
])
def test_a_ul2_framing_that_cannot_be_built_is_one_line(tmp_path, settings, vocab, message):
    """A provenance naming a mixture this version does not know (hand-edited, another version), or a tokenizer
    swapped for one without UL2's tokens: a KeyError or a bare ValueError escaped `encdec generate` and `serve`."""
    import json

    from encdec.errors import EncdecError
    from encdec.inference.loading import model_framing

    class Vocab:
        def get_vocab(self):
            return vocab

    (tmp_path / "encdec.json").write_text(json.dumps({"pretrained": {"objective": "ul2", "settings": settings}}))
    with pytest.raises(EncdecError, match=f"{tmp_path.name}: cannot read prompts as its UL2 pretraining posed them: "
                                          f".*{message}"):
        model_framing(tmp_path, Vocab())
