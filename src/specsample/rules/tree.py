"""Tree verification: recursive rejection sampling over a tree of drafted tokens (SpecInfer,
arXiv 2305.09781; recursive rejection sampling, arXiv 2402.14160; docs/algorithms.md).

The drafts form a forest under the context (the root). Node j holds one drafted token; its parent
is parents[j] (-1: a child of the root). Nodes are in topological order and siblings are ordered by
node index, the order they were drawn in. q_j is the distribution node j was actually drawn from
given its earlier siblings: q for i.i.d. children, q with the earlier siblings removed and
renormalised for children drawn without replacement, one-hot for deterministic children
(draft_probs=None). Starting at the root with r = p:

    for each valid child c_j of the current node, in sibling order:
        if u_j * q_j(c_j) < r(c_j): accept c_j, move to node j, r = p(after j), start again
        else:                       r = normalize(max(0, r - q_j))
    no child accepted: emit one token ~ r and stop (recovered if a child was rejected, bonus
    from p if the node has no valid children)

Every step is an exact rejection step of "c_j ~ q_j against r", so the emitted tokens are
distributed exactly as the target. With one chain of nodes this is the token rule (`token.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specsample.rules import checks
from specsample.rules.result import PAD, assemble_tokens
from specsample.rules.sampling import draw_uniforms, sample_from_weights


@dataclass(frozen=True)
class TreeResult:
    """The outcome of verifying one tree of drafts per row.

    tokens:       int64 [batch, depth+1]: the tokens of the accepted path, then one recovered or
                  bonus token, then PAD (-1). depth is the tree's largest node depth.
    num_accepted: int64 [batch]: accepted nodes; row b emitted num_accepted[b] + 1 tokens.
    path:         int64 [batch, depth]: the node indices of the accepted nodes, root side first,
                  then -1.
    rule_used:    "tree", or "greedy" from `greedy_tree_rule`.
    """

    tokens: torch.Tensor
    num_accepted: torch.Tensor
    path: torch.Tensor
    rule_used: str = "tree"

    @property
    def num_emitted(self) -> torch.Tensor:
        """int64 [batch]: accepted nodes plus the one recovered or bonus token."""
        return self.num_accepted + 1


# Tree shapes.


def tree_parents(branching: Sequence[int]) -> torch.Tensor:
    """int64 [n]: the parents of a full tree where every node at depth d has branching[d]
    children (the root is depth 0): (4, 2, 1) gives 4 + 8 + 8 nodes.

    Nodes are ordered level by level (breadth first); the children of one parent are contiguous
    and the groups follow their parents' order.
    """
    parents: list[int] = []
    level = [-1]  # the nodes of the previous level (the root)
    for width in branching:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(
                f"branching: expected positive integers (children per node at each depth), "
                f"got {list(branching)!r}"
            )
        start = len(parents)
        for parent in level:
            parents.extend([parent] * width)
        level = list(range(start, len(parents)))
    return torch.tensor(parents, dtype=torch.int64)


def chain_parents(m: int, depth: int) -> torch.Tensor:
    """int64 [m * depth]: the parents of m independent chains of `depth` nodes each under the root
    (multi-draft). Nodes are ordered level by level: node level * m + c is chain c's node at depth
    level + 1, so the root's m children come first. The same as tree_parents((m, 1, ..., 1))."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m: expected a positive number of chains, got {m!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth: expected a non-negative chain length, got {depth!r}")
    return tree_parents((m,) + (1,) * (depth - 1)) if depth else torch.zeros(0, dtype=torch.int64)


