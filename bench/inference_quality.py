"""What the inference-time weight transformations cost in quality: each variant of `load_for_inference`
against the float32 model on PyTorch's default BLAS products, on the held-out text.

Variants (the options of `encdec generate` / `encdec serve`):

- blas: `--cpu-kernels blas`, float32: the reference;
- onednn: the default on CPU, float32, weights packed for oneDNN (`encdec.inference.onednn`);
- onednn-bf16: the same with `--dtype bfloat16`;
- int8: `--quantize int8` (dynamic int8 linear layers and LM head).

Measured on both held-out sets of `encdec evaluate` (the Python reference's held-out topics, in the default
corpus's domain, and general-English CoQA stories), each passage cut into a 64-token prefix (read by the
encoder) and the 64-token suffix that follows (predicted by the decoder, teacher-forced): the suffix NLL in
nats per token, the share of suffix positions whose top-1 token equals the reference's, and, generating
--new-tokens greedy tokens after each prefix, the share of tokens equal to the reference's at the same
position and the share of rows identical throughout. The last lines are the NLL ratios of the default (onednn)
to the reference, one per held-out set.

    python bench/inference_quality.py runs/frontier/balanced/train/model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cpu_only, require_distinct, run_main

VARIANTS = {  # name -> (dtype, quantize, cpu kernels)
    "blas": (torch.float32, None, "blas"),
    "onednn": (torch.float32, None, "onednn"),
    "onednn-bf16": (torch.bfloat16, None, "onednn"),
    "int8": (torch.float32, "int8", "blas"),
}


def measure(model, data, new_tokens: int, batch_size: int, framing) -> dict:
    """Suffix NLL, the top-1 token of every suffix position, and the greedy tokens after every prefix, each read
    in the model's `framing` (a UL2-pretrained model's sentinels), as `encdec evaluate` and `generate` read them."""
    from encdec.evaluation.nll import framed_prefix, suffix_logits

    nll, count, top1, greedy = 0.0, 0, [], []
    with torch.inference_mode():
        for i in range(0, len(data.prefix), batch_size):
            prefix, suffix = data.prefix[i : i + batch_size], data.suffix[i : i + batch_size]
            logits = suffix_logits(model, prefix, suffix, framing).float()
            nll += F.cross_entropy(logits.flatten(0, 1), suffix.flatten(), reduction="sum").item()
            count += suffix.numel()
            top1.append(logits.argmax(-1))
            greedy.append(model.generate(framed_prefix(prefix, framing, model.config.bos_token_id),
                                         max_new_tokens=new_tokens, eos_token_ids=[-1], decoder_prefix=framing.decoder))
    return {"nll": nll / count, "top1": torch.cat(top1), "greedy": torch.cat(greedy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an encoder-decoder checkpoint (any format encdec.load reads)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated after each prefix")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    variants = args.variants.split(",")
    require_distinct(parser, "--variants", variants)
    unknown = set(variants) - set(VARIANTS)
    if unknown or "blas" not in variants:
        parser.error(f"--variants: {sorted(unknown) or 'blas is missing'}; choose from {', '.join(VARIANTS)} "
                     "(blas, the reference, included)")
    if args.new_tokens < 1 or args.batch_size < 1:
        parser.error("--new-tokens and --batch-size must be positive")
    cpu_only()  # the kernels compared are the CPU's (and the batches stay there)

    from encdec.data.corpus import HELDOUT_SETS
    from encdec.evaluation.nll import split_passages
    from encdec.inference.loading import load_for_inference, model_framing
    from encdec.sources import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    framing = model_framing(args.model, tokenizer)
    sets = {name: split_passages(tokenizer, passages(), 64, 64) for name, (_, passages) in HELDOUT_SETS.items()}
    results: dict[tuple[str, str], dict] = {}
    for variant in ["blas"] + [v for v in variants if v != "blas"]:
        dtype, quantize, kernels = VARIANTS[variant]
        model = load_for_inference(args.model, dtype, quantize, kernels)
        for name, data in sets.items():
            start = time.perf_counter()
            results[(variant, name)] = measure(model, data, args.new_tokens, args.batch_size, framing)
            print(f"{variant} on {name}: {time.perf_counter() - start:.0f} s", flush=True)
        del model

    print(f"model {args.model}; held-out passages cut 64 + 64 tokens; {args.new_tokens} greedy tokens per prefix")
    print(f"{'variant':<12} {'held-out set':<16} {'passages':>8} {'suffix NLL':>10} {'difference':>10} "
          f"{'top-1 same':>10} {'greedy same':>11} {'rows same':>9}")
    for (variant, name), got in results.items():
        ref = results[("blas", name)]
        print(f"{variant:<12} {name:<16} {len(got['greedy']):>8} {got['nll']:>10.4f} {got['nll'] - ref['nll']:>+10.4f} "
              f"{(got['top1'] == ref['top1']).float().mean().item():>10.1%} "
              f"{(got['greedy'] == ref['greedy']).float().mean().item():>11.1%} "
              f"{(got['greedy'] == ref['greedy']).all(1).float().mean().item():>9.1%}")
    if "onednn" in variants:
        for name in sets:
            ratio = results[("onednn", name)]["nll"] / results[("blas", name)]["nll"]
            print(f"ratio (onednn / blas suffix NLL, {name}): {ratio:.4f}x")


if __name__ == "__main__":
    run_main(main)
