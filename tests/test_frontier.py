"""The quality-efficiency frontier and what it needs: FLOPs per request, the suite average's interval, decoder-only
generation by the project's own code, decoder-only continued pretraining on the same examples, and
bench/frontier.py end to end on tiny models."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from encdec.causal import load_causal
from encdec.cli import main
from encdec.config import EncDecConfig, StackConfig
from encdec.errors import EncdecError
from encdec.evaluation.stats import mean_interval, wilson_interval
from encdec.flops import decoder_only_request_flops, encdec_request_flops
from encdec.inference.causal import generate_causal
from encdec.inference.sampling import Sampling
from encdec.training.config import TrainConfig
from encdec.training.loop import train

BENCH = Path(__file__).resolve().parent.parent / "bench"

# two layers (local with window 2, then global), width 4, 2 query heads sharing 1 key/value head of size 2, FFN 6
STACK = StackConfig(num_layers=2, hidden_size=4, intermediate_size=6, num_heads=2, num_kv_heads=1, head_dim=2,
                    layer_types=["sliding", "full"], sliding_window=2, query_pre_attn_scalar=2)


def test_flops_per_request_match_a_hand_count():
    # per token and layer: q 4x4 + k, v 2 x 4x2 + o 4x4 + FFN 3 x 4x6 = 120 multiply-adds = 240 FLOPs;
    # per query-key pair and layer: 2 heads x 2 (q.k and p.v) x 2 dims x 2 FLOPs = 16; LM head: 2 x 4 x 10 = 80
    # decoder-only, 3 prompt tokens -> 2 new: prompt 3 x 2 x 240 = 1440; pairs: global 1+2+3, local 1+2+2 -> 11 x 16;
    # head once (first new token); one step at position 3: 2 x 240, keys global 4 + local 2 -> 6 x 16, head 80
    assert decoder_only_request_flops(STACK, 10, 3, 2) == 1440 + 176 + 80 + 480 + 96 + 80
    # encoder-decoder, same stacks: encoder 1440, every pair of 3 x 3 in both layers (|d| <= 2): 18 x 16;
    # encoder K/V per decoder layer 3 x 2 x (2 x 4x2) = 96, two layers; two steps from BOS: 2 x 2 x 240, keys
    # (1 + 3) + (1 + 3) then (2 + 3) + (2 + 3) -> 18 x 16; heads 2 x 80
    merged = EncDecConfig(encoder=STACK, decoder=STACK, vocab_size=10, family="gemma3", attention="merged",
                          shared_embeddings=True, encoder_window="t5gemma")
    assert encdec_request_flops(merged, 3, 2) == 1440 + 288 + 192 + 960 + 288 + 160
    # cross-attention adds its own q and o projections per step and layer: 2 x 2 x 2 x (4x4 + 4x4)
    cross = EncDecConfig(**{**merged.__dict__, "attention": "cross"})
    assert encdec_request_flops(cross, 3, 2) == 3328 + 256
    # the T5Gemma 2 convention splits the window of 2 over both sides: each query sees itself and the next key,
    # so the local encoder layer has 5 of the 9 pairs
    split = EncDecConfig(**{**merged.__dict__, "encoder_window": "t5gemma2"})
    assert encdec_request_flops(split, 3, 2) == 3328 - 4 * 16


def test_suite_average_interval_is_the_normal_interval_of_a_mean_of_independent_accuracies():
    mean, low, high = mean_interval([(10, 20), (15, 20)])
    z2 = 1.959964**2
    # Agresti and Coull's pseudo-counts, z^2 / 2 successes in z^2 trials, once for the average: shared by its tasks
    a, b = (10 + z2 / 4) / (20 + z2 / 2), (15 + z2 / 4) / (20 + z2 / 2)
    half = 1.959964 * math.sqrt(a * (1 - a) / (20 + z2 / 2) + b * (1 - b) / (20 + z2 / 2)) / 2
    centre = (a + b) / 2
    assert mean == pytest.approx(0.625) and low == pytest.approx(centre - half) and high == pytest.approx(centre + half)
    assert centre < 0.625  # pulled towards one half
    mean, low, high = mean_interval([(0, 5), (5, 5)])  # no spread in either sample, yet 5 examples prove little
    assert mean == 0.5 and 0.2 < low < 0.4 and 0.6 < high < 0.8
    with pytest.raises(ValueError):
        mean_interval([])


@pytest.mark.parametrize("tasks,n,accuracy", [(14, 25, 0.25), (14, 25, 0.1), (14, 25, 0.9), (14, 50, 0.25),
                                              (4, 6, 0.1), (2, 20, 0.5), (14, 25, 0.02)])
def test_suite_average_interval_holds_the_true_average_about_95_times_in_100(tasks, n, accuracy):
    """Pseudo-counts added once per task moved the centre towards one half by as much for 14 tasks as for one, while
    the half-width shrank with the tasks: 14 tasks of 25 examples at 10% printed 8.0 [8.0, 16.9] from 2 right of
    25 each, and held the true average 53 times in 100 (at 25%: 69)."""
    rng = np.random.default_rng(0)
    draws = rng.binomial(n, accuracy, size=(2000, tasks))
    held = sum(low <= accuracy <= high for _, low, high in (mean_interval([(c, n) for c in row]) for row in draws))
    assert 0.925 <= held / len(draws) <= 0.999, held / len(draws)


def test_one_task_average_interval_is_the_tasks_own_wilson_interval():
    """A table with one task showed its row's Wilson interval and an average row with another interval (1 of 20:
    [0.0, 18.2]% against Wilson's [0.9, 23.6]%)."""
    for correct, n in ((1, 20), (9, 10), (10, 10), (0, 3)):
        assert mean_interval([(correct, n)]) == (correct / n, *wilson_interval(correct, n))


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen3"])  # Llama and Qwen do not scale their embeddings
def test_decoder_only_generation_matches_transformers_and_ignores_left_padding(sources, family):
    import transformers as tf

    model, _ = load_causal(str(sources[family]))
    reference = tf.AutoModelForCausalLM.from_pretrained(str(sources[family]), dtype=torch.float32).eval()
    ids = torch.randint(3, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 2
    ours = generate_causal(model, ids, max_new_tokens=10, eos_token_ids=[-1])  # 19 positions: past the window of 4
    theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[:, 9:]
    assert torch.equal(ours, theirs)
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1, :4], mask[1, :4] = 0, 0
    alone = generate_causal(model, ids[1:2, 4:], max_new_tokens=10, eos_token_ids=[-1])
    assert torch.equal(generate_causal(model, padded, mask, max_new_tokens=10, eos_token_ids=[-1])[1], alone[0])
    with pytest.raises(EncdecError, match="pad prompts on the left"):
        generate_causal(model, ids, mask.flip(1), max_new_tokens=2, eos_token_ids=[-1])
    first = int(ours[0, 0])  # a row that reaches an EOS stops, and is padded while the others go on
    stopped = generate_causal(model, ids, max_new_tokens=10, eos_token_ids=[first])
    assert stopped[0, 0] == first and (stopped[0, 1:] == 0).all()
    # seeded sampling: row i draws from seed + i, as the encoder-decoder's rows do (every row drew the same stream,
    # so one prompt given three times was sampled alike three times)
    hot = Sampling(True, temperature=3.0, seed=5)
    repeated = generate_causal(model, ids[:1].repeat(3, 1), max_new_tokens=10, eos_token_ids=[-1], sampling=hot)
    assert len({tuple(row) for row in repeated.tolist()}) == 3
    for i in range(3):
        assert torch.equal(repeated[i], generate_causal(model, ids[:1], max_new_tokens=10, eos_token_ids=[-1],
                                                        sampling=hot.nth(i))[0])


