"""Multi-draft and tree drafting with a draft model: each node's children are drawn from the draft
model's distribution after the path to that node, so the target can verify the whole tree with
recursive rejection sampling (ALGORITHMS.md section 3) after scoring it in one pass.

A tree shape is its branching per depth: (4, 1, 1, 1) is four independent chains of four tokens
(multi-draft, `TreeShape.chains(4, 4)`), (2, 2, 2) a full binary tree of depth 3. Nodes are
numbered level by level; within a level, children of the same parent are contiguous and follow
their parents' order. The draft model makes one forward pass per level (all nodes of a level in
one pass), as many as a single chain of the same depth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from specsample.adapters.protocol import LanguageModel, TreeLanguageModel
from specsample.adapters.cursor import ModelCursor
from specsample.drafters.children import draw_children
from specsample.rules.tree import node_depths, tree_parents
from specsample.warpers import SamplingConfig, logits_to_probs

CHILD_MODES = ("iid", "without_replacement", "top")
MAX_NODES = 256


@dataclass(frozen=True)
class TreeShape:
    """branching[d] children per node at depth d (the root is depth 0)."""

    branching: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.branching or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.branching
        ):
            raise ValueError(
                f"branching: expected one or more integers >= 1, got {self.branching!r}"
            )
        if self.num_nodes > MAX_NODES:
            raise ValueError(
                f"branching: expected a tree of at most {MAX_NODES} nodes, got "
                f"{self.branching!r} with {self.num_nodes} nodes"
            )

    @staticmethod
    def chains(m: int, depth: int) -> TreeShape:
        """m candidate chains of `depth` tokens each (multi-draft): the root has m children and
        every other node one child."""
        return TreeShape((m,) + (1,) * (depth - 1))

    @staticmethod
    def parse(text: str) -> TreeShape:
        """'WIDTHxDEPTH' (a full tree: WIDTH children per node, DEPTH levels) or a comma list of
        children per depth ('4,2,1')."""
        text = text.strip()
        full = re.fullmatch(r"(\d+)x(\d+)", text)
        if full:
            width, depth = int(full.group(1)), int(full.group(2))
            if depth < 1:
                raise ValueError(f"tree: expected DEPTH >= 1 in WIDTHxDEPTH, got {text!r}")
            return TreeShape((width,) * depth)
        if re.fullmatch(r"\d+(,\d+)*", text):
            return TreeShape(tuple(int(part) for part in text.split(",")))
        raise ValueError(
            f"tree: expected WIDTHxDEPTH (e.g. 2x3) or children per depth (e.g. 4,2,1), got "
            f"{text!r}"
        )

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def level_sizes(self) -> list[int]:
        sizes, count = [], 1
        for b in self.branching:
            count *= b
            sizes.append(count)
        return sizes

    @property
    def num_nodes(self) -> int:
        return sum(self.level_sizes)

    def parents(self) -> torch.Tensor:
        """int64 [num_nodes]: each node's parent id (-1 for the root's children); level by
        level, children of one parent contiguous."""
        return tree_parents(self.branching)


@dataclass
class TreeDraft:
    """tokens  int64 [batch, n]: the node tokens (0 where not valid).
    parents    int64 [n]: each node's parent (-1: the root, i.e. the row's last token).
    probs      float [batch, n, vocab]: the distribution each node was drawn from given its
               earlier siblings, or None when every node was chosen deterministically.
    valid      bool [batch, n]: the nodes that exist (cut at a row's depth limit, or children a
               draw without replacement could not make)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    probs: torch.Tensor | None
    valid: torch.Tensor

    def depth(self) -> int:
        """The deepest level of the tree (0 without nodes)."""
        return int(node_depths(self.parents).max()) if self.parents.numel() else 0

    def has_children(self) -> torch.Tensor:
        """bool [batch, n+1]: [b, 0] for the root, [b, 1+j] for node j."""
        batch, n = self.tokens.shape
        out = torch.zeros(batch, n + 1, dtype=torch.bool)
        index = (self.parents + 1)[None, :].expand(batch, n)
        return out.scatter_reduce(1, index, self.valid, reduce="amax")


