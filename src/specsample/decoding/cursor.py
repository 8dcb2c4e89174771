"""Keeps a LanguageModel's cache in step with the committed token sequences.

Invariant between steps: the model holds every committed token of a row except the last one, the
"pending" token, which is fed at the start of the next step together with any new tokens. Holding
it back means one pass yields the distribution after the last committed token and after each new
token, and a rollback is a truncate to the longest prefix the cache shares with the sequence.
"""

from __future__ import annotations

import torch

from specsample.adapters.protocol import LanguageModel


class ModelCursor:
    def __init__(self, model: LanguageModel):
        self.model = model
        self.cached: list[list[int]] = []  # per row: the tokens the model's cache holds

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def start(self, prompts: list[list[int]]) -> None:
        """Prefills the prompts and holds back each prompt's last token as pending."""
        self.model.prefill(prompts)
        self.model.truncate(torch.tensor([len(p) - 1 for p in prompts], dtype=torch.int64))
        self.cached = [list(p[:-1]) for p in prompts]

    def feed(
        self,
        sequences: list[list[int]],
        active: list[bool],
        extra: torch.Tensor | None = None,
        extra_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rolls each active row back to what it shares with its sequence, feeds the rest of the
        sequence (at least the pending token) and then the row's first extra_lengths[b] tokens of
        `extra` [batch, m], in one pass.

        Returns logits [batch, 1+m, vocab]: [b, 0] follows the last token of sequences[b], [b, j]
        follows extra token j-1. Rows that are not active are left alone (their logits are
        arbitrary)."""
        batch = len(sequences)
        width = 0 if extra is None else extra.shape[1]
        self._roll_back(sequences, active)
        tails = [
            seq[len(cached) :] if on else []
            for seq, cached, on in zip(sequences, self.cached, active, strict=True)
        ]
        lengths = [0] * batch if extra_lengths is None else extra_lengths.tolist()
        rows = []
        for b in range(batch):
            extra_row = extra[b, : lengths[b]].tolist() if (active[b] and width) else []
            rows.append(tails[b] + extra_row)
        logits = self._extend(rows)
        starts = torch.tensor([max(len(t) - 1, 0) for t in tails], dtype=torch.int64)
        positions = starts[:, None] + torch.arange(1 + width)[None, :]  # [batch, 1+m]
        positions = positions.clamp(max=logits.shape[1] - 1).to(logits.device)
        return logits.gather(1, positions[:, :, None].expand(-1, -1, logits.shape[2]))

    def append(self, tokens: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        """Feeds tokens [batch, n] (row b: its first num_valid[b]) after what each row holds.
        Returns logits [batch, n, vocab]."""
        rows = [row[:n] for row, n in zip(tokens.tolist(), num_valid.tolist(), strict=True)]
        return self._extend(rows)

    def _roll_back(self, sequences: list[list[int]], active: list[bool]) -> None:
        keep = []
        for seq, cached, on in zip(sequences, self.cached, active, strict=True):
            if not on:  # left alone: its cache may run past its sequence (drafts after an EOS)
                keep.append(len(cached))
                continue
            limit = min(len(cached), len(seq) - 1)
            shared = 0
            while shared < limit and cached[shared] == seq[shared]:
                shared += 1
            keep.append(shared)
        if any(k < len(c) for k, c in zip(keep, self.cached, strict=True)):
            self.model.truncate(torch.tensor(keep, dtype=torch.int64))
            self.cached = [c[:k] for c, k in zip(self.cached, keep, strict=True)]

    def _extend(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        tokens = torch.zeros(len(rows), width, dtype=torch.int64)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = torch.tensor(row, dtype=torch.int64)
            self.cached[b].extend(row)
        num_valid = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        return self.model.extend(tokens, num_valid)
