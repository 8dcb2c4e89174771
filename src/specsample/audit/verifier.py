"""`audit_verifier`: run a verification function on the hard cases and test its output against
the target's exact law (see `cases.py` for what is observed and why that law is rule-free, and
`stats.py` for the tests, the confidence bound and the power)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from specsample.audit import stats
from specsample.audit.cases import PAD, Case, default_cases, draw_trials, observed_pairs
from specsample.audit.shims import CouldNotJudge, Verifier, from_function, load_verifier

DEFAULT_SAMPLES = 200_000  # trials per case, sized for the power goal (docs/audit-results.md)
DEFAULT_ALPHA = 1e-4  # the false-failure rate of a whole audit (Bonferroni over its tests)
POWER = 0.99  # detectable_tv is the TV error detected with this probability
CHUNK_ROWS = 50_000  # trials per call of the verifier

PASS, REJECTED, COULD_NOT_JUDGE, SKIPPED = "pass", "rejected", "could not judge", "skipped"
EXIT_CODES = {PASS: 0, REJECTED: 1, COULD_NOT_JUDGE: 2}


@dataclass(frozen=True)
class TestResult:
    """One G-test of a case: `what` is "first token" or "first two tokens"."""

    what: str
    p_value: float
    statistic: float
    df: int
    cells: int
    observed_tv: float
    tv_upper_bound: float  # the true TV to the law is below this with probability TV_CONFIDENCE
    detectable_tv: float  # every TV error this large is detected with probability POWER
    pooled_mass: float
    rejected: bool


@dataclass
class CaseResult:
    """What one case found. status: pass, rejected, could not judge or skipped."""

    name: str
    description: str
    status: str
    message: str = ""
    samples: int = 0
    seconds: float = 0.0
    mean_emitted: float = 0.0
    tests: list[TestResult] = field(default_factory=list)
    first_token_observed: list[float] = field(default_factory=list)
    first_token_law: list[float] = field(default_factory=list)


@dataclass
class AuditReport:
    """The whole audit. verdict: rejected if any case was, else could not judge if any case
    could not be run or read, else pass (skipped cases do not count)."""

    target: str
    version: str
    note: str
    samples: int
    alpha: float
    alpha_per_test: float
    power: float
    seed: int
    seconds: float
    cases: list[CaseResult]
    message: str = ""

    @property
    def verdict(self) -> str:
        statuses = {case.status for case in self.cases}
        if REJECTED in statuses:
            return REJECTED
        if COULD_NOT_JUDGE in statuses or not (statuses - {SKIPPED}) or self.message:
            return COULD_NOT_JUDGE
        return PASS

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["verdict"] = self.verdict
        data["exit_code"] = self.exit_code
        return data


def audit_verifier(
    fn: Callable[..., torch.Tensor] | Verifier | str,
    *,
    samples: int = DEFAULT_SAMPLES,
    alpha: float = DEFAULT_ALPHA,
    cases: Sequence[Case] | Sequence[str] | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    """Audits a verification function for exactness.

    fn       a callable with the contract fn(draft_tokens [batch, k] int64, draft_probs
             [batch, k, vocab] | None, target_probs [batch, k+1, vocab], generator) -> tokens
             int64 [batch, k+1] (left-aligned, -1 padded), optionally taking draft_lengths=; a
             Verifier; or a TARGET string ("module:function", "ours:token", "transformers", ...).
    samples  trials per case.
    alpha    false-failure rate of the whole audit: each of its tests runs at alpha / tests.
    cases    Case objects or names from the default suite (None: all of it).
    seed     drives every draw of the audit; the global RNG is never used.

    Returns an AuditReport (never raises for a bad target: the report says it could not judge).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 100:
        raise ValueError(f"samples: expected an integer >= 100 (trials per case), got {samples!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha: expected a false-failure rate in (0, 1), got {alpha!r}")
    selected = _select_cases(cases)
    name = fn if isinstance(fn, str) else getattr(fn, "name", getattr(fn, "__qualname__", "fn"))
    start = time.perf_counter()
    try:
        verifier = _as_verifier(fn)
    except CouldNotJudge as error:
        return AuditReport(
            str(name), "", "", samples, alpha, alpha, POWER, seed, 0.0, [], str(error)
        )
    runnable = [case for case in selected if _skip_reason(verifier, case) is None]
    alpha_per_test = alpha / max(2 * len(runnable), 1)
    results = []
    # One intra-op thread: the cases are small tensors (and some shims loop over rows), where
    # more threads only add overhead, tenfold on a busy machine. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for index, case in enumerate(selected):
            reason = _skip_reason(verifier, case)
            if reason is not None:
                results.append(CaseResult(case.name, case.description, SKIPPED, reason))
                continue
            if progress is not None:
                progress(f"{verifier.name}: case {case.name} ({samples} trials)")
            seed_of_case = seed * 1000 + index
            results.append(run_case(verifier, case, samples, alpha_per_test, seed_of_case))
    finally:
        torch.set_num_threads(threads)
    return AuditReport(
        verifier.name,
        verifier.version,
        verifier.note,
        samples,
        alpha,
        alpha_per_test,
        POWER,
        seed,
        time.perf_counter() - start,
        results,
    )


