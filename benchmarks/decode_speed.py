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
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from specsample.adapters.default_pair import load_default_pair_with_stats
from specsample.adapters.hf import HFCausalLM
from specsample.adapters.quantize import quantize_draft
from specsample.engine.loop import generate
from specsample.engine.stats import DecodeStats
from specsample.engine.text import encode_prompt
from specsample.engine.length import AdaptiveDraftLength
from specsample.drafters.model import DEFAULT_CONFIDENCE, ModelDrafter
from specsample.drafters.ngram import NgramDrafter
from specsample.warpers import SamplingConfig

HERE = Path(__file__).parent
PROMPTS = HERE / "prompts.json"
OUT_MD = HERE / "decode_speed.md"
OUT_JSON = HERE / "decode_speed.json"
ADAPTIVE_MAX_K = 16
PROMPT_LOOKUP_TOKENS = 10
PROBE_CONTEXT = 100  # tokens in the cache when the cost probe times a pass
KINDS = ("code-write", "code-edit", "prose")

# contender names
OURS_TO = "ours target-only"
ADAPTIVE_TAG = f"adaptive (max {ADAPTIVE_MAX_K}, confidence {DEFAULT_CONFIDENCE})"
OURS_ADAPTIVE = f"ours model drafter, {ADAPTIVE_TAG}"
HF_ASSISTED_INT8 = "transformers assisted (defaults, int8 draft)"
HF_TO = "transformers target-only"
HF_ASSISTED = "transformers assisted (defaults)"
HF_LOOKUP = f"transformers prompt lookup ({PROMPT_LOOKUP_TOKENS})"


DRAFT_TAG = ""  # " (int8 draft)" with --draft-quantize int8


def ours_fixed(k: int) -> str:
    return f"ours model drafter{DRAFT_TAG}, fixed k={k}"


def ours_ngram(k: int) -> str:
    return f"ours n-gram, adaptive (max {k})"


def hf_assisted_k(k: int) -> str:
    return f"transformers assisted (k={k})"


@dataclass
class Contender:
    name: str
    library: str  # "ours" or "transformers"
    family: str  # "target-only", "model" or "ngram"
    draft_k: int | None  # fixed draft length (theory prediction), None when adaptive / none
    run: Callable[[list[list[int]], float, int, int], RunResult]


@dataclass
class RunResult:
    seconds: float
    tokens: list[list[int]]
    stats: DecodeStats | None  # ours only
    target_forwards: int  # forward calls of the target model (prefill included)
    draft_forwards: int


@dataclass
class Cell:
    """Every repeat of one contender on one prompt (or batch) at one temperature."""

    runs: list[RunResult] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.runs[0].tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds

    @property
    def stats(self) -> DecodeStats | None:
        stats = [r.stats for r in self.runs if r.stats is not None]
        return pooled(stats) if stats else None

    @property
    def target_forwards(self) -> float:
        """Forward calls of the target per run (mean over repeats), the prefill included."""
        return statistics.mean(r.target_forwards for r in self.runs)

    @property
    def draft_forwards(self) -> float:
        return statistics.mean(r.draft_forwards for r in self.runs)


def pooled(stats: Sequence[DecodeStats]) -> DecodeStats:
    """Counters and seconds summed over runs (so alpha etc. are pooled, not averaged)."""
    out = DecodeStats()
    for f in dataclasses.fields(DecodeStats):
        if f.name == "target_single_pass_seconds":
            known = [s.target_single_pass_seconds for s in stats if s.target_single_pass_seconds]
            out.target_single_pass_seconds = statistics.mean(known) if known else None
            continue
        values = [getattr(s, f.name) for s in stats]
        if isinstance(values[0], dict):
            merged: dict = {}
            for value in values:
                for key, count in value.items():
                    merged[key] = merged.get(key, 0) + count
            setattr(out, f.name, merged)
        elif isinstance(values[0], list):
            width = max(len(v) for v in values)
            setattr(out, f.name, [sum(v[i] for v in values if i < len(v)) for i in range(width)])
        else:
            setattr(out, f.name, sum(values))
    return out


# ---------------------------------------------------------------------------------- machine


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_flags": sorted(f for f in flags if "bf16" in f),
    }


def load_average() -> str:
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def sklearn_available() -> bool:
    try:
        from transformers.utils import is_sklearn_available

        return bool(is_sklearn_available())
    except ImportError:
        return False


