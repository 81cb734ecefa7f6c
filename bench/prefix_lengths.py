"""How much context an adapted model needs: held-out suffix NLL against the prefix length the encoder reads.

Training with PrefixLM's middle split shows the encoder prefixes of one length only (half a window: 63-64
tokens in the quickstart's recipe), while users send short prompts. This scores the same 64-token
suffixes of both held-out sets after prefixes of each --lengths size (BOS plus the tokens right before the
suffix), for the decoder-only source (reading prefix + suffix causally) and each adapted --model; then,
after the longest prefix, the NLL by suffix position (the first ones depend on the prefix alone), and each
model's greedy continuation of a short --prompt. With --source-without-bos the source also reads each
context without its BOS, as a window cut from the middle of a document starts. Printed last: each model's
gap to the source at the shortest and the longest prefix.

    python bench/prefix_lengths.py --model mid-split=runs/recovery-200/lr-3e-5/model \\
        --model random-split=runs/recovery-200/random-split@3e-5/model --lengths 4,16,64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import run_main

from encdec.checkpoint import load, read_metadata
from encdec.data.corpus import HELDOUT_SETS
from encdec.data.tokens import leading_bos
from encdec.errors import EncdecError
from encdec.evaluation.nll import PrefixSuffix, decoder_only_position_nll, encdec_position_nll, split_passages
from encdec.inference.loading import model_framing
from encdec.sources import load_tokenizer, resolve, transformers_causal_lm

SOURCE = "source"
LONGEST = 64
SPANS = ((0, 1), (1, 8), (8, 64))  # suffix positions [start, end): the first token, the next 7, the rest


def shorter(data: PrefixSuffix, length: int, bos: bool) -> PrefixSuffix:
    """A `length`-token context right before the unchanged suffix: BOS and the last `length - 1` prefix tokens, or
    without a BOS (a tokenizer that adds none, as Qwen's) the last `length` (the first column is text then)."""
    kept = length - 1 if bos else length
    return PrefixSuffix(torch.cat([data.prefix[:, :1] if bos else data.prefix[:, :0],
                                   data.prefix[:, data.prefix.shape[1] - kept :]], 1), data.suffix)


def without_bos(data: PrefixSuffix) -> PrefixSuffix:
    """The same text context without its BOS, as a window cut from the middle of a document starts."""
    return PrefixSuffix(data.prefix[:, 1:], data.suffix)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="an adapted model (repeat)")
    p.add_argument("--lengths", default="4,16,64", help=f"prefix lengths with BOS, comma list, each 2..{LONGEST}")
    p.add_argument("--prompt", default="The capital of France is", help="a short prompt to continue greedily")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--source-without-bos", action="store_true",
                   help="also score the source on the same text contexts without BOS (as mid-document windows start)")
    args = p.parse_args()
    try:
        lengths = sorted({int(n) for n in args.lengths.split(",")})
    except ValueError:
        p.error(f"--lengths {args.lengths!r}: expected a comma list of integers like 4,16,64")
    if args.new_tokens < 1:  # transformers' ValueError once every length was scored
        p.error(f"--new-tokens must be at least 1, got {args.new_tokens}")
    if lengths[0] < 2 or lengths[-1] > LONGEST:
        p.error(f"--lengths must lie in 2..{LONGEST} (BOS and at least one token), got {args.lengths}")
    models = dict(text.partition("=")[::2] for text in args.model)
    if any(not name or not path or name == SOURCE for name, path in models.items()):
        p.error(f"--model: expected NAME=DIR with NAME not {SOURCE!r}, got {args.model}")

    first = next(iter(models.values()))
    tokenizer = load_tokenizer(first)
    bos = leading_bos(tokenizer) is not None
    if args.source_without_bos and not bos:
        p.error("--source-without-bos: this tokenizer puts no BOS before a text (its contexts have none to leave out)")
    full = {name: split_passages(tokenizer, passages(), LONGEST, 64) for name, (_, passages) in HELDOUT_SETS.items()}
    sets = {(name, n): shorter(data, n, bos) for name, data in full.items() for n in lengths}
    prompt = tokenizer([args.prompt], return_tensors="pt")
    rows, texts = {}, {}
    def recorded(name: str, path: str) -> str:
        """The source a model was adapted from, as its encdec.json names it."""
        adapted_from = read_metadata(path).get("adapted_from")
        if not isinstance(adapted_from, dict) or not isinstance(adapted_from.get("encoder"), str):  # a KeyError else
            p.error(f"--model {name}: its encdec.json names no source (adapted_from); give models made by `encdec "
                    "adapt`")
        return adapted_from["encoder"]

    def directory(name: str, spec: str) -> Path:
        try:  # (a GGUF file or a packaged name is converted once, a Hub name downloaded)
            return resolve(spec).resolve()
        except EncdecError as e:
            p.error(f"--model {name}: its source cannot be read ({e})")

    def same(a: str, b: str) -> bool:  # the same name, or the same local path
        local_a, local_b = Path(a).expanduser(), Path(b).expanduser()
        return a == b or local_a.exists() and local_a.resolve() == local_b.resolve()

    specs = {name: recorded(name, path) for name, path in models.items()}
    first_name = next(iter(specs))
    source_dir = directory(first_name, specs[first_name])
    # (resolved only where the names differ: a packaged name and its directory are one source)
    others = [name for name, spec in specs.items()
              if not same(spec, specs[first_name]) and directory(name, spec) != source_dir]
    if others:  # scored with the first's tokenizer and set against its source, their numbers meant nothing
        p.error(f"--model {others[0]}: adapted from another source than {first} ({source_dir}); every model is "
                "compared with one source, with its tokenizer: give models adapted from the same one")
    reference = transformers_causal_lm(source_dir, torch.float32).eval()
    rows[SOURCE] = {key: decoder_only_position_nll(reference, data) for key, data in sets.items()}
    if args.source_without_bos:
        rows[f"{SOURCE} without BOS"] = {key: decoder_only_position_nll(reference, without_bos(data))
                                         for key, data in sets.items()}
    with torch.no_grad():
        ids = reference.generate(**prompt, max_new_tokens=args.new_tokens, do_sample=False)
    texts[SOURCE] = tokenizer.decode(ids[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    del reference
    for name, path in models.items():
        model = load(Path(path)).eval()
        framing = model_framing(path, tokenizer)  # a UL2-pretrained model reads a continuation after its sentinel
        rows[name] = {key: encdec_position_nll(model, data, framing=framing) for key, data in sets.items()}
        framed = torch.tensor([framing.prompt(prompt.input_ids[0].tolist(), leading_bos(tokenizer))])
        with torch.no_grad():
            ids = model.generate(framed, max_new_tokens=args.new_tokens, decoder_prefix=framing.decoder)
        texts[name] = tokenizer.decode(ids[0], skip_special_tokens=True)

    print("\nheld-out suffix NLL (nats/token, the same 64-token suffixes) after a prefix of n tokens (BOS included)")
    head = ["model", *[f"{name} n={n}" for name, n in sets]]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, values in rows.items():
        print("| " + " | ".join([name, *[f"{values[key].mean():.3f}" for key in sets]]) + " |")
    print(f"\nthe same after {lengths[-1]} prefix tokens, by suffix position (1-based): the first positions have no "
          f"suffix context and depend on the prefix alone")
    head = ["model", *[f"{name} {a + 1}-{b}" for name in full for a, b in SPANS]]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, values in rows.items():
        cells = [f"{values[(s, lengths[-1])][a:b].mean():.3f}" for s in full for a, b in SPANS]
        print("| " + " | ".join([name, *cells]) + " |")
    print(f"\ngreedy continuation of {args.prompt!r}:")
    for name, text in texts.items():
        print(f"  {name}: {text!r}")
    print()
    for name in models:
        gaps = ", ".join(f"{s} n={n} {rows[name][(s, n)].mean() - rows[SOURCE][(s, n)].mean():+.3f}"
                         for s in full for n in (lengths[0], lengths[-1]))
        print(f"gap to the source, {name}: {gaps} nats")


if __name__ == "__main__":
    run_main(main)
