"""The one draft type: a token tree per row. A chain is a tree whose nodes have one child each;
drafters make drafts, the cursor scores them, the rules verify them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specsample.rules.tree import node_depths

_EMPTY: dict[int, Draft] = {}  # Draft.empty by batch size


@dataclass(frozen=True)
class Draft:
    """Frozen: Draft.empty hands out one shared draft per batch size, so no code may change a
    draft's fields (dataclasses.replace makes a new one).

    tokens     int64 [batch, n]: the node tokens (0 where not valid).
    parents    int64 [n]: each node's parent (-1: the root, i.e. the row's last token); nodes in
               topological order, siblings in the order they were drawn.
    probs      float [batch, n, vocab]: the distribution each node was drawn from (given its
               earlier siblings), or None for point-mass drafts (n-gram lookup, greedy drafting,
               deterministic children: probability 1 on each drafted token).
    valid      bool [batch, n]: the nodes that exist (a chain row of length L has its first L
               nodes; a tree row is cut at its depth limit, or a draw without replacement could
               not make a child). Every descendant of an invalid node is invalid."""

    tokens: torch.Tensor
    parents: torch.Tensor
    probs: torch.Tensor | None
    valid: torch.Tensor

    @staticmethod
    def empty(batch: int) -> Draft:
        """No nodes in any of `batch` rows (a target-only step). The tensors hold no elements,
        so drafts of one batch size share them (a step without drafts builds none)."""
        draft = _EMPTY.get(batch)
        if draft is None:
            draft = _EMPTY[batch] = Draft(
                torch.zeros(batch, 0, dtype=torch.int64),
                torch.zeros(0, dtype=torch.int64),
                None,
                torch.zeros(batch, 0, dtype=torch.bool),
            )
        return draft

    @staticmethod
    def chain(tokens: torch.Tensor, probs: torch.Tensor | None, lengths: torch.Tensor) -> Draft:
        """One chain per row: tokens [batch, k], row b keeps its first lengths[b] drafts."""
        batch, k = tokens.shape
        valid = torch.arange(k)[None, :] < lengths.cpu()[:, None]
        return Draft(
            torch.where(valid, tokens.cpu(), 0), torch.arange(-1, k - 1), probs, valid.cpu()
        )

    def cut(self, width: int) -> Draft:
        """A chain draft with every row cut to its first `width` drafts (the nodes past them
        removed)."""
        if not self.is_chain:
            raise ValueError("cut: expected a chain draft, got a tree")
        if isinstance(width, bool) or not isinstance(width, int) or width < 0:
            raise ValueError(f"width: expected an integer >= 0, got {width!r}")
        probs = None if self.probs is None else self.probs[:, :width]
        return Draft(self.tokens[:, :width], self.parents[:width], probs, self.valid[:, :width])

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def is_chain(self) -> bool:
        """True when every node's parent is the node before it (one chain per row)."""
        n = self.num_nodes
        if not n:  # no nodes: trivially one (empty) chain per row
            return True
        return bool(torch.equal(self.parents.cpu(), torch.arange(-1, n - 1)))

    @property
    def lengths(self) -> torch.Tensor:
        """int64 [batch]: valid nodes per row (a chain's draft length)."""
        return self.valid.sum(dim=1)

    def depths(self) -> torch.Tensor:
        """int64 [batch]: the depth of each row's deepest valid node (0 without nodes)."""
        if not self.num_nodes:
            return torch.zeros(self.batch, dtype=torch.int64)
        depth = node_depths(self.parents)[None, :].expand(self.batch, -1)
        return torch.where(self.valid, depth, 0).amax(dim=1)

    def used_uniforms(self) -> list[int]:
        """Per row: how many keep uniforms verification may read (up to its last valid node)."""
        if not self.num_nodes:
            return [0] * self.batch
        index = torch.arange(1, self.num_nodes + 1)[None, :]
        return torch.where(self.valid, index, 0).amax(dim=1).tolist()

    def has_children(self) -> torch.Tensor:
        """bool [batch, n+1]: [b, 0] for the root, [b, 1+j] for node j."""
        batch, n = self.tokens.shape
        out = torch.zeros(batch, n + 1, dtype=torch.bool)
        if n == 0:
            return out
        index = (self.parents + 1)[None, :].expand(batch, n)
        return out.scatter_reduce(1, index, self.valid, reduce="amax")
