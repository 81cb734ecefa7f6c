"""What a run trains and on what: the model to train (trimmed to a smaller vocabulary or not), the
example stream and the held-out examples, built from the configuration."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from encdec.checkpoint import is_checkpoint, load_checkpoint
from encdec.data.tokens import check_apart_from_training, check_files, leading_bos, token_stream, windows
from encdec.errors import EncdecError
from encdec.model import CausalLM, EncoderDecoder
from encdec.objectives import Example, spans_wanted, special_token_ids, too_few_sentinels
from encdec.sources import DecoderOnlySource, load_tokenizer
from encdec.training import distributed
from encdec.training.config import TrainConfig
from encdec.training.data import ExampleStream, example_maker, window_length
from encdec.training.recipe import check_recipe
from encdec.training.vocab import (
    UL2_SENTINELS,
    Trainable,
    UntrainedRows,
    always_kept,
    kept_tokens,
    remap_table,
    trim_model,
    untrained_rows,
    with_ul2_tokens,
)

log = logging.getLogger("encdec")


@dataclass
class Plan:
    """What a run trains and on what: the model, the example stream and the held-out examples."""

    model: nn.Module  # EncoderDecoder, or CausalLM when training a decoder-only model on the same examples
    stream: ExampleStream
    eval_examples: list[Example]
    vocab_size: int  # of the full vocabulary (the teacher's)
    eos_id: int  # the id (in the trained vocabulary) that ends every example's targets
    trimmed: Trimmed | None = None  # the vocabulary the model is trained on, when trimmed
    source: DecoderOnlySource | None = None  # the decoder-only model's source (config, tokenizer)
    extra_eval: list[Example] = dataclasses.field(default_factory=list)  # --eval-data's held-out examples
    tokenizer: object = None  # the run's tokenizer (UL2 may have added its tokens to a copy)

    @property
    def causal(self) -> bool:
        return isinstance(self.model, CausalLM)

    @property
    def keep(self) -> np.ndarray | None:
        return None if self.trimmed is None else self.trimmed.keep


@dataclass
class Trimmed:
    """A trimmed vocabulary: which tokens are kept, how ids map, and the head rows left untrained."""

    keep: np.ndarray  # kept full-vocabulary ids, ascending
    table: np.ndarray  # full id -> kept id (<unk> for the others)
    untrained: UntrainedRows
    unk_id: int  # kept id of <unk>, which every other token became


def _trim(cfg: TrainConfig, model: Trainable, tokenizer, ids: np.ndarray, eos: int, d: distributed.Dist,
          source: DecoderOnlySource | None = None, length: int = 0) -> tuple[Trainable, Trimmed]:
    """The model over the N most frequent tokens of `ids`, and the id table mapping full ids to kept ones. The
    dropped tokens become <unk>, which targets are not scored on, so it must not be `eos`, which ends them, nor
    any id the model reads as a start or an end (Qwen's pad token is its config's BOS, the adapted decoder's start:
    every dropped token read as one). UL2 keeps as many sentinels as a `length`-token window wants (128 at least),
    as the full vocabulary offers them: a trimmed run poses the same objective."""
    # the ids the model's config names are kept whether or not the data holds them: a dropped EOS would end every
    # target as <unk>, unscored, a dropped BOS start the decoder from <unk>'s row
    # (a decoder-only model's are its source's: Qwen's pad token is also its BOS and a generation EOS)
    config = model.config if isinstance(model, EncoderDecoder) else None
    special = source.special_tokens if source is not None else {}
    named = ((config.pad_token_id, config.bos_token_id, *config.eos_token_ids) if config is not None else
             (special.get("pad_token_id"), special.get("bos_token_id"), *(special.get("eos_token_ids") or ())))
    ends = {eos, tokenizer.eos_token_id, *named[1:]}
    rows = model.embed.num_embeddings  # a tokenizer's special token past them (Gemma 3's <image_soft_token>, in a
    # text model) has no row to keep, and no text holds it
    unk = tokenizer.unk_token_id
    if unk in ends or unk is not None and unk >= rows:  # GPT-2-style tokenizers name their EOS <unk> too: no EOS
        unk = None  # target would be scored
    pad = tokenizer.pad_token_id
    if unk is None and pad not in (None, *ends) and pad < rows:
        unk = pad  # a token no target is, as <unk> would be
    if unk is None:
        raise EncdecError("--trim-vocab maps the tokens it drops to <unk> (or to a pad token that is neither a BOS "
                          "nor an EOS), and this tokenizer has neither; train without --trim-vocab")
    sentinels = max(UL2_SENTINELS, spans_wanted(cfg.mixture, length))
    always = {i for i in (*always_kept(tokenizer, cfg.objective, sentinels), unk, *ends, *named)
              if i is not None and i < rows}
    keep = kept_tokens(ids, cfg.trim_vocab, sorted(always), rows)
    table = remap_table(keep, rows, unk)
    untrained = untrained_rows(model, keep, cfg.trim_negatives, cfg.seed)
    if d.main:
        log.info("training on a vocabulary of %d tokens (of %d), with %d sampled untrained rows per step",
                 len(keep), len(table), min(cfg.trim_negatives, len(untrained.rows)))
    return trim_model(model, keep, table), Trimmed(keep, table, untrained, int(table[unk]))


def _pretraining_plan(cfg: TrainConfig, model: Trainable, tokenizer, d: distributed.Dist,
                      source: DecoderOnlySource | None) -> Plan:
    """Windows of the data through the objective; a decoder-only model (`source` given) reads each example's
    inputs + targets causally and is scored on the targets, so it trains on exactly the same tokens."""
    if cfg.objective == "ul2":
        model, tokenizer, note = with_ul2_tokens(model, tokenizer)
        if d.main:
            log.info("%s", note)
    if cfg.eval_data:  # before minutes of tokenizing
        check_apart_from_training(cfg.data, cfg.eval_data)
    bos = leading_bos(tokenizer)  # the window's limit counts it: said before minutes of tokenizing
    length = window_length(cfg.objective, cfg.enc_len, cfg.dec_len, bos is not None, cfg.window)
    extra_ids = None
    if cfg.eval_data:  # tokenized first: a file it cannot read, or too short for a window, fails before the corpus
        extra_ids = token_stream(tokenizer, cfg.eval_data, text_field=cfg.text_field)
        windows(extra_ids, length, "--eval-data")
    stream_ids = token_stream(tokenizer, cfg.data, text_field=cfg.text_field)
    vocab, trimmed, vocab_size = tokenizer.get_vocab(), None, model.embed.num_embeddings
    eos = tokenizer.eos_token_id if source is not None else model.config.eos_token_ids[0]
    training_windows = len(stream_ids) // length - cfg.eval_windows  # the last windows are held out
    if training_windows < 1:
        raise EncdecError(f"the data makes {len(stream_ids) // length} windows, not more than --eval-windows "
                          f"{cfg.eval_windows}")
    if cfg.trim_vocab:  # the kept tokens are counted on the training windows only, never on held-out text
        model, trimmed = _trim(cfg, model, tokenizer, stream_ids[: training_windows * length], eos, d, source,
                                length)
        keep, table = trimmed.keep, trimmed.table
        stream_ids, eos = table[stream_ids], int(table[eos])
        bos = None if bos is None else int(table[bos])
        vocab = {token: int(table[i]) for token, i in vocab.items() if i < len(table) and keep[table[i]] == i}
    if cfg.objective == "ul2" and d.main:
        for line in too_few_sentinels(cfg.mixture, length, len(special_token_ids(vocab)[1])):
            log.warning("%s", line)
    data = windows(stream_ids, length, "the training data")
    make = example_maker(cfg.objective, eos_id=eos, vocab=vocab, enc_len=cfg.enc_len, dec_len=cfg.dec_len,
                         bos_id=bos, mixture=cfg.mixture,
                         random_split=cfg.random_split)
    stream = ExampleStream(data[: -cfg.eval_windows], lambda w, rng: make(w.tolist(), rng), seed=cfg.seed,
                           enc_len=cfg.enc_len, dec_len=cfg.dec_len)
    eval_rng = np.random.default_rng([cfg.seed, 2])
    held_out = [make(w.tolist(), eval_rng) for w in data[-cfg.eval_windows :]]
    extra = []
    if extra_ids is not None:  # another held-out set (e.g. another domain): its first windows
        extra_ids = extra_ids if trimmed is None else trimmed.table[extra_ids]
        extra = [make(w.tolist(), eval_rng) for w in windows(extra_ids, length, "--eval-data")[: cfg.eval_windows]]
    return Plan(model, stream, held_out, vocab_size, eos, trimmed, source, extra, tokenizer)


def _instruction_plan(cfg: TrainConfig, model: nn.Module, tokenizer, d: distributed.Dist,
                      source: DecoderOnlySource | None) -> Plan:
    """Prompt -> response examples in Gemma's chat format (loss on the response, which ends with EOS)."""
    from encdec.data.chat import ChatFormat
    from encdec.data.instructions import answer_end, chat_example, read_instructions
    from encdec.data.natural_instructions import natural_instructions

    eos, chat = tokenizer.eos_token_id, ChatFormat.of(tokenizer)
    answer_end(tokenizer, chat, eos, cfg.enc_len, cfg.dec_len)  # the lengths checked before the data is read
    pairs = read_instructions(cfg.data) if cfg.data else natural_instructions(cfg.per_task, seed=cfg.seed)
    order = np.random.default_rng([cfg.seed, 3]).permutation(len(pairs))
    if d.main:
        log.info("chat format: %s", "the tokenizer's chat template" if chat.templated else "Gemma's chat turns")
    cut: Counter = Counter()
    examples = [chat_example(pairs[i], tokenizer, eos_id=eos, max_input=cfg.enc_len, max_target=cfg.dec_len, chat=chat,
                             cut=cut) for i in order]
    lost = (("prompt", "enc-len", cfg.enc_len, "their beginning"),
            ("response", "dec-len", cfg.dec_len, ("their end (a cut answer still ends its turn there, and the model "
                                                  "learns to stop where the row ends)")))
    for side, flag, value, what in lost if d.main else ():
        if cut[side]:
            log.warning("%d of %d %ss are longer than --%s %d holds and lose %s; raise it to keep them whole",
                        cut[side], len(examples), side, flag, value, what)
    if len(examples) <= cfg.eval_windows:
        raise EncdecError(f"{len(examples)} instruction examples are not more than --eval-windows {cfg.eval_windows}")
    # instruction sets repeat records: a held-out example's copies are not trained on (its loss was a training loss)
    held_out = {(tuple(e.inputs), tuple(e.targets)) for e in examples[-cfg.eval_windows :]}
    training = [e for e in examples[: -cfg.eval_windows] if (tuple(e.inputs), tuple(e.targets)) not in held_out]
    if not training:  # one record repeated: trained on all the same, and said
        if d.main:
            log.warning("every training example is a copy of one of the --eval-windows %d held out: the held-out loss "
                        "is a training loss (the data holds too few distinct records)", cfg.eval_windows)
    elif len(training) < len(examples) - cfg.eval_windows:
        if d.main:
            log.info("left out of training: %d copies of held-out examples",
                     len(examples) - cfg.eval_windows - len(training))
        examples = [*training, *examples[-cfg.eval_windows :]]
    trimmed, vocab_size = None, model.embed.num_embeddings
    if cfg.trim_vocab:
        # the training examples' tokens only, as pretraining counts its training windows: the held-out examples
        # must not choose what is kept (their tokens outside it are scored as the unknown token)
        ids = np.concatenate([np.asarray(e.inputs + e.targets) for e in examples[: -cfg.eval_windows]])
        model, trimmed = _trim(cfg, model, tokenizer, ids, eos, d, source)
        table = trimmed.table
        examples = [Example(table[e.inputs].tolist(), table[e.targets].tolist()) for e in examples]
        eos = int(table[eos])
    held_out = examples[-cfg.eval_windows :]
    stream = ExampleStream(examples[: -cfg.eval_windows], lambda e, rng: e, seed=cfg.seed, enc_len=cfg.enc_len,
                           dec_len=cfg.dec_len)
    if d.main:
        log.info("instruction tuning on %d examples (%d held out)", len(examples) - len(held_out), len(held_out))
    return Plan(model, stream, held_out, vocab_size, eos, trimmed, source, tokenizer=tokenizer)


