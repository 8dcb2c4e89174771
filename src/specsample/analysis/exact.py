"""Exact output distributions of a verification step, by enumeration in float64.

For a small vocabulary and draft length this enumerates every draft sequence and every outcome of
the randomness, and runs the rule implementation itself once per outcome, in one batch. The
randomness is split into the pieces on which the rule's decisions are constant (a keep test
u_i < min(1, p/q) has two pieces; the recovered or bonus token's uniform has one piece per token of
positive weight); the rule is driven with the midpoint of each piece and the piece's length is its
probability. The result is the exact distribution of emitted sequences, which `prefix_errors`
compares with the target at every prefix.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specsample.verify.result import PAD, VerifyResult
from specsample.verify.sampling import acceptance_probability, residual

# A "model" for enumeration: the next-token distribution (float64 [vocab]) after a prefix of ids.
PrefixModel = Callable[[tuple[int, ...]], torch.Tensor]
Rule = Callable[..., VerifyResult]


@dataclass
class _Outcomes:
    """One row per (draft sequence, piece of the randomness), ready to run as one batch."""

    draft_tokens: list[list[int]]
    draft_rows: list[torch.Tensor]
    target_rows: list[torch.Tensor]
    accept_uniforms: list[list[float]]
    sample_uniforms: list[float]
    weights: list[float]


def exact_token_rule_distribution(
    rule: Rule,
    target: PrefixModel,
    draft: PrefixModel,
    *,
    k: int,
    point_mass: bool = False,
) -> dict[tuple[int, ...], float]:
    """The exact distribution of the tokens one step of `rule` emits.

    rule:       a function with the signature of `specsample.verify.token.token_rule`.
    target:     prefix -> p(. | prefix); draft: prefix -> q(. | prefix).
    point_mass: draft deterministically (the argmax of q, lowest id on ties) and pass
                draft_probs=None, as an n-gram drafter does.
    Returns {emitted token tuple: probability}.
    """
    outcomes = _Outcomes([], [], [], [], [], [])
    vocab = int(target(()).shape[0])
    for drafts, weight in _draft_sequences(draft, vocab, k, point_mass):
        _add_pieces(outcomes, target, draft, drafts, weight, point_mass)
    return _emitted_distribution(rule, outcomes, k, point_mass)


def exact_block_rule_distribution(
    rule: Rule, target: PrefixModel, draft: PrefixModel, *, k: int
) -> dict[tuple[int, ...], float]:
    """The exact distribution of the tokens one step of a block-verification `rule` emits.

    The pieces of the randomness follow ALGORITHMS.md section 2, computed here independently in
    float64: each u_i passes (u_i <= h_i) or fails, tau is the last pass, and the final token's
    uniform has one piece per token of the block residual normalize(max(0, P_tau p - q)).
    """
    outcomes = _Outcomes([], [], [], [], [], [])
    vocab = int(target(()).shape[0])
    for drafts, weight in _draft_sequences(draft, vocab, k, point_mass=False):
        _add_block_pieces(outcomes, target, draft, drafts, weight)
    return _emitted_distribution(rule, outcomes, k, point_mass=False)


def expected_accepted(distribution: dict[tuple[int, ...], float]) -> float:
    """E[number of accepted drafts] = E[emitted tokens] - 1."""
    return sum((len(sequence) - 1) * weight for sequence, weight in distribution.items())


def _emitted_distribution(
    rule: Rule, outcomes: _Outcomes, k: int, point_mass: bool
) -> dict[tuple[int, ...], float]:
    """Runs `rule` once per outcome, in one batch, and adds up what it emitted."""
    rows = len(outcomes.weights)
    result = rule(
        torch.tensor(outcomes.draft_tokens, dtype=torch.int64).reshape(rows, k),
        None if point_mass else torch.stack(outcomes.draft_rows),
        torch.stack(outcomes.target_rows),
        torch.full((rows,), k, dtype=torch.int64),
        torch.tensor(outcomes.accept_uniforms, dtype=torch.float64).reshape(rows, k),
        torch.tensor(outcomes.sample_uniforms, dtype=torch.float64),
    )
    distribution: dict[tuple[int, ...], float] = defaultdict(float)
    for row, weight in zip(result.tokens.tolist(), outcomes.weights, strict=True):
        distribution[tuple(t for t in row if t != PAD)] += weight
    return dict(distribution)


def prefix_errors(
    distribution: dict[tuple[int, ...], float], target: PrefixModel
) -> tuple[float, float]:
    """(largest |P(next = v | prefix) - p(v | prefix)| over every emitted prefix and token,
    |total probability - 1|)."""
    counts: dict[tuple[int, ...], torch.Tensor] = {}
    vocab = int(target(()).shape[0])
    for sequence, weight in distribution.items():
        for j in range(len(sequence)):
            prefix = sequence[:j]
            if prefix not in counts:
                counts[prefix] = torch.zeros(vocab, dtype=torch.float64)
            counts[prefix][sequence[j]] += weight
    worst = 0.0
    for prefix, count in counts.items():
        conditional = count / count.sum()
        worst = max(worst, float((conditional - target(prefix).to(torch.float64)).abs().max()))
    return worst, abs(sum(distribution.values()) - 1.0)


def _draft_sequences(draft: PrefixModel, vocab: int, k: int, point_mass: bool):
    """(draft sequence, its probability under the drafter) for every possible sequence."""
    if point_mass:
        prefix: tuple[int, ...] = ()
        for _ in range(k):
            prefix += (int(draft(prefix).argmax()),)
        yield prefix, 1.0
        return
    for drafts in itertools.product(range(vocab), repeat=k):
        weight = 1.0
        for i in range(k):
            weight *= float(draft(drafts[:i])[drafts[i]])
        if weight > 0:
            yield drafts, weight


def _add_pieces(
    outcomes: _Outcomes,
    target: PrefixModel,
    draft: PrefixModel,
    drafts: tuple[int, ...],
    weight: float,
    point_mass: bool,
) -> None:
    k = len(drafts)
    target_rows = [target(drafts[:i]).to(torch.float64) for i in range(k + 1)]
    draft_rows = [_drafted_from(draft, drafts, i, point_mass) for i in range(k)]
    keep = [
        float(
            acceptance_probability(target_rows[i][drafts[i]].log(), draft_rows[i][drafts[i]].log())
        )
        for i in range(k)
    ]
    for accepted in range(k + 1):
        # Drafts 0..accepted-1 kept (u_i < keep_i), draft `accepted` rejected (u >= keep).
        pattern = 1.0
        uniforms = [0.5] * k
        for i in range(accepted):
            pattern *= keep[i]
            uniforms[i] = keep[i] / 2
        if accepted < k:
            pattern *= 1 - keep[accepted]
            uniforms[accepted] = (1 + keep[accepted]) / 2
        if pattern <= 0:
            continue
        final = (
            residual(target_rows[accepted], draft_rows[accepted])
            if accepted < k
            else target_rows[k]
        )
        _add_final_token_pieces(
            outcomes, drafts, draft_rows, target_rows, uniforms, final, weight * pattern
        )


def _add_block_pieces(
    outcomes: _Outcomes,
    target: PrefixModel,
    draft: PrefixModel,
    drafts: tuple[int, ...],
    weight: float,
) -> None:
    k = len(drafts)
    p = [target(drafts[:i]).to(torch.float64) for i in range(k + 1)]
    q = [draft(drafts[:i]).to(torch.float64) for i in range(k)]
    kept = [1.0]
    for i in range(k):
        kept.append(min(1.0, kept[i] * float(p[i][drafts[i]]) / float(q[i][drafts[i]])))
    thresholds = []
    for i in range(1, k + 1):
        if i == k:
            thresholds.append(kept[k])
            continue
        mass = float(torch.clamp(kept[i] * p[i] - q[i], min=0.0).sum())
        denominator = mass + 1.0 - kept[i]
        thresholds.append(mass / denominator if denominator > 0 else 1.0)
    for passes in itertools.product((True, False), repeat=k):
        pattern = 1.0
        for passed, h in zip(passes, thresholds, strict=True):
            pattern *= h if passed else 1 - h
        if pattern <= 0:
            continue
        uniforms = [
            h / 2 if passed else (1 + h) / 2 for passed, h in zip(passes, thresholds, strict=True)
        ]
        tau = max((i + 1 for i in range(k) if passes[i]), default=0)
        if tau == k:
            final = p[k]
        else:
            final = torch.clamp(kept[tau] * p[tau] - q[tau], min=0.0)
            final = final / final.sum() if float(final.sum()) > 0 else p[tau]
        _add_final_token_pieces(outcomes, drafts, q, p, uniforms, final, weight * pattern)


def _add_final_token_pieces(
    outcomes: _Outcomes,
    drafts: tuple[int, ...],
    draft_rows: list[torch.Tensor],
    target_rows: list[torch.Tensor],
    uniforms: list[float],
    final: torch.Tensor,
    weight: float,
) -> None:
    """One outcome per token of positive probability in `final` (normalised [vocab]): its
    sample uniform is the midpoint of the token's piece, its weight `weight` * final[token]."""
    upper = torch.cumsum(final, dim=0)
    for token in torch.nonzero(final > 0)[:, 0].tolist():
        outcomes.draft_tokens.append(list(drafts))
        outcomes.draft_rows.append(
            torch.stack(draft_rows) if drafts else torch.zeros(0, len(final))
        )
        outcomes.target_rows.append(torch.stack(target_rows))
        outcomes.accept_uniforms.append(uniforms)
        outcomes.sample_uniforms.append(float(upper[token] - final[token] / 2))
        outcomes.weights.append(weight * float(final[token]))


def _drafted_from(draft: PrefixModel, drafts: tuple[int, ...], i: int, point_mass: bool):
    """q_i: the distribution draft i was drawn from (one-hot for point-mass drafts)."""
    q = draft(drafts[:i]).to(torch.float64)
    if not point_mass:
        return q
    return torch.zeros_like(q).scatter_(0, torch.tensor([drafts[i]]), 1.0)