def _as_verifier(fn: object) -> Verifier:
    if isinstance(fn, Verifier):
        return fn
    if isinstance(fn, str):
        return load_verifier(fn)
    return from_function(fn)


def _select_cases(cases: Sequence[Case] | Sequence[str] | None) -> list[Case]:
    suite = default_cases()
    if cases is None:
        return suite
    by_name = {case.name: case for case in suite}
    selected = []
    for case in cases:
        if isinstance(case, Case):
            selected.append(case)
        elif case in by_name:
            selected.append(by_name[case])
        else:
            raise ValueError(
                f"cases: expected Case objects or names from {sorted(by_name)}, got {case!r}"
            )
    if not selected:
        raise ValueError("cases: expected at least one case, got none")
    return selected


def _skip_reason(verifier: Verifier, case: Case) -> str | None:
    if case.point_mass and not verifier.point_mass:
        return "the audited implementation takes no point-mass drafts (draft_probs None)"
    if case.ragged and not verifier.ragged:
        return "the function takes no draft_lengths= keyword, so ragged rows cannot be passed"
    return None


def run_case(
    verifier: Verifier, case: Case, samples: int, alpha_per_test: float, seed: int
) -> CaseResult:
    """Runs `samples` trials of one case through the verifier and tests what came out."""
    start = time.perf_counter()
    result = CaseResult(case.name, case.description, COULD_NOT_JUDGE, samples=samples)
    draws = torch.Generator().manual_seed(seed)
    verifier_generator = torch.Generator().manual_seed(seed + 1)
    completions = torch.Generator().manual_seed(seed + 2)
    vocab = case.vocab
    pair_counts = torch.zeros(vocab * vocab, dtype=torch.int64)
    emitted_total = 0
    done = 0
    while done < samples:
        batch = min(CHUNK_ROWS, samples - done)
        trials = draw_trials(case, batch, draws)
        kwargs = {} if trials.draft_lengths is None else {"draft_lengths": trials.draft_lengths}
        try:
            tokens = verifier.fn(
                trials.draft_tokens,
                trials.draft_probs,
                trials.target_probs,
                verifier_generator,
                **kwargs,
            )
        except Exception as error:  # the target failed: nothing can be judged from this case
            result.message = (
                f"the function raised {type(error).__name__}: {error} (leave the case out with "
                "cases= / --cases if the function does not support it)"
            )
            result.seconds = time.perf_counter() - start
            return result
        try:
            tokens, emitted = check_output(tokens, trials, vocab)
        except CouldNotJudge as error:
            result.message = str(error)
            result.seconds = time.perf_counter() - start
            return result
        violation = drafts_not_kept(tokens, emitted, trials.draft_tokens, trials.draft_lengths)
        if violation:
            result.status, result.message = REJECTED, violation
            result.seconds = time.perf_counter() - start
            return result
        first, second = observed_pairs(case, tokens, completions)
        pair_counts += torch.bincount(first * vocab + second, minlength=vocab * vocab)
        emitted_total += int(emitted.sum())
        done += batch
    counts = pair_counts.numpy().astype(np.float64)
    first_counts = counts.reshape(vocab, vocab).sum(axis=1)
    first_law = case.first_token_law().numpy()
    result.tests = [
        _test("first token", first_counts, first_law, alpha_per_test),
        _test("first two tokens", counts, case.two_token_law().numpy(), alpha_per_test),
    ]
    result.status = REJECTED if any(test.rejected for test in result.tests) else PASS
    result.mean_emitted = emitted_total / samples
    result.first_token_observed = (first_counts / samples).tolist()
    result.first_token_law = first_law.tolist()
    result.seconds = time.perf_counter() - start
    return result


