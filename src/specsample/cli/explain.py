"""`specsample explain`: the worked example of one speculative sampling step.

With a target distribution P and a drafter distribution Q over a small vocabulary it prints the
exact quantities of one step with one drafted token (k = 1): the keep probability min(1, P/Q) of
each token, the residual norm(max(0, P - Q)), the acceptance rate beta = sum min(P, Q) and the
output distribution min(P, Q) + (1 - beta) * residual, which is P. It then runs N such steps through
`specsample.verify` in one batched call and compares the observed tokens with P (chi-square test),
and writes a bar chart (matplotlib, optional).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

import specsample
from specsample.rules import acceptance_probability, residual

DEFAULT_TARGET = "0.25,0.75"
DEFAULT_DRAFT = "0.5,0.5"
SUM_TOLERANCE = 1e-6  # how far the given probabilities may sum from 1
WIDTH = 92  # text wrapping width

DESCRIPTION = """\
Show, with numbers, one step of speculative sampling with one drafted token.

A cheap drafter with next-token distribution Q proposes a token x ~ Q. The target
model, whose distribution P we want to sample from, keeps it with probability
min(1, P(x)/Q(x)); otherwise it emits a "recovered" token drawn from the residual
norm(max(0, P - Q)). The token that comes out is distributed exactly as P.

This command prints the exact numbers for one step, then simulates N steps with
specsample.verify and checks the observed tokens against P. The default example is
P = (1/4, 3/4), Q = (1/2, 1/2) over two tokens A and B."""

EPILOG = """\
examples:
  specsample explain
  specsample explain --target 0.5,0.3,0.2 --draft 0.2,0.3,0.5 --labels the,a,an
  specsample explain --target 1/3,2/3 --draft 1/2,1/2 --samples 1000000 --no-png"""

WHY_EXACT = (
    "A token x can come out in two ways: the drafter proposes it and it is kept, with probability "
    "Q(x) * min(1, P(x)/Q(x)) = min(P(x), Q(x)); or the draft is rejected (probability 1 - beta) "
    "and x is drawn as the recovered token. The keep test caps every token at the smaller of P "
    "and Q, so a token the drafter proposes too often (Q > P) already comes out with probability "
    "exactly P(x), and a token it proposes too rarely (Q < P) is short by exactly P(x) - Q(x). "
    "These shortfalls add up to 1 - beta, the probability of a rejection, so drawing the "
    "recovered token from the residual norm(max(0, P - Q)) hands each token exactly its "
    "shortfall: min(P, Q) + (1 - beta) * residual = min(P, Q) + max(0, P - Q) = P. Drawing the "
    "recovered token from P instead would hand out the rejected mass in proportion to P, giving "
    "min(P, Q) + (1 - beta) * P: the mass min(P, Q) already delivered by kept drafts is handed "
    "out a second time, so tokens the drafter proposes too often come out too often and tokens "
    "it proposes too rarely come out too rarely."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `explain` subcommand."""
    parser = subparsers.add_parser(
        "explain",
        help="show, with numbers, why one speculative sampling step outputs exactly P",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        metavar="P",
        default=DEFAULT_TARGET,
        help="the target model's distribution P over the next token: one probability per token "
        "(2 tokens or more), separated by commas, each >= 0, summing to 1; decimals or "
        f"fractions such as 1/4 (default: {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--draft",
        metavar="Q",
        default=DEFAULT_DRAFT,
        help="the drafter's distribution Q over the next token, same format and same number of "
        "tokens as "
        f"--target (default: {DEFAULT_DRAFT})",
    )
    parser.add_argument(
        "--labels",
        metavar="NAMES",
        help="token names separated by commas, one per token (default: A,B,C,...)",
    )
    parser.add_argument(
        "--samples",
        metavar="N",
        type=int,
        default=100_000,
        help="number of simulated one-token steps (default: 100000)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random generator used by the simulation (default: 0)",
    )
    png = parser.add_mutually_exclusive_group()
    png.add_argument(
        "--png",
        metavar="PATH",
        type=Path,
        default=Path("explain.png"),
        help="where to write the bar chart, needs matplotlib (default: explain.png in the "
        "current directory)",
    )
    png.add_argument("--no-png", action="store_true", help="do not write the bar chart")
    parser.set_defaults(run=run)


