"""The decode benchmark's report: the markdown page (decode_speed.md) and the raw record
(decode_speed.json) from one run's measurements.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from common import PROBE_CONTEXT, PROMPTS, load_average, sklearn_available
from decode_contenders import (
    ADAPTIVE_MAX_K,
    HF_ASSISTED_INT8,
    PROMPT_LOOKUP_TOKENS,
    Contender,
    Names,
)
from decode_rows import TABLE_HEAD, Row, goals, kind_summary, row_line
from specsample.drafters.model import (
    DEFAULT_CONFIDENCE,
    DEFAULT_GREEDY_SURVIVAL,
    DEFAULT_SURVIVAL,
)


@dataclass
class Record:
    """Everything one run measured, as the report reads it."""

    args: argparse.Namespace
    prompts: list[dict[str, Any]]
    machine: dict[str, Any]
    started: datetime.datetime
    load_start: str
    load_seconds: float  # loading the default pair
    bf16_cost: dict[int, float]
    target_cost: dict[int, float]
    draft_cost: dict[int, float]
    c_probe: float
    contenders: dict[str, Contender]
    names: Names
    rows: list[Row]
    # Built when the runs are over: the end time and load average default to that moment.
    finished: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now().astimezone()
    )
    load_end: str = field(default_factory=load_average)

    @property
    def n(self) -> int:
        return self.args.new_tokens

    @property
    def temps(self) -> list[float]:
        return self.args.temperatures

    @property
    def mismatched(self) -> list[str]:
        """The runs that did not generate exactly n new tokens in every row."""
        return [
            f"{r.label} T={r.temperature:g} {r.contender.name}"
            for r in self.rows
            for run in r.cell.runs
            if any(len(t) != self.n for t in run.tokens)
        ]


def assisted_defaults() -> dict[str, Any]:
    """transformers' default settings of assisted generation in the installed version."""
    defaults = transformers.GenerationConfig._get_default_generation_params()
    return {
        key: defaults.get(key)
        for key in (
            "num_assistant_tokens",
            "num_assistant_tokens_schedule",
            "assistant_confidence_threshold",
        )
    }


def machine_lines(rec: Record) -> list[str]:
    started, finished, machine = rec.started, rec.finished, rec.machine
    run_line = "`" + " ".join([".venv/bin/python benchmarks/decode_speed.py", *sys.argv[1:]]) + "`"
    return [
        "# Decode speed: specsample vs transformers (CPU, float32, default pair)",
        "",
        f"Run: {run_line}; {started:%Y-%m-%d %H:%M} to {finished:%H:%M} "
        f"({(finished - started).total_seconds() / 60:.0f} min).",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}; {machine['logical_cores']} logical cores visible; torch "
        f"threads {machine['torch_threads']}; bf16 CPU flags: "
        f"{', '.join(machine['bf16_flags']) or 'none (no avx512_bf16 / amx_bf16)'}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python "
        f"{platform.python_version()}",
        f"- date: {started.isoformat(timespec='seconds')}; load average (1, 5, 15 min) at start "
        f"{rec.load_start}, at end {rec.load_end}",
        f"- models: Qwen2.5-Coder-1.5B-Instruct (target) and 0.5B-Instruct (draft), the embedded "
        f"default pair (GGUF Q4_K_M dequantized, cached as bf16), loaded in "
        f"{rec.load_seconds:.1f} s",
        "",
    ]


