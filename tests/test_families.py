"""Llama-architecture and Qwen sources beyond the invariants of test_model.py: GGUF files of each architecture,
the project's checkpoint format for families without a transformers encoder-decoder class, unbalanced
cross-attention, and a trained decoder-only model saved back in its family's layout."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import valid
from tiny import make_source, write_gguf

import encdec
import encdec.files
from encdec.causal import causal_from_source, save_causal
from encdec.errors import EncdecError
from encdec.model import Segments


# GGUF carries neither Llama 3's RoPE scaling nor Qwen2's local layers; transformers reads every Qwen3 GGUF as
# head_dim 128 (as the released Qwen3 models have)
@pytest.mark.parametrize("family, shape", [("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
                                           ("qwen2", {"use_sliding_window": False}),
                                           ("qwen3", {"head_dim": 128})])
def test_gguf_of_each_architecture_loads_as_its_checkpoint_directory(tmp_path, monkeypatch, family, shape):
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    directory = make_source(tmp_path / family, family, **shape)
    from_gguf = encdec.load_source(str(write_gguf(directory, tmp_path / f"{family}.gguf")))
    from_dir = encdec.load_source(str(directory))
    assert (from_gguf.family, from_gguf.tied_head, from_gguf.vocab_size) == (from_dir.family, from_dir.tied_head, 96)
    ignored = {"rms_norm_eps"}  # GGUF stores it as float32
    assert {k: v for k, v in vars(from_gguf.stack).items() if k not in ignored} == \
        {k: v for k, v in vars(from_dir.stack).items() if k not in ignored}
    assert sorted(from_gguf.weights) == sorted(from_dir.weights)
    assert all(torch.equal(from_gguf.weights[k], from_dir.weights[k]) for k in from_dir.weights)
    assert encdec.load_tokenizer(from_gguf.directory).convert_tokens_to_ids("w5") == 33


PLAIN_ROPE = {"rope_type": "default", "rope_theta": 5e5}
GEMMA3_GLOBAL_EVERY_6 = ["sliding_attention"] * 5 + ["full_attention"]  # the only pattern Gemma 3 GGUFs have


GEMMA3_SCALED = {"layers": 6, "layer_types": GEMMA3_GLOBAL_EVERY_6, "rope_parameters": {  # as Gemma 3 4B-27B
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0}}}


@pytest.mark.parametrize("family, shape, key", [
    ("gemma3", GEMMA3_SCALED, "rope.scaling.factor"),
    ("gemma3", GEMMA3_SCALED, "rope.scale_linear"),  # older converters' key, without a type: it was read as unscaled
    ("gemma2", {"layers": 46, "heads": 2, "kv_heads": 1, "query_pre_attn_scalar": 16}, None),  # 27B: hidden / heads
], ids=["gemma3-rope-scaling", "gemma3-rope-scale-linear", "gemma2-27b-query-scale"])
def test_gemma_gguf_keeps_what_transformers_reader_drops(tmp_path, monkeypatch, family, shape, key):
    """transformers' GGUF reader leaves Gemma 3's RoPE scaling and the 27B models' query scale out of the config
    (weights alike, so nothing else notices); the converted source must equal its checkpoint directory."""
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    directory = make_source(tmp_path / family, family, **shape)
    from_gguf = encdec.load_source(str(write_gguf(directory, tmp_path / f"{family}.gguf", *[key] if key else [])))
    from_dir = encdec.load_source(str(directory))
    ignored = {"rms_norm_eps"}  # GGUF stores it as float32
    assert {k: v for k, v in vars(from_gguf.stack).items() if k not in ignored} == \
        {k: v for k, v in vars(from_dir.stack).items() if k not in ignored}
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    a, b = causal_from_source(from_dir).eval(), causal_from_source(from_gguf).eval()
    segments = Segments.of(ids, None, None, None)
    with torch.no_grad():
        ours = a.logits(a.hidden(ids, segments))
        assert torch.allclose(ours, b.logits(b.hidden(ids, segments)), atol=1e-5)
        # and both as transformers computes the checkpoint (its linear RoPE scaling, its query scale): the two
        # above share every line of the model's code
        reference = tf.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        assert (ours - reference(input_ids=ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_gemma_with_an_lm_head_of_its_own_is_refused(tmp_path, family):
    """Read as tied (every released Gemma is), its own head would be dropped without a word."""
    source = make_source(tmp_path / family, family, tie_word_embeddings=False)
    with pytest.raises(EncdecError, match="LM head of its own"):
        encdec.load_source(str(source))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_tied_head_stored_with_values_of_its_own_is_refused(tmp_path, family):
    """config.json ties the head to the embeddings, the checkpoint stores another: transformers computes with the
    stored head, and reading the tie built a model whose logits were 1 to 4 apart from it, unsaid. A stored head
    that is the embeddings' copy loads as before."""
    import json

    from safetensors.torch import load_file, save_file

    source = make_source(tmp_path / family, family, tie_word_embeddings=family != "llama")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load_file(source / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    save_file({**weights, "lm_head.weight": embed + 0.05}, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EncdecError, match=f"{source}: its lm_head.weight differs from its embeddings"):
        encdec.load_source(str(source))
    save_file({**weights, "lm_head.weight": embed.clone()}, source / "model.safetensors", metadata={"format": "pt"})
    assert encdec.load_source(str(source)).tied_head


@pytest.mark.parametrize(("family", "key"), [("llama", "tie_word_embeddings"), ("gemma3", "tie_word_embeddings"),
                                            ("qwen2", "use_sliding_window")])
def test_a_hand_edited_true_or_false_that_is_text_is_refused(tmp_path, family, key):
    """bool("false") is True: a Llama's "tie_word_embeddings": "false" was read as tied, its own LM head dropped for
    the embedding table without a word (a Qwen's "use_sliding_window": "false" made layers local)."""
    import json

    source = make_source(tmp_path / family, family)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, key: "false"}))
    with pytest.raises(EncdecError, match=f"{key} must be true or false, got 'false'"):
        encdec.load_source(str(source))


