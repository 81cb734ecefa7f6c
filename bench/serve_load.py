"""Serving under load: `encdec serve` (continuous batching) against one request at a time.

Targets, each driven by 1, 4 and 16 concurrent clients (--clients) in closed loop (a client sends its
next request when the previous one has finished), every request a streamed `POST /v1/completions`:

- serve: `encdec serve MODEL --max-batch 16` (a real uvicorn server on the loopback interface);
- serve-bf16: the same server with `--dtype bfloat16` (on CPU, oneDNN's bfloat16 products: not float32's
  exact texts, -0.0003 / +0.0006 nats of held-out NLL on the trained model, bench/inference_quality.py);
- serve-int8: the same server with `--quantize int8` (dynamic int8 products, float32 elsewhere; their quality
  cost is bench/inference_quality.py's, and a request's tokens depend on the requests decoded with it); not run
  unless named in --targets;
- serve-batch1: the same server with `--max-batch 1` (one request decoded at a time);
- transformers-loop: one request at a time through transformers' `AutoModelForSeq2SeqLM.generate` on
  the same checkpoint, the clients being threads of the same process that queue their requests for a
  single generating thread (no HTTP: what a plain loop over transformers gives, its time to first
  token taken when generate emits its first new token), its process keeping freed memory as the server's
  does (`encdec.allocator`; runs before 2026-12-06's third session gave the loop glibc's default);
- transformers-loop-bf16: the same loop with the model in bfloat16, serve-bf16's baseline at the same
  precision (its texts are compared with the float32 loop's too); not run unless named in --targets (on a CPU
  without bfloat16 products it is very slow).

Requests: prompts of mixed lengths (--min-prompt..--max-prompt tokens, decoded back to text) cut
from the default corpus, 32-64 new tokens each (--min-new, --max-new), greedy, the same sequence of
requests for every target (seeded). Every level sends the same requests, max(--clients) x --requests-per-client
of them, dealt out to its clients in turn (a fixed workload at each concurrency: the single client sends the
burst's requests one after another), and stops sending after --max-seconds; one untimed request first warms every
target up. (Before 2026-12-06's ninth session each level sent requests of its own, --requests-per-client per
client: the single-client level's one request was no measure of the others.)

The speed of a shared machine drifts (the same burst's encoder pass took 2.1 s and 3.3 s minutes apart), so
targets run in --rounds rounds: each round runs every target once in turn (in reverse order every other round),
every level; a table cell is the median of its rounds' values, and a ratio the median of the ratios of the same
round's two targets, each round's ratio after it (as bench/generate_throughput.py reports).

Reported per target and level: completed requests, requests/s and output tokens/s (over the level's
wall time), p50 / p99 time to first token and latency (p99 of a few requests is close to their
maximum), and the server's peak resident memory (VmHWM of its process, loading included; the largest of the
rounds). Output texts are compared with the transformers loop's for the same requests (in every round). The
last lines give, at the most concurrent level, serve's output tokens/s over the transformers loop's, and serve's
p99 latency over the transformers loop's single-client latency of the same requests (the issue's two goals):
p99 over p99, then, stricter, over the single client's median; for serve-bf16 (against the bfloat16 loop where
it ran, and the float32 one), then serve, then serve-int8.

The model: the packaged Gemma 3 270M adapted (balanced, merged attention), prepared as
bench/generate_throughput.py does, or --model DIR. Needs httpx and the server extra
(`pip install httpx 'encdec[serve]'`).

    python bench/serve_load.py
    python bench/serve_load.py --clients 1,4 --requests-per-client 2 --targets serve,transformers-loop --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    corpus_token_ids,
    cpu_only,
    in_turn,
    peak_rss_gib,
    print_result,
    ratio_line,
    require_distinct,
    run_main,
    run_worker,
)
from generate_throughput import prepare_model

TARGETS = ("serve", "serve-bf16", "serve-batch1", "transformers-loop", "transformers-loop-bf16", "serve-int8")
LOOP_DTYPES = {"transformers-loop": "float32", "transformers-loop-bf16": "bfloat16"}
HEALTH_TIMEOUT_S = 300  # loading the 270M takes under a minute alone; a busy shared machine may take longer
REQUEST_TIMEOUT_S = 600


@dataclass
class Done:
    """One completed request (its index in the request list): seconds to the first token and to the end,
    tokens generated, text."""

    index: int
    ttft: float
    latency: float
    tokens: int
    text: str


Levels = list[tuple[list[Done], float]]  # per level: its completed requests and its wall seconds


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the 270M adapted into --work-dir)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench"), help="where the adapted model is kept")
    p.add_argument("--targets", default=",".join(TARGETS[:4]), help=f"comma list of {', '.join(TARGETS)}")
    p.add_argument("--clients", default="1,4,16", help="comma list of concurrent client counts")
    p.add_argument("--requests-per-client", type=int, default=2,
                   help="requests each client of the largest level sends; every level sends the same "
                   "max(--clients) x N requests, dealt out to its clients (a single client sends them all in turn)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running every target once in turn")
    p.add_argument("--max-seconds", type=float, default=300,
                   help="no new request after this long in a level (each client sends its first anyway)")
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    p.add_argument("--min-prompt", type=int, default=64, help="shortest prompt in tokens")
    p.add_argument("--max-prompt", type=int, default=512, help="longest prompt in tokens")
    p.add_argument("--min-new", type=int, default=32, help="fewest new tokens a request asks for")
    p.add_argument("--max-new", type=int, default=64, help="most new tokens a request asks for")
    p.add_argument("--seed", type=int, default=0, help="seed of the request sequence")
    p.add_argument("--server-options", default="", help="more `encdec serve` options for every server target, "
                   "space-separated (e.g. --server-options=--compile)")
    p.add_argument("--loop-worker", nargs=3, metavar=("MODEL_DIR", "REQUESTS", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.targets = args.targets.split(",")
    require_distinct(p, "--targets", args.targets)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"--targets: unknown {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    try:
        args.clients = [int(n) for n in args.clients.split(",")]
    except ValueError:
        p.error("--clients takes a comma list of integers, e.g. 1,4,16")
    require_distinct(p, "--clients", args.clients)
    if min(args.clients) < 1 or args.requests_per_client < 1 or args.rounds < 1:
        p.error("client counts, --requests-per-client and --rounds must be at least 1")
    if not 1 <= args.min_prompt <= args.max_prompt or not 1 <= args.min_new <= args.max_new:
        p.error("need 1 <= --min-prompt <= --max-prompt and 1 <= --min-new <= --max-new")
    if not args.max_seconds > 0:  # each client's first request goes whatever the time: the others stop after it
        p.error(f"--max-seconds must be above 0, got {args.max_seconds}")
    return args


def make_requests(model_dir: Path, args: argparse.Namespace, count: int) -> list[dict]:
    """`count` requests {prompt, max_tokens}: corpus text of random token lengths, random output lengths."""
    from encdec.sources import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(count)]
    ids = corpus_token_ids(model_dir, sum(lengths))
    requests, start = [], 0
    for length in lengths:
        requests.append({"prompt": tokenizer.decode(ids[start:start + length]),
                         "max_tokens": rng.randint(args.min_new, args.max_new)})
        start += length
    return requests


def levels(args: argparse.Namespace) -> list[list[list[int]]]:
    """Per level, per client, the indices of the requests it sends: every level the same requests (all but the
    warm-up, request 0), dealt out to its clients in turn; every target the same ones."""
    indices = range(1, 1 + max(args.clients) * args.requests_per_client)
    return [[list(indices[c::clients]) for c in range(clients)] for clients in args.clients]


def percentile(values: list[float], q: float) -> float:
    """The median for q = 0.5; otherwise the nearest-rank value (p99 of a few requests is their maximum)."""
    if q == 0.5:
        return statistics.median(values)
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- the HTTP targets ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_completion(client, url: str, body: dict, index: int) -> Done:
    """One streamed request (`body`, the model and request `index` filled in) through `client`, an httpx.AsyncClient."""
    start = time.perf_counter()
    ttft, text, tokens = None, [], 0
    async with client.stream("POST", url, json=body, timeout=REQUEST_TIMEOUT_S) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:  # a failure once streaming began comes as an event of a 200 answer: no completion
                raise RuntimeError(f"request {index} failed after its answer began: {json.dumps(chunk)[:300]}")
            if chunk.get("choices"):
                ttft = ttft if ttft is not None else time.perf_counter() - start
                text.append(chunk["choices"][0].get("text", ""))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Done(index, ttft if ttft is not None else time.perf_counter() - start, time.perf_counter() - start, tokens,
                "".join(text))


async def drive_http(url: str, model: str, requests: list[dict], per_client: list[list[int]],
                     max_seconds: float) -> tuple[list[Done], float]:
    """Closed-loop clients against `url`; the completed requests and the level's wall seconds."""
    import httpx

    start = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(per_client) + 1)) as client:
        async def one_client(indices: list[int]) -> list[Done]:
            done = []
            for index in indices:
                if done and time.perf_counter() - start > max_seconds:  # a client's first request always goes:
                    break  # a level of none has no latencies (a short --max-seconds ran out while the client opened)
                body = {"model": model, "temperature": 0, "stream": True, **requests[index]}
                done.append(await stream_completion(client, url, body, index))
            return done

        results = await asyncio.gather(*(one_client(r) for r in per_client))
    return [d for r in results for d in r], time.perf_counter() - start


