"""The pretraining configuration: one dataclass whose every field is documented, settable from a
YAML file (`--config`) and overridable on the command line (`--field-name VALUE`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from encdec.errors import EncdecError, first_line
from encdec.files import check_utf8, expand_user, read_named
from encdec.training.precision import PRECISIONS

if TYPE_CHECKING:
    from encdec.config import EncDecConfig, StackConfig


log = logging.getLogger("encdec")

def _f(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


USER_PATHS = ("model", "out", "teacher", "data", "eval_data")  # a leading ~ is the home directory


@dataclass
class TrainConfig:
    model: str = _f("", "adapted model directory (from `encdec adapt`), or a decoder-only source (SRC as `encdec adapt` "
                    "takes it), trained on the same examples: it reads inputs + targets causally")
    out: str = _f("runs/pretrain", "output directory: checkpoints/, metrics.jsonl, model/ (the final model)")
    objective: str = _f("prefixlm", "prefixlm or ul2; instruct: prompt -> response pairs (what `encdec finetune` runs)",
                        choices=("prefixlm", "ul2", "instruct"))
    mixture: str = _f("t5gemma2", "UL2 denoiser mixture: t5gemma2 or ul2 (the original UL2)", choices=("t5gemma2", "ul2"))
    random_split: bool = _f(False, "PrefixLM: split each window at a uniformly random point instead of the middle")
    window: int = _f(0, "tokens per pretraining window; 0: the objective's own (PrefixLM: twice the shorter side "
                     "less its BOS or EOS, a row at equal --enc-len and --dec-len; UL2: half a row, "
                     "(enc-len + dec-len) / 2). Shorter UL2 windows pack several examples a row, first fit, but "
                     "recovered worse at 64 + 64 tokens (docs/adaptation.md)")
    distill: bool | None = _f(None, "PrefixLM: distill the decoder-only teacher's next-token distributions; unset: "
                              "yes for PrefixLM when the teacher is known (--teacher, the source `encdec adapt` "
                              "recorded, or a decoder-only model itself), no otherwise", kind=bool)
    teacher: str = _f("", "teacher source (default: the encoder source recorded by `encdec adapt`; for a "
                      "decoder-only --model, the model itself as it starts)")
    alpha: float = _f(0.5, "weight of the distillation term: alpha * KL * tau^2 + (1 - alpha) * cross-entropy")
    tau: float = _f(1.0, "distillation temperature")
    teacher_top_k: int = _f(0, "keep only the teacher's k most likely tokens (renormalised); 0 keeps all")
    data: list[str] = _f([], "text files/directories (.txt, .jsonl, .parquet), hf:NAME, or packaged text: "
                         "corpus:python-docs, corpus:coqa-stories; none = the default corpus. "
                         "instruct: .jsonl files of {prompt, response} or {messages}; none = Natural Instructions")
    per_task: int = _f(100, "instruct without --data: Natural-Instructions examples per subtask (61 subtasks)")
    text_field: str = _f("text", "field of .jsonl records / parquet column holding the text")
    enc_len: int = _f(64, "encoder tokens per row (the paper: 4096)")
    dec_len: int = _f(64, "decoder tokens per row (the paper: 4096)")
    batch_size: int = _f(4, "rows per micro-batch on each process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    steps: int = _f(100, "optimizer steps")
    lr: float = _f(3e-5, "peak learning rate (3e-5 recovered the 270M best of 1e-5..3e-4: docs/adaptation.md)")
    min_lr_ratio: float = _f(0.1, "learning rate the decay reaches at step --steps, as a fraction of lr (as "
                                  "transformers' schedules do: the last step, --steps - 1, runs just above it)")
    warmup_steps: int = _f(10, "linear warm-up steps (T5Gemma 2: 100)")
    weight_decay: float = _f(0.01, "AdamW weight decay (never on norms and embeddings unless --decay-all)")
    decay_all: bool = _f(False, "apply weight decay to norms and embeddings too")
    clip: float = _f(1.0, "gradient-norm clipping (0: none, as transformers' max_grad_norm 0; the norm still logged)")
    precision: str = _f("auto", "autocast dtype of the matrix products (weights stay float32); auto: bf16 on GPUs "
                        "that compute it natively and CPUs with AVX512-BF16/AMX (timed only where PyTorch cannot "
                        "tell), decided once per run and kept on --resume", choices=PRECISIONS)
    cross_warmup_steps: int = _f(0, "first steps that train only cross-attention (unbalanced models; the paper: 1000)")
    freeze_encoder_steps: int = _f(0, "first steps with the encoder's layers (and its own embedding, where it has one) "
                                   "frozen, so that the decoder first learns to read the encoder (a shared embedding "
                                   "still trains)")
    encoder_curriculum_steps: int = _f(0, "first steps over which the encoder's attention opens from causal (like its "
                                       "source) to bidirectional: at step t it sees t/K of --enc-len positions ahead")
    eval_every: int = _f(50, "held-out evaluation every N steps (0: only at the end)")
    eval_windows: int = _f(32, "held-out windows, taken from the end of the data")
    eval_data: list[str] = _f([], "pretraining: a second held-out set, scored as eval_data_loss: files/directories as "
                              "--data takes, or heldout:general-english / heldout:python-docs (the packaged "
                              "held-out passages); its first --eval-windows windows")
    save_every: int = _f(100, "checkpoint every N steps (also on SIGINT/SIGTERM and at the end)")
    keep_last: int = _f(3, "checkpoints kept on disk (at least --average-last)")
    average_last: int = _f(1, "final model = average of the last N checkpoints (T5Gemma 2: 5)")
    loss_chunk: int = _f(256, "tokens per chunk of LM head + loss, so full-vocabulary logits never exist at once")
    log_every: int = _f(1, "metrics.jsonl line every N steps (and at every evaluation and checkpoint)")
    tensorboard: bool = _f(False, "also write TensorBoard logs to OUT/tensorboard "
                                  "(needs tensorboard: pip install -e '.[tensorboard]')")
    seed: int = _f(0, "seed of data order, objectives and any random initialisation")
    resume: bool = _f(False, "continue from the latest checkpoint in OUT")
    overwrite: bool = _f(False, "start afresh even if OUT holds a run")
    trim_vocab: int = _f(0, "keep N tokens in all: the special ones, then the data's most frequent; 0 keeps all")
    trim_negatives: int = _f(8192, "with --trim-vocab: untrained vocabulary rows sampled into each step's softmax, "
                             "so that the model stays good over the full vocabulary (0: none; it then degrades)")
    keep_freed_memory: bool = _f(True, "CPU: keep freed memory in the process (glibc) instead of page-faulting big "
                                 "tensors afresh every step; resident memory stays at the run's peak")
    fsdp: bool = _f(False, "with several processes: shard parameters with FSDP2 (fully_shard per block) instead of DDP")
    dist_timeout: float = _f(1800.0, "with several processes: seconds one waits for the others (as while the first "
                             "writes a large checkpoint) before the run stops; NCCL's own default is 600")

    def __post_init__(self) -> None:
        """Every value checked before any work starts: the first bad one is the one line the user sees."""
        for f in dataclasses.fields(self):
            _check_type(f, getattr(self, f.name))
            if f.name in USER_PATHS:  # "~/runs" from a YAML file or a quoted argument, as a shell would expand it
                value = getattr(self, f.name)
                if any("\0" in v for v in (value if isinstance(value, list) else [value])):  # YAML's "\0": a
                    # ValueError of the path's first use
                    raise EncdecError(f"--{_flag(f.name)} {value!r}: a path holds no NUL character")
                setattr(self, f.name, [expand_user(v) for v in value] if isinstance(value, list)
                        else expand_user(value))
                if f.name in ("model", "out", "teacher") and value is not None:  # data files of any name are read
                    check_utf8(value)
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise EncdecError(f"--{_flag(f.name)} {getattr(self, f.name)!r}: accepted: {', '.join(choices)}")
        for names, low in ((AT_LEAST_2, 2), (AT_LEAST_1, 1), (AT_LEAST_0, 0)):
            for name in names:
                if getattr(self, name) < low:
                    raise EncdecError(f"--{_flag(name)} must be at least {low}, got {getattr(self, name)}")
        for name in POSITIVE:  # (an integer of 400 digits from YAML: past every float, an OverflowError)
            value = getattr(self, name)
            finite = abs(value) < 1e300 if isinstance(value, int) else math.isfinite(value)
            if not (finite and value > 0):
                raise EncdecError(f"--{_flag(name)} must be a positive finite number, got {value!r:.40}")
        finite = abs(self.clip) < 1e300 if isinstance(self.clip, int) else math.isfinite(self.clip)
        if not (finite and self.clip >= 0):
            raise EncdecError(f"--clip must be a finite number, 0 or more (0: no clipping), got {self.clip!r:.40}")
        for name, (low, high) in BOUNDED.items():
            if not low <= getattr(self, name) <= high:  # NaN fails too
                raise EncdecError(f"--{_flag(name)} must be in [{low}, {high}], got {getattr(self, name)}")
        if self.seed > SEED_MAX:
            raise EncdecError(f"--seed must be at most {SEED_MAX}, got {self.seed}")
        if not self.out.strip():
            raise EncdecError("--out must name a directory, got an empty string")
        checked = ("data", "eval_data") if self.objective != "instruct" else ("data",)  # --eval-data: refused below
        for name in checked:  # "" is the working directory to Path
            if "" in [spec.strip() for spec in getattr(self, name)]:
                raise EncdecError(f"--{_flag(name)} {getattr(self, name)!r}: an empty path; pass files, directories"
                                  + (" or hf:NAME" if self.objective != "instruct" else " (.jsonl records)"))
        from encdec.data.tokens import check_packaged

        for spec in [*self.data, *self.eval_data]:  # a misspelt name, said before the model loads
            check_packaged(spec)
        if self.dist_timeout > MAX_DIST_TIMEOUT_S:
            raise EncdecError(f"--dist-timeout must be at most {MAX_DIST_TIMEOUT_S} seconds (a year), "
                              f"got {self.dist_timeout:g}")
        if any(spec.startswith("heldout:") for spec in self.data):
            raise EncdecError("--data heldout:NAME: the packaged held-out passages are only evaluated on (encdec "
                              "evaluate scores them); pass them to --eval-data")
        if 0 < self.window < MIN_WINDOW:
            raise EncdecError(f"--window {self.window}: 0 (the objective's own) or at least {MIN_WINDOW} tokens")
        if self.objective != "instruct":  # the exact bound (a leading BOS takes one) when data loads
            from encdec.training.data import window_length

            window_length(self.objective, self.enc_len, self.dec_len, False, self.window)
        if self.distill and self.objective != "prefixlm":
            raise EncdecError("--distill works with --objective prefixlm only")
        if self.resume and self.overwrite:
            raise EncdecError("--resume continues the run in --out and --overwrite starts it afresh: pass one of them")
        if self.eval_data and self.objective == "instruct":
            raise EncdecError("--eval-data works with pretraining objectives only (prefixlm, ul2)")
        if self.tensorboard:  # before --overwrite removes anything, and on every process (only the first writes
            # the logs: alone, it would stop while the others waited); imported, not found: a broken install (a
            # protobuf of another version) failed as the metrics opened, the previous run deleted by then
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - what the metrics write with
            except Exception as e:  # noqa: BLE001 - a broken install raises what its own imports raise
                raise EncdecError(f"--tensorboard needs a working tensorboard package (pip install -e "
                                  f"'.[tensorboard]'); importing it failed: {first_line(e)}") from None
        self.keep_last = max(self.keep_last, self.average_last)

    def check_joined(self, stack: StackConfig | None, who: str) -> None:
        """A decoder-only model (the one trained, or the distillation teacher) reads an example's input and target
        as one sequence: up to --enc-len + --dec-len - 1 positions, within those its source was trained for."""
        positions = self.enc_len + self.dec_len - 1
        if stack is not None and stack.max_positions is not None and positions > stack.max_positions:
            raise EncdecError(f"--enc-len {self.enc_len} + --dec-len {self.dec_len}: {who} (decoder-only) reads each "
                              f"example as one sequence of up to {positions} positions, more than the "
                              f"{stack.max_positions} its source was trained for (max_position_embeddings); shorten "
                              "them")

    def check_fit(self, model: EncDecConfig | None, vocab_size: int, train_items: int, world: int,
                  joined: StackConfig | None = None) -> None:
        """What can only be checked once model and data are loaded, before the first step: rows within the
        positions the model's source was trained for (`model`, an encoder-decoder's configuration, or `joined`, a
        decoder-only model's stack: check_joined), a top-k within the `vocab_size` tokens, and a batch that one
        pass over the data fills (a larger one would only repeat it)."""
        if model is not None:
            for name, stack in (("enc_len", model.encoder), ("dec_len", model.decoder)):
                if stack.max_positions is not None and getattr(self, name) > stack.max_positions:
                    raise EncdecError(f"--{_flag(name)} {getattr(self, name)}: the model reads at most "
                                      f"{stack.max_positions} positions (its source's max_position_embeddings)")
        self.check_joined(joined, "the model")
        if self.distill and self.teacher_top_k > vocab_size:
            trained = f" trained on (--trim-vocab {self.trim_vocab})" if self.trim_vocab else ""
            raise EncdecError(f"--teacher-top-k {self.teacher_top_k} exceeds the {vocab_size} tokens of the "
                              f"vocabulary{trained}; 0 keeps them all")
        if train_items < world:
            raise EncdecError(f"the data holds {train_items} training windows/examples, fewer than the {world} "
                              "processes that each need one; give more data or run fewer processes")
        if self.batch_size * self.grad_accum * world > train_items:  # a step would repeat rows within itself
            fits = train_items // (world * self.grad_accum)  # the largest batch at this --grad-accum: 0, none fits
            advice = (f"use at most --batch-size {fits} (or a lower --grad-accum)" if fits else
                      f"use at most --grad-accum {train_items // world} at --batch-size 1")
            raise EncdecError(f"--batch-size {self.batch_size} x --grad-accum {self.grad_accum} x {world} process(es) "
                              f"needs more rows a step than the {train_items} training windows/examples of the data "
                              f"hold; {advice}")


SEED_MAX = 2**63 - 1  # the largest seed torch.manual_seed accepts
MIN_WINDOW = 8  # tokens: room for a PrefixLM split and for UL2's spans and sentinels
# the numeric fields' accepted ranges
AT_LEAST_2 = ("dec_len",)  # a target token and EOS
AT_LEAST_1 = ("enc_len", "batch_size", "grad_accum", "steps", "loss_chunk", "keep_last", "average_last",
              "save_every", "log_every", "eval_windows", "per_task")
AT_LEAST_0 = ("window", "eval_every", "warmup_steps", "cross_warmup_steps", "freeze_encoder_steps",
              "encoder_curriculum_steps", "trim_vocab", "trim_negatives", "teacher_top_k", "seed")
POSITIVE = ("lr", "tau", "dist_timeout")  # and finite
MAX_DIST_TIMEOUT_S = 365 * 24 * 3600  # what torch's timedelta takes, with room
BOUNDED = {"alpha": (0.0, 1.0), "min_lr_ratio": (0.0, 1.0), "weight_decay": (0.0, 1.0)}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list of paths"}


def _kind(f: dataclasses.Field) -> type:
    """A field's value type: its default's, or the declared one where the default is None (unset)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f.metadata.get("kind", type(default))


