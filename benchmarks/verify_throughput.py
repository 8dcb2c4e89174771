"""Verification throughput on CPU: specsample.verify vs transformers' `_speculative_sampling`
vs the plain-loop oracle `reference_token_rule`, all in one run, round-robin interleaved.

float32, k = 4, vocab 151936 (Qwen2.5), batch 1, 64, 256. Writes benchmarks/verify_throughput.md
and prints the same markdown.

Run: .venv/bin/python benchmarks/verify_throughput.py
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers.generation.utils import _speculative_sampling

import specsample
from common import cpu_info, load_average
from specsample.rules import draw_uniforms, token_rule
from specsample.rules.reference import reference_token_rule

K = 4
VOCAB = 151936
PROMPT = 16  # prompt length in front of the drafts in transformers' candidate ids
TARGET_SCALE = 3.0  # target logits ~ randn * 3
DRAFT_NOISE = 0.7  # draft logits = target logits + 0.7 * randn: per-token acceptance ~ 0.72
OUT = Path(__file__).with_suffix(".md")


def make_inputs(batch: int, seed: int) -> dict:
    """Realistic probabilities, plus the same as logits (log of the probs) for transformers."""
    gen = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(batch, K + 1, VOCAB, generator=gen) * TARGET_SCALE
    draft_logits = target_logits[:, :K] + DRAFT_NOISE * torch.randn(batch, K, VOCAB, generator=gen)
    target_probs = target_logits.softmax(dim=-1)
    draft_probs = draft_logits.softmax(dim=-1)
    del target_logits, draft_logits
    draft_tokens = torch.multinomial(draft_probs.reshape(batch * K, VOCAB), 1, generator=gen)
    draft_tokens = draft_tokens.reshape(batch, K)
    prompt = torch.randint(0, VOCAB, (batch, PROMPT), generator=gen)
    return {
        "draft_tokens": draft_tokens,
        "draft_probs": draft_probs,
        "target_probs": target_probs,
        # transformers takes logits and softmaxes them itself; log(probs) reproduces our probs.
        "draft_logits": draft_probs.log(),
        "target_logits": target_probs.log(),
        "candidate_ids": torch.cat([prompt, draft_tokens], dim=1),  # [batch, prompt + k]
    }


def contenders(x: dict, batch: int, with_reference: bool) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(1)
    dt, dp, tp = x["draft_tokens"], x["draft_probs"], x["target_probs"]
    dl, tl, ids = x["draft_logits"], x["target_logits"], x["candidate_ids"]
    full = torch.full((batch,), K, dtype=torch.int64)

    def ours_validate():
        return specsample.verify(dt, dp, tp, generator=gen)

    def ours_trusted():
        return specsample.verify(dt, dp, tp, generator=gen, validate=False)

    def hf():  # batch 1 only: loop over rows
        return [
            _speculative_sampling(ids[b : b + 1], dl[b : b + 1], K, tl[b : b + 1])
            for b in range(batch)
        ]

    def hf_softmax():  # the two softmaxes hf does on the same inputs, nothing else
        return [
            (dl[b : b + 1].softmax(dim=-1), tl[b : b + 1].softmax(dim=-1)) for b in range(batch)
        ]

    def reference():
        accept, sample = draw_uniforms(batch, K, gen, torch.device("cpu"))
        return reference_token_rule(dt, dp, tp, full, accept, sample)

    out = {
        "ours (validate=True)": ours_validate,
        "ours (validate=False)": ours_trusted,
        "transformers _speculative_sampling": hf,
        "  of which: its 2 softmaxes": hf_softmax,
    }
    if with_reference:
        out["reference_token_rule (loop)"] = reference
    return out


def sanity(x: dict, batch: int) -> dict[str, float]:
    """Checks ours == reference on shared uniforms (a few rows) and measures acceptance: the
    per-draft acceptance probability sum_v min(p, q) (first 64 rows), and the mean number of
    accepted drafts per step (out of k) for ours and for transformers."""
    gen = torch.Generator().manual_seed(2)
    rows = min(batch, 4)
    dt, dp, tp = x["draft_tokens"][:rows], x["draft_probs"][:rows], x["target_probs"][:rows]
    full = torch.full((rows,), K, dtype=torch.int64)
    accept, sample = draw_uniforms(rows, K, gen, torch.device("cpu"))
    fast = token_rule(dt, dp, tp, full, accept, sample)
    slow = reference_token_rule(dt, dp, tp, full, accept, sample)
    assert torch.equal(fast.tokens, slow.tokens), (fast.tokens, slow.tokens)
    head = slice(0, min(batch, 64))
    alpha = torch.minimum(x["target_probs"][head, :K], x["draft_probs"][head]).sum(-1).mean()
    ours = specsample.verify(
        x["draft_tokens"], x["draft_probs"], x["target_probs"], generator=gen, validate=False
    )
    torch.manual_seed(3)
    hf = [
        int(
            _speculative_sampling(
                x["candidate_ids"][b : b + 1],
                x["draft_logits"][b : b + 1],
                K,
                x["target_logits"][b : b + 1],
            )[1]
        )
        for b in range(batch)
    ]
    return {
        "alpha": float(alpha),
        "ours": float(ours.num_accepted.float().mean()),
        "hf": sum(hf) / len(hf),
    }


def bench(fns: dict, repeats: dict[str, int], min_sample_s: float = 0.03) -> dict[str, list[float]]:
    """Round-robin: each round takes one sample of every contender that still has repeats left,
    in an order rotated by one per round (so no contender always runs right after the same one).
    A sample repeats a fast call enough times to last about min_sample_s (sized during warm-up);
    the recorded time is per call."""
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        inner[name] = max(1, min(50, round(min_sample_s / max(once, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(max(repeats.values())):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if len(times[name]) >= repeats[name]:
                continue
            torch.manual_seed(1000 + r)  # transformers draws from the global RNG
            start = time.perf_counter()
            for _ in range(inner[name]):
                fns[name]()
            times[name].append((time.perf_counter() - start) / inner[name])
    return times


def machine() -> list[str]:
    info = cpu_info()
    load = load_average()
    return [
        f"- CPU: {info['cpu']}; {info['logical_cores']} logical cores visible; torch threads "
        f"{info['torch_threads']} (default; batch 1 is also run with 1 thread)",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python "
        f"{platform.python_version()}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; load "
        f"average at start (1, 5, 15 min): {load}",
    ]


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def intro_lines() -> list[str]:
    """The report's title, machine and method."""
    return [
        "# Verification throughput (CPU, float32)",
        "",
        f"k = {K}, vocab = {VOCAB}, all drafts full length. How to run: "
        "`.venv/bin/python benchmarks/verify_throughput.py` (about 3-5 minutes).",
        "",
        *machine(),
        "",
        f"Inputs (made once per batch size, outside the timed region): target logits ~ randn * "
        f"{TARGET_SCALE:g}, draft logits = target logits + {DRAFT_NOISE:g} * randn, both "
        "softmaxed; draft tokens sampled from the draft probabilities. transformers' "
        "`transformers.generation.utils._speculative_sampling(candidate_input_ids, "
        "candidate_logits, candidate_length, new_logits, assistant_ensemble_weight=None)` gets "
        f"candidate ids [1, {PROMPT} + k], draft logits [1, k, vocab], k and target logits "
        "[1, k+1, vocab]; it gets "
        "logits = log(probs), so its own softmax reproduces the same probabilities; its softmax "
        "is part of its cost (it is what the library does). The row 'of which: its 2 softmaxes' "
        "times only `draft_logits.softmax(-1)` and `target_logits.softmax(-1)` on the same "
        "per-row inputs, and 'transformers w/o softmax' is the difference of the two medians "
        "(an estimate, not a separate run). transformers' function handles one sequence, so at "
        "batch > 1 it is called once per row in a Python loop. Warm-up 2 calls each, then the "
        "contenders are interleaved round-robin (a sample of a call under ~30 ms repeats it to "
        "last ~30 ms); times are per call (one call verifies the whole batch), median and min "
        "over the samples. The global RNG is seeded with torch.manual_seed before every sample "
        "(transformers draws from it); ours uses its own torch.Generator. The machine may be "
        "shared: compare rows within one batch size (they ran interleaved), not across runs; "
        "noise only adds time, so the ratio of minimums is also given.",
        "",
    ]


