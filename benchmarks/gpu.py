"""GPU benchmark: verification kernels and the cost of decoding passes, in one run that fits a
10-minute device window. Writes benchmarks/gpu.md (and prints it).

1. Verification at vocab 151936, k = 4 and 8, batch 1, 8, 64, 256, float32 and bfloat16: ours
   (Triton kernels, one launch), ours (plain torch rules), `specsample.verify` end to end,
   transformers' `_speculative_sampling` (one sequence per call: batch 1 only) and FlashInfer's
   chain kernel where importable; plus the tree rule (tree (4, 2, 1)). Every time is a median of
   CUDA-event timings. The kernels' tokens are compared with the torch rules' on the same
   uniforms at every size.
2. Decoding passes of random-weight models with the shapes of the default pair (Qwen2.5-Coder
   0.5B and 1.5B, built in-process from a Qwen2Config: no downloads) and of a 7B target: the eager
   pass cost for 1..16 new tokens on a 512-token context, the draft step (one token, sampled), and
   the same with a static KV cache and one CUDA graph per tokens-per-pass bucket.
3. The speedup those costs predict with the acceptance rates the real pair reached on CPU
   (benchmarks/decode_speed.json), against the goals of the "Fast on GPUs" issue.

Every section catches its own failure and writes the error into the report, so one broken part
does not cost the run.

Run on a CUDA machine (about 6-9 minutes on an H200):
    PYTHONPATH=src python3 benchmarks/gpu.py
Smoke run on CPU (tiny sizes, Triton's interpreter, no CUDA; what the test suite runs):
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/gpu.py --smoke --out /tmp/gpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "gpu.md"
ACCEPTANCE_SOURCE = HERE / "decode_speed.json"

# Shapes of the models (Qwen2.5-Coder 0.5B and 1.5B: the default pair; Qwen2.5 7B).
SHAPES = {
    "0.5B (draft)": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5B (target)": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7B (target)": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=500,
    tie_word_embeddings=True,
)
PATHS = ("eager", "graph", "static")  # how a decoding pass runs (see decoding_section)
VENDOR_BANDWIDTH = 4.8e12  # H200 HBM3e, bytes/s (datasheet); the run measures its own too


@dataclasses.dataclass(frozen=True)
class Settings:
    vocab: int = 151936
    batches: tuple[int, ...] = (1, 8, 64, 256)
    ks: tuple[int, ...] = (4, 8)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    tree: tuple[int, ...] = (4, 2, 1)
    tree_batches: tuple[int, ...] = (1, 64)
    reps: int = 25
    warmup: int = 3
    shapes: tuple[str, ...] = tuple(SHAPES)
    context: int = 512
    pass_tokens: tuple[int, ...] = tuple(range(1, 17))
    model_reps: int = 7
    budget_s: float = 540.0  # later sections are skipped past this (the window is 600 s)


SMOKE = Settings(
    vocab=300,
    batches=(1, 2),
    ks=(2,),
    dtypes=("float32",),
    tree=(2, 1),
    tree_batches=(2,),
    reps=1,
    warmup=0,
    shapes=("tiny",),
    context=8,
    pass_tokens=(1, 2),
    model_reps=1,
)

# Goals of the issue (seconds or ratios).
GOAL_VERIFY_BATCH256_S = 0.66e-3
GOAL_VERIFY_BATCH1_S = 30e-6
GOAL_PASS_OVER_FLOOR = 3.0
GOAL_8_TOKENS_OVER_1 = 1.3
GOAL_SPEEDUP = 2.0


# ----------------------------------------------------------------------------------- timing


class Clock:
    """Times zero-argument calls on one device: CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device, torch):
        self.device = device
        self.torch = torch
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def per_call(self, fn: Callable[[], object], reps: int, warmup: int) -> float:
        """Median seconds of one call, synchronised before and after each (host launch costs
        included: the latency a caller sees)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                start = self.torch.cuda.Event(enable_timing=True)
                end = self.torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def back_to_back(self, fn: Callable[[], object], reps: int) -> float:
        """Seconds per call over `reps` calls queued without a sync: the device time where the
        host keeps ahead, else the host's launch rate."""
        self.sync()
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t0) / reps
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ---------------------------------------------------------------------------------- report