def server_options(target: str, args: argparse.Namespace) -> list[str]:
    """The `encdec serve` options of a server target."""
    options = {"serve": ["--max-batch", str(args.max_batch)],
               "serve-bf16": ["--max-batch", str(args.max_batch), "--dtype", "bfloat16"],
               "serve-batch1": ["--max-batch", "1"],
               "serve-int8": ["--max-batch", str(args.max_batch), "--quantize", "int8"]}[target]
    return options + args.server_options.split()


def run_server(model_dir: Path, options: list[str], requests: list[dict], plan: list[list[list[int]]],
               args: argparse.Namespace) -> tuple[Levels, float]:
    """Start `encdec serve` with `options`, wait for /health, run every level; returns them and the server's peak RSS."""
    import httpx

    port = free_port()
    said = tempfile.TemporaryFile()  # noqa: SIM115 - what the server says (closed below), for why it did not start
    server = subprocess.Popen([sys.executable, "-m", "encdec.cli", "serve", str(model_dir), "--port", str(port),
                               "--host", "127.0.0.1", *options],
                              stdout=subprocess.DEVNULL, stderr=said)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if server.poll() is not None:
                said.seek(0)
                last = [line for line in said.read().decode(errors="replace").splitlines() if line.strip()][-1:]
                raise SystemExit(f"encdec serve {' '.join(options)} exited with status {server.returncode} before "
                                 f"answering /health: {last[0] if last else '(it said nothing)'}")
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"encdec serve did not answer /health within {HEALTH_TIMEOUT_S} s")
            time.sleep(1)
        url, model = f"{base}/v1/completions", httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        asyncio.run(drive_http(url, model, requests, [[0]], args.max_seconds))
        results = []
        for per_client in plan:
            print(f"  {len(per_client)} client(s) ...", file=sys.stderr, flush=True)
            results.append(asyncio.run(drive_http(url, model, requests, per_client, args.max_seconds)))
        return results, peak_rss_gib(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        said.close()


# ---- the transformers loop (in a process of its own) ----

class FirstToken:
    """A generate streamer that notes when the first new token comes (the first `put` is the start token)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, value: object) -> None:  # a tensor of token ids
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def loop_worker(model_dir: Path, plan_file: Path, dtype: str) -> None:
    """Closed-loop client threads queueing for one thread that runs transformers' generate in `dtype`."""
    import torch
    import transformers

    from encdec.allocator import keep_freed_memory

    keep_freed_memory()  # freed memory kept, as `encdec serve` keeps it (encdec.inference.loading): no handicap
    spec = json.loads(plan_file.read_text())
    # loaded with one intra-op thread, generating with all of them in the generating thread: one OpenMP team,
    # as `encdec serve` arranges it (two teams on as many cores throttle each other: docs/benchmarks.md)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype),
                                                               trust_remote_code=False).eval()
    # the server's stop tokens: the model's EOS ids and the end-of-turn marker (encdec.serve.app.Service)
    from encdec.data.chat import ChatFormat
    from encdec.data.tokens import leading_bos
    from encdec.files import read_json
    from encdec.formats.t5gemma import config_from_hf
    from encdec.inference.loading import model_framing

    # a UL2-pretrained model's prompts framed as the server frames them (its sentinels), so both do the same work
    framing, bos = model_framing(model_dir, tokenizer), leading_bos(tokenizer)
    end_of_turn = tokenizer.get_vocab().get(ChatFormat.of(tokenizer).end)
    model_eos = config_from_hf(read_json(Path(model_dir) / "config.json")).eos_token_ids
    eos = sorted(set(model_eos) | ({end_of_turn} - {None}))
    work: queue.Queue = queue.Queue()

    def generate(index: int, submitted: float) -> dict:
        request = spec["requests"][index]
        ids = torch.tensor([framing.prompt(tokenizer(request["prompt"])["input_ids"], bos)])
        start = torch.tensor([[model.generation_config.decoder_start_token_id, *framing.decoder]])
        first = FirstToken()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), decoder_input_ids=start, do_sample=False,
                                 max_new_tokens=request["max_tokens"], streamer=first, eos_token_id=eos)
        ids = out[0, start.shape[1]:].tolist()  # after the decoder's start (and framing): a final EOS counts, as in
        # the server's usage
        end = time.perf_counter()
        return {"index": index, "ttft": (first.at or end) - submitted, "latency": end - submitted, "tokens": len(ids),
                "text": tokenizer.decode(ids, skip_special_tokens=True)}

    def server() -> None:
        torch.set_num_threads(threads)
        while (item := work.get()) is not None:
            index, submitted, reply = item
            try:
                reply.put(generate(index, submitted))
            except Exception as e:  # noqa: BLE001 - told to its client: a dead thread left every client waiting
                reply.put(e)

    thread = threading.Thread(target=server, daemon=True)
    thread.start()

    def drive(per_client: list[list[int]]) -> dict:
        start = time.perf_counter()
        done: list[dict] = []
        failed: list[str] = []

        def client(indices: list[int]) -> None:
            for n, index in enumerate(indices):
                if n and time.perf_counter() - start > spec["max_seconds"]:  # each client's first always goes
                    break
                reply: queue.Queue = queue.Queue()
                work.put((index, time.perf_counter(), reply))
                answer = reply.get()
                if isinstance(answer, Exception):
                    failed.append(f"request {index}: {type(answer).__name__}: {answer}")
                    return
                done.append(answer)

        threads = [threading.Thread(target=client, args=(r,)) for r in per_client]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failed:  # the worker ends with the error, not with numbers that leave the request out
            work.put(None)
            raise SystemExit(f"the transformers loop failed: {failed[0]}")
        return {"done": done, "wall": time.perf_counter() - start}

    drive([[0]])
    levels_out = [drive(per_client) for per_client in spec["plan"]]
    work.put(None)
    thread.join()  # a generating thread still alive at exit aborts the process (seen on an Intel host)
    print_result({"levels": levels_out, "peak_gib": peak_rss_gib(os.getpid())})