# ---------------------------------------------------------------------------------- probes


def probe_costs(lm: HFCausalLM, context: list[int], sizes: Sequence[int], repeats: int):
    """Median seconds of one `extend` of n tokens at a PROBE_CONTEXT-token context, per n (one
    untimed warm-up each; the cache is truncated back after every pass)."""
    lm.prefill([context])
    base = lm.lengths
    out = {}
    for n in sizes:
        tokens = torch.tensor([context[:n]], dtype=torch.int64)
        valid = torch.tensor([n], dtype=torch.int64)
        times = []
        for rep in range(repeats + 1):
            start = time.perf_counter()
            lm.extend(tokens, valid)
            seconds = time.perf_counter() - start
            lm.truncate(base)
            if rep:
                times.append(seconds)
        out[n] = statistics.median(times)
    return out


def theory_prediction(stats: DecodeStats, c: float, target_cost: dict[int, float]) -> float | None:
    """Leviathan et al.'s speedup from the run's alpha, averaged over the draft lengths the rows
    used, with costs from the probe: c = draft pass / target 1-token pass, v(k) = target
    (k+1)-token pass / 1-token pass (nearest probed length), draft passes per step as measured."""
    steps = sum(stats.draft_lengths.values())
    if steps == 0 or stats.target_passes == 0:
        return None
    single = target_cost[1]

    def verify(k: int) -> float:
        return target_cost[min(target_cost, key=lambda n: abs(n - (k + 1)))] / single

    cost = sum(n * verify(k) for k, n in stats.draft_lengths.items()) / steps
    cost += (stats.draft_passes / stats.target_passes) * c
    return stats.theory_tokens_per_pass() / cost


# ---------------------------------------------------------------------------------- contenders


class Counter:
    """Counts forward calls of modules (a pre-hook: adds nothing measurable)."""

    def __init__(self, *modules: torch.nn.Module):
        self.calls = 0
        for module in modules:
            module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1