def test_a_decoder_only_source_pretrains_on_the_same_examples_trimmed_and_distilled(sources, corpus, tmp_path):  # noqa: F811
    cfg = TrainConfig(model=str(sources["gemma3"]), out=str(tmp_path / "run"), data=[str(corpus)], enc_len=16,
                      dec_len=16, batch_size=2, steps=2, lr=3e-3, warmup_steps=1, eval_windows=4, save_every=2,
                      precision="fp32", distill=True, trim_vocab=40, trim_negatives=16)
    final = train(cfg)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert abs(metrics[0]["kl"]) < 1e-5 < metrics[1]["kl"]  # distilled from itself as it started, then it moves away
    before = load_file(str(next(sources["gemma3"].glob("*.safetensors"))))["model.embed_tokens.weight"]
    after = load_file(str(final / "model.safetensors"))["model.embed_tokens.weight"]
    assert after.shape == before.shape  # saved over the full vocabulary again, in the Gemma layout
    changed = (after != before).any(1).numpy()
    kept = np.flatnonzero(changed)
    assert 0 < len(kept) <= 40  # only trained (kept) rows moved
    model, _ = load_causal(str(final))  # and it loads as a source again
    assert model.embed.num_embeddings == before.shape[0]


@pytest.mark.parametrize("point, adapted", [("balanced", ["balanced"]), ("source", [])])
def test_frontier_train_adapts_only_its_point(tmp_path, monkeypatch, point, adapted):
    """`--train NAME` (what --jobs runs in each process, and the README's recipe) adapted every point first:
    minutes and a GB of disk each, and their records in results.jsonl."""
    monkeypatch.syspath_prepend(str(BENCH))
    import frontier

    made, trained = [], []
    monkeypatch.setattr(frontier, "adapted_model", lambda name, options, args: made.append(name) or tmp_path / name)
    monkeypatch.setattr(frontier, "train_point", lambda name, start, *rest: trained.append((name, start)))
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--source", "src", "--out", str(tmp_path / "out"), "--point",
                                      "balanced=all", "--point", "half=::2@cross", "--train", point])
    frontier.main()
    assert made == adapted and trained == [(point, tmp_path / point if adapted else "src")]


