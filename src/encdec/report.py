"""Human-readable summaries of a model: parameters per part and configuration."""

from __future__ import annotations

from encdec.config import StackConfig
from encdec.model import EncoderDecoder

PARTS = ("embeddings", "encoder", "decoder", "cross-attention")


def part_of(name: str) -> str:
    if name.startswith(("embed.", "encoder_embed.", "lm_head.")):
        return "embeddings"
    if ".cross_attn." in name or ".cross_norm." in name or ".post_cross_norm." in name:
        return "cross-attention"
    return name.split(".", 1)[0]


def parameter_counts(model: EncoderDecoder) -> dict[str, int]:
    """Parameters per part (decoder excludes its separate cross-attention) and the total."""
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        counts[part_of(name)] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def parameter_table(model: EncoderDecoder) -> str:
    counts = parameter_counts(model)
    width = max(len(k) for k in counts)
    return "\n".join(f"  {k:<{width}}  {v:>14,}  ({v / 1e6:,.1f}M)" for k, v in counts.items())


def _stack_line(stack: StackConfig) -> str:
    local = stack.layer_types.count("sliding")
    extras = [f"soft-cap {stack.attn_softcap:g}"] if stack.attn_softcap else []
    extras += ["QK-norm"] if stack.qk_norm else []
    extras += ["q/k/v biases"] if stack.qkv_bias else []
    extras += ["norms before and after each sub-layer" if stack.post_norms else "norms before each sub-layer",
               "GELU (tanh)" if stack.activation == "gelu_tanh" else "SiLU"]
    layers = f"{stack.num_layers} layers ({local} local, window {stack.sliding_window})" if local else \
        f"{stack.num_layers} layers (all global)"
    return (f"{layers}, width {stack.hidden_size}, "
            f"{stack.num_heads} heads / {stack.num_kv_heads} KV heads of {stack.head_dim}, FFN {stack.intermediate_size}"
            + "".join(f", {e}" for e in extras))


def describe(model: EncoderDecoder) -> str:
    cfg = model.config
    kind = "merged self+cross attention" if cfg.attention == "merged" else "separate cross-attention"
    head = "the decoder's is the LM head" if cfg.tied_head else "an untied LM head"
    emb = f"shared by encoder and decoder ({head})" if cfg.shared_embeddings else f"separate encoder / decoder ({head})"
    lines = [
        f"  family       {cfg.family}",
        f"  encoder      {_stack_line(cfg.encoder)}",
        f"  decoder      {_stack_line(cfg.decoder)}",
        f"  attention    {kind}",
        f"  embeddings   {emb}, vocabulary {cfg.vocab_size:,}",
        *([f"  window       encoder local layers use the {cfg.encoder_window} convention"]
          if "sliding" in cfg.encoder.layer_types else []),
        f"  tokens       pad {cfg.pad_token_id}, bos/decoder start {cfg.bos_token_id}, eos {cfg.eos_token_ids}",
    ]
    if cfg.final_logit_softcap:
        lines.append(f"  logits       soft-cap {cfg.final_logit_softcap:g}")
    return "\n".join(lines)
