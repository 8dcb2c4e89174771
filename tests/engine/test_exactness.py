"""Statistical exactness of the whole decoding loop (`generate`), drafters and caches included.

Each test runs `generate` once on one big batch of N identical prompts with exact toy models
(vocab 3; the draft is the target plus noise, so acceptance is moderate) and G-tests the joint
distribution of the first three new tokens of every row (fewer when an EOS ends the row) against
the exact target joint p(a | prompt) p(b | prompt, a) p(c | prompt, a, b), read from
`ToyLM.logits_for` and warped with the same `logits_to_probs` as the loop. The AdaptiveDraftLength
variants draft only after their cost check's target-only steps, so they test the three new tokens
from their first draft on, against the exact marginal joint of those positions (summed over the
tokens before them).

A test fails when the p-value is below ALPHA = 1e-6: for an exact loop that is the false-failure
rate (cells with expected count below 5 are pooled so the chi-square tail applies). The seeds are
fixed, so a pass is reproducible, except for AdaptiveDraftLength, whose pause decisions depend on
measured wall-clock costs. Power: with N = ROWS = 4000 rows over 27 cells (df 26, the threshold is
G > 75.5) a bias of KL divergence 0.006 nats from the target joint raises the expected G by
2 N KL = 50 and is caught about half the time; a bias of 0.0125 nats (+100) 99.6 % of the time.
The negative controls below (a drafter that picks its drafts by argmax but reports the softmax q,
the bug docs/algorithms.md names; and one that samples from q but reports the uniform distribution)
reach G of about 3200 and 2000 with the same N.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chi2

from specsample.adapters.toy import ToyLM
from specsample.drafters.base import Draft
from specsample.drafters.model import ModelDrafter
from specsample.drafters.ngram import NgramDrafter
from specsample.drafters.tree import TreeDrafter, TreeShape
from specsample.engine import generate
from specsample.engine.length import FIRST_SINGLE_PASSES, AdaptiveDraftLength
from specsample.warpers import SamplingConfig, logits_to_probs
from stats_identities import assert_stats_identities

ALPHA = 1e-6
ROWS = 4000
VOCAB = 3
DEPTH = 3  # new tokens whose joint is tested
MIN_EXPECTED = 5.0
PROMPT = [0, 1, 2, 0, 1, 2, 0]  # repeats, so n-gram lookups hit
SHORT_PROMPT = [2, 1]
# AdaptiveDraftLength runs: the first new token comes from the prompt pass and the next
# FIRST_SINGLE_PASSES from the cost check's target-only steps (timing 1-token passes); the first
# draft is the probe's, at the step after them. These runs G-test the DEPTH tokens from there on
# (ADAPTIVE_WINDOW: new tokens ADAPTIVE_START .. ADAPTIVE_START + DEPTH - 1, against their exact
# marginal joint), so the tested tokens are the ones the probe's drafts and the steps after it
# emitted, not the target-only ones before (the loop never drafts past the limit).
ADAPTIVE_START = FIRST_SINGLE_PASSES + 1
ADAPTIVE_NEW_TOKENS = ADAPTIVE_START + DEPTH


def toy_pair() -> tuple[ToyLM, ToyLM]:
    target = ToyLM(VOCAB, seed=3, scale=1.5)
    return target, ToyLM(VOCAB, seed=4, base=target, noise=1.0)


def g_statistic(observed: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """(G, degrees of freedom) of observed counts against expected probabilities. Cells with an
    expected count below MIN_EXPECTED are pooled into one cell; a count in a cell of probability 0
    gives G = inf."""
    observed = observed.flatten().to(torch.float64)
    expected = expected_probs.flatten().to(torch.float64) * observed.sum()
    if bool((observed[expected == 0] > 0).any()):
        return float("inf"), 1
    small = (expected > 0) & (expected < MIN_EXPECTED)
    large = expected >= MIN_EXPECTED
    o = torch.cat([observed[large], observed[small].sum().reshape(1)])
    e = torch.cat([expected[large], expected[small].sum().reshape(1)])
    o, e = o[e > 0], e[e > 0]
    g = 2 * float(torch.where(o > 0, o * torch.log(o / e), torch.zeros_like(o)).sum())
    return g, len(e) - 1


def p_value(*tests: tuple[float, int]) -> float:
    """p-value of independent G-tests combined (G and degrees of freedom add)."""
    g = sum(t[0] for t in tests)
    df = sum(t[1] for t in tests)
    return 0.0 if g == float("inf") else float(chi2.sf(g, df))


def target_outcomes(
    target: ToyLM,
    prompt: list[int],
    sampling: SamplingConfig,
    eos: tuple[int, ...],
    start: int = 0,
) -> dict[tuple[int, ...], float]:
    """Exact probability of each outcome: new tokens start .. start + DEPTH - 1, or fewer when an
    EOS ends the row (the product of the warped target's next-token probabilities, summed over
    the start tokens before them: their marginal joint)."""
    if start and eos:
        raise ValueError(f"start: expected 0 with an EOS (rows may end before it), got {start}")
    outcomes: dict[tuple[int, ...], float] = {}

    def walk(tokens: tuple[int, ...], prob: float) -> None:
        if len(tokens) == start + DEPTH or (tokens and tokens[-1] in eos):
            window = tokens[start:]
            outcomes[window] = outcomes.get(window, 0.0) + prob
            return
        logits = target.logits_for(prompt + list(tokens)).double()
        probs = logits_to_probs(logits, sampling).tolist()
        for token in range(VOCAB):
            walk(tokens + (token,), prob * probs[token])

    walk((), 1.0)
    return outcomes


def outcome_test(
    rows: list[list[int]], expected: dict[tuple[int, ...], float], start: int = 0
) -> tuple[float, int]:
    """G-test of the rows' outcomes (new tokens start .. start + DEPTH - 1) against their exact
    probabilities."""
    counts = Counter(tuple(row[start : start + DEPTH]) for row in rows)
    if not set(counts) <= set(expected):
        return float("inf"), 1  # an outcome the target cannot produce
    cells = sorted(expected)
    observed = torch.tensor([counts[c] for c in cells], dtype=torch.float64)
    return g_statistic(observed, torch.tensor([expected[c] for c in cells], dtype=torch.float64))


def exactness_p_value(
    drafter,
    *,
    prompts: tuple[list[int], ...] = (PROMPT,),
    sampling: SamplingConfig | None = None,
    max_new_tokens: int = DEPTH,
    draft_length=2,
    eos: tuple[int, ...] = (),
    seed: int = 0,
    rule: str = "token",
    start: int = 0,
) -> float:
    """Runs generate on ROWS rows (prompts cycled through the batch) and G-tests each prompt's
    rows (their new tokens start .. start + DEPTH - 1) against that prompt's exact outcome
    distribution; one combined p-value. drafter None: target-only decoding (nothing is
    drafted)."""
    target, _ = toy_pair()
    sampling = sampling or SamplingConfig()
    batch = [prompts[i % len(prompts)] for i in range(ROWS)]
    out = generate(
        target,
        batch,
        generator=torch.Generator().manual_seed(seed),
        drafter=drafter,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        draft_length=draft_length,
        eos_token_ids=eos,
        rule=rule,
    )
    if drafter is None:
        assert out.stats.drafted == 0
    else:
        assert out.stats.drafted > 0, "the drafter never drafted: nothing was tested"
    assert_stats_identities(out.stats)
    for request_stats in out.request_stats:
        assert_stats_identities(request_stats)
    tests = []
    for g, prompt in enumerate(prompts):
        rows = out.tokens[g :: len(prompts)]
        expected = target_outcomes(target, prompt, sampling, eos, start)
        tests.append(outcome_test(rows, expected, start))
    return p_value(*tests)


class NeverPausedLength(AdaptiveDraftLength):
    """The per-row schedule of AdaptiveDraftLength without the cost-based pause."""

    def _drafting_pays(self, state, costs) -> bool:
        return True


def model_drafter() -> ModelDrafter:
    return ModelDrafter(toy_pair()[1])


def tree_drafter(branching: tuple[int, ...], children: str) -> TreeDrafter:
    return TreeDrafter(toy_pair()[1], TreeShape(branching), children=children)


VARIANTS = {
    "model-k2": lambda: exactness_p_value(model_drafter(), draft_length=2),
    # k = 3 needs 4 new tokens to be drafted uncut (the loop never drafts past the limit).
    "model-k3": lambda: exactness_p_value(model_drafter(), draft_length=3, max_new_tokens=4),
    "ngram": lambda: exactness_p_value(NgramDrafter(max_ngram=2), draft_length=3),
    # Draft-side stops: rows of one batch end their drafts at different positions, chosen by
    # the draft's own probabilities (tests/drafters/test_model_drafter.py checks they do stop).
    "model-confidence-stop": lambda: exactness_p_value(
        ModelDrafter(toy_pair()[1], confidence=0.6), draft_length=3, max_new_tokens=4
    ),
    "model-survival-stop": lambda: exactness_p_value(
        ModelDrafter(toy_pair()[1], survival=0.3), draft_length=3, max_new_tokens=4
    ),
    # EOS = 2 ends rows early, often inside a draft (later drafts and the cache past it dropped).
    "eos": lambda: exactness_p_value(model_drafter(), draft_length=3, max_new_tokens=4, eos=(2,)),
    "ragged-prompts": lambda: exactness_p_value(model_drafter(), prompts=(PROMPT, SHORT_PROMPT)),
    # Whether AdaptiveDraftLength pauses depends on measured wall-clock costs (its cost check's
    # target-only steps come first, then probes); the never-paused variant makes sure the
    # per-row schedule (different k in one batch) is exercised on every machine. These test the
    # window of new tokens from the probe on (ADAPTIVE_START): every draft falls inside it.
    "adaptive-length": lambda: exactness_p_value(
        model_drafter(),
        draft_length=AdaptiveDraftLength(max_k=3, start_k=1, probe_every=2),
        max_new_tokens=ADAPTIVE_NEW_TOKENS,
        start=ADAPTIVE_START,
    ),
    "adaptive-length-never-paused": lambda: exactness_p_value(
        model_drafter(),
        draft_length=NeverPausedLength(max_k=3, start_k=1),
        max_new_tokens=ADAPTIVE_NEW_TOKENS,
        start=ADAPTIVE_START,
    ),
    "block-rule-k3": lambda: exactness_p_value(
        model_drafter(), draft_length=3, max_new_tokens=4, rule="block"
    ),
    "block-rule-ngram": lambda: exactness_p_value(
        NgramDrafter(max_ngram=2), draft_length=3, rule="block"
    ),
    # The command line's default: block verification of drafts whose length the draft's own
    # probabilities chose (its confidence and survival stops), offered by the adaptive length
    # (lengths "costs" for a drafter that stops itself).
    "block-rule-draft-stops": lambda: exactness_p_value(
        ModelDrafter(toy_pair()[1], confidence=0.6, survival=0.3),
        draft_length=3,
        max_new_tokens=4,
        rule="block",
    ),
    "block-rule-draft-stops-adaptive": lambda: exactness_p_value(
        ModelDrafter(toy_pair()[1], confidence=0.6, survival=0.3),
        draft_length=AdaptiveDraftLength(max_k=3, probe_every=2),
        max_new_tokens=ADAPTIVE_NEW_TOKENS,
        start=ADAPTIVE_START,
        rule="block",
    ),
    # Multi-draft and trees: scored in one target pass, verified by recursive rejection sampling.
    "chains-2-without-replacement": lambda: exactness_p_value(
        tree_drafter((2, 1), "without_replacement")
    ),
    "tree-2x2-iid": lambda: exactness_p_value(tree_drafter((2, 2), "iid")),
    "tree-3,1-top": lambda: exactness_p_value(tree_drafter((3, 1), "top")),
    "tree-ragged-prompts-eos": lambda: exactness_p_value(
        tree_drafter((2, 2), "without_replacement"),
        prompts=(PROMPT, SHORT_PROMPT),
        max_new_tokens=4,
        eos=(2,),
    ),
    "tree-temperature-0.7-top-k-2": lambda: exactness_p_value(
        tree_drafter((2, 1), "iid"), sampling=SamplingConfig(temperature=0.7, top_k=2)
    ),
    "temperature-0.7": lambda: exactness_p_value(
        model_drafter(), sampling=SamplingConfig(temperature=0.7)
    ),
    "temperature-0.7-top-k-2": lambda: exactness_p_value(
        model_drafter(), sampling=SamplingConfig(temperature=0.7, top_k=2)
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generated_joint_matches_target_joint(variant):
    assert VARIANTS[variant]() > ALPHA


class MisreportingDrafter:
    """Negative control: drafts from a toy model's q (sampled, or argmax) but reports
    `report(q)` as the draft distribution."""

    forward_passes = 0
    fixed_depth = None

    def __init__(self, model: ToyLM, *, argmax: bool, report):
        self.model = model
        self.argmax = argmax
        self.report = report
        self._q: dict[tuple[int, ...], torch.Tensor] = {}

    def set_rows(self, sequences, keep, prompts):
        pass

    def _warped(self, prefix: list[int], sampling: SamplingConfig) -> torch.Tensor:
        key = tuple(prefix)
        if key not in self._q:
            self._q[key] = logits_to_probs(self.model.logits_for(prefix), sampling)
        return self._q[key]

    def propose(self, sequences, max_lengths, rows) -> Draft:
        sampling, generator = rows.configs[0], rows.generators[0]
        batch, k = len(sequences), int(max_lengths.max())
        prefixes = [list(seq) for seq in sequences]
        tokens = torch.zeros(batch, k, dtype=torch.int64)
        reported = torch.zeros(batch, k, VOCAB)
        for i in range(k):
            q = torch.stack([self._warped(prefix, sampling) for prefix in prefixes])
            if self.argmax:
                token = q.argmax(dim=-1)
            else:
                token = torch.multinomial(q, 1, generator=generator)[:, 0]
            tokens[:, i] = token
            reported[:, i] = self.report(q)
            for prefix, t in zip(prefixes, token.tolist(), strict=True):
                prefix.append(t)
        return Draft.chain(tokens, reported, max_lengths.clone())


CONTROLS = {
    "argmax-drafts-softmax-reported": dict(argmax=True, report=lambda q: q),
    "sampled-drafts-uniform-reported": dict(argmax=False, report=lambda q: torch.ones_like(q) / 3),
}


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_negative_controls_fail_the_same_test(control):
    drafter = MisreportingDrafter(toy_pair()[1], **CONTROLS[control])
    assert exactness_p_value(drafter, draft_length=2) < ALPHA


def test_adaptive_negative_control_fails_the_window_test():
    """The adaptive variants' test (new tokens from the probe on, against their exact marginal
    joint) must catch a wrong rule: argmax drafts reported as the softmax q, drafted at the
    lengths AdaptiveDraftLength offers."""
    drafter = MisreportingDrafter(toy_pair()[1], argmax=True, report=lambda q: q)
    p = exactness_p_value(
        drafter,
        draft_length=NeverPausedLength(max_k=3, start_k=1),
        max_new_tokens=ADAPTIVE_NEW_TOKENS,
        start=ADAPTIVE_START,
    )
    assert p < ALPHA


def test_the_window_marginal_sums_to_one_and_matches_the_plain_joint_at_start_zero():
    target, _ = toy_pair()
    sampling = SamplingConfig()
    window = target_outcomes(target, PROMPT, sampling, (), ADAPTIVE_START)
    assert len(window) == VOCAB**DEPTH
    assert sum(window.values()) == pytest.approx(1.0, abs=1e-12)
    plain = target_outcomes(target, PROMPT, sampling, ())
    assert target_outcomes(target, PROMPT, sampling, (), 0) == plain
    # the window's law is not the first tokens' law (the test would not notice a shifted window)
    assert max(abs(window[c] - plain[c]) for c in plain) > 1e-3


def test_tree_negative_control_top_children_reported_as_softmax_fails(monkeypatch):
    """A tree drafter that picks each node's children deterministically (top-m) but reports the
    softmax q they were 'drawn from' (the mistake docs/algorithms.md warns of) must fail
    the same test."""
    import specsample.drafters.tree as tree_module

    real_draw = tree_module.draw_children

    def top_reported_as_softmax(q, m, mode, generator):
        tokens, _, valid = real_draw(q, m, "top", generator)
        return tokens, q[:, None, :].expand(-1, m, -1).clone(), valid

    monkeypatch.setattr(tree_module, "draw_children", top_reported_as_softmax)
    assert exactness_p_value(tree_drafter((2, 1), "iid")) < ALPHA


# ---------------------------------------------------------------- fitting passes to their costs
# The policy's trim cuts drafts after they were made (verify only what is worth its pass) and
# the engine pads a pass with filler where a wider one costs less (engine.length, part 4). The
# cut must depend on the drafts and past steps only. Forced here on every step, per row at
# random (the policy's own cut is one width per batch, and it happens where the costs say so),
# with every chain pass padded by 3 filler tokens; the negative control cuts a row's draft
# where the target would be likely to reject it, which the same test must catch.


def _cut_rows(draft: Draft, lengths: torch.Tensor) -> Draft:
    return Draft.chain(draft.tokens, draft.probs, torch.minimum(draft.lengths, lengths))


def _pad_every_pass(monkeypatch) -> None:
    from specsample.engine.length import StepCosts

    monkeypatch.setattr(StepCosts, "pad_width", lambda self, tokens, min_samples=3: tokens + 3)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_drafts_cut_at_random_and_padded_passes_keep_the_joint(monkeypatch, temperature):
    from specsample.engine.engine import Engine

    cuts = torch.Generator().manual_seed(5)

    def random_cut(self, ids, draft):
        if not draft.num_nodes:
            return draft
        return _cut_rows(
            draft, torch.randint(0, draft.num_nodes + 1, (draft.batch,), generator=cuts)
        )

    monkeypatch.setattr(Engine, "_trim", random_cut)
    _pad_every_pass(monkeypatch)
    sampling = SamplingConfig(temperature=temperature)
    for drafter in (model_drafter(), NgramDrafter(max_ngram=2)):
        p = exactness_p_value(
            drafter, sampling=sampling, draft_length=3, max_new_tokens=4, eos=(2,)
        )
        assert p > ALPHA, type(drafter).__name__


def test_the_policys_own_trim_and_padding_keep_the_joint(monkeypatch):
    """The real trim of AdaptiveDraftLength, on a cost curve put in front of it under which
    a step verifies one draft at most (at the prior's rates: 1.67 tokens for a 1.5 pass, 2.11
    for 3.0, 2.41 for 3.1), and padded passes."""
    from specsample.engine.length import StepCosts

    real_update = AdaptiveDraftLength.update

    def kinked_update(self, *args):
        real_update(self, *args)
        measured = StepCosts()
        for _ in range(3):
            measured.draft_step.add(0.01)
            for n, cost in ((1, 1.0), (2, 1.5), (3, 3.0), (4, 3.1)):
                measured.add_target_pass(n, cost)
        bucket = 1 << max(0, len(args[0]) - 1).bit_length()
        self._costs = self.bucket_costs[bucket] = measured
        self.verdicts[bucket] = self.can_pay = True

    real_trim, cuts = AdaptiveDraftLength.trim, []

    def counted_trim(self, rows, depths):
        width = real_trim(self, rows, depths)
        cuts.append(width < max(depths, default=0))
        return width

    monkeypatch.setattr(AdaptiveDraftLength, "update", kinked_update)
    monkeypatch.setattr(AdaptiveDraftLength, "trim", counted_trim)
    _pad_every_pass(monkeypatch)
    p = exactness_p_value(
        ModelDrafter(toy_pair()[1], confidence=0.6),
        draft_length=AdaptiveDraftLength(max_k=3, lengths="costs"),
        max_new_tokens=8,
        sampling=SamplingConfig(temperature=1.0),
    )
    assert p > ALPHA
    assert any(cuts), cuts  # drafts were cut


def test_negative_control_a_cut_that_reads_the_target_fails(monkeypatch):
    from specsample.engine.engine import Engine

    target = toy_pair()[0]
    sampling = SamplingConfig()

    def peeking_cut(self, ids, draft):
        if not draft.num_nodes:
            return draft
        lengths = draft.lengths.clone()
        for b, request in enumerate(self._running):
            if int(lengths[b]):
                token = int(draft.tokens[b, 0])
                p = logits_to_probs(target.logits_for(request.sequence), sampling)[token]
                if float(p) < float(draft.probs[b, 0, token]):
                    lengths[b] = 0  # where a rejection could happen, draw from the target
        return _cut_rows(draft, lengths)

    monkeypatch.setattr(Engine, "_trim", peeking_cut)
    p = exactness_p_value(model_drafter(), draft_length=2, sampling=sampling)
    print(f"negative control p = {p:.3g}")
    assert p < ALPHA
