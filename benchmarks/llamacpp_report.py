"""Cells, theory columns and the markdown/JSON report of benchmarks/llamacpp_speed.py."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GOAL_RATIO = 0.97
HOT = 0.7  # the acceptance goal's temperatures: T >= HOT


@dataclass
class Cell:
    """Every repeat of one contender on one prompt at one temperature: result dicts with
    seconds, new_tokens, row_steps, drafted, accepted (and `stats` for ours)."""

    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(r["seconds"] for r in self.runs)

    @property
    def new_tokens(self) -> int:
        return self.runs[0]["new_tokens"]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds

    def total(self, key: str) -> float | None:
        values = [r.get(key) for r in self.runs]
        return None if any(v is None for v in values) else sum(values)

    @property
    def acceptance(self) -> float | None:
        drafted, accepted = self.total("drafted"), self.total("accepted")
        return accepted / drafted if drafted else None

    @property
    def tokens_per_pass(self) -> float:
        return self.total("new_tokens") / self.total("row_steps")

    def stats(self):
        from specsample.engine.stats import DecodeStats

        pooled = []
        for r in self.runs:
            values = dict(r["stats"])
            values["draft_lengths"] = {int(k): n for k, n in values["draft_lengths"].items()}
            pooled.append(DecodeStats(**values))
        return DecodeStats.pooled(pooled)

    def summary_line(self) -> str:
        line = f"{self.new_tokens} tok in {self.seconds:.2f} s = {self.tokens_per_second:.2f} tok/s"
        if self.acceptance is not None:
            line += f", acceptance {self.acceptance:.2f}"
        return line + f", {self.tokens_per_pass:.2f} tok/pass"


def paired_ratio(cell: Cell, base: Cell) -> float | None:
    """The median over repeats of cell's tokens/s over base's in the same repeat (runs[i] of
    every contender come from repeat i, run side by side), which cancels the machine's slow
    minutes that a ratio of medians keeps; None when the two have different repeat counts."""
    if len(cell.runs) != len(base.runs) or not cell.runs:
        return None
    return statistics.median(
        (x["new_tokens"] / x["seconds"]) / (b["new_tokens"] / b["seconds"])
        for x, b in zip(cell.runs, base.runs, strict=True)
    )


def merged(cells: list[Cell]) -> Cell:
    return Cell(runs=[r for c in cells for r in c.runs])


def pooled_rate(cells: list[Cell]) -> float:
    """Tokens over seconds summed over prompts (each prompt's median seconds)."""
    return sum(c.new_tokens for c in cells) / sum(c.seconds for c in cells)


def interp(curve: dict[int, float], x: float) -> float:
    """The cost curve at x tokens, linear between (and beyond) the measured sizes."""
    ks = sorted(curve)
    if x in curve:
        return curve[x]
    lo = max([k for k in ks if k <= x], default=ks[0])
    hi = min([k for k in ks if k > x], default=ks[-1])
    if lo == hi:
        lo, hi = ks[-2], ks[-1]
    return curve[lo] + (curve[hi] - curve[lo]) * (x - lo) / (hi - lo)


def is_target_only(c) -> bool:
    return c.worker in ("llamacpp", "ours-none") or c.drafter == "none"


def theory(c, cell: Cell, curve: dict[str, dict[int, float]]) -> tuple[float | None, ...]:
    """(predicted speedup from the measured cost curve, flat-cost projection) over target-only
    of the same library and batch. Ours: the engine's DecodeStats.predicted_speedup (theory's
    tokens per pass from the measured alpha and draft lengths, over the step's measured costs)
    and tokens per pass / (draft passes per step * c + 1). llama.cpp's draft-simple (fixed k, so
    theory's tokens per pass with the alpha that fits its accepted drafts per step is the
    measured one): per step k 1-token draft passes plus one draft pass over the k + 1 verified
    tokens, and a target pass over k + 1, on the probed curve. Prompt lookup: no draft cost, a
    target pass over the tokens it fed."""
    from specsample.analysis.theory import step_speedup

    if is_target_only(c):
        return None, None
    if c.library in ("ours", "transformers"):
        stats = cell.stats()
        per_step = stats.draft_passes / stats.target_passes if stats.target_passes else 0.0
        flat = step_speedup(stats.tokens_per_pass, per_step, stats.cost_ratio or 0.0, 1.0)
        predicted = stats.predicted_speedup()
        tokens = stats.theory_tokens_per_pass()
        if predicted is None and not stats.draft_passes and stats.target_single_pass_seconds:
            # a drafter with no passes (n-gram): no c, the step costs its target pass only
            verify = stats.target_seconds / stats.target_passes / stats.target_single_pass_seconds
            predicted = None if tokens is None else step_speedup(tokens, 0.0, 0.0, verify)
        return predicted, flat
    t, d = curve["target"], curve["draft"]
    tpp = cell.tokens_per_pass
    if c.worker is None:
        k = cell.runs[0]["n_draft"]
        draft_cost = (k * d[1] + interp(d, k + 1)) / t[1]
        predicted = step_speedup(tpp, 1.0, draft_cost, interp(t, k + 1) / t[1])
        return predicted, step_speedup(tpp, k + 1, d[1] / t[1], 1.0)
    fed = statistics.mean(r["mean_fed"] for r in cell.runs)
    return step_speedup(tpp, 0.0, 0.0, interp(t, fed) / t[1]), tpp


def fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def baseline_key(c) -> str | None:
    return "llamacpp-b4" if c.batch == 4 else "llamacpp"


def write_report(out: Path, meta, curve, contenders, cells, rss, prompts, temps) -> None:
    names = [p["name"] for p in prompts]
    lines = _header(meta, curve, cells)
    for temperature in temps:
        lines += _temperature_tables(temperature, contenders, cells, rss, curve, names)
    lines += _acceptance_table(cells, names, temps)
    lines += _goals(contenders, cells, names, temps, meta["full"])
    out.write_text("\n".join(lines) + "\n")
    payload = {
        "meta": meta,
        "cost_curve_seconds": curve,
        "rss_bytes": rss,
        "cells": [
            {"contender": key, "prompt": name, "temperature": t, "runs": cell.runs}
            for (key, name, t), cell in cells.items()
        ],
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))