def make_contenders(
    pair, target_lm, draft_lm, args, counters, int8_draft=None
) -> dict[str, Contender]:
    target_model, draft_model = pair.target, pair.draft
    pad_id = pair.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = 0
    draft_config = copy.deepcopy(draft_model.generation_config)

    def ours(drafter_factory, length_factory):
        def run(prompts, temperature, seed, n):
            drafter = drafter_factory()
            generator = torch.Generator().manual_seed(seed)
            for c in counters.values():
                c.calls = 0
            start = time.perf_counter()
            out = generate(
                target_lm,
                prompts,
                generator=generator,
                drafter=drafter,
                sampling=SamplingConfig(temperature=temperature),
                max_new_tokens=n,
                draft_length=length_factory(),
                eos_token_ids=(),
            )
            seconds = time.perf_counter() - start
            return RunResult(
                seconds,
                out.tokens,
                out.stats,
                counters["target"].calls,
                counters["draft"].calls,
            )

        return run

    def hf(extra: dict[str, Any], assist_k: int | None = None):
        def run(prompts, temperature, seed, n):
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
            mask = torch.zeros(len(prompts), width, dtype=torch.int64)
            for b, p in enumerate(prompts):  # left padding
                ids[b, width - len(p) :] = torch.tensor(p)
                mask[b, width - len(p) :] = 1
            kwargs: dict[str, Any] = {
                "max_new_tokens": n,
                "eos_token_id": None,  # no EOS stop: exactly n new tokens, as ours
                "pad_token_id": pad_id,
                "do_sample": temperature > 0,
            }
            if temperature > 0:  # the same warping as ours: temperature only
                kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
            # assisted generation reads its settings from the assistant's own generation config
            draft_model.generation_config = copy.deepcopy(draft_config)
            if assist_k is not None:
                draft_model.generation_config.num_assistant_tokens = assist_k
                draft_model.generation_config.num_assistant_tokens_schedule = "constant"
            for c in counters.values():
                c.calls = 0
            torch.manual_seed(seed)
            start = time.perf_counter()
            out = target_model.generate(input_ids=ids, attention_mask=mask, **kwargs, **extra)
            seconds = time.perf_counter() - start
            tokens = out[:, width:].tolist()
            return RunResult(
                seconds, tokens, None, counters["target"].calls, counters["draft"].calls
            )

        return run

    def adaptive():
        return AdaptiveDraftLength(ADAPTIVE_MAX_K)

    def model_drafter():  # fixed k: drafts all k tokens
        return ModelDrafter(draft_lm)

    def confident_drafter():  # adaptive: the command line's default draft-side stop
        return ModelDrafter(draft_lm, confidence=DEFAULT_CONFIDENCE)

    out = [
        Contender(OURS_TO, "ours", "target-only", None, ours(lambda: None, lambda: 0)),
        Contender(OURS_ADAPTIVE, "ours", "model", None, ours(confident_drafter, adaptive)),
    ]
    if not args.no_fixed:
        out.append(
            Contender(
                ours_fixed(args.k), "ours", "model", args.k, ours(model_drafter, lambda: args.k)
            )
        )
    out += [
        Contender(
            ours_ngram(args.ngram_k),
            "ours",
            "ngram",
            args.ngram_k,
            ours(NgramDrafter, lambda: AdaptiveDraftLength(args.ngram_k)),
        ),
        Contender(HF_TO, "transformers", "target-only", None, hf({})),
        Contender(HF_ASSISTED, "transformers", "model", None, hf({"assistant_model": draft_model})),
    ]
    if int8_draft is not None:  # the same cheaper draft for transformers, for a fair comparison
        int8_draft.generation_config = copy.deepcopy(draft_config)
        out.append(
            Contender(
                HF_ASSISTED_INT8, "transformers", "model", None, hf({"assistant_model": int8_draft})
            )
        )
    if args.hf_assist_k:
        out.append(
            Contender(
                hf_assisted_k(args.hf_assist_k),
                "transformers",
                "model",
                args.hf_assist_k,
                hf({"assistant_model": draft_model}, assist_k=args.hf_assist_k),
            )
        )
    out.append(
        Contender(
            HF_LOOKUP,
            "transformers",
            "ngram",
            None,
            hf({"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}),
        )
    )
    return {c.name: c for c in out}


# ---------------------------------------------------------------------------------- running


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def report(self, label: str, name: str, result: RunResult, temperature: float) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        n = sum(len(t) for t in result.tokens)
        extra = ""
        if result.stats is not None and result.stats.drafted:
            extra = f", alpha {result.stats.alpha:.2f}, {result.stats.tokens_per_pass:.2f} tok/pass"
        eta = elapsed / self.done * (self.total - self.done)
        print(
            f"[{self.done}/{self.total} {elapsed / 60:.1f} min, ~{eta / 60:.0f} min left] "
            f"{label} T={temperature:g} {name}: {n} tok in {result.seconds:.1f} s = "
            f"{n / result.seconds:.2f} tok/s{extra}",
            file=sys.stderr,
            flush=True,
        )


def round_robin(
    contenders: list[Contender],
    prompts: list[list[int]],
    temperature: float,
    seed: int,
    n: int,
    repeats: int,
    rotation: int,
    cells: dict[str, Cell],
    progress: Progress,
    label: str,
) -> None:
    """Each repeat runs every contender once, in an order rotated by one per repeat (and per
    prompt), so drift of the machine's speed affects all alike. All contenders of a repeat get
    the same seed."""
    for r in range(repeats):
        shift = (rotation + r) % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            result = c.run(prompts, temperature, seed + r, n)
            cells.setdefault(c.name, Cell()).runs.append(result)
            progress.report(label, c.name, result, temperature)


# ---------------------------------------------------------------------------------- report


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


@dataclass
class Row:
    """One contender's measures in one cell (prompt or batch, temperature)."""

    label: str
    kind: str
    temperature: float
    batch: int
    contender: Contender
    cell: Cell
    speedup_own: float | None = None
    speedup_best: float | None = None
    predicted_stats: float | None = None
    predicted_theory: float | None = None
    same_as_target_only: str = "-"

    def as_json(self) -> dict[str, Any]:
        s = self.cell.stats
        return {
            "label": self.label,
            "kind": self.kind,
            "temperature": self.temperature,
            "batch": self.batch,
            "contender": self.contender.name,
            "library": self.contender.library,
            "family": self.contender.family,
            "median_seconds": self.cell.seconds,
            "tokens_per_second": self.cell.tokens_per_second,
            "speedup_vs_own_target_only": self.speedup_own,
            "speedup_vs_best_target_only": self.speedup_best,
            "target_forwards": self.cell.target_forwards,
            "draft_forwards": self.cell.draft_forwards,
            "predicted_speedup_stats": self.predicted_stats,
            "predicted_speedup_theory_probe": self.predicted_theory,
            "greedy_tokens_equal_ours_target_only": self.same_as_target_only,
            "pooled_stats": None if s is None else s.summary(),
            "runs": [
                {
                    "seconds": r.seconds,
                    "target_forwards": r.target_forwards,
                    "draft_forwards": r.draft_forwards,
                    "stats": None if r.stats is None else r.stats.summary(),
                    "tokens": r.tokens,
                }
                for r in self.cell.runs
            ],
        }


def rows_for(
    label: str,
    kind: str,
    temperature: float,
    batch: int,
    contenders: dict[str, Contender],
    cells: dict[str, Cell],
    c_probe: float,
    target_cost: dict[int, float],
) -> list[Row]:
    own = {
        lib: cells[name].seconds
        for lib, name in (("ours", OURS_TO), ("transformers", HF_TO))
        if name in cells
    }
    best = min(own.values())
    reference = cells[OURS_TO].runs[0].tokens
    rows = []
    for name in [name for name in contenders if name in cells]:  # contender order
        c, cell = contenders[name], cells[name]
        row = Row(label, kind, temperature, batch, c, cell)
        row.speedup_own = ratio(own.get(c.library), cell.seconds)
        row.speedup_best = best / cell.seconds
        stats = cell.stats
        if stats is not None and c.family != "target-only":
            row.predicted_stats = stats.predicted_speedup()
            draft_c = c_probe if c.family == "model" else 0.0
            row.predicted_theory = theory_prediction(stats, draft_c, target_cost)
        if temperature == 0:
            tokens = cell.runs[0].tokens
            if tokens == reference:
                row.same_as_target_only = "yes"
            else:
                first = min(
                    next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), len(x))
                    for x, y in zip(tokens, reference, strict=True)
                )
                row.same_as_target_only = f"no (from token {first})"
        rows.append(row)
    return rows


