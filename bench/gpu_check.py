"""Everything GPU-specific in one call, for a session that is lent a GPU (issue 11's GPU items).

The device machine cannot receive the packaged 270M's weights (they are larger than what travels), so the
model is the 270M's shape, adapted balanced with merged attention (the configuration is written below),
randomly initialised with a fixed seed: speeds and memory are real, texts are not. For each dtype
(float32, bfloat16) it reports, on prompts of --prompt-lengths tokens -> --new-tokens greedy tokens at
batch 1 and 8:

- encdec's generation (`model.generate`, the engine): seconds, and whether its tokens equal the uncached
  path's (`use_cache=False`) in float32, and how many equal float32's in bfloat16;
- transformers' `T5Gemma2ForConditionalGeneration.generate` on the same weights (saved in the T5Gemma 2
  layout), and the ratio;
- the engine's decoder step compiled (`torch.compile(Engine.hidden)`, default mode and "reduce-overhead",
  which captures CUDA graphs): median step time against eager, tokens compared, compilation seconds;
- SDPA's kernels for the model's attention, and classification steps and encoder passes over new lengths with
  cuDNN's attention left out (encdec's choice) and allowed (`--only attention`);
- `model.generate(..., compile_step=True)` (`--compile`) against the eager engine (`--only compiled-generate`);
- classification fine-tuning's steady examples/s per batch size, with and without the embedding frozen
  (`--only fine-tuning`), which sets `bench/encoder_claim_gpu.sh`'s batch;
- peak GPU memory of each call (both models' weights are resident throughout, so each peak includes them);
- that the server's embeddings come back to the CPU (`Engine.embed`), as `/v1/embeddings` writes them out;
- `encdec classify`'s fine-tuning and predictions on the GPU (float32 weights, autocast as "auto" picks it):
  examples/s, on a copy of the model's encoder; and `encdec evaluate`'s scoring and held-out NLL there.

Each timing is the median of --repeats calls after one untimed call. The last lines are the ratios
(encdec's speed over transformers' per setting, then compiled / eager). On a CPU (no GPU here) `--tiny` runs a
2-layer model of the same kinds, in float32 and bfloat16, as a rehearsal of the script.

    PYTHONPATH=src PYTHONUNBUFFERED=1 python3 bench/gpu_check.py        # on the device machine, ~5 min
    ... python3 bench/gpu_check.py --compile-dtypes bfloat16          # the CUDA dtype's compiles only
    python bench/gpu_check.py --tiny                                  # here
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import engine_steps, int_list, require_distinct, require_positive, run_main

SKIPPABLE = ("attention", "transformers", "compile", "classify")  # --skip's parts
LAYER_TYPES = ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(18)]
STACK_270M = {  # Gemma 3 270M's text stack, as `encdec adapt` reads it
    "num_layers": 18, "hidden_size": 640, "intermediate_size": 2048, "num_heads": 4, "num_kv_heads": 1,
    "head_dim": 256, "layer_types": LAYER_TYPES, "sliding_window": 512, "query_pre_attn_scalar": 256,
    "rope_theta_local": 10_000.0, "rope_theta_global": 1_000_000.0, "qk_norm": True, "rms_norm_eps": 1e-6,
    "max_positions": 32768,
}
STACK_TINY = dict(STACK_270M, num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=1,
                  head_dim=16, layer_types=["sliding", "full"], sliding_window=16, query_pre_attn_scalar=16)


def build(tiny: bool, device: torch.device):
    from encdec.config import EncDecConfig, StackConfig
    from encdec.model import EncoderDecoder

    stack = STACK_TINY if tiny else STACK_270M
    config = EncDecConfig(encoder=StackConfig(**stack), decoder=StackConfig(**stack), vocab_size=512 if tiny else 262144,
                          family="gemma3", attention="merged", shared_embeddings=True)
    torch.manual_seed(0)
    model = EncoderDecoder(config)
    with torch.no_grad():
        for p in model.parameters():  # small random weights: finite logits through 18 layers
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
    return model.to(device).eval()


def timed(call, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one untimed call, and the last call's result."""
    call()
    seconds: list[float] = []
    result_box: list[object] = []
    for _ in range(repeats):
        seconds.append(once(lambda: result_box.append(call()), device))
    return statistics.median(seconds), result_box[-1]


