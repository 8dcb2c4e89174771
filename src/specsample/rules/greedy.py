"""Greedy verification (temperature 0): keep drafts while they equal the target's argmax.

At temperature 0 both distributions are one-hot, so the token rule reduces to this; it needs no
probabilities and no randomness, only the target's chosen token at each of the k+1 positions.
"""

from __future__ import annotations

import torch

from specsample.rules.result import VerifyResult, assemble_tokens
from specsample.rules.token import count_leading_kept


def greedy_rule(
    draft_tokens: torch.Tensor, target_tokens: torch.Tensor, draft_lengths: torch.Tensor
) -> VerifyResult:
    """draft_tokens int64 [batch, k]; target_tokens int64 [batch, k+1] (the target's argmax after
    the prompt and drafts 0..i-1); draft_lengths int64 [batch]."""
    k = draft_tokens.shape[1]
    kept = draft_tokens == target_tokens[:, :k]
    num_accepted = count_leading_kept(kept, draft_lengths)
    final_token = target_tokens.gather(1, num_accepted[:, None])[:, 0]
    return VerifyResult(
        assemble_tokens(draft_tokens, num_accepted, final_token), num_accepted, "greedy"
    )