def row_line(row: Row, first_col: str) -> str:
    s = row.cell.stats
    drafting = s is not None and row.contender.family != "target-only"
    acc = " ".join(f"{a:.2f}" for a in s.acceptance_by_position) if drafting else "-"
    realised = ratio(row.speedup_own, row.predicted_theory) if drafting else None
    realised_stats = ratio(row.speedup_own, row.predicted_stats) if drafting else None
    cost = s.cost_ratio if drafting else None
    return (
        f"| {first_col} | {row.contender.name} | {row.cell.seconds:.1f} | "
        f"{row.cell.tokens_per_second:.2f} | {fmt(row.speedup_own)} | {fmt(row.speedup_best)} | "
        f"{row.cell.target_forwards:.0f} | {row.cell.draft_forwards:.0f} | "
        f"{fmt(s.alpha) if drafting else '-'} | {fmt(s.tokens_per_pass) if drafting else '-'} | "
        f"{fmt(s.mean_draft_length) if drafting else '-'} | "
        f"{fmt(s.empty_share) if drafting else '-'} | {fmt(cost, 3)} | "
        f"{fmt(row.predicted_stats)} | {fmt(realised_stats)} | {fmt(row.predicted_theory)} | "
        f"{fmt(realised)} | {acc} | {row.same_as_target_only} |"
    )


TABLE_HEAD = [
    "| {first} | contender | s | tok/s | x own TO | x best TO | target fwd | draft fwd | alpha | "
    "tok/pass | mean k | "
    "empty | c | pred (stats) | real/pred | pred (theory) | real/pred | acceptance by position "
    "| greedy = ours TO |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
]