@pytest.mark.parametrize("key", ["rope.scaling.factor", "rope.scale_linear"])
def test_a_llama_gguf_with_linear_rope_scaling_is_refused(tmp_path, monkeypatch, key):
    """transformers' GGUF reader drops the factor; under the older key, without a type, it was not even seen."""
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    rope = {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}
    path = write_gguf(make_source(tmp_path / "llama", "llama", rope_parameters=rope), tmp_path / "llama.gguf", key)
    with pytest.raises(EncdecError, match=r"its RoPE scaling \(linear, factor 4.0\) is not carried over"):
        encdec.load_source(str(path))


def test_a_llama_3_gguf_is_refused_for_its_rope_scaling(tmp_path, monkeypatch):
    """llama.cpp writes Llama 3's RoPE scaling as a rope_freqs tensor, which transformers' reader drops (and
    then counts fewer parameters): one line that names the cause, not the tensor shapes, and before the file is
    dequantized (32 GB of float32 for an 8B model)."""
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    path = write_gguf(make_source(tmp_path / "llama", "llama"), tmp_path / "llama.gguf")  # FAMILY_OPTIONS: llama3

    def dequantize(*args, **kwargs):
        raise AssertionError("the file was dequantized before it was refused")

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", dequantize)
    with pytest.raises(EncdecError, match="Llama 3's, as llama.cpp's rope_freqs tensor.*Hugging Face checkpoint"):
        encdec.load_source(str(path))


def test_a_gguf_conversion_parses_the_file_once(tmp_path, monkeypatch):
    """transformers opens the file three times (config, tokenizer, weights); a parse of a real vocabulary
    costs about 30 s each."""
    import gguf

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    path = write_gguf(make_source(tmp_path / "llama", "llama", rope_parameters=PLAIN_ROPE), tmp_path / "llama.gguf")
    parses, original, init = [], gguf.GGUFReader, gguf.gguf_reader.GGUFReader.__init__

    def counting(self, *args, **kwargs):  # every parse, transformers' and encdec's own checks' (a subclass)
        parses.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(gguf.gguf_reader.GGUFReader, "__init__", counting)
    assert encdec.load_source(str(path)).family == "llama"
    assert len(parses) == 1, parses
    assert gguf.GGUFReader is original  # restored by the conversion (not its own reader)


def test_processes_loading_one_gguf_together_convert_it_once(tmp_path, monkeypatch):
    """As the ranks of a distributed run do on a fresh machine: the first converts, the others wait for it and
    read its directory (unlocked, both converted and raced to rename the same directory into place)."""
    import subprocess
    import sys

    from encdec.sources import gguf_lock

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    path = write_gguf(make_source(tmp_path / "llama", "llama", rope_parameters=PLAIN_ROPE), tmp_path / "llama.gguf")
    code = ("import encdec, encdec.formats.gguf as g; real = g._convert\n"
            "g._convert = lambda *a: print('converted', flush=True) or real(*a)\n"
            f"print('ready', flush=True); print(encdec.load_source({str(path)!r}).family, flush=True)")
    with gguf_lock(path):  # both reach the lock before either may convert
        workers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
        for worker in workers:
            assert worker.stdout.readline() == "ready\n"
        time.sleep(1)
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert all(worker.returncode == 0 and output.endswith("llama\n") for worker, output in zip(workers, outputs))
    assert sum(output.count("converted") for output in outputs) == 1


