"""Deliberately wrong verification functions with the audit's contract: each has one mistake
that engines have made. The audit must reject every one of them."""

from __future__ import annotations

import torch

from specsample.rules.block import cumulative_log_acceptance, pass_thresholds
from specsample.rules.result import assemble_tokens
from specsample.rules.token import count_leading_kept, sample_final_tokens


def _drafted(probs: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
    """float64 [batch, k]: each row's probability of its drafted token."""
    return probs.gather(2, draft_tokens[:, :, None])[:, :, 0].to(torch.float64)


def _draw(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(rows.to(torch.float64), 1, generator=generator)[:, 0]


def _finish(draft_tokens, target_probs, num_accepted, final_rows, generator):
    final = _draw(final_rows, generator)
    return assemble_tokens(draft_tokens, num_accepted, final)


def recover_from_p(draft_tokens, draft_probs, target_probs, generator):
    """Keeps drafts as the token rule does, but draws the token after a rejection from the
    target p instead of the residual max(0, p - q)."""
    batch, k = draft_tokens.shape
    q = (
        torch.ones(batch, k, dtype=torch.float64)
        if draft_probs is None
        else _drafted(draft_probs, draft_tokens)
    )
    u = torch.rand(batch, k, dtype=torch.float64, generator=generator)
    kept = u * q < _drafted(target_probs[:, :k], draft_tokens)
    n = count_leading_kept(kept, torch.full((batch,), k))
    return _finish(draft_tokens, target_probs, n, target_probs[torch.arange(batch), n], generator)


def always_accept(draft_tokens, draft_probs, target_probs, generator):
    """Keeps every draft and adds a bonus token from the last target row."""
    batch, k = draft_tokens.shape
    n = torch.full((batch,), k, dtype=torch.int64)
    return _finish(draft_tokens, target_probs, n, target_probs[:, k], generator)


def block_first_failure(draft_tokens, draft_probs, target_probs, generator):
    """Block verification that stops at the first failed threshold instead of taking the last
    pass."""
    batch, k = draft_tokens.shape
    lengths = torch.full((batch,), k, dtype=torch.int64)
    log_kept = cumulative_log_acceptance(draft_tokens, draft_probs, target_probs)
    thresholds = pass_thresholds(log_kept, draft_probs, target_probs, lengths)
    u = torch.rand(batch, k, dtype=torch.float64, generator=generator)
    n = count_leading_kept(u <= thresholds, lengths)
    scale = torch.nn.functional.pad(log_kept, (1, 0)).gather(1, n[:, None])[:, 0].exp()
    sample = torch.rand(batch, dtype=torch.float64, generator=generator)
    final = sample_final_tokens(
        draft_tokens, draft_probs, target_probs, lengths, n, sample, target_scale=scale
    )
    return assemble_tokens(draft_tokens, n, final)


def off_by_one(draft_tokens, draft_probs, target_probs, generator):
    """The token rule with the keep test of draft i reading target row i+1 (the row after the
    draft) instead of row i."""
    batch, k = draft_tokens.shape
    lengths = torch.full((batch,), k, dtype=torch.int64)
    q = (
        torch.ones(batch, k, dtype=torch.float64)
        if draft_probs is None
        else _drafted(draft_probs, draft_tokens)
    )
    u = torch.rand(batch, k, dtype=torch.float64, generator=generator)
    kept = u * q < _drafted(target_probs[:, 1:], draft_tokens)
    n = count_leading_kept(kept, lengths)
    sample = torch.rand(batch, dtype=torch.float64, generator=generator)
    final = sample_final_tokens(draft_tokens, draft_probs, target_probs, lengths, n, sample)
    return assemble_tokens(draft_tokens, n, final)


# Broken contracts: the audit must say it could not judge.


def returns_floats(draft_tokens, draft_probs, target_probs, generator):
    return torch.zeros(draft_tokens.shape[0], draft_tokens.shape[1] + 1)


def returns_wrong_shape(draft_tokens, draft_probs, target_probs, generator):
    return torch.zeros(draft_tokens.shape[0], draft_tokens.shape[1], dtype=torch.int64)


def returns_outside_vocab(draft_tokens, draft_probs, target_probs, generator):
    out = torch.full((draft_tokens.shape[0], draft_tokens.shape[1] + 1), -1, dtype=torch.int64)
    out[:, 0] = target_probs.shape[2]
    return out


def returns_not_left_aligned(draft_tokens, draft_probs, target_probs, generator):
    out = torch.full((draft_tokens.shape[0], draft_tokens.shape[1] + 1), -1, dtype=torch.int64)
    out[:, 1] = 0
    return out


def raises(draft_tokens, draft_probs, target_probs, generator):
    raise RuntimeError("this verifier is broken")


def two_arguments(draft_tokens, target_probs):
    return draft_tokens


NOT_A_FUNCTION = 3