def _header(meta, curve, cells) -> list[str]:
    cpu = meta["cpu"]
    t, d = curve["target"], curve["draft"]
    lines = ["# Ours on llama.cpp against llama.cpp's own decoding (default pair, CPU)", ""]
    if not meta["full"]:
        single = " (one run per cell: single samples)" if meta["repeats"] < 2 else ""
        lines += [
            f"> **Reduced run**{single}: {len(meta['prompts'])} prompt(s), {meta['tokens']} "
            f"tokens, T {', '.join(f'{x:g}' for x in meta['temperatures'])}, "
            f"{meta['repeats']} repeat(s), contenders {', '.join(meta['contenders'])}. The full "
            "run (every contender, 128 tokens, 3 repeats): `.venv/bin/python "
            "benchmarks/llamacpp_speed.py --transformers`.",
            "",
        ]
    spec = meta["spec_defaults"]
    lines += [
        f"Run {meta['started']} with `{meta['command']}`; CPU: {cpu['cpu']}, "
        f"{cpu['logical_cores']} logical cores, {meta['threads']} threads per contender; load "
        f"average at start {meta['load'][0]}, at end {meta['load'][1]}. llama-cpp-python "
        f"{meta['llama_cpp_python']}; llama.cpp's tools built from the llama.cpp sources in its "
        "sdist (benchmarks/build_llamacpp_tools.sh). Prompts: "
        f"{', '.join(meta['prompts'])} (benchmarks/prompts.json, chat template); "
        f"{meta['tokens']} new tokens (transformers: {meta['transformers_tokens']}), EOS does "
        f"not stop a run; {meta['repeats']} repeat(s), contenders interleaved per prompt and "
        "temperature, order rotated per repeat, one seed per repeat for all.",
        "",
        "Cost curve (llama.cpp defaults, weights repacked, 100-token context, median of "
        f"{meta['probe_repeats']}): target pass "
        + ", ".join(f"{k} tok {1000 * v:.0f} ms" for k, v in sorted(t.items()))
        + "; draft pass "
        + ", ".join(f"{k} tok {1000 * v:.0f} ms" for k, v in sorted(d.items()))
        + f"; c = {d[1] / t[1]:.3f}.",
        "",
        "Contenders: llama.cpp target-only: llama_decode one token per row per pass and a "
        "llama_sampler chain (temperature, dist), llama.cpp's default model and context "
        "parameters. llama.cpp speculative-simple: `" + meta["spec_command"] + "`; its draft "
        f"defaults (--help): draft length {spec.get('--spec-draft-n-max', '?')}, minimum "
        f"{spec.get('--spec-draft-n-min', '?')}, p-min {spec.get('--spec-draft-p-min', '?')}; "
        "the draft proposes its top-1 token (greedy), the target samples its own token at each "
        "position and keeps the draft while they are equal (sample-and-match: exact, but a draft "
        "is kept with probability p(draft token), not min(1, p/q)). llama-cpp-python prompt "
        f"lookup: {_lookup_facts(meta)}. Ours: `specsample generate`'s "
        "settings (block verification, adaptive k up to 20, draft confidence and survival "
        "stops), llama.cpp backend with weights repacked (as llama.cpp); the cost memory of "
        "each worker was filled by its warm-up run (32 tokens), as a setting's first run fills "
        "it for the command line, so these runs start from the remembered verdict ('first run "
        "(no cost memory)' runs the cost check from scratch every time; the keep counts the "
        "memory also keeps are a prior for new rows); 'k = 3 fixed' drafts 3 tokens every "
        "step with the draft model's plain samples (no stops), llama.cpp's default length, for "
        "the acceptance comparison; batch 4 = 4 copies of "
        "the prompt (aggregate tokens/s). Every sampler: plain temperature (top-k, top-p, "
        "min-p off). "
        "llama-speculative-simple stops once it has at least the tokens asked for (up to its "
        "draft length more); its rate counts what it made. " + _tokenization_note(cells),
        "",
        "Columns: tokens/s (median over repeats; pooled over prompts in the first table), "
        "ratio to llama.cpp target-only at the same batch (min over prompts), acceptance per "
        "drafted token (accepted / drafted), emitted tokens per target pass, peak RSS of the "
        "contender's process (ours: shared by batch 1 and 4; transformers: one process holds "
        "the target and the int8 draft), the speedup theory predicts from the measured costs "
        "(ours: the engine's DecodeStats.predicted_speedup; llama.cpp: the cost curve above) "
        "and the projection for a flat cost curve (a target pass costs the same for any "
        "number of tokens: tokens per pass / (draft passes per step * c + 1)).",
        "",
    ]
    return lines