def run_loop(model_dir: Path, dtype: str, requests: list[dict], plan: list[list[list[int]]],
             args: argparse.Namespace) -> tuple[Levels, float]:
    plan_file = args.work_dir / "serve_load_plan.json"
    plan_file.write_text(json.dumps({"requests": requests, "plan": plan, "max_seconds": args.max_seconds}))
    result = run_worker(__file__, ["--loop-worker", str(model_dir), str(plan_file), dtype])
    return [([Done(**d) for d in level["done"]], level["wall"]) for level in result["levels"]], result["peak_gib"]


def check_loop_targets(model_dir: Path, targets: list[str]) -> None:
    """Before any target runs: transformers' loop reads T5Gemma and T5Gemma 2 checkpoints, not this project's own
    format (whose config.json's auto_map asked, mid-run, to run the checkpoint's code; refused, after the server
    targets had run, the run ended in a traceback with nothing printed)."""
    from encdec.checkpoint import NATIVE, checkpoint_format

    loops = [target for target in targets if target in LOOP_DTYPES]
    if loops and checkpoint_format(model_dir) == NATIVE:
        raise SystemExit(f"{model_dir} is in this project's own format, which transformers' loop ({', '.join(loops)}) "
                         "does not read: give a Gemma model in the T5Gemma or T5Gemma 2 layout, or leave the loop "
                         "out of --targets")