def _test(what: str, observed: np.ndarray, law: np.ndarray, alpha: float) -> TestResult:
    n = int(observed.sum())
    g = stats.goodness_of_fit(observed, law)
    tv = stats.total_variation(observed, law)
    return TestResult(
        what=what,
        p_value=g.p_value,
        statistic=g.statistic,
        df=g.df,
        cells=g.cells,
        observed_tv=tv,
        # Every cell counts (not only the law's support): the verifier may emit anywhere.
        tv_upper_bound=min(1.0, tv + stats.tv_margin(n, len(law))),
        detectable_tv=stats.detectable_tv(n, g.df, alpha, POWER),
        pooled_mass=g.pooled_mass,
        rejected=g.p_value < alpha,
    )


def check_output(tokens: object, trials, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64 [batch, k+1], emitted int64 [batch]) after checking the contract: an integer
    tensor of the right shape, ids in [0, vocab) left-aligned then -1, at least one per row and
    at most draft_lengths + 1. Raises CouldNotJudge naming what is wrong."""
    batch, k = trials.draft_tokens.shape
    if not isinstance(tokens, torch.Tensor):
        raise CouldNotJudge(
            f"output: expected an int64 tensor [batch={batch}, k+1={k + 1}], got "
            f"{type(tokens).__name__}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise CouldNotJudge(f"output: expected an integer tensor of token ids, got {tokens.dtype}")
    if tuple(tokens.shape) != (batch, k + 1):
        raise CouldNotJudge(
            f"output: expected shape [batch={batch}, k+1={k + 1}], got {tuple(tokens.shape)}"
        )
    tokens = tokens.detach().to("cpu", torch.int64)
    valid = tokens != PAD
    outside = valid & ((tokens < 0) | (tokens >= vocab))
    if bool(outside.any()):
        row, col = (int(v) for v in torch.nonzero(outside)[0])
        raise CouldNotJudge(
            f"output: token {int(tokens[row, col])} at row {row}, position {col} is outside the "
            f"vocabulary [0, {vocab}) (and is not the padding -1)"
        )
    emitted = valid.sum(dim=1)
    left_aligned = valid == (torch.arange(k + 1)[None, :] < emitted[:, None])
    if not bool(left_aligned.all()):
        row = int(torch.nonzero(~left_aligned.all(dim=1))[0])
        raise CouldNotJudge(
            f"output: row {row} is not left-aligned (tokens, then -1 only): {tokens[row].tolist()}"
        )
    if bool((emitted == 0).any()):
        row = int(torch.nonzero(emitted == 0)[0])
        raise CouldNotJudge(f"output: row {row} emitted no token (every step emits at least one)")
    return tokens, emitted


def drafts_not_kept(
    tokens: torch.Tensor,
    emitted: torch.Tensor,
    drafts: torch.Tensor,
    draft_lengths: torch.Tensor | None = None,
) -> str:
    """A message when some row emitted a token that is not its draft before its last token (every
    token but the last must be a kept draft) or more tokens than its drafts + 1, else ''."""
    k = drafts.shape[1]
    if draft_lengths is not None and bool((emitted > draft_lengths + 1).any()):
        row = int(torch.nonzero(emitted > draft_lengths + 1)[0])
        return (
            f"row {row} emitted {int(emitted[row])} tokens with draft_lengths "
            f"{int(draft_lengths[row])}: at most draft_lengths + 1 may come out"
        )
    before_last = torch.arange(k)[None, :] < (emitted[:, None] - 1)  # [batch, k]
    wrong = before_last & (tokens[:, :k] != drafts)
    if bool(wrong.any()):
        row, col = (int(v) for v in torch.nonzero(wrong)[0])
        return (
            f"row {row} emitted {int(tokens[row, col])} at position {col}, before its last token, "
            f"where the draft was {int(drafts[row, col])}: only kept drafts may precede the last "
            "emitted token"
        )
    return ""
