"""What a drafter proposes, and the protocol every drafter follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specsample.warpers import SamplingConfig


@dataclass
class Draft:
    """tokens  int64 [batch, k]: the drafted tokens (entries past lengths[b] are padding, 0).
    probs      float [batch, k, vocab]: the warped distributions they were sampled from, or None
               for point-mass drafts (each drafted token had probability 1).
    lengths    int64 [batch]: how many drafts row b has."""

    tokens: torch.Tensor
    probs: torch.Tensor | None
    lengths: torch.Tensor

    @staticmethod
    def empty(batch: int) -> Draft:
        return Draft(
            torch.zeros(batch, 0, dtype=torch.int64), None, torch.zeros(batch, dtype=torch.int64)
        )


class Drafter(Protocol):
    #: Number of draft forward passes made so far (0 for drafters without a model).
    forward_passes: int

    def start(self, prompts: list[list[int]]) -> None:
        """Begins a batch of prompts."""

    def propose(
        self,
        sequences: list[list[int]],
        max_lengths: torch.Tensor,
        sampling: SamplingConfig,
        generator: torch.Generator,
    ) -> Draft:
        """Drafts at most max_lengths[b] tokens after sequences[b] (0: none for that row)."""