def main() -> None:
    cpu_only()
    args = parse_args()
    if args.loop_worker:
        loop_worker(Path(args.loop_worker[0]), Path(args.loop_worker[1]), args.loop_worker[2])
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or prepare_model("merged", args.work_dir)
    check_loop_targets(model_dir, args.targets)
    requests = make_requests(model_dir, args, 1 + max(args.clients) * args.requests_per_client)
    plan = levels(args)
    measured: dict[str, list[tuple[Levels, float]]] = {target: [] for target in args.targets}  # per round
    for round_ in range(args.rounds):
        for target in in_turn(args.targets, round_):
            print(f"round {round_ + 1}/{args.rounds}: {target} ...", file=sys.stderr, flush=True)
            if target in LOOP_DTYPES:
                measured[target].append(run_loop(model_dir, LOOP_DTYPES[target], requests, plan, args))
            else:
                measured[target].append(run_server(model_dir, server_options(target, args), requests, plan, args))
    print(f"model {model_dir}, {os.cpu_count()} CPUs, float32 unless named, greedy; prompts {args.min_prompt}-"
          f"{args.max_prompt} tokens, {args.min_new}-{args.max_new} new tokens, every level the same "
          f"{max(args.clients) * args.requests_per_client} request(s), median of {args.rounds} round(s)")
    print_table(measured, args)
    print_ratios(measured, args)