def _check_type(f: dataclasses.Field, value: Any) -> None:
    """YAML gives any type: a value must have its field's (an integer counts as a number); None leaves an
    optional field unset."""
    if value is None and f.default is None:
        return
    kind = _kind(f)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise EncdecError(f"--{_flag(f.name)} must be {_TYPE_NAMES[kind]}, got {_shown(value)} "
                          f"({type(value).__name__})")


def _shown(value: Any) -> str:
    """A value's repr, shortened: a few lines of YAML aliases expand to billions of items, whose repr never ended."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxstring = 2, 4, 4, 4, 60
    return short.repr(value)


def user_path(text: str) -> Path:
    """argparse type of every path option: `~` expanded, as the shell does not in `--out=~/x`; an empty one (an
    unset $VARIABLE) refused: it read the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset variable?); give a path")
    try:
        return Path(expand_user(text))
    except EncdecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def given(text: str) -> str:
    """argparse type of a MODEL that may be a path or a name: an empty one (an unset $MODEL) refused, and a leading
    `~` expanded (no model name has one), as `user_path` does (pathlib's expansion of an unknown ~user was a
    traceback of serve, evaluate and classify)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty (an unset variable?); give a checkpoint directory or a model name")
    try:
        check_utf8(text)
        return expand_user(text) if text.startswith("~") else text
    except EncdecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _GivenOnce(argparse.Action):
    """An option given once: a second --config replaced the first file whole, silently (its data and steps)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}): one file is read; "
                         "put the settings in one file, or give the others as options, which override the file's")
        setattr(namespace, self.dest, values)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                  skip: tuple[str, ...] = (), docs: dict[str, str] | None = None,
                  shown: dict[str, tuple[str, ...]] | None = None) -> None:
    """One option per field (but `skip`); `defaults` and `docs` replace the dataclass defaults and help texts for a
    sub-command, `shown` the choices its help shows (the others still reach the sub-command, which may answer one
    with a line of its own). argparse defaults are not set so that only given options override the YAML."""
    parser.add_argument("--config", type=user_path, metavar="FILE.yaml", action=_GivenOnce,
                        help="YAML file of any of the options below")
    defaults = defaults or {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        helptext = (docs or {}).get(f.name, f.metadata["doc"])
        if default not in (None, "") and "(default" not in helptext:  # (one the text names is not said twice)
            helptext += f" (default: {default!r})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": helptext, "dest": f.name}
        if _kind(f) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):  # --data a --data b: both; --data alone: none (clearing a --config file's)
            kwargs.update(nargs="*", metavar="PATH", action="extend")
            kwargs["help"] += "; given with no value, none (over a --config file's)"
        else:
            kwargs["type"] = type(default)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                if f.name in (shown or {}):
                    kwargs["metavar"] = "{" + ",".join(shown[f.name]) + "}"
        parser.add_argument(f"--{_flag(f.name)}", **kwargs)


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:  # the keys written here (merged ones, `<<`, may be overridden)
            if key_node.tag != "tag:yaml.org,2002:str":
                continue  # other keys are no option names: refused after loading, or by PyYAML itself
            key = self.construct_object(key_node, deep=deep).replace("-", "_")
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path, what: str) -> Any:
    """A YAML file (`what` it holds, for the messages) read with a safe loader that refuses a key given twice; every
    way it fails is one line: unreadable, not UTF-8, not YAML, a key twice, nested too deeply, a device or past
    MAX_SMALL_BYTES (`read_named`: a pipe is read, as `<(envsubst < run.yaml)` makes one)."""
    try:  # YAML is UTF-8, whatever the locale
        return yaml.load(read_named(Path(path)).decode("utf-8"), Loader=_UniqueKeys)
    except OSError as e:
        raise EncdecError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise EncdecError(f"{path}: cannot read {what} (not UTF-8: byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or e
        raise EncdecError(f"{path}: cannot read {what} ({where}{problem})") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise EncdecError(f"{path}: cannot read {what} (nested too deeply)") from None
    except ValueError as e:  # a scalar that looks like a date or a number but is none (2024-02-30, 0x_)
        raise EncdecError(f"{path}: cannot read {what} ({e})") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and Path(path).exists() and not Path(path).is_file():
        raise EncdecError(f"--config {path}: not a file; each process of a distributed run reads the configuration, "
                          "and a pipe (/dev/stdin, <(...)) gives it to one of them alone: write it to a file")
    loaded = load_yaml(path, "the YAML configuration") or {}
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise EncdecError(f"{path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in loaded.items()}


def _number_from_yaml(f: dataclasses.Field, value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads 3e-5 and 1e3 as strings (it wants 3.0e-5, 1.0e+3); a number field takes them as the
    number, an integer field when the number is a whole one, as it takes a whole float (1.0e+3, 100.0: refused,
    where 1e3 was read as 1000)."""
    if _kind(f) is int and type(value) is float and value.is_integer():
        return int(value)
    if _kind(f) in (float, int) and isinstance(value, str):
        with contextlib.suppress(ValueError, OverflowError):
            number = float(value)
            if _kind(f) is float:
                return number
            if number.is_integer():
                return int(number)
    return value


def from_arguments(args: argparse.Namespace, defaults: dict[str, Any] | None = None, command: str = "pretrain",
                   hidden: tuple[str, ...] = ()) -> TrainConfig:
    """Defaults (the dataclass's, then the sub-command's), then the YAML file, then the command line. The command
    line wins also where two settings exclude each other: `--resume` clears the file's `overwrite` (and the
    reverse), an `--objective` other than prefixlm the file's `distill`. `hidden`: options the sub-command does
    not have, refused in the file as on the command line."""
    values: dict[str, Any] = dict(defaults or {})
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    loaded: dict[str, Any] = {}
    if getattr(args, "config", None):
        loaded = _read_yaml(args.config)
        unknown = sorted(set(loaded) - set(fields) | set(loaded) & set(hidden))
        if unknown:
            raise EncdecError(f"{args.config}: unknown option(s) {unknown} for `encdec {command}`; run "
                              f"`encdec {command} --help` for the list")
        values.update({k: _number_from_yaml(fields[k], v) for k, v in loaded.items()})
    given = {k: v for k, v in vars(args).items() if k in fields}
    emptied = [k for k, v in given.items() if v == [] and k not in loaded]
    if emptied:  # `--data $UNSET` in a job script: hours on other data, had it been read as "none"
        raise EncdecError(f"--{_flag(emptied[0])} needs at least one value (given alone, it clears the list of a "
                          "--config file that sets one)")
    same = (lambda a, b: os.path.abspath(os.path.expanduser(str(a))) == os.path.abspath(os.path.expanduser(str(b))))
    if command == "finetune" and values.get("model") and not same(values["model"], given.get("model")):
        log.warning("%s: model %r is not used; `encdec finetune` trains MODEL, its first argument (%s)", args.config,
                    values["model"], given.get("model"))
    for flag, cleared in (("resume", "overwrite"), ("overwrite", "resume")):
        if given.get(flag) and cleared not in given:
            values[cleared] = False
    if given.get("objective", "prefixlm") != "prefixlm" and "distill" not in given:
        values.pop("distill", None)
    values.update(given)
    return TrainConfig(**values)


# `encdec finetune`: instruction tuning with the same loop; options that only pretraining uses are hidden
FINETUNE_DEFAULTS: dict[str, Any] = {
    "objective": "instruct", "out": "runs/finetune", "enc_len": 512, "dec_len": 128, "lr": 2e-5, "steps": 200,
    "warmup_steps": 20, "eval_every": 50, "eval_windows": 64,
}
FINETUNE_DOCS: dict[str, str] = {
    "data": ".jsonl files (or directories of them) of {prompt, response} or {messages: [...]} records; none = the "
            "Natural-Instructions tasks of the bigbench package",
    "per_task": "without --data: Natural-Instructions examples per subtask (61 subtasks)",
    "enc_len": "prompt tokens per example (a longer prompt keeps its last ones)",
    "dec_len": "response tokens per example, EOS included (a longer response keeps its first ones)",
    "lr": "peak learning rate",
    "eval_windows": "held-out examples, taken from the end of the shuffled examples",
}
PRETRAIN_DOCS: dict[str, str] = {  # what `encdec pretrain --help` says (instruct is `encdec finetune`'s, refused here)
    "objective": "prefixlm or ul2 (instruction tuning is `encdec finetune`)",
    "data": "text files/directories (.txt, .jsonl, .parquet), hf:NAME, or packaged text: corpus:python-docs, "
            "corpus:coqa-stories; none = the default corpus",
}
PRETRAIN_HIDDEN = ("per_task",)
PRETRAIN_SHOWN = {"objective": ("prefixlm", "ul2")}  # instruct is refused with a line naming `encdec finetune`
FINETUNE_HIDDEN = ("model", "objective", "mixture", "random_split", "window", "distill", "teacher", "alpha", "tau",
                   "teacher_top_k", "text_field", "cross_warmup_steps", "eval_data", "freeze_encoder_steps",
                   "encoder_curriculum_steps")
# refused in a finetune YAML file: all of them but MODEL (the positional argument wins over the file's, as any flag
# does) and the objective (which `encdec finetune` answers by naming `encdec pretrain`)
FINETUNE_NOT_IN_FILE = tuple(name for name in FINETUNE_HIDDEN if name not in ("model", "objective"))
