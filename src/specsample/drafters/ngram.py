"""Prompt lookup (n-gram) drafting: no model. The last n tokens of a row are searched for earlier
in the same row (prompt and output); the tokens that followed the latest earlier match are the
draft. Each draft is a point mass (probability 1), so verification keeps it with probability
P(x) and recovers from P without x."""

from __future__ import annotations

import torch

from specsample.drafters.base import Draft
from specsample.warpers import RowSampling


class NgramDrafter:
    forward_passes = 0
    fixed_depth = None

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                f"min_ngram, max_ngram: expected 1 <= min_ngram <= max_ngram, got "
                f"{min_ngram}, {max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def start(self, prompts: list[list[int]]) -> None:
        pass

    def set_rows(
        self, sequences: list[list[int]], keep: torch.Tensor, prompts: list[list[int]]
    ) -> None:
        pass  # no state: the draft is looked up in the sequences at each step

    def propose(
        self, sequences: list[list[int]], max_lengths: torch.Tensor, sampling: RowSampling
    ) -> Draft:
        batch = len(sequences)
        k = int(max_lengths.max()) if batch else 0
        found = [
            self.lookup(seq, int(limit))
            for seq, limit in zip(sequences, max_lengths.tolist(), strict=True)
        ]
        width = max((len(f) for f in found), default=0)
        if k == 0 or width == 0:
            return Draft.empty(batch)
        tokens = torch.zeros(batch, width, dtype=torch.int64)
        for b, row in enumerate(found):
            tokens[b, : len(row)] = torch.tensor(row, dtype=torch.int64)
        lengths = torch.tensor([len(f) for f in found], dtype=torch.int64)
        return Draft.chain(tokens, None, lengths)

    def lookup(self, sequence: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest
        matching suffix (max_ngram down to min_ngram tokens)."""
        if limit <= 0:
            return []
        for n in range(min(self.max_ngram, len(sequence) - 1), self.min_ngram - 1, -1):
            suffix = sequence[-n:]
            for start in range(len(sequence) - n - 1, -1, -1):
                if sequence[start : start + n] == suffix:
                    return sequence[start + n : start + n + limit]
        return []
