"""Exact output distributions of a verification step, by enumeration in float64.

For a small vocabulary and draft length this enumerates every draft sequence and every outcome of
the randomness, and runs the rule implementation itself once per outcome, in one batch. The
randomness is split into the pieces on which the rule's decisions are constant (a keep test
u_i < min(1, p/q) has two pieces; the recovered or bonus token's uniform has one piece per token of
positive weight); the rule is driven with the midpoint of each piece and the piece's length is its
probability. The result is the exact distribution of emitted sequences, which `prefix_errors`
compares with the target at every prefix.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specsample.rules.result import PAD, VerifyResult
from specsample.rules.sampling import acceptance_probability, residual

# A "model" for enumeration: the next-token distribution (float64 [vocab]) after a prefix of ids.
PrefixModel = Callable[[tuple[int, ...]], torch.Tensor]
Rule = Callable[..., VerifyResult]


@dataclass
class _Outcomes:
    """One row per (draft sequence, piece of the randomness), ready to run as one batch."""

    draft_tokens: list[list[int]]
    draft_rows: list[torch.Tensor]
    target_rows: list[torch.Tensor]
    accept_uniforms: list[list[float]]
    sample_uniforms: list[float]
    weights: list[float]


def exact_token_rule_distribution(
    rule: Rule,
    target: PrefixModel,
    draft: PrefixModel,
    *,
    k: int,
    point_mass: bool = False,
) -> dict[tuple[int, ...], float]:
    """The exact distribution of the tokens one step of `rule` emits.

    rule:       a function with the signature of `specsample.rules.token.token_rule`.
    target:     prefix -> p(. | prefix); draft: prefix -> q(. | prefix).
    point_mass: draft deterministically (the argmax of q, lowest id on ties) and pass
                draft_probs=None, as an n-gram drafter does.
    Returns {emitted token tuple: probability}.
    """
    outcomes = _Outcomes([], [], [], [], [], [])
    vocab = int(target(()).shape[0])
    for drafts, weight in _draft_sequences(draft, vocab, k, point_mass):
        _add_pieces(outcomes, target, draft, drafts, weight, point_mass)
    return _emitted_distribution(rule, outcomes, k, point_mass)


def exact_block_rule_distribution(
    rule: Rule, target: PrefixModel, draft: PrefixModel, *, k: int
) -> dict[tuple[int, ...], float]:
    """The exact distribution of the tokens one step of a block-verification `rule` emits.

    The pieces of the randomness follow the block rule (docs/algorithms.md), computed here
    independently in float64: each u_i passes (u_i <= h_i) or fails, tau is the last pass, and the
    final token's uniform has one piece per token of the block residual
    normalize(max(0, P_tau p - q)).
    """
    outcomes = _Outcomes([], [], [], [], [], [])
    vocab = int(target(()).shape[0])
    for drafts, weight in _draft_sequences(draft, vocab, k, point_mass=False):
        _add_block_pieces(outcomes, target, draft, drafts, weight)
    return _emitted_distribution(rule, outcomes, k, point_mass=False)


def expected_accepted(distribution: dict[tuple[int, ...], float]) -> float:
    """E[number of accepted drafts] = E[emitted tokens] - 1."""
    return sum((len(sequence) - 1) * weight for sequence, weight in distribution.items())


def _emitted_distribution(
    rule: Rule, outcomes: _Outcomes, k: int, point_mass: bool
) -> dict[tuple[int, ...], float]:
    """Runs `rule` once per outcome, in one batch, and adds up what it emitted."""
    rows = len(outcomes.weights)
    result = rule(
        torch.tensor(outcomes.draft_tokens, dtype=torch.int64).reshape(rows, k),
        None if point_mass else torch.stack(outcomes.draft_rows),
        torch.stack(outcomes.target_rows),
        torch.full((rows,), k, dtype=torch.int64),
        torch.tensor(outcomes.accept_uniforms, dtype=torch.float64).reshape(rows, k),
        torch.tensor(outcomes.sample_uniforms, dtype=torch.float64),
    )
    distribution: dict[tuple[int, ...], float] = defaultdict(float)
    for row, weight in zip(result.tokens.tolist(), outcomes.weights, strict=True):
        distribution[tuple(t for t in row if t != PAD)] += weight
    return dict(distribution)


def prefix_errors(
    distribution: dict[tuple[int, ...], float], target: PrefixModel
) -> tuple[float, float]:
    """(largest |P(next = v | prefix) - p(v | prefix)| over every emitted prefix and token,
    |total probability - 1|)."""
    counts: dict[tuple[int, ...], torch.Tensor] = {}
    vocab = int(target(()).shape[0])
    for sequence, weight in distribution.items():
        for j in range(len(sequence)):
            prefix = sequence[:j]
            if prefix not in counts:
                counts[prefix] = torch.zeros(vocab, dtype=torch.float64)
            counts[prefix][sequence[j]] += weight
    worst = 0.0
    for prefix, count in counts.items():
        conditional = count / count.sum()
        worst = max(worst, float((conditional - target(prefix).to(torch.float64)).abs().max()))
    return worst, abs(sum(distribution.values()) - 1.0)


def _draft_sequences(draft: PrefixModel, vocab: int, k: int, point_mass: bool):
    """(draft sequence, its probability under the drafter) for every possible sequence."""
    if point_mass:
        prefix: tuple[int, ...] = ()
        for _ in range(k):
            prefix += (int(draft(prefix).argmax()),)
        yield prefix, 1.0
        return
    for drafts in itertools.product(range(vocab), repeat=k):
        weight = 1.0
        for i in range(k):
            weight *= float(draft(drafts[:i])[drafts[i]])
        if weight > 0:
            yield drafts, weight


def _add_pieces(
    outcomes: _Outcomes,
    target: PrefixModel,
    draft: PrefixModel,
    drafts: tuple[int, ...],
    weight: float,
    point_mass: bool,
) -> None:
    k = len(drafts)
    target_rows = [target(drafts[:i]).to(torch.float64) for i in range(k + 1)]
    draft_rows = [_drafted_from(draft, drafts, i, point_mass) for i in range(k)]
    keep = [
        float(
            acceptance_probability(target_rows[i][drafts[i]].log(), draft_rows[i][drafts[i]].log())
        )
        for i in range(k)
    ]
    for accepted in range(k + 1):
        # Drafts 0..accepted-1 kept (u_i < keep_i), draft `accepted` rejected (u >= keep).
        pattern = 1.0
        uniforms = [0.5] * k
        for i in range(accepted):
            pattern *= keep[i]
            uniforms[i] = keep[i] / 2
        if accepted < k:
            pattern *= 1 - keep[accepted]
            uniforms[accepted] = (1 + keep[accepted]) / 2
        if pattern <= 0:
            continue
        final = (
            residual(target_rows[accepted], draft_rows[accepted])
            if accepted < k
            else target_rows[k]
        )
        _add_final_token_pieces(
            outcomes, drafts, draft_rows, target_rows, uniforms, final, weight * pattern
        )


def _add_block_pieces(
    outcomes: _Outcomes,
    target: PrefixModel,
    draft: PrefixModel,
    drafts: tuple[int, ...],
    weight: float,
) -> None:
    k = len(drafts)
    p = [target(drafts[:i]).to(torch.float64) for i in range(k + 1)]
    q = [draft(drafts[:i]).to(torch.float64) for i in range(k)]
    kept = [1.0]
    for i in range(k):
        kept.append(min(1.0, kept[i] * float(p[i][drafts[i]]) / float(q[i][drafts[i]])))
    thresholds = []
    for i in range(1, k + 1):
        if i == k:
            thresholds.append(kept[k])
            continue
        mass = float(torch.clamp(kept[i] * p[i] - q[i], min=0.0).sum())
        denominator = mass + 1.0 - kept[i]
        thresholds.append(mass / denominator if denominator > 0 else 1.0)
    for passes in itertools.product((True, False), repeat=k):
        pattern = 1.0
        for passed, h in zip(passes, thresholds, strict=True):
            pattern *= h if passed else 1 - h
        if pattern <= 0:
            continue
        uniforms = [
            h / 2 if passed else (1 + h) / 2 for passed, h in zip(passes, thresholds, strict=True)
        ]
        tau = max((i + 1 for i in range(k) if passes[i]), default=0)
        if tau == k:
            final = p[k]
        else:
            final = torch.clamp(kept[tau] * p[tau] - q[tau], min=0.0)
            final = final / final.sum() if float(final.sum()) > 0 else p[tau]
        _add_final_token_pieces(outcomes, drafts, q, p, uniforms, final, weight * pattern)


def _add_final_token_pieces(
    outcomes: _Outcomes,
    drafts: tuple[int, ...],
    draft_rows: list[torch.Tensor],
    target_rows: list[torch.Tensor],
    uniforms: list[float],
    final: torch.Tensor,
    weight: float,
) -> None:
    """One outcome per token of positive probability in `final` (normalised [vocab]): its
    sample uniform is the midpoint of the token's piece, its weight `weight` * final[token]."""
    upper = torch.cumsum(final, dim=0)
    for token in torch.nonzero(final > 0)[:, 0].tolist():
        outcomes.draft_tokens.append(list(drafts))
        outcomes.draft_rows.append(
            torch.stack(draft_rows) if drafts else torch.zeros(0, len(final))
        )
        outcomes.target_rows.append(torch.stack(target_rows))
        outcomes.accept_uniforms.append(uniforms)
        outcomes.sample_uniforms.append(float(upper[token] - final[token] / 2))
        outcomes.weights.append(weight * float(final[token]))