class TreeDrafter:
    """Drafts a token tree of a fixed shape with a draft model.

    children: how a node's children are drawn from the draft distribution q there:
      "without_replacement" (default): distinct tokens, each from q with the earlier siblings
          removed and renormalised (the verification uses exactly those renormalised rows);
      "iid": independent draws from q (siblings may repeat);
      "top": the most probable tokens, deterministically (verified as point masses).
    At temperature 0 the children are always the draft's top tokens.
    """

    point_mass = False

    def __init__(
        self, model: LanguageModel, shape: TreeShape, *, children: str = "without_replacement"
    ):
        if not isinstance(model, TreeLanguageModel):
            raise TypeError(
                f"model: expected a TreeLanguageModel (with extend_tree and commit_path), got "
                f"{type(model).__name__}"
            )
        if not isinstance(shape, TreeShape):
            raise TypeError(f"shape: expected a TreeShape, got {type(shape).__name__}")
        if children not in CHILD_MODES:
            raise ValueError(f"children: expected one of {list(CHILD_MODES)}, got {children!r}")
        self.cursor = ModelCursor(model)
        self.shape = shape
        self.children = children
        self.forward_passes = 0

    @property
    def vocab_size(self) -> int:
        return self.cursor.vocab_size

    def start(self, prompts: list[list[int]]) -> None:
        self.cursor.start(prompts)

    def propose_tree(
        self,
        sequences: list[list[int]],
        max_depths: torch.Tensor,
        sampling: SamplingConfig,
        generator: torch.Generator,
    ) -> TreeDraft:
        """Drafts the tree after each sequence; row b gets no node deeper than max_depths[b]
        (0: no nodes)."""
        batch = len(sequences)
        active = max_depths > 0
        parents = self.shape.parents()
        mode = "top" if sampling.greedy else self.children
        logits = self.cursor.feed(sequences, active.tolist())[:, 0]  # [batch, vocab]
        self.forward_passes += 1
        frontier_q = self._warp(logits, sampling)[:, None]  # [batch, 1, vocab]
        frontier_valid = active[:, None]
        tokens, probs, valid = [], [], []
        first = 0
        for d, branching in enumerate(self.shape.branching):
            width = frontier_q.shape[1]
            vocab = frontier_q.shape[2]
            child_tokens, child_probs, child_valid = draw_children(
                frontier_q.reshape(batch * width, vocab), branching, mode, generator
            )
            level_valid = child_valid.reshape(batch, width * branching).cpu()
            level_valid &= frontier_valid.repeat_interleave(branching, dim=1)
            level_valid &= (max_depths > d)[:, None]
            level_tokens = torch.where(
                level_valid, child_tokens.reshape(batch, width * branching).cpu(), 0
            )
            tokens.append(level_tokens)
            valid.append(level_valid)
            if child_probs is not None:
                probs.append(child_probs.reshape(batch, width * branching, vocab))
            size = width * branching
            if d + 1 < self.shape.depth and bool(level_valid.any()):
                level_parents = parents[first : first + size]
                logits = self.cursor.grow_tree(level_tokens, level_parents, level_valid, first)
                self.forward_passes += 1
                frontier_q = self._warp(logits, sampling)  # [batch, size, vocab]
                frontier_valid = level_valid
            elif d + 1 < self.shape.depth:
                frontier_valid = level_valid
                frontier_q = frontier_q.new_zeros(batch, size, vocab)
            first += size
        assert first == self.shape.num_nodes
        return TreeDraft(
            torch.cat(tokens, dim=1),
            parents,
            torch.cat(probs, dim=1) if probs else None,
            torch.cat(valid, dim=1),
        )

    def _warp(self, logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        # At temperature 0 the top children of the draft's own softmax are drafted.
        if sampling.greedy:
            return torch.softmax(logits.float(), dim=-1)
        return logits_to_probs(logits.float(), sampling)
