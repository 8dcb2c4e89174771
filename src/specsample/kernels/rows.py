"""Device functions shared by the kernels: one vocabulary row of weights, its sum, and the
inverse-CDF search on it.

A row of weights is described by a few scalars instead of a tensor, so that it is computed while
it is read and never stored:

    base(v)    = ws[v] if use_ws else p[v]                       (float64)
    weights(v) = max(0, p_scale * base(v) - q_scale * Q(v))      if subtract
               = base(v)                                          otherwise
    Q(v)       = q[v] (DENSE) or [v == drafted] (a point-mass draft)

The token rule's residual is p_scale = q_scale = 1, block verification's is p_scale = P_tau, the
tree rule's is q_scale = the current residual mass (its residual is kept unnormalised). A row is
summed and searched block by block in the same order, so the search's running total ends exactly
on the sum.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_weights(
    p_row,
    ws_row,
    q_row,
    offs,
    in_vocab,
    use_ws,
    subtract,
    p_scale,
    q_scale,
    drafted,
    DENSE: tl.constexpr,
):
    """float64 [BLOCK]: the weights at ids `offs` (0 past the vocabulary)."""
    if use_ws:
        base = tl.load(ws_row + offs, mask=in_vocab, other=0.0).to(tl.float64)
    else:
        base = tl.load(p_row + offs, mask=in_vocab, other=0.0).to(tl.float64)
    if subtract:
        if DENSE:
            q = tl.load(q_row + offs, mask=in_vocab, other=0.0).to(tl.float64)
        else:
            q = (offs == drafted).to(tl.float64)
        weights = tl.maximum(p_scale * base - q_scale * q, 0.0)
    else:
        weights = base
    return weights


@triton.jit
def row_sum(
    p_row,
    ws_row,
    q_row,
    vocab,
    use_ws,
    subtract,
    p_scale,
    q_scale,
    drafted,
    DENSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """float64: the total of the row's weights, block by block."""
    total = tl.zeros((), dtype=tl.float64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        weights = row_weights(
            p_row,
            ws_row,
            q_row,
            offs,
            offs < vocab,
            use_ws,
            subtract,
            p_scale,
            q_scale,
            drafted,
            DENSE,
        )
        total += tl.sum(weights, axis=0)
    return total


@triton.jit
def row_search(
    p_row,
    ws_row,
    q_row,
    vocab,
    use_ws,
    subtract,
    p_scale,
    q_scale,
    drafted,
    goal,
    DENSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """int64: the first id whose running total exceeds `goal` (= u * row_sum); where rounding
    leaves the goal at or past the end, the last id with positive weight (so an id of weight 0 is
    never returned). Stops reading at the block that holds the answer."""
    running = tl.zeros((), dtype=tl.float64)
    start = tl.zeros((), dtype=tl.int64)
    found = start < 0  # a scalar False
    last_positive = start - 1
    while (~found) & (start < vocab):
        offs = start + tl.arange(0, BLOCK)
        weights = row_weights(
            p_row,
            ws_row,
            q_row,
            offs,
            offs < vocab,
            use_ws,
            subtract,
            p_scale,
            q_scale,
            drafted,
            DENSE,
        )
        block_total = tl.sum(weights, axis=0)
        last_positive = tl.maximum(last_positive, tl.max(tl.where(weights > 0, offs, -1), axis=0))
        found = running + block_total > goal
        running = tl.where(found, running, running + block_total)
        start = tl.where(found, start, start + BLOCK)
    chosen = last_positive
    if found:
        # The answer is in the block at `start`: the first id whose running total exceeds the
        # goal, or (where rounding inside the block disagrees with the block total) the block's
        # last positive id, which last_positive already holds.
        offs = start + tl.arange(0, BLOCK)
        weights = row_weights(
            p_row,
            ws_row,
            q_row,
            offs,
            offs < vocab,
            use_ws,
            subtract,
            p_scale,
            q_scale,
            drafted,
            DENSE,
        )
        above = (running + tl.cumsum(weights, axis=0) > goal) & (weights > 0)
        first = tl.min(tl.where(above, offs, vocab), axis=0)
        if first < vocab:
            chosen = first
    return chosen
