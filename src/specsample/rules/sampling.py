"""The two primitives every exact rule is built from, and the sampler they feed.

- `acceptance_probability`: the keep test of one drafted token. It needs only two numbers, the
  target's and the drafter's log-probability of that token.
- `residual`: the distribution a token is recovered from after a rejection. It needs both full
  distributions; drawing the recovered token from the target alone is NOT exact (it counts the
  mass min(P, Q) twice).
- `sample_from_weights`: draws one index per row from non-negative, unnormalised weights with one
  pre-drawn uniform per row (inverse CDF, accumulated in float64), so the randomness is an argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Rows are sampled in two stages (pick a block of this many ids, then an id inside it) so that the
# float64 prefix sums cover [batch, vocab / BLOCK] + [batch, BLOCK] entries, not [batch, vocab].
BLOCK = 1024


def acceptance_probability(
    target_logprob: torch.Tensor, draft_logprob: torch.Tensor
) -> torch.Tensor:
    """min(1, exp(target_logprob - draft_logprob)), elementwise.

    This is the probability of keeping a drafted token x, with target_logprob = log P(x) and
    draft_logprob = log Q(x). The keep test needs nothing else: not the rest of either distribution.
    A token the target gives probability 0 (log-prob -inf) is never kept. A draft log-prob of -inf
    means the token could not have been drafted; the result is then 1 by convention.
    """
    target_logprob = torch.as_tensor(target_logprob)
    draft_logprob = torch.as_tensor(draft_logprob)
    dtype = torch.promote_types(
        torch.promote_types(target_logprob.dtype, draft_logprob.dtype), torch.float32
    )
    log_ratio = target_logprob.to(dtype) - draft_logprob.to(dtype)
    # -inf - -inf is NaN: an undraftable token (Q = 0) is given 1, a token P rules out 0.
    log_ratio = torch.where(draft_logprob == float("-inf"), 0.0, log_ratio)
    return torch.exp(torch.clamp(log_ratio, max=0.0))


def residual(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, P - Q)) over the last dimension `[..., vocab]`.

    This is the distribution of the recovered token after a drafted token was rejected. Unlike the
    keep test it needs both full distributions: P - Q removes the mass the draft already delivered,
    and drawing the recovered token from P instead of this residual is not exact.

    Where P = Q (no positive mass left) a rejection has probability 0; the residual is then defined
    as P itself, so the result is always a distribution and never NaN.
    """
    dtype = torch.promote_types(
        torch.promote_types(target_probs.dtype, draft_probs.dtype), torch.float32
    )
    target = target_probs.to(dtype)
    weights = torch.clamp(target - draft_probs.to(dtype), min=0.0)
    total = weights.sum(dim=-1, keepdim=True)
    empty = total <= 0
    weights = torch.where(empty, target, weights)
    total = torch.where(empty, target.sum(dim=-1, keepdim=True), total)
    return weights / total


def sample_from_weights(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draws one index per row of `weights` [batch, vocab] (>= 0, unnormalised) with `uniforms`
    [batch] in [0, 1).

    Returns int64 [batch]: the first index i with cumsum(weights)[i] > u * sum(weights); a zero
    weight is never chosen. Every row must have a positive total; the rules see to it (a residual
    without mass is replaced by the target distribution, as `residual` defines).
    """
    block_sums = block_sums_of(weights)  # [batch, num_blocks]
    vocab = weights.shape[1]

    def block_weights(ids: torch.Tensor) -> torch.Tensor:
        return weights.gather(1, ids.clamp(max=vocab - 1))

    return sample_blocked(block_sums, uniforms, block_weights, vocab)


def sample_blocked(
    block_sums: torch.Tensor,
    uniforms: torch.Tensor,
    block_weights: Callable[[torch.Tensor], torch.Tensor],
    vocab: int,
) -> torch.Tensor:
    """Inverse-CDF sampling in two stages, so that no [batch, vocab] prefix sum is ever formed.

    block_sums    float64 [batch, num_blocks]: the weight of each block of block_width(vocab)
                  consecutive ids (see block_sums_of); every row must have a positive total.
    uniforms      [batch] in [0, 1).
    block_weights ids int64 [batch, width] -> the weights at those ids (ids past the vocabulary
                  are clamped by the caller's gather and zeroed here).
    Returns int64 [batch]: the first id whose running total exceeds u * total; a zero weight is
    never chosen. Prefix sums are in float64; block sums in the weights' dtype (float32: pairwise
    summation, relative error ~1e-7).
    """
    width = block_width(vocab)
    block_cdf = torch.cumsum(block_sums, dim=-1)
    goal = uniforms.to(torch.float64) * block_cdf[:, -1]  # [batch]
    block = _first_above(block_cdf, goal, block_sums > 0)  # [batch]
    before = torch.where(
        block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0
    )
    ids = block[:, None] * width + torch.arange(width, device=block.device)  # [batch, width]
    inside = block_weights(ids).to(torch.float64)
    inside = torch.where(ids < vocab, inside, 0.0)  # the last block may run past the vocabulary
    offset = _first_above(torch.cumsum(inside, dim=-1), goal - before, inside > 0)
    return block * width + offset


def block_width(vocab: int) -> int:
    return min(BLOCK, vocab)


def block_sums_of(weights: torch.Tensor) -> torch.Tensor:
    """float64 [batch, ceil(vocab / width)]: the weight of each block of block_width(vocab)
    consecutive ids of weights [batch, vocab]."""
    batch, vocab = weights.shape
    width = block_width(vocab)
    if vocab == width:
        return weights.sum(dim=-1, keepdim=True, dtype=torch.float64)
    full = vocab // width
    sums = weights[:, : full * width].reshape(batch, full, width).sum(dim=-1).to(torch.float64)
    if full * width == vocab:
        return sums
    tail = weights[:, full * width :].sum(dim=-1).to(torch.float64)
    return torch.cat([sums, tail[:, None]], dim=1)


def _first_above(cdf: torch.Tensor, goal: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """First index with cdf > goal per row; where rounding puts goal at or past the end, the last
    index with positive weight (so a zero-weight index is never returned)."""
    index = torch.searchsorted(cdf, goal[:, None].contiguous(), right=True)[:, 0]
    width = cdf.shape[-1]
    ids = torch.arange(width, device=cdf.device)
    last_positive = torch.where(positive, ids, -1).amax(dim=-1)
    return torch.where(index >= width, last_positive, index)


def draw_uniforms(
    batch: int, k: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The randomness of one verification step: float64 uniforms [batch, k] for the keep tests
    (one per draft, or per node of a tree) and [batch] for the recovered or bonus token, all in
    [0, 1)."""
    accept = torch.rand(batch, k, generator=generator, dtype=torch.float64, device=device)
    sample = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
    return accept, sample