class Report:
    """Markdown sections, written to disk after each one so an interrupted run keeps them."""

    def __init__(self, path: Path, started: float, budget_s: float):
        self.path = path
        self.started = started
        self.budget_s = budget_s
        self.parts: list[str] = []
        self.goals: dict[str, tuple[str, str, str]] = {}

    def add(self, text: str) -> None:
        self.parts.append(text.rstrip() + "\n")
        self.write()

    def table(self, header: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n"

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s

    def section(self, title: str, body: Callable[[], str]) -> None:
        """Runs one section; its failure (or the time budget) is written instead of its table."""
        if self.over_budget():
            self.add(
                f"## {title}\n\nSkipped: the run's time budget ({self.budget_s:.0f} s) is spent."
            )
            return
        t0 = time.perf_counter()
        try:
            text = body()
        except Exception:  # a broken section must not cost the others
            text = "FAILED:\n\n```\n" + traceback.format_exc()[-3000:] + "```"
        took = time.perf_counter() - t0
        self.add(f"## {title}\n\n{text.rstrip()}\n\n(section took {took:.0f} s)")

    def write(self) -> None:
        goals = ""
        if self.goals:
            rows = [[name, *values] for name, values in self.goals.items()]
            goals = "## Goals\n\n" + self.table(["goal", "target", "measured", "met"], rows)
        self.path.write_text("".join(p + "\n" for p in self.parts) + goals)


# ---------------------------------------------------------------------------- verification


def verify_inputs(torch, batch, k, vocab, dtype, device, seed):
    """Target logits ~ randn * 3, draft logits = target + 0.7 randn (acceptance about 0.7), both
    softmaxed in float32 and stored as `dtype`; drafts sampled from the draft rows."""
    g = torch.Generator(device).manual_seed(seed)
    target_logits = torch.randn(batch, k + 1, vocab, generator=g, device=device) * 3
    noise = torch.randn(batch, k, vocab, generator=g, device=device)
    draft = (target_logits[:, :k] + 0.7 * noise).softmax(dim=-1)
    del noise
    target = target_logits.softmax(dim=-1)
    del target_logits
    tokens = torch.multinomial(draft.reshape(-1, vocab), 1, generator=g).reshape(batch, k)
    lengths = torch.full((batch,), k, dtype=torch.int64, device=device)
    return dict(tokens=tokens, draft=draft.to(dtype), target=target.to(dtype), lengths=lengths, g=g)


def measure_bandwidth(torch, clock, device) -> float | None:
    """Bytes per second of a device-to-device copy (read + write counted), 1 GiB each way."""
    if device.type != "cuda":
        return None
    source = torch.empty(1 << 28, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    seconds = clock.per_call(lambda: destination.copy_(source), reps=10, warmup=2)
    return 2 * (1 << 30) / seconds


def verification_section(torch, settings, device, clock, bandwidth, report) -> str:
    from specsample import kernels, verify
    from specsample.rules import block_rule, draw_uniforms, token_rule

    hf_sampling = None
    with contextlib.suppress(ImportError):
        from transformers.generation.utils import _speculative_sampling as hf_sampling
    flashinfer_note = "not importable"
    flashinfer_chain = None
    try:
        import flashinfer.sampling

        flashinfer_chain = flashinfer.sampling.chain_speculative_sampling
        flashinfer_note = f"flashinfer {getattr(flashinfer, '__version__', '?')}"
    except Exception as error:  # absent or broken: noted, not fatal
        flashinfer_note = f"not importable ({type(error).__name__})"

    triton_ok = kernels.available() and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    )
    rows, agreement, notes = [], [], []
    for dtype_name in settings.dtypes:
        dtype = getattr(torch, dtype_name)
        for k in settings.ks:
            for batch in settings.batches:
                if report.over_budget():
                    notes.append(f"stopped before {dtype_name} k={k} batch {batch}: budget")
                    break
                x = verify_inputs(torch, batch, k, settings.vocab, dtype, device, seed=batch + k)
                accept, sample = draw_uniforms(batch, k, x["g"], device)
                args = (x["tokens"], x["draft"], x["target"], x["lengths"], accept, sample)
                contenders: dict[str, Callable[[], object]] = {}
                if triton_ok:
                    contenders["ours Triton, token"] = lambda a=args: kernels.token_rule(*a)
                    contenders["ours Triton, block"] = lambda a=args: kernels.block_rule(*a)
                contenders["ours torch, token"] = lambda a=args: token_rule(*a)
                contenders["ours torch, block"] = lambda a=args: block_rule(*a)
                gen = torch.Generator(device).manual_seed(0)
                contenders["verify() token, validate=False"] = lambda x=x, gen=gen: verify(
                    x["tokens"], x["draft"], x["target"], generator=gen, validate=False
                )
                if hf_sampling is not None and batch == 1:
                    ids = torch.cat([torch.zeros_like(x["tokens"]), x["tokens"]], dim=1)
                    d_logits, t_logits = x["draft"].log(), x["target"].log()
                    # Some 5.x versions take is_done_candidate after new_logits.
                    extra = (
                        (False,)
                        if "is_done_candidate" in inspect.signature(hf_sampling).parameters
                        else ()
                    )
                    contenders["transformers _speculative_sampling"] = (
                        lambda ids=ids, d=d_logits, t=t_logits, k=k, extra=extra: hf_sampling(
                            ids, d, k, t, *extra
                        )
                    )
                if flashinfer_chain is not None:
                    contenders["FlashInfer chain_speculative_sampling"] = lambda x=x: (
                        flashinfer_chain(x["draft"].float(), x["tokens"].int(), x["target"].float())
                    )
                if triton_ok:
                    agreement.append(
                        compare_rules(torch, kernels, token_rule, block_rule, args, dtype_name, k)
                    )
                floor = None
                if bandwidth:
                    bytes_read = (x["target"].numel() + x["draft"].numel()) * x[
                        "target"
                    ].element_size()
                    floor = bytes_read / bandwidth
                for name, fn in contenders.items():
                    try:
                        call = clock.per_call(fn, settings.reps, settings.warmup)
                        stream = clock.back_to_back(fn, settings.reps)
                    except Exception as error:
                        cells = [dtype_name, str(k), str(batch), name, f"error: {error}"[:80]]
                        rows.append(cells + ["-"] * 4)
                        continue
                    replay = None
                    if name.startswith("ours Triton") and device.type == "cuda":
                        replay = graph_replay_time(torch, fn, clock, settings.reps)
                    best = min(t for t in (call, stream, replay) if t is not None)
                    rows.append(
                        [
                            dtype_name,
                            str(k),
                            str(batch),
                            name,
                            fmt_time(call),
                            fmt_time(stream),
                            fmt_time(replay),
                            fmt_time(floor),
                            fmt_ratio(best / floor) if floor else "-",
                        ]
                    )
                    if name == "ours Triton, token" and dtype_name == "float32" and k == 4:
                        if batch == 256:
                            report.goals["verify, batch 256, k 4, float32"] = (
                                "<= 0.66 ms",
                                fmt_time(best),
                                "yes" if best <= GOAL_VERIFY_BATCH256_S else "no",
                            )
                        if batch == 1:
                            report.goals["verify, batch 1, k 4, float32"] = (
                                "<= 30 µs",
                                fmt_time(best),
                                "yes" if best <= GOAL_VERIFY_BATCH1_S else "no",
                            )
                del x, args, contenders
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    header = [
        "dtype",
        "k",
        "batch",
        "contender",
        "per call",
        "back to back",
        "graph replay",
        "floor",
        "best / floor",
    ]
    text = (
        "Per call: median over synchronised calls (what a caller waits, host launch included). "
        "Back to back: calls queued without a sync, per call (the device time where the host "
        "keeps ahead). Graph replay: the call captured in a CUDA graph and replayed back to "
        "back (the kernel's device time without Python's launch cost; Triton only, on CUDA). "
        "Floor: every byte of target_probs and draft_probs read once at the "
        "measured copy bandwidth (the token rule itself needs far less: the drafted entries "
        "and one or two rows per batch row). Inputs: target logits ~ randn * 3, draft = target "
        f"+ 0.7 randn, softmaxed; all drafts full length. FlashInfer: {flashinfer_note}. "
        "transformers' function takes logits and one sequence per call: batch 1 only.\n\n"
    )
    text += report.table(header, rows)
    if agreement:
        text += "\nTriton kernels against the torch rules on the same uniforms (rows whose "
        text += "tokens differ; 0 expected, except a uniform within float rounding of a "
        text += "boundary, where the torch rules sum in float32):\n\n"
        text += report.table(["dtype", "k", "batch", "token rule", "block rule"], agreement)
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def graph_replay_time(torch, fn, clock, reps) -> float | None:
    """Seconds per replay of `fn` captured in a CUDA graph, replays queued back to back; None
    where it cannot be captured."""
    try:
        graph = capture(torch, fn, torch.cuda.graph_pool_handle())
        return clock.back_to_back(graph.replay, reps)
    except Exception:
        return None


def compare_rules(torch, kernels, token_rule, block_rule, args, dtype_name, k):
    batch = args[0].shape[0]
    cells = [dtype_name, str(k), str(batch)]
    for fast, plain in [(kernels.token_rule, token_rule), (kernels.block_rule, block_rule)]:
        a, b = fast(*args), plain(*args)
        differ = int((a.tokens != b.tokens).any(dim=1).sum())
        cells.append(f"{differ} of {batch}")
    return cells


def tree_section(torch, settings, device, clock, report) -> str:
    from specsample import kernels
    from specsample.rules import draw_uniforms, tree_parents, tree_rule

    parents = tree_parents(settings.tree)
    n = len(parents)
    triton_ok = kernels.available() and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    )
    rows = []
    for dtype_name in settings.dtypes:
        dtype = getattr(torch, dtype_name)
        for batch in settings.tree_batches:
            x = verify_inputs(torch, batch, n, settings.vocab, dtype, device, seed=7)
            valid = torch.ones(batch, n, dtype=torch.bool, device=device)
            accept, sample = draw_uniforms(batch, n, x["g"], device)
            args = (x["tokens"], parents, x["draft"], x["target"], valid, accept, sample)
            contenders = {"ours torch tree_rule": lambda a=args: tree_rule(*a)}
            same = "-"
            if triton_ok:
                contenders["ours Triton tree_rule"] = lambda a=args: kernels.tree_rule(*a)
                a, b = kernels.tree_rule(*args), tree_rule(*args)
                same = f"{int((a.tokens != b.tokens).any(dim=1).sum())} of {batch} rows differ"
            for name, fn in contenders.items():
                call = clock.per_call(fn, settings.reps, settings.warmup)
                rows.append([dtype_name, str(batch), name, fmt_time(call), same])
            del x, args
    text = (
        f"Tree {settings.tree} ({n} nodes; drafts are not a real tree's draws, only the cost "
        "is measured), every node valid, vocab "
        f"{settings.vocab}; median per call (synchronised).\n\n"
    )
    return text + report.table(["dtype", "batch", "contender", "per call", "agreement"], rows)


