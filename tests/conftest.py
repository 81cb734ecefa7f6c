"""Shared fixtures: tiny random decoder-only checkpoints on disk, and the real packaged Gemma 3 270M."""

from __future__ import annotations

import os
from collections.abc import Iterator

# tests never reach the Hub; huggingface_hub, transformers and datasets read these when first imported
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of `pytest -n N`'s workers: a core each, for it and its subprocesses
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path

import pytest
import torch
from tiny import FAMILY_OPTIONS, make_source, write_corpus

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache root of this test session, so that no test reads what an earlier run left in the user's cache (a
    search that reads its trials back from a journal trains nothing); the packaged models' conversions (1.1 GB and
    half a minute each) are shared with the user's cache through links."""
    from encdec.errors import EncdecError
    from encdec.sources import cache_root

    root = tmp_path_factory.mktemp("cache")
    for name in ("gguf", "packaged", "locks"):
        try:
            shared = cache_root().absolute() / name
            shared.mkdir(parents=True, exist_ok=True)
            (root / name).symlink_to(shared, target_is_directory=True)
        except (OSError, EncdecError):  # no home, or a read-only one: the session converts into its own
            (root / name).mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENCDEC_CACHE", str(root))
        yield root


@pytest.fixture(autouse=True)
def encdec_log_reaches_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's log set-up replaces the handlers of the `encdec` logger and stops it propagating, which would hide
    every later test's records from caplog: each test starts from, and leaves, the logger as the session found it."""
    import logging

    log = logging.getLogger("encdec")
    monkeypatch.setattr(log, "propagate", True)
    monkeypatch.setattr(log, "handlers", list(log.handlers))
    monkeypatch.setattr(log, "level", log.level)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small plain-text corpus of the tiny vocabulary's words."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", documents=80)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Path:
    """The tiny Gemma 3 adapted by the command line (balanced, merged attention), as a checkpoint directory."""
    from encdec.cli import main

    out = tmp_path_factory.mktemp("adapted") / "merged"
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories of tiny Gemma 2 / 3, Llama, Mistral, Qwen2 / 3 causal LMs, saved by transformers itself."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "gemma3": make_source(root / "gemma3", "gemma3"),
        "gemma2": make_source(root / "gemma2", "gemma2"),
        "gemma2-small": make_source(root / "gemma2-small", "gemma2", seed=1, layers=2, hidden=24, heads=2, kv_heads=1),
        "gemma3-small": make_source(root / "gemma3-small", "gemma3", seed=1, layers=2, hidden=24, heads=2, kv_heads=1),
        # a local layer and a global one, each cache kind, in half the layers: dynamo's capture of a compiled
        # step takes 13-18 s a program for gemma3's four here
        "gemma3-two-layers": make_source(root / "gemma3-two-layers", "gemma3", seed=12, layers=2,
                                         layer_types=["sliding_attention", "full_attention"]),
        **{family: make_source(root / family, family) for family in FAMILY_OPTIONS},
        "qwen2-small": make_source(root / "qwen2-small", "qwen2", seed=1, layers=2, hidden=24, heads=2, kv_heads=1),
        # linear RoPE scaling (older long-context Llamas, Qwen2's): read from the config, compared with transformers
        "llama-linear": make_source(root / "llama-linear", "llama", seed=2, rope_parameters={
            "rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0}),
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