def test_frontier_refuses_to_resume_a_point_stopped_in_training_with_other_settings(tmp_path, monkeypatch):
    """A run stopped midway left no record of its settings ("trained" comes at its end): rerun with another --steps,
    recipe or seed, the point's run resumed from its checkpoint under the new ones and was recorded as theirs.
    Bad evaluation options were refused only after every point trained (a traceback)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import frontier

    stopped = []

    class Stopped(Exception):  # a stop midway (KeyboardInterrupt would end this test session, were it not caught)
        pass

    def train(cfg):
        stopped.append(cfg.steps)
        raise Stopped

    monkeypatch.setattr("encdec.training.loop.train", train)
    argv = ["frontier.py", "--source", "src", "--out", str(tmp_path / "out"), "--point", "half=::2@cross"]
    monkeypatch.setattr(sys, "argv", [*argv, "--train", "source"])
    with pytest.raises(Stopped):
        frontier.main()
    monkeypatch.setattr(sys, "argv", [*argv, "--train", "source", "--steps", "400"])
    with pytest.raises(SystemExit, match="holds results made with .*'steps': 200.*this run asks for .*'steps': 400"):
        frontier.main()
    assert stopped == [200]
    for bad in (["--eval-batch-size", "0"], ["--shots", "-1"]):
        monkeypatch.setattr(sys, "argv", [*argv, *bad])
        with pytest.raises(SystemExit) as refused:
            frontier.main()
        assert refused.value.code == 2, bad


def test_frontier_evaluates_again_points_scored_under_another_evaluation_format(tmp_path, monkeypatch):
    """Points evaluated before an upgrade that changed the prompts or how answers are read were kept, and new points
    scored under the new format beside them in one plot. Such points are evaluated again (the study itself, its
    trained points and latency, stays: only the scores are stale); other evaluation settings are still refused."""
    import argparse
    import json

    monkeypatch.syspath_prepend(str(BENCH))
    import frontier

    from encdec.evaluation.tasks import FORMAT_VERSION

    args = argparse.Namespace(eval_tasks="copa", eval_limit=10, shots=0, eval_seed=0, eval_batch_size=8, points={},
                              out=tmp_path)
    asked = {"eval_tasks": "copa", "eval_limit": 10, "shots": 0, "eval_seed": 0}
    records = [{"point": "new", "event": "evaluated", "settings": {**asked, "format_version": FORMAT_VERSION}},
               {"point": "old", "event": "evaluated", "settings": {**asked, "format_version": FORMAT_VERSION - 1}},
               {"point": "older", "event": "evaluated", "settings": asked}]  # (a record of before it was kept)
    frontier.refuse_other_settings(records, args, tmp_path)
    with pytest.raises(SystemExit, match="holds results made with"):
        frontier.refuse_other_settings([{**records[1], "settings": {**asked, "eval_limit": 20}}], args, tmp_path)
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))

    class Evaluated(Exception):
        pass

    def evaluate(models, chosen):
        raise Evaluated(models)

    monkeypatch.setattr("encdec.evaluation.harness.evaluate", evaluate)
    with pytest.raises(Evaluated) as called:
        frontier.evaluate_points({"new": "m-new", "old": "m-old", "older": "m-older"}, args, results)
    assert called.value.args[0] == ["m-old", "m-older"]


@pytest.mark.parametrize("bos", [2, None], ids=["bos", "none"])
def test_frontier_prompts_start_as_the_tokenizer_starts_a_text(tmp_path, monkeypatch, sources, bos):
    """Each prompt row began with the tokenizer's bos_token_id: null for Qwen's, which puts none first, and the
    latency stage (after every point had trained) failed on it. Rows are --prompt-tokens long either way."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH))
    import frontier

    import encdec.data.tokens

    monkeypatch.setattr(encdec.data.tokens, "token_stream", lambda *a, **k: np.arange(10, 60))
    monkeypatch.setattr(encdec.data.tokens, "leading_bos", lambda tokenizer: bos)  # (the tiny tokenizers all put one)
    args = argparse.Namespace(options={}, out=tmp_path / "out", steps=1, seed=0, batches=[1, 2], prompt_tokens=8)
    frontier.write_prompts(args, sources["gemma3"], tmp_path / "prompts.json")
    rows = json.loads((tmp_path / "prompts.json").read_text())
    first = [] if bos is None else [bos]
    assert rows == [[*first, *range(10 + r * (8 - len(first)), 10 + (r + 1) * (8 - len(first)))] for r in range(2)]


