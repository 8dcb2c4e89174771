"""Fitting the verifying pass to its costs, on and off, side by side: ours' model drafter (int8
draft, the command line's draft-side stops, AdaptiveDraftLength(20) with a cost memory) with
`fit_passes=True` (the default: drafts not worth their pass are cut, passes padded where a
wider one was timed cheaper) and `fit_passes=False`, next to ours target-only, on the default
pair on transformers (float32 compute, as benchmarks/decode_speed.py).

Per prompt and temperature, each seed runs both variants back to back (order alternating by
seed); target-only runs once per prompt (its time does not depend on the seed or the
temperature beyond noise). Reported: seconds, speedup over target-only, target passes, drafts
verified, drafts cut, padded passes and acceptance per keep test, per run; and per cell the
speedup of the mean time over the seeds. Each variant keeps its own cost memory, filled by a
16-token warm-up run as the command line's first run of a setting fills it.

Run: `.venv/bin/python benchmarks/fit_passes.py --prompts rename-vars,add-logging,story,
explain-cache --temperatures 0.7 --seeds 1,2` (about 15 minutes on 2 cores); writes
fit_passes.md beside it (--no-write: print only).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_info, load_average, load_prompts
from specsample.adapters.default_pair import load_default_pair_with_stats
from specsample.adapters.hf import HFCausalLM
from specsample.adapters.quantize import quantize_draft
from specsample.drafters.model import (
    DEFAULT_CONFIDENCE,
    DEFAULT_GREEDY_SURVIVAL,
    DEFAULT_SURVIVAL,
    ModelDrafter,
)
from specsample.engine import generate
from specsample.engine.length import AdaptiveDraftLength
from specsample.engine.memory import CostMemory
from specsample.engine.text import encode_prompt
from specsample.warpers import SamplingConfig

HERE = Path(__file__).parent
OUT_MD = HERE / "fit_passes.md"
MAX_K = 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default="rename-vars,add-logging,story,explain-cache")
    parser.add_argument("--temperatures", default="0.7")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    try:
        args.temperatures = [float(t) for t in args.temperatures.split(",")]
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error("--temperatures and --seeds: expected comma-separated numbers")
    if args.new_tokens < 1 or any(t < 0 for t in args.temperatures):
        parser.error("--new-tokens: expected >= 1; --temperatures: expected numbers >= 0")
    known = {p["name"]: p for p in load_prompts()}
    names = [n.strip() for n in args.prompts.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"--prompts: expected names from {sorted(known)}, got {unknown or names}")
    args.prompt_list = [known[n] for n in names]
    return args


def main() -> None:
    args = parse_args()
    started = datetime.datetime.now().astimezone()
    load_start = load_average()
    torch.set_grad_enabled(False)
    lines = []
    with torch.inference_mode():
        pair = load_default_pair_with_stats(torch.bfloat16)
        pair.target.to(torch.float32)  # exact upcast of the cached bf16 weights
        pair.draft.to(torch.float32)
        target = HFCausalLM(pair.target)
        draft = HFCausalLM(quantize_draft(copy.deepcopy(pair.draft), "int8"))
        folder = tempfile.mkdtemp(prefix="specsample-fit-passes-")

        def ours(fit: bool, ids: list[int], temperature: float, seed: int, n: int):
            policy = AdaptiveDraftLength(MAX_K, fit_passes=fit)
            policy.recall(CostMemory({"benchmark": "fit_passes", "fit": fit}, folder))
            drafter = ModelDrafter(
                draft,
                confidence=DEFAULT_CONFIDENCE,
                survival=DEFAULT_SURVIVAL,
                greedy_survival=DEFAULT_GREEDY_SURVIVAL,
            )
            clock = time.perf_counter()
            out = generate(
                target,
                [ids],
                generator=torch.Generator().manual_seed(seed),
                drafter=drafter,
                sampling=SamplingConfig(temperature=temperature),
                max_new_tokens=n,
                draft_length=policy,
                eos_token_ids=(),
            )
            return time.perf_counter() - clock, out.stats

        def target_only(ids: list[int], n: int) -> float:
            clock = time.perf_counter()
            generate(
                target,
                [ids],
                generator=torch.Generator().manual_seed(0),
                sampling=SamplingConfig(temperature=0),
                max_new_tokens=n,
                eos_token_ids=(),
            )
            return time.perf_counter() - clock

        encoded = {p["name"]: encode_prompt(pair.tokenizer, p["prompt"]) for p in args.prompt_list}
        first = encoded[args.prompt_list[0]["name"]]
        for fit in (True, False):  # warm-up: fills each variant's cost memory
            ours(fit, first, args.temperatures[0], 0, 16)
        target_only(first, 4)
        runs, cells = [], []
        for prompt in args.prompt_list:
            ids = encoded[prompt["name"]]
            base = target_only(ids, args.new_tokens)
            for temperature in args.temperatures:
                seconds = {True: [], False: []}
                for i, seed in enumerate(args.seeds):
                    for fit in (True, False) if i % 2 == 0 else (False, True):
                        s, stats = ours(fit, ids, temperature, seed, args.new_tokens)
                        seconds[fit].append(s)
                        runs.append(
                            f"| {prompt['name']} | {temperature:g} | {seed} | "
                            f"{'on' if fit else 'off'} | {s:.1f} | {base / s:.2f} | "
                            f"{stats.target_passes} | {stats.drafted} | {stats.trimmed} | "
                            f"{stats.padded_passes} | {stats.alpha:.2f} |"
                        )
                        print(runs[-1], file=sys.stderr, flush=True)
                on = base / statistics.mean(seconds[True])
                off = base / statistics.mean(seconds[False])
                cells.append(
                    f"| {prompt['name']} | {temperature:g} | {base:.1f} | {on:.2f} | {off:.2f} "
                    f"| {on / off:.2f} |"
                )
    machine = cpu_info()
    lines += [
        "# Fitting the verifying pass: on and off (transformers, float32, default pair)",
        "",
        f"Run: `.venv/bin/python benchmarks/fit_passes.py --prompts "
        f"{','.join(p['name'] for p in args.prompt_list)} --temperatures "
        f"{','.join(f'{t:g}' for t in args.temperatures)} --seeds "
        f"{','.join(map(str, args.seeds))} --new-tokens {args.new_tokens}`; "
        f"{started:%Y-%m-%d %H:%M} to {datetime.datetime.now().astimezone():%H:%M}.",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, torch threads "
        f"{machine['torch_threads']}; load average at start {load_start}, at end "
        f"{load_average()}.",
        "",
        "Ours' model drafter with the int8 draft and the command line's stops, "
        "AdaptiveDraftLength(20) with a cost memory per variant; `fit_passes` on (default) "
        "and off. x TO: speedup over ours target-only on the same prompt (one run per "
        "prompt); a cell's speedup is over the mean time of its seeds.",
        "",
        "## Per cell",
        "",
        "| prompt | T | target-only s | fit on x TO | fit off x TO | on / off |",
        "|---|---:|---:|---:|---:|---:|",
        *cells,
        "",
        "## Per run",
        "",
        "| prompt | T | seed | fit | s | x TO | target passes | drafts verified | drafts cut "
        "| padded passes | alpha |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *runs,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        OUT_MD.write_text(text)
        print(f"wrote {OUT_MD}", file=sys.stderr)


if __name__ == "__main__":
    main()
