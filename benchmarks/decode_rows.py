"""The rows of the decode benchmark's tables: one contender's measures in one cell (prompt or
batch, temperature), the theory's prediction for it, and the goals and per-kind summaries read
from all rows.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from common import fmt, ratio
from decode_contenders import HF_TO, OURS_TO, Cell, Contender, Names
from specsample.analysis.theory import step_speedup
from specsample.engine.stats import DecodeStats

KINDS = ("code-write", "code-edit", "prose")


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

    verify_cost = sum(n * verify(k) for k, n in stats.draft_lengths.items()) / steps
    draft_passes_per_step = stats.draft_passes / stats.target_passes
    return step_speedup(stats.theory_tokens_per_pass(), draft_passes_per_step, c, verify_cost)


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


def goals(rows: list[Row], names: Names) -> list[str]:
    """The goal lines (a), (b), (c) of the report, each met or MISSED with its worst cell."""
    single = [r for r in rows if r.batch == 1]
    cells: dict[tuple[str, float], dict[str, Row]] = {}
    for r in single:
        cells.setdefault((r.label, r.temperature), {})[r.contender.name] = r
    lines = []
    for family, ours_names, label in (
        ("model", [names.adaptive, names.fixed], "model drafter vs assisted generation"),
        ("ngram", [names.ngram], "n-gram vs prompt lookup"),
    ):
        for ours_name in ours_names:
            lines += goal_a(cells, family, ours_name, label)
    return lines + goal_b(rows, single, names) + goal_c(single, names)


def goal_a(
    cells: dict[tuple[str, float], dict[str, Row]], family: str, ours_name: str, label: str
) -> list[str]:
    """(a) ours vs the best transformers setting of the same drafter family, every cell."""
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
        gap = min((ours_row.speedup_own or 0) / best_own, (ours_row.speedup_best or 0) / best_wall)
        if worst is None or gap < worst[0]:
            worst = (gap, prompt, temp, ours_row, best_own, best_wall)
        if gap < 1:
            misses.append(
                f"{prompt} T={temp:g} ({fmt(ours_row.speedup_own)} vs "
                f"{fmt(best_own)} own-TO speedup, {fmt(ours_row.speedup_best)} vs "
                f"{fmt(best_wall)} best-TO speedup)"
            )
    if worst is None:
        return []
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
    return [text]


def goal_b(rows: list[Row], single: list[Row], names: Names) -> list[str]:
    """(b) never more than 5% slower than (ours) target-only, any prompt."""
    lines = []
    for name in (names.adaptive, names.fixed, names.ngram):
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
    batched = [r for r in rows if r.batch > 1 and r.contender.name == names.adaptive]
    if batched:
        lines.append(
            "(b, batch > 1, for information) "
            + ", ".join(
                f"batch {r.batch} T={r.temperature:g} {fmt(r.speedup_own)}x" for r in batched
            )
        )
    return lines


def goal_c(single: list[Row], names: Names) -> list[str]:
    """(c) realised >= 90% of predicted."""
    lines = []
    for name in (names.adaptive, names.fixed, names.ngram):
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
