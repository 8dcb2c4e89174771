"""Decode speed on CPU: specsample's `generate` (target-only; model drafter with adaptive and fixed
draft length; n-gram drafter) vs transformers' `generate` (target-only; assisted generation with
the draft model; prompt lookup), side by side in one run on the embedded default pair
(Qwen2.5-Coder 1.5B target, 0.5B draft), float32, contenders interleaved per prompt.

Writes benchmarks/decode_speed.md (and raw results in benchmarks/decode_speed.json) and prints
each run's tokens/s to stderr as it goes.

Run: .venv/bin/python benchmarks/decode_speed.py            (about an hour or more; quiet machine)
     .venv/bin/python benchmarks/decode_speed.py --quick    (smoke test: 1 prompt, 8 new tokens)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common import (
    PROMPTS,
    Counter,
    cpu_info,
    load_average,
    load_prompts,
    probe_context,
    probe_costs,
)
from decode_contenders import (
    ADAPTIVE_MAX_K,
    HF_ASSISTED_INT8,
    HF_TO,
    OURS_TO,
    Cell,
    Contender,
    Names,
    Progress,
    make_contenders,
    round_robin,
)
from decode_report import Record, json_record, markdown
from decode_rows import Row, rows_for
from specsample.adapters.default_pair import load_default_pair_with_stats
from specsample.adapters.hf import HFCausalLM
from specsample.adapters.quantize import quantize_draft
from specsample.engine.text import encode_prompt

HERE = Path(__file__).parent
OUT_MD = HERE / "decode_speed.md"
OUT_JSON = HERE / "decode_speed.json"


def parse_args() -> argparse.Namespace:
    def floats(text: str) -> list[float]:
        return [float(t) for t in text.split(",") if t.strip()]

    def ints(text: str) -> list[int]:
        return [int(t) for t in text.split(",") if t.strip()]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=None, help="per row (default 128)")
    parser.add_argument("--temperatures", type=floats, default=[0.0, 0.7], help="e.g. 0,0.7")
    parser.add_argument("--k", type=int, default=4, help="fixed draft length, model drafter")
    parser.add_argument(
        "--no-fixed", action="store_true", help="leave out the fixed-k model drafter contender"
    )
    parser.add_argument("--ngram-k", type=int, default=8, help="draft length, n-gram drafter")
    parser.add_argument(
        "--hf-assist-k",
        type=int,
        default=None,
        help="also run transformers assisted generation with num_assistant_tokens=K (constant)",
    )
    parser.add_argument("--batches", type=ints, default=None, help="e.g. 1,4,8 (the default)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per cell (default 1)")
    parser.add_argument("--prompts", default=None, help="NAME,... from the prompts file")
    parser.add_argument(
        "--prompts-file",
        type=Path,
        default=PROMPTS,
        help="a JSON list of {name, kind, prompt} (default benchmarks/prompts.json; "
        "benchmarks/outside_prompts.json holds prompts the policies were not tuned on)",
    )
    parser.add_argument("--probe-repeats", type=int, default=None, help="default 5")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: first prompt, 8 new tokens, 1 repeat, batches 1,4, probe repeats 2",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write the md/json")
    parser.add_argument(
        "--no-cost-memory",
        action="store_true",
        help="ours' adaptive policies without a cost memory (each run checks the costs anew)",
    )
    parser.add_argument(
        "--draft-quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: our model drafter uses the int8-quantised draft (exact decoding still), and "
        "transformers' assisted generation runs with it too, next to its float32 default",
    )
    parser.add_argument(
        "--goal-contenders",
        action="store_true",
        help="only the contenders the goal compares: ours target-only and model drafter "
        "(adaptive), transformers target-only and assisted generation with the int8 draft "
        "(needs --draft-quantize int8); with --repeats R each cell's R runs take seeds "
        "seed..seed+R-1, so at T > 0 a cell's median is over R sampled texts",
    )
    args = parser.parse_args()
    if args.goal_contenders and args.draft_quantize != "int8":
        parser.error("--goal-contenders: expected --draft-quantize int8 (the goal's draft)")
    quick = args.quick
    args.new_tokens = args.new_tokens or (8 if quick else 128)
    args.repeats = args.repeats or 1
    args.batches = args.batches or ([1, 4] if quick else [1, 4, 8])
    args.probe_repeats = args.probe_repeats or (2 if quick else 5)
    for name in ("new_tokens", "k", "ngram_k", "repeats", "probe_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if any(t < 0 for t in args.temperatures) or not args.temperatures:
        parser.error("--temperatures: expected numbers >= 0")
    if any(b < 1 for b in args.batches):
        parser.error("--batches: expected integers >= 1")
    return args


def select_prompts(args: argparse.Namespace, all_prompts: list[dict]) -> list[dict]:
    if not args.prompts:
        return all_prompts[:1] if args.quick else all_prompts
    wanted = [p.strip() for p in args.prompts.split(",") if p.strip()]
    unknown = set(wanted) - {p["name"] for p in all_prompts}
    if unknown:
        sys.exit(f"--prompts: unknown {sorted(unknown)}; known {[p['name'] for p in all_prompts]}")
    return [p for p in all_prompts if p["name"] in wanted]


@dataclass
class Models:
    """The loaded pair, float32, with the adapters ours runs on and the probed pass costs."""

    pair: object
    target_lm: HFCausalLM
    draft_lm: HFCausalLM
    int8_draft: torch.nn.Module | None
    bf16_cost: dict[int, float]
    target_cost: dict[int, float]
    draft_cost: dict[int, float]

    @property
    def c_probe(self) -> float:
        return self.draft_cost[1] / self.target_cost[1]


def load_and_probe(args: argparse.Namespace, all_prompts: list[dict]) -> Models:
    """Load the default pair, time bf16 and float32 passes (why the benchmark computes in
    float32: bf16 on this CPU), and set up ours' target and draft adapters."""
    pair = load_default_pair_with_stats(torch.bfloat16)
    context = probe_context(pair.tokenizer, all_prompts)
    probe_k = max(args.k, args.ngram_k, ADAPTIVE_MAX_K, args.hf_assist_k or 0)
    print("probing bf16 target costs ...", file=sys.stderr, flush=True)
    bf16_cost = probe_costs(HFCausalLM(pair.target), context, [1, args.k + 1], 3)
    pair.target.to(torch.float32)  # exact upcast of the cached bf16 weights
    pair.draft.to(torch.float32)
    target_lm, draft_lm = HFCausalLM(pair.target), HFCausalLM(pair.draft)
    int8_draft = None
    if args.draft_quantize == "int8":
        # ours drafts with the int8 draft; transformers gets it too (and its fp32 default)
        int8_draft = quantize_draft(copy.deepcopy(pair.draft), "int8")
        draft_lm = HFCausalLM(int8_draft)
    print("probing float32 costs ...", file=sys.stderr, flush=True)
    target_cost = probe_costs(target_lm, context, list(range(1, probe_k + 2)), args.probe_repeats)
    draft_cost = probe_costs(draft_lm, context, [1], args.probe_repeats)
    models = Models(pair, target_lm, draft_lm, int8_draft, bf16_cost, target_cost, draft_cost)
    print(
        f"target 1 tok {target_cost[1] * 1e3:.0f} ms, {args.k + 1} tok "
        f"{target_cost[args.k + 1] * 1e3:.0f} ms; draft 1 tok {draft_cost[1] * 1e3:.0f} ms; "
        f"c = {models.c_probe:.3f}; bf16 target 1 tok {bf16_cost[1] * 1e3:.0f} ms, "
        f"{args.k + 1} tok {bf16_cost[args.k + 1] * 1e3:.0f} ms",
        file=sys.stderr,
        flush=True,
    )
    return models


