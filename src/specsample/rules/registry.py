"""One registry of verification rules, looked up by name, and one entry point that verifies any
`Draft` (a chain is a tree with one child per node).

Exact rules are registered here. Lossy rules live in `specsample.lossy`, which registers them in
`LOSSY` when it is imported; nothing below the front ends imports it, so a lossy rule is reachable
only by a caller that imported it and named it.

A rule entry has a chain function (the vectorised rules of token.py / block.py, signature of
`token_rule`) and/or a tree function (signature of `tree_rule`). A draft that is a chain goes to
the chain function when there is one; any other draft goes to the tree function.

A coupled rule (`coupled=True`, the "coupled" rule of coupled.py) takes no uniforms but Gumbel
noise derived from each request's seed and token positions: it is verified with
`verify_coupled`, and drafters draft with the same noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specsample.rules import checks
from specsample.rules.block import block_rule
from specsample.rules.coupled import coupled_rule
from specsample.rules.draft import Draft
from specsample.rules.result import PAD, VerifyResult
from specsample.rules.token import token_rule
from specsample.rules.tree import TreeResult, greedy_tree_rule, tree_rule

ChainRule = Callable[..., VerifyResult]
TreeRule = Callable[..., TreeResult]


@dataclass(frozen=True)
class Rule:
    name: str
    exact: bool
    chain: ChainRule | None = None
    tree: TreeRule | None = None
    description: str = ""
    coupled: bool = False  # verified by verify_coupled with (seed, position) noise


EXACT: dict[str, Rule] = {
    "auto": Rule(
        "auto",
        True,
        block_rule,
        tree_rule,
        "block verification for one chain per row, recursive rejection sampling for trees",
    ),
    "token": Rule(
        "token", True, token_rule, tree_rule, "token by token: keep x with min(1, p(x)/q(x))"
    ),
    "block": Rule(
        "block", True, block_rule, None, "block verification (one chain per row; optimal)"
    ),
    "coupled": Rule(
        "coupled",
        True,
        description="drafter-invariant: keep a draft when it equals the target's Gumbel-max "
        "sample under noise from (seed, position); the text equals target-only decoding",
        coupled=True,
    ),
}
LOSSY: dict[str, Rule] = {}
# The torch chain rules that have a Triton kernel (specsample.kernels), by name.
_TORCH_CHAIN_RULES = {token_rule: "token", block_rule: "block"}


def register_lossy(rule: Rule) -> None:
    """Adds a LOSSY rule (its output is not distributed as the target)."""
    if rule.exact:
        raise ValueError(f"rule: expected a lossy rule (exact=False), got {rule.name!r}")
    LOSSY[rule.name] = rule


def lookup(name: str) -> Rule:
    """The rule called `name`, exact or (registered) lossy."""
    if name in EXACT:
        return EXACT[name]
    if name in LOSSY:
        return LOSSY[name]
    lossy = f" or {sorted(LOSSY)} (lossy)" if LOSSY else ""
    raise ValueError(f"rule: expected one of {sorted(EXACT)} (exact){lossy}, got {name!r}")


def check_rule_for(rule: Rule, chain: bool) -> None:
    """Raises when `rule` cannot verify this kind of draft."""
    if rule.coupled:
        return  # chains and trees alike
    if chain and rule.chain is None and rule.tree is None:
        raise ValueError(f"rule: {rule.name!r} verifies nothing")
    if not chain and rule.tree is None:
        raise ValueError(
            f"rule: {rule.name!r} applies to one draft chain per row only; token trees are "
            "verified node by node (rule='token' or 'auto')"
        )


def verify_draft(
    rule: Rule,
    draft: Draft,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> TreeResult:
    """Verifies one draft per row with pre-drawn uniforms.

    draft_probs     float [batch, n, vocab] or None (point masses), on target_probs' device.
    target_probs    float [batch, n+1, vocab]: row 0 after the context, row j+1 after node j.
    accept_uniforms float64 [batch, n]; sample_uniforms float64 [batch].
    Returns a TreeResult (for a chain, path[b] is 0..num_accepted[b]-1).
    """
    device = target_probs.device
    tokens = draft.tokens.to(device)
    valid = draft.valid.to(device)
    chain = draft.is_chain
    if rule.coupled:
        raise ValueError(
            f"rule: {rule.name!r} is verified with verify_coupled (noise, no uniforms)"
        )
    check_rule_for(rule, chain)
    if draft_probs is not None and draft.num_nodes:
        # one gather: a drafter that reports q(x) = 0 for a token x it drafted breaks the rules'
        # arithmetic (0/0), so it is an error, not a silently wrong token
        checks.check_drafted_tokens_possible(torch.where(valid, tokens, 0), draft_probs, valid)
    if chain and rule.chain is not None:
        lengths = valid.sum(dim=1)
        chain_rule = rule.chain
        if device.type == "cuda" and chain_rule in _TORCH_CHAIN_RULES:
            # the one-launch Triton kernel when triton is installed (same decisions)
            from specsample.rules import chain_rule_for

            chain_rule = chain_rule_for(_TORCH_CHAIN_RULES[chain_rule], device)
        result = chain_rule(
            tokens, draft_probs, target_probs, lengths, accept_uniforms, sample_uniforms
        )
        return _as_tree_result(result)
    return rule.tree(
        tokens, draft.parents, draft_probs, target_probs, valid, accept_uniforms, sample_uniforms
    )


def verify_greedy(draft: Draft, target_tokens: torch.Tensor) -> TreeResult:
    """Temperature 0 for every row: target_tokens int64 [batch, n+1] are the target's argmax at
    the root and after each node; no probabilities and no randomness."""
    device = target_tokens.device
    return greedy_tree_rule(
        draft.tokens.to(device), draft.parents, target_tokens, draft.valid.to(device)
    )


def verify_coupled(draft: Draft, target_probs: torch.Tensor, noise: torch.Tensor) -> TreeResult:
    """The coupled rule on one draft per row (chain or tree).

    target_probs float [batch, n+1, vocab]: warped; row 0 after the context, row j+1 after node j.
    noise        float [batch, depth+1, vocab]: the Gumbel noise of the token d deep below the
                 root at noise[:, d] (`coupled.gumbel_noise` of the row's seed and its new-token
                 positions root, root+1, ...).
    """
    device = target_probs.device
    return coupled_rule(
        draft.tokens.to(device), draft.parents, target_probs, draft.valid.to(device), noise
    )


def _as_tree_result(result: VerifyResult) -> TreeResult:
    k = result.tokens.shape[1] - 1
    slots = torch.arange(k, device=result.tokens.device)[None, :]
    path = torch.where(slots < result.num_accepted[:, None], slots, PAD)
    return TreeResult(result.tokens, result.num_accepted, path, result.rule_used)
