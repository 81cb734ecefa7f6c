"""The `encdec` command line: adapt, generate, info, quickstart."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from encdec.errors import EncdecError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=32)


def cmd_adapt(args: argparse.Namespace) -> None:
    from encdec.adapt import adapt, parse_layers
    from encdec.checkpoint import save
    from encdec.files import check_output_dir
    from encdec.logs import timed
    from encdec.report import describe, parameter_table
    from encdec.sources import load_source

    check_output_dir(args.out, args.overwrite)
    with timed(f"loading encoder source {args.encoder}"):
        encoder = load_source(args.encoder, DTYPES[args.dtype])
    decoder = None
    if args.decoder:
        with timed(f"loading decoder source {args.decoder}"):
            decoder = load_source(args.decoder, DTYPES[args.dtype])
    layers = parse_layers(args.decoder_layers, encoder.stack.num_layers) if args.decoder_layers else None
    with timed("adapting"):
        model = adapt(encoder, decoder, layers, args.attention, seed=args.seed)
    tokenizer_dir = encoder.directory if encoder.has_tokenizer else None
    with timed(f"saving to {args.out}"):
        provenance = {"adapted_from": {
            "encoder": _portable(args.encoder), "decoder": _portable(args.decoder) if args.decoder else None,
            "decoder_layers": layers, "attention": model.config.attention,
        }}
        fmt = save(model, args.out, tokenizer_dir=tokenizer_dir, overwrite=args.overwrite, dtype=DTYPES[args.dtype],
                   metadata=provenance)
    print(f"saved {args.out} ({_format_line(fmt)})")
    print(describe(model))
    print("parameters:")
    print(parameter_table(model))


def _portable(spec: str) -> str:
    """A source as it can be found again later: local paths made absolute, names kept."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _format_line(fmt: str) -> str:
    from encdec.formats.t5gemma import LAYOUTS

    if fmt in LAYOUTS:
        return f"format {fmt}: transformers loads it as {LAYOUTS[fmt].architecture}"
    return "format encdec (the project's own: no transformers class holds this configuration)"


def cmd_info(args: argparse.Namespace) -> None:
    from encdec.checkpoint import load_checkpoint
    from encdec.report import describe, parameter_table

    loaded = load_checkpoint(args.dir)
    print(f"{args.dir}: {_format_line(loaded.format)}")
    for note in loaded.notes:
        print(f"  note: {note}")
    print(describe(loaded.model))
    print("parameters:")
    print(parameter_table(loaded.model))


def cmd_generate(args: argparse.Namespace) -> None:
    import time

    from encdec.checkpoint import load
    from encdec.logs import timed
    from encdec.sources import load_tokenizer

    with timed(f"loading {args.dir}"):
        model = load(args.dir, DTYPES[args.dtype])
        tokenizer = load_tokenizer(Path(args.dir))
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True)
    start = time.perf_counter()
    out = model.generate(
        batch.input_ids, batch.attention_mask, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    seconds = time.perf_counter() - start
    for prompt, row in zip(args.prompt, out):
        print(f"{prompt} -> {tokenizer.decode(row, skip_special_tokens=True)}")
    print(f"encdec: {out.shape[0]} x {out.shape[1]} tokens in {seconds:.1f} s", file=sys.stderr)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from encdec.training.config import from_arguments
    from encdec.training.loop import train

    cfg = from_arguments(args)
    if not cfg.model:
        raise EncdecError("--model DIR is required (an adapted model, from `encdec adapt`), on the command line or in --config")
    final = train(cfg)
    print(f"final model: {final}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from encdec.quickstart import run

    run(args.out, overwrite=args.overwrite, prompt=args.prompt, max_new_tokens=args.max_new_tokens, steps=args.steps,
        trim_vocab=args.trim_vocab)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encdec", formatter_class=_formatter,
        description="Turn a decoder-only Gemma into an encoder-decoder model (T5Gemma / T5Gemma 2 method).",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("adapt", formatter_class=_formatter, help="build an encoder-decoder from decoder-only checkpoints",
                       description="Build an encoder-decoder from decoder-only Gemma checkpoints and save it. "
                       "SRC is a Hugging Face checkpoint directory, a GGUF file, a Hub name, or gemma-3-270m.")
    p.add_argument("--encoder", default="gemma-3-270m", metavar="SRC", help="source of the encoder (and of the decoder when balanced)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--decoder", metavar="SRC", help="unbalanced: a smaller decoder source of the same family and vocabulary")
    group.add_argument("--decoder-layers", metavar="LIST",
                       help="unbalanced: the source layers the decoder keeps, e.g. 0,3,6 or ::3 (every third)")
    p.add_argument("--attention", choices=["merged", "cross"], default=None,
                   help="how the decoder reads the encoder; default: merged for Gemma 3, cross for Gemma 2")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype the sources are loaded in and the model is saved in (bfloat16 halves the memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of randomly initialised cross-attention (unbalanced)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("generate", formatter_class=_formatter, help="generate continuations with a saved model",
                       description="Encode each prompt and decode a continuation.")
    p.add_argument("dir", type=Path, metavar="DIR", help="checkpoint directory (any format encdec reads)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="input text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this probability mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible samples")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("pretrain", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="adaptation pretraining (PrefixLM with distillation, or UL2)",
                       description="Continue pretraining an adapted model with PrefixLM (+ distillation from its "
                       "decoder-only source) or UL2, on packed rows. Every option can also be set in --config "
                       "FILE.yaml; the command line wins. Runs under torchrun / accelerate launch as well.")
    from encdec.training.config import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("info", formatter_class=_formatter, help="describe a saved model",
                       description="Parameters per part, configuration, format and transformers class of a checkpoint.")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quickstart", formatter_class=_formatter, help="the main job on the packaged Gemma 3 270M",
                       description="Adapt the packaged Gemma 3 270M into a 270M-270M encoder-decoder (saved in "
                       "DIR/adapted), compare it with its source (parameters, a greedy continuation, held-out suffix "
                       "NLL), run a short PrefixLM + distillation adaptation (DIR/pretrain) and compare again.")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), metavar="DIR")
    p.add_argument("--steps", type=int, default=12, help="adaptation steps (0: adapt and compare only)")
    p.add_argument("--trim-vocab", type=int, default=8192, help="train on the N most frequent tokens (speed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--prompt", default="The capital of France is", metavar="TEXT")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from encdec.logs import setup

    setup(args.verbose)
    try:
        args.func(args)
    except EncdecError as e:
        print(f"encdec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"encdec {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
