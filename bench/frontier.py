"""The quality-efficiency frontier: the decoder-only source and adapted encoder-decoders, each trained with one
recipe for the same tokens, placed by quality against inference cost.

Points: the source (decoder-only) and one adapted configuration per --point NAME=LAYERS[@ATTENTION]
(LAYERS: the source's layers the decoder keeps, as `encdec adapt --decoder-layers` takes them, or
`all` for the balanced model; ATTENTION: merged or cross, default --attention). The defaults are the
balanced model, a 9-layer decoder (1::2: layers 1, 3, ..., 17, which hold Gemma 3 270M's full-attention
layers 5, 11, 17) and a 6-layer one (2::3), each with the 18-layer encoder.

Every point trains with the same recipe (--recipe, as bench/recovery.py takes it: the quickstart's
PrefixLM + distillation with options changed; by default the recovery grid's best) for the same
--steps on the same data: the encoder-decoders as `encdec pretrain` trains them; the source as a decoder-only model reading each
example's prefix + suffix causally, scored on the same suffix tokens, with the same loss, distillation
(from itself as it started), vocabulary trimming, learning-rate schedule and seed. Options that only an
encoder has (freeze, curriculum, cross warm-up) are left out of its run.

Quality: held-out suffix NLL on both held-out sets (python-docs and general-english: passages no run trains on,
though the default recipe trains on both collections, CoQA's stories among them; the plot shows general-english)
and the average accuracy of the pretraining suite (--eval-tasks, a fixed seeded sample of
--eval-limit examples per task, --shots) with a 95% interval: the `encdec evaluate` harness, whose
per-task table (the points side by side) goes to OUT/evaluation-NAMES.md. Cost: FLOPs per request (a
--prompt-tokens input -> --new-tokens new tokens, from the shapes: `encdec.flops`) and the measured
latency of such a request at each --batches size, by the project's own generation for every point
(`encdec.generate` for the encoder-decoders, `encdec.inference.causal` for the source), EOS ignored,
float32. Latency runs last, in --rounds rounds that each time every point once (in reverse order every other
round), each in a fresh process (one untimed 2-token call, then --repeats timed ones), so that a slow spell of
a shared machine falls on all points.

With --jobs N the training runs go N at a time, each in its own process with its share of the cores (on a
small CPU two single-threaded runs get through more steps per hour than one run on both cores).

Results are appended to OUT/results.jsonl as each piece finishes; a rerun skips what is done and
resumes an interrupted training run. Printed last: a table, then the latency ratio of each point
against the source (> 1: faster than the source); drawn to OUT/frontier.png.

    python bench/frontier.py --out runs/frontier --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import in_turn, print_result, ratio_line, require_positive, run_main, run_worker, time_calls
from study import append, check_recipe, parse_recipe, read_results, recipe_config, tokens_per_step

from encdec.checkpoint import is_checkpoint
from encdec.data.corpus import HELDOUT_SETS
from encdec.errors import EncdecError
from encdec.evaluation.tasks import LM_TASK, parse_tasks
from encdec.files import atomic_write

SOURCE = "source"
DEFAULT_POINTS = ["balanced=all", "dec9=1::2", "dec6=2::3"]
CHOSEN_RECIPE = "chosen:lr=3e-5,data=[corpus:python-docs,corpus:coqa-stories]"  # the recovery grid's best
ENCODER_ONLY = ("freeze_encoder_steps", "encoder_curriculum_steps", "cross_warmup_steps")
PLOTTED_SET = "general-english"  # the plot's held-out NLL
DEVICE = torch.device("cpu")
# the options each kind of result depends on: a rerun into the same OUT must not mix studies
SETTINGS = {"adapted": ("source",), "trained": ("source", "steps", "recipe", "seed"),
            "training": ("source", "steps", "recipe", "seed"),  # begun: a run stopped midway resumes on these alone
            "evaluated": ("eval_tasks", "eval_limit", "shots", "eval_seed"),
            "latency": ("prompt_tokens", "new_tokens", "batches", "repeats")}


def settings(event: str, args: argparse.Namespace) -> dict:
    chosen = {key: getattr(args, key) for key in SETTINGS[event]}
    if event == "evaluated":  # scores of another prompt and answer-reading version do not compare (an upgrade):
        # such points are evaluated again (refuse_other_settings, evaluate_points)
        from encdec.evaluation.tasks import FORMAT_VERSION

        chosen["format_version"] = FORMAT_VERSION
    return chosen


def evaluation_settings(args: argparse.Namespace):
    """The suite every point is scored on (`Settings`): the accuracy tasks asked for and the held-out NLL."""
    from encdec.evaluation.harness import Settings

    tasks = [t for t in parse_tasks(args.eval_tasks) if t != LM_TASK]
    return Settings(tasks=[*tasks, LM_TASK], shots=args.shots, limit=args.eval_limit, batch_size=args.eval_batch_size,
                    seed=args.eval_seed)


def refuse_other_settings(records: list[dict], args: argparse.Namespace, results: Path) -> None:
    """A rerun into the same OUT resumes the same study: other settings, or a point of the same name adapted
    otherwise (its trained model would be taken as the new point's), are refused."""
    for record in records:
        if record["event"] == "evaluated" and _without_format(record["settings"]) == _without_format(
                settings("evaluated", args)):  # scored under another format version: evaluated again, not refused
            continue
        if record["settings"] != settings(record["event"], args):
            raise SystemExit(f"{results} holds results made with {record['settings']}, this run asks for "
                             f"{settings(record['event'], args)}: use another --out")
        point = record["point"]
        if "adapt" in record and point in args.points and record["adapt"] != args.points[point]:
            raise SystemExit(f"{results} holds point {point!r} adapted with {' '.join(record['adapt'])}, this run "
                             f"asks for {' '.join(args.points[point])}: give it another name, or use another --out")


def _without_format(chosen: dict) -> dict:
    return {key: value for key, value in chosen.items() if key != "format_version"}


def parse_point(text: str, attention: str) -> tuple[str, list[str]]:
    """NAME=LAYERS[@ATTENTION] -> (NAME, the `encdec adapt` options that make it)."""
    name, _, spec = text.partition("=")
    layers, _, chosen = spec.partition("@")
    if not name or not layers or name == SOURCE or chosen not in ("", "merged", "cross"):
        raise EncdecError(f"--point {text!r}: expected NAME=LAYERS[@merged|@cross] (LAYERS: all, 0,3,6 or 2::3), "
                          f"NAME not {SOURCE!r}")
    options = ["--attention", chosen or attention]
    return name, options if layers == "all" else [*options, "--decoder-layers", layers]


def adapted_model(name: str, options: list[str], args: argparse.Namespace) -> Path:
    """OUT/NAME/adapted, made by `encdec adapt` unless it is there already."""
    from encdec.cli import main as encdec

    out = args.out / name / "adapted"
    if not is_checkpoint(out):
        print(f"adapting {args.source} into {out} ({' '.join(options)}) ...", file=sys.stderr, flush=True)
        if encdec(["adapt", "--encoder", args.source, *options, "--out", str(out), "--overwrite"]) != 0:
            raise SystemExit(f"encdec adapt failed for --point {name}")
        append(args.out / "results.jsonl", {"point": name, "event": "adapted", "settings": settings("adapted", args),
                                            "adapt": options})
    return out


def train_point(name: str, start: str | Path, args: argparse.Namespace, results: Path, done: set) -> Path:
    """The recipe's run from `start` (an adapted model, or the decoder-only source) into OUT/NAME/train."""
    from encdec.training.loop import train

    options = args.options if name != SOURCE else {k: v for k, v in args.options.items() if k not in ENCODER_ONLY}
    cfg = recipe_config(options, model=start, out=args.out / name / "train", steps=args.steps, seed=args.seed,
                        save_every=args.save_every, keep_last=1)
    final = Path(cfg.out) / "model"
    if (name, "trained") not in done:
        began = time.perf_counter()
        # a run stopped before its first checkpoint left its metrics.jsonl, which only --resume trains past
        cfg.resume = Path(cfg.out).is_dir()
        if (name, "training") not in done:  # recorded before the first step: a rerun with other settings is refused
            append(results, {"point": name, "event": "training", "settings": settings("training", args)})
        try:
            train(cfg)
        except EncdecError as e:
            raise SystemExit(f"training {name} failed: {e}") from None
        append(results, {"point": name, "event": "trained", "settings": settings("trained", args),
                         "adapt": args.points.get(name, []),
                         "tokens": args.steps * tokens_per_step(cfg), "seconds": round(time.perf_counter() - began),
                         "options": options})
    return final


def train_in_parallel(names: list[str], args: argparse.Namespace) -> None:
    """Each of `names` trained by `train_point` in a fresh process (this script with --train NAME), --jobs at a
    time, each process given an equal share of this machine's cores."""
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def run(name: str) -> None:
        print(f"training {name} in its own process ({threads} thread(s)) ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, *sys.argv[1:], "--train", name]
        if subprocess.run(command, env=env, check=False).returncode != 0:
            raise SystemExit(f"training {name} failed (its output is above); a rerun resumes from its last checkpoint")

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, names))  # list(): a failed run raises here