def prompts_file(args: argparse.Namespace) -> str:
    """The prompts file as the repository names it (benchmarks/NAME.json), else its path."""
    path = Path(args.prompts_file).resolve()
    root = PROMPTS.resolve().parent.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def settings_lines(rec: Record) -> list[str]:
    args, n, temps, prompts = rec.args, rec.n, rec.temps, rec.prompts
    mismatched, contenders = rec.mismatched, rec.contenders
    bf16_cost, target_cost = rec.bf16_cost, rec.target_cost
    assist, sk = assisted_defaults(), sklearn_available()
    return [
        "## Settings",
        "",
        f"- prompts: {', '.join(p['name'] for p in prompts)} ({prompts_file(args)}), each "
        "through the chat template (one user turn, generation prompt)",
        f"- {n} new tokens per row; EOS stopping is off for every contender (ours: "
        "`eos_token_ids=()`; transformers: `eos_token_id=None`, `pad_token_id` set), so each "
        f"generates exactly {n} tokens"
        + ("" if not mismatched else f" (NOT SO for: {', '.join(sorted(set(mismatched)))})")
        + "; times are comparable token for token.",
        f"- temperatures: {', '.join(f'{t:g}' for t in temps)}; 0 = greedy (transformers "
        "`do_sample=False`); otherwise temperature only (ours `SamplingConfig(temperature=T)`, "
        "transformers `do_sample=True, temperature=T, top_k=0, top_p=1.0`, since its default "
        "top_k is 50). Ours gets a fresh `torch.Generator` seeded per run; transformers "
        "`torch.manual_seed` with the same seed.",
        f"- batch 1 contenders: {'; '.join(contenders)}. Ours: `specsample.engine.generate` "
        f"with `ModelDrafter(draft, confidence={DEFAULT_CONFIDENCE}, survival={DEFAULT_SURVIVAL}, "
        f"greedy_survival={DEFAULT_GREEDY_SURVIVAL})` "
        "(the command line's "
        f"default draft-side stop) and `AdaptiveDraftLength({ADAPTIVE_MAX_K})`, "
        + ("" if args.no_fixed else f"or `ModelDrafter(draft)` with fixed k={args.k}, ")
        + f"or `NgramDrafter()` (max n-gram 3, latest match) with "
        f"`AdaptiveDraftLength({args.ngram_k})`. "
        + (
            "Ours' adaptive policies without a cost memory (each run checks the costs anew). "
            if getattr(args, "no_cost_memory", True)
            else "Ours' adaptive policies recall a cost memory (engine.memory) that their "
            "16-token warm-up run filled, as a setting's first run fills it for the command "
            "line; the 'first run (no cost memory)' contender checks the costs anew every run. "
        )
        + "Transformers: `target.generate(...)`; assisted generation with "
        "`assistant_model=draft` at its defaults in this version "
        f"({', '.join(f'{k}={v}' for k, v in assist.items())}; scikit-learn "
        f"{'installed, so the threshold adapts' if sk else 'absent, so the threshold is fixed'})"
        + (
            f", and with num_assistant_tokens={args.hf_assist_k} (constant schedule, set on the "
            "assistant's generation_config, where transformers reads it)"
            if args.hf_assist_k
            else ""
        )
        + f"; prompt lookup with `prompt_lookup_num_tokens={PROMPT_LOOKUP_TOKENS}` (max n-gram "
        "2, earliest match).",
        f"- batches: {', '.join(map(str, args.batches))}. Batch > 1: prompts cycled to fill the "
        "batch; ours target-only, ours model drafter (adaptive) and transformers target-only "
        "(left padding, attention mask). transformers' assisted generation and prompt lookup "
        "handle batch 1 only.",
        f"- repeats: {args.repeats} per cell, median wall time; ours' statistics pooled over "
        "repeats. Contenders are interleaved round robin per prompt and temperature (order "
        "rotated per prompt and repeat) so drift hits all alike; every contender ran once with "
        f"{min(4, n)} tokens as warm-up first. Wall time is the whole call, prefill included, "
        "under `torch.inference_mode()`.",
        *(
            [
                "- int8 draft (`--draft-quantize int8`): our model drafter drafts with the 0.5B "
                "draft whose linear layers are dynamically quantised to int8 "
                "(`specsample.adapters.quantize`; per-channel weights). Exact: the drafts are "
                "verified against that model's own probabilities. transformers' assisted "
                f"generation runs with it as well ({HF_ASSISTED_INT8}) next to its float32 default."
            ]
            if args.draft_quantize == "int8"
            else []
        ),
        "- float32 compute: the cached bf16 weights are upcast with `model.to(torch.float32)` "
        "(exact). On this CPU without native bf16 instructions a multi-token bf16 pass is "
        f"slow: target bf16 1 token {bf16_cost[1] * 1e3:.0f} ms, {args.k + 1} tokens "
        f"{bf16_cost[args.k + 1] * 1e3:.0f} ms ({bf16_cost[args.k + 1] / bf16_cost[1]:.2f}x) vs "
        f"float32 {target_cost[1] * 1e3:.0f} ms and {target_cost[args.k + 1] * 1e3:.0f} ms "
        f"({target_cost[args.k + 1] / target_cost[1]:.2f}x) (probe below). Verifying k drafts "
        "in one pass is what speculative decoding relies on, so bf16 would measure the CPU's "
        "bf16 GEMM rather than the decoding methods; both libraries run the same float32 models.",
        "",
    ]


