"""Statistical tests of tree verification through `verify_tree`, with trees drawn by
`draw_children`.

A speculative loop over exact toy tables drafts a tree (branching (2, 2)) per row, verifies it,
and repeats until every row has emitted two tokens; a G-test compares the joint frequencies of the
first two tokens of ROWS rows (one batch per step) with the target's p(a) p(b | a). A test fails
when the p-value is below ALPHA = 1e-6: for a correct rule and a random seed that is the
false-failure rate (the seeds here are fixed, so a pass is reproducible). The negative controls
must fail the same test with the same sample size.
"""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import TablePrefixModel, Tables, g_test_p_value, joint_counts, target_joint
from specsample.drafters.children import draw_children
from specsample.rules import PAD, tree_parents, verify_tree

ALPHA = 1e-6
ROWS = 200_000
VOCAB = 4
BRANCHING = (2, 2)
PARENTS = tree_parents(BRANCHING)


@functools.cache
def tables():
    """Prefixes read: up to 1 emitted token + the tree's depth 2 + the target after a leaf."""
    target_model = TablePrefixModel(VOCAB, seed=30, sharpness=1.5, zeros=1)
    draft_model = TablePrefixModel(VOCAB, seed=31, sharpness=1.5)
    depth = 1 + len(BRANCHING)
    return target_model, Tables(target_model, VOCAB, depth), Tables(draft_model, VOCAB, depth)


def draft_tree(codes, draft, mode, generator):
    """The tree of every row after the prefixes `codes` [rows]: tokens [rows, n], the rows each
    node was drawn from (None for "top"), the drafter's q at each node's parent [rows, n, vocab],
    validity [rows, n] and each node's prefix code [rows, n]."""
    rows = len(codes)
    level_codes = codes[:, None]  # [rows, nodes in the level]
    level_valid = torch.ones(rows, 1, dtype=torch.bool)
    tokens, drawn, parent_q, valid, node_codes = [], [], [], [], []
    for width in BRANCHING:
        q = draft[level_codes.reshape(-1)]  # [rows * parents, vocab]
        children, child_probs, child_valid = draw_children(q, width, mode, generator)
        count = level_codes.shape[1] * width
        tokens.append(children.reshape(rows, count))
        if child_probs is not None:
            drawn.append(child_probs.reshape(rows, count, VOCAB))
        parent_q.append(q.reshape(rows, -1, VOCAB).repeat_interleave(width, dim=1))
        level_valid = child_valid.reshape(rows, count) & level_valid.repeat_interleave(width, 1)
        valid.append(level_valid)
        level_codes = draft.extend(level_codes.repeat_interleave(width, dim=1), tokens[-1])
        node_codes.append(level_codes)
    drawn_probs = torch.cat(drawn, 1) if drawn else None
    return (
        torch.cat(tokens, 1),
        drawn_probs,
        torch.cat(parent_q, 1),
        torch.cat(valid, 1),
        torch.cat(node_codes, 1),
    )


def invalidate_at_random(valid, generator):
    """Ragged trees: each node dropped with probability 0.3, with its descendants."""
    valid = valid & (torch.rand(valid.shape, generator=generator) > 0.3)
    for j, parent in enumerate(PARENTS.tolist()):
        if parent >= 0:
            valid[:, j] &= valid[:, parent]
    return valid


def tree_first_two(mode, *, generator, ragged=False, emit=None):
    """The first two emitted tokens [ROWS, 2] of a speculative loop with tree drafts."""
    emit = emit or verify
    _, target, draft = tables()
    first_two = torch.full((ROWS, 2), PAD, dtype=torch.int64)
    codes = torch.zeros(ROWS, dtype=torch.int64)
    filled = torch.zeros(ROWS, dtype=torch.int64)
    rows = torch.arange(ROWS)
    while bool((filled < 2).any()):
        todo = rows[filled < 2]
        tokens, drawn, parent_q, valid, node_codes = draft_tree(codes[todo], draft, mode, generator)
        if ragged:
            valid = invalidate_at_random(valid, generator)
        target_probs = torch.cat([target[codes[todo]][:, None], target[node_codes]], dim=1)
        emitted = emit(tokens, drawn, parent_q, target_probs, valid, generator)
        for j in range(emitted.shape[1]):
            take = (emitted[:, j] != PAD) & (filled[todo] < 2)
            who = todo[take]
            first_two[who, filled[who]] = emitted[take, j]
            codes[who] = target.extend(codes[who], emitted[take, j])
            filled[who] += 1
    return first_two


def p_value(mode, seed, **options):
    """The G-test p-value of the first two tokens of ROWS rows against the target's joint."""
    target_model = tables()[0]
    first_two = tree_first_two(mode, generator=torch.Generator().manual_seed(seed), **options)
    return g_test_p_value(joint_counts(first_two, VOCAB), target_joint(target_model, VOCAB))


def verify(tokens, drawn, parent_q, target_probs, valid, generator):
    return verify_tree(
        tokens, PARENTS, drawn, target_probs, generator=generator, node_valid=valid
    ).tokens


def told_the_softmax(tokens, drawn, parent_q, target_probs, valid, generator):
    """Negative control: deterministic top-m children, verified as if each had been sampled from
    the drafter's q (the softmax) instead of being a point mass."""
    return verify_tree(
        tokens, PARENTS, parent_q, target_probs, generator=generator, node_valid=valid
    ).tokens


def recover_from_target(tokens, drawn, parent_q, target_probs, valid, generator):
    """Negative control: the right walk, but the final token is drawn from p at the final node
    instead of from the residual."""
    result = verify_tree(
        tokens, PARENTS, drawn, target_probs, generator=generator, node_valid=valid
    )
    rows = torch.arange(len(tokens))
    last = result.path.gather(1, (result.num_accepted - 1).clamp(min=0)[:, None])[:, 0]
    final_node = torch.where(result.num_accepted > 0, last, -1)
    redrawn = torch.multinomial(target_probs[rows, final_node + 1], 1, generator=generator)
    return result.tokens.scatter(1, result.num_accepted[:, None], redrawn)


@pytest.mark.parametrize(
    ("mode", "ragged"),
    [("iid", False), ("without_replacement", False), ("top", False), ("without_replacement", True)],
    ids=["iid", "without-replacement", "top", "without-replacement-ragged"],
)
def test_first_two_tokens_of_tree_drafts_follow_target_joint(mode, ragged):
    assert p_value(mode, seed=40, ragged=ragged) > ALPHA


@pytest.mark.parametrize(
    ("mode", "control"),
    [("top", told_the_softmax), ("iid", recover_from_target)],
    ids=["top-told-the-softmax", "iid-recover-from-target"],
)
def test_negative_controls_fail_the_same_test(mode, control):
    assert p_value(mode, seed=41, emit=control) < ALPHA
