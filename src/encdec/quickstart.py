"""The main job on the built-in default: adapt the packaged Gemma 3 270M into a 270M-270M
encoder-decoder, compare it with its decoder-only source, then run a short PrefixLM + distillation
adaptation on the default corpus and compare again."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from encdec.adapt import adapt
from encdec.checkpoint import SAVED, load, save
from encdec.data.corpus import HELDOUT_SETS
from encdec.data.text import check_text
from encdec.errors import EncdecError
from encdec.evaluation.nll import PrefixSuffix, decoder_only_suffix_nll, encdec_suffix_nll, split_passages
from encdec.files import check_output_dir
from encdec.logs import timed
from encdec.model import EncoderDecoder
from encdec.report import describe, parameter_table
from encdec.sources import load_source, load_tokenizer, transformers_causal_lm
from encdec.training.config import TrainConfig
from encdec.training.distributed import Dist
from encdec.training.loop import train
from encdec.training.rundir import foreign_output, locked, remove_outputs, started_from, training_record
from encdec.training.vocab import always_kept, check_trim_size

SOURCE = "gemma-3-270m"
LOCK = ".encdec-quickstart.lock"  # held in OUT while a quickstart writes there (encdec.training.rundir.locked)


def _is_adapted_dir(started: Path, adapted_dir: Path) -> bool:
    """Whether a run that started from `started` (as its checkpoint records it) started from OUT/adapted: the same
    directory, or a relative path ending as it does (recorded from another working directory)."""
    if started.expanduser().resolve() == adapted_dir.resolve():
        return True
    return not started.is_absolute() and started.parts[-2:] == adapted_dir.resolve().parts[-2:]


def _run_origin(run_dir: Path) -> str | None:
    """The --model a training run in `run_dir` started from: as its newest checkpoint records it, else as its final
    model's provenance does (a run's checkpoints may have been deleted, its model kept)."""
    started = started_from(run_dir)
    if started is None and (run_dir / "model").is_dir():
        started = (training_record(run_dir / "model") or {}).get("from")
    return started if isinstance(started, str) else None


def _check_own_run(run_dir: Path, adapted_dir: Path, steps: int) -> None:
    """--overwrite replaces the quickstart's own run, not one that sits in OUT/pretrain (encdec pretrain's default
    --out is runs/pretrain): refused where that run trained another model, or where a final model's origin is not
    recorded at all. A link there is trained through, so what it leads to is checked; with --steps 0 the link
    alone goes."""
    if run_dir.is_symlink():
        if not steps:
            return
        run_dir = run_dir.resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise EncdecError(f"{run_dir} is not a directory, where the quickstart writes its training run; remove it or "
                          "choose another --out")
    foreign = foreign_output(run_dir) if run_dir.is_dir() else None
    if foreign:  # --overwrite deletes a run's outputs, not another folder of one of their names
        raise EncdecError(f"{run_dir / foreign[0]} is not what a run writes there ({foreign[1]}), which --overwrite "
                          "does not replace; choose another --out, or remove it yourself")
    started = _run_origin(run_dir)
    if started is not None and not _is_adapted_dir(Path(started), adapted_dir):
        raise EncdecError(f"{run_dir} holds a training run of {started}, not of {adapted_dir}, which --overwrite does "
                          "not replace (encdec pretrain's default --out is runs/pretrain); choose another --out")
    if started is None and (run_dir / "model").is_dir() and any((run_dir / "model").iterdir()):
        raise EncdecError(f"{run_dir}/model holds a model that does not record what it was trained from, which "
                          "--overwrite does not replace; choose another --out")


MAX_NEW_TOKENS = 4096


def _continuation(model: EncoderDecoder, tokenizer, prompt: str, max_new_tokens: int) -> str:
    batch = tokenizer([prompt], return_tensors="pt")
    out = model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def run(out: Path, *, overwrite: bool, prompt: str, max_new_tokens: int, steps: int, trim_vocab: int) -> None:
    for flag, value, low in (("--max-new-tokens", max_new_tokens, 1), ("--steps", steps, 0),
                             ("--trim-vocab", trim_vocab, 0)):
        if value < low:  # checked before minutes of loading and adapting, not after
            raise EncdecError(f"{flag} must be at least {low}, got {value}")
    if max_new_tokens > MAX_NEW_TOKENS:  # 10^14 loaded, adapted and saved the model before any word on it
        raise EncdecError(f"--max-new-tokens must be at most {MAX_NEW_TOKENS} (the quickstart shows a continuation "
                          f"of the prompt; encdec generate writes longer ones), got {max_new_tokens}")
    if not prompt.strip():
        raise EncdecError("--prompt is empty; give a text to continue")
    check_text(prompt, "--prompt")
    # (LOCK: a killed quickstart's lock file); written into, not replaced beside itself
    check_output_dir(out, overwrite, replaces=("adapted", "pretrain", LOCK), into=True)
    with locked(out, Dist(), lock=LOCK):  # a second quickstart into OUT is refused now, not after minutes of work
        _run(out, overwrite, prompt, max_new_tokens, steps, trim_vocab)


def _run(out: Path, overwrite: bool, prompt: str, max_new_tokens: int, steps: int, trim_vocab: int) -> None:
    adapted_dir, run_dir = out / "adapted", out / "pretrain"
    check_output_dir(adapted_dir, overwrite, replaces=("config.json",), kind=SAVED)  # as save() will, before work
    _check_own_run(run_dir, adapted_dir, steps)
    if run_dir.is_dir() and not run_dir.is_symlink():  # a run training there now (`encdec pretrain --resume` of
        with locked(run_dir, Dist()):  # it): refused before its start model, adapted/, is replaced under it
            pass
    with timed(f"loading {SOURCE}"):
        source = load_source(SOURCE)
        tokenizer = load_tokenizer(source.directory)
    if steps and trim_vocab:  # before adapting and saving: nothing written for a run that cannot start
        check_trim_size(trim_vocab, always_kept(tokenizer, "prefixlm"))
    with timed("adapting to a balanced encoder-decoder with merged attention"):
        model = adapt(source)
    with timed(f"saving to {adapted_dir}"):
        fmt = save(model, adapted_dir, tokenizer_dir=source.directory, overwrite=overwrite)
    with timed("loading the decoder-only source in transformers, for comparison"):
        reference = transformers_causal_lm(source.directory, torch.float32)

    print(f"\nAdapted model: {adapted_dir} (format {fmt}; transformers: AutoModelForSeq2SeqLM.from_pretrained)")
    print(describe(model))
    print("Parameters:")
    print(parameter_table(model))
    print(f"  (decoder-only source: {sum(p.numel() for p in reference.parameters()):,})")
    batch = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():  # method.md's invariant: with the encoder fully masked, the decoder is the source
        masked = model(batch.input_ids, torch.zeros_like(batch.input_ids), batch.input_ids).logits
        gap = (masked - reference(input_ids=batch.input_ids).logits).abs().max().item()
    print(f"  check: decoder with a fully masked encoder vs the source, max |logit difference| = {gap:.2e}")

    sets = {name: split_passages(tokenizer, passages(), prefix_len=64, suffix_len=64)
            for name, (_, passages) in HELDOUT_SETS.items()}
    with timed("held-out suffix NLL on both held-out sets, and greedy continuations"):
        rows = [("decoder-only source (reads prefix+suffix causally)",
                 {name: decoder_only_suffix_nll(reference, data) for name, data in sets.items()}),
                ("adapted encoder-decoder, before training",
                 {name: encdec_suffix_nll(model, data) for name, data in sets.items()})]
        with torch.no_grad():
            src_ids = reference.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        texts = [("decoder-only source", tokenizer.decode(src_ids[0, batch.input_ids.shape[1]:], skip_special_tokens=True)),
                 ("adapted, before training", _continuation(model, tokenizer, prompt, max_new_tokens))]
    del model, reference

    if not steps and run_dir.is_symlink():  # --overwrite: no earlier run's training stays beside the new model
        run_dir.unlink()  # (what it leads to stays: it was followed by nothing)
    elif not steps and run_dir.exists():
        with locked(run_dir, Dist()):  # refused while a run trains there
            remove_outputs(run_dir)  # a run's outputs only: a file of the user's there stays, with the folder
        with contextlib.suppress(OSError):
            run_dir.rmdir()
    if steps:
        cfg = TrainConfig(model=str(adapted_dir.resolve()), out=str(run_dir), distill=True, steps=steps, enc_len=64,
                          dec_len=64, batch_size=4, warmup_steps=max(1, steps // 10), eval_every=0, eval_windows=16,
                          save_every=steps, trim_vocab=trim_vocab, overwrite=True)
        vocabulary = (f"vocabulary trimmed to the corpus's {trim_vocab:,} most frequent tokens at most, for speed "
                      "(mapped back when saved)" if trim_vocab else "the whole vocabulary")
        print(f"\nPrefixLM + distillation on the default corpus: {steps} steps of 4 rows x (64 + 64) tokens at lr "
              f"{cfg.lr:g}, {vocabulary}")
        final = train(cfg, again="`encdec quickstart --overwrite` runs the whole job again")  # it has no --resume
        trained = load(final)
        with timed("held-out suffix NLL after training"):
            rows.append((f"adapted encoder-decoder, after {steps} steps",
                         {name: encdec_suffix_nll(trained, data) for name, data in sets.items()}))
            texts.append((f"adapted, after {steps} steps", _continuation(trained, tokenizer, prompt, max_new_tokens)))
    _report(prompt, texts, rows, sets)


def _report(prompt: str, texts: list[tuple[str, str]], rows: list[tuple[str, dict[str, float]]],
            sets: dict[str, PrefixSuffix]) -> None:
    print(f"\nGreedy continuation of {prompt!r}:")
    width = max(len(name) for name, _ in texts)
    for name, text in texts:
        print(f"  {name:<{width}} : {text!r}")
    print("\nHeld-out suffix NLL (nats/token; 64-token prefix -> 64-token suffix; never trained on):")
    for name, data in sets.items():
        print(f"  {name}: {len(data.prefix)} passages of {HELDOUT_SETS[name][0]}")
    width = max(len(name) for name, _ in rows)
    print(f"  {'':<{width}}   " + "  ".join(f"{name:>15}" for name in sets))
    for name, values in rows:
        print(f"  {name:<{width}} : " + "  ".join(f"{values[s]:15.3f}" for s in sets))