def check_data_files(cfg: TrainConfig) -> None:
    """The run's data files, checked before the model loads (minutes for a large one): a mistyped path, a device
    or a pipe, a file that cannot be read (a first record of the wrong shape is found when the data is read)."""
    if cfg.objective == "instruct":
        from encdec.data.instructions import check_instruction_files

        check_instruction_files(cfg.data)
    else:
        check_files([*cfg.data, *cfg.eval_data], cfg.text_field)


def build_plan(cfg: TrainConfig, d: distributed.Dist) -> tuple[Plan, object]:
    """Load the model to train (an encoder-decoder checkpoint, or a decoder-only source) and its data."""
    check_data_files(cfg)
    if is_checkpoint(cfg.model):
        model, source = load_checkpoint(cfg.model).model.train(), None
        tokenizer = load_tokenizer(Path(cfg.model))
    else:
        from encdec.causal import load_causal

        try:
            model, source = load_causal(cfg.model)
        except EncdecError as e:
            given = "MODEL" if cfg.objective == "instruct" else "--model"  # finetune's positional argument
            raise EncdecError(f"{given}: not an encoder-decoder checkpoint (from `encdec adapt`), nor a "
                              f"decoder-only source ({e})") from None
        model.train()
        tokenizer = load_tokenizer(source.directory)
    if tokenizer.eos_token_id is None:  # a None in the token stream: a TypeError's traceback, after the tokenizing
        raise EncdecError(f"{cfg.model}: its tokenizer names no EOS token, which ends every document and answer "
                          "encdec trains on; name one (eos_token in tokenizer_config.json)")
    check_recipe(cfg, model, source is not None)  # before the data is read and tokenized
    make = _instruction_plan if cfg.objective == "instruct" else _pretraining_plan
    plan = make(cfg, model, tokenizer, d, source)
    return plan, plan.tokenizer
