"""Statistics of a decoding run, with the speedup theory predicts from them."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from specsample.analysis.theory import expected_tokens_per_pass, step_speedup


@dataclass
class DecodeStats:
    target_passes: int = 0
    draft_passes: int = 0
    new_tokens: int = 0  # emitted tokens kept (after EOS / max_new_tokens cuts)
    # (row, step) pairs; every step runs a target pass, but for a first step without drafts
    # over rows just prefilled (their token comes from the prompt pass)
    row_steps: int = 0
    drafted: int = 0  # drafted tokens verified
    # drafts made but not verified: the pass costs said verifying them would not pay (the
    # draft-length policy's trim)
    trimmed: int = 0
    padded_passes: int = 0  # target passes fed wider than their tokens (cheaper there)
    accepted: int = 0  # drafts kept
    keep_tests: int = 0  # keep tests run: accepted drafts + one per rejection
    empty_steps: int = 0  # row steps with drafts where nothing was accepted
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0  # prompt passes; a drafter's catch-up on skipped steps
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    target_single_pass_seconds: float | None = None  # measured 1-token target pass, if known
    tree_steps: int = 0  # target passes that verified a token tree
    # rule name -> target passes ("a+b": a pass whose rows were verified by rules a and b)
    rules_used: dict[str, int] = field(default_factory=dict)
    draft_lengths: dict[int, int] = field(default_factory=dict)  # chain drafts: length -> row steps

    @property
    def alpha(self) -> float:
        """Acceptance rate per keep test (the alpha of the theory)."""
        return self.accepted / self.keep_tests if self.keep_tests else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [
            a / d if d else 0.0
            for a, d in zip(self.accepted_by_position, self.drafted_by_position, strict=True)
        ]

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens emitted per row per target pass."""
        return self.new_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def empty_share(self) -> float:
        """Share of drafting row steps in which nothing was accepted."""
        drafting_steps = self.drafted_row_steps
        return self.empty_steps / drafting_steps if drafting_steps else 0.0

    drafted_row_steps: int = 0

    @property
    def mean_draft_length(self) -> float:
        return self.drafted / self.row_steps if self.row_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds else 0.0

    @property
    def cost_ratio(self) -> float | None:
        """c: one draft forward pass over one target pass (1-token pass when measured)."""
        if not self.draft_passes or not self.target_passes:
            return None
        target = self.target_single_pass_seconds or self.target_seconds / self.target_passes
        return (self.draft_seconds / self.draft_passes) / target

    def predicted_speedup(self) -> float | None:
        """Theory's speedup over target-only decoding from the measured acceptance rate, draft
        lengths and costs; None without a draft pass (no c: an n-gram drafter, or nothing
        drafted) or until a 1-token target pass (the target-only step) was timed.

        Chains: the expected tokens per pass, (1 - alpha^(k+1)) / (1 - alpha), averaged over the
        draft lengths the rows actually used (adaptive lengths and draft-side stops make k vary,
        and the mean of that curve is not its value at the mean k), over the measured cost of a
        step in 1-token target passes: draft passes per step times c, plus the mean target pass.
        Trees: the measured tokens per pass over the same step cost."""
        c = self.cost_ratio
        if c is None or not self.target_single_pass_seconds or not self.target_passes:
            return None
        tokens = self.tokens_per_pass if self.tree_steps else self.theory_tokens_per_pass()
        if tokens is None:
            return None
        return step_speedup(
            tokens,
            self.draft_passes / self.target_passes,
            c,
            (self.target_seconds / self.target_passes) / self.target_single_pass_seconds,
        )

    @classmethod
    def pooled(cls, runs: Sequence[DecodeStats]) -> DecodeStats:
        """Counters and seconds summed over runs (alpha and the rest pooled, not averaged); the
        1-token target pass is the mean of the runs that timed one."""
        out = cls()
        for f in dataclasses.fields(cls):
            values = [getattr(s, f.name) for s in runs]
            if not values:
                continue
            if f.name == "target_single_pass_seconds":
                known = [v for v in values if v]
                out.target_single_pass_seconds = statistics.mean(known) if known else None
            elif isinstance(values[0], dict):
                merged: dict = {}
                for value in values:
                    for key, count in value.items():
                        merged[key] = merged.get(key, 0) + count
                setattr(out, f.name, merged)
            elif isinstance(values[0], list):
                width = max(len(v) for v in values)
                summed = [sum(v[i] for v in values if i < len(v)) for i in range(width)]
                setattr(out, f.name, summed)
            else:
                setattr(out, f.name, sum(values))
        return out

    def theory_tokens_per_pass(self) -> float | None:
        """Chains: the theory's expected tokens per row step, (1 - alpha^(k+1)) / (1 - alpha)
        with the measured alpha, averaged over the draft lengths k the rows used; None before
        any chain step."""
        steps = sum(self.draft_lengths.values())
        if not steps:
            return None
        alpha = min(self.alpha, 1.0)
        total = sum(n * expected_tokens_per_pass(alpha, k) for k, n in self.draft_lengths.items())
        return total / steps

    def summary(self) -> dict[str, object]:
        predicted = self.predicted_speedup()
        return {
            "rules_used": dict(self.rules_used),
            "new_tokens": self.new_tokens,
            "target_passes": self.target_passes,
            "draft_passes": self.draft_passes,
            "trimmed_drafts": self.trimmed,
            "padded_passes": self.padded_passes,
            "alpha": round(self.alpha, 4),
            "acceptance_by_position": [round(a, 3) for a in self.acceptance_by_position],
            "tokens_per_pass": round(self.tokens_per_pass, 3),
            "empty_share": round(self.empty_share, 3),
            "mean_draft_length": round(self.mean_draft_length, 2),
            "draft_lengths": {str(k): n for k, n in sorted(self.draft_lengths.items())},
            "cost_ratio_c": None if self.cost_ratio is None else round(self.cost_ratio, 3),
            "seconds": {
                "prefill": round(self.prefill_seconds, 3),
                "draft": round(self.draft_seconds, 3),
                "target": round(self.target_seconds, 3),
                "verify": round(self.verify_seconds, 3),
                "rest": round(
                    self.total_seconds
                    - self.prefill_seconds
                    - self.draft_seconds
                    - self.target_seconds
                    - self.verify_seconds,
                    3,
                ),
                "total": round(self.total_seconds, 3),
            },
            "tokens_per_second": round(self.tokens_per_second, 2),
            "predicted_speedup": None if predicted is None else round(predicted, 3),
        }