# -------------------------------------------------------------------------------- decoding


def build_model(torch, shape: dict, dtype, device):
    import transformers

    config = transformers.Qwen2Config(
        **shape, max_position_embeddings=4096, rope_theta=1e6, use_cache=True
    )
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    return model.eval()


def cache_keyword(model) -> str:
    """transformers 5.x renamed the forward's `past_key_values` to `cache` (the old name is
    deprecated); take whichever this version's forward has."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def eager_costs(torch, model, settings, clock, device):
    """{n: seconds} of a forward over n new tokens on a context of settings.context tokens
    (DynamicCache, cropped back after each call), and the draft step (1 token + sampling)."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    keyword = cache_keyword(model)
    g = torch.Generator(device).manual_seed(0)
    context = torch.randint(0, vocab, (1, settings.context), generator=g, device=device)
    new = torch.randint(0, vocab, (1, max(settings.pass_tokens)), generator=g, device=device)
    cache = DynamicCache()
    with torch.no_grad():
        model(context, **{keyword: cache}, use_cache=True)
        costs = {}
        for n in settings.pass_tokens:

            def one_pass(n=n):
                model(new[:, :n], **{keyword: cache}, use_cache=True)
                cache.crop(-n)  # a negative count removes that many in every 5.x version

            costs[n] = clock.per_call(one_pass, settings.model_reps, 2)

        def draft_step():
            logits = model(new[:, :1], **{keyword: cache}, use_cache=True).logits[:, -1]
            probs = logits.float().softmax(dim=-1)
            torch.multinomial(probs, 1, generator=g)
            cache.crop(-1)

        draft = clock.per_call(draft_step, settings.model_reps, 2)
    return costs, draft


