"""Typical acceptance (Medusa, Cai et al. 2024, arXiv 2401.10774). LOSSY.

    threshold_i = min(epsilon, delta * exp(-H(p_i)))      H in nats, 0 log 0 = 0
    keep drafted x_i while p_i(x_i) > threshold_i          (i < draft_lengths; p = 0 is never kept)
    emit one more token from p_n, n = the number kept      (Medusa's choice, after a rejection too)

The keep test is deterministic (no uniform is used) and ignores the drafter's distribution, so a
draft the target finds plausible is kept even where the target would rarely have produced it. After
a rejection the next token is drawn from the target p_n itself, not from the residual
max(0, p_n - q_n); together this makes the output NOT distributed as the target (`typical_distance`
measures by how much). Defaults are Medusa's: epsilon = posterior_threshold = 0.09 and
delta = posterior_alpha = 0.3 (= sqrt(epsilon)). Medusa computes H with log(p + 1e-5); here H is the
exact entropy.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from specsample.analysis.exact import (
    PrefixModel,
    exact_token_rule_distribution,
    expected_accepted,
    prefix_errors,
)
from specsample.rules.result import PAD, VerifyResult, assemble_tokens
from specsample.rules.sampling import sample_from_weights
from specsample.rules.token import count_leading_kept, token_rule

EPSILON = 0.09  # Medusa's posterior_threshold: the hard cap on the threshold
DELTA = 0.3  # Medusa's posterior_alpha: the scale of the entropy-dependent threshold


def typical_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
    *,
    epsilon: float = EPSILON,
    delta: float = DELTA,
) -> VerifyResult:
    """Typical acceptance on checked inputs, with the positional signature of
    `specsample.rules.token.token_rule`. LOSSY: the output is not distributed as the target.

    draft_tokens    int64 [batch, k]; entries at i >= draft_lengths[b] are ignored (any valid id)
    draft_probs     ignored (float [batch, k, vocab] or None): the keep test reads only the target
    target_probs    float [batch, k+1, vocab]
    draft_lengths   int64 [batch], 0 <= draft_lengths[b] <= k
    accept_uniforms ignored (float64 [batch, k]): the keep test is deterministic
    sample_uniforms float64 [batch] in [0, 1): draws the final token from p at the first rejected
                    position, or the bonus token from p after the last draft
    epsilon         in (0, 1]: the hard cap of the threshold
    delta           > 0 (finite): the scale of the entropy-dependent threshold

    Returns a VerifyResult with rule_used="typical".
    """
    epsilon, delta = _check_thresholds(epsilon, delta)
    kept = typical_keep_mask(draft_tokens, target_probs, epsilon=epsilon, delta=delta)
    num_accepted = count_leading_kept(kept, draft_lengths)  # [batch]
    rows = torch.arange(draft_tokens.shape[0], device=draft_tokens.device)
    compute_dtype = torch.promote_types(target_probs.dtype, torch.float32)
    final_probs = target_probs[rows, num_accepted].to(compute_dtype)  # [batch, vocab]
    final_token = sample_from_weights(final_probs, sample_uniforms)
    tokens = assemble_tokens(draft_tokens, num_accepted, final_token)
    return VerifyResult(tokens, num_accepted, rule_used="typical")


def typical_keep_mask(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    epsilon: float = EPSILON,
    delta: float = DELTA,
) -> torch.Tensor:
    """bool [batch, k]: p_i(x_i) > min(epsilon, delta * exp(-H(p_i))), H the entropy in nats of
    target_probs[:, i] (computed in float32 or wider). draft_tokens int64 [batch, k],
    target_probs float [batch, k+1, vocab] (only the first k rows are read)."""
    epsilon, delta = _check_thresholds(epsilon, delta)
    k = draft_tokens.shape[1]
    compute_dtype = torch.promote_types(target_probs.dtype, torch.float32)
    rows = target_probs[:, :k].to(compute_dtype)  # [batch, k, vocab]
    entropy = torch.special.entr(rows).sum(dim=-1, dtype=torch.float64)  # [batch, k]
    threshold = torch.clamp(delta * torch.exp(-entropy), max=epsilon)
    drafted_p = rows.gather(2, draft_tokens[:, :, None])[:, :, 0].to(torch.float64)
    return drafted_p > threshold


def _check_thresholds(epsilon: float, delta: float) -> tuple[float, float]:
    epsilon, delta = float(epsilon), float(delta)
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(
            f"epsilon: expected a probability in (0, 1], got {epsilon!r}; it caps the keep "
            f"threshold (Medusa's posterior_threshold, default {EPSILON})"
        )
    if not (delta > 0.0 and math.isfinite(delta)):
        raise ValueError(
            f"delta: expected a finite number > 0, got {delta!r}; it scales exp(-entropy) in the "
            f"keep threshold (Medusa's posterior_alpha, default {DELTA})"
        )
    return epsilon, delta


def exact_typical_distribution(
    target: PrefixModel,
    draft: PrefixModel,
    *,
    k: int,
    epsilon: float = EPSILON,
    delta: float = DELTA,
) -> dict[tuple[int, ...], float]:
    """The exact distribution {emitted token tuple: probability} of one step of `typical_rule`,
    by enumeration in float64 (small vocab and k only).

    Every draft sequence x_1..x_k (weighted by its probability under `draft`) is run through
    `typical_rule` itself, once per piece of the final token's uniform. The keep test uses no
    randomness, and the final token is an inverse-CDF draw from one of the rows p_0..p_k, so the
    rule's output is constant between consecutive breakpoints of the union of the k+1 rows'
    cumulative sums: each such piece is run at its midpoint and weighs its length.
    (`analysis.exact.exact_token_rule_distribution` does not fit this rule: its pieces of the final
    uniform follow the token rule's residual, not the row this rule draws from.)
    """
    _check_thresholds(epsilon, delta)
    vocab = int(target(()).shape[0])
    drafts_rows: list[tuple[int, ...]] = []
    target_rows: list[torch.Tensor] = []
    uniforms: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    for drafts in itertools.product(range(vocab), repeat=k):
        weight = math.prod(float(draft(drafts[:i])[drafts[i]]) for i in range(k))
        if weight <= 0:
            continue
        rows = torch.stack([target(drafts[:i]).to(torch.float64) for i in range(k + 1)])
        midpoints, lengths = _final_uniform_pieces(rows)
        drafts_rows += [drafts] * len(lengths)
        target_rows += [rows] * len(lengths)
        uniforms.append(midpoints)
        weights.append(weight * lengths)
    count = len(drafts_rows)
    result = typical_rule(
        torch.tensor(drafts_rows, dtype=torch.int64).reshape(count, k),
        None,
        torch.stack(target_rows),
        torch.full((count,), k, dtype=torch.int64),
        torch.full((count, k), 0.5, dtype=torch.float64),
        torch.cat(uniforms),
        epsilon=epsilon,
        delta=delta,
    )
    distribution: dict[tuple[int, ...], float] = defaultdict(float)
    for row, weight in zip(result.tokens.tolist(), torch.cat(weights).tolist(), strict=True):
        distribution[tuple(t for t in row if t != PAD)] += weight
    return dict(distribution)


def _final_uniform_pieces(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints, lengths) of the pieces of [0, 1) cut at every cumulative sum of every row of
    rows float64 [k+1, vocab]; pieces of length 0 are dropped."""
    cuts = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), rows.cumsum(dim=1).flatten()])
    edges = torch.unique(cuts.clamp(0.0, 1.0))  # sorted
    lengths = edges[1:] - edges[:-1]
    midpoints = (edges[1:] + edges[:-1]) / 2
    positive = lengths > 0
    return midpoints[positive], lengths[positive]


