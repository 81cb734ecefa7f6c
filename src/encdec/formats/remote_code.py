"""transformers' remote-code format for checkpoints in the project's own format: a modeling file written into
the checkpoint so that `AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True)` loads it.

No transformers class holds a Llama or Qwen encoder-decoder (its EncoderDecoderModel needs a decoder with
cross-attention), so the checkpoint carries its model: the file is generated from this package's own
errors.py, config.py and model.py (so it computes exactly what `encdec.load` computes), minus their
imports of encdec, plus a thin PreTrainedModel wrapper. It imports only the standard library, torch and
transformers. transformers runs such a file only when asked with trust_remote_code=True; encdec itself
never runs it (it reads the same directory with its own classes).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from encdec.files import read_json

MODELING_FILE = "modeling_encdec.py"
AUTO_MAP = {"AutoConfig": "modeling_encdec.EncdecHFConfig",
            "AutoModelForSeq2SeqLM": "modeling_encdec.EncdecForConditionalGeneration"}
ARCHITECTURE = "EncdecForConditionalGeneration"
SOURCES = ("encdec.errors", "encdec.config", "encdec.model")
# dropped from the copied sources: the only function that reaches other encdec modules
DROPPED_FUNCTIONS = {("EncoderDecoder", "generate")}

WRAPPER = '''

# --- the transformers wrapper ---------------------------------------------------------------------------------------
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput


class EncdecHFConfig(PretrainedConfig):
    """config.json of an encdec checkpoint: our configuration under "config"."""

    model_type = "encdec"

    def __init__(self, config=None, **kwargs):
        self.encdec = config or kwargs.pop("encdec", None) or {}
        kwargs.setdefault("is_encoder_decoder", True)
        kwargs["tie_word_embeddings"] = False  # the model reads its head itself (tied or not)
        super().__init__(**kwargs)
        if self.encdec:
            self.decoder_start_token_id = self.encdec["bos_token_id"]
            self.pad_token_id, self.bos_token_id = self.encdec["pad_token_id"], self.encdec["bos_token_id"]
            self.eos_token_id = self.encdec["eos_token_ids"]
            self.vocab_size = self.encdec["vocab_size"]
            self.num_hidden_layers = self.encdec["decoder"]["num_layers"]  # sizes the cache generation makes (unused)

    def to_dict(self):
        """As encdec writes config.json (our configuration under "config"): a checkpoint saved again by
        transformers (save_pretrained) stays one that encdec reads."""
        out = super().to_dict()
        out["config"] = out.pop("encdec", {})
        return out


class _Encoder(torch.nn.Module):
    """What generation calls `get_encoder()`: the encoder pass of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a sub-module: its weights belong to the wrapper

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return BaseModelOutput(last_hidden_state=self.model.encode(input_ids, attention_mask))


class EncdecForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """encdec's EncoderDecoder under transformers' API; its parameters have the same names as in encdec."""

    config_class = EncdecHFConfig
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config):
        super().__init__(config)
        inner = EncoderDecoder(EncDecConfig.from_dict(config.encdec))
        for name, module in inner.named_children():
            self.add_module(name, module)
        object.__setattr__(self, "inner", inner)  # shares those modules; not registered twice
        self.encoder.main_input_name = "input_ids"  # generation reads it from the module named "encoder"
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint

    def get_encoder(self):
        return _Encoder(self.inner)

    def get_input_embeddings(self):
        """The table the encoder reads (as transformers' T5Gemma answers): NEFTune's noise and such hooks go there."""
        return self.inner.encoder_embed if self.inner.encoder_embed is not None else self.inner.embed

    def resize_token_embeddings(self, *args, **kwargs):
        raise NotImplementedError("an encdec checkpoint's vocabulary is not resized in transformers (its configuration "
                                  "would disagree with its tables); encdec's training adds the tokens it needs")

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, labels=None, **kwargs):
        if decoder_input_ids is None and labels is not None:  # Seq2SeqTrainer's batches: the labels alone
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if input_ids is None and encoder_outputs is not None:  # generation: the encoder already ran
            input_ids = torch.zeros(encoder_outputs[0].shape[:2], dtype=torch.long, device=encoder_outputs[0].device)
        hidden = None if encoder_outputs is None else encoder_outputs[0]
        out = self.inner(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                         encoder_hidden_states=hidden)
        loss = None
        if labels is not None:  # Trainer's num_items_in_batch: the step's label tokens over every micro-batch (its
            # gradient accumulation divides by nothing else, as this forward takes **kwargs)
            logits, items = out.logits.flatten(0, 1).float(), kwargs.get("num_items_in_batch")
            loss = torch.nn.functional.cross_entropy(logits, labels.flatten(), ignore_index=-100,
                                                     reduction="mean" if items is None else "sum")
            if items is not None:
                loss = loss / (items.to(loss.device) if torch.is_tensor(items) else items)
        return Seq2SeqLMOutput(loss=loss, logits=out.logits, encoder_last_hidden_state=out.encoder_hidden_states)

    def prepare_decoder_input_ids_from_labels(self, labels):
        """The decoder's inputs for `labels`: shifted right behind the start token, ignored positions as padding."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def prepare_inputs_for_generation(self, decoder_input_ids, encoder_outputs=None, attention_mask=None, **kwargs):
        return {"decoder_input_ids": decoder_input_ids, "encoder_outputs": encoder_outputs,
                "attention_mask": attention_mask}
'''


def _module_text(name: str) -> str:
    """A module's source without its `from __future__` and encdec imports and without DROPPED_FUNCTIONS."""
    spec = importlib.util.find_spec(name)
    text = Path(spec.origin).read_text()
    lines = text.splitlines(keepends=True)
    drop: list[tuple[int, int]] = []
    for node in ast.parse(text).body:
        module = (node.module or "") if isinstance(node, ast.ImportFrom) else None
        if module is not None and (module == "__future__" or module.startswith("encdec")):
            drop.append((node.lineno, node.end_lineno))
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and (node.name, item.name) in DROPPED_FUNCTIONS:
                    first = min([item.lineno, *(d.lineno for d in item.decorator_list)])
                    drop.append((first, item.end_lineno))
    for first, last in sorted(drop, reverse=True):
        del lines[first - 1 : last]
    return f"\n# --- from {name} " + "-" * (100 - len(name)) + "\n" + "".join(lines)