def evaluate_points(models: dict[str, Path], args: argparse.Namespace, results: Path) -> None:
    """Both held-out NLLs and the suite's average with its 95% interval, by the `encdec evaluate` harness: every
    point not yet evaluated in one call (the tasks' data read once), their table in OUT/evaluation-NAMES.md."""
    from encdec.evaluation.harness import evaluate, write
    from encdec.evaluation.stats import mean_interval

    done = {r["point"] for r in read_results(results)  # (a point scored under another format version: again)
            if r["event"] == "evaluated" and r["settings"] == settings("evaluated", args)}
    pending = {name: str(model) for name, model in models.items() if name not in done}
    if not pending:
        return
    tasks = [t for t in parse_tasks(args.eval_tasks) if t != LM_TASK]
    record = evaluate(list(pending.values()), evaluation_settings(args))
    write(record, args.out / f"evaluation-{'-'.join(pending)}")
    for name, model in pending.items():
        scored = {task: record["tasks"][task]["results"][model] for task in tasks}
        mean, low, high = mean_interval([(s["accuracy"] * s["n"], s["n"]) for s in scored.values()])
        heldout = record["tasks"][LM_TASK]["results"][model]
        append(results, {"point": name, "event": "evaluated", "settings": settings("evaluated", args), "model": model,
                         "nll": {n: round(heldout[f"suffix_nll:{n}"], 4) for n in HELDOUT_SETS},
                         "suite": {"average": mean, "interval95": [low, high], "tasks": len(tasks),
                                   "accuracy": {t: s["accuracy"] for t, s in scored.items()}}})