def goals(rows: list[Row], names: dict[str, str]) -> list[str]:
    single = [r for r in rows if r.batch == 1]
    cells: dict[tuple[str, float], dict[str, Row]] = {}
    for r in single:
        cells.setdefault((r.label, r.temperature), {})[r.contender.name] = r
    lines = []

    # (a) ours vs the best transformers setting of the same drafter family, every cell
    for family, ours_names, label in (
        ("model", [OURS_ADAPTIVE, names["fixed"]], "model drafter vs assisted generation"),
        ("ngram", [names["ngram"]], "n-gram vs prompt lookup"),
    ):
        for ours_name in ours_names:
            misses, worst, count = [], None, 0
            for (prompt, temp), by_name in cells.items():
                theirs = [
                    r
                    for r in by_name.values()
                    if r.contender.library == "transformers" and r.contender.family == family
                ]
                if ours_name not in by_name or not theirs:
                    continue
                count += 1
                ours_row = by_name[ours_name]
                best_own = max(r.speedup_own or 0 for r in theirs)
                best_wall = max(r.speedup_best or 0 for r in theirs)
                gap = min(
                    (ours_row.speedup_own or 0) / best_own, (ours_row.speedup_best or 0) / best_wall
                )
                if worst is None or gap < worst[0]:
                    worst = (gap, prompt, temp, ours_row, best_own, best_wall)
                if gap < 1:
                    misses.append(
                        f"{prompt} T={temp:g} ({fmt(ours_row.speedup_own)} vs "
                        f"{fmt(best_own)} own-TO speedup, {fmt(ours_row.speedup_best)} vs "
                        f"{fmt(best_wall)} best-TO speedup)"
                    )
            if worst is None:
                continue
            gap, prompt, temp, row, best_own, best_wall = worst
            verdict = "met" if not misses else "MISSED"
            text = (
                f"(a) {label}, {ours_name}: {verdict} (ahead in {count - len(misses)}/{count} "
                f"cells); "
                f"closest/worst cell {prompt} T={temp:g}: ours {fmt(row.speedup_own)}x own "
                f"target-only vs transformers' best {fmt(best_own)}x, and {fmt(row.speedup_best)}x "
                f"vs {fmt(best_wall)}x against the best target-only"
            )
            if misses:
                text += "; missed: " + "; ".join(misses)
            lines.append(text)

    # (b) never more than 5% slower than (ours) target-only, any prompt
    for name in (OURS_ADAPTIVE, names["fixed"], names["ngram"]):
        mine = [r for r in single if r.contender.name == name]
        if not mine:
            continue
        slow = [r for r in mine if (r.speedup_own or 0) < 0.95]
        worst = min(mine, key=lambda r: r.speedup_own or 0)
        text = (
            f"(b) {name} never < 0.95x ours target-only: {'met' if not slow else 'MISSED'}; "
            f"lowest {fmt(worst.speedup_own)}x ({worst.label} T={worst.temperature:g})"
        )
        if slow:
            text += "; below 0.95x: " + ", ".join(
                f"{r.label} T={r.temperature:g} {fmt(r.speedup_own)}x" for r in slow
            )
        lines.append(text)
    batched = [r for r in rows if r.batch > 1 and r.contender.name == OURS_ADAPTIVE]
    if batched:
        lines.append(
            "(b, batch > 1, for information) "
            + ", ".join(
                f"batch {r.batch} T={r.temperature:g} {fmt(r.speedup_own)}x" for r in batched
            )
        )

    # (c) realised >= 90% of predicted
    for name in (OURS_ADAPTIVE, names["fixed"], names["ngram"]):
        mine = [r for r in single if r.contender.name == name]
        for which, attr in (
            ("theory with probe costs", "predicted_theory"),
            ("DecodeStats.predicted_speedup", "predicted_stats"),
        ):
            pairs = [
                (r, r.speedup_own / getattr(r, attr))
                for r in mine
                if r.speedup_own and getattr(r, attr)
            ]
            if not pairs:
                continue
            low = [(r, q) for r, q in pairs if q < 0.9]
            worst_row, worst_q = min(pairs, key=lambda p: p[1])
            mean_q = statistics.mean(q for _, q in pairs)
            text = (
                f"(c) {name}, realised / predicted ({which}) >= 0.90: "
                f"{'met' if not low else 'MISSED'} ({len(pairs) - len(low)}/{len(pairs)} cells "
                "at >= 0.90); "
                f"mean {mean_q:.2f}, lowest {worst_q:.2f} ({worst_row.label} "
                f"T={worst_row.temperature:g})"
            )
            lines.append(text)
    return lines