def graph_costs(torch, model, settings, clock, device):
    """{n: seconds} of a CUDA-graph replay of a forward over n new tokens with a static KV cache
    (one graph per n; every replay writes the same cache slots, the rollback by positions), and
    the draft step in a graph (1 token, softmax and an exponential-race sample)."""
    from transformers import StaticCache

    vocab = model.config.vocab_size
    keyword = cache_keyword(model)
    longest = max(settings.pass_tokens)
    cache = StaticCache(config=model.config, max_cache_len=settings.context + longest)
    g = torch.Generator(device).manual_seed(0)
    context = torch.randint(0, vocab, (1, settings.context), generator=g, device=device)
    with torch.no_grad():
        model(
            context,
            **{keyword: cache},
            cache_position=torch.arange(settings.context, device=device),
            use_cache=True,
        )
    pool = torch.cuda.graph_pool_handle()
    costs, graphs = {}, []
    for n in settings.pass_tokens:
        ids = torch.randint(0, vocab, (1, n), generator=g, device=device)
        positions = torch.arange(settings.context, settings.context + n, device=device)

        def forward(ids=ids, positions=positions):
            rewind(cache, settings.context)
            return model(
                ids,
                **{keyword: cache},
                cache_position=positions,
                position_ids=positions[None],
                use_cache=True,
            ).logits

        graph = capture(torch, forward, pool)
        graphs.append(graph)
        costs[n] = clock.per_call(graph.replay, settings.model_reps, 2)
    ids = torch.randint(0, vocab, (1, 1), generator=g, device=device)
    position = torch.arange(settings.context, settings.context + 1, device=device)

    def draft_step():
        rewind(cache, settings.context)
        logits = model(
            ids,
            **{keyword: cache},
            cache_position=position,
            position_ids=position[None],
            use_cache=True,
        ).logits[:, -1]
        probs = logits.float().softmax(dim=-1)
        return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)

    graph = capture(torch, draft_step, pool)
    draft = clock.per_call(graph.replay, settings.model_reps, 2)
    return costs, draft


