"""Tiny random decoder-only checkpoints (Gemma 2 / 3, Llama, Mistral, Qwen2, Qwen3) made with transformers'
own classes, saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<unused{k}>" for k in range(24)]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]


def make_tokenizer(directory: Path, reserved: bool = True) -> None:
    """A word-level tokenizer over the tiny vocabulary (ids as in Gemma: pad 0, eos 1, bos 2; <unusedK>, or
    without `reserved` plain words in their place, as vocabularies without reserved tokens are)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS if reserved else SPECIALS[:4] + [f"plain{k}" for k in range(len(SPECIALS) - 4)]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(directory))


def write_corpus(path: Path, documents: int = 60, seed: int = 0, words: int = len(WORDS)) -> Path:
    """Documents of a learnable pattern: runs of consecutive words (of the first `words`) from random starting points."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(documents):
        start = rng.randrange(words)
        lines.append(" ".join(WORDS[(start + i) % words] for i in range(rng.randrange(20, 60))))
    path.write_text("\n\n".join(lines) + "\n")
    return path


def gemma_config(family: str, *, layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                 window: int = 4, intermediate: int = 48, attn_softcap: float | None = 5.0, **options):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8, sliding_window=window,
        query_pre_attn_scalar=8, pad_token_id=0, bos_token_id=2, eos_token_id=1, max_position_embeddings=256,
    )
    common.update(options)
    if family == "gemma2":
        return tf.Gemma2Config(**common, attn_logit_softcapping=attn_softcap, final_logit_softcapping=3.0)
    types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(layers)]
    return tf.Gemma3TextConfig(**{"layer_types": types, **common})


# each non-Gemma family with the variant of its switches worth covering: Llama 3's RoPE scaling (its
# original context short enough that every frequency band occurs), Mistral's all-local layers, Qwen2's
# local layers from max_window_layers on, Qwen3 with a tied head (the others untied)
FAMILY_OPTIONS = {
    "llama": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "mistral": {"sliding_window": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
    "qwen3": {"tie_word_embeddings": True},
}


def family_config(family: str, *, layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                  intermediate: int = 48, head_dim: int = 8, **options):
    """A tiny configuration of a Llama-architecture or Qwen family (transformers' own config class)."""
    from transformers import AutoConfig

    shape = {"vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
             "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim, "pad_token_id": 0,
             "bos_token_id": 2, "eos_token_id": 1, "max_position_embeddings": 256}
    return AutoConfig.for_model(family, **{**shape, **FAMILY_OPTIONS[family], **options})


def make_source(directory: Path, family: str, seed: int = 0, reserved: bool = True, **shape) -> Path:
    """Save a randomly initialised causal LM of `family` (norm weights and biases random too, so they matter),
    with the tiny tokenizer (`reserved`: with its <unusedK> tokens)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = gemma_config(family, **shape) if family.startswith("gemma") else family_config(family, **shape)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and family.startswith("gemma"):  # Gemma stores an offset from 1
                p.normal_(0.0, 0.3)
            elif "norm" in name:
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(str(directory))
    make_tokenizer(directory, reserved)
    return directory


def write_gguf(source: Path, path: Path, rope_scale_key: str = "rope.scaling.factor", *,
               claims: dict[str, int | str] | None = None) -> Path:
    """A float32 GGUF file of a tiny Llama / Qwen / Gemma checkpoint, written as llama.cpp's converter does (its
    tensor names, Q/K rows of llama permuted, Gemma's norms stored as 1 + w, Gemma 3's linear RoPE scaling as
    rope.scaling.*, no key for the query scale) with a byte-level tokenizer over the tiny vocabulary.
    `rope_scale_key` "rope.scale_linear": a linear RoPE factor as older converters wrote it (that key, no type).
    `claims`: metadata that lies about the tensors (block_count, embedding_length), as a crafted file's would;
    "rename": (old, new) replaces a prefix of the tensors' names."""
    import json

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((source / "config.json").read_text())
    arch, n = cfg["model_type"].removesuffix("_text"), cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n)
    writer = gguf.GGUFWriter(str(path), arch)
    claims = dict(claims or {})
    old, new = claims.pop("rename", ("", ""))
    for key, value in ({"block_count": n, "embedding_length": cfg["hidden_size"]} | claims).items():
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(f"{arch}.{key}", value)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg["rope_parameters"].get("full_attention", cfg["rope_parameters"])  # Gemma 3: the global layers'
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    if arch.startswith("gemma"):
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
        writer.add_sliding_window(cfg["sliding_window"])
        if cfg.get("attn_logit_softcapping"):
            writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
            writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if rope["rope_type"] == "linear" and rope_scale_key == "rope.scale_linear":
        writer.add_float32(f"{arch}.rope.scale_linear", rope["factor"])
    elif rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if rope["rope_type"] == "llama3":  # llama.cpp writes the scaled frequencies' factors as a tensor (values aside)
        import numpy as np

        writer.add_tensor("rope_freqs.weight", np.ones(cfg["head_dim"] // 2, dtype=np.float32))
    tokens = SPECIALS + WORDS
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * len(WORDS))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    for name, t in load_file(str(source / "model.safetensors")).items():
        base, suffix = name.rsplit(".", 1)
        array = t.float().numpy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):  # llama.cpp's rotary layout; transformers undoes it
            heads = cfg["num_attention_heads"] if base.endswith("q_proj") else cfg["num_key_value_heads"]
            array = array.reshape(heads, 2, -1, array.shape[1]).swapaxes(1, 2).reshape(array.shape)
        if arch.startswith("gemma") and base.endswith("norm"):
            array = array + 1
        name = f"{names.get_name(base)}.{suffix}"
        writer.add_tensor(new + name.removeprefix(old) if old and name.startswith(old) else name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