def _drafted_from(draft: PrefixModel, drafts: tuple[int, ...], i: int, point_mass: bool):
    """q_i: the distribution draft i was drawn from (one-hot for point-mass drafts)."""
    q = draft(drafts[:i]).to(torch.float64)
    if not point_mass:
        return q
    return torch.zeros_like(q).scatter_(0, torch.tensor([drafts[i]]), 1.0)


# Trees (docs/algorithms.md, tree rule).

TREE_MODES = ("iid", "without_replacement", "top")
# Uniforms given to the nodes a walk does not reach: one copy of every outcome with each. A rule
# that reads them (0 would keep almost any node, this never does) emits differently between the
# two copies, which `exact_tree_rule_distribution` reports as an error.
_UNREACHED_UNIFORMS = (0.0, 1.0 - 2.0**-53)


@dataclass
class _TreeDraft:
    """One assignment of tokens to the nodes of a tree, with its probability under the drafter."""

    tokens: list[int]
    valid: list[bool]
    drawn_from: list[torch.Tensor]  # q_j given the earlier siblings, one-hot for "top" [vocab]
    parent_draft: list[torch.Tensor]  # q at the parent's prefix [vocab]
    weight: float


def exact_tree_rule_distribution(
    rule: Callable[..., object],
    target: PrefixModel,
    draft: PrefixModel,
    *,
    parents: torch.Tensor | list[int],
    mode: str,
    passed_probs: str = "drawn",
) -> dict[tuple[int, ...], float]:
    """The exact distribution of the tokens one step of a tree `rule` emits.

    rule:    a function with the signature of `specsample.rules.tree.tree_rule`.
    target, draft: prefix -> p(. | prefix) and q(. | prefix); the children of a node are drawn
             from q at the node's prefix (the tokens on the path from the root to it).
    parents: the tree (tree_parents / chain_parents); siblings are drawn in index order.
    mode:    how the children of one node are drawn: "iid", "without_replacement" (children
             the remaining mass cannot make are invalid) or "top" (the most probable tokens,
             lowest id on ties; children with q = 0 are invalid).
    passed_probs: what the rule is given as draft_probs: "drawn" (the rows the children were
             drawn from; None for "top") or "parent_draft" (q at the parent's prefix for every
             child: right for "iid" only; a negative control for the other modes).

    Every token assignment is enumerated with its probability. The randomness is split into the
    pieces on which the walk is constant, computed here independently in float64 from the rows
    the rule is given: each tested node keeps (u < min(1, r(c)/q(c))) or not; the final uniform
    is split at the cumulative sums of both the final distribution r and the target p at the
    final node (so a rule drawing from either is constant on each piece). The rule runs once on
    the whole batch, with the midpoint of every piece; nodes the walk does not reach get, in two
    copies of every outcome, uniforms 0 and 1 - 2^-53, and the two copies must emit the same.
    Returns {emitted token tuple: probability}.
    """
    if mode not in TREE_MODES:
        raise ValueError(f"mode: expected one of {TREE_MODES}, got {mode!r}")
    if passed_probs not in ("drawn", "parent_draft"):
        raise ValueError(f"passed_probs: expected 'drawn' or 'parent_draft', got {passed_probs!r}")
    parent_list = [int(p) for p in (parents.tolist() if torch.is_tensor(parents) else parents)]
    vocab = int(target(()).shape[0])
    drafts = list(_tree_drafts(draft, parent_list, vocab, mode))
    outcomes = _tree_outcomes(target, parent_list, drafts, passed_probs, vocab)
    one_hot = mode == "top" and passed_probs == "drawn"
    low, high = _run_twice(rule, parent_list, outcomes, one_hot)
    if not torch.equal(low, high):
        raise AssertionError(
            "rule: the emitted tokens depend on the uniform of a node the walk does not reach"
        )
    distribution: dict[tuple[int, ...], float] = defaultdict(float)
    for row, weight in zip(low.tolist(), outcomes.weights, strict=True):
        distribution[tuple(t for t in row if t != PAD)] += weight
    return dict(distribution)


