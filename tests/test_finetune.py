"""`encdec finetune`: instruction tuning of an encoder-decoder and of its decoder-only source with the
pretraining loop (loss on responses only, EOS closing each response, final model saved and loadable)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from tiny import WORDS

import encdec
from encdec.causal import load_causal
from encdec.cli import main
from encdec.data.instructions import Pair, chat_example
from encdec.sources import load_tokenizer
from encdec.training import step
from encdec.training.data import make_batch, teacher_rows


def write_instructions(path, count: int = 120, seed: int = 0):
    """Prompt: a few consecutive words; response: the two words that follow (learnable)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(count):
            start = rng.randrange(len(WORDS) - 8)
            prompt = " ".join(WORDS[start : start + 4])
            response = " ".join(WORDS[start + 4 : start + 6])
            record = {"prompt": prompt, "response": response} if i % 2 else {
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    return write_instructions(tmp_path_factory.mktemp("sft") / "train.jsonl")


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _args(model, out, data, *extra: str) -> list[str]:
    return ["finetune", str(model), "--data", str(data), "--out", str(out), "--enc-len", "24", "--dec-len", "8",
            "--batch-size", "4", "--steps", "16", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "8",
            "--eval-windows", "8", "--save-every", "8", "--precision", "fp32", *extra]


def test_encoder_decoder_learns_the_responses(adapted, instructions, tmp_path):
    assert main(_args(adapted, tmp_path / "run", instructions)) == 0
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 17))
    # (0.73 of the first steps' loss measured: the tiny tokenizer's answers end with EOS alone, no easy <unk>)
    assert sum(r["loss"] for r in records[-3:]) < 0.8 * sum(r["loss"] for r in records[:3])
    final = tmp_path / "run" / "model"
    model = encdec.load(final)
    assert model.config == encdec.load(adapted).config
    assert encdec.checkpoint.read_metadata(final)["finetuned"]["objective"] == "instruct"


def test_decoder_only_source_finetunes_with_the_same_loop(sources, instructions, tmp_path):
    import transformers as tf

    assert main(_args(sources["gemma3"], tmp_path / "run", instructions)) == 0
    records = _metrics(tmp_path / "run")
    assert sum(r["loss"] for r in records[-3:]) < 0.7 * sum(r["loss"] for r in records[:3])
    final = tmp_path / "run" / "model"
    tuned = tf.AutoModelForCausalLM.from_pretrained(str(final)).eval()  # a plain Gemma checkpoint again
    ours, _ = load_causal(str(final))
    original, _ = load_causal(str(sources["gemma3"]))
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    seg = encdec.model.Segments.of(ids, None, None, None)
    with torch.no_grad():
        assert torch.allclose(tuned(input_ids=ids).logits, ours.logits(ours.hidden(ids, seg)), atol=1e-4)
        assert not torch.allclose(ours.embed.weight, original.embed.weight)


def test_decoder_only_loss_reads_prompt_then_response_and_scores_the_response(sources):
    """The causal view of a packed row predicts each response token (and the final EOS) from the prompt
    and the response so far: the loss equals a plain forward pass over prompt + response."""
    tokenizer = load_tokenizer(sources["gemma3"])
    model, _ = load_causal(str(sources["gemma3"]))
    pairs = [Pair((("user", "w1 w2 w3"),), "w4 w5", "a"), Pair((("user", "w9 w8"),), "w7", "b")]
    examples = [chat_example(p, tokenizer, eos_id=1, max_input=16, max_target=8) for p in pairs]
    assert all(e.targets[-1] == 1 for e in examples)
    batch = make_batch(examples, enc_len=32, dec_len=16, pad_id=0, bos_id=2, with_teacher=True)
    with torch.no_grad():
        parts = step.CausalLossModule(model, chunk=4)(batch)
        expected, count = 0.0, 0
        for e in examples:
            ids = torch.tensor([e.inputs + e.targets[:-1]])
            logits = model.logits(model.hidden(ids, encdec.model.Segments.of(ids, None, None, None)))[0]
            expected += torch.nn.functional.cross_entropy(logits[len(e.inputs) - 1 :], torch.tensor(e.targets),
                                                          reduction="sum").item()
            count += len(e.targets)
    assert parts.ce == pytest.approx(expected / count, rel=1e-5)
    assert teacher_rows(batch.rows).input_ids.shape == (1, 48)


def test_held_out_examples_are_not_also_trained_on(adapted, tmp_path, monkeypatch):
    """Instruction sets repeat records (scraped ones often): the held-out examples were split off the shuffled
    examples as they came, and their copies trained: a held-out loss that was a training loss."""
    from encdec.training.config import FINETUNE_DEFAULTS, TrainConfig
    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    once = "".join(json.dumps({"prompt": " ".join(WORDS[i : i + 4]), "response": " ".join(WORDS[i + 4 : i + 6])})
                   + "\n" for i in range(40))  # 40 distinct records
    (tmp_path / "thrice.jsonl").write_text(once * 3)
    cfg = TrainConfig(**{**FINETUNE_DEFAULTS, "model": str(adapted), "data": [str(tmp_path / "thrice.jsonl")],
                         "out": str(tmp_path / "run"), "enc_len": 24, "dec_len": 8, "eval_windows": 8})
    plan, _ = build_plan(cfg, Dist())
    held = {(tuple(e.inputs), tuple(e.targets)) for e in plan.eval_examples}
    trained = [(tuple(e.inputs), tuple(e.targets)) for e in plan.stream.items]
    assert len(plan.eval_examples) == 8 and not held & set(trained)
    assert len(trained) == 3 * 40 - 3 * len(held)  # every copy of a held-out pair left out, nothing else
    # one record repeated: trained on all the same, and said
    from encdec.training import plan as plan_module

    (tmp_path / "one.jsonl").write_text((json.dumps({"prompt": "w1 w2", "response": "w3"}) + "\n") * 20)
    warned: list[str] = []
    monkeypatch.setattr(plan_module.log, "warning", lambda message, *args: warned.append(message % args))
    plan, _ = build_plan(dataclasses.replace(cfg, data=[str(tmp_path / "one.jsonl")]), Dist())
    assert len(plan.stream.items) == 12 and "every training example is a copy of one of the --eval-windows 8" in \
        warned[-1]


