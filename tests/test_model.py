"""The model itself: adaptation invariants (method.md), packed rows, masks."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import encdec
from encdec.errors import EncdecError
from encdec.model import AttentionMask, RMSNorm, Segments, attention_masks

TOL = 1e-4


def _source_model(directory):
    return tf.AutoModelForCausalLM.from_pretrained(str(directory)).eval()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]  # besides Gemma, see tests/tiny.py for the variants


@pytest.mark.parametrize("family, attention", [("gemma3", "merged"), ("gemma3", "cross"), ("gemma2", "cross"),
                                               ("gemma2", "merged"), *[(family, "merged") for family in FAMILIES],
                                               ("llama", "cross"), ("llama-linear", "merged")])
def test_causal_encoder_reproduces_source_hidden_states(sources, family, attention):
    source = _source_model(sources[family])
    model = encdec.adapt(encdec.load_source(str(sources[family])), attention=attention)
    ids = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded batch
    with torch.no_grad():
        ref = source.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model.encode(ids, mask, causal=True)
        bidirectional = model.encode(ids, mask)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max().item() <= TOL
    assert (bidirectional[real] - ref[real]).abs().max().item() > 1e-2  # the encoder really is bidirectional


@pytest.mark.parametrize("family", ["gemma3", "gemma2", *FAMILIES])
def test_merged_decoder_with_masked_encoder_is_the_source(sources, family):
    source = _source_model(sources[family])
    model = encdec.adapt(encdec.load_source(str(sources[family])), attention="merged")
    g = torch.Generator().manual_seed(2)
    ids, dec = torch.randint(3, 96, (2, 9), generator=g), torch.randint(3, 96, (2, 12), generator=g)
    dec_mask = torch.ones_like(dec)
    dec_mask[1, 8:] = 0  # a padded batch
    with torch.no_grad():
        ref = source(input_ids=dec, attention_mask=dec_mask).logits
        ours = model(ids, torch.zeros_like(ids), dec, dec_mask).logits
        seeing = model(ids, torch.ones_like(ids), dec, dec_mask).logits
    real = dec_mask.bool()
    assert (ours[real] - ref[real]).abs().max().item() <= TOL
    assert (seeing[real] - ref[real]).abs().max().item() > 1e-2  # with the encoder visible the output changes


def test_a_gemma_3_with_soft_caps_is_read_as_transformers_reads_it(tmp_path):
    """Released Gemma 3s set none. Set, transformers applies the final one (it was read as absent) and leaves the
    attention's unapplied."""
    from tiny import make_source

    directory = make_source(tmp_path / "capped", "gemma3", attn_logit_softcapping=0.5, final_logit_softcapping=0.8)
    source = _source_model(directory)
    model = encdec.adapt(encdec.load_source(str(directory)), attention="merged")
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = source(input_ids=ids).logits
        ours = model(ids[:, :3], torch.zeros_like(ids[:, :3]), ids, torch.ones_like(ids)).logits
    assert ref.abs().max() <= 0.8 and (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("family, attention", [("gemma3", "merged"), ("gemma2", "cross"), ("gemma3", "cross"),
                                               ("qwen2", "cross")])
def test_packed_rows_equal_examples_run_one_by_one(sources, family, attention):
    model = encdec.adapt(encdec.load_source(str(sources[family])), attention=attention)
    g = torch.Generator().manual_seed(3)
    enc_lens, dec_lens = [5, 7, 3], [4, 2, 6]
    encs = [torch.randint(3, 96, (n,), generator=g) for n in enc_lens]
    decs = [torch.randint(3, 96, (n,), generator=g) for n in dec_lens]

    def pack(parts, length):
        ids, seg, pos = torch.zeros(length, dtype=torch.long), torch.zeros(length, dtype=torch.long), torch.zeros(length, dtype=torch.long)
        start = 0
        for k, part in enumerate(parts, 1):
            ids[start : start + len(part)], seg[start : start + len(part)] = part, k
            pos[start : start + len(part)] = torch.arange(len(part))
            start += len(part)
        return ids[None], seg[None], pos[None]

    e_ids, e_seg, e_pos = pack(encs, 17)  # two padding tokens at the end
    d_ids, d_seg, d_pos = pack(decs, 13)  # one padding token
    with torch.no_grad():
        packed = model(e_ids, decoder_input_ids=d_ids, segment_ids=e_seg, positions=e_pos,
                       decoder_segment_ids=d_seg, decoder_positions=d_pos).logits[0]
        # segment ids without positions: each segment's positions start at 0 as well (merged attention's decoder
        # queries take RoPE and its encoder keys do not: plain row indices moved every later segment's logits)
        derived = model(e_ids, decoder_input_ids=d_ids, segment_ids=e_seg, decoder_segment_ids=d_seg).logits[0]
        start = 0
        for enc, dec in zip(encs, decs):
            alone = model(enc[None], decoder_input_ids=dec[None]).logits[0]
            assert (packed[start : start + len(dec)] - alone).abs().max().item() <= TOL
            assert (derived[start : start + len(dec)] - alone).abs().max().item() <= TOL
            start += len(dec)


def _window_allowed(convention: str, window: int, length: int = 12) -> set[tuple[int, int]]:
    seg = Segments(torch.ones(1, length, dtype=torch.long), torch.arange(length)[None])
    mask = attention_masks(seg, seg, causal=False, window=window, convention=convention)["sliding"][0, 0]
    return {(i, j) for i in range(length) for j in range(length) if mask[i, j]}


@pytest.mark.parametrize("window", [4, 5])
def test_encoder_window_conventions(window):
    pairs = [(i, j) for i in range(12) for j in range(12)]
    assert _window_allowed("t5gemma", window) == {(i, j) for i, j in pairs if abs(i - j) <= window}
    assert _window_allowed("flax", window) == {(i, j) for i, j in pairs if abs(i - j) <= window - 1}
    split = _window_allowed("t5gemma2", window)
    assert split == {(i, j) for i, j in pairs if -(window // 2) <= i - j <= (window + 1) // 2 - 1}
    assert all(sum(1 for i2, _ in split if i2 == i) <= window for i in range(12))  # W keys at most, self included


def test_inputs_of_no_tokens_or_mismatched_masks_are_one_line(sources):
    """They failed deep in attention, in PyTorch's words ("cannot reshape tensor of 0 elements ...")."""
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])), attention="merged")
    ids = torch.tensor([[5, 6, 7]])
    empty = r"token ids must be \[batch, length\] with at least one token, got shape \(1, 0\)"
    other = r"the attention mask must have the token ids' shape \(1, 3\), got \(1, 2\)"
    for enc, dec, mask, said in ((ids[:, :0], ids, None, empty), (ids, ids[:, :0], None, r"got shape \(1, 0\)"),
                                 (ids[0], ids, None, r"got shape \(3,\)"), (ids, ids, torch.ones(1, 2), other)):
        with pytest.raises(EncdecError, match=said):
            model(enc, mask, dec)
    assert model(ids, torch.ones(1, 3), ids).logits.shape == (1, 3, model.config.vocab_size)