def modeling_source() -> str:
    """The text of the modeling file."""
    header = ('"""An encdec encoder-decoder for transformers (trust_remote_code=True), written by encdec: its '
              'errors.py,\nconfig.py and model.py, then a PreTrainedModel wrapper. Generated; edit encdec, not this '
              'file."""\n\nfrom __future__ import annotations\n')
    return header + "".join(_module_text(name) for name in SOURCES) + WRAPPER


def config_fields() -> dict[str, Any]:
    """What config.json needs, beside our configuration, for transformers to find the modeling file."""
    return {"model_type": "encdec", "architectures": [ARCHITECTURE], "auto_map": AUTO_MAP, "is_encoder_decoder": True}


def write_modeling_file(directory: Path) -> None:
    (directory / MODELING_FILE).write_text(modeling_source())


CUSTOM_GENERATE = "custom_generate/generate.py"  # what transformers 5 also runs from a checkpoint it trusts
# a copy with its tokenizer and provenance (a UL2-pretrained model's prompt framing is read from the latter)
RESAVE = ("encdec.save(encdec.load(DIR, dtype=None), NEW, tokenizer_dir=DIR, "
          "metadata=encdec.checkpoint.read_metadata(DIR))")


def modeling_file_line(directory: Path) -> str:
    """What `encdec info` says of a checkpoint's modeling file: transformers runs it with trust_remote_code=True,
    so a handed checkpoint's must be the file this encdec writes, not a copy someone edited."""
    path = directory / MODELING_FILE
    resave = (f"read it first, or load the checkpoint with encdec and save it again ({RESAVE} writes this version's "
              "file)")
    files = {name: read_json(directory / name) if (directory / name).is_file() else {}
             for name in ("config.json", "tokenizer_config.json")}  # what transformers follows
    for name, data in files.items():
        # as encdec's loading refuses it (sources.refuse_custom_code): no re-save until the entry goes
        if "auto_map" in data and not is_own(data):
            restore = f" (or put back this encdec's {json.dumps(AUTO_MAP)})" if name == "config.json" else ""
            return (f"{name} maps to other code than this encdec's ({json.dumps(data.get('auto_map'))}): transformers "
                    f"would run it with trust_remote_code=True; read it first, then remove the entry{restore} before "
                    "loading the checkpoint with encdec")
    if "auto_map" not in files["config.json"]:  # nothing to run, nor to find the modeling file by
        return (f"config.json has no auto_map: transformers cannot load it (encdec can); put back this encdec's "
                f"{json.dumps(AUTO_MAP)}")
    custom = directory / CUSTOM_GENERATE
    if custom.exists() or custom.is_symlink():  # transformers 5 runs it at load, to replace generate
        return (f"{CUSTOM_GENERATE} is there: transformers would run it with trust_remote_code=True as the model "
                f"loads (in place of generate); this encdec never writes one: {resave}")
    if path.is_symlink():  # transformers copies what the link points to, and runs that
        return (f"{MODELING_FILE} is a symbolic link to {os.readlink(path)}: transformers would run that file with "
                f"trust_remote_code=True; {resave}")
    if not path.is_file():
        return f"no {MODELING_FILE}: transformers cannot load it (encdec can); {RESAVE} writes a copy with it"
    expected = modeling_source().encode()
    # its size first: a handed file of gigabytes (sparse, a few KB of a tarball) was read whole to compare
    if path.stat().st_size == len(expected) and path.read_bytes() == expected:
        return f"{MODELING_FILE} is the file this encdec writes (what trust_remote_code=True would run)"
    return (f"{MODELING_FILE} DIFFERS from the file this encdec writes (edited, or written by another encdec "
            f"version): transformers would run it with trust_remote_code=True; {resave}")


def layout_code_line(directory: Path) -> str | None:
    """What `encdec info` says of a T5Gemma / T5Gemma 2 checkpoint that names code of its own (transformers has the
    classes; a handed checkpoint's auto_map or custom_generate/ would run in their place), or None."""
    for name in ("config.json", "tokenizer_config.json"):
        mapped = read_json(directory / name).get("auto_map") if (directory / name).is_file() else None
        if mapped is not None:
            return (f"{name} maps to code shipped with the checkpoint ({json.dumps(mapped)[:200]}): transformers "
                    "would run it with trust_remote_code=True in place of its own classes, and encdec refuses to "
                    "load its tokenizer; remove the entry")
    custom = directory / CUSTOM_GENERATE
    if custom.exists() or custom.is_symlink():
        return (f"{CUSTOM_GENERATE} is there: transformers would run it with trust_remote_code=True as the model "
                "loads (in place of generate); remove it")
    return None


def is_own(config: dict[str, Any]) -> bool:
    """Whether a config.json's auto_map is exactly the one this module writes (encdec never runs it either)."""
    return config.get("auto_map") == AUTO_MAP and config.get("format") == "encdec"
