"""Pass costs and batch numerics of the llama.cpp backend on the embedded default pair.

For the target (Qwen2.5-Coder-1.5B, Q4_K_M) and the draft (0.5B, Q4_K_M) through `LlamaCppLM`:

* the time of one `extend` of K tokens after a prompt, K = 1, 2, 4, 8, 16 (median of repeats,
  each followed by a truncate back to the prompt), and its ratio to K = 1;
* how far the logits of a position computed in a K-token pass are from the same position
  computed one token per pass: max |delta logit| and the total variation distance of the
  softmax (T = 1), max and mean over 16 positions.

Writes benchmarks/llamacpp_passes.md and prints progress to stderr.

Run: .venv/bin/python benchmarks/llamacpp_passes.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from common import cpu_info, load_average, load_prompts
from specsample.adapters import default_pair
from specsample.adapters.llamacpp import LlamaCppLM, LlamaCppTokenizer

KS = (1, 2, 4, 8, 16)
OUT = Path(__file__).with_suffix(".md")
REPACK_OUT = OUT.with_name("llamacpp_passes_repack.md")


def pass_times(lm: LlamaCppLM, prompt: list[int], tokens: list[int], repeats: int) -> dict:
    """Median ms of one extend of K tokens after `prompt`, per K."""
    lm.prefill([prompt])
    times = {}
    for k in KS:
        samples = []
        for _ in range(repeats + 1):  # the first is a warm-up
            started = time.perf_counter()
            lm.extend(torch.tensor([tokens[:k]]), torch.tensor([k]))
            samples.append(1000 * (time.perf_counter() - started))
            lm.truncate(torch.tensor([len(prompt)]))
        times[k] = statistics.median(samples[1:])
        print(f"  K={k:2d}: {times[k]:.1f} ms", file=sys.stderr)
    return times


def batch_gaps(lm: LlamaCppLM, prompt: list[int], tokens: list[int]) -> dict:
    """Per K: (max |delta logit|, max TV, mean TV) between K-token passes and 1-token passes
    over the same 16 positions."""
    lm.prefill([prompt])
    one = torch.cat(
        [lm.extend(torch.tensor([[t]]), torch.tensor([1]))[0] for t in tokens[: KS[-1]]]
    )
    gaps = {}
    for k in KS[1:]:
        lm.truncate(torch.tensor([len(prompt)]))
        chunks = [tokens[i : i + k] for i in range(0, KS[-1], k)]
        many = torch.cat([lm.extend(torch.tensor([c]), torch.tensor([k]))[0] for c in chunks])
        delta = (many - one).abs().max().item()
        tv = 0.5 * (many.softmax(-1) - one.softmax(-1)).abs().sum(-1)
        gaps[k] = (delta, tv.max().item(), tv.mean().item())
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--repack", action="store_true", help="let llama.cpp repack weights (its own default)"
    )
    args = parser.parse_args()
    target_path, draft_path = default_pair.gguf_paths()
    rows, gap_rows, loads = [], [], []
    for name, path in (("target 1.5B", target_path), ("draft 0.5B", draft_path)):
        started = time.perf_counter()
        lm = LlamaCppLM(path, n_ctx=1024, max_batch=4, threads=args.threads, repack=args.repack)
        loads.append(f"{name}: {time.perf_counter() - started:.1f} s")
        tok = LlamaCppTokenizer(lm)
        text = load_prompts()[0]["prompt"]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        continuation = tok.encode("def reverse(head):\n    prev = None\n    while head:\n" * 3)
        print(f"{name}: prompt {len(prompt)} tokens", file=sys.stderr)
        times = pass_times(lm, prompt, continuation, args.repeats)
        rows.append(
            f"| {name} | "
            + " | ".join(f"{times[k]:.1f} ({times[k] / times[1]:.2f}x)" for k in KS)
            + " |"
        )
        gaps = batch_gaps(lm, prompt, continuation)
        for k, (delta, tv_max, tv_mean) in gaps.items():
            gap_rows.append(f"| {name} | {k} | {delta:.4f} | {tv_max:.2e} | {tv_mean:.2e} |")
        lm.close()
    cpu = cpu_info()
    lines = [
        "# llama.cpp backend: pass costs and batch numerics",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with "
        f"`benchmarks/llamacpp_passes.py --threads {args.threads} --repeats {args.repeats}"
        f"{' --repack' if args.repack else ''}`; "
        f"CPU: {cpu['cpu']}, {cpu['logical_cores']} logical cores; load average "
        f"{load_average()}. Models: the default pair's Q4_K_M GGUF files through `LlamaCppLM` "
        f"(loads: {', '.join(loads)}).",
        "",
        "## Time of one pass of K new tokens (ms, median; ratio to K = 1)",
        "",
        "| model | " + " | ".join(f"K={k}" for k in KS) + " |",
        "|---|" + "---|" * len(KS),
        *rows,
        "",
        "## Logits of K-token passes against 1-token passes (same 16 positions)",
        "",
        "max |delta logit| over positions and vocabulary; total variation distance of the "
        "softmax at T = 1 per position (max and mean). Decoding is exact with respect to the "
        "distributions the verifying pass computed; these gaps say how far those are from a "
        "one-token-at-a-time run.",
        "",
        "| model | K | max abs delta logit | max TV | mean TV |",
        "|---|---|---|---|---|",
        *gap_rows,
        "",
    ]
    out = REPACK_OUT if args.repack else OUT
    out.write_text("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
