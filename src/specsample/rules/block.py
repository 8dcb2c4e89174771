"""Block verification (Sun, Mendlovic, Leviathan, Aharoni, Ro, Beirami, Suresh; arXiv 2403.10444).

The optimal verifier for one draft chain: it never accepts fewer tokens in expectation than the
token rule, and equals it at temperature 0. With p_i, q_i the target and draft distributions at
draft position i (1-based) and x_i the drafted tokens:

    P_0 = 1;  P_i = min(1, P_{i-1} p_i(x_i) / q_i(x_i))
    R_i = sum_v max(0, P_i p_{i+1}(v) - q_{i+1}(v))            for i < k
    h_i = R_i / (R_i + 1 - P_i)  (1 where that is 0 / 0);      h_k = P_k
    tau = the LARGEST i with u_i < h_i (0 if none): a later pass overrides an earlier failure
    emit x_1..x_tau, then a bonus token from p_{k+1} (tau = k) or one token from
    normalize(max(0, P_tau p_{tau+1} - q_{tau+1})).

It needs the drafter's true distributions: point-mass drafts are verified with the token rule,
and the result says so (rule_used = "token").
"""

from __future__ import annotations

import torch

from specsample.rules.result import VerifyResult, assemble_tokens
from specsample.rules.token import sample_final_tokens, token_rule

# Rows of p and q are read this many elements at a time when the R_i are summed.
# Read at every call: tests make it small to cross chunk boundaries.
CHUNK_ELEMENTS = 1 << 20


def block_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> VerifyResult:
    """Same contract as `token_rule` (shapes in its docstring)."""
    if draft_probs is None:
        result = token_rule(
            draft_tokens, None, target_probs, draft_lengths, accept_uniforms, sample_uniforms
        )
        return VerifyResult(result.tokens, result.num_accepted, "token")
    log_kept = cumulative_log_acceptance(draft_tokens, draft_probs, target_probs)  # [batch, k]
    thresholds = pass_thresholds(log_kept, draft_probs, target_probs, draft_lengths)
    num_accepted = last_pass(accept_uniforms, thresholds, draft_lengths)
    # P_tau scales the target in the residual (P_0 = 1).
    padded = torch.nn.functional.pad(log_kept, (1, 0))  # [batch, k+1], column 0 is log P_0
    scale = padded.gather(1, num_accepted[:, None])[:, 0].exp()
    final = sample_final_tokens(
        draft_tokens,
        draft_probs,
        target_probs,
        draft_lengths,
        num_accepted,
        sample_uniforms,
        target_scale=scale,
    )
    return VerifyResult(assemble_tokens(draft_tokens, num_accepted, final), num_accepted, "block")


def cumulative_log_acceptance(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor
) -> torch.Tensor:
    """float64 [batch, k]: log P_i = min(0, log P_{i-1} + log p_i(x_i) - log q_i(x_i))."""
    k = draft_tokens.shape[1]
    index = draft_tokens[:, :, None]
    log_p = target_probs[:, :k].gather(2, index)[:, :, 0].to(torch.float64).log()
    log_q = draft_probs.gather(2, index)[:, :, 0].to(torch.float64).log()
    log_kept = torch.zeros_like(log_p)
    running = torch.zeros(log_p.shape[0], dtype=torch.float64, device=log_p.device)
    for i in range(k):
        running = torch.clamp(running + log_p[:, i] - log_q[:, i], max=0.0)
        log_kept[:, i] = running
    return log_kept


def pass_thresholds(
    log_kept: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
) -> torch.Tensor:
    """float64 [batch, k]: h_i (column i-1); column L-1 of a row with L drafts is P_L, columns
    past it are 0 (never passed)."""
    batch, k = log_kept.shape
    kept = log_kept.exp()
    residual_mass = residual_masses(kept, draft_probs, target_probs)  # [batch, k]: R_1..R_k
    denominator = residual_mass + 1.0 - kept
    thresholds = torch.where(denominator > 0, residual_mass / denominator.clamp(min=1e-300), 1.0)
    positions = torch.arange(k, device=kept.device)[None, :]
    last = positions == (draft_lengths[:, None] - 1)
    thresholds = torch.where(last, kept, thresholds)
    return torch.where(positions < draft_lengths[:, None], thresholds, 0.0)


def residual_masses(
    kept: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor
) -> torch.Tensor:
    """float64 [batch, k]: column i-1 holds R_i = sum_v max(0, P_i p_{i+1}(v) - q_{i+1}(v)) for
    i < k; the last column is unused (0). Summed a few rows at a time."""
    batch, k = kept.shape
    vocab = target_probs.shape[2]
    masses = torch.zeros(batch, k, dtype=torch.float64, device=kept.device)
    compute_dtype = torch.promote_types(target_probs.dtype, torch.float32)
    step = max(1, CHUNK_ELEMENTS // (vocab * max(k - 1, 1)))
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        p = target_probs[rows, 1:k].to(compute_dtype)  # p_2..p_k: [rows, k-1, vocab]
        q = draft_probs[rows, 1:k].to(compute_dtype)
        scaled = p * kept[rows, : k - 1, None].to(compute_dtype)
        masses[rows, : k - 1] = (scaled - q).clamp_(min=0.0).sum(dim=-1, dtype=torch.float64)
    return masses


def last_pass(
    accept_uniforms: torch.Tensor, thresholds: torch.Tensor, draft_lengths: torch.Tensor
) -> torch.Tensor:
    """int64 [batch]: tau, the largest i (1-based) with u_i < h_i, or 0.

    Strict, like the token rule's keep test: for u uniform on [0, 1), P(u < h) = h, and h = 0 (a
    drafted token the target rules out, P_i = 0) is never passed, not even by u = 0."""
    k = thresholds.shape[1]
    passed = (accept_uniforms < thresholds) & (
        torch.arange(k, device=thresholds.device)[None, :] < draft_lengths[:, None]
    )
    index = torch.arange(1, k + 1, device=thresholds.device)[None, :]
    return (passed * index).amax(dim=1) if k else torch.zeros_like(draft_lengths)
