"""Writing an audit's report: markdown for people, JSON for machines, a PNG when matplotlib is
installed."""

from __future__ import annotations

import json
import math
from pathlib import Path

from specsample.audit.stats import TV_CONFIDENCE
from specsample.audit.verifier import AuditReport, CaseResult

METHOD = (
    "Each case draws draft chains from a drafter and hands the verifier the drafter's and the "
    "target's probabilities. The observed outcome is the first two tokens a decoder would "
    "produce (when the verifier emits one token, the audit draws the second from the target "
    "after it); for an exact verifier it follows the target's joint law whatever its rule. "
    "G-tests compare the first token and the first two tokens with that law, cells pooled to "
    "expect at least 5 observations, each test at alpha / (number of tests) (Bonferroni). "
    f"'TV <=' is a {TV_CONFIDENCE:.0%} upper bound on the true total-variation distance "
    "(Bretagnolle-Huber-Carol); 'detectable TV' is the smallest TV error the test detects with "
    "probability {power:.2f}, from the noncentral chi-square with the least noncentrality a TV "
    "error can have (4 n TV^2)."
)


def _format_p(p: float) -> str:
    return "0" if p == 0 else f"{p:.2g}"


def heading(title: str, verdict: str, exit_code: int, message: str | None) -> list[str]:
    """The first lines of an audit's markdown report (this one's and the server audit's):
    the title, the verdict with its exit code, and why it could not judge, if so."""
    lines = [f"# {title}", "", f"**Verdict: {verdict}** (exit code {exit_code})", ""]
    if message:
        lines += [f"Could not judge: {message}", ""]
    return lines


def markdown(report: AuditReport) -> str:
    lines = heading(
        f"Exactness audit of `{report.target}`", report.verdict, report.exit_code, report.message
    )
    lines += [
        f"- version: {report.version or 'unknown'}",
        f"- trials per case: {report.samples}; seed {report.seed}",
        f"- false-failure rate of the audit: {report.alpha:g} "
        f"({report.alpha_per_test:.3g} per test)",
        f"- run time: {report.seconds:.1f} s",
    ]
    if report.note:
        lines.append(f"- how it is called: {report.note}")
    lines += ["", METHOD.format(power=report.power), ""]
    lines += [
        "| case | status | first token: p | TV | TV <= | detectable TV | first two: p | TV | "
        "TV <= | detectable TV | tokens/step | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report.cases:
        lines.append(_row(case))
    notes = [f"- `{case.name}`: {case.message}" for case in report.cases if case.message]
    descriptions = [f"- `{case.name}`: {case.description}" for case in report.cases]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", "Cases:", "", *descriptions, ""]
    return "\n".join(lines)


def _row(case: CaseResult) -> str:
    cells = [f"`{case.name}`", case.status]
    for test in case.tests:
        cells += [
            _format_p(test.p_value),
            f"{test.observed_tv:.4f}",
            f"{test.tv_upper_bound:.4f}",
            f"{test.detectable_tv:.4f}",
        ]
    cells += [""] * (10 - len(cells))
    cells += [f"{case.mean_emitted:.2f}" if case.tests else "", f"{case.seconds:.1f}"]
    return "| " + " | ".join(cells) + " |"


def write(report: AuditReport, directory: Path | str, stem: str = "audit") -> list[Path]:
    """Writes STEM.md, STEM.json and (with matplotlib) STEM.png under `directory`; returns the
    paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    md_path, json_path = directory / f"{stem}.md", directory / f"{stem}.json"
    md_path.write_text(markdown(report))
    json_path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    written += [md_path, json_path]
    png = plot(report, directory / f"{stem}.png")
    if png is not None:
        written.append(png)
    return written


def plot(report: AuditReport, path: Path) -> Path | None:
    """A PNG: per case, -log10 of each test's p-value against the rejection line, and the TV
    upper bound against the detectable TV. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    judged = [case for case in report.cases if case.tests]
    if not judged:
        return None
    names = [case.name for case in judged]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.8))
    for offset, index, label in ((-0.2, 0, "first token"), (0.2, 1, "first two tokens")):
        scores = [min(-math.log10(max(c.tests[index].p_value, 1e-300)), 300) for c in judged]
        left.barh([i + offset for i in range(len(names))], scores, height=0.4, label=label)
        bounds = [c.tests[index].tv_upper_bound for c in judged]
        right.barh([i + offset for i in range(len(names))], bounds, height=0.4, label=label)
    left.axvline(-math.log10(report.alpha_per_test), color="red", label="rejection line")
    left.set_xscale("symlog")
    left.set_xlabel("-log10 p-value")
    detectable = [c.tests[0].detectable_tv for c in judged]
    right.scatter(detectable, range(len(names)), color="black", marker="|", s=200)
    right.set_xlabel(f"TV upper bound ({TV_CONFIDENCE:.0%}); | = detectable TV, first token")
    for axis in (left, right):
        axis.set_yticks(range(len(names)), names)
        axis.invert_yaxis()
        axis.legend(fontsize="small")
    figure.suptitle(f"{report.target}: {report.verdict}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
