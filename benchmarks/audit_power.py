"""The audit's sample size, measured: power, level and run time of `specsample audit verifier`.

1. Power: for every default case, the first-token law is shifted by a total-variation error of
   0.01 in the worst direction (mass moved between two halves of the law in proportion to it,
   the direction of least chi-square divergence) and multinomial samples of the default size are
   G-tested at the audit's per-test level (1e-4 / number of tests). The rejection rate is the
   measured power; the goal is >= 0.99. The noncentral chi-square prediction is printed beside it.
2. Level: the same with no shift, at a per-test level of 0.01 (1e-4 / 20 is too rare to see);
   the rate should be near 0.01, so that the Bonferroni split holds the audit's 1e-4.
3. Run time: the whole default suite through our token, block and tree rules, wall clock.

Writes benchmarks/audit_power.md. Run: .venv/bin/python benchmarks/audit_power.py [--repeats N]
(about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import numpy as np
import torch

from specsample.audit import DEFAULT_ALPHA, DEFAULT_SAMPLES, audit_verifier, default_cases, stats

HERE = Path(__file__).parent


def measure_power(repeats: int) -> list[str]:
    cases = default_cases()
    tests = 2 * len(cases)
    alpha = DEFAULT_ALPHA / tests
    rows = [
        f"Samples per case: {DEFAULT_SAMPLES}; per-test level {alpha:.2g} (1e-4 / {tests} tests); "
        f"{repeats} simulated audits per case.",
        "",
        "| case | df | predicted detectable TV | power at TV 0.01: predicted | measured | "
        "level at 0.01: measured |",
        "|---|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(0)
    for case in cases:
        law = case.first_token_law().numpy()
        df = stats.goodness_of_fit(np.round(DEFAULT_SAMPLES * law), law).df
        predicted_tv = stats.detectable_tv(DEFAULT_SAMPLES, df, alpha)
        critical = stats.chi2.isf(alpha, df)
        predicted_power = stats.ncx2.sf(critical, df, 4 * DEFAULT_SAMPLES * 0.01**2)
        shifted = stats.worst_direction(law, 0.01)
        hits = sum(
            stats.goodness_of_fit(rng.multinomial(DEFAULT_SAMPLES, shifted), law).p_value < alpha
            for _ in range(repeats)
        )
        false = sum(
            stats.goodness_of_fit(rng.multinomial(DEFAULT_SAMPLES, law), law).p_value < 0.01
            for _ in range(repeats)
        )
        rows.append(
            f"| `{case.name}` | {df} | {predicted_tv:.4f} | {predicted_power:.4f} | "
            f"{hits / repeats:.3f} | {false / repeats:.3f} |"
        )
    return rows


def measure_runtime() -> list[str]:
    rows = ["| target | verdict | wall clock (s) |", "|---|---|---|"]
    for target in ("ours:token", "ours:block", "ours:tree", "ours:typical"):
        start = time.perf_counter()
        report = audit_verifier(target)
        rows.append(f"| `{target}` | {report.verdict} | {time.perf_counter() - start:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1000)
    args = parser.parse_args()
    power = measure_power(args.repeats)
    runtime = measure_runtime()
    text = "\n".join(
        [
            "# Audit: measured power, level and run time",
            "",
            f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads available (the audit uses 1). "
            "Produced by benchmarks/audit_power.py.",
            "",
            "## Power and level of the first-token test (simulation)",
            "",
            *power,
            "",
            "## Run time of the default suite (default sample size)",
            "",
            *runtime,
            "",
        ]
    )
    (HERE / "audit_power.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
