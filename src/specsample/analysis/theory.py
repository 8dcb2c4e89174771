"""The theory every benchmark reports (Leviathan et al. 2022, section 3).

alpha: the acceptance rate, the mean over positions of beta = sum_v min(p(v), q(v)) = 1 - TV(p, q).
c:     the cost of one draft step divided by the cost of one target pass on 1 token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

VerifyCost = Callable[[int], float] | Mapping[int, float] | Sequence[float] | None


def acceptance_rate(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """beta = sum_v min(p(v), q(v)) per position: [..., vocab] -> [...]. The probability that the
    token rule keeps a draft sampled from q at that position."""
    if target_probs.shape != draft_probs.shape:
        raise ValueError(
            f"draft_probs: expected the shape of target_probs {tuple(target_probs.shape)}, got "
            f"{tuple(draft_probs.shape)}"
        )
    return torch.minimum(target_probs, draft_probs).sum(dim=-1)


def expected_tokens_per_pass(alpha: float, k: int) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha): expected emitted tokens per target pass with k drafts
    (accepted drafts plus the recovered or bonus token), for i.i.d. acceptance alpha."""
    _check_alpha(alpha)
    _check_k(k)
    if alpha == 1:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(
    alpha: float, k: int, cost_ratio: float, verify_cost: VerifyCost = None
) -> float:
    """Expected tokens per unit time relative to target-only decoding.

    (1 - alpha^(k+1)) / ((1 - alpha) (k c + v(k))), with v(k) the cost of a target pass over k+1
    tokens relative to a pass over 1: 1 when `verify_cost` is None, as on a GPU; on CPUs a pass
    over more tokens costs more, so pass the measured curve: a callable, mapping or sequence
    indexed by k (v(0) = 1 where a mapping or sequence leaves it out).
    """
    tokens = expected_tokens_per_pass(alpha, k)
    return step_speedup(tokens, k, cost_ratio, _verify_cost(verify_cost, k))


def step_speedup(
    tokens_per_step: float,
    draft_passes_per_step: float,
    cost_ratio: float,
    verify_cost: float = 1.0,
) -> float:
    """Tokens per unit time relative to target-only decoding, for a step that emits
    `tokens_per_step` tokens and costs `draft_passes_per_step` draft passes of relative cost c
    (`cost_ratio`) plus one target pass of relative cost `verify_cost` (1 = a 1-token pass):
    tokens_per_step / (draft_passes_per_step c + verify_cost). Target-only decoding emits 1
    token per 1-token pass, so this ratio is the speedup. Every speedup prediction in the project
    (theory, DecodeStats, benchmarks) ends in this division."""
    if not cost_ratio >= 0:
        raise ValueError(
            f"cost_ratio: expected a number >= 0 (draft step / target pass), got {cost_ratio!r}"
        )
    return tokens_per_step / (draft_passes_per_step * cost_ratio + verify_cost)


def best_draft_length(
    alpha: float, cost_ratio: float, *, max_k: int = 16, verify_cost: VerifyCost = None
) -> int:
    """The k in 0..max_k with the largest expected speedup (0 means drafting does not pay)."""
    _check_k(max_k, "max_k")
    speedups = [expected_speedup(alpha, k, cost_ratio, verify_cost) for k in range(max_k + 1)]
    return max(range(max_k + 1), key=lambda k: (speedups[k], -k))


def _verify_cost(verify_cost: VerifyCost, k: int) -> float:
    if verify_cost is None:
        return 1.0
    if (
        k == 0
        and not callable(verify_cost)
        and ((isinstance(verify_cost, Mapping) and 0 not in verify_cost) or len(verify_cost) == 0)
    ):
        return 1.0  # a pass over 1 token is the unit of cost
    if callable(verify_cost):
        value = verify_cost(k)
    else:
        try:
            value = verify_cost[k]
        except (KeyError, IndexError):
            raise ValueError(f"verify_cost: no measured cost for k={k}") from None
    if not value > 0:
        raise ValueError(f"verify_cost: expected a positive relative cost for k={k}, got {value!r}")
    return float(value)


def _check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha: expected an acceptance rate in [0, 1], got {alpha!r}")


def _check_k(k: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {k!r}")