def run_all(
    args: argparse.Namespace,
    prompts: list[dict],
    encoded: dict[str, list[int]],
    models: Models,
    contenders: dict[str, Contender],
    names: Names,
) -> list[Row]:
    """Warm-up, then batch 1 (every contender, each prompt and temperature) and batch > 1 (ours
    target-only and adaptive, transformers' target-only); one Row per contender and cell."""
    n, temps = args.new_tokens, args.temperatures
    batch_contenders = [contenders[OURS_TO], contenders[names.adaptive], contenders[HF_TO]]
    multi = [b for b in args.batches if b > 1]
    single = len(prompts) * len(temps) * args.repeats * len(contenders) if 1 in args.batches else 0
    multiple = len(multi) * len(temps) * args.repeats * len(batch_contenders)
    progress = Progress(len(contenders) + single + multiple)

    # warm-up: every contender once, a few tokens (first calls pay one-off costs); ours' long
    # enough for the cost check's verdict, which fills its cost memory
    first = encoded[prompts[0]["name"]]
    for c in contenders.values():
        result = c.run([first], temps[0], 0, min(16 if c.library == "ours" else 4, n))
        progress.report("warm-up", c.name, result, temps[0])

    def measure(label, kind, batch, chosen, batch_prompts, temp, seed, rotation) -> list[Row]:
        cells: dict[str, Cell] = {}
        round_robin(
            chosen, batch_prompts, temp, seed, n, args.repeats, rotation, cells, progress, label
        )
        return rows_for(
            label, kind, temp, batch, contenders, cells, models.c_probe, models.target_cost
        )

    rows: list[Row] = []
    if 1 in args.batches:
        for i, p in enumerate(prompts):
            for j, temp in enumerate(temps):
                seed = 1000 * (i + 1) + 100 * j
                rows += measure(
                    p["name"],
                    p["kind"],
                    1,
                    list(contenders.values()),
                    [encoded[p["name"]]],
                    temp,
                    seed,
                    i + j,
                )
    for batch in multi:
        batch_prompts = [encoded[prompts[b % len(prompts)]["name"]] for b in range(batch)]
        for j, temp in enumerate(temps):
            seed = 100_000 * batch + 100 * j
            rows += measure(
                f"batch {batch}", "-", batch, batch_contenders, batch_prompts, temp, seed, j
            )
    return rows


