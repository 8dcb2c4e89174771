"""What a verification rule returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = -1  # fills `tokens` after the last emitted token of a row


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of verifying one step of drafts for a batch.

    tokens:       int64 [batch, k+1]: the emitted tokens, left-aligned: the accepted drafts, then
                  one recovered token (after a rejection) or one bonus token (all drafts kept),
                  then PAD (-1).
    num_accepted: int64 [batch]: drafts kept; row b emitted num_accepted[b] + 1 tokens.
    rule_used:    the rule that decided the rows ("token", "block", ...). A rule that cannot apply
                  to an input (block verification of point-mass drafts) names the rule it fell back
                  to here instead of deciding silently.
    """

    tokens: torch.Tensor
    num_accepted: torch.Tensor
    rule_used: str = "token"

    @property
    def num_emitted(self) -> torch.Tensor:
        """int64 [batch]: accepted drafts plus the one recovered or bonus token."""
        return self.num_accepted + 1


def assemble_tokens(
    draft_tokens: torch.Tensor, num_accepted: torch.Tensor, final_token: torch.Tensor
) -> torch.Tensor:
    """[batch, k+1]: the first num_accepted[b] drafts of row b, then final_token[b], then PAD."""
    k = draft_tokens.shape[1]
    slots = torch.arange(k + 1, device=draft_tokens.device)[None, :]  # [1, k+1]
    padded_drafts = torch.nn.functional.pad(draft_tokens, (0, 1), value=PAD)
    tokens = torch.where(slots < num_accepted[:, None], padded_drafts, PAD)
    return tokens.scatter(1, num_accepted[:, None], final_token[:, None])