@dataclass
class _TreeOutcomes:
    """Per token assignment: its rows; per outcome (assignment, piece of the randomness): the
    assignment's index, the uniforms (NaN where the walk does not reach) and the weight."""

    tokens: torch.Tensor  # int64 [assignments, n]
    valid: torch.Tensor  # bool [assignments, n]
    passed: torch.Tensor  # float64 [assignments, n, vocab]
    target: torch.Tensor  # float64 [assignments, n+1, vocab]
    which: torch.Tensor  # int64 [outcomes]
    accept_uniforms: torch.Tensor  # float64 [outcomes, n]
    sample_uniforms: torch.Tensor  # float64 [outcomes]
    weights: list[float]


def _tree_outcomes(target, parents, drafts, passed_probs, vocab) -> _TreeOutcomes:
    n = len(parents)
    passed_rows, target_rows = [], []
    which, accept_rows, sample_uniforms, weights = [], [], [], []
    for index, tree in enumerate(drafts):
        passed = tree.drawn_from if passed_probs == "drawn" else tree.parent_draft
        targets = _tree_target_rows(target, parents, tree)
        passed_rows.append(torch.stack(passed) if n else torch.zeros(0, vocab))
        target_rows.append(torch.stack(targets))
        for uniforms, final_pieces, weight in _TreeWalk(parents, tree, passed, targets).outcomes():
            row = [uniforms.get(j, float("nan")) for j in range(n)]
            for sample_uniform, piece in final_pieces:
                which.append(index)
                accept_rows.append(row)
                sample_uniforms.append(sample_uniform)
                weights.append(tree.weight * weight * piece)
    return _TreeOutcomes(
        torch.tensor([tree.tokens for tree in drafts], dtype=torch.int64).reshape(len(drafts), n),
        torch.tensor([tree.valid for tree in drafts], dtype=torch.bool).reshape(len(drafts), n),
        torch.stack(passed_rows),
        torch.stack(target_rows),
        torch.tensor(which, dtype=torch.int64),
        torch.tensor(accept_rows, dtype=torch.float64).reshape(len(which), n),
        torch.tensor(sample_uniforms, dtype=torch.float64),
        weights,
    )


