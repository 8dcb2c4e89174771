"""Plain-loop reference implementations: the oracles the vectorised rules are tested against.

Written for clarity, one row and one position at a time, in float64, on the same pre-drawn
uniforms as the fast rules. Too slow for real use.
"""

from __future__ import annotations

import torch

from specsample.rules.result import PAD, VerifyResult
from specsample.rules.tree import TreeResult, node_depths


def reference_sample(weights: torch.Tensor, uniform: float) -> int:
    """The first id whose running total of `weights` [vocab] exceeds uniform * total."""
    weights = weights.to(torch.float64)
    goal = uniform * float(weights.sum())
    running = torch.cumsum(weights, dim=0)
    above = torch.nonzero(running > goal)
    if len(above) == 0:  # goal rounded onto the total: the last id with positive weight
        return int(torch.nonzero(weights > 0)[-1])
    return int(above[0])


def reference_token_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> VerifyResult:
    """Same contract as `token_rule`, as a loop over rows and positions."""
    batch, k = draft_tokens.shape
    tokens = torch.full((batch, k + 1), PAD, dtype=torch.int64)
    num_accepted = torch.zeros(batch, dtype=torch.int64)
    for b in range(batch):
        emitted: list[int] = []
        final = None
        for i in range(int(draft_lengths[b])):
            x = int(draft_tokens[b, i])
            p = target_probs[b, i].to(torch.float64)
            q = _draft_distribution(draft_probs, b, i, x, p.shape[0])
            if float(accept_uniforms[b, i]) * float(q[x]) < float(p[x]):
                emitted.append(x)
                continue
            weights = torch.clamp(p - q, min=0.0)
            if float(weights.sum()) <= 0:
                weights = p
            final = reference_sample(weights, float(sample_uniforms[b]))
            break
        if final is None:  # every draft kept: the bonus token
            bonus = target_probs[b, len(emitted)].to(torch.float64)
            final = reference_sample(bonus, float(sample_uniforms[b]))
        num_accepted[b] = len(emitted)
        tokens[b, : len(emitted) + 1] = torch.tensor(emitted + [final])
    return VerifyResult(tokens, num_accepted)


def _draft_distribution(
    draft_probs: torch.Tensor | None, b: int, i: int, x: int, vocab: int
) -> torch.Tensor:
    if draft_probs is not None:
        return draft_probs[b, i].to(torch.float64)
    one_hot = torch.zeros(vocab, dtype=torch.float64)
    one_hot[x] = 1.0
    return one_hot


def reference_block_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> VerifyResult:
    """Same contract as `block_rule`, as a loop; point-mass drafts use the token rule."""
    if draft_probs is None:
        result = reference_token_rule(
            draft_tokens, None, target_probs, draft_lengths, accept_uniforms, sample_uniforms
        )
        return VerifyResult(result.tokens, result.num_accepted, "token")
    batch, k = draft_tokens.shape
    tokens = torch.full((batch, k + 1), PAD, dtype=torch.int64)
    num_accepted = torch.zeros(batch, dtype=torch.int64)
    for b in range(batch):
        length = int(draft_lengths[b])
        p = [target_probs[b, i].to(torch.float64) for i in range(length + 1)]
        q = [draft_probs[b, i].to(torch.float64) for i in range(length)]
        x = [int(t) for t in draft_tokens[b, :length]]
        kept = [1.0]  # kept[i] = P_i
        for i in range(length):
            kept.append(min(1.0, kept[i] * float(p[i][x[i]]) / float(q[i][x[i]])))
        tau = 0
        for i in range(1, length + 1):
            if i == length:
                threshold = kept[length]
            else:
                mass = float(torch.clamp(kept[i] * p[i] - q[i], min=0.0).sum())
                denominator = mass + 1.0 - kept[i]
                threshold = mass / denominator if denominator > 0 else 1.0
            if float(accept_uniforms[b, i - 1]) < threshold:  # h = 0 never passes
                tau = i
        if tau == length:
            weights = p[length]
        else:
            weights = torch.clamp(kept[tau] * p[tau] - q[tau], min=0.0)
            if float(weights.sum()) <= 0:
                weights = p[tau]
        final = reference_sample(weights, float(sample_uniforms[b]))
        num_accepted[b] = tau
        tokens[b, : tau + 1] = torch.tensor(x[:tau] + [final])
    return VerifyResult(tokens, num_accepted, "block")


def reference_tree_rule(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    node_valid: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> TreeResult:
    """Same contract as `tree_rule`: recursive rejection sampling (docs/algorithms.md), one
    row at a time, walking down from the root."""
    batch, n = draft_tokens.shape
    parent_list = [int(p) for p in parents.tolist()]
    depth = int(node_depths(parent_list).max()) if n else 0
    tokens = torch.full((batch, depth + 1), PAD, dtype=torch.int64)
    paths = torch.full((batch, depth), PAD, dtype=torch.int64)
    num_accepted = torch.zeros(batch, dtype=torch.int64)
    for b in range(batch):
        node = -1  # the root
        r = target_probs[b, 0].to(torch.float64)
        path: list[int] = []
        while True:
            children = [j for j in range(n) if parent_list[j] == node and bool(node_valid[b, j])]
            for j in children:
                x = int(draft_tokens[b, j])
                q = _draft_distribution(draft_probs, b, j, x, r.shape[0])
                if float(accept_uniforms[b, j]) * float(q[x]) < float(r[x]):
                    path.append(j)
                    node = j
                    r = target_probs[b, j + 1].to(torch.float64)
                    break
                weights = torch.clamp(r - q, min=0.0)
                if float(weights.sum()) > 0:  # otherwise keep r (see `residual`)
                    r = weights / weights.sum()
            else:  # no child kept: a recovered token (or a bonus token when there were none)
                break
        final = reference_sample(r, float(sample_uniforms[b]))
        emitted = [int(draft_tokens[b, j]) for j in path] + [final]
        tokens[b, : len(emitted)] = torch.tensor(emitted)
        paths[b, : len(path)] = torch.tensor(path, dtype=torch.int64)
        num_accepted[b] = len(path)
    return TreeResult(tokens, num_accepted, paths)