def kind_summary(rows: list[Row], temperatures: list[float]) -> list[str]:
    lines = [
        "| kind | T | contender | prompts | mean tok/s | mean x own TO | mean x best TO |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    single = [r for r in rows if r.batch == 1]
    names = list(dict.fromkeys(r.contender.name for r in single))
    for kind in (*KINDS, "all"):
        for temp in temperatures:
            for name in names:
                mine = [
                    r
                    for r in single
                    if r.contender.name == name
                    and r.temperature == temp
                    and (kind == "all" or r.kind == kind)
                ]
                if not mine:
                    continue
                lines.append(
                    f"| {kind} | {temp:g} | {name} | {len(mine)} | "
                    f"{statistics.mean(r.cell.tokens_per_second for r in mine):.2f} | "
                    f"{fmt(statistics.mean(r.speedup_own or 0 for r in mine))} | "
                    f"{fmt(statistics.mean(r.speedup_best or 0 for r in mine))} |"
                )
    return lines


# ---------------------------------------------------------------------------------- main


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
    parser.add_argument("--prompts", default=None, help="NAME,... from benchmarks/prompts.json")
    parser.add_argument("--probe-repeats", type=int, default=None, help="default 5")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: first prompt, 8 new tokens, 1 repeat, batches 1,4, probe repeats 2",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write the md/json")
    parser.add_argument(
        "--draft-quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: our model drafter uses the int8-quantised draft (exact decoding still), and "
        "transformers' assisted generation runs with it too, next to its float32 default",
    )
    args = parser.parse_args()
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


