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

import torch

# Rows are sampled in two stages (pick a block of this many ids, then an id inside it) so that the
# float64 prefix sums cover [batch, vocab / BLOCK] + [batch, BLOCK] entries, not [batch, vocab].
BLOCK = 1024


def acceptance_probability(target_logprob: torch.Tensor, draft_logprob: torch.Tensor) -> torch.Tensor:
    """min(1, exp(target_logprob - draft_logprob)), elementwise.

    This is the probability of keeping a drafted token x, with target_logprob = log P(x) and
    draft_logprob = log Q(x). The keep test needs nothing else: not the rest of either distribution.
    A token the target gives probability 0 (log-prob -inf) is never kept. A draft log-prob of -inf
    means the token could not have been drafted; the result is then 1 by convention.
    """
    target_logprob = torch.as_tensor(target_logprob)
    draft_logprob = torch.as_tensor(draft_logprob)
    dtype = torch.promote_types(torch.promote_types(target_logprob.dtype, draft_logprob.dtype),
                                torch.float32)
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
    dtype = torch.promote_types(torch.promote_types(target_probs.dtype, draft_probs.dtype),
                                torch.float32)
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

    Returns int64 [batch]: the first index i with cumsum(weights)[i] > u * sum(weights). A zero
    weight is never chosen. Every row must have positive total weight.
    """
    batch, vocab = weights.shape
    num_blocks = -(-vocab // BLOCK)
    padded = weights
    if num_blocks * BLOCK != vocab:
        padded = torch.nn.functional.pad(weights, (0, num_blocks * BLOCK - vocab))
    blocks = padded.reshape(batch, num_blocks, BLOCK)
    block_sums = blocks.sum(dim=-1, dtype=torch.float64)  # [batch, num_blocks]
    block_cdf = torch.cumsum(block_sums, dim=-1)
    goal = uniforms.to(torch.float64) * block_cdf[:, -1]  # [batch]
    block = _first_above(block_cdf, goal, block_sums > 0)  # [batch]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    rows = torch.arange(batch, device=weights.device)
    inside = blocks[rows, block].to(torch.float64)  # [batch, BLOCK]
    offset = _first_above(torch.cumsum(inside, dim=-1), goal - before, inside > 0)
    return block * BLOCK + offset


def _first_above(cdf: torch.Tensor, goal: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """First index with cdf > goal per row; where rounding puts goal at or past the end, the last
    index with positive weight (so a zero-weight index is never returned)."""
    index = torch.searchsorted(cdf, goal[:, None].contiguous(), right=True)[:, 0]
    width = cdf.shape[-1]
    ids = torch.arange(width, device=cdf.device)
    last_positive = torch.where(positive, ids, -1).amax(dim=-1)
    return torch.where(index >= width, last_positive, index)