def _lookup_facts(meta) -> str:
    facts = meta["worker_facts"].get("lookup")
    if not facts:
        return "not run"
    return (
        f"LlamaPromptLookupDecoding(max_ngram_size={facts['max_ngram_size']}, "
        f"num_pred_tokens={facts['num_pred_tokens']}), its defaults"
    )


def _tokenization_note(cells) -> str:
    """Whether llama-speculative-simple, which tokenizes the rendered prompt itself, got the
    same number of prompt tokens as every other contender."""
    runs = [r for (key, _, _), cell in cells.items() if key == "llamacpp-spec" for r in cell.runs]
    if not runs:
        return ""
    same = sum(r["encoded_tokens"] == r["prompt_tokens"] for r in runs)
    return (
        "It tokenized the rendered chat-template text to as many tokens as the ids the others "
        f"were given in {same}/{len(runs)} runs."
    )


def _temperature_tables(temperature, contenders, cells, rss, curve, names) -> list[str]:
    lines = [
        f"## T = {temperature:g}",
        "",
        "| contender | batch | tokens/s | vs llama.cpp (min) | acceptance | tokens/pass | RSS GiB "
        "| predicted | flat-cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    detail = []
    for c in contenders:
        row = [cells.get((c.key, n, temperature)) for n in names]
        if any(x is None for x in row):
            continue
        base = [cells.get((baseline_key(c), n, temperature)) for n in names]
        rate = pooled_rate(row)
        ratios = [
            x.tokens_per_second / b.tokens_per_second for x, b in zip(row, base, strict=True) if b
        ]
        ratio = rate / pooled_rate(base) if all(base) else None
        together = merged(row)
        predicted, flat = theory(c, together, curve)
        gib = rss.get(c.worker or "") or max(r["rss"] for r in together.runs)
        lines.append(
            f"| {c.label} | {c.batch} | {rate:.2f} | {fmt(ratio)} "
            f"({fmt(min(ratios) if ratios else None)}) | {fmt(together.acceptance)} | "
            f"{together.tokens_per_pass:.2f} | {gib / 2**30:.2f} | {fmt(predicted)} | "
            f"{fmt(flat)} |"
        )
        shown = []
        for x, b in zip(row, base, strict=True):
            ratio_text = f" ({x.tokens_per_second / b.tokens_per_second:.2f}x)" if b else ""
            shown.append(f"{x.tokens_per_second:.2f}{ratio_text}")
        detail.append(f"| {c.label} | {c.batch} | " + " | ".join(shown) + " |")
    lines += [
        "",
        "tokens/s per prompt (ratio to llama.cpp target-only at the same batch):",
        "",
        "| contender | batch | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
        *detail,
        "",
    ]
    return lines


def _acceptance_table(cells, names, temps) -> list[str]:
    lines = [
        "## Acceptance per drafted token: ours against llama.cpp's sample-and-match",
        "",
        "Same draft model; ours drafts by sampling the draft at T and verifies with block "
        "verification, llama.cpp drafts greedily and matches samples. Ours: the fixed k = 3 "
        "contender where it ran (llama.cpp's default draft length, no draft stops: every step "
        "drafts 3 tokens as llama.cpp's does), else the first-run contender (no cost memory: "
        "it probes before its verdict) where the one with a memory drafted nothing (a few keep "
        "tests per run). Sampled keep decisions on a few hundred drafts per cell carry a few "
        "points of noise; benchmarks/acceptance_rules.md compares the two rules as exact "
        "expectations on the target's own texts.",
        "",
        "| prompt | T | llama.cpp speculative-simple | ours model drafter | ratio |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        for t in temps:
            theirs = cells.get(("llamacpp-spec", name, t))
            ours = _drafting_cell(cells, name, t)
            if theirs is None or ours is None:
                continue
            a, b = theirs.acceptance, ours.acceptance
            ratio = b / a if a and b is not None else None
            lines.append(f"| {name} | {t:g} | {fmt(a)} | {fmt(b)} | {fmt(ratio)} |")
    return lines + [""]


def _drafting_cell(cells, name, t):
    """Ours' model-drafter cell for the acceptance comparison: the fixed k = 3 one, else the
    one with the cost memory if it drafted, else the first-run one."""
    for key in ("ours-model-k3", "ours-model", "ours-model-cold"):
        cell = cells.get((key, name, t))
        if cell is not None and cell.acceptance is not None:
            return cell
    return cells.get(("ours-model", name, t))


def _goals(contenders, cells, names, temps, full: bool) -> list[str]:
    lines = ["## Goals", ""]
    if not full:
        lines += ["Counted over this partial run's cells only: not an answer to the goals.", ""]
    for c in contenders:
        if c.library != "ours" or getattr(c, "k", None) is not None:
            continue  # (the fixed-k contender measures acceptance, not a setting anyone runs)
        pairs = [
            (cells.get((c.key, n, t)), cells.get((baseline_key(c), n, t)), cells.get(
                ("llamacpp-spec", n, t)))
            for n in names
            for t in temps
        ]  # fmt: skip
        ratios = [x.tokens_per_second / b.tokens_per_second for x, b, _ in pairs if x and b]
        if ratios:
            met = sum(r >= GOAL_RATIO for r in ratios)
            lines.append(
                f"- {c.label}, batch {c.batch}: >= {GOAL_RATIO}x llama.cpp target-only in "
                f"{met}/{len(ratios)} cells (min {min(ratios):.2f}x)."
            )
        paired = [paired_ratio(x, b) for x, b, _ in pairs if x and b]
        if paired and None not in paired:
            met = sum(r >= GOAL_RATIO for r in paired)
            lines.append(
                f"  - the median of the per-repeat ratios (each run against the llama.cpp run "
                f"of its repeat): >= {GOAL_RATIO}x in {met}/{len(paired)} cells "
                f"(min {min(paired):.3f}x)."
            )
        spec = [x.tokens_per_second / s.tokens_per_second for x, _, s in pairs if x and s]
        if spec and c.batch == 1 and not c.key.endswith("none"):
            met = sum(r >= 1 for r in spec)
            lines.append(
                f"  - not below llama.cpp speculative-simple in {met}/{len(spec)} cells "
                f"(min {min(spec):.2f}x)."
            )
    hot = [
        (_drafting_cell(cells, n, t), cells.get(("llamacpp-spec", n, t)))
        for n in names
        for t in temps
        if t >= HOT
    ]
    ratios = [
        o.acceptance / s.acceptance
        for o, s in hot
        if o and s and s.acceptance and o.acceptance is not None
    ]
    if ratios:
        met = sum(r > 1 for r in ratios)
        lines.append(
            f"- At T >= {HOT}: ours' acceptance per drafted token above llama.cpp's in "
            f"{met}/{len(ratios)} cells (ratio min {min(ratios):.2f}, median "
            f"{statistics.median(ratios):.2f})."
        )
    return lines + [""]