def main() -> None:
    args = parse_args()
    draft_tag = " (int8 draft)" if args.draft_quantize == "int8" else ""
    names = Names.for_run(draft_tag, args.k, args.ngram_k)
    all_prompts = load_prompts(args.prompts_file)
    prompts = select_prompts(args, all_prompts)
    started = datetime.datetime.now().astimezone()
    load_start = load_average()
    machine = cpu_info()
    print(f"machine: {machine}; load {load_start}", file=sys.stderr, flush=True)

    torch.set_grad_enabled(False)
    with torch.inference_mode():
        models = load_and_probe(args, all_prompts)
        pair = models.pair
        encoded = {p["name"]: encode_prompt(pair.tokenizer, p["prompt"]) for p in prompts}
        drafts = [pair.draft] + ([models.int8_draft] if models.int8_draft is not None else [])
        counters = {"target": Counter(pair.target), "draft": Counter(*drafts)}
        contenders = make_contenders(
            pair, models.target_lm, models.draft_lm, args, counters, names, models.int8_draft
        )
        if args.goal_contenders:
            wanted = (OURS_TO, names.adaptive, HF_TO, HF_ASSISTED_INT8)
            contenders = {name: contenders[name] for name in wanted}
        rows = run_all(args, prompts, encoded, models, contenders, names)

    record = Record(
        args=args,
        prompts=prompts,
        machine=machine,
        started=started,
        load_start=load_start,
        load_seconds=pair.stats.seconds,
        bf16_cost=models.bf16_cost,
        target_cost=models.target_cost,
        draft_cost=models.draft_cost,
        c_probe=models.c_probe,
        contenders=contenders,
        names=names,
        rows=rows,
    )
    text, goal_lines = markdown(record)
    print(text)
    if not args.no_write:
        OUT_MD.write_text(text)
        OUT_JSON.write_text(json.dumps(json_record(record, goal_lines), indent=1))
        print(f"wrote {OUT_MD} and {OUT_JSON}", file=sys.stderr)


if __name__ == "__main__":
    main()