def static_adapter_costs(torch, model, settings, clock, device):
    """{n: seconds} of HFStaticLM.extend over n tokens then truncate back (what the decoding loop
    calls: graph replay plus its host-side mask and copies), and its draft step (1 token and a
    sample). Graphs on CUDA; on CPU (smoke) the same passes run eagerly."""
    from specsample.adapters.hf_static import HFStaticLM

    vocab = model.config.vocab_size
    longest = max(settings.pass_tokens)
    lm = HFStaticLM(
        model,
        max_batch=1,
        max_length=settings.context + longest,
        graphs=device.type == "cuda",
    )
    g = torch.Generator(device).manual_seed(0)
    lm.prefill([torch.randint(0, vocab, (settings.context,), generator=g).tolist()])
    start = lm.lengths
    new = torch.randint(0, vocab, (1, longest), generator=g, device=device)
    costs = {}
    for n in settings.pass_tokens:

        def one_pass(n=n):
            lm.extend(new[:, :n], torch.tensor([n], device=device))
            lm.truncate(start)

        costs[n] = clock.per_call(one_pass, settings.model_reps, 2)
    one = torch.tensor([1], device=device)

    def draft_step():
        probs = lm.extend(new[:, :1], one)[:, -1].softmax(dim=-1)
        torch.multinomial(probs, 1, generator=g)
        lm.truncate(start)

    draft = clock.per_call(draft_step, settings.model_reps, 2)
    return costs, draft


def rewind(cache, length: int) -> None:
    """Puts the next write of a transformers StaticCache at slot `length`: versions that count
    the written slots on the device (a tensor) would otherwise move on at every replay and run
    past the end of the cache. Versions that take the positions from the call need nothing."""
    for layer in getattr(cache, "layers", []):
        counter = getattr(layer, "cumulative_length", None)
        if hasattr(counter, "fill_"):
            counter.fill_(length)


def capture(torch, fn, pool):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as capture requires
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