def batch_section(
    batch: int, threads: int, args: argparse.Namespace
) -> tuple[list[str], list[str]]:
    """Times every contender at one batch size and thread count: the section's lines and the
    goal lines it settles."""
    torch.set_num_threads(threads)
    lines: list[str] = []
    goals: list[str] = []
    x = make_inputs(batch, seed=batch)
    acc = sanity(x, batch)
    with_ref = batch <= args.reference_max_batch
    fns = contenders(x, batch, with_ref)
    fast = args.repeats if batch > 1 else 15
    slow = args.slow_repeats if batch > 1 else 15
    repeats = {name: fast for name in fns}
    for name in (
        "transformers _speculative_sampling",
        "  of which: its 2 softmaxes",
        "reference_token_rule (loop)",
    ):
        repeats[name] = slow
    times = bench(fns, repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    med["transformers w/o softmax (estimate)"] = max(
        med["transformers _speculative_sampling"] - med["  of which: its 2 softmaxes"], 1e-9
    )
    lines += [
        f"## batch {batch}, torch threads {threads}",
        "",
        f"Per-draft acceptance probability sum_v min(p, q): {acc['alpha']:.2f}; accepted "
        f"drafts per step (of {K}) in this batch: ours {acc['ours']:.2f}, transformers "
        f"{acc['hf']:.2f}. Ours matched reference_token_rule token for token on shared "
        "uniforms."
        + (
            ""
            if with_ref
            else f" reference_token_rule not timed at batch {batch} "
            f"(loop; > {args.reference_max_batch} rows takes too long)."
        ),
        "",
        "| contender | repeats | median / call | min / call | rows/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in med.items():
        t = times.get(name)
        label = "&nbsp;&nbsp;" + name.strip() if name.startswith("  ") else name
        reps = str(len(t)) if t else "-"
        mn = fmt_time(min(t)) if t else "-"
        lines.append(f"| {label} | {reps} | {fmt_time(m)} | {mn} | {batch / m:,.0f} |")
    hf_t = med["transformers _speculative_sampling"]
    hf_ns = med["transformers w/o softmax (estimate)"]
    lines += [""]
    for ours in ("ours (validate=False)", "ours (validate=True)"):
        ratio = hf_t / med[ours]
        ratio_min = min(times["transformers _speculative_sampling"]) / min(times[ours])
        text = (
            f"batch {batch} ({threads} thread{'s' * (threads > 1)}): {ours} is {ratio:.2f}x "
            f"transformers' rows/s on medians, {ratio_min:.2f}x on minimums "
            f"({hf_ns / med[ours]:.2f}x vs transformers w/o softmax, medians)"
        )
        if with_ref:
            loop = med["reference_token_rule (loop)"]
            text += f", {loop / med[ours]:.1f}x the loop reference"
        lines.append(f"- {text}")
        if batch == 1:
            goals.append(f"{'met' if ratio > 1 else 'MISSED'}: {text}")
        if batch == 256:
            goals.append(f"{'met' if ratio >= 20 else 'MISSED'}: {text}")
    lines.append("")
    del x, fns
    print(f"[batch {batch}, {threads} threads done]", flush=True)
    return lines, goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--repeats", type=int, default=9, help="samples of ours (batch > 1)")
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=3,
        help="samples of transformers and the loop reference (batch > 1)",
    )
    parser.add_argument("--reference-max-batch", type=int, default=64)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    lines = intro_lines()
    goals: list[str] = []
    default_threads = torch.get_num_threads()
    runs = []
    for batch in args.batches:
        runs.append((batch, default_threads))
        if batch == 1 and default_threads > 1:
            # Tiny ops: on a shared machine, waiting for the second thread can dominate.
            runs.append((batch, 1))
    for batch, threads in runs:
        section, settled = batch_section(batch, threads, args)
        lines += section
        goals += settled
    torch.set_num_threads(default_threads)

    lines += [
        "## Goals",
        "",
        "- batch 1: ours faster than transformers; batch 256: ours >= 20x the per-row throughput "
        "of transformers looped over rows.",
        "",
        *(f"- {line}" for line in goals),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        OUT.write_text(text)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
