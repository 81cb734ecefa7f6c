"""Shared fixtures: tiny random decoder-only checkpoints on disk, and the real packaged Gemma 3 270M."""

from __future__ import annotations

import os

# tests never reach the Hub; huggingface_hub, transformers and datasets read these when first imported
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of `pytest -n N`'s workers: a core each, for it and its subprocesses
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path

import pytest
import torch
from tiny import FAMILY_OPTIONS, make_source

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories of tiny Gemma 2 / 3, Llama, Mistral, Qwen2 / 3 causal LMs, saved by transformers itself."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "gemma3": make_source(root / "gemma3", "gemma3"),
        "gemma2": make_source(root / "gemma2", "gemma2"),
        "gemma2-small": make_source(root / "gemma2-small", "gemma2", seed=1, layers=2, hidden=24, heads=2, kv_heads=1),
        "gemma3-small": make_source(root / "gemma3-small", "gemma3", seed=1, layers=2, hidden=24, heads=2, kv_heads=1),
        **{family: make_source(root / family, family) for family in FAMILY_OPTIONS},
        "qwen2-small": make_source(root / "qwen2-small", "qwen2", seed=1, layers=2, hidden=24, heads=2, kv_heads=1),
    }


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """A padded batch: row 1 has 4 padding tokens in the encoder and 2 in the decoder."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    dec = torch.randint(3, 96, (2, 6), generator=g)
    dec[:, 0] = 2
    dec_mask = torch.ones_like(dec)
    dec_mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}


def valid(logits: torch.Tensor, dec_mask: torch.Tensor) -> torch.Tensor:
    """Logits at real (non-padding) decoder positions, flattened."""
    return logits[dec_mask.bool()]