def test_processes_joining_one_packaged_gguf_together_join_it_once(tmp_path):
    """A distributed run's ranks on a fresh machine joined the packaged GGUF's parts each, each replacing the file:
    a new inode each time, so ranks keyed its conversion differently and each converted it again beside the
    others (deleting each other's as superseded). Here each join is slowed at its rename, so that both would
    join before either renames."""
    import subprocess
    import sys

    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * 100_000)
    go = tmp_path / "go"
    code = ("import os, pathlib, time, encdec.sources as s\n"
            "real = pathlib.Path.replace\n"
            "pathlib.Path.replace = lambda self, target: print('joined', flush=True) or time.sleep(1) "
            "or real(self, target)\n"
            f"print('ready', flush=True)\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            f"print(s.file_identity(s._joined([pathlib.Path(p) for p in {[str(p) for p in parts]!r}], "
            f"pathlib.Path({str(tmp_path / 'cache' / 'joined.gguf')!r}))), flush=True)")
    env = {**os.environ, "ENCDEC_CACHE": str(tmp_path / "cache")}
    workers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    for worker in workers:
        assert worker.stdout.readline() == "ready\n"
    go.touch()
    outputs = [worker.communicate(timeout=120)[0].splitlines() for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    assert sum(lines.count("joined") for lines in outputs) == 1
    assert outputs[0][-1] == outputs[1][-1]  # one file, one identity: one key for its conversion
    joined = tmp_path / "cache" / "joined.gguf"
    assert joined.read_bytes() == b"\x00" * 100_000 + b"\x01" * 100_000
    assert joined.stat().st_mode & 0o777 == 0o666 & ~encdec.files.umask()  # a plain file's mode, not mkstemp's 0600
    assert sorted(p.name for p in joined.parent.iterdir() if ".tmp-" in p.name) == []


def test_gguf_that_transformers_would_misread_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    path = write_gguf(make_source(tmp_path / "qwen3", "qwen3"), tmp_path / "qwen3.gguf")  # head_dim 8
    with pytest.raises(EncdecError, match="shapes .* are not ones transformers can map"):
        encdec.load_source(str(path))
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


@pytest.mark.parametrize("family, attention", [("llama", "cross"), ("qwen2", "merged"), ("qwen3", "merged")])
def test_project_format_round_trip(sources, batch, tmp_path, family, attention):
    model = encdec.adapt(encdec.load_source(str(sources[family])), attention=attention)
    assert model.config.tied_head == (family == "qwen3")  # tests/tiny.py: only Qwen3 is tied
    assert encdec.save(model, tmp_path / "out") == "encdec"
    loaded = encdec.load(tmp_path / "out")
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_unbalanced_cross_attention_starts_neutral(sources, batch):
    """A smaller Qwen2 decoder: its new cross-attention has zero biases and norms of scale 1 (plain RMSNorm)."""
    model = encdec.adapt(encdec.load_source(str(sources["qwen2"])), encdec.load_source(str(sources["qwen2-small"])),
                         attention="cross")
    block = model.decoder.layers[0]
    assert block.cross_attn.k_proj.in_features == 32 and block.cross_attn.q_proj.in_features == 24
    for block in model.decoder.layers:  # every layer's, every projection's bias
        for projection in (block.cross_attn.q_proj, block.cross_attn.k_proj, block.cross_attn.v_proj):
            assert projection.bias is not None and not projection.bias.any()
        assert torch.equal(block.cross_norm.weight, torch.ones(24))
    with torch.no_grad():
        assert valid(model(**batch).logits, batch["decoder_attention_mask"]).isfinite().all()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_only_model_saved_back_in_its_family_layout(sources, tmp_path, family):
    """...with the source's generation config: an instruct source names its end of turn there only, and the saved
    model (a tuned decoder-only baseline) generated past it in transformers, and so did what was adapted from it."""
    shutil.copytree(sources[family], tmp_path / "source")
    (tmp_path / "source" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "top_k": 5}))
    # released sources say bfloat16: the saved float32 weights kept that word, and transformers read them in it
    config = json.loads((tmp_path / "source" / "config.json").read_text())
    config.update(dtype="bfloat16", torch_dtype="bfloat16")  # (the older key as well)
    (tmp_path / "source" / "config.json").write_text(json.dumps(config))
    source = encdec.load_source(str(tmp_path / "source"))
    model = causal_from_source(source)
    with torch.no_grad():
        model.stack.layers[1].mlp.up_proj.weight.mul_(1.5)  # as if trained
    save_causal(model, source, tmp_path / "out")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.logits(model.hidden(ids, encdec.model.Segments.of(ids, None, None, None)))
        assert (reloaded(input_ids=ids).logits - ours).abs().max().item() <= 1e-4
    assert reloaded.generation_config.eos_token_id == [2, 7] and reloaded.generation_config.top_k == 5
    assert set(encdec.load_source(str(tmp_path / "out")).special_tokens["eos_token_ids"]) >= {2, 7}


@pytest.mark.parametrize("family, attention", [("llama", "cross"), ("qwen3", "merged")])
def test_vanilla_transformers_loads_the_project_format_with_its_modeling_file(sources, batch, tmp_path, family,
                                                                               attention):
    import ast

    model = encdec.adapt(encdec.load_source(str(sources[family])), attention=attention)
    encdec.save(model, tmp_path / "out", tokenizer_dir=sources[family])
    imported = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
                for node in ast.walk(ast.parse((tmp_path / "out" / "modeling_encdec.py").read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert imported <= {"__future__", "dataclasses", "functools", "math", "typing", "torch", "transformers"}
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "out"), trust_remote_code=True).eval()
    assert type(hf).__name__ == "EncdecForConditionalGeneration"
    with torch.no_grad():
        theirs, ours = hf(**batch).logits, model(**batch).logits
    mask = batch["decoder_attention_mask"]
    assert torch.equal(valid(theirs, mask), valid(ours, mask))
    ids, enc_mask = batch["input_ids"], batch["attention_mask"]
    generated = hf.generate(input_ids=ids, attention_mask=enc_mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated[:, 1:], model.generate(ids, enc_mask, max_new_tokens=4, eos_token_ids=[-1]))
    assert encdec.load_tokenizer(tmp_path / "out")("w1 w2").input_ids == [2, 29, 30]  # encdec reads it too


def test_the_transformers_wrapper_trains_from_labels_alone_and_saves_what_encdec_reads(sources, batch, tmp_path):
    """Seq2SeqTrainer's collator gives labels and no decoder inputs (they failed: "both required"); a checkpoint
    saved again by transformers kept our configuration under another key, which encdec could not read."""
    model = encdec.adapt(encdec.load_source(str(sources["llama"])))
    encdec.save(model, tmp_path / "out", tokenizer_dir=sources["llama"])
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "out"), trust_remote_code=True).eval()
    labels = batch["decoder_input_ids"][:, 1:].masked_fill(batch["decoder_attention_mask"][:, 1:] == 0, -100)
    collated = tf.DataCollatorForSeq2Seq(tf.AutoTokenizer.from_pretrained(str(tmp_path / "out")), model=hf)(
        [{"input_ids": row[keep.bool()].tolist(), "labels": [t for t in lab.tolist() if t != -100]}
         for row, keep, lab in zip(batch["input_ids"], batch["attention_mask"], labels)])
    assert "decoder_input_ids" in collated  # through the wrapper's prepare_decoder_input_ids_from_labels
    with torch.no_grad():
        alone = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        # encdec's own: the decoder reads BOS, then the labels (padding where they are ignored)
        decoder = torch.cat([torch.full_like(labels[:, :1], 2), labels[:, :-1].clamp_min(0)], 1)
        logits = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=decoder).logits
        ours = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    assert torch.isfinite(alone) and torch.allclose(alone, ours, atol=1e-6)
    assert torch.equal(hf.prepare_decoder_input_ids_from_labels(labels)[:, 1:][labels[:, :-1] != -100],
                       labels[:, :-1][labels[:, :-1] != -100])
    assert hf.get_input_embeddings() is hf.inner.embed
    with pytest.raises(NotImplementedError, match="vocabulary is not resized in transformers"):
        hf.resize_token_embeddings(200)
    hf.save_pretrained(str(tmp_path / "again"))
    again = encdec.load(tmp_path / "again")
    with torch.no_grad():
        mask = batch["decoder_attention_mask"]
        assert torch.equal(valid(again(**batch).logits, mask), valid(model(**batch).logits, mask))