def probe_lines(rec: Record) -> list[str]:
    args, bf16_cost, target_cost = rec.args, rec.bf16_cost, rec.target_cost
    draft_cost, c_probe = rec.draft_cost, rec.c_probe
    return [
        "## Cost probe (float32, batch 1)",
        "",
        f"Median of {args.probe_repeats} `extend` calls (after one warm-up) at a "
        f"{PROBE_CONTEXT}-token context, via the adapter both ours' target and drafter use.",
        "",
        "| model | tokens per pass | median ms | relative to 1 token |",
        "|---|---:|---:|---:|",
        *(
            f"| target | {m} | {s * 1e3:.0f} | {s / target_cost[1]:.2f} |"
            for m, s in target_cost.items()
        ),
        f"| draft | 1 | {draft_cost[1] * 1e3:.0f} | c = {c_probe:.3f} of a target 1-token pass |",
        *(
            f"| target bf16 | {m} | {s * 1e3:.0f} | {s / bf16_cost[1]:.2f} |"
            for m, s in bf16_cost.items()
        ),
        "",
    ]


def column_lines(c_probe: float) -> list[str]:
    return [
        "## Columns",
        "",
        "s: median wall seconds of the run; tok/s: new tokens (all rows) per second; x own TO: "
        "speedup over the same library's target-only on the same prompt and temperature; x best "
        "TO: over the faster of the two target-only runs; target fwd / draft fwd: forward calls "
        "of each model per run, prefill included, counted by a forward pre-hook for both "
        "libraries (both draw the first new token from the prompt pass, so target-only makes N "
        "target calls for N tokens; ours then feeds its first drafts alone, where transformers' "
        "assisted generation and prompt lookup verify them in the prefill call); "
        "alpha: acceptance rate per keep test; tok/pass: new tokens per row per target pass "
        "after the prefill (ours' DecodeStats); mean k: drafted tokens per row per pass; empty: "
        "share of drafting passes with nothing accepted; c: draft pass / target pass as ours "
        "measures it during the run (DecodeStats.cost_ratio); pred (stats): "
        "`DecodeStats.predicted_speedup()` (run's own measured costs; '-' when the run timed no "
        "1-token target pass); pred (theory): (1 - alpha^(k+1)) / (1 - alpha) averaged over the "
        "draft lengths k the rows used, over the step cost with the probe's costs (draft passes "
        f"per step times c = {c_probe:.3f} for the model drafter, 0 for n-gram; plus v(k) = "
        "(k+1)-token / 1-token pass, averaged alike); real/pred: x own TO over the prediction "
        "to its left; acceptance by position: "
        "share of drafts kept at position 1, 2, ... among those tested; greedy = ours TO: the "
        "tokens equal ours target-only's (T = 0; float32 rounding in multi-token passes can "
        "flip a near tie).",
        "",
    ]


