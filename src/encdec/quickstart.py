"""The main job on the built-in default: adapt the packaged Gemma 3 270M into a 270M-270M
encoder-decoder, save it, and compare it with its decoder-only source."""

from __future__ import annotations

from pathlib import Path

import torch

from encdec.adapt import adapt
from encdec.checkpoint import save
from encdec.data.corpus import heldout_passages
from encdec.evaluation.nll import decoder_only_suffix_nll, encdec_suffix_nll, split_passages
from encdec.files import check_output_dir
from encdec.logs import timed
from encdec.report import describe, parameter_table
from encdec.sources import load_source, load_tokenizer

SOURCE = "gemma-3-270m"


def run(out: Path, *, overwrite: bool, prompt: str, max_new_tokens: int) -> None:
    from transformers import AutoModelForCausalLM

    check_output_dir(out, overwrite)
    with timed(f"loading {SOURCE}"):
        source = load_source(SOURCE)
        tokenizer = load_tokenizer(source.directory)
    with timed("adapting to a balanced encoder-decoder with merged attention"):
        model = adapt(source)
    with timed(f"saving to {out}"):
        fmt = save(model, out, tokenizer_dir=source.directory, overwrite=overwrite,
                   metadata={"adapted_from": {"encoder": SOURCE, "decoder": None, "decoder_layers": None,
                                              "attention": model.config.attention}})
    with timed("loading the decoder-only source in transformers, for comparison"):
        reference = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=torch.float32).eval()

    print(f"\nSaved {out} (format {fmt}; transformers: AutoModelForSeq2SeqLM.from_pretrained('{out}'))")
    print(describe(model))
    print("Parameters:")
    print(parameter_table(model))
    print(f"  (decoder-only source: {sum(p.numel() for p in reference.parameters()):,})")

    batch = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():  # method.md's invariant: with the encoder fully masked, the decoder is the source
        masked = model(batch.input_ids, torch.zeros_like(batch.input_ids), batch.input_ids).logits
        gap = (masked - reference(input_ids=batch.input_ids).logits).abs().max().item()
    print(f"  check: decoder with a fully masked encoder vs the source, max |logit difference| = {gap:.2e}")
    with timed("greedy continuations"):
        with torch.no_grad():
            src_ids = reference.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        src_text = tokenizer.decode(src_ids[0, batch.input_ids.shape[1]:], skip_special_tokens=True)
        ours = model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=max_new_tokens)
        our_text = tokenizer.decode(ours[0], skip_special_tokens=True)
    print(f"\nGreedy continuation of {prompt!r}:")
    print(f"  decoder-only source    : {src_text!r}")
    print(f"  adapted, not yet trained: {our_text!r}")

    data = split_passages(tokenizer, heldout_passages(), prefix_len=64, suffix_len=64)
    with timed(f"held-out suffix NLL on {len(data.prefix)} passages"):
        src_nll = decoder_only_suffix_nll(reference, data)
        our_nll = encdec_suffix_nll(model, data)
    print(f"\nHeld-out suffix NLL (nats/token; 64-token prefix -> 64-token suffix, {len(data.prefix)} passages "
          "of the Python language reference):")
    print(f"  decoder-only source (reads prefix+suffix causally): {src_nll:6.3f}")
    print(f"  adapted encoder-decoder, before training           : {our_nll:6.3f}")
    print("  The adapted decoder has never read bidirectional encoder states: adaptation pretraining closes this gap.")