def test_padding_rows_stay_finite(sources):
    model = encdec.adapt(encdec.load_source(str(sources["gemma2"])))  # cross-attention: a padding row sees nothing
    ids = torch.randint(3, 96, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        logits = model(ids, mask, ids).logits
    assert torch.isfinite(logits).all()


def test_bfloat16_forward_is_close_to_float32(sources, batch):
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    with torch.no_grad():
        ref = model(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**batch).logits.float()
    mask = batch["decoder_attention_mask"].bool()
    assert torch.isfinite(low).all()
    assert (low[mask] - ref[mask]).abs().max().item() < 0.1 * ref[mask].abs().max().item()
    assert not torch.equal(low, ref)  # bfloat16 ran (autocast doing nothing would pass the bound above)


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_long_cpu_inference_attends_chunk_by_chunk_alike(sources, monkeypatch, family):
    """CPU inference over more than 4 x QUERY_CHUNK queries attends each chunk of queries over the span of
    keys it may see (a local window, its packed prompt): real tokens' states equal those of whole-row attention,
    for packed and padded encoder rows and a decoder reading them (merged: Gemma 3; soft-capped scores, plain
    products, and cross-attention: Gemma 2, whose long rows were whole [B, H, L, L] scores)."""
    model = encdec.adapt(encdec.load_source(str(sources[family])))  # local window 4, local and global layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 300), generator=g)
    segments = torch.tensor([[1] * 120 + [2] * 180, [1] * 200 + [0] * 100])  # two packed prompts; one padded
    positions = torch.cat([torch.arange(120), torch.arange(180)]).expand(2, -1).clone()
    positions[1] = torch.arange(300)
    dec = torch.randint(3, 96, (2, 290), generator=g)
    dec_segments = torch.tensor([[1] * 140 + [2] * 150, [1] * 290])
    dec_positions = torch.cat([torch.arange(140), torch.arange(150)]).expand(2, -1).clone()
    dec_positions[1] = torch.arange(290)
    seg = Segments(segments, positions)
    spans = AttentionMask(attention_masks(seg, seg, causal=False, window=4, convention="t5gemma2")["sliding"]).spans()
    real = [(rows, lo, hi) for rows, start, _, lo, hi in spans if not (rows == slice(1, 2) and start >= 192)]
    assert all(hi - lo <= encdec.model.QUERY_CHUNK + 4 for _, lo, hi in real)  # really narrower than a row
    spans = AttentionMask(attention_masks(seg, seg, causal=False, window=4)["full"]).spans()
    assert spans[0] == (slice(0, 1), 0, 64, 0, 120)  # row by row: a packed prompt's own keys
    assert (slice(1, 2), 0, 256, 0, 200) in spans  # chunks seeing the same keys go together

    def run():
        with torch.no_grad():
            encoded = model.encode(ids, segment_ids=segments, positions=positions)
            logits = model(ids, decoder_input_ids=dec, segment_ids=segments, positions=positions,
                           decoder_segment_ids=dec_segments, decoder_positions=dec_positions).logits
        return encoded, logits

    def one_long_row():  # one prompt, every key seen by every query of a global layer: blocks of queries
        with torch.no_grad():
            return model.encode(torch.randint(3, 96, (1, 1100), generator=torch.Generator().manual_seed(1)))

    calls = []
    chunks = encdec.model.Attention._attend_in_chunks
    monkeypatch.setattr(encdec.model.Attention, "_attend_in_chunks", lambda *a: calls.append(1) or chunks(*a))
    chunked, long_chunked = run(), one_long_row()
    assert calls  # the chunked path ran
    monkeypatch.setattr(encdec.model, "QUERY_CHUNK", 10**6)  # no chunks: whole-row attention
    whole, long_whole = run(), one_long_row()
    real = segments != 0
    assert (chunked[0][real] - whole[0][real]).abs().max().item() < 1e-5
    assert (chunked[1] - whole[1]).abs().max().item() < 1e-4
    assert (long_chunked - long_whole).abs().max().item() < 1e-5


def test_sdpa_and_plain_product_attention_agree(sources, batch, monkeypatch):
    """Short CPU sequences take plain products, longer ones SDPA (Gemma 2's soft-capped attention always
    takes plain products, checked against transformers in test_parity)."""
    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    outputs = []
    for limit in (2**22, 0):  # everything small, then nothing small
        monkeypatch.setattr(encdec.model, "PLAIN_SCORES_MAX", limit)
        model.zero_grad(set_to_none=True)
        logits = model(**batch).logits
        logits[batch["decoder_attention_mask"].bool()].square().mean().backward()
        outputs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (first, first_grads), (second, second_grads) = outputs
    assert torch.allclose(first, second, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(first_grads, second_grads))


def test_a_compiled_norm_is_built_once_whatever_the_rows():
    """The in-place path's size threshold, read while dynamo traced, guarded the row count: `serve --compile` built
    its step again when a batch first crossed 65,536 / width rows (103 for the 270M)."""
    from torch._dynamo.testing import CompileCounter

    norm, counter = RMSNorm(640, 1e-6), CompileCounter()
    compiled = torch.compile(norm, dynamic=True, backend=counter)
    with torch.no_grad():
        for rows in (2, 3, 50, 103, 200):
            assert torch.allclose(compiled(torch.ones(rows, 640)), torch.ones(rows, 640))
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [1.0, 0.0])
def test_rms_norm_gives_the_written_out_float32_numbers(dtype, offset, monkeypatch):
    """The norm (PyTorch's rms_norm when training, in-place steps without gradients): its values and gradients are
    those of x * rsqrt(mean(x^2) + eps) * (offset + weight), computed in float32, bit for bit."""
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-6, offset)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 5, 48) * 4).to(dtype).requires_grad_()

    def written_out(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + norm.weight.float())).type_as(x)

    out, expected = norm(x), written_out(x)
    assert out.dtype == dtype and torch.equal(out, expected)
    with torch.no_grad():  # inference's in-place path for large inputs: the same numbers, the input left as it was
        kept = x.detach().clone()
        assert x.numel() < encdec.model.INPLACE_NORM_MIN and torch.equal(norm(x), expected)
        monkeypatch.setattr(encdec.model, "INPLACE_NORM_MIN", 1)
        assert torch.equal(norm(x), expected) and torch.equal(x, kept)
    grads = torch.autograd.grad(out.float().square().sum(), [x, norm.weight])
    expected_grads = torch.autograd.grad(expected.float().square().sum(), [x, norm.weight])
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