def _run_twice(rule, parents, outcomes: _TreeOutcomes, one_hot: bool):
    """The rule's tokens on every outcome, with the unreached nodes' uniforms at each of
    _UNREACHED_UNIFORMS: (tokens of the first copy, tokens of the second)."""
    which = outcomes.which
    accept = outcomes.accept_uniforms
    copies = [torch.where(accept.isnan(), value, accept) for value in _UNREACHED_UNIFORMS]
    result = rule(
        outcomes.tokens[which].repeat(2, 1),
        torch.tensor(parents, dtype=torch.int64),
        None if one_hot else outcomes.passed[which].repeat(2, 1, 1),
        outcomes.target[which].repeat(2, 1, 1),
        outcomes.valid[which].repeat(2, 1),
        torch.cat(copies),
        outcomes.sample_uniforms.repeat(2),
    )
    return result.tokens.chunk(2)


def _node_prefix(parents: list[int], tokens: list[int], node: int) -> tuple[int, ...]:
    """The tokens on the path from the root down to `node` (-1: the root, ())."""
    path: list[int] = []
    while node >= 0:
        path.append(tokens[node])
        node = parents[node]
    return tuple(reversed(path))


def _tree_drafts(draft: PrefixModel, parents: list[int], vocab: int, mode: str):
    """Every token assignment of the tree with positive probability, node by node in index
    order; a node's distribution depends on its prefix and its earlier siblings."""
    n = len(parents)
    nothing = torch.zeros(vocab, dtype=torch.float64)

    def extend(tree: _TreeDraft):
        j = len(tree.tokens)
        if j == n:
            yield tree
            return
        parent = parents[j]
        if parent >= 0 and not tree.valid[parent]:
            yield from extend(_with_node(tree, 0, False, nothing, nothing, 1.0))
            return
        q = draft(_node_prefix(parents, tree.tokens, parent)).to(torch.float64)
        earlier = [i for i in range(j) if parents[i] == parent]
        for token, drawn_from, probability in _child_choices(q, tree, earlier, mode):
            valid = drawn_from is not None
            row = drawn_from if valid else nothing
            yield from extend(_with_node(tree, token, valid, row, q, probability))

    yield from extend(_TreeDraft([], [], [], [], 1.0))


