"""Greedy speculative text against greedy target-only text on the default pair (llama.cpp).

Greedy decoding takes the argmax of the target's logits at every position. Speculative decoding
scores drafts in passes of k + 1 tokens; in exact arithmetic the argmax is the same as in a
1-token pass, so the texts are equal. On real kernels a K-token pass may round differently (with
weight repacking off, llama.cpp's CPU kernels give bit-identical logits for passes of 1 to 4
tokens here and differ from 8: benchmarks/llamacpp_passes.md), and a near tie between the two
best logits can flip. For every prompt of benchmarks/prompts.json this decodes --tokens tokens
target-only and with the model drafter at fixed k = 3, 4, 8 (passes of 4, 5, 9 tokens), counts
equal texts and, where they part, gives the position and the target's logit gap there (from a
fresh prefill of the common prefix, one pass over it).

Run: .venv/bin/python benchmarks/greedy_equality.py [--tokens 96] [--ks 3,4,8] [--threads 2]
     [--repack --out benchmarks/greedy_equality_repack.md]
Writes benchmarks/greedy_equality.md (--out: another file). --repack runs with llama.cpp's
repacked weights, the command line's default, whose multi-token kernels round differently.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from common import cpu_info, load_average, load_prompts
from specsample import Engine, SamplingConfig
from specsample.adapters.loading import load_pair
from specsample.drafters.model import ModelDrafter
from specsample.engine.text import encode_prompt

OUT = Path(__file__).with_suffix(".md")


def decode(pair, k: int, prompt: list[int], tokens: int) -> list[int]:
    drafter = ModelDrafter(pair.draft) if k else None
    engine = Engine(pair.target, drafter, draft_length=k, max_batch=1)
    engine.add_request(
        prompt, sampling=SamplingConfig(temperature=0), max_new_tokens=tokens, eos_token_ids=()
    )
    out: list[int] = []
    while engine.has_unfinished():
        for output in engine.step():
            out.extend(output.tokens)
    return out


def logit_gap(pair, prefix: list[int]) -> float:
    """Best minus second-best target logit after `prefix`, from a fresh prefill (one pass)."""
    logits = pair.target.prefill([prefix])[0].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--ks", default="3,4,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument(
        "--repack", action="store_true", help="repacked weights (the command line's default)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    started = datetime.datetime.now(datetime.timezone.utc)
    load = load_average()
    pair = load_pair(
        backend="llama.cpp", threads=args.threads, n_ctx=2048, max_batch=1, repack=args.repack
    )
    prompts = load_prompts()[: args.limit]
    rows, equal = [], dict.fromkeys(ks, 0)
    for spec in prompts:
        prompt = encode_prompt(pair.tokenizer, spec["prompt"])
        base = decode(pair, 0, prompt, args.tokens)
        for k in ks:
            text = decode(pair, k, prompt, args.tokens)
            if text == base:
                equal[k] += 1
                continue
            t = next(i for i in range(min(len(base), len(text))) if base[i] != text[i])
            gap = logit_gap(pair, prompt + base[:t])
            rows.append(f"| {spec['name']} | {k} | {t} | {base[t]} | {text[t]} | {gap:.4f} |")
            print(f"{spec['name']} k={k}: parted at {t} (gap {gap:.4f})", file=sys.stderr)
        print(f"{spec['name']}: done", file=sys.stderr)
    cpu = cpu_info()
    lines = [
        "# Greedy speculative text vs greedy target-only text (default pair, llama.cpp)",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC, `benchmarks/greedy_equality.py --tokens "
        f"{args.tokens} --ks {args.ks} --threads {args.threads}"
        f"{' --repack' if args.repack else ''}`; CPU {cpu['cpu']}, "
        f"{cpu['logical_cores']} logical cores; load average {load}. Qwen2.5-Coder-1.5B-Instruct "
        f"(target) drafted by 0.5B-Instruct, Q4_K_M, llama.cpp with weight repacking "
        f"{'on' if args.repack else 'off'}; "
        f"{len(prompts)} prompts of benchmarks/prompts.json through the chat template, "
        f"{args.tokens} new tokens, EOS does not stop; model drafter at fixed k (passes of k + 1 "
        "tokens).",
        "",
        "| k (pass of k + 1 tokens) | equal texts |",
        "|---|---|",
        *[f"| {k} ({k + 1}) | {equal[k]} / {len(prompts)} |" for k in ks],
        "",
    ]
    if rows:
        lines += [
            "Where they part: the first differing new token, the two runs' ids, and the gap "
            "between the target's two best logits there in a fresh prefill of the common prefix "
            "(a small gap: the passes rounded differently near a tie).",
            "",
            "| prompt | k | position | target-only | speculative | logit gap |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