def level_row(done: list[Done], wall: float) -> list[float]:
    """A level's numbers: completed requests, requests/s, output tokens/s, TTFT p50 and p99, latency p50 and p99."""
    ttft, latency = [d.ttft for d in done], [d.latency for d in done]
    return [len(done), len(done) / wall, sum(d.tokens for d in done) / wall, percentile(ttft, .5),
            percentile(ttft, .99), percentile(latency, .5), percentile(latency, .99)]


def print_table(measured: dict[str, list[tuple[Levels, float]]], args: argparse.Namespace) -> None:
    """One line per target and level, each number the median of its rounds'; texts compared in every round with the
    float32 loop's first round."""
    loop = measured.get("transformers-loop")
    reference = {d.index: d.text for done, _ in loop[0][0] for d in done} if loop else {}
    print(f"{'target':<22}  {'clients':>7}  {'done':>4}  {'req/s':>6}  {'out tok/s':>9}  {'TTFT p50':>8}"
          f"  {'TTFT p99':>8}  {'lat p50':>7}  {'lat p99':>7}  {'peak GiB':>8}  same text as loop")
    for target, rounds in measured.items():
        peak = max(p for _, p in rounds)
        for level, clients in enumerate(args.clients):
            cells = [statistics.median(column) for column in zip(*(level_row(*r[0][level]) for r in rounds))]
            done = [d for r in rounds for d in r[0][level][0]]
            same = f"{sum(reference.get(d.index) == d.text for d in done)}/{len(done)}" \
                if reference and target != "transformers-loop" else "-"
            print(f"{target:<22}  {clients:>7}  {cells[0]:>4g}  {cells[1]:>6.2f}  {cells[2]:>9.1f}  {cells[3]:>8.2f}"
                  f"  {cells[4]:>8.2f}  {cells[5]:>7.2f}  {cells[6]:>7.2f}  {peak:>8.2f}  {same}")


def same_requests(a: tuple[list[Done], float], b: tuple[list[Done], float]) -> tuple[tuple, tuple]:
    """Two levels' results over the requests both completed: --max-seconds may cut a level short, and a p99 of its
    first requests alone set against one of all of them compared other requests."""
    common = {d.index for d in a[0]} & {d.index for d in b[0]}
    return ([d for d in a[0] if d.index in common], a[1]), ([d for d in b[0] if d.index in common], b[1])


def print_ratios(measured: dict[str, list[tuple[Levels, float]]], args: argparse.Namespace) -> None:
    """The issue's two goals at the most concurrent level, each the median of the rounds' ratios: serve-bf16's
    (against the bfloat16 loop as well where it ran), then serve's, then serve-int8's. The single-client level sent
    the same requests (`levels`): its p99 and median are the loop's single-client latency of this workload, taken
    over the requests both levels completed."""
    top, single = args.clients.index(max(args.clients)), args.clients.index(min(args.clients))
    pairs = [("serve-bf16", "transformers-loop-bf16"), ("serve-bf16", "transformers-loop"),
             ("serve", "transformers-loop"), ("serve-int8", "transformers-loop")]
    for target, baseline in pairs:
        if target not in measured or baseline not in measured:
            continue
        base, served = [r[0] for r in measured[baseline]], [r[0] for r in measured[target]]
        rate = [[level_row(*r[top])[2]] for r in served]
        base_rate = [[level_row(*r[top])[2]] for r in base]
        paired = [same_requests(b[single], s[top]) for b, s in zip(base, served)]  # round by round
        p99 = [[level_row(*s)[6]] for _, s in paired]
        single_p99 = [[level_row(*b)[6]] for b, _ in paired]
        single_median = [[level_row(*b)[5]] for b, _ in paired]
        clients, one = args.clients[top], args.clients[single]
        print(ratio_line(f"{target} / {baseline} output tokens/s, {clients} clients", base_rate, rate))
        print(ratio_line(f"{target} p99 latency at {clients} clients / {baseline} p99 latency at {one} client(s), the "
                         "same requests", single_p99, p99))
        print(ratio_line(f"{target} p99 latency at {clients} clients / {baseline} median latency at {one} client(s), "
                         "the same requests", single_median, p99))


if __name__ == "__main__":
    run_main(main)
