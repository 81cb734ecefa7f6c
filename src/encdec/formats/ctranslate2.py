"""Export to CTranslate2 (a C++ inference engine) through CTranslate2's own converter.

CTranslate2's `TransformersConverter` reads a checkpoint through transformers, so only the layouts a
transformers class holds can go through it: T5Gemma (`T5GemmaForConditionalGeneration`) and T5Gemma 2
(`T5Gemma2ForConditionalGeneration`). The project's own format has no such class and is refused.
The tokenizer is saved next to the converted model, so the output directory is all a user needs.

Checked with CTranslate2 4.8.5 (tests/test_export.py): in float32 its greedy tokens equal ours. Where it
computes something else than transformers and we do (sliding windows shorter than prompt or output, Gemma 2's
attention soft-cap, T5Gemma 2 batches of mixed prompt lengths, a query scale other than the head size, a
T5Gemma RoPE base other than 10000) is listed in the README, "Export to CTranslate2".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import SafetensorError

from encdec import checkpoint
from encdec.checkpoint import NATIVE, checkpoint_format, load_checkpoint, read_config
from encdec.config import EncDecConfig
from encdec.errors import EncdecError, described
from encdec.files import atomic_dir, check_output_dir, read_json
from encdec.formats.t5gemma import LAYOUTS, transformers_refusal

log = logging.getLogger("encdec")

QUANTIZATIONS = ("float32", "int8", "int8_float32", "bfloat16", "float16")
EXPORT_KEY = "encdec_export"  # in the config.json of an export: what `export --overwrite` may replace
ACCEPTED = ", ".join(f"{name} ({layout.architecture})" for name, layout in LAYOUTS.items())


def export(model_dir: Path, out: Path, quantization: str = "float32", overwrite: bool = False) -> str:
    """Convert the checkpoint in `model_dir` into a CTranslate2 model directory `out`, written atomically;
    returns the checkpoint's format."""
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
    fmt = checkpoint_format(model_dir)
    if fmt is None:
        try:  # what the directory is instead (a training run's: its model/ named, a classifier...)
            read_config(model_dir)
        except EncdecError as e:  # its list of accepted formats is encdec's, which names the one export refuses
            raise EncdecError(str(e).replace(checkpoint.ACCEPTED, f"the layouts CTranslate2 converts, {ACCEPTED}")) \
                from None
        raise EncdecError(f"{model_dir} is not an encoder-decoder checkpoint (from encdec adapt / pretrain); "
                          f"CTranslate2 converts the layouts {ACCEPTED}")
    if fmt == NATIVE:
        raise EncdecError(f"{model_dir} is in this project's own format, which CTranslate2 cannot read: it converts "
                          f"only the layouts {ACCEPTED} (see docs/formats.md for which configurations get them)")
    if quantization not in QUANTIZATIONS:
        raise EncdecError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    from encdec.sources import load_tokenizer

    # every weight there with its shape (the converter reads through transformers, which fills a missing one with
    # random values and says nothing); mapped, as stored: no copy is made
    config = load_checkpoint(model_dir, None, mapped=True).model.config
    tokenizer = load_tokenizer(model_dir)  # CTranslate2 takes its vocabulary from it: fail before any work
    # an earlier export is what --overwrite replaces: CTranslate2's model.bin, not a config.json (every checkpoint
    # has one: a mistyped --out replaced another model whole), and this command's (another project's CTranslate2
    # model, a fastText one, has a model.bin too)
    check_output_dir(out, overwrite, (model_dir,), replaces=("model.bin",), kind=EXPORT, inside=True)
    # before converting: reading the framing refuses a provenance it does not know, which must not come after an
    # --overwrite has replaced the previous export
    found = [*cautions(config, fmt), *generation_cautions(model_dir, config.eos_token_ids, tokenizer)]
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise EncdecError("exporting to CTranslate2 needs the ctranslate2 package: "
                          "pip install -e '.[ctranslate2]'") from None
    refusal = transformers_refusal(model_dir)  # the converter reads the configuration through transformers
    if refusal is not None:
        raise EncdecError(f"CTranslate2's converter could not read {model_dir} (it reads config.json through "
                          f"transformers, which refuses it: {refusal})")
    with atomic_dir(out, overwrite, replaces=("model.bin",), kind=EXPORT) as tmp:
        # the converter refuses an existing directory unless forced; `tmp` is our own, empty one
        try:
            TransformersConverter(str(model_dir)).convert(str(tmp), quantization=quantization, force=True)
        # damaged or foreign weights; a quantization_config, whose library transformers imports under the converter
        except (SafetensorError, ValueError, KeyError, RuntimeError, ImportError, TypeError, AttributeError) as e:
            raise EncdecError(f"CTranslate2's converter could not read {model_dir} ({described(e)})") from None
        tokenizer.save_pretrained(str(tmp))
        _annotate_config(tmp, quantization)
    for caution in found:
        log.warning("CTranslate2 and this model: %s", caution)
    return fmt