def main() -> None:
    global OURS_ADAPTIVE, DRAFT_TAG
    args = parse_args()
    if args.draft_quantize == "int8":
        DRAFT_TAG = " (int8 draft)"
        OURS_ADAPTIVE = f"ours model drafter{DRAFT_TAG}, {ADAPTIVE_TAG}"
    all_prompts = json.loads(PROMPTS.read_text())
    if args.prompts:
        wanted = [p.strip() for p in args.prompts.split(",") if p.strip()]
        unknown = set(wanted) - {p["name"] for p in all_prompts}
        if unknown:
            sys.exit(
                f"--prompts: unknown {sorted(unknown)}; known {[p['name'] for p in all_prompts]}"
            )
        prompts = [p for p in all_prompts if p["name"] in wanted]
    else:
        prompts = all_prompts[:1] if args.quick else all_prompts
    n, temps = args.new_tokens, args.temperatures
    started = datetime.datetime.now().astimezone()
    load_start = load_average()
    machine = cpu_info()
    print(f"machine: {machine}; load {load_start}", file=sys.stderr, flush=True)

    torch.set_grad_enabled(False)
    with torch.inference_mode():
        pair = load_default_pair_with_stats(torch.bfloat16)
        tokenizer = pair.tokenizer
        encoded = {p["name"]: encode_prompt(tokenizer, p["prompt"]) for p in prompts}
        context = [t for p in all_prompts for t in encode_prompt(tokenizer, p["prompt"])]
        context = (context * (PROBE_CONTEXT // max(len(context), 1) + 1))[:PROBE_CONTEXT]

        # bf16 vs float32 costs on this CPU: why the benchmark computes in float32
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
        target_cost = probe_costs(
            target_lm, context, list(range(1, probe_k + 2)), args.probe_repeats
        )
        draft_cost = probe_costs(draft_lm, context, [1], args.probe_repeats)
        c_probe = draft_cost[1] / target_cost[1]
        print(
            f"target 1 tok {target_cost[1] * 1e3:.0f} ms, {args.k + 1} tok "
            f"{target_cost[args.k + 1] * 1e3:.0f} ms; draft 1 tok {draft_cost[1] * 1e3:.0f} ms; "
            f"c = {c_probe:.3f}; bf16 target 1 tok {bf16_cost[1] * 1e3:.0f} ms, {args.k + 1} tok "
            f"{bf16_cost[args.k + 1] * 1e3:.0f} ms",
            file=sys.stderr,
            flush=True,
        )

        drafts = [pair.draft] + ([int8_draft] if int8_draft is not None else [])
        counters = {"target": Counter(pair.target), "draft": Counter(*drafts)}
        contenders = make_contenders(pair, target_lm, draft_lm, args, counters, int8_draft)
        names = {"fixed": ours_fixed(args.k), "ngram": ours_ngram(args.ngram_k)}
        batch_contenders = [contenders[OURS_TO], contenders[OURS_ADAPTIVE], contenders[HF_TO]]
        multi = [b for b in args.batches if b > 1]
        total = (
            len(contenders)
            + (
                len(prompts) * len(temps) * args.repeats * len(contenders)
                if 1 in args.batches
                else 0
            )
            + len(multi) * len(temps) * args.repeats * len(batch_contenders)
        )
        progress = Progress(total)

        # warm-up: every contender once, a few tokens (first calls pay one-off costs)
        first = encoded[prompts[0]["name"]]
        for c in contenders.values():
            result = c.run([first], temps[0], 0, min(4, n))
            progress.report("warm-up", c.name, result, temps[0])

        rows: list[Row] = []
        if 1 in args.batches:
            for i, p in enumerate(prompts):
                for j, temp in enumerate(temps):
                    cells: dict[str, Cell] = {}
                    round_robin(
                        list(contenders.values()),
                        [encoded[p["name"]]],
                        temp,
                        1000 * (i + 1) + 100 * j,
                        n,
                        args.repeats,
                        i + j,
                        cells,
                        progress,
                        p["name"],
                    )
                    rows += rows_for(
                        p["name"], p["kind"], temp, 1, contenders, cells, c_probe, target_cost
                    )
        for batch in multi:
            batch_prompts = [encoded[prompts[b % len(prompts)]["name"]] for b in range(batch)]
            for j, temp in enumerate(temps):
                cells = {}
                round_robin(
                    batch_contenders,
                    batch_prompts,
                    temp,
                    100_000 * batch + 100 * j,
                    n,
                    args.repeats,
                    j,
                    cells,
                    progress,
                    f"batch {batch}",
                )
                rows += rows_for(
                    f"batch {batch}", "-", temp, batch, contenders, cells, c_probe, target_cost
                )

    finished = datetime.datetime.now().astimezone()
    load_end = load_average()
    mismatched = [
        f"{r.label} T={r.temperature:g} {r.contender.name}"
        for r in rows
        for run in r.cell.runs
        if any(len(t) != n for t in run.tokens)
    ]

    # ------------------------------------------------------------------ markdown
    defaults = transformers.GenerationConfig._get_default_generation_params()
    assist = {
        key: defaults.get(key)
        for key in (
            "num_assistant_tokens",
            "num_assistant_tokens_schedule",
            "assistant_confidence_threshold",
        )
    }
    sk = sklearn_available()
    run_line = "`" + " ".join([".venv/bin/python benchmarks/decode_speed.py", *sys.argv[1:]]) + "`"
    lines = [
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
        f"{load_start}, at end {load_end}",
        f"- models: Qwen2.5-Coder-1.5B-Instruct (target) and 0.5B-Instruct (draft), the embedded "
        f"default pair (GGUF Q4_K_M dequantized, cached as bf16), loaded in "
        f"{pair.stats.seconds:.1f} s",
        "",
        "## Settings",
        "",
        f"- prompts: {', '.join(p['name'] for p in prompts)} (benchmarks/prompts.json), each "
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
        f"- batch 1 contenders: {'; '.join(contenders)}. Ours: `specsample.engine.loop.generate` "
        f"with `ModelDrafter(draft, confidence={DEFAULT_CONFIDENCE})` (the command line's "
        f"default draft-side stop) and `AdaptiveDraftLength({ADAPTIVE_MAX_K})`, "
        + ("" if args.no_fixed else f"or `ModelDrafter(draft)` with fixed k={args.k}, ")
        + f"or `NgramDrafter()` (max n-gram 3, latest match) with "
        f"`AdaptiveDraftLength({args.ngram_k})`. "
        "Transformers: `target.generate(...)`; assisted generation with "
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
        "## Columns",
        "",
        "s: median wall seconds of the run; tok/s: new tokens (all rows) per second; x own TO: "
        "speedup over the same library's target-only on the same prompt and temperature; x best "
        "TO: over the faster of the two target-only runs; target fwd / draft fwd: forward calls "
        "of each model per run, prefill included, counted by a forward pre-hook for both "
        "libraries (ours prefills the prompt and then re-feeds its last token with the first "
        "step, so target-only makes N + 1 target calls to transformers' N; transformers' "
        "assisted generation and prompt lookup verify the first drafts in the prefill call); "
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
    goal_lines = goals(rows, names)
    lines += [
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
    if mismatched:
        lines += [f"Warning: runs without exactly {n} new tokens: {sorted(set(mismatched))}", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        OUT_MD.write_text(text)
        OUT_JSON.write_text(
            json.dumps(
                {
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
                },
                indent=1,
            )
        )
        print(f"wrote {OUT_MD} and {OUT_JSON}", file=sys.stderr)


if __name__ == "__main__":
    main()