def node_depths(parents: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """int64 [n]: the depth of every node (the root's children have depth 1); parents in
    topological order."""
    depths: list[int] = []
    for parent in _as_list(parents):
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return torch.tensor(depths, dtype=torch.int64)


def _as_list(parents: torch.Tensor | Sequence[int]) -> list[int]:
    if isinstance(parents, torch.Tensor):
        return [int(p) for p in parents.tolist()]
    return [int(p) for p in parents]


def _tree_depth(parent_list: list[int]) -> int:
    return int(node_depths(parent_list).max()) if parent_list else 0


# The rules.


def tree_rule(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    node_valid: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> TreeResult:
    """Pure recursive rejection sampling on checked inputs (n = number of tree nodes).

    draft_tokens    int64 [batch, n]: the token of each node (any id at invalid nodes)
    parents         int64 [n]: parents[j] in [-1, j); -1 is the root (the context)
    draft_probs     float [batch, n, vocab]: q_j, the distribution node j was drawn from given its
                    earlier siblings; or None: every node is a point mass (q_j one-hot)
    target_probs    float [batch, n+1, vocab]: row 0 at the root, row j+1 after node j
    node_valid      bool [batch, n]: invalid nodes (and all their descendants) are skipped
    accept_uniforms float64 [batch, n] in [0, 1): node j's test (each node is tested at most once)
    sample_uniforms float64 [batch] in [0, 1): draws the recovered or bonus token

    The walk visits nodes in index order, which is a valid order for every row at once: a row
    tests node j only while it stands at j's parent, and all of j's children come after j.
    The current residual is kept unnormalised, r = weights / mass, so that a chain of one node
    per level computes exactly what `token_rule` does.
    """
    batch, n = draft_tokens.shape
    parent_list = _as_list(parents)
    assert len(parent_list) == n
    depth = _tree_depth(parent_list)
    device = target_probs.device
    compute_dtype = torch.promote_types(target_probs.dtype, torch.float32)
    if draft_probs is not None:
        compute_dtype = torch.promote_types(compute_dtype, draft_probs.dtype)
    tokens = torch.where(node_valid, draft_tokens, 0)  # invalid ids become safe indices

    at = torch.full((batch,), -1, dtype=torch.int64, device=device)  # the current node
    weights = target_probs[:, 0].to(compute_dtype, copy=True)  # [batch, vocab]
    mass = torch.ones(batch, dtype=torch.float64, device=device)  # [batch]
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    path = torch.full((batch, depth), PAD, dtype=torch.int64, device=device)
    for j, parent in enumerate(parent_list):
        rows = torch.nonzero(node_valid[:, j] & (at == parent))[:, 0]  # the rows testing node j
        if rows.numel() == 0:
            continue
        token = tokens[rows, j]
        target_here = weights[rows, token].to(torch.float64)
        draft_here = 1.0 if draft_probs is None else draft_probs[rows, j, token].to(torch.float64)
        kept = accept_uniforms[rows, j] * draft_here * mass[rows] < target_here
        accepted, rejected = rows[kept], rows[~kept]
        if rejected.numel():
            q = None if draft_probs is None else draft_probs[rejected, j]
            _subtract_rejected(weights, mass, rejected, q, token[~kept])
        if accepted.numel():
            path[accepted, num_accepted[accepted]] = j
            num_accepted[accepted] += 1
            at[accepted] = j
            weights[accepted] = target_probs[accepted, j + 1].to(compute_dtype)
            mass[accepted] = 1.0
    final = sample_from_weights(weights, sample_uniforms)
    path_tokens = tokens.gather(1, path.clamp(min=0))  # [batch, depth]
    return TreeResult(assemble_tokens(path_tokens, num_accepted, final), num_accepted, path)


def _subtract_rejected(
    weights: torch.Tensor,
    mass: torch.Tensor,
    rows: torch.Tensor,
    draft_rows: torch.Tensor | None,
    tokens: torch.Tensor,
) -> None:
    """In place: r = weights / mass becomes normalize(max(0, r - q)) on `rows`, kept as
    max(0, weights - mass q) and its sum. One-hot q (draft_rows None) zeroes the rejected token.
    A row left without mass keeps r (a rejection of probability 0 in exact arithmetic; the same
    fallback as `residual`)."""
    residual = weights[rows]  # [rows, vocab], a copy
    if draft_rows is None:
        residual.scatter_(1, tokens[:, None], 0.0)
    else:
        scaled = draft_rows.to(residual.dtype) * mass[rows, None].to(residual.dtype)
        residual.sub_(scaled).clamp_(min=0.0)
    new_mass = residual.sum(dim=-1, dtype=torch.float64)
    has_mass = new_mass > 0
    weights[rows[has_mass]] = residual[has_mass]
    mass[rows[has_mass]] = new_mass[has_mass]


def greedy_tree_rule(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_tokens: torch.Tensor,
    node_valid: torch.Tensor,
) -> TreeResult:
    """Temperature 0: from the root, move to the first valid child whose token is the target's
    argmax; where none is, emit the argmax and stop.

    draft_tokens int64 [batch, n]; parents int64 [n]; target_tokens int64 [batch, n+1] (the
    target's argmax at the root and after each node); node_valid bool [batch, n].
    """
    batch, n = draft_tokens.shape
    parent_list = _as_list(parents)
    depth = _tree_depth(parent_list)
    device = draft_tokens.device
    tokens = torch.where(node_valid, draft_tokens, PAD)  # PAD never equals an argmax
    at = torch.full((batch,), -1, dtype=torch.int64, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    path = torch.full((batch, depth), PAD, dtype=torch.int64, device=device)
    slots = torch.arange(depth, device=device)[None, :]
    for j, parent in enumerate(parent_list):
        wanted = target_tokens.gather(1, (at + 1)[:, None])[:, 0]
        moves = (at == parent) & (tokens[:, j] == wanted)
        path = torch.where(moves[:, None] & (slots == num_accepted[:, None]), j, path)
        num_accepted = num_accepted + moves.long()
        at = torch.where(moves, j, at)
    final = target_tokens.gather(1, (at + 1)[:, None])[:, 0]
    path_tokens = tokens.gather(1, path.clamp(min=0))
    return TreeResult(
        assemble_tokens(path_tokens, num_accepted, final), num_accepted, path, "greedy"
    )


# The public entry point.


def verify_tree(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    *,
    generator: torch.Generator,
    node_valid: torch.Tensor | None = None,
    validate: bool = True,
) -> TreeResult:
    """Verifies one tree of drafts per row; the emitted tokens are distributed exactly as the
    target.

    draft_tokens int64 [batch, n]: the token of each tree node.
    parents      int64 [n]: parents[j] in [-1, j) (-1: a child of the root, the context); nodes
                 in topological order, siblings in the order they were drawn. Read as a list, so
                 it may live on the CPU whatever the other tensors' device.
    draft_probs  float [batch, n, vocab]: the distribution each node was drawn from given its
                 earlier siblings (renormalised for drafts without replacement), or None for
                 deterministic children (top-m, n-gram lookup: probability 1 on each token).
    target_probs float [batch, n+1, vocab]: row 0 after the context, row j+1 after the path to
                 node j (context + its ancestors + node j).
    generator    torch.Generator on the tensors' device; the only source of randomness. Draws, in
                 order: uniforms [batch, n], then uniforms [batch] (float64).
    node_valid   bool [batch, n] or None (all valid): invalid nodes are never tested; every
                 descendant of an invalid node must be invalid too. For ragged trees, inactive
                 rows (all False: one token from p at the root) and children a draw without
                 replacement could not make.
    validate     True also checks every probability row the rule may read (finite,
                 non-negative, summing to 1 within checks.SUM_TOLERANCE); structure, token ids
                 and drafted-token probabilities are always checked.

    Returns a TreeResult: tokens int64 [batch, depth+1], num_accepted int64 [batch], path int64
    [batch, depth].
    """
    draft_tokens = _check_draft_tokens(draft_tokens)
    batch, n = draft_tokens.shape
    parents = _check_parents(parents, n)
    target_probs = checks.check_probs("target_probs", target_probs, "[batch, n+1, vocab]")
    if draft_probs is not None:
        draft_probs = checks.check_probs("draft_probs", draft_probs, "[batch, n, vocab]")
    checks.check_shapes(
        draft_tokens,
        draft_probs,
        target_probs,
        length="n",
        last_row="row 0 is the root's distribution, row j+1 the one after node j",
    )
    checks.check_devices(
        draft_tokens,
        draft_probs,
        target_probs,
        node_valid,
        names="draft_tokens, draft_probs, target_probs, node_valid",
    )
    device = target_probs.device
    checks.check_generator(generator, device)
    node_valid = _check_node_valid(node_valid, batch, n, device)
    _check_descendants_invalid(node_valid, parents)
    vocab = target_probs.shape[2]
    checks.check_token_range(draft_tokens, node_valid, vocab)
    draft_tokens = torch.where(node_valid, draft_tokens, 0)
    if draft_probs is not None:
        checks.check_drafted_tokens_possible(draft_tokens, draft_probs, node_valid)
    if validate:
        root = torch.ones(batch, 1, dtype=torch.bool, device=device)
        used_target_rows = torch.cat([root, node_valid], dim=1)
        checks.check_distribution_values("target_probs", target_probs, used_target_rows)
        if draft_probs is not None:
            checks.check_distribution_values("draft_probs", draft_probs, node_valid)
    accept_uniforms, sample_uniforms = draw_uniforms(batch, n, generator, device)
    return tree_rule(
        draft_tokens,
        parents,
        draft_probs,
        target_probs,
        node_valid,
        accept_uniforms,
        sample_uniforms,
    )


def _is_integer_tensor(value: object) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and not value.dtype.is_floating_point
        and not value.dtype.is_complex
        and value.dtype != torch.bool
    )


def _check_draft_tokens(draft_tokens: object) -> torch.Tensor:
    if not _is_integer_tensor(draft_tokens):
        got = getattr(draft_tokens, "dtype", type(draft_tokens).__name__)
        raise TypeError(f"draft_tokens: expected an int64 tensor [batch, n], got {got}")
    if draft_tokens.dim() != 2:
        raise ValueError(
            f"draft_tokens: expected 2 dimensions [batch, n], got shape {tuple(draft_tokens.shape)}"
        )
    return draft_tokens.long()


def _check_parents(parents: object, n: int) -> torch.Tensor:
    if not _is_integer_tensor(parents):
        got = getattr(parents, "dtype", type(parents).__name__)
        raise TypeError(
            f"parents: expected an int64 tensor [n={n}] (e.g. tree_parents((2, 2))), got {got}"
        )
    if tuple(parents.shape) != (n,):
        raise ValueError(
            f"parents: expected shape [n={n}] to match draft_tokens' {n} nodes, got "
            f"{tuple(parents.shape)}"
        )
    for j, parent in enumerate(_as_list(parents)):
        if not -1 <= parent < j:
            raise ValueError(
                f"parents: expected parents[j] in [-1, j) (-1 for a child of the root; nodes in "
                f"topological order, every node after its parent), got parents[{j}] = {parent}"
            )
    return parents.long()


def _check_node_valid(node_valid: object, batch: int, n: int, device: torch.device) -> torch.Tensor:
    if node_valid is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    if not isinstance(node_valid, torch.Tensor) or node_valid.dtype != torch.bool:
        got = getattr(node_valid, "dtype", type(node_valid).__name__)
        raise TypeError(f"node_valid: expected None or a bool tensor [batch, n], got {got}")
    if tuple(node_valid.shape) != (batch, n):
        raise ValueError(
            f"node_valid: expected shape [batch={batch}, n={n}], got {tuple(node_valid.shape)}"
        )
    return node_valid


def _check_descendants_invalid(node_valid: torch.Tensor, parents: torch.Tensor) -> None:
    parent_list = _as_list(parents)
    children = [j for j, parent in enumerate(parent_list) if parent >= 0]
    if not children:
        return
    child_index = torch.tensor(children, device=node_valid.device)
    parent_index = torch.tensor([parent_list[j] for j in children], device=node_valid.device)
    orphaned = node_valid[:, child_index] & ~node_valid[:, parent_index]
    if bool(orphaned.any()):
        b, i = (int(v) for v in torch.nonzero(orphaned)[0])
        j = children[i]
        raise ValueError(
            f"node_valid: node {j} is valid in row {b} but its parent node {parent_list[j]} is "
            f"not; every descendant of an invalid node must be invalid too"
        )