def table_lines(rec: Record) -> list[str]:
    rows, temps = rec.rows, rec.temps
    lines: list[str] = []
    for temp in temps:
        mine = [r for r in rows if r.batch == 1 and r.temperature == temp]
        if not mine:
            continue
        lines += [f"## Batch 1, T = {temp:g}", "", *(h.format(first="prompt") for h in TABLE_HEAD)]
        lines += [row_line(r, f"{r.label} ({r.kind})") for r in mine]
        lines.append("")
    batch_rows = [r for r in rows if r.batch > 1]
    if batch_rows:
        lines += [
            "## Batch > 1",
            "",
            "x own TO / x best TO compare total tokens per second at the same batch size.",
            "",
            *(h.format(first="batch, T") for h in TABLE_HEAD),
        ]
        lines += [row_line(r, f"{r.batch}, {r.temperature:g}") for r in batch_rows]
        lines.append("")
    if any(r.batch == 1 for r in rows):
        lines += ["## Per prompt kind (batch 1, means over prompts)", ""]
        lines += kind_summary(rows, temps)
        lines.append("")
    return lines


def goal_section(rec: Record, goal_lines: list[str]) -> list[str]:
    lines = [
        "## Goals",
        "",
        "- (a) ours' speedup >= the best of transformers' settings of the same drafter family in "
        "every cell (prompt x temperature): model drafter vs assisted generation, n-gram vs "
        "prompt lookup; a cell counts as met only when ours is ahead both in speedup over its "
        "own target-only and in wall time (speedup over the best target-only).",
        "- (b) never more than 5% slower than target-only on any prompt (batch 1).",
        "- (c) realised speedup >= 90% of the predicted one.",
        "",
        *(f"- {g}" for g in goal_lines),
        "",
    ]
    if rec.mismatched:
        warning = f"Warning: runs without exactly {rec.n} new tokens: {sorted(set(rec.mismatched))}"
        lines += [warning, ""]
    return lines


def markdown(rec: Record) -> tuple[str, list[str]]:
    """The report page and its goal lines."""
    goal_lines = goals(rec.rows, rec.names)
    lines = machine_lines(rec) + settings_lines(rec) + probe_lines(rec)
    lines += column_lines(rec.c_probe) + table_lines(rec) + goal_section(rec, goal_lines)
    return "\n".join(lines), goal_lines


def json_record(rec: Record, goal_lines: list[str]) -> dict[str, Any]:
    args, machine, started, finished = rec.args, rec.machine, rec.started, rec.finished
    n, temps, prompts = rec.n, rec.temps, rec.prompts
    load_start, load_end = rec.load_start, rec.load_end
    target_cost, draft_cost, bf16_cost, c_probe = (
        rec.target_cost,
        rec.draft_cost,
        rec.bf16_cost,
        rec.c_probe,
    )
    assist, sk, rows = assisted_defaults(), sklearn_available(), rec.rows
    return {
        "machine": machine,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "load_average": {"start": load_start, "end": load_end},
        "settings": {
            "argv": sys.argv[1:],
            "new_tokens": n,
            "temperatures": temps,
            "k": args.k,
            "ngram_k": args.ngram_k,
            "adaptive_max_k": ADAPTIVE_MAX_K,
            "hf_assist_k": args.hf_assist_k,
            "hf_assisted_defaults": assist,
            "sklearn": sk,
            "prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS,
            "batches": args.batches,
            "repeats": args.repeats,
            "prompts": [p["name"] for p in prompts],
            "prompts_file": prompts_file(args),
        },
        "probe": {
            "context": PROBE_CONTEXT,
            "repeats": args.probe_repeats,
            "target_float32_seconds": target_cost,
            "draft_float32_seconds": draft_cost,
            "target_bf16_seconds": bf16_cost,
            "c": c_probe,
        },
        "goals": goal_lines,
        "rows": [r.as_json() for r in rows],
    }