def _child_choices(q: torch.Tensor, tree: _TreeDraft, earlier: list[int], mode: str):
    """(token, the row it was drawn from or None when the child is invalid, probability) for
    each possible next sibling."""
    vocab = q.shape[0]
    if mode == "iid":
        for token in torch.nonzero(q > 0)[:, 0].tolist():
            yield token, q, float(q[token])
        return
    if mode == "top":
        rank = len(earlier)
        order = sorted(range(vocab), key=lambda v: (-float(q[v]), v))
        token = order[rank] if rank < vocab else 0
        if rank < vocab and float(q[token]) > 0:
            yield token, torch.zeros_like(q).index_fill_(0, torch.tensor([token]), 1.0), 1.0
        else:
            yield 0, None, 1.0
        return
    remaining = q.clone()
    for i in earlier:
        if tree.valid[i]:
            remaining[tree.tokens[i]] = 0.0
    mass = float(remaining.sum())
    if mass <= 0:
        yield 0, None, 1.0
        return
    drawn_from = remaining / mass
    for token in torch.nonzero(drawn_from > 0)[:, 0].tolist():
        yield token, drawn_from, float(drawn_from[token])


def _with_node(tree, token, valid, drawn_from, parent_draft, probability) -> _TreeDraft:
    return _TreeDraft(
        tree.tokens + [token],
        tree.valid + [valid],
        tree.drawn_from + [drawn_from],
        tree.parent_draft + [parent_draft],
        tree.weight * probability,
    )


def _tree_target_rows(target: PrefixModel, parents: list[int], tree: _TreeDraft):
    """[n+1] rows: p at the root, then p after each node (p at the root for invalid nodes,
    which the rule never reads)."""
    root = target(()).to(torch.float64)
    rows = [root]
    for j, valid in enumerate(tree.valid):
        after = _node_prefix(parents, tree.tokens, j)
        rows.append(target(after).to(torch.float64) if valid else root)
    return rows


class _TreeWalk:
    """The tree rule's walk (docs/algorithms.md) on one token assignment, split into its pieces."""

    def __init__(self, parents, tree: _TreeDraft, passed, targets):
        self.tree = tree
        self.passed = passed
        self.targets = targets
        self.children = {node: [] for node in range(-1, len(parents))}
        for j, parent in enumerate(parents):
            if tree.valid[j]:
                self.children[parent].append(j)

    def outcomes(self):
        """(uniforms of the tested nodes {node: u}, final pieces [(u, length)], probability)."""
        yield from self._from(-1, self.targets[0], 0, {}, 1.0)

    def _from(self, node, r, sibling, uniforms, weight):
        children = self.children[node]
        if sibling == len(children):
            yield uniforms, _final_pieces(r, self.targets[node + 1]), weight
            return
        j = children[sibling]
        token = self.tree.tokens[j]
        q = self.passed[j]
        if float(q[token]) > 0:
            keep = min(1.0, float(r[token]) / float(q[token]))
        else:  # u * 0 < r(c): kept whenever r(c) > 0
            keep = 1.0 if float(r[token]) > 0 else 0.0
        if keep > 0:
            kept = {**uniforms, j: keep / 2}
            yield from self._from(j, self.targets[j + 1], 0, kept, weight * keep)
        if keep < 1:
            rejected = {**uniforms, j: (1 + keep) / 2}
            yield from self._from(node, residual(r, q), sibling + 1, rejected, weight * (1 - keep))


def _final_pieces(r: torch.Tensor, p: torch.Tensor) -> list[tuple[float, float]]:
    """(midpoint, length) of the pieces of [0, 1) cut at the cumulative sums of r and of p."""
    cuts = {0.0, 1.0}
    for weights in (r.tolist(), p.tolist()):
        total = math.fsum(weights)
        cuts.update(min(1.0, cut / total) for cut in itertools.accumulate(weights))
    ordered = sorted(cuts)
    return [((a + b) / 2, b - a) for a, b in itertools.pairwise(ordered) if b > a]
