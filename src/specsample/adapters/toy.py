"""`ToyLM`: a tiny exact `LanguageModel` for tests (no neural net).

Next-token logits are a deterministic pseudo-random function of the *whole* prefix: the
prefix is hashed (with the seed) into a `torch.Generator` seed and a standard-normal vector
of length vocab is drawn. So `logits_for(prefix)` gives the exact distribution any test
needs, and the batched protocol methods must agree with it bit for bit.

Similar model pairs (draft vs target) are made with `base=`: the draft's logits are the
base's logits plus `noise` times its own pseudo-random vector, so `noise -> 0` makes the
pair identical and large `noise` makes them unrelated.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence

import torch

from specsample.adapters.protocol import (
    check_commit_path_args,
    check_extend_args,
    check_extend_tree_args,
    check_last,
    check_prompts,
    check_remove_rows_args,
    check_truncate_args,
)

__all__ = ["ToyLM"]


def _prefix_seed(seed: int, prefix: tuple[int, ...]) -> int:
    """Stable 63-bit seed from (seed, prefix); unlike `hash()` it is identical across runs."""
    data = struct.pack(f"<q{len(prefix)}q", seed, *prefix)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class ToyLM:
    """Deterministic hash-based language model implementing `LanguageModel`.

    Args:
        vocab_size: number of tokens / logit columns.
        seed: selects the model; different seeds give unrelated models.
        scale: standard deviation of the logits of a standalone model (higher = peakier
            distributions). Ignored when `base` is given.
        base: another `ToyLM` (same vocab) to perturb.
        noise: with `base`, logits = base logits + noise * N(0, 1) (default 1.0).
        pad_value: value returned at padded positions of `extend` (e.g. `nan` to catch
            code that reads them).
    """

    def __init__(
        self,
        vocab_size: int,
        seed: int = 0,
        *,
        scale: float = 1.0,
        base: ToyLM | None = None,
        noise: float | None = None,
        pad_value: float = 0.0,
    ) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size: expected >= 1, got {vocab_size}")
        if base is not None and base.vocab_size != vocab_size:
            raise ValueError(
                f"base: expected a ToyLM with vocab_size={vocab_size}, got {base.vocab_size}"
            )
        if base is None and noise is not None:
            raise ValueError("noise: only meaningful together with base=, got base=None")
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self.scale = float(scale)
        self.base = base
        self.noise = 1.0 if noise is None else float(noise)
        self.pad_value = float(pad_value)
        self._seqs: list[list[int]] = []
        self._started = False
        # The open token tree: per row and node id, its parent id, whether it exists and the
        # path of tokens from the row's last token to it (None when no tree is open).
        self._tree: tuple[torch.Tensor, torch.Tensor, list[list[list[int]]]] | None = None
        # Counters so tests can check how much work a decoding loop asked for.
        self.num_calls = 0  # prefill + extend calls
        self.num_positions = 0  # logit positions computed (valid ones only)
        self._memo = functools.lru_cache(maxsize=1 << 16)(self._compute)

    # ------------------------------------------------------------------ exact access

    def logits_for(self, prefix: Sequence[int]) -> torch.Tensor:
        """Float32 logits `[vocab]` for the token following `prefix` (may be empty)."""
        return self._memo(tuple(int(t) for t in prefix)).clone()

    def probs_for(self, prefix: Sequence[int]) -> torch.Tensor:
        """Softmax of `logits_for(prefix)`, float32 `[vocab]`."""
        return torch.softmax(self.logits_for(prefix), dim=-1)

    def _compute(self, prefix: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_prefix_seed(self.seed, prefix))
        z = torch.randn(self.vocab_size, generator=gen)
        if self.base is None:
            return self.scale * z
        return self.base.logits_for(prefix) + self.noise * z

    # ------------------------------------------------------------------ protocol

    @property
    def lengths(self) -> torch.Tensor:
        """Current number of tokens per row, int64 `[batch]`."""
        return torch.tensor([len(s) for s in self._seqs], dtype=torch.long)

    @property
    def sequences(self) -> list[list[int]]:
        """A copy of every row's tokens (prompt included)."""
        return [list(s) for s in self._seqs]

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Reset to `prompts`; returns float logits `[batch, vocab]` after each prompt."""
        rows = check_prompts(prompts, self.vocab_size)
        self._seqs = []
        self._tree = None
        return self.add_rows(rows)

    def add_rows(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append one row per prompt; returns float logits `[len(prompts), vocab]`."""
        self._require_no_tree("add_rows")
        rows = check_prompts(prompts, self.vocab_size)
        self._seqs.extend(rows)
        self._started = True
        self.num_calls += 1
        self.num_positions += len(rows)
        return torch.stack([self.logits_for(s) for s in rows])

    def add_rows_last(self, prompts: Sequence[Sequence[int]], last: int) -> torch.Tensor:
        """`add_rows` returning the logits after each of each prompt's last `last` tokens,
        `[len(prompts), last, vocab]` (see `PromptScoring`)."""
        self._require_no_tree("add_rows_last")
        rows = check_prompts(prompts, self.vocab_size)
        last = check_last(last)
        out = torch.full((len(rows), last, self.vocab_size), self.pad_value)
        for r, row in enumerate(rows):
            for j in range(min(last, len(row))):
                out[r, last - 1 - j] = self.logits_for(row[: len(row) - j])
        self._seqs.extend(rows)
        self._started = True
        self.num_calls += 1
        self.num_positions += sum(len(row) for row in rows)
        return out

    def remove_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (increasing indices), renumbered 0..m-1."""
        self._require_state()
        self._require_no_tree("remove_rows")
        keep = check_remove_rows_args(keep, len(self._seqs))
        self._seqs = [self._seqs[i] for i in keep.tolist()]

    def extend(self, tokens: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        """Append `tokens[b, :num_valid[b]]`; returns float logits `[batch, n, vocab]`."""
        self._require_state()
        self._require_no_tree("extend")
        tokens, num_valid = check_extend_args(tokens, num_valid, len(self._seqs), self.vocab_size)
        n = tokens.shape[1]
        out = torch.full((len(self._seqs), n, self.vocab_size), self.pad_value)
        self.num_calls += 1
        for b, (row, k) in enumerate(zip(tokens.tolist(), num_valid.tolist(), strict=True)):
            seq = self._seqs[b]
            for j in range(k):
                seq.append(row[j])
                out[b, j] = self.logits_for(seq)
            self.num_positions += k
        return out

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep the first `lengths[b]` tokens of row b (int64 `[batch]`)."""
        self._require_state()
        self._require_no_tree("truncate")
        lengths = check_truncate_args(lengths, self.lengths)
        self._seqs = [s[:k] for s, k in zip(self._seqs, lengths.tolist(), strict=True)]

    def extend_tree(
        self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Add tree nodes (see `TreeLanguageModel.extend_tree`); logits `[batch, n, vocab]`."""
        self._require_state()
        batch = len(self._seqs)
        if self._tree is None:
            empty = torch.zeros(batch, 0, dtype=torch.long)
            self._tree = (empty, empty.bool(), [[] for _ in range(batch)])
        tree_parents, tree_valid, paths = self._tree
        tokens, parents, valid = check_extend_tree_args(
            tokens, parents, valid, batch, self.vocab_size, tree_valid
        )
        n = tokens.shape[1]
        out = torch.full((batch, n, self.vocab_size), self.pad_value)
        self.num_calls += 1
        for b in range(batch):
            for j in range(n):
                parent = int(parents[b, j])
                if not bool(valid[b, j]):
                    paths[b].append([])
                    continue
                path = ([] if parent < 0 else paths[b][parent]) + [int(tokens[b, j])]
                paths[b].append(path)
                out[b, j] = self.logits_for(self._seqs[b] + path)
                self.num_positions += 1
        self._tree = (
            torch.cat([tree_parents, torch.where(valid, parents, -1)], dim=1),
            torch.cat([tree_valid, valid], dim=1),
            paths,
        )
        return out

    def commit_path(self, path: torch.Tensor) -> None:
        """Close the open tree, appending row b's nodes `path[b]` (ids, -1 padded)."""
        self._require_state()
        if self._tree is None:
            raise RuntimeError("commit_path: no tree is open (call extend_tree() first)")
        tree_parents, tree_valid, paths = self._tree
        path = check_commit_path_args(path, tree_parents, tree_valid)
        for b, row in enumerate(path.tolist()):
            kept = [node for node in row if node >= 0]
            if kept:
                self._seqs[b].extend(paths[b][kept[-1]])
        self._tree = None

    def _require_no_tree(self, method: str) -> None:
        if self._tree is not None:
            raise RuntimeError(f"{method}: a token tree is open; call commit_path() first")

    def _require_state(self) -> None:
        if not self._started:
            raise RuntimeError("call prefill() before extend() or truncate()")