# ---- latency: one point in a fresh process ----

def write_prompts(args: argparse.Namespace, tokenizer_dir: Path, path: Path) -> None:
    """Max(--batches) different prompts of exactly --prompt-tokens tokens (BOS first, where the tokenizer puts one
    before a text: Qwen's puts none), cut from the start of the recipe's training data (already tokenized and
    cached by then), written once for every worker to read."""
    from encdec.data.tokens import leading_bos, token_stream
    from encdec.sources import load_tokenizer

    cfg = recipe_config(args.options, model=tokenizer_dir, out=args.out, steps=args.steps, seed=args.seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    ids, rows, length = token_stream(tokenizer, cfg.data, text_field=cfg.text_field), max(args.batches), args.prompt_tokens
    start = [] if (bos := leading_bos(tokenizer)) is None else [bos]
    text = length - len(start)  # the text tokens of a prompt
    if len(ids) < rows * text:
        raise SystemExit(f"the training data has {len(ids)} tokens, fewer than {rows} prompts of {length} need")
    atomic_write(path, json.dumps([[*start, *ids[r * text : (r + 1) * text].tolist()]
                                   for r in range(rows)]))  # every rerun reuses it: never half a file


def worker(model_dir: Path, prompts: Path, args: argparse.Namespace) -> None:
    """Seconds per request at every batch size, FLOPs per request and parameters of one point, as JSON."""
    from encdec.flops import decoder_only_request_flops, encdec_request_flops

    prompt, new = args.prompt_tokens, args.new_tokens
    if is_checkpoint(model_dir):
        from encdec.checkpoint import load

        model = load(model_dir).eval()
        flops = encdec_request_flops(model.config, prompt, new)

        def generate(ids: torch.Tensor, tokens: int) -> torch.Tensor:
            return model.generate(ids, max_new_tokens=tokens, eos_token_ids=[-1])  # no id is -1: no early stop
    else:
        from encdec.causal import load_causal
        from encdec.inference.causal import generate_causal

        model, _ = load_causal(str(model_dir))
        flops = decoder_only_request_flops(model.cfg, model.embed.num_embeddings, prompt, new)

        def generate(ids: torch.Tensor, tokens: int) -> torch.Tensor:
            return generate_causal(model, ids, max_new_tokens=tokens, eos_token_ids=[-1])

    rows = torch.tensor(json.loads(prompts.read_text()))
    seconds = {}
    with torch.inference_mode():
        for batch in args.batches:
            print(f"  {model_dir}: batch {batch}", file=sys.stderr, flush=True)
            generate(rows[:batch], 2)  # untimed: the first call of a shape pays for allocations
            seconds[str(batch)] = time_calls(lambda b=batch: generate(rows[:b], new), 0, args.repeats, DEVICE)
    print_result({"seconds": seconds, "flops": flops, "parameters": sum(p.numel() for p in model.parameters())})


# ---- the summary ----

def measured_rounds(records: list[dict], names: list[str]) -> dict[int, dict[str, dict]]:
    """Latency round -> point -> its record, for the rounds one session measured for every point (the last such
    session's): a round a stopped run left part-measured is measured again whole, not finished by another session,
    maybe on another machine, whose speeds its ratios would set against the first's."""
    groups: dict[tuple[int, str | None], dict[str, dict]] = {}
    for r in records:
        if r["event"] == "latency":
            groups.setdefault((r["round"], r.get("session")), {})[r["point"]] = r
    return {round_: group for (round_, _), group in groups.items() if set(names) <= set(group)}


def summarise(records: list[dict], names: list[str]) -> dict[str, dict]:
    """Per point: its evaluation, and its latency rounds per batch size (a list of seconds per round)."""
    points, measured = {}, measured_rounds(records, names)
    for name in names:
        # the latest: a point evaluated again under a newer format version has both
        evaluated = next(r for r in reversed(records) if r["point"] == name and r["event"] == "evaluated")
        timed = [measured[round_][name] for round_ in sorted(measured)]
        rounds = {b: [r["seconds"][b] for r in timed] for b in timed[0]["seconds"]}
        points[name] = {**evaluated, "rounds": rounds, "flops": timed[0]["flops"], "parameters": timed[0]["parameters"],
                        "latency": {b: statistics.median(t for r in rs for t in r) for b, rs in rounds.items()}}
    return points


def table(points: dict[str, dict], batches: list[int]) -> str:
    sets = list(HELDOUT_SETS)
    head = ["point", "params (M)", *[f"NLL {s}" for s in sets], "suite avg % [95%]", "GFLOPs/request",
            *[f"latency b{b} (s)" for b in batches]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, p in points.items():
        low, high = p["suite"]["interval95"]
        cells = [name, f"{p['parameters'] / 1e6:.1f}", *[f"{p['nll'][s]:.3f}" for s in sets],
                 f"{100 * p['suite']['average']:.1f} [{100 * low:.1f}, {100 * high:.1f}]", f"{p['flops'] / 1e9:.2f}",
                 *[f"{p['latency'][str(b)]:.2f}" for b in batches]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: dict[str, dict], batches: list[int], title: str, path: Path) -> Path:
    """Quality against cost, one labelled marker per point: out-of-domain NLL against latency (each batch size)
    and against FLOPs, and the suite average (95% interval) against the largest batch's latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"latency, batch {b} (s)", lambda p, b=b: p["latency"][str(b)], "nll") for b in batches]
    panels += [("GFLOPs per request", lambda p: p["flops"] / 1e9, "nll"),
               (f"latency, batch {batches[-1]} (s)", lambda p: p["latency"][str(batches[-1])], "suite")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for ax, (label, cost, quality) in zip(axes, panels):
        for name, p in points.items():
            x = cost(p)
            if quality == "nll":
                y, err = p["nll"][PLOTTED_SET], None
            else:
                y = 100 * p["suite"]["average"]
                low, high = (100 * v for v in p["suite"]["interval95"])
                err = [[y - low], [high - y]]
            ax.errorbar([x], [y], yerr=err, marker="s" if name == SOURCE else "o", capsize=3, linestyle="none")
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5))
        ylabel = f"suffix NLL, {PLOTTED_SET} (nats/token)" if quality == "nll" else "suite average accuracy (%)"
        ax.set(xlabel=label, ylabel=ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="gemma-3-270m", help="the decoder-only source (any `encdec adapt` SRC)")
    p.add_argument("--out", type=Path, default=Path("runs/frontier"))
    p.add_argument("--point", action="append", default=[], help=f"NAME=LAYERS[@ATTENTION] (repeat; default: "
                   f"{' '.join(DEFAULT_POINTS)})")
    p.add_argument("--attention", default="merged", choices=("merged", "cross"))
    p.add_argument("--recipe", default=CHOSEN_RECIPE, help="NAME[:option=value,...] as bench/recovery.py takes it "
                   "(default: the recovery grid's best, docs/adaptation.md)")
    p.add_argument("--steps", type=int, default=200, help="training steps per point (the recipe: 512 tokens each)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (an interrupted run resumes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tasks", default="choice", help="`encdec evaluate --tasks` (the held-out NLL is added)")
    p.add_argument("--eval-limit", type=int, default=50, help="examples per task: a fixed seeded sample")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8", help="batch sizes timed, comma list")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per batch size and round")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, each in its own process")
    p.add_argument("--train", metavar="NAME", help="only train this point's model (e.g. balanced), resuming its run "
                   "where one is there: what --jobs starts for each point")
    p.add_argument("--worker", type=Path, nargs=2, metavar=("MODEL", "PROMPTS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        args.batches = sorted({int(b) for b in args.batches.split(",")})
    except ValueError:
        p.error(f"--batches {args.batches!r}: expected a comma list of integers like 1,8")
    require_positive(p, args, ("steps", "save_every", "eval_limit", "prompt_tokens", "new_tokens", "rounds", "repeats",
                               "jobs"))
    if args.batches[0] < 1:
        p.error(f"--batches must be at least 1, got {args.batches[0]}")
    try:
        if not [t for t in parse_tasks(args.eval_tasks) if t != LM_TASK]:
            p.error(f"--eval-tasks {args.eval_tasks!r}: name at least one accuracy task (the held-out NLL is added)")
        args.points = dict(parse_point(text, args.attention) for text in args.point or DEFAULT_POINTS)
        if args.train is not None and args.train not in (SOURCE, *args.points):
            p.error(f"--train {args.train!r}: not one of the points {[SOURCE, *args.points]}")
        _, args.options = parse_recipe(args.recipe)
        check_recipe(args.options)
        evaluation_settings(args)  # its checks (--shots, --eval-batch-size) now, not after every point trained
    except EncdecError as e:
        p.error(str(e))
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(*args.worker, args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    refuse_other_settings(read_results(results), args, results)
    worker_options = ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--batches",
                      ",".join(map(str, args.batches)), "--repeats", str(args.repeats)]
    names = [SOURCE, *args.points]

    def start(name: str) -> str:
        return args.source if name == SOURCE else adapted_model(name, args.points[name], args)

    if args.train:  # this point's model alone: the others are not adapted (minutes and a GB of disk each)
        train_point(args.train, start(args.train), args, results, set())
        return
    starts = {name: start(name) for name in names}
    done = {(r["point"], r["event"]) for r in read_results(results)}
    if args.jobs > 1:
        train_in_parallel([name for name in names if (name, "trained") not in done], args)
        done = {(r["point"], r["event"]) for r in read_results(results)}
    models = {name: train_point(name, starts[name], args, results, done) for name in names}
    evaluate_points(models, args, results)
    prompts = args.out / f"prompts-{max(args.batches)}x{args.prompt_tokens}.json"
    if not prompts.exists():
        write_prompts(args, models[SOURCE], prompts)
    session = f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"  # a round's points are measured in one
    for round_ in range(args.rounds):
        if round_ in measured_rounds(read_results(results), names):
            continue
        for name in in_turn(names, round_):
            print(f"latency round {round_ + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            measured = run_worker(__file__, [*worker_options, "--worker", str(models[name]), str(prompts)])
            append(results, {"point": name, "event": "latency", "settings": settings("latency", args), "round": round_,
                             "session": session, **measured})
    points = summarise(read_results(results), names)
    setting = (f"{args.prompt_tokens}-token input -> {args.new_tokens} new tokens, float32; {args.steps} training steps "
               f"per point, recipe {args.recipe}; suite: {args.eval_tasks}, {args.eval_limit} per task, {args.shots}-shot")
    print(f"plot: {plot(points, args.batches, setting, args.out / 'frontier.png')}")
    print(f"\n{setting}")
    print(table(points, args.batches))
    for name in args.points:
        for b in args.batches:
            print(ratio_line(f"latency batch {b}, {SOURCE} / {name}", points[name]["rounds"][str(b)],
                             points[SOURCE]["rounds"][str(b)]))


if __name__ == "__main__":
    run_main(main)
