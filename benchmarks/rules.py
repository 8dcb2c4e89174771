"""Verification rules side by side on the embedded default pair (Qwen2.5-Coder 1.5B target, 0.5B
draft), CPU, float32, one run: target-only, token-level and block verification of one chain,
multi-draft (m = 2 and 4 chains) and a token tree, at temperatures 0.7 and 1.0 (and greedy where
the rule makes a difference), over the decoding benchmark's prompts plus a held-in set of our own
(rules_prompts.json). Contenders run interleaved per prompt, in an order rotated per prompt, with
the same seed.

Reports per setting: emitted tokens per target pass, alpha, the cost of one target pass and of
the drafting per step, tokens/s and the speedup over target-only (pooled over prompts), and what
the measured tokens per pass would give where a pass costs the same for 1 or 17 tokens (a GPU
that is launch-bound): tokens per pass / (draft passes per step * c + 1), c measured at 1 token.

Writes benchmarks/rules.md (+ rules.json). Run: .venv/bin/python benchmarks/rules.py
(about 40 minutes on 2 cores; --quick: 1 prompt, 8 tokens; --no-write: print only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specsample.adapters.default_pair import load_default_pair_with_stats
from specsample.adapters.hf import HFCausalLM
from specsample.analysis.theory import step_speedup
from specsample.drafters.model import ModelDrafter
from specsample.drafters.tree import TreeDrafter, TreeShape
from specsample.engine import generate
from specsample.engine.stats import DecodeStats
from specsample.engine.text import encode_prompt
from specsample.warpers import SamplingConfig

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_info, load_average, pooled, probe_context, probe_costs  # noqa: E402

HERE = Path(__file__).parent
OUT_MD = HERE / "rules.md"
OUT_JSON = HERE / "rules.json"
K = 4


@dataclass
class Setting:
    name: str
    make_drafter: Callable[[HFCausalLM], object] | None
    rule: str = "token"
    greedy_too: bool = True  # run at temperature 0 as well (block = token there)


def settings(k: int) -> list[Setting]:
    def tree(shape: TreeShape) -> Callable[[HFCausalLM], object]:
        return lambda draft: TreeDrafter(draft, shape)

    return [
        Setting("target-only", None),
        Setting(f"token, k={k}", lambda draft: ModelDrafter(draft)),
        Setting(f"block, k={k}", lambda draft: ModelDrafter(draft), "block", greedy_too=False),
        Setting(f"multi-draft m=2, k={k}", tree(TreeShape.chains(2, k))),
        Setting(f"multi-draft m=4, k={k}", tree(TreeShape.chains(4, k))),
        Setting("tree 2,2,1,1", tree(TreeShape((2, 2, 1, 1)))),
    ]


@dataclass
class Run:
    seconds: float
    new_tokens: int
    stats: DecodeStats


@dataclass
class Cell:
    runs: dict[str, list[Run]] = field(default_factory=dict)  # setting -> one run per prompt


def run_once(setting, target_lm, draft_lm, prompt, temperature, seed, n) -> Run:
    drafter = None if setting.make_drafter is None else setting.make_drafter(draft_lm)
    start = time.perf_counter()
    out = generate(
        target_lm,
        [prompt],
        generator=torch.Generator().manual_seed(seed),
        drafter=drafter,
        sampling=SamplingConfig(temperature=temperature),
        max_new_tokens=n,
        draft_length=K if drafter is not None else 0,
        rule=setting.rule,
    )
    return Run(time.perf_counter() - start, len(out.tokens[0]), out.stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not write the md/json")
    args = parser.parse_args()
    prompts = json.loads((HERE / "prompts.json").read_text())
    own = json.loads((HERE / "rules_prompts.json").read_text())
    prompts += [dict(p, held_in=True) for p in own]
    n = args.new_tokens
    if args.quick:
        prompts, n = prompts[:1], 8
    temperatures = [0.7, 1.0, 0.0]
    started = datetime.datetime.now().astimezone()
    machine = cpu_info()
    load_start = load_average()
    torch.set_grad_enabled(False)
    pair = load_default_pair_with_stats(torch.bfloat16)
    pair.target.to(torch.float32)  # exact upcast of the cached bf16 weights
    pair.draft.to(torch.float32)
    target_lm, draft_lm = HFCausalLM(pair.target), HFCausalLM(pair.draft)
    tokenizer = pair.tokenizer
    encoded = {p["name"]: encode_prompt(tokenizer, p["prompt"]) for p in prompts}
    context = probe_context(tokenizer, prompts)
    target_cost = probe_costs(target_lm, context, [1, 2, 5, 9, 14, 17], 3)
    draft_cost = probe_costs(draft_lm, context, [1, 2, 4], 3)
    c1 = draft_cost[1] / target_cost[1]
    print(
        "target pass ms by tokens: "
        + ", ".join(f"{k}: {v * 1e3:.0f}" for k, v in target_cost.items())
        + "; draft: "
        + ", ".join(f"{k}: {v * 1e3:.0f}" for k, v in draft_cost.items())
        + f"; c = {c1:.3f}",
        file=sys.stderr,
        flush=True,
    )
    all_settings = settings(K)
    for s in all_settings:  # warm-up: first calls pay one-off costs
        run_once(s, target_lm, draft_lm, encoded[prompts[0]["name"]], 0.7, 0, 3)
    cells = {t: Cell() for t in temperatures}
    for i, p in enumerate(prompts):
        for t in temperatures:
            chosen = [s for s in all_settings if t > 0 or s.greedy_too]
            shift = i % len(chosen)
            for s in chosen[shift:] + chosen[:shift]:
                run = run_once(s, target_lm, draft_lm, encoded[p["name"]], t, 1000 + i, n)
                cells[t].runs.setdefault(s.name, []).append(run)
                print(
                    f"{p['name']:15s} T={t} {s.name:24s} {run.new_tokens / run.seconds:6.2f} tok/s "
                    f"{run.stats.tokens_per_pass:5.2f} tok/pass",
                    file=sys.stderr,
                    flush=True,
                )
    lines, record = report(
        cells, prompts, all_settings, target_cost, draft_cost, c1, machine, started, load_start, n
    )
    print("\n".join(lines))
    if not args.no_write:
        OUT_MD.write_text("\n".join(lines) + "\n")
        OUT_JSON.write_text(json.dumps(record, indent=2))


def summarise(runs: list[Run], baseline: list[Run], c1: float, target_1: float) -> dict:
    stats = pooled([r.stats for r in runs])
    seconds = sum(r.seconds for r in runs)
    tokens = sum(r.new_tokens for r in runs)
    base_rate = sum(r.new_tokens for r in baseline) / sum(r.seconds for r in baseline)
    per_prompt = [
        (r.new_tokens / r.seconds) / (b.new_tokens / b.seconds)
        for r, b in zip(runs, baseline, strict=True)
    ]
    draft_per_step = stats.draft_passes / stats.target_passes if stats.target_passes else 0.0
    flat = step_speedup(stats.tokens_per_pass, draft_per_step, c1)
    return {
        "tokens_per_pass": stats.tokens_per_pass,
        "alpha": stats.alpha,
        "acceptance_by_position": stats.acceptance_by_position,
        "target_pass_ms": 1e3 * stats.target_seconds / stats.target_passes,
        "draft_ms_per_step": 1e3 * stats.draft_seconds / stats.target_passes,
        "tokens_per_second": tokens / seconds,
        "speedup": (tokens / seconds) / base_rate,
        "median_prompt_speedup": statistics.median(per_prompt),
        "flat_cost_speedup": flat if stats.drafted else 1.0,
        "target_passes": stats.target_passes,
        "new_tokens": tokens,
    }


def report(cells, prompts, all_settings, target_cost, draft_cost, c1, machine, started, load, n):
    """The markdown lines of the report and the JSON record."""
    lines = [
        "# Verification rules on the default pair (CPU)",
        "",
        f"Run {started:%Y-%m-%d %H:%M %Z}; {machine['cpu']}, {machine['logical_cores']} logical "
        f"cores, torch {torch.__version__} ({machine['torch_threads']} threads), float32; load "
        f"average at start {load}, at end {load_average()}. {len(prompts)} prompts "
        f"({sum(1 for p in prompts if p.get('held_in'))} held-in: rules_prompts.json), {n} new "
        "tokens each, one run, settings interleaved per prompt, same seed per prompt.",
        "",
        "Costs probed at a 100-token context (median of 3): target pass "
        + ", ".join(f"{k} tok {v * 1e3:.0f} ms" for k, v in target_cost.items())
        + "; draft pass "
        + ", ".join(f"{k} tok {v * 1e3:.0f} ms" for k, v in draft_cost.items())
        + f"; c = {c1:.3f}.",
        "",
        "tokens/pass: emitted tokens per target pass (pooled over prompts). speedup: pooled "
        "tokens/s over target-only's; median: median of per-prompt ratios. flat-cost: what the "
        "measured tokens/pass gives if a target pass cost the same for any number of tokens and "
        "each draft pass cost c of a target pass (a launch-bound GPU).",
        "",
    ]
    results: dict[str, dict[str, dict]] = {}
    for t, cell in cells.items():
        label = "greedy" if t == 0 else f"temperature {t}"
        baseline = cell.runs["target-only"]
        lines += [
            f"## {label}",
            "",
            "| setting | tokens/pass | alpha | target pass ms | draft ms/step | tokens/s | speedup "
            "| median | flat-cost speedup |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        results[label] = {}
        for s in all_settings:
            if s.name not in cell.runs:
                continue
            r = summarise(cell.runs[s.name], baseline, c1, target_cost[1])
            results[label][s.name] = r
            lines.append(
                f"| {s.name} | {r['tokens_per_pass']:.2f} | {r['alpha']:.3f} | "
                f"{r['target_pass_ms']:.0f} | {r['draft_ms_per_step']:.0f} | "
                f"{r['tokens_per_second']:.2f} | {r['speedup']:.2f} | "
                f"{r['median_prompt_speedup']:.2f} | {r['flat_cost_speedup']:.2f} |"
            )
        lines += ["", "Tokens per target pass by prompt kind:", ""]
        kinds = sorted({p["kind"] for p in prompts})
        lines += ["| setting | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for s in all_settings:
            if s.name not in cell.runs or s.make_drafter is None:
                continue
            values = []
            for kind in kinds:
                runs = [
                    r for r, p in zip(cell.runs[s.name], prompts, strict=True) if p["kind"] == kind
                ]
                values.append(f"{pooled([r.stats for r in runs]).tokens_per_pass:.2f}")
            lines.append(f"| {s.name} | " + " | ".join(values) + " |")
        lines.append("")
    record = {
        "machine": machine,
        "target_cost": target_cost,
        "draft_cost": draft_cost,
        "c": c1,
        "new_tokens": n,
        "results": results,
    }
    return lines, record


if __name__ == "__main__":
    main()
