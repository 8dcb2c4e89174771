"""Greedy verification (temperature 0): keep drafts while they equal the target's argmax.

At temperature 0 both distributions are one-hot, so the token rule reduces to this; it needs no
probabilities and no randomness, only the target's chosen token at each of the k+1 positions.
"""

from __future__ import annotations

import numpy as np
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


def argmax_last(values: torch.Tensor) -> torch.Tensor:
    """int64 argmax over the last dimension, the first maximum on ties (as torch.argmax and
    numpy.argmax both define it). On CPU float32 and float64 tensors numpy's, which is
    vectorised: about 10 us over a 152k vocabulary on 2 cores where torch.argmax takes 130 us
    (each greedy token pays one)."""
    if values.device.type != "cpu" or values.dtype not in (torch.float32, torch.float64):
        return values.argmax(dim=-1)
    array = values.detach().contiguous().numpy()
    return torch.from_numpy(np.asarray(np.argmax(array, axis=-1), dtype=np.int64))
