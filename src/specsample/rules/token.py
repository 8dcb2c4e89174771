"""Token-level speculative sampling (Leviathan et al. 2022, appendix A.1; Chen et al. 2023).

For i = 1..k: keep drafted x_i iff u_i * q_i(x_i) < p_i(x_i) (probability min(1, p/q)); at the first
rejection emit one token from normalize(max(0, p_i - q_i)) and stop; if all k are kept emit one
bonus token from p_{k+1}. Vectorised over the batch; `reference.py` holds the loop it is tested
against on the same draws.
"""

from __future__ import annotations

import torch

from specsample.rules.result import VerifyResult, assemble_tokens
from specsample.rules.sampling import block_sums_of, sample_blocked

# Rows of the residual are formed this many elements at a time (4 MB of float32).
# Read at every call: tests make it small to cross chunk boundaries.
CHUNK_ELEMENTS = 1 << 20


def token_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> VerifyResult:
    """Pure token-level rule on checked inputs.

    draft_tokens    int64 [batch, k]; entries at i >= draft_lengths[b] are ignored (any valid id)
    draft_probs     float [batch, k, vocab], or None: each draft had probability 1 (point mass)
    target_probs    float [batch, k+1, vocab]
    draft_lengths   int64 [batch], 0 <= draft_lengths[b] <= k
    accept_uniforms float64 [batch, k] in [0, 1): the keep tests
    sample_uniforms float64 [batch] in [0, 1): draws the recovered or bonus token
    """
    kept = keep_mask(draft_tokens, draft_probs, target_probs, accept_uniforms)  # [batch, k]
    num_accepted = count_leading_kept(kept, draft_lengths)
    final_token = sample_final_tokens(
        draft_tokens, draft_probs, target_probs, draft_lengths, num_accepted, sample_uniforms
    )
    return VerifyResult(assemble_tokens(draft_tokens, num_accepted, final_token), num_accepted)


def keep_mask(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    accept_uniforms: torch.Tensor,
) -> torch.Tensor:
    """bool [batch, k]: u_i * q_i(x_i) < p_i(x_i). Needs only the two probabilities of each drafted
    token; p = 0 is never kept. Point-mass drafts have q = 1."""
    k = draft_tokens.shape[1]
    index = draft_tokens[:, :, None]  # [batch, k, 1]
    target_p = target_probs[:, :k].gather(2, index)[:, :, 0].to(torch.float64)
    if draft_probs is None:
        return accept_uniforms < target_p
    draft_q = draft_probs.gather(2, index)[:, :, 0].to(torch.float64)
    return accept_uniforms * draft_q < target_p


def count_leading_kept(kept: torch.Tensor, draft_lengths: torch.Tensor) -> torch.Tensor:
    """int64 [batch]: the number of leading kept drafts, never more than draft_lengths[b]."""
    k = kept.shape[1]
    in_draft = torch.arange(k, device=kept.device)[None, :] < draft_lengths[:, None]
    return (kept & in_draft).long().cumprod(dim=1).sum(dim=1)


