"""Token-level speculative sampling (Leviathan et al. 2022, appendix A.1; Chen et al. 2023).

For i = 1..k: keep drafted x_i iff u_i * q_i(x_i) < p_i(x_i) (probability min(1, p/q)); at the first
rejection emit one token from normalize(max(0, p_i - q_i)) and stop; if all k are kept emit one
bonus token from p_{k+1}. Vectorised over the batch; `reference.py` holds the loop it is tested
against on the same draws.
"""

from __future__ import annotations

import torch

from specsample.verify.result import VerifyResult, assemble_tokens
from specsample.verify.sampling import sample_from_weights


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
    weights, target_row = final_weights(
        draft_tokens, draft_probs, target_probs, draft_lengths, num_accepted
    )
    final_token = sample_from_weights(weights, sample_uniforms, fallback=target_row)
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


def final_weights(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    num_accepted: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, target_row), both [batch, vocab], in at least float32. weights is unnormalised:
    the residual max(0, p - q) at the rejected position, or p at the bonus position. target_row is
    p at that position: `sample_from_weights` falls back to it where a residual has no mass. Only
    one row per batch entry is read."""
    batch, k = draft_tokens.shape
    rows = torch.arange(batch, device=draft_tokens.device)
    compute_dtype = torch.promote_types(target_probs.dtype, torch.float32)
    target_row = target_probs[rows, num_accepted].to(compute_dtype)  # [batch, vocab], a copy
    rejected = num_accepted < draft_lengths  # [batch]
    if not bool(rejected.any()):
        return target_row, target_row
    at = num_accepted.clamp(max=max(k - 1, 0))
    if draft_probs is None:
        # Point mass: q is one-hot on the drafted token, so the residual is p without that token.
        drafted = draft_tokens[rows, at][:, None]
        removed = target_row.gather(1, drafted) * rejected[:, None]
        return target_row.scatter_add(1, drafted, -removed), target_row
    # The indexing copies, so the arithmetic can run in place on the copy. Rows that kept every
    # draft read a padding row here (any values, NaN included): zero it, do not multiply by 0.
    weights = draft_probs[rows, at].to(compute_dtype).masked_fill_(~rejected[:, None], 0.0)
    return torch.sub(target_row, weights, out=weights).clamp_(min=0.0), target_row