@dataclass(frozen=True)
class Step:
    """The exact quantities of one step with one drafted token; tensors are float64 [vocab]."""

    target: torch.Tensor  # P
    draft: torch.Tensor  # Q
    keep: torch.Tensor  # min(1, P/Q): probability that a drafted x is kept (1 where Q = 0)
    accepted: torch.Tensor  # min(P, Q): probability that x is drafted and kept
    beta: float  # sum min(P, Q): probability that the draft is kept
    residual: torch.Tensor  # norm(max(0, P - Q)): distribution of the recovered token
    recovered: torch.Tensor  # (1 - beta) * residual: probability that x is the recovered token
    output: torch.Tensor  # accepted + recovered (= P)
    wrong_output: torch.Tensor  # min(P, Q) + (1 - beta) * P: the output if recovering from P


def exact_step(target: torch.Tensor, draft: torch.Tensor) -> Step:
    keep = acceptance_probability(target.log(), draft.log()).to(torch.float64)
    accepted = torch.minimum(target, draft)
    beta = float(specsample.acceptance_rate(target, draft))
    res = residual(target, draft).to(torch.float64)
    recovered = (1 - beta) * res
    return Step(
        target=target,
        draft=draft,
        keep=keep,
        accepted=accepted,
        beta=beta,
        residual=res,
        recovered=recovered,
        output=accepted + recovered,
        wrong_output=accepted + (1 - beta) * target,
    )


@dataclass(frozen=True)
class Simulation:
    """N simulated steps: counts of the first emitted token (a kept draft or a recovered token)."""

    samples: int
    counts: torch.Tensor  # int64 [vocab]
    accepted_counts: torch.Tensor  # int64 [vocab]: the part of `counts` that were kept drafts
    acceptance: float  # fraction of steps whose draft was kept
    chi2: float
    df: int
    p_value: float