@pytest.mark.parametrize("grad", [True, False])  # SDPA whole, and by query chunks (inference on CPU)
def test_a_query_that_sees_nothing_stays_finite_under_autocast_in_sdpa(sources, grad):
    """Masked scores get the dtype's finite minimum: a row with nothing to see averages the values. Under bfloat16
    autocast over float32 weights the bias was built in float32 (the queries' dtype after RoPE) and autocast
    rounded its minimum to -inf in SDPA: such a row came out 0, or NaN where a kernel has no safe softmax."""
    from encdec.model import AttentionMask

    attn = encdec.adapt(encdec.load_source(str(sources["gemma3"]))).encoder.layers[0].attn  # no soft-cap: SDPA
    g = torch.Generator().manual_seed(0)
    length = 1600  # past the plain products' size
    q, k, v = (torch.randn(1, n, length, attn.head_dim, generator=g) + 1 for n in (attn.num_heads, 1, 1))
    allowed = torch.ones(1, 1, length, length, dtype=torch.bool)
    allowed[..., 0, :] = False
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn.attend(q, k, v, AttentionMask(allowed))
    mean = attn.o_proj(v.mean(2, keepdim=True).expand(1, attn.num_heads, 1, -1).transpose(1, 2).reshape(1, 1, -1))
    assert torch.isfinite(out).all() and mean.abs().max() > 0.5
    assert torch.allclose(out[0, 0].float(), mean[0, 0], atol=0.05), (out[0, 0], mean[0, 0])