def once(call, device: torch.device) -> float:
    """Seconds of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def peak_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def classify_check(model, repeats: int) -> None:
    """`encdec classify` on the GPU: a few fine-tuning steps of a classifier on the model's encoder (a copy), with
    bfloat16 autocast where the GPU has it, then predictions; examples/s of each, and that they ran on the model's
    device."""
    import copy

    from encdec.classification.backbone import from_encoder_decoder
    from encdec.classification.classifier import Classifier
    from encdec.classification.train import Hyper, fine_tune, predict

    g = torch.Generator().manual_seed(3)
    rows = [[2, *torch.randint(3, model.config.vocab_size, (int(n),), generator=g).tolist()]
            for n in torch.randint(32, 256, (64,), generator=g)]
    labels = [i % 2 for i in range(len(rows))]
    classifier = Classifier(from_encoder_decoder(copy.deepcopy(model)), 2, "mean")
    device = next(classifier.parameters()).device
    hp = Hyper(steps=4 * repeats, batch_size=8, precision="auto")
    start = time.perf_counter()
    losses = fine_tune(classifier, rows, labels, hp, pad_id=0, desc="gpu check", seed=0)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    probs = predict(classifier, rows, pad_id=0, batch_size=16)
    predict_s = time.perf_counter() - start
    print(f"classify on {device}: fine-tuning {hp.steps * hp.batch_size / train_s:.1f} examples/s (losses "
          f"{[round(x, 3) for x in losses]}), predicting {len(rows) / predict_s:.1f} examples/s, "
          f"{len(probs)} x {len(probs[0])} probabilities", flush=True)


def attention_check(model, repeats: int) -> None:
    """SDPA on this GPU for the model's attention (grouped heads, a float mask): which kernels run it and how fast;
    then classification steps over batches of new lengths and encoder passes over prompts of new lengths, with
    cuDNN's attention left out (`encdec.model.GPU_ATTENTION`) and with PyTorch's own choice among all kernels."""
    import copy

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import encdec.model
    from encdec.classification.backbone import from_encoder_decoder
    from encdec.classification.classifier import Classifier
    from encdec.classification.train import Hyper, fine_tune

    device, g = model.device, torch.Generator().manual_seed(5)
    q = torch.randn(8, 4, 256, 256, generator=g).to(device, torch.bfloat16).requires_grad_()
    k, v = (torch.randn(8, 1, 256, 256, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
    bias = torch.zeros(8, 1, 256, 256, device=device, dtype=torch.bfloat16)
    bias[:, :, :, 200:] = float("-inf")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        def step(backend=backend):
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True).sum().backward()
        try:
            seconds, _ = timed(step, 5, device)
            print(f"attention kernel {backend.name}: forward + backward {seconds * 1e3:.2f} ms (8 x 4 heads x 256)")
        except RuntimeError as e:
            print(f"attention kernel {backend.name}: does not run it ({str(e).splitlines()[0][:100]})")
    chosen = encdec.model.GPU_ATTENTION
    everything = [SDPBackend.CUDNN_ATTENTION, *chosen]
    for label, backends, seed in (("cuDNN left out", chosen, 6), ("PyTorch's choice", everything, 7)):
        encdec.model.GPU_ATTENTION = backends
        g = torch.Generator().manual_seed(seed)
        rows = [[2, *torch.randint(3, model.config.vocab_size, (int(n),), generator=g).tolist()]
                for n in torch.randint(32, 256, (16 * repeats,), generator=g)]
        classifier = Classifier(from_encoder_decoder(copy.deepcopy(model)), 2, "mean")
        hp = Hyper(steps=2 * repeats, batch_size=8, precision="auto")
        speeds = []
        for _ in range(2):  # new lengths, then the same ones again
            start = time.perf_counter()
            fine_tune(classifier, rows, [i % 2 for i in range(len(rows))], hp, pad_id=0, desc="attention", seed=0)
            speeds.append(hp.steps * hp.batch_size / (time.perf_counter() - start))
        del classifier
        lengths = torch.randint(64, 1024, (4 * repeats,), generator=g).tolist()
        passes = []
        for _ in range(2):  # new lengths, then the same ones again
            for n in lengths:
                ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g).to(device)
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
                    passes.append(once(functools.partial(model.encode, ids), device))
        half = len(lengths)
        print(f"attention, {label}: classification fine-tuning {speeds[0]:.1f} examples/s over new lengths, "
              f"{speeds[1]:.1f} over the same again; encoder pass (bf16, batch 1) median "
              f"{statistics.median(passes[:half]) * 1e3:.1f} ms at a new length, "
              f"{statistics.median(passes[half:]) * 1e3:.1f} ms at one seen", flush=True)
    encdec.model.GPU_ATTENTION = chosen


def fine_tuning_check(model, repeats: int, batches: list[int]) -> None:
    """Classification fine-tuning's steady speed per batch size, every parameter trained and with the embedding
    frozen (`--freeze-embeddings`): what `bench/encoder_claim_gpu.sh`'s settings should be. Each setting warms up
    for 2 steps (kernels, allocations), then times 4 x --repeats steps over rows of new lengths (32-256 tokens,
    BoolQ's range at --max-len 256)."""
    import copy

    from encdec.classification.backbone import from_encoder_decoder
    from encdec.classification.classifier import Classifier
    from encdec.classification.train import Hyper, fine_tune

    device = model.device
    for batch in batches:
        for frozen in (False, True):
            g = torch.Generator().manual_seed(batch)
            rows = [[2, *torch.randint(3, model.config.vocab_size, (int(n),), generator=g).tolist()]
                    for n in torch.randint(32, 256, (batch * (2 + 4 * repeats),), generator=g)]
            labels = [i % 2 for i in range(len(rows))]
            classifier = Classifier(from_encoder_decoder(copy.deepcopy(model)), 2, "last")
            hp = Hyper(steps=2, batch_size=batch, precision="auto", freeze_embeddings=frozen)
            fine_tune(classifier, rows[:2 * batch], labels[:2 * batch], hp, pad_id=0, desc="warm-up", seed=0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            hp.steps = 4 * repeats
            seconds = once(functools.partial(fine_tune, classifier, rows[2 * batch:], labels[2 * batch:], hp,
                                             pad_id=0, desc="fine-tuning", seed=0), device)
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "-"
            print(f"fine-tuning, batch {batch}, {'embedding frozen' if frozen else 'every parameter'}: "
                  f"{hp.steps * batch / seconds:.1f} examples/s ({seconds / hp.steps * 1e3:.0f} ms a step), "
                  f"peak {peak}", flush=True)
            del classifier


def compiled_generate_check(model, args: argparse.Namespace) -> None:
    """`model.generate(..., compile_step=True)` (`encdec generate --compile`, `encdec serve --compile`) against the
    eager engine: the first call's seconds (it compiles), then the median of --repeats calls, tokens compared."""
    length, device = args.prompt_lengths[0], model.device
    for batch in (1, 8):
        g = torch.Generator().manual_seed(length + batch)
        ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g).to(device)
        ids[:, 0] = model.config.bos_token_id
        run = functools.partial(model.generate, ids, max_new_tokens=args.new_tokens, eos_token_ids=[-1])
        eager_s, eager = timed(run, args.repeats, device)
        first_s = once(functools.partial(run, compile_step=True), device)
        compiled_s, compiled = timed(functools.partial(run, compile_step=True), args.repeats, device)
        name = str(model.embed.weight.dtype).removeprefix("torch.")
        print(f"{name} generate, prompt {length} batch {batch}: eager {eager_s:.3f} s, compiled step "
              f"{compiled_s:.3f} s (first call {first_s:.0f} s), tokens equal {(eager == compiled).float().mean():.0%}; "
              f"ratio {eager_s / compiled_s:.2f}x", flush=True)


def evaluate_check(model) -> None:
    """`encdec evaluate`'s scoring and held-out NLL on the model's device (random tokens: the numbers are not
    meaningful, the device handling is what runs)."""
    from encdec.evaluation.nll import PrefixSuffix, encdec_position_nll
    from encdec.evaluation.scoring import _encdec_states

    g = torch.Generator().manual_seed(4)
    requests = [([2, *torch.randint(3, 500, (n,), generator=g).tolist()], torch.randint(3, 500, (3,), generator=g).tolist())
                for n in (40, 70)]
    with torch.no_grad():
        hidden, targets = _encdec_states(model, requests)
        logp = torch.log_softmax(model.logits(hidden).float(), -1).gather(-1, targets[:, None])
    ids = torch.randint(3, 500, (4, 96), generator=g)
    nll = encdec_position_nll(model, PrefixSuffix(ids[:, :64], ids[:, 64:]), batch_size=2)
    print(f"evaluate on {model.device}: scored {len(targets)} continuation tokens (mean log-probability "
          f"{logp.mean().item():.2f}), held-out NLL over {nll.shape[0]} positions {nll.mean().item():.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (a rehearsal, on CPU too)")
    parser.add_argument("--prompt-lengths", type=int_list, default="256,1024")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help=f"comma list of parts to skip: {', '.join(SKIPPABLE)}")
    parser.add_argument("--only", choices=["attention", "compiled-generate", "fine-tuning"], default=None,
                        help="one part alone: the attention kernels' check, generation with the step compiled, or "
                        "classification fine-tuning's speed per batch size (--classify-batches)")
    parser.add_argument("--classify-batches", type=int_list, default="8,16,32",
                        help="with --only fine-tuning: the batch sizes")
    parser.add_argument("--compile-dtypes", default="float32,bfloat16",
                        help="the dtypes whose decoder step is compiled (each mode compiles for a minute or more)")
    args = parser.parse_args()
    require_positive(parser, args, ("new_tokens", "repeats"))
    if min(args.prompt_lengths) < 2 or min(args.classify_batches) < 1:
        parser.error("prompt lengths must be at least 2 (BOS and one token), batch sizes at least 1")
    require_distinct(parser, "--prompt-lengths", args.prompt_lengths)
    require_distinct(parser, "--classify-batches", args.classify_batches)
    skip = set(filter(None, args.skip.split(",")))
    for option, given, known in (("--skip", skip, SKIPPABLE), ("--compile-dtypes", args.compile_dtypes.split(","),
                                                                ("float32", "bfloat16"))):
        if set(given) - set(known):  # a misspelt part ran anyway, on metered GPU time
            parser.error(f"{option}: unknown {sorted(set(given) - set(known))}; choose from {', '.join(known)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, {'tiny' if args.tiny else '270M-shaped'} random model, greedy, "
          f"{args.new_tokens} new tokens, median of {args.repeats}", flush=True)
    base = build(args.tiny, device)
    if args.only in (None, "attention") and "attention" not in skip:
        attention_check(base, args.repeats)
    if args.only in (None, "compiled-generate") and "compile" not in skip:
        compiled_generate_check(copy.deepcopy(base).to(torch.bfloat16), args)  # `.to` converts in place: a copy
        # keeps the float32 weights unrounded for the float32 rows below
    if args.only == "fine-tuning":
        fine_tuning_check(base, args.repeats, args.classify_batches)
    if args.only is not None:
        return
    ratios: list[str] = []
    reference: dict[tuple[int, int], torch.Tensor] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = base.to(dtype)
        name = str(dtype).removeprefix("torch.")
        hf = None
        if "transformers" not in skip:
            import transformers

            from encdec.checkpoint import save

            with tempfile.TemporaryDirectory() as tmp:
                save(model.float(), Path(tmp) / "m")
                model = base.to(dtype)
                hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(Path(tmp) / "m"), dtype=dtype).to(device).eval()
                hf.generation_config.eos_token_id = None  # no stopping, as encdec's eos_token_ids=[-1]
        for length in args.prompt_lengths:
            for batch in (1, 8):
                g = torch.Generator().manual_seed(length + batch)
                ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g).to(device)
                ids[:, 0] = model.config.bos_token_id
                cell = f"{name} prompt {length} batch {batch}"
                generate = functools.partial(model.generate, ids, max_new_tokens=args.new_tokens, eos_token_ids=[-1])
                peak_gib(device)  # from here: this call's peak (both models' weights resident)
                ours_s, ours = timed(generate, args.repeats, device)
                # a random model's greedy rows repeat a token or a few, which every greedy comparison then passes
                # at once: said, and the cache checked on sampled rows too (seeded: each row's tokens all differ)
                distinct = [len(set(row)) for row in ours.tolist()]
                line = (f"{cell:<30} encdec {ours_s:7.3f} s  peak {peak_gib(device):6.2f} GiB  distinct tokens a row "
                        f"{min(distinct)}-{max(distinct)}")
                if dtype == torch.float32:
                    short = functools.partial(model.generate, ids, max_new_tokens=min(args.new_tokens, 8),
                                              eos_token_ids=[-1])
                    uncached = short(use_cache=False)
                    line += f"  cached == uncached (8 tokens): {torch.equal(ours[:, : uncached.shape[1]], uncached)}"
                    sampled = short(do_sample=True, seed=5)
                    line += f", sampled: {torch.equal(sampled, short(do_sample=True, seed=5, use_cache=False))}"
                    reference[(length, batch)] = ours
                else:
                    same = (ours == reference[(length, batch)]).float().mean().item()
                    line += f"  tokens equal to float32's: {same:.0%}"
                if hf is not None:
                    generate = functools.partial(hf.generate, ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                 max_new_tokens=args.new_tokens)
                    peak_gib(device)
                    with torch.no_grad():
                        theirs_s, theirs = timed(generate, args.repeats, device)
                    same = (theirs[:, -ours.shape[1]:] == ours).float().mean().item()
                    line += f"  transformers {theirs_s:7.3f} s  peak {peak_gib(device):6.2f} GiB (tokens equal {same:.0%})"
                    ratios.append(f"ratio ({cell}: speed of encdec over transformers, their s / ours): "
                                  f"{theirs_s / ours_s:.2f}x")
                print(line, flush=True)
        hf = None  # its memory back before the compiled steps
        from encdec.inference.engine import Engine, compiled_step

        vectors = Engine(model, 2).embed([[2, 5, 7], [2, 9]], "mean")
        print(f"{name} embeddings: on {vectors.device}, written out as /v1/embeddings does: {vectors.numpy().shape}",
              flush=True)
        if "classify" not in skip and dtype == torch.float32:
            classify_check(model, args.repeats)
            evaluate_check(model)
        if "compile" not in skip and name in args.compile_dtypes.split(","):
            length = args.prompt_lengths[0]
            ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
            ids = ids.to(device)
            eager_tokens, _ = engine_steps(model, ids, args.new_tokens)
            eager = [s for _ in range(args.repeats) for s in engine_steps(model, ids, args.new_tokens)[1]]
            torch._logging.set_logs(perf_hints=True)  # says "skipping cudagraphs due to ..." if CUDA graphs are not used
            for mode in ("default", "reduce-overhead"):
                compiled = compiled_step(Engine.hidden, mode=mode)
                start = time.perf_counter()
                try:
                    tokens, _ = engine_steps(model, ids, args.new_tokens, compiled)
                except Exception as e:  # noqa: BLE001 - a mode that fails is a result to report
                    print(f"{name} compile {mode}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    continue
                compile_s = time.perf_counter() - start
                steps = [s for _ in range(args.repeats) for s in engine_steps(model, ids, args.new_tokens, compiled)[1]]
                e_ms, c_ms = statistics.median(eager) * 1e3, statistics.median(steps) * 1e3
                print(f"{name} batch-1 step, compile {mode}: eager {e_ms:.2f} ms, compiled {c_ms:.2f} ms, first "
                      f"compiled generation {compile_s:.0f} s, same tokens: {tokens == eager_tokens}", flush=True)
                ratios.append(f"ratio ({name}, compile {mode}: eager / compiled step): {e_ms / c_ms:.2f}x")
                torch._dynamo.reset()
    for line in ratios:
        print(line)


if __name__ == "__main__":
    run_main(main)