def test_a_latency_round_is_one_sessions_measurement_of_every_point(monkeypatch):
    """A round a stopped run left half-measured was finished point by point by the next session (another machine,
    maybe twice slower), and its ratio set the two sessions' speeds against each other: 1.50x for points of
    identical speed. The round is measured again whole; a round of records from before sessions were named counts."""
    monkeypatch.syspath_prepend(str(BENCH))
    from frontier import measured_rounds, summarise

    def timed(point: str, round_: int, seconds: float, session: str | None) -> dict:
        return {"point": point, "event": "latency", "round": round_, "seconds": {"1": [seconds]}, "flops": 1,
                "parameters": 1, **({} if session is None else {"session": session})}

    records = [*({"point": p, "event": "evaluated"} for p in ("source", "dec9")),
               timed("source", 0, 1.0, None), timed("dec9", 0, 1.0, None),  # written before sessions were named
               timed("dec9", 1, 1.0, "a"),  # then the run stopped
               timed("source", 1, 2.0, "b"), timed("dec9", 1, 2.0, "b")]  # measured whole by a slower host
    assert {r: sorted(g) for r, g in measured_rounds(records, ["source", "dec9"]).items()} == {
        0: ["dec9", "source"], 1: ["dec9", "source"]}
    points = summarise(records, ["source", "dec9"])
    assert points["source"]["rounds"] == points["dec9"]["rounds"] == {"1": [[1.0], [2.0]]}
    assert measured_rounds(records[:5], ["source", "dec9"]).keys() == {0}  # round 1 is measured again, whole