def test_bad_instruction_record_is_one_line_naming_it(adapted, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "w1", "response": "w2"}\n{"prompt": "w3", "response": "  "}\n')
    assert main(_args(adapted, tmp_path / "run", data)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl" in err and "line 2" in err
    assert not (tmp_path / "run" / "model").exists()


def test_data_that_cannot_be_read_is_said_before_the_model_loads(adapted, tmp_path, capsys, monkeypatch):
    """A mistyped --data path was found after the model had loaded (minutes for a large one); a .jsonl link to a
    device was read until memory ran out, a pipe waited forever. Pretraining's files are checked as early."""
    import os

    import encdec.training.plan as plan_module

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(plan_module, "load_checkpoint", loaded)
    (tmp_path / "device.jsonl").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "pipe.txt").symlink_to(tmp_path / "pipe.jsonl")
    for data, said in ((tmp_path / "tpyo.jsonl", "tpyo.jsonl: no such file or directory"),
                       (tmp_path / "device.jsonl", "device.jsonl (not a regular file"),
                       (tmp_path / "pipe.jsonl", "pipe.jsonl (not a regular file")):
        assert main(_args(adapted, tmp_path / "run", data)) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert said in line, line
    pretrain = ["pretrain", "--model", str(adapted), "--out", str(tmp_path / "pre"), "--precision", "fp32"]
    for data, said in ((tmp_path / "tpyo.txt", "tpyo.txt: no such file or directory"),
                       (tmp_path / "pipe.txt", "pipe.txt (not a regular file")):
        assert main([*pretrain, "--data", str(data)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert said in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "pre").exists()


def test_a_model_given_after_the_data_list_is_said_so(instructions, capsys):
    """`--data [PATH ...] MODEL`, in the order --help's usage shows, reads MODEL as a data path: argparse said only
    that MODEL was missing."""
    with pytest.raises(SystemExit) as stopped:
        main(["finetune", "--data", str(instructions), "runs/model"])
    assert stopped.value.code == 2
    assert ("the following arguments are required: MODEL (a MODEL given after --data is read as one of its paths: "
            "give MODEL first, or end the list with --)") in capsys.readouterr().err


def test_a_model_that_is_not_there_is_named_as_finetune_takes_it(instructions, tmp_path, capsys):
    """MODEL is finetune's positional argument: the message says MODEL, not pretrain's --model."""
    assert main(_args(tmp_path / "nowhere", tmp_path / "run", instructions)) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "encdec finetune: error: MODEL: not an encoder-decoder checkpoint" in line and "nowhere" in line
    assert not (tmp_path / "run").exists()


def test_lengths_too_short_for_a_response_and_its_end_name_the_flags(adapted, instructions, tmp_path, capsys):
    assert main([*_args(adapted, tmp_path / "run", instructions), "--dec-len", "1"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "--dec-len must be at least 2, got 1" in line


def test_examples_cut_to_fit_are_counted_and_said(adapted, instructions, tmp_path, capsys):
    """Cutting a response to --dec-len (its end of turn kept) teaches the model to stop where the row ends: it was
    silent, at a default of 128 tokens that ordinary chat answers pass."""
    assert main([*_args(adapted, tmp_path / "run", instructions), "--steps", "1", "--eval-every", "0"]) == 0
    assert "longer than" not in capsys.readouterr().err  # 4 words and 2: nothing cut
    assert main([*_args(adapted, tmp_path / "cut", instructions), "--steps", "1", "--eval-every", "0", "--enc-len",
                 "5", "--dec-len", "2"]) == 0
    err = capsys.readouterr().err
    assert "120 of 120 prompts are longer than --enc-len 5 holds and lose their beginning" in err, err
    assert "120 of 120 responses are longer than --dec-len 2 holds and lose their end" in err, err


def test_resuming_with_another_seed_says_the_seed_not_the_data(adapted, instructions, tmp_path, capsys):
    """The seed orders the examples before the held-out ones are cut: another --seed holds out others, refused as
    "the training data differs from the run's", the data blamed."""
    out = tmp_path / "run"
    assert main([*_args(adapted, out, instructions), "--steps", "1", "--save-every", "1", "--eval-every", "0"]) == 0
    capsys.readouterr()
    assert main([*_args(adapted, out, instructions), "--steps", "2", "--resume", "--seed", "7"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "its --seed 0 ordered them before the held-out ones were cut" in line, line
    assert "resume with --seed 0" in line


def test_pretraining_objectives_are_refused(adapted, instructions, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("objective: prefixlm\n")
    assert main([*_args(adapted, tmp_path / "run", instructions), "--config", str(config)]) == 2
    assert "encdec pretrain" in capsys.readouterr().err