def decoding_section(torch, settings, device, clock, bandwidth, report, results) -> str:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, notes = [], []
    for name in settings.shapes:
        if report.over_budget():
            notes.append(f"{name}: skipped, the time budget is spent")
            continue
        shape = TINY_SHAPE if name == "tiny" else SHAPES[name]
        t0 = time.perf_counter()
        model = build_model(torch, shape, dtype, device)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor = weight_bytes / bandwidth if bandwidth else None
        entry = {"weight_bytes": weight_bytes, "floor": floor}
        entry["eager"], entry["eager_draft"] = eager_costs(torch, model, settings, clock, device)
        if device.type == "cuda":
            try:
                entry["graph"], entry["graph_draft"] = graph_costs(
                    torch, model, settings, clock, device
                )
            except Exception:
                notes.append(
                    f"{name}: graph capture failed:\n\n```\n{traceback.format_exc()[-1500:]}```"
                )
        else:
            notes.append(f"{name}: graphs not measured (they need CUDA)")
        try:
            entry["static"], entry["static_draft"] = static_adapter_costs(
                torch, model, settings, clock, device
            )
        except Exception:
            notes.append(f"{name}: HFStaticLM failed:\n\n```\n{traceback.format_exc()[-1500:]}```")
        results[name] = entry
        for path in PATHS:
            if path not in entry:
                continue
            costs = entry[path]
            one = costs[min(costs)]
            eight = costs.get(8)
            rows.append(
                [
                    name,
                    path,
                    f"{weight_bytes / 1e9:.2f} GB",
                    fmt_time(floor),
                    fmt_time(one),
                    fmt_ratio(one / floor) if floor else "-",
                    fmt_ratio(eight / one) if eight else "-",
                    fmt_time(entry[f"{path}_draft"]),
                    " ".join(f"{n}:{costs[n] * 1e3:.2f}" for n in sorted(costs)),
                ]
            )
        for path in ["graph", "static"]:
            if not name.startswith("1.5B") or path not in entry or device.type != "cuda":
                continue
            costs = entry[path]
            over_floor = costs[1] / floor if floor else None
            report.goals[f"1.5B-shape pass over its weight floor ({path})"] = (
                "<= 3x",
                fmt_ratio(over_floor),
                "yes" if over_floor is not None and over_floor <= GOAL_PASS_OVER_FLOOR else "no",
            )
            worst = max(costs[n] for n in costs if n <= 8) / costs[1]
            report.goals[f"1.5B-shape passes over <= 8 tokens / 1-token pass ({path})"] = (
                "<= 1.3x",
                fmt_ratio(worst),
                "yes" if worst <= GOAL_8_TOKENS_OVER_1 else "no",
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        notes.append(f"{name}: built and measured in {time.perf_counter() - t0:.0f} s")
    header = [
        "model",
        "path",
        "weights",
        "weight floor",
        "1-token pass",
        "pass / floor",
        "8 tokens / 1",
        "draft step",
        "pass cost by new tokens (ms)",
    ]
    text = (
        f"Random-weight Qwen2 models ({'bfloat16' if dtype == torch.bfloat16 else 'float32'}, "
        f"sdpa attention), batch 1, context {settings.context} tokens. Weight floor: the "
        "weights read once at the measured copy bandwidth. Eager: transformers' DynamicCache, "
        "cropped back after each pass. Graph: transformers' StaticCache and one CUDA graph per "
        "number of new tokens (replays rewrite the same cache slots), graph replay alone. "
        "Static: ours, specsample.adapters.hf_static.HFStaticLM.extend then truncate (graph "
        "replay plus the adapter's host work: mask, copies, float32 logits; eager on CPU). "
        "Draft step: a 1-token pass and a sample from its softmax. Medians of synchronised "
        "calls.\n\n"
    )
    text += report.table(header, rows)
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def measured_alphas() -> dict[float, float]:
    """Acceptance rate per keep test of the real default pair on CPU, by temperature: the mean
    over prompts of ours model drafter at batch 1 in benchmarks/decode_speed.json."""
    by_temperature: dict[float, list[float]] = {}
    try:
        rows = json.loads(ACCEPTANCE_SOURCE.read_text())["rows"]
        for row in rows:
            if row["library"] == "ours" and row["family"] == "model" and row["batch"] == 1:
                alpha = row["pooled_stats"]["alpha"]
                by_temperature.setdefault(row["temperature"], []).append(alpha)
    except (OSError, KeyError, TypeError, ValueError):
        return {}  # the decode benchmark's results are absent or changed shape
    return {t: statistics.mean(values) for t, values in sorted(by_temperature.items())}


def prediction_section(results, settings, report) -> str:
    from specsample.analysis.theory import expected_speedup

    alphas = measured_alphas()
    if not alphas:
        return f"No acceptance rates found in {ACCEPTANCE_SOURCE.name}; nothing to predict."
    draft_name = next((n for n in results if n.startswith("0.5B") or n == "tiny"), None)
    if draft_name is None:
        return "No draft-model costs were measured."
    rows = []
    for target_name, entry in results.items():
        if target_name.startswith("0.5B"):
            continue
        for path in PATHS:
            if path not in entry or f"{path}_draft" not in results[draft_name]:
                continue
            costs = entry[path]
            one = costs[1] if 1 in costs else costs[min(costs)]
            c = results[draft_name][f"{path}_draft"] / one
            max_k = max(costs) - 1
            verify_cost = {k: costs[k + 1] / one for k in range(max_k + 1) if k + 1 in costs}
            for temperature, alpha in alphas.items():
                ks = list(verify_cost)
                speedups = {k: expected_speedup(alpha, k, c, verify_cost) for k in ks}
                best = max(speedups, key=speedups.get)
                rows.append(
                    [
                        target_name,
                        path,
                        f"{temperature:g}",
                        f"{alpha:.3f}",
                        f"{c:.3f}",
                        str(best),
                        fmt_ratio(speedups[best]),
                    ]
                )
                if target_name.startswith("1.5B") and path != "eager" and temperature > 0:
                    report.goals[f"predicted speedup, default pair, T > 0 ({path})"] = (
                        ">= 2x",
                        fmt_ratio(speedups[best]),
                        "yes" if speedups[best] >= GOAL_SPEEDUP else "no",
                    )
    text = (
        "expected_speedup(alpha, k, c, v) from specsample.analysis.theory, against target-only "
        "decoding on the same path: alpha is the acceptance per keep test the real default pair "
        f"reached on CPU ({ACCEPTANCE_SOURCE.name}: ours model drafter, int8 draft, batch 1, "
        "mean over prompts); c = draft step / 1-token target pass and v(k) = (k+1)-token pass "
        "/ 1-token pass, both measured above; the draft is the 0.5B shape for every target. "
        "Best k over the measured pass sizes.\n\n"
    )
    header = ["target", "path", "T", "alpha", "c", "best k", "predicted speedup"]
    return text + report.table(header, rows)


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed")
    parser.add_argument("--out", type=Path, default=OUT, help=f"report path (default {OUT})")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds after which the remaining measurements are skipped (default 540)",
    )
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else Settings()
    if args.budget is not None:
        settings = dataclasses.replace(settings, budget_s=args.budget)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("benchmarks/gpu.py needs a CUDA device (use --smoke for a CPU check)")
        return 2
    started = time.perf_counter()
    report = Report(args.out, started, settings.budget_s)
    clock = Clock(device, torch)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for package in ["transformers", "triton", "flashinfer"]:
        try:
            versions[package] = __import__(package).__version__
        except Exception:
            versions[package] = "not installed"
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    bandwidth = measure_bandwidth(torch, clock, device)
    header = [
        "# GPU benchmark" + (" (SMOKE RUN: tiny sizes, not a measurement)" if args.smoke else ""),
        "",
        "How to run: `PYTHONPATH=src python3 benchmarks/gpu.py` on a CUDA machine (one run, "
        "under 10 minutes); `--smoke` runs tiny sizes on CPU.",
        "",
        f"- device: {name}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (vendor: 4.8 TB/s)"
        if bandwidth
        else "- copy bandwidth: not measured (no CUDA)",
        f"- settings: {dataclasses.asdict(settings)}",
    ]
    report.add("\n".join(header))
    report.section(
        "Verification (chain rules)",
        lambda: verification_section(torch, settings, device, clock, bandwidth, report),
    )
    report.section(
        "Verification (tree rule)", lambda: tree_section(torch, settings, device, clock, report)
    )
    results: dict = {}
    report.section(
        "Decoding passes",
        lambda: decoding_section(torch, settings, device, clock, bandwidth, report, results),
    )
    report.section("Predicted speedup", lambda: prediction_section(results, settings, report))
    report.add(f"Total time: {time.perf_counter() - started:.0f} s.")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