def test_frontier_trains_evaluates_times_and_plots_every_point(sources, corpus, tmp_path, monkeypatch,  # noqa: F811
                                                               capsys):
    out = tmp_path / "frontier"
    command = [sys.executable, str(BENCH / "frontier.py"), "--source", str(sources["gemma3"]), "--out", str(out),
               "--point", "balanced=all", "--point", "half=::2@cross", "--steps", "2", "--save-every", "1",
               "--recipe", f"tiny:trim_vocab=40,trim_negatives=16,data=[{corpus}]", "--eval-tasks", "copa",
               "--eval-limit", "4", "--prompt-tokens", "24", "--new-tokens", "4", "--batches", "1,2", "--rounds", "1",
               "--repeats", "1", "--jobs", "2"]  # the training runs in two processes at once
    first = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    events = {(r["point"], r["event"]) for r in records}
    assert events == {(p, e) for p in ("source", "balanced", "half")
                      for e in ("training", "trained", "evaluated", "latency")} | {("balanced", "adapted"),
                                                                                   ("half", "adapted")}
    evaluated = {r["point"]: r for r in records if r["event"] == "evaluated"}
    assert all(set(r["nll"]) == {"python-docs", "general-english"} and r["suite"]["tasks"] == 1 for r in evaluated.values())
    timed = {r["point"]: r for r in records if r["event"] == "latency"}
    assert all(set(r["seconds"]) == {"1", "2"} and r["flops"] > 0 for r in timed.values())
    assert timed["half"]["flops"] < timed["balanced"]["flops"]  # a 2-layer decoder costs less per request
    assert (out / "frontier.png").stat().st_size > 10_000
    table = first.stdout[first.stdout.index("| point |"):]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == ["source", "balanced", "half"]
    assert "ratio (latency batch 2, source / half): " in first.stdout
    # the reruns in this process (a fresh one costs seconds of imports each)
    monkeypatch.syspath_prepend(str(BENCH))
    from frontier import main

    def rerun(argv: list[str]) -> str:
        monkeypatch.setattr(sys, "argv", argv[1:])
        capsys.readouterr()
        main()
        return capsys.readouterr().out

    assert table in rerun(command)  # nothing reruns
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)
    with pytest.raises(SystemExit, match="use another --out"):  # one OUT holds one study
        rerun([*command, "--steps", "3"])
    # a point of the same name adapted otherwise: its trained model would have been taken as the new point's
    with pytest.raises(SystemExit, match="holds point 'half' adapted with --attention cross --decoder-layers ::2"):
        rerun(["half=::3@cross" if option == "half=::2@cross" else option for option in command])


