"""Multi-draft and tree drafting with a draft model: each node's children are drawn from the draft
model's distribution after the path to that node, so the target can verify the whole tree with
recursive rejection sampling (docs/algorithms.md, tree rule) after scoring it in one pass.

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

from specsample.adapters.cursor import ModelCursor
from specsample.adapters.protocol import LanguageModel, TreeLanguageModel
from specsample.drafters.base import CursorDrafter
from specsample.drafters.children import draw_children
from specsample.rules.coupled import coupled_top
from specsample.rules.draft import Draft
from specsample.rules.tree import tree_parents
from specsample.warpers import RowSampling

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


class TreeDrafter(CursorDrafter):
    """Drafts a token tree of a fixed shape with a draft model.

    children: how a node's children are drawn from the draft distribution q there:
      "without_replacement" (default): distinct tokens, each from q with the earlier siblings
          removed and renormalised (the verification uses exactly those renormalised rows);
      "iid": independent draws from q (siblings may repeat);
      "top": the most probable tokens, deterministically (verified as point masses).
    At temperature 0 the children are always the draft's top tokens. Under the coupled rule the
    children are the best tokens by log q + g, g the request's Gumbel noise at the children's
    position (the first child is the draft's coupled pick), whatever `children` says.
    """

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
        self.cursor = ModelCursor(model, lazy=True)
        self.shape = shape
        self.children = children
        self.forward_passes = 0
        self.fixed_depth = shape.depth

    def propose(
        self, sequences: list[list[int]], max_lengths: torch.Tensor, sampling: RowSampling
    ) -> Draft:
        """Drafts the tree after each sequence; row b gets no node deeper than max_lengths[b]
        (0: no nodes), and draws its children with sampling.generators[b] alone."""
        batch = len(sequences)
        active = max_lengths > 0
        parents = self.shape.parents()
        greedy = sampling.greedy.tolist()
        logits = self.cursor.feed(sequences, active.tolist())[:, 0]  # [batch, vocab]
        self.forward_passes += int(self.cursor.fed)  # none: every row was ready
        frontier_q = self._warp(logits, sampling)[:, None]  # [batch, 1, vocab]
        frontier_valid = active[:, None]
        noise = self._coupled_noise(sampling, logits.device)
        tokens, probs, valid = [], [], []
        first = 0
        for d, branching in enumerate(self.shape.branching):
            width, vocab = frontier_q.shape[1], frontier_q.shape[2]
            if not sampling.all_coupled:
                level_tokens, level_probs, level_valid = self._draw_level(
                    frontier_q, branching, greedy, sampling
                )
            if noise is not None:  # the coupled rows' children: no draws from generators
                top_tokens, top_valid = coupled_top(frontier_q, noise[:, d, None], branching)
                top_tokens = top_tokens.reshape(batch, -1).cpu()
                top_valid = top_valid.reshape(batch, -1).cpu()
                if sampling.all_coupled:
                    level_tokens, level_valid, level_probs = top_tokens, top_valid, None
                else:
                    coupled = sampling.coupled_mask[:, None]
                    level_tokens = torch.where(coupled, top_tokens, level_tokens)
                    level_valid = torch.where(coupled, top_valid, level_valid)
            level_valid &= frontier_valid.repeat_interleave(branching, dim=1)
            level_valid &= (max_lengths > d)[:, None]
            level_tokens = torch.where(level_valid, level_tokens, 0)
            tokens.append(level_tokens)
            valid.append(level_valid)
            probs.append(level_probs)
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
        deterministic = all(greedy) or self.children == "top" or sampling.all_coupled
        return Draft(
            torch.cat(tokens, dim=1),
            parents,
            None if deterministic else torch.cat(probs, dim=1),
            torch.cat(valid, dim=1),
        )

    def _draw_level(
        self, frontier_q: torch.Tensor, branching: int, greedy: list[bool], sampling: RowSampling
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Children of every frontier node, row by row with the row's own generator. Returns
        tokens int64 [batch, width*branching], the distribution each child was drawn from
        [batch, width*branching, vocab] (one-hot for deterministic children) and valid."""
        tokens, probs, valid = [], [], []
        for b in range(frontier_q.shape[0]):
            if sampling.coupled_rows[b]:  # drafted with the coupled noise, never read here
                count = frontier_q.shape[1] * branching
                tokens.append(torch.zeros(count, dtype=torch.int64))
                probs.append(frontier_q.new_zeros(count, frontier_q.shape[2]))
                valid.append(torch.zeros(count, dtype=torch.bool))
                continue
            mode = "top" if greedy[b] else self.children
            child_tokens, child_probs, child_valid = draw_children(
                frontier_q[b], branching, mode, sampling.generators[b]
            )
            child_tokens = child_tokens.reshape(-1)
            if child_probs is None:
                child_probs = torch.nn.functional.one_hot(child_tokens, frontier_q.shape[2]).to(
                    frontier_q.dtype
                )
            tokens.append(child_tokens.cpu())
            probs.append(child_probs.reshape(-1, frontier_q.shape[2]))
            valid.append(child_valid.reshape(-1).cpu())
        return torch.stack(tokens), torch.stack(probs), torch.stack(valid)

    def _coupled_noise(self, sampling: RowSampling, device) -> torch.Tensor | None:
        """float64 [batch, depth, vocab]: the Gumbel noise of each depth's children under the
        coupled rule (zero for greedy rows: their children are the draft's top tokens; zero for
        rows not under the coupled rule, whose children are drawn), or None when no row is."""
        if not sampling.coupled:
            return None
        noise = sampling.gumbel(self.shape.depth, self.vocab_size, device)
        greedy = sampling.greedy.to(device)[:, None, None]
        return torch.where(greedy, 0.0, noise)

    def _warp(self, logits: torch.Tensor, sampling: RowSampling) -> torch.Tensor:
        # At temperature 0 the top children of the draft's own softmax are drafted.
        plain = torch.softmax(logits.float(), dim=-1)
        greedy = sampling.greedy.to(logits.device).reshape(-1, *(1,) * (logits.dim() - 1))
        return torch.where(greedy, plain, sampling.warp(logits.float()))