@dataclass(frozen=True)
class TypicalDistance:
    """How far one step of typical acceptance is from the target, and what it gains, computed
    exactly by enumeration.

    max_prefix_error:            largest |P(next = v | prefix) - p(v | prefix)| over every emitted
                                 prefix and token (`analysis.exact.prefix_errors`; exact rules: 0).
    first_token_total_variation: total variation distance between the first emitted token and
                                 p(. | ()): 1/2 sum_v |P(first = v) - p(v)|, in [0, 1].
    mass_error:                  |total probability - 1| of the enumerated distribution.
    expected_accepted:           E[accepted drafts] of typical acceptance.
    token_rule_expected_accepted: E[accepted drafts] of the exact token rule on the same pair.
    """

    max_prefix_error: float
    first_token_total_variation: float
    mass_error: float
    expected_accepted: float
    token_rule_expected_accepted: float

    @property
    def acceptance_gain(self) -> float:
        """Extra accepted drafts per step bought by giving up exactness."""
        return self.expected_accepted - self.token_rule_expected_accepted


def typical_distance(
    target: PrefixModel,
    draft: PrefixModel,
    *,
    k: int,
    epsilon: float = EPSILON,
    delta: float = DELTA,
) -> TypicalDistance:
    """Measures typical acceptance against the target (and against the token rule's acceptance)
    on a small target/draft pair (prefix -> distribution, float64 [vocab]), with k drafts."""
    distribution = exact_typical_distribution(target, draft, k=k, epsilon=epsilon, delta=delta)
    worst, mass_error = prefix_errors(distribution, target)
    first = torch.zeros(int(target(()).shape[0]), dtype=torch.float64)
    for sequence, weight in distribution.items():
        first[sequence[0]] += weight
    first_tv = 0.5 * float((first - target(()).to(torch.float64)).abs().sum())
    exact = exact_token_rule_distribution(token_rule, target, draft, k=k)
    return TypicalDistance(
        max_prefix_error=worst,
        first_token_total_variation=first_tv,
        mass_error=mass_error,
        expected_accepted=expected_accepted(distribution),
        token_rule_expected_accepted=expected_accepted(exact),
    )