def test_a_decoder_only_pretraining_run_resumes_exactly(sources, corpus, tmp_path, monkeypatch):  # noqa: F811
    from encdec.training.metrics import Metrics

    def config(out: str, **extra: object) -> TrainConfig:
        return TrainConfig(model=str(sources["gemma3"]), out=str(tmp_path / out), data=[str(corpus)], enc_len=16,
                           dec_len=16, batch_size=2, steps=4, lr=3e-3, warmup_steps=1, eval_windows=4, save_every=1,
                           precision="fp32", distill=True, trim_vocab=40, trim_negatives=16, **extra)

    train(config("straight"))
    log = Metrics.log

    def stop_after_step_2(self, record, **kw):
        log(self, record, **kw)
        if record["step"] == 2:
            raise KeyboardInterrupt  # after step 2's checkpoint was written

    monkeypatch.setattr(Metrics, "log", stop_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(config("resumed"))
    monkeypatch.setattr(Metrics, "log", log)
    train(config("resumed", resume=True))
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("straight", "resumed")}
    assert len(losses["straight"]) == 4 and losses["resumed"] == losses["straight"]
    a, b = (load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_tokenizer_without_unk_pad_or_bos_still_trains_or_says_why(sources, corpus, tmp_path, monkeypatch):  # noqa: F811
    """Llama 3 has no pad token, Qwen2 no BOS, neither an <unk>: the run takes the source's ids instead, trims
    onto the pad token when it has one, and refuses --trim-vocab in one line when it has neither."""
    import copy

    import encdec.training.plan as plan_module

    real = plan_module.load_tokenizer

    def without(*names: str):
        def load(directory):
            tokenizer = copy.deepcopy(real(directory))  # never the loader's cached one, which other tests share
            for name in names:
                setattr(tokenizer, name, None)
            return tokenizer
        return load

    def config(out: str, **options) -> TrainConfig:
        return TrainConfig(model=str(sources["gemma3"]), out=str(tmp_path / out), data=[str(corpus)], enc_len=16,
                           dec_len=16, batch_size=2, steps=1, lr=3e-3, warmup_steps=1, eval_windows=4, save_every=1,
                           precision="fp32", **options)

    monkeypatch.setattr(plan_module, "load_tokenizer", without("unk_token", "bos_token"))
    from encdec.training.distributed import Dist

    trimmed = config("plan", trim_vocab=40, trim_negatives=16)
    plan, tokenizer = plan_module.build_plan(trimmed, Dist())  # the ids the run uses, not merely that it ran
    assert tokenizer.unk_token is None and tokenizer.bos_token is None
    assert plan.trimmed.unk_id == plan.trimmed.table[tokenizer.pad_token_id] != plan.trimmed.table[plan.eos_id]
    assert all(e.targets[-1] == plan.eos_id for e in plan.eval_examples)
    assert (train(config("no-unk", trim_vocab=40, trim_negatives=16)) / "model.safetensors").exists()
    monkeypatch.setattr(plan_module, "load_tokenizer", without("unk_token", "bos_token", "pad_token"))
    assert (train(config("untrimmed")) / "model.safetensors").exists()
    with pytest.raises(EncdecError, match="this tokenizer has neither; train without --trim-vocab"):
        train(config("refused", trim_vocab=40))
    assert not (tmp_path / "refused" / "model").exists()


def test_a_pad_token_the_model_reads_as_its_start_is_not_taken_for_unk(sources, tmp_path):
    """Qwen has no <unk>, and its pad token is its config's BOS, the adapted decoder's start token: --trim-vocab
    made every dropped token that start (and, for Qwen, an end of document)."""
    import copy

    import numpy as np

    import encdec
    from encdec.training.distributed import Dist
    from encdec.training.plan import _trim

    model = encdec.adapt(encdec.load_source(str(sources["gemma3"])))
    tokenizer = copy.deepcopy(encdec.load_tokenizer(sources["gemma3"]))
    tokenizer.unk_token = None
    cfg = TrainConfig(model="m", out=str(tmp_path / "out"), trim_vocab=40)
    ids = np.arange(3, 90)
    assert _trim(cfg, model, tokenizer, ids, 1, Dist())[1].unk_id == 0  # the pad token, neither a start nor an end
    model.config.bos_token_id = tokenizer.pad_token_id  # as Qwen's config names its <|endoftext|>
    with pytest.raises(EncdecError, match="a pad token that is neither a BOS nor an EOS"):
        _trim(cfg, model, tokenizer, ids, 1, Dist())


@pytest.mark.parametrize("kind", ["decoder-only", "encoder-decoder"])
def test_a_tokenizer_whose_unk_is_its_eos_keeps_the_eos_targets_when_trimmed(sources, corpus, tmp_path, kind):  # noqa: F811
    """GPT-2-style tokenizers name EOS their <unk> too: --trim-vocab mapped the dropped tokens to it and left every
    EOS target unscored (the trimmed run never learned to stop). The pad token stands in for <unk> then."""
    import encdec
    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    source = tmp_path / "llama"
    shutil.copytree(sources["llama"], source)
    settings = json.loads((source / "tokenizer_config.json").read_text())
    settings["unk_token"] = settings["eos_token"]
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    model = source
    if kind == "encoder-decoder":
        assert main(["adapt", "--encoder", str(source), "--out", str(tmp_path / "adapted")]) == 0
        model = tmp_path / "adapted"
    tokenizer = encdec.load_tokenizer(model)
    assert tokenizer.unk_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id
    cfg = TrainConfig(model=str(model), out=str(tmp_path / "run"), data=[str(corpus)], enc_len=16, dec_len=16,
                      steps=1, eval_windows=4, precision="fp32", trim_vocab=40, trim_negatives=0)
    plan, _ = build_plan(cfg, Dist())
    assert plan.trimmed.unk_id == plan.trimmed.table[tokenizer.pad_token_id] != plan.eos_id
    assert all(e.targets[-1] == plan.eos_id for e in plan.eval_examples)


@pytest.mark.parametrize("kind", ["encoder-decoder", "decoder-only"])
def test_a_pad_token_that_the_config_reads_as_bos_is_never_the_trimmed_unk(sources, corpus, tmp_path, kind):
    """Qwen's pad token is its config's BOS (and a generation EOS): with no <unk>, --trim-vocab took it for the
    unknown token, so every dropped token was read as one. The encoder-decoder path refused it; a decoder-only
    model's config ids were not looked at, and it trained so, without a word."""
    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    source = tmp_path / "llama"
    shutil.copytree(sources["llama"], source)
    settings = json.loads((source / "tokenizer_config.json").read_text())
    settings.pop("unk_token", None)
    settings["pad_token"] = settings["bos_token"]  # (the config names that id its BOS)
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    (source / "special_tokens_map.json").unlink(missing_ok=True)
    model = source
    if kind == "encoder-decoder":
        assert main(["adapt", "--encoder", str(source), "--out", str(tmp_path / "adapted")]) == 0
        model = tmp_path / "adapted"
    cfg = TrainConfig(model=str(model), out=str(tmp_path / "run"), data=[str(corpus)], enc_len=16, dec_len=16,
                      steps=1, eval_windows=4, precision="fp32", trim_vocab=40, trim_negatives=0)
    with pytest.raises(EncdecError, match="this tokenizer has neither; train without --trim-vocab"):
        build_plan(cfg, Dist())


def test_a_decoder_only_student_never_distils_the_eos_its_targets_end_with(sources, corpus, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    """Llama 3 Instruct lists several EOS ids, the tokenizer's (which ends the targets) not first: the loss module
    was given the config's first, so the cut windows' EOS targets were distilled. (It now leaves out each example's
    last target, whatever its id, and distils a document's own EOS inside the targets.)"""
    import dataclasses

    from encdec.training import loop, step
    from encdec.training.data import example_ends
    from encdec.training.distributed import Dist
    from encdec.training.plan import build_plan

    source = tmp_path / "llama"
    shutil.copytree(sources["llama"], source)
    settings = json.loads((source / "config.json").read_text())
    settings["eos_token_id"] = [5, settings["eos_token_id"]]
    (source / "config.json").write_text(json.dumps(settings))
    cfg = TrainConfig(model=str(source), out=str(tmp_path / "run"), data=[str(corpus)], enc_len=16, dec_len=16,
                      steps=1, eval_windows=4, precision="fp32")
    plan, tokenizer = build_plan(cfg, Dist())
    assert plan.eos_id == tokenizer.eos_token_id != 5
    assert all(e.targets[-1] == plan.eos_id for e in plan.eval_examples)
    counted: list[tuple[bool, int, int]] = []  # each step: examples end with the EOS; distilled: counted, expected

    class Counting(step.CausalLossModule):
        def target_counts(self, batches):
            targets, distilled = super().target_counts(batches)
            last = torch.cat([b.rows.labels[example_ends(b.rows)] for b in batches])
            examples = sum(len(set(row.tolist()) - {0}) for b in batches for row in b.rows.decoder_segment_ids)
            counted.append((bool((last == plan.eos_id).all()) and len(last) == examples, distilled, targets - examples))
            return targets, distilled

    monkeypatch.setattr(loop, "CausalLossModule", Counting)
    train(dataclasses.replace(cfg, distill=True, eval_every=0))
    assert counted and all(eos and distilled == expected for eos, distilled, expected in counted), counted
