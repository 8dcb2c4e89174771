"""The protocol every drafter follows. The draft type itself (`Draft`: one token tree per row,
a chain being a tree with one child per node) lives with the rules that verify it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from specsample.rules.draft import Draft
from specsample.warpers import RowSampling

if TYPE_CHECKING:
    from specsample.adapters.cursor import ModelCursor

__all__ = ["CursorDrafter", "Draft", "Drafter"]


class Drafter(Protocol):
    #: Number of draft forward passes made so far (0 for drafters without a model).
    forward_passes: int
    #: A fixed draft depth (tree drafters), or None when the engine chooses the length.
    fixed_depth: int | None

    def set_rows(
        self, sequences: list[list[int]], keep: torch.Tensor, prompts: list[list[int]]
    ) -> None:
        """Changes the batch between steps: rows `keep` (increasing indices into `sequences`,
        the current rows' committed tokens) stay, renumbered in order, the others leave; then
        one row per prompt in `prompts` joins at the end."""

    def propose(
        self, sequences: list[list[int]], max_lengths: torch.Tensor, sampling: RowSampling
    ) -> Draft:
        """Drafts after sequences[b] no node deeper than max_lengths[b] (0: none for that row);
        row b's randomness comes from sampling.generators[b] alone."""


class CursorDrafter:
    """What drafters with a draft model behind a ModelCursor share: the batch's rows, the
    prompt prefill time and the vocabulary are the cursor's."""

    cursor: ModelCursor

    @property
    def prefill_seconds(self) -> float:
        """Time spent prefilling prompts (lazily, at the first draft), in all."""
        return self.cursor.prefill_seconds

    @property
    def vocab_size(self) -> int:
        return self.cursor.vocab_size

    def start(self, prompts: list[list[int]]) -> None:
        self.cursor.start(prompts)

    def set_rows(
        self, sequences: list[list[int]], keep: torch.Tensor, prompts: list[list[int]]
    ) -> None:
        self.cursor.set_rows(sequences, keep, prompts)