def sample_final_tokens(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    num_accepted: torch.Tensor,
    sample_uniforms: torch.Tensor,
    target_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 [batch]: the recovered token, drawn from max(0, s p - q) at the rejected position
    (s = target_scale[b], 1 when None; block verification passes its P_tau), or the bonus token,
    drawn from p after the last draft.

    The residual is never formed as a [batch, vocab] tensor: block sums are computed a few rows at
    a time (the rows stay in cache), then only the chosen block of ids is recomputed. A rejected
    row whose residual has no mass (p <= q everywhere: rows equal up to rounding; a rejection has
    probability 0 there in exact arithmetic) is drawn from p, as `residual` defines.
    """
    batch, k = draft_tokens.shape
    vocab = target_probs.shape[2]
    rows = torch.arange(batch, device=draft_tokens.device)
    at = num_accepted.clamp(max=max(k - 1, 0))  # the draft row of a rejection (unused otherwise)
    drafted = draft_tokens[rows, at] if k else torch.zeros_like(num_accepted)
    rejected = num_accepted < draft_lengths  # [batch]
    if not bool(rejected.any()):
        draft_probs = None  # nothing to subtract: every row draws its bonus token from p
    compute_dtype = torch.promote_types(target_probs.dtype, torch.float32)

    flat_target = target_probs.reshape(batch * (k + 1), vocab)
    flat_draft = None if draft_probs is None else draft_probs.reshape(batch * k, vocab)
    target_row = rows * (k + 1) + num_accepted  # rows of the flat tensors
    draft_row = rows * k + at
    step = max(1, CHUNK_ELEMENTS // vocab)
    buffers: dict[str, torch.Tensor] = {}

    def read_rows(flat: torch.Tensor, index: torch.Tensor, name: str) -> torch.Tensor:
        """flat[index] copied into a buffer reused across chunks: fresh large allocations cost
        page faults on every chunk."""
        if name not in buffers:
            buffers[name] = torch.empty(step, vocab, dtype=flat.dtype, device=flat.device)
        out = torch.index_select(flat, 0, index, out=buffers[name][: len(index)])
        return out.to(compute_dtype)

    def residual_of(p, q_or_none, hit, subtract, scale):
        """In place on p: max(0, scale p - q) on rows where subtract, p elsewhere."""
        if not bool(subtract.any()):
            return p
        if q_or_none is None:  # point mass: q is one-hot on the drafted token
            return p.masked_fill_(hit() & subtract[:, None], 0.0)
        if not bool(subtract.all()):
            q_or_none.masked_fill_(~subtract[:, None], 0.0)
        if scale is not None:
            p.mul_(torch.where(subtract, scale, 1.0)[:, None].to(p.dtype))
        return p.sub_(q_or_none).clamp_(min=0.0)

    def full_rows(chosen: torch.Tensor, subtract: torch.Tensor) -> torch.Tensor:
        """[n, vocab]: the residual of rows `chosen` (p where subtract is False)."""
        p = read_rows(flat_target, target_row[chosen], "p")
        needs_q = flat_draft is not None and bool(subtract.any())
        q = read_rows(flat_draft, draft_row[chosen], "q") if needs_q else None

        def hit() -> torch.Tensor:
            return torch.arange(vocab, device=chosen.device)[None, :] == drafted[chosen, None]

        return residual_of(
            p, q, hit, subtract, None if target_scale is None else target_scale[chosen]
        )

    def at_ids(ids: torch.Tensor) -> torch.Tensor:
        """[batch, m]: the residual of every row at ids [batch, m] (clamped into the vocab)."""
        p = flat_target[target_row[:, None], ids].to(compute_dtype)
        q = None if flat_draft is None else flat_draft[draft_row[:, None], ids].to(compute_dtype)
        return residual_of(p, q, lambda: ids == drafted[:, None], rejected, target_scale)

    # Rejected rows first, so that chunks of bonus rows skip reading q altogether.
    order = torch.cat([rows[rejected], rows[~rejected]])
    sums = []
    for start in range(0, batch, step):
        chosen = order[start : start + step]
        sums.append(block_sums_of(full_rows(chosen, rejected[chosen])))
    block_sums = torch.empty(batch, sums[0].shape[1], dtype=torch.float64, device=rows.device)
    block_sums[order] = torch.cat(sums)  # [batch, num_blocks]
    empty = block_sums.sum(dim=-1) <= 0
    if bool(empty.any()):
        rejected = rejected & ~empty
        for row in rows[empty].tolist():
            block_sums[row] = block_sums_of(
                full_rows(rows[row : row + 1], rejected[row : row + 1])
            )[0]
    return sample_blocked(
        block_sums, sample_uniforms, lambda ids: at_ids(ids.clamp(max=vocab - 1)), vocab
    )