def test_the_transformers_wrapper_under_seq2seqtrainer_with_gradient_accumulation(sources, tmp_path):
    """Its forward takes **kwargs, so Trainer hands it num_items_in_batch and divides by nothing itself: the loss
    (and every gradient) of 2 accumulated micro-batches of 2 was twice that of one batch of 4. The same step,
    either way, now."""
    model = encdec.adapt(encdec.load_source(str(sources["llama"])))
    encdec.save(model, tmp_path / "out", tokenizer_dir=sources["llama"])
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    examples = [{"input_ids": tokenizer(f"w{i} w{i + 1} w{i + 2}").input_ids,
                 "labels": tokenizer(" ".join(f"w{j}" for j in range(i, 2 * i + 3))).input_ids} for i in range(4)]
    logged = []
    for batch, accumulation in ((4, 1), (2, 2)):
        hf = tf.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "out"), trust_remote_code=True)
        args = tf.Seq2SeqTrainingArguments(str(tmp_path / f"trainer-{batch}"), per_device_train_batch_size=batch,
                                           gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.0,
                                           logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")
        trainer = tf.Seq2SeqTrainer(model=hf, args=args, train_dataset=examples,
                                    data_collator=tf.DataCollatorForSeq2Seq(tokenizer, model=hf))
        trainer.train()
        logged.append(next(entry for entry in trainer.state.log_history if "grad_norm" in entry))
    assert logged[0]["loss"] == pytest.approx(logged[1]["loss"], rel=1e-4)
    assert logged[0]["grad_norm"] == pytest.approx(logged[1]["grad_norm"], rel=1e-4)


def _multimodal_gemma3(directory):
    """A tiny multimodal Gemma 3 (a vision tower beside the text model) that names EOS [1, 106] at its top level."""
    from tiny import gemma_config, make_tokenizer

    vision = dict(model_type="siglip_vision_model", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=1, image_size=16, patch_size=8)
    cfg = tf.Gemma3Config(text_config=gemma_config("gemma3").to_dict(), vision_config=vision, mm_tokens_per_image=4,
                          eos_token_id=[1, 106], bos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    tf.Gemma3ForConditionalGeneration(cfg).save_pretrained(str(directory))
    make_tokenizer(directory)
    return directory


def test_a_multimodal_gemma3_keeps_the_special_tokens_named_outside_its_text_model(tmp_path):
    """Released Gemma 3 4B-27B configs name EOS ([1, 106]: <end_of_turn> too) only at the top level; read from the
    text model alone, an adapted instruction-tuned Gemma 3 would not stop at the end of its turn."""
    import json

    _multimodal_gemma3(tmp_path / "g3mm")
    saved = json.loads((tmp_path / "g3mm" / "config.json").read_text())
    saved["text_config"].pop("eos_token_id", None)  # as in the released config.json files
    (tmp_path / "g3mm" / "config.json").write_text(json.dumps(saved))
    source = encdec.load_source(str(tmp_path / "g3mm"))
    assert source.special_tokens["eos_token_ids"] == [1, 106]
    assert encdec.adapt(source).config.eos_token_ids == [1, 106]


def test_a_decoder_only_student_of_a_multimodal_gemma3_is_saved_as_its_text_model(tmp_path):
    """The student's weights are the text decoder's, under text-model names; saved with the source's multimodal
    config.json, transformers matched none of them and started from random weights, without an error."""
    import json

    source = encdec.load_source(str(_multimodal_gemma3(tmp_path / "g3mm")))
    model = causal_from_source(source)
    with torch.no_grad():
        model.stack.layers[1].mlp.up_proj.weight.mul_(1.5)  # as if trained
    save_causal(model, source, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "gemma3_text" and saved["eos_token_id"] == [1, 106]
    reloaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.logits(model.hidden(ids, encdec.model.Segments.of(ids, None, None, None)))
        assert (reloaded(input_ids=ids).logits - ours).abs().max().item() <= 1e-4
    assert encdec.load_source(str(tmp_path / "out")).special_tokens["eos_token_ids"] == [1, 106]


def test_text_weights_of_a_multimodal_gemma3_and_an_untied_head():
    from encdec.formats import gemma, llama
    from encdec.formats.decoder_only import text_weights

    t = torch.zeros(1)
    multimodal = {"model.language_model.layers.0.mlp.up_proj.weight": t, "model.vision_tower.x.weight": t,
                  "model.multi_modal_projector.w": t, "lm_head.weight": t}
    kept = text_weights(multimodal, True, gemma.TEXT_PREFIXES, gemma.NOT_TEXT)
    assert list(kept) == ["model.layers.0.mlp.up_proj.weight"]
    plain = {"model.norm.weight": t, "lm_head.weight": t}
    kept = text_weights(plain, False, llama.TEXT_PREFIXES, llama.NOT_TEXT)
    assert sorted(kept) == ["lm_head.weight", "model.norm.weight"]
    assert list(text_weights(plain, True, llama.TEXT_PREFIXES, llama.NOT_TEXT)) == ["model.norm.weight"]


def test_a_multimodal_gemma3_in_the_older_layout_keeps_its_stored_head_in_view(tmp_path):
    """The layout of the released 4B-27B files (language_model.model.*, the head as language_model.lm_head.weight):
    a stored head other than the embeddings, which transformers computes with, was dropped unsaid and the model
    built on the embeddings; a top-level tie_word_embeddings false (which transformers reads for this class) too."""
    import json

    from safetensors.torch import load_file, save_file

    directory = _multimodal_gemma3(tmp_path / "g3mm")
    weights = load_file(str(directory / "model.safetensors"))
    older = {("language_model.model." + k.removeprefix("model.language_model.")
              if k.startswith("model.language_model.") else k.removeprefix("model.")): v for k, v in weights.items()}
    embed = older["language_model.model.embed_tokens.weight"]
    save_file({**older, "language_model.lm_head.weight": embed.clone()}, str(directory / "model.safetensors"))
    assert encdec.load_source(str(directory)).tied_head  # the embeddings' copy: read as the tie says
    save_file({**older, "language_model.lm_head.weight": embed * 0.5 + 0.1}, str(directory / "model.safetensors"))
    with pytest.raises(EncdecError, match=r"language_model\.lm_head\.weight differs from its embeddings"):
        encdec.load_source(str(directory))
    save_file(older, str(directory / "model.safetensors"))
    assert encdec.load_source(str(directory)).tied_head
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(EncdecError, match=r"an LM head of its own \(tie_word_embeddings: false, at the top level\)"):
        encdec.load_source(str(directory))


def test_a_changed_gguf_replaces_its_cached_conversion_and_leaves_others(tmp_path, monkeypatch):
    """Each conversion is the size of the dequantized model; a new one of the same file (changed, or converted by
    a newer encdec) removes the old, and never touches another file's, even one of the same name."""
    import os
    import shutil

    from encdec.sources import gguf_cache_dir

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    directory = make_source(tmp_path / "llama", "llama", rope_parameters=PLAIN_ROPE)
    path = write_gguf(directory, tmp_path / "model.gguf")
    other = write_gguf(directory, (tmp_path / "elsewhere").mkdir() or tmp_path / "elsewhere" / "model.gguf")
    encdec.load_source(str(path)), encdec.load_source(str(other))
    first, kept = gguf_cache_dir(path), gguf_cache_dir(other)
    unrecorded = shutil.copytree(first, first.with_name("model-0123456789abcdef"))  # as made before records
    (unrecorded / "gguf-source.json").unlink()
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed
    assert encdec.load_source(str(path)).family == "llama"
    assert gguf_cache_dir(path) != first and (gguf_cache_dir(path) / "config.json").is_file()
    assert not first.exists()
    assert (kept / "config.json").is_file() and (unrecorded / "config.json").is_file()
    # its permissions changed (chmod, chown, a hard-linked backup): the same conversion, not a new one (minutes and
    # the model's size, and the one another process still read deleted under it)
    current = gguf_cache_dir(path)
    os.chmod(path, 0o600)
    assert gguf_cache_dir(path) == current


def _as_saved_before_transformers_5(section: dict, config_class: type) -> dict:
    """A nested configuration as transformers before 5 wrote it: the fields equal to its class's defaults left out."""
    defaults = config_class().to_dict()
    return {k: v for k, v in section.items() if k == "model_type" or k not in defaults or v != defaults[k]}


@pytest.mark.parametrize("model_type", ["gemma3", "t5gemma", "t5gemma2"])
def test_nested_configs_saved_as_differences_from_the_defaults_read_as_transformers_reads_them(model_type):
    """Released multimodal Gemma 3 (4B-27B), T5Gemma and T5Gemma 2 configs keep each nested section as its
    difference from the class's defaults: Gemma 3 4B's text_config names neither its head counts nor head_dim, a
    stack shaped like Gemma 2 2B almost nothing. Read as written, they lacked fields (or read 256 // heads as
    head_dim) and a Gemma 2 stack lost its soft-capping."""
    from pathlib import Path

    from encdec.formats import gemma, t5gemma

    if model_type == "gemma3":  # the released 4B's text_config: its other fields are Gemma3TextConfig's defaults
        text = {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                "sliding_window": 1024, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}
        saved = {"model_type": "gemma3", "eos_token_id": [1, 106], "text_config": text}
        full = tf.Gemma3Config(**saved).to_dict()  # what transformers reads from it
        ours, theirs = (gemma.read_config(data, Path("config.json")).stack for data in (saved, full))
        assert (ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.rope_scale_global) == (8, 4, 256, 8.0)
    else:
        stack_class = tf.T5GemmaModuleConfig if model_type == "t5gemma" else tf.T5Gemma2DecoderConfig
        full = (tf.T5GemmaConfig() if model_type == "t5gemma" else tf.T5Gemma2Config()).to_dict()
        saved = {**full, "decoder": _as_saved_before_transformers_5(full["decoder"], stack_class)}
        if model_type == "t5gemma":
            saved["encoder"] = _as_saved_before_transformers_5(full["encoder"], stack_class)
        else:
            text = _as_saved_before_transformers_5(full["encoder"]["text_config"], tf.T5Gemma2TextConfig)
            saved["encoder"] = {**full["encoder"], "text_config": text}
        assert "num_attention_heads" not in saved["decoder"]  # what the files leave out
        ours, theirs = t5gemma.config_from_hf(saved), t5gemma.config_from_hf(full)
        caps = (8, 30.0, 50.0) if model_type == "t5gemma" else (8, None, None)
        assert (ours.decoder.num_heads, ours.final_logit_softcap, ours.encoder.attn_softcap) == caps
    assert ours == theirs


@pytest.mark.parametrize("model_type", ["t5gemma", "t5gemma2"])
def test_special_ids_named_at_the_top_level_win_over_the_decoders(model_type):
    """As transformers reads them (and generation stops at them): the decoder's EOS was taken."""
    from encdec.formats import t5gemma

    config_class = tf.T5GemmaConfig if model_type == "t5gemma" else tf.T5Gemma2Config
    saved = {**config_class().to_dict(), "eos_token_id": [1, 7], "pad_token_id": 3, "bos_token_id": 4}
    assert saved["decoder"]["eos_token_id"] == 1
    loaded = config_class.from_dict(saved)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == ([1, 7], 3, 4)
    ours = t5gemma.config_from_hf(saved)
    assert (ours.eos_token_ids, ours.pad_token_id, ours.bos_token_id) == ([1, 7], 3, 4)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_rope_scaling_of_the_older_layout_is_read_as_transformers_reads_it(model_type):
    """A Gemma 2 has one RoPE setting: rope_scaling scales every layer (its local layers were read unscaled);
    a Gemma 3 scales its global layers alone."""
    from pathlib import Path

    from encdec.formats import gemma

    saved = {"model_type": model_type, "rope_theta": 10_000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    config_class = tf.Gemma2Config if model_type == "gemma2" else tf.Gemma3TextConfig
    full = config_class(**saved).to_dict()  # what transformers reads from it, in today's layout
    ours, theirs = (gemma.read_config(data, Path("config.json")).stack for data in (saved, full))
    assert ours == theirs
    assert (ours.rope_scale_local, ours.rope_scale_global) == ((2.0, 2.0) if model_type == "gemma2" else (1.0, 2.0))


@pytest.mark.parametrize("model_type, saved", [
    ("qwen2", {"rope_theta": 1e6, "rope_parameters": {"rope_type": "default"}}),  # theta left out of the parameters
    ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
               "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),  # both: rope_scaling's
    ("gemma3_text", {"rope_theta": 5e5, "rope_local_base_freq": 2e4,
                     "rope_parameters": {"full_attention": {"rope_type": "default"},
                                         "sliding_attention": {"rope_type": "default"}}}),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default"}}}),  # 1e6 global, 1e4 local
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 3e5},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 3e4}},
                     "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
], ids=["qwen2-theta-outside", "qwen2-both", "gemma3-thetas-outside", "gemma3-defaults", "gemma3-both"])
def test_rope_fields_of_hand_written_configs_are_read_as_transformers_reads_them(model_type, saved):
    """A theta left out of rope_parameters was 10,000 (transformers takes rope_theta, or the class's default), and
    rope_scaling beside rope_parameters was ignored (transformers applies it)."""
    import copy
    from pathlib import Path

    from tiny import family_config, gemma_config

    from encdec.formats import gemma, qwen

    saved, given = copy.deepcopy(saved), saved  # transformers fills the dicts it is given in place
    if model_type == "qwen2":
        base = {k: v for k, v in family_config("qwen2").to_dict().items() if not k.startswith("rope")}
        theirs = tf.Qwen2Config(**{k: v for k, v in {**base, **saved}.items() if k != "model_type"})
        ours = qwen.read_config({**base, **given}, Path("config.json")).stack
        params = theirs.rope_parameters
        assert (ours.rope_theta_global, ours.rope_scale_global) == (
            params["rope_theta"], params.get("factor", 1.0) if params["rope_type"] == "linear" else 1.0)
        return
    base = {k: v for k, v in gemma_config("gemma3").to_dict().items() if not k.startswith("rope")}
    theirs = tf.Gemma3TextConfig(**{k: v for k, v in {**base, **saved}.items() if k != "model_type"})
    ours = gemma.read_config({**base, **given, "model_type": "gemma3_text"}, Path("config.json")).stack
    for kind, name in (("local", "sliding_attention"), ("global", "full_attention")):
        params = theirs.rope_parameters[name]
        assert getattr(ours, f"rope_theta_{kind}") == params["rope_theta"], kind
        assert getattr(ours, f"rope_scale_{kind}") == (params["factor"] if params["rope_type"] == "linear" else 1.0)


def test_a_split_gguf_is_told_as_one(tmp_path):
    """Each part of a GGUF that llama.cpp's gguf-split wrote was told as damaged (the first: "declares 2 blocks,
    its tensors hold 1"; the others: "truncated or corrupt ... general.architecture")."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama", split_max_tensors=1)
    writer.add_block_count(2)
    for name in ("token_embd.weight", "blk.0.attn_norm.weight", "blk.1.attn_norm.weight"):
        writer.add_tensor(name, np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for part in (1, 3):
        with pytest.raises(EncdecError, match=rf"part {part} of a GGUF split into 3 files; merge them into one"):
            encdec.load_source(str(tmp_path / f"m-0000{part}-of-00003.gguf"))


def test_llama_3_rope_without_its_original_context_is_read_as_transformers_fills_it():
    """transformers takes max_position_embeddings for a llama3 RoPE setting that leaves out
    original_max_position_embeddings; encdec refused the config."""
    from pathlib import Path

    from tiny import family_config

    from encdec.formats import llama

    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    base = {k: v for k, v in family_config("llama").to_dict().items() if not k.startswith("rope")}
    theirs = tf.LlamaConfig(**{k: v for k, v in base.items() if k != "model_type"}, rope_parameters=dict(rope))
    ours = llama.read_config({**base, "rope_parameters": rope}, Path("config.json")).stack
    assert ours.rope_llama3 == [8.0, 1.0, 4.0, float(theirs.rope_parameters["original_max_position_embeddings"])]
    assert ours.rope_llama3[3] == base["max_position_embeddings"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_fields_a_config_leaves_out_take_transformers_class_defaults(family):
    """max_position_embeddings and num_key_value_heads left out were read as no limit and as the query heads;
    transformers gives its class's defaults (Llama 2,048 positions, Mistral 131,072 and 8 key/value heads, Qwen2
    32,768): a Mistral-7B config without the key was refused against its weights, and long prompts passed unseen."""
    from pathlib import Path

    from tiny import family_config

    from encdec.formats import llama, qwen

    cfg = family_config(family, heads=8).to_dict()
    for key in ("max_position_embeddings", *(["num_key_value_heads"] if family != "qwen2" else []), "rope_parameters"):
        cfg.pop(key, None)
    theirs = tf.AutoConfig.for_model(family, **{k: v for k, v in cfg.items() if k != "model_type"})
    ours = (qwen if family == "qwen2" else llama).read_config(cfg, Path("config.json")).stack
    assert (ours.max_positions, ours.num_kv_heads) == (theirs.max_position_embeddings, theirs.num_key_value_heads)
    assert ours.max_positions > 256 and (family != "mistral" or ours.num_kv_heads == 8)


def test_a_gemma_linear_rope_scaling_without_its_factor_is_refused():
    """It was read as factor 1.0, no scaling, in silence (the Llama adapter, and transformers, need the factor)."""
    from pathlib import Path

    from tiny import gemma_config

    from encdec.files import reading_config
    from encdec.formats import gemma

    with pytest.raises(EncdecError, match="lacks the field 'factor'"), reading_config(Path("config.json")):
        gemma.read_config({**gemma_config("gemma2").to_dict(), "rope_scaling": {"rope_type": "linear"}},
                          Path("config.json"))


def test_an_eos_named_in_the_generation_config_alone_is_read(sources, tmp_path):
    """config.json without an eos_token_id, generation_config.json with [1, 3]: refused, though the ids were
    there (transformers' generate reads them)."""
    source = tmp_path / "llama"
    shutil.copytree(sources["llama"], source)
    cfg = json.loads((source / "config.json").read_text())
    del cfg["eos_token_id"]
    (source / "config.json").write_text(json.dumps(cfg))
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    assert encdec.load_source(str(source)).special_tokens["eos_token_ids"] == [1, 3]
    (source / "generation_config.json").unlink()
    with pytest.raises(EncdecError, match="names no eos_token_id"):
        encdec.load_source(str(source))


def test_a_pad_id_of_minus_one_reads_as_none(sources, tmp_path, capsys):
    """Early Llama conversions wrote pad_token_id -1 for "none" (transformers loads them): adapting one was refused,
    after its weights were read, in a line naming neither the file nor a fix. It reads as a missing pad does."""
    from encdec.cli import main

    source = tmp_path / "llama"
    shutil.copytree(sources["llama"], source)
    cfg = json.loads((source / "config.json").read_text())
    cfg["pad_token_id"] = -1
    (source / "config.json").write_text(json.dumps(cfg))
    first_eos = encdec.load_source(str(sources["llama"])).special_tokens["eos_token_ids"][0]
    assert encdec.load_source(str(source)).special_tokens["pad_token_id"] == first_eos
    assert main(["adapt", "--encoder", str(source), "--out", str(tmp_path / "adapted")]) == 0
    assert encdec.load(tmp_path / "adapted").config.pad_token_id == first_eos


def test_a_hub_source_fetches_the_files_it_is_read_from_and_not_a_second_copy_of_the_weights(monkeypatch):
    """Mistral's repositories ship consolidated.safetensors (the whole model again, 14.5 GB for 7B) beside the
    transformers shards; only the shards are read. The patterns passed to huggingface_hub, through its own filter."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from encdec import sources

    repository = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                  "model-00002-of-00002.safetensors", "model.safetensors.index.json", "consolidated.safetensors",
                  "params.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "README.md",
                  "pytorch_model-00001-of-00002.bin"]
    asked = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, allow_patterns: asked.update(
        name=name, files=set(filter_repo_objects(repository, allow_patterns=allow_patterns))) or "/nowhere")
    sources.resolve("mistralai/Mistral-7B-v0.3")
    assert asked["name"] == "mistralai/Mistral-7B-v0.3"
    unread = {"consolidated.safetensors", "README.md", "pytorch_model-00001-of-00002.bin"}
    assert asked["files"] == set(repository) - unread


@pytest.mark.parametrize("failure, said", [
    (OSError(28, "No space left on device", "{cache}/blobs/x.incomplete"),
     "cannot write {cache}: No space left on device ({cache}/blobs/x.incomplete)"),
    (ValueError("Repo id must be in the form 'repo_name'\nmore"),
     "could not be fetched from the Hugging Face Hub as a model name (ValueError: Repo id must be in the form"),
])
def test_a_failed_hub_fetch_says_why(monkeypatch, failure, said):
    """A full disk halfway through a download was said as a name not found, the cause dropped."""
    import huggingface_hub
    from huggingface_hub import constants

    from encdec import sources

    def fail(name, allow_patterns):
        if isinstance(failure, OSError):  # a file of the cache
            failure.filename = failure.filename.format(cache=constants.HF_HUB_CACHE)
        raise failure

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(EncdecError) as caught:
        sources.resolve("someone/some-model")
    assert said.format(cache=constants.HF_HUB_CACHE) in str(caught.value) and "\n" not in str(caught.value)


def test_a_hub_source_fetches_every_file_its_tokenizer_is_saved_as(sources, tmp_path, monkeypatch):
    """transformers writes a chat template to chat_template.jinja (no longer into tokenizer_config.json), and a BPE
    tokenizer's merges to merges.txt: a Qwen or Llama instruct model fetched without them read its conversations in
    Gemma's turns. The files a real save writes, through huggingface_hub's own filter."""
    import huggingface_hub
    import transformers
    from huggingface_hub.utils import filter_repo_objects

    from encdec import sources as sources_module

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(sources["qwen2"]))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(str(tmp_path / "saved"))
    written = {str(p.relative_to(tmp_path / "saved")) for p in (tmp_path / "saved").rglob("*") if p.is_file()}
    assert "chat_template.jinja" in written
    written |= {"vocab.json", "merges.txt"}  # a BPE tokenizer's files beside tokenizer.json (Qwen2.5's repositories)
    asked = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, allow_patterns: asked.update(
        files=set(filter_repo_objects(sorted(written), allow_patterns=allow_patterns))) or "/nowhere")
    sources_module.resolve("someone/qwen2-instruct")
    assert asked["files"] == written


@pytest.mark.parametrize("family, written, dropped", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": None, "max_window_layers": 1}, ()),  # no window
    ("qwen2", {"use_sliding_window": False, "layer_types": ["full_attention", "sliding_attention"] * 2}, ()),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, ("head_dim",)),
    ("mistral", {}, ("sliding_window",)),  # MistralConfig's 4096
], ids=["qwen2-no-window", "qwen2-flag-off", "qwen3-local-from-1-default-head-dim", "mistral-default-window"])
def test_llama_like_windows_and_head_size_read_as_transformers_runs_them(family, written, dropped):
    """Fields a hand-written (or older) config.json sets otherwise than the released ones: a layer is local in
    transformers only with use_sliding_window and a window, whatever layer_types says; a field left out takes the
    config class's default (Qwen3's head_dim is 128, not hidden / heads)."""
    from pathlib import Path

    from tiny import family_config

    from encdec.formats import llama, qwen

    cfg = {k: v for k, v in family_config(family).to_dict().items() if k not in ("layer_types", *dropped)}
    cfg.update(written)
    theirs = tf.AutoConfig.for_model(family, **{k: v for k, v in cfg.items() if k != "model_type"})
    ours = (llama.read_config if family == "mistral" else qwen.read_config)(cfg, Path("config.json")).stack
    window = theirs.sliding_window
    types = theirs.layer_types if family != "mistral" else ["sliding_attention"] * 4  # Mistral: every layer local
    local = ["sliding" if window is not None and t == "sliding_attention" else "full" for t in types]
    assert ours.layer_types == local and ours.head_dim == theirs.head_dim
    if "sliding" in local:
        assert ours.sliding_window == window
    assert local.count("sliding") == {"qwen2": 0, "qwen3": 3, "mistral": 4}[family]  # the cases cover both answers


def test_a_gguf_is_read_without_the_files_kept_beside_it(tmp_path, monkeypatch):
    """Downloaded into a folder that holds another model, a GGUF's tokenizer came from that model's
    tokenizer_config.json (its class, or an auto_map that stopped the conversion with a traceback)."""
    import json
    import shutil

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "downloads"
    folder.mkdir()
    path = write_gguf(make_source(tmp_path / "llama", "llama", rope_parameters=PLAIN_ROPE), folder / "llama.gguf")
    other = {"tokenizer_class": "CustomTokenizer", "auto_map": {"AutoTokenizer": ["custom.Custom", None]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(other))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(path, alone / path.name)
    read = [encdec.load_tokenizer(encdec.load_source(str(p)).directory) for p in (path, alone / path.name)]
    assert [type(t).__name__ for t in read] == [type(read[1]).__name__] * 2
    assert read[0].get_vocab() == read[1].get_vocab() and read[0].get_vocab()["w5"] == 33
    assert (read[0].bos_token_id, read[0].eos_token_id) == (read[1].bos_token_id, read[1].eos_token_id) == (2, 1)


def test_the_end_of_turn_named_in_generation_config_joins_the_eos_ids(sources, tmp_path):
    """An instruct source names its end of turn in generation_config.json only (Gemma 2 IT: config.json 1, its
    generation config [1, 107]; Qwen2.5 Instruct adds <|endoftext|> there): the adapted model, its exported
    generation config and encdec's own generation stopped only at config.json's."""
    import json
    import shutil

    from encdec.cli import main

    source = tmp_path / "source"
    shutil.copytree(sources["gemma2"], source)
    (source / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 7]}))
    assert encdec.load_source(str(source)).special_tokens["eos_token_ids"] == [1, 7]
    out = tmp_path / "adapted"
    assert main(["adapt", "--encoder", str(source), "--out", str(out)]) == 0
    assert encdec.load(out).config.eos_token_ids == [1, 7]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 7]
    assert tf.AutoModelForSeq2SeqLM.from_pretrained(str(out)).generation_config.eos_token_id == [1, 7]


def test_a_directory_named_like_a_packaged_model_is_that_directory(sources, tmp_path, monkeypatch):
    """A checkpoint downloaded under the model's own name (`--local-dir gemma-3-270m`) was passed over for the
    packaged quantized model of that name, with nothing said; transformers too reads a local directory first."""
    import shutil

    import encdec.sources

    monkeypatch.chdir(tmp_path)
    shutil.copytree(sources["gemma3"], tmp_path / "gemma-3-270m")
    monkeypatch.setattr(encdec.sources, "_packaged_gguf", lambda spec: pytest.fail(f"the packaged {spec} was read"))
    source = encdec.load_source("gemma-3-270m")
    assert source.directory.resolve() == (tmp_path / "gemma-3-270m").resolve()
    assert source.stack.hidden_size == 32


def test_a_gemma3_rope_setting_that_names_no_layer_type_is_refused():
    """transformers' Gemma 3 keeps its per-type defaults (local 10,000, global 1,000,000, unscaled) beside a flat
    rope_parameters; encdec applied the flat one to every layer, computing another model without a word."""
    import transformers as tf

    from encdec.errors import EncdecError
    from encdec.formats.gemma import stack_from_hf

    flat = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    read = tf.Gemma3TextConfig(rope_parameters=dict(flat)).rope_parameters  # (it adds to the dict it is given)
    assert read["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 32}
    with pytest.raises(EncdecError, match="names no layer type; Gemma 3 reads one setting per layer type"):
        stack_from_hf({**cfg, "rope_parameters": flat}, "gemma3")
    stack = stack_from_hf({**cfg, "rope_parameters": flat}, "gemma2")  # Gemma 2 reads one for every layer
    assert (stack.rope_theta_local, stack.rope_scale_local) == (1e6, 8.0) == (stack.rope_theta_global,
                                                                           stack.rope_scale_global)
