"""MODEL on the command line -> a backbone: an encoder-decoder checkpoint (its encoder), an exported
encoder, or a decoder-only source (anything `encdec.causal.load_causal` reads)."""

from __future__ import annotations

from pathlib import Path

import torch

from encdec.classification.backbone import Backbone, from_causal, from_encoder_decoder
from encdec.classification.encoder_export import is_encoder_export, read_encoder
from encdec.errors import EncdecError
from encdec.inference.loading import compute_device

ACCEPTED = ("an encoder-decoder checkpoint (encdec adapt / pretrain), an exported encoder (encdec export-encoder), "
            "or a decoder-only model (HF directory, GGUF file, packaged name such as gemma-3-270m)")


def load_backbone(spec: str, dtype: torch.dtype = torch.float32) -> tuple[Backbone, Path | None]:
    """The backbone `spec` stands for, on `compute_device()`, and the directory its tokenizer may be in."""
    from encdec.checkpoint import is_checkpoint, load

    path = Path(spec).expanduser()
    if is_encoder_export(path):
        return read_encoder(path, dtype).to(compute_device()), path
    if is_checkpoint(path):  # the decoder is dropped with the model
        return from_encoder_decoder(load(path, dtype)).to(compute_device()), path
    from encdec.causal import load_causal

    try:
        model, source = load_causal(spec, dtype)
    except EncdecError as e:
        raise EncdecError(f"MODEL {spec} is not usable ({e}); accepted: {ACCEPTED}") from None
    return from_causal(model, source.family, source.special_tokens).to(compute_device()), source.directory