def simulate(
    target: torch.Tensor, draft: torch.Tensor, samples: int, generator: torch.Generator
) -> Simulation:
    """Runs `samples` steps with k = 1 through one batched `specsample.verify` call; the drafts are
    sampled from `draft` with `generator`, which is also the only randomness verify uses."""
    vocab = target.shape[0]
    draft_tokens = torch.multinomial(draft, samples, replacement=True, generator=generator)
    result = specsample.verify(
        draft_tokens[:, None],
        draft.expand(samples, 1, vocab),
        target.expand(samples, 2, vocab),  # row 1: the bonus token after a kept draft (unused)
        generator=generator,
    )
    first = result.tokens[:, 0]
    kept = result.num_accepted == 1
    counts = torch.bincount(first, minlength=vocab)
    chi2, df, p_value = chi_square(counts, target)
    return Simulation(
        samples=samples,
        counts=counts,
        accepted_counts=torch.bincount(first[kept], minlength=vocab),
        acceptance=float(kept.double().mean()),
        chi2=chi2,
        df=df,
        p_value=p_value,
    )


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's goodness-of-fit test of `counts` against `probs`: (statistic, degrees of freedom,
    p-value). Tokens with probability 0 are left out; a count on one gives p-value 0. The p-value
    is the regularized upper incomplete gamma function Q(df/2, statistic/2)."""
    counts = counts.to(torch.float64)
    possible = probs > 0
    if bool((counts[~possible] > 0).any()):
        return float("inf"), int(possible.sum()) - 1, 0.0
    expected = counts.sum() * probs[possible]
    statistic = float(((counts[possible] - expected) ** 2 / expected).sum())
    df = int(possible.sum()) - 1
    if df == 0:
        return statistic, 0, 1.0
    p_value = torch.special.gammaincc(
        torch.tensor(df / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)
    )
    return statistic, df, float(p_value)


def parse_distribution(option: str, text: str) -> tuple[torch.Tensor, str | None]:
    """'0.25,0.75' -> float64 tensor [vocab], plus a note if it was rescaled to sum to exactly 1.
    Raises argparse.ArgumentTypeError naming `option`, what was expected and what arrived."""
    values = []
    for item in text.split(","):
        try:
            value = Fraction(item.strip())
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(
                f"{option}: expected comma-separated probabilities such as 0.25,0.75 or 1/4,3/4, "
                f"got {text!r} ({item.strip()!r} is not a number)"
            ) from None
        values.append(value)
    if len(values) < 2:
        raise argparse.ArgumentTypeError(
            f"{option}: expected at least 2 probabilities (one per token of a vocabulary of 2 or "
            f"more), got {len(values)}: {text!r}"
        )
    for index, value in enumerate(values):
        if value < 0:
            raise argparse.ArgumentTypeError(
                f"{option}: expected non-negative probabilities, got {float(value):g} for token "
                f"{index + 1} in {text!r}"
            )
    total = sum(values)
    if abs(total - 1) > SUM_TOLERANCE:
        raise argparse.ArgumentTypeError(
            f"{option}: expected probabilities summing to 1 (within {SUM_TOLERANCE:g}), got a sum "
            f"of {float(total):.10g} from {text!r}"
        )
    probs = torch.tensor([float(value / total) for value in values], dtype=torch.float64)
    note = None
    if total != 1:
        note = f"{option} sums to {float(total):.10g}; rescaled to sum to 1"
    return probs, note


def parse_labels(text: str | None, vocab: int) -> list[str]:
    if text is None:
        if vocab <= 26:
            return [chr(ord("A") + index) for index in range(vocab)]
        return [str(index) for index in range(vocab)]
    labels = [label.strip() for label in text.split(",")]
    if len(labels) != vocab or len(set(labels)) != vocab or not all(labels):
        raise argparse.ArgumentTypeError(
            f"--labels: expected {vocab} distinct non-empty names, one per token of --target, got "
            f"{len(labels)}: {text!r}"
        )
    return labels


def run(args: argparse.Namespace) -> int:
    target, target_note = parse_distribution("--target", args.target)
    draft, draft_note = parse_distribution("--draft", args.draft)
    if draft.shape != target.shape:
        raise argparse.ArgumentTypeError(
            f"--draft: expected {target.shape[0]} probabilities, one per token of --target, got "
            f"{draft.shape[0]}: {args.draft!r}"
        )
    labels = parse_labels(args.labels, target.shape[0])
    if args.samples < 1:
        raise argparse.ArgumentTypeError(
            f"--samples: expected a positive number of steps, got {args.samples}"
        )
    if not 0 <= args.seed < 2**63:
        raise argparse.ArgumentTypeError(
            f"--seed: expected an integer in [0, 2^63), got {args.seed}"
        )

    out = Printer(color=_use_color(sys.stdout))
    for note in (target_note, draft_note):
        if note:
            out.line(out.dim(f"note: {note}"))
    step = exact_step(target, draft)
    print_exact(out, step, labels)
    generator = torch.Generator().manual_seed(args.seed)
    sim = simulate(target, draft, args.samples, generator)
    print_simulation(out, step, sim, labels, args.seed)
    print_explanation(out, step, labels)
    if not args.no_png:
        return write_png_and_report(out, args.png, step, sim, labels)
    return 0


# ----------------------------------------------------------------------------------------------
# Terminal output


# Short formulas kept on one line when wrapping: f(...) with one level of nested brackets, 1 - beta.
_FORMULA = re.compile(r"\w*\((?:[^()]|\([^()]*\))*\)|1 - beta|P - Q")


class Printer:
    """print() with optional ANSI styles."""

    def __init__(self, color: bool):
        self.color = color

    def line(self, text: str = "") -> None:
        print(text)

    def _style(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def bold(self, text: str) -> str:
        return self._style("1", text)

    def dim(self, text: str) -> str:
        return self._style("2", text)

    def good(self, text: str) -> str:
        return self._style("32", text)

    def bad(self, text: str) -> str:
        return self._style("31", text)

    def heading(self, text: str) -> None:
        self.line()
        self.line(self.bold(text))

    def paragraph(self, text: str, indent: str = "  ") -> None:
        """Wraps `text` without breaking short formulas such as norm(max(0, P - Q))."""
        protected = _FORMULA.sub(
            lambda m: m[0].replace(" ", "\xa0") if len(m[0]) <= 30 else m[0], text
        )
        wrapped = textwrap.fill(
            protected,
            WIDTH,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )
        self.line(wrapped.replace("\xa0", " "))

    def table(self, headers: list[str], rows: list[list[str]], styles: dict | None = None) -> None:
        """Left-aligns the first column, right-aligns the others; `styles` maps a column index to
        a style method applied after padding (so colour codes do not upset the widths)."""
        styles = styles or {}
        widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

        def render(row: list[str], styled: bool) -> str:
            cells = []
            for i, cell in enumerate(row):
                padded = cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                cells.append(styles[i](padded) if styled and i in styles else padded)
            return "  " + "  ".join(cells)

        self.line(self.dim(render(headers, styled=False)))
        for row in rows:
            self.line(render(row, styled=True))


def _use_color(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ


def _f(value: float) -> str:
    return f"{value:.4f}"


def print_exact(out: Printer, step: Step, labels: list[str]) -> None:
    out.line(out.bold("One step of speculative sampling with one drafted token (k = 1)"))
    out.paragraph(
        "The drafter proposes a token x drawn from Q. The target keeps it with probability "
        "min(1, P(x)/Q(x)); otherwise it emits a recovered token drawn from the residual "
        "norm(max(0, P - Q)). (After a kept draft the target also adds a bonus token drawn from "
        "P; it is a separate, next token and is not counted here.)"
    )
    out.line()
    rows = []
    never_drafted = False
    for i, label in enumerate(labels):
        if step.draft[i] > 0:
            keep = _f(step.keep[i])
        else:
            keep, never_drafted = "n/a", True
        rows.append(
            [
                label,
                _f(step.target[i]),
                _f(step.draft[i]),
                keep,
                _f(step.accepted[i]),
                _f(step.residual[i]),
                _f(step.recovered[i]),
                _f(step.output[i]),
            ]
        )
    rows.append(
        [
            "sum",
            _f(step.target.sum()),
            _f(step.draft.sum()),
            "",
            _f(step.accepted.sum()),
            _f(step.residual.sum()),
            _f(step.recovered.sum()),
            _f(step.output.sum()),
        ]
    )
    headers = [
        "token",
        "target P",
        "draft Q",
        "keep min(1,P/Q)",
        "kept min(P,Q)",
        "residual",
        "(1-beta)*residual",
        "output",
    ]
    out.table(headers, rows, styles={7: out.good})
    if never_drafted:
        out.line(out.dim("  n/a: Q(x) = 0, the drafter never proposes x"))
    out.line()
    beta = step.beta
    out.line(f"  acceptance rate  beta = sum min(P, Q) = {out.bold(_f(beta))}")
    out.line(
        f"                   (a draft is kept with probability beta, rejected with"
        f" 1 - beta = {_f(1 - beta)})"
    )
    out.line("  output           min(P(x), Q(x)) + (1 - beta) * residual(x)")
    width = max(len(label) for label in labels)
    for i, label in enumerate(labels):
        same = abs(float(step.output[i] - step.target[i])) < 1e-9
        verdict = out.good(f"= P({label})") if same else out.bad(f"!= P({label})")
        out.line(
            f"    {label + ':':<{width + 1}} {_f(step.accepted[i])} + {_f(1 - beta)} * "
            f"{_f(step.residual[i])}"
            f" = {_f(step.output[i])} {verdict}"
        )


def print_simulation(
    out: Printer, step: Step, sim: Simulation, labels: list[str], seed: int
) -> None:
    n = sim.samples
    out.heading(
        f"Simulation: {n:,} one-token steps (seed {seed}), one batched call to specsample.verify"
    )
    rows = []
    for i, label in enumerate(labels):
        kept = int(sim.accepted_counts[i]) / n
        recovered = int(sim.counts[i] - sim.accepted_counts[i]) / n
        rows.append(
            [
                label,
                _f(step.target[i]),
                _f(int(sim.counts[i]) / n),
                f"{_f(kept)} ({_f(step.accepted[i])})",
                f"{_f(recovered)} ({_f(step.recovered[i])})",
            ]
        )
    headers = ["token", "target P", "observed", "kept (exact)", "recovered (exact)"]
    out.table(headers, rows, styles={2: out.bold})
    sd = (step.beta * (1 - step.beta) / n) ** 0.5
    out.line()
    out.line(
        f"  acceptance rate  observed {out.bold(_f(sim.acceptance))}, exact beta {_f(step.beta)}"
        f" (one standard deviation: {sd:.4f})"
    )
    if sim.df == 0:
        out.line("  chi-square test  not applicable: P puts all its mass on one token")
        return
    p_text = f"{sim.p_value:.3g}"
    verdict = (
        out.good("consistent with P") if sim.p_value >= 1e-3 else out.bad("NOT consistent with P")
    )
    out.line(
        f"  chi-square test  X^2 = {sim.chi2:.3f} with {sim.df} degree"
        f"{'s' if sim.df > 1 else ''} of freedom, p-value = {out.bold(p_text)}: {verdict}"
    )
    out.paragraph(
        "(an exact sampler gives p-values spread evenly over [0, 1]; a p-value below 0.001 would "
        "point to a bug)",
        indent="                   ",
    )
    expected = sim.samples * step.target[step.target > 0]
    if bool((expected < 5).any()):
        out.line(
            out.dim(
                "  note: some expected counts are below 5; raise --samples for a "
                "reliable chi-square test"
            )
        )


def print_explanation(out: Printer, step: Step, labels: list[str]) -> None:
    out.heading("Why the output is exactly P")
    out.paragraph(WHY_EXACT)
    out.heading("The wrong rule: recovered token drawn from P instead of the residual")
    out.line("  output           min(P(x), Q(x)) + (1 - beta) * P(x)")
    width = max(len(label) for label in labels)
    for i, label in enumerate(labels):
        wrong = float(step.wrong_output[i])
        text = _f(wrong)
        same = abs(wrong - float(step.target[i])) < 1e-9
        out.line(
            f"    {label + ':':<{width + 1}} {_f(step.accepted[i])} + {_f(1 - step.beta)} * "
            f"{_f(step.target[i])}"
            f" = {text if same else out.bad(text)}   (P({label}) = {_f(step.target[i])})"
        )
    if bool(torch.allclose(step.wrong_output, step.target, rtol=0, atol=1e-9)):
        reason = "beta = 1" if step.beta >= 1 - 1e-12 else "the residual equals P"
        out.line(
            out.dim(
                f"  (for these P and Q the two rules agree because {reason}; in general "
                "they do not)"
            )
        )


# ----------------------------------------------------------------------------------------------
# Figure

SERIES_COLORS = ("#1f4e79", "#e08a1e", "#3a9a4a", "#8e5bb5", "#9a9a9a")


def write_png_and_report(
    out: Printer, path: Path, step: Step, sim: Simulation, labels: list[str]
) -> int:
    out.line()
    try:
        written = write_png(path, step, sim, labels)
    except OSError as error:
        print(f"specsample explain: could not write {str(path)!r}: {error}", file=sys.stderr)
        return 1
    if not written:
        out.line(
            "  no PNG written: matplotlib is not installed. Install it with "
            "pip install 'specsample[plot]' (or pip install matplotlib), or pass --no-png."
        )
        return 0
    out.line(f"  PNG written to {path}")
    return 0


def write_png(path: Path, step: Step, sim: Simulation, labels: list[str]) -> bool:
    """Grouped bars per token; returns False (writing nothing) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    vocab = len(labels)
    series = [
        ("target P", step.target),
        ("draft Q", step.draft),
        ("kept: min(P, Q)", step.accepted),
        ("recovered: (1 − β)·residual", step.recovered),
        ("observed frequency", sim.counts.double() / sim.samples),
    ]
    figure = Figure(figsize=(min(max(8.5, 2.2 * vocab + 1.5), 18.0), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    positions = torch.arange(vocab, dtype=torch.float64)
    for index, ((name, values), color) in enumerate(zip(series, SERIES_COLORS, strict=True)):
        offset = (index - (len(series) - 1) / 2) * width
        bars = axes.bar(
            (positions + offset).tolist(),
            values.tolist(),
            width,
            label=name,
            color=color,
            hatch="//" if index == len(series) - 1 else None,
            edgecolor="white",
            linewidth=0.5,
        )
        if vocab <= 6:
            axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    axes.set_xticks(positions.tolist(), labels)
    axes.set_xlabel("token")
    axes.set_ylabel("probability")
    axes.set_ylim(0, 1.15 * max(float(values.max()) for _, values in series))
    axes.spines[["top", "right"]].set_visible(False)
    axes.set_title(
        f"One speculative sampling step (k = 1): acceptance rate β = {step.beta:.4f}, "
        f"N = {sim.samples:,} steps\nkept + recovered = output = P; the observed frequencies "
        "should match P",
        fontsize=10,
    )
    figure.legend(loc="outside lower center", ncols=len(series), fontsize=8, frameon=False)
    figure.savefig(path, dpi=150)
    return True