def generation_cautions(model_dir: Path, eos_token_ids: list[int], tokenizer) -> list[str]:
    """What `encdec generate` and `serve` do that CTranslate2 does only when told: stop at every stop token (its
    converter keeps the tokenizer's EOS alone), and frame prompts as a UL2 pretraining posed them."""
    from encdec.data.chat import ChatFormat
    from encdec.inference.loading import model_framing
    from encdec.objectives import PLAIN

    found = []
    stops = sorted(ChatFormat.of(tokenizer).stop_ids(eos_token_ids))
    if set(stops) != {tokenizer.eos_token_id}:
        tokens = tokenizer.convert_ids_to_tokens(stops)
        found.append(f"it stops at {tokenizer.eos_token!r} alone, where encdec generate stops at {tokens}: pass "
                     f"end_token={tokens} and min_decoding_length=0 to translate_batch (its default of 1 writes "
                     "another token where the model would end at once)")
    framing = model_framing(model_dir, tokenizer)
    if framing != PLAIN:
        parts = [f"{tokenizer.convert_ids_to_tokens(list(ids))} {where}" for ids, where in (
            (framing.before, "after the source's BOS"), (framing.after, "at the source's end"),
            (framing.decoder, "as each row's target_prefix")) if ids]
        found.append("it was pretrained with UL2 and reads a prompt as that objective posed it, which CTranslate2 "
                     f"does not know: give it {', '.join(parts)}")
    return found


def _annotate_config(directory: Path, quantization: str) -> None:
    """Add to CTranslate2's config.json what wrote it (EXPORT_KEY: the mark `--overwrite` looks for) and the
    transformers version that saved the tokenizer next to it.

    transformers 5 takes a local directory whose config.json names neither that version nor a model type for
    an old Mistral checkpoint: loading the tokenizer there warned that its regex was wrong and advised
    `fix_mistral_regex=True`, which would rewrite this Gemma tokenizer's pre-tokenizer. CTranslate2 reads
    only the keys it knows (tests/test_export.py loads the result with both)."""
    import transformers

    path = directory / "config.json"
    config = read_json(path)
    config["transformers_version"] = transformers.__version__
    config[EXPORT_KEY] = {"quantization": quantization}
    path.write_text(json.dumps(config, indent=2) + "\n")


def is_export(directory: Path) -> bool:
    """Whether `directory` holds a CTranslate2 model written by `export` (its config.json marked)."""
    try:
        return (directory / "model.bin").is_file() and EXPORT_KEY in read_json(directory / "config.json")
    except (OSError, EncdecError):
        return False


# what --overwrite replaces
EXPORT = (("a CTranslate2 model written by encdec export (its config.json marked; one exported before the mark, "
           "2026-12-07, is removed by hand)"), is_export)


def cautions(config: EncDecConfig, fmt: str) -> list[str]:
    """Where CTranslate2 (4.8.5, tests/test_export.py) computes something else than transformers and this
    project would for this checkpoint: said at export, since its outputs give no sign of it. Read from the
    configuration as the model is (config.json leaves out what equals transformers' defaults: a released T5Gemma's
    soft-caps of 50 and 30 went unsaid)."""
    stacks = (config.encoder, config.decoder)
    found = []
    caps = {stack.attn_softcap for stack in stacks if stack.attn_softcap is not None}
    if caps:
        found.append(f"its attention logits are soft-capped (at {', '.join(map(str, sorted(caps)))}) and CTranslate2 "
                     "does not cap them: its outputs differ from this model's")
    if config.final_logit_softcap is not None:  # greedy tokens agree (the cap keeps the logits' order); scores,
        # sampling and beams do not
        found.append(f"its final logits are soft-capped (at {config.final_logit_softcap}) and CTranslate2 does not "
                     "cap them: its scores, samples and beam searches differ from this model's")
    windows = {stack.sliding_window for stack in stacks if "sliding" in stack.layer_types}
    if windows and fmt == "t5gemma2":  # its encoder's window reaches (W + 1) // 2 tokens back, self included
        window = min(windows)
        found.append(f"prompts longer than {(window + 1) // 2} tokens (its encoder's sliding window of {window} is "
                     f"split over both sides of a token) or outputs longer than {window} come out differently in "
                     "CTranslate2, which reads the whole prompt")
    elif windows:
        found.append(f"prompts or outputs longer than its sliding window ({min(windows)} tokens) come out "
                     "differently in CTranslate2")
    other = sorted({stack.query_pre_attn_scalar for stack in stacks if stack.query_pre_attn_scalar != stack.head_dim})
    if other:  # Gemma 2 27B's 144 against 128, for one
        found.append(f"its queries are scaled by query_pre_attn_scalar ({', '.join(f'{s:g}' for s in other)}), not by "
                     "the head size as CTranslate2 scales them: its outputs differ from this model's")
    thetas = sorted({theta for stack in stacks for theta in (stack.rope_theta_local, stack.rope_theta_global)} - {1e4})
    if fmt == "t5gemma" and thetas:  # read from rope_parameters by transformers, from a rope_theta CTranslate2
        found.append(f"its RoPE base is {', '.join(f'{t:g}' for t in thetas)}, and CTranslate2 reads a T5Gemma "
                     "model's as 10000: its outputs differ from this model's")
    factors = sorted({f for stack in stacks for f in (stack.rope_scale_local, stack.rope_scale_global)} - {1.0})
    if fmt == "t5gemma" and factors:  # its T5Gemma 2 loader reads the global layers' linear factor, not this one
        found.append(f"its RoPE positions are scaled (linear factor {', '.join(f'{f:g}' for f in factors)}), and "
                     "CTranslate2 reads a T5Gemma model's unscaled: its outputs differ from this model's")
    if fmt == "t5gemma2":
        found.append("CTranslate2 computes a batch of prompts of different lengths differently from each prompt "
                     "alone: translate such prompts one by one, or grouped by length")
    return found
