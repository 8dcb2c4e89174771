"""Verification rules: given drafted tokens, the drafter's and the target's probabilities, decide
which drafts to keep and which token to emit after them, so that the output is distributed exactly
as the target.

`verify` is the public entry point; the rules below it are pure functions of tensors and pre-drawn
uniforms (see `token.py`, `greedy.py`), and `reference.py` holds their plain-loop oracles.
"""

from __future__ import annotations

import torch

from specsample.rules import checks
from specsample.rules.block import block_rule
from specsample.rules.greedy import greedy_rule
from specsample.rules.result import PAD, VerifyResult
from specsample.rules.sampling import (
    acceptance_probability,
    draw_uniforms,
    residual,
    sample_from_weights,
)
from specsample.rules.token import token_rule
from specsample.rules.tree import (
    TreeResult,
    chain_parents,
    greedy_tree_rule,
    node_depths,
    tree_parents,
    tree_rule,
    verify_tree,
)

RULES = {"token": token_rule, "block": block_rule}

__all__ = [
    "PAD",
    "RULES",
    "TreeResult",
    "VerifyResult",
    "acceptance_probability",
    "block_rule",
    "chain_parents",
    "chain_rule_for",
    "draw_uniforms",
    "greedy_rule",
    "greedy_tree_rule",
    "node_depths",
    "residual",
    "sample_from_weights",
    "token_rule",
    "tree_parents",
    "tree_rule",
    "verify",
    "verify_tree",
]


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    *,
    generator: torch.Generator,
    rule: str = "token",
    draft_lengths: torch.Tensor | None = None,
    validate: bool = True,
) -> VerifyResult:
    """Verifies one step of drafts for a batch; the emitted tokens are distributed exactly as the
    target.

    draft_tokens  int64 [batch, k]: the drafted tokens.
    draft_probs   float [batch, k, vocab]: the (warped) distributions the drafts were sampled from,
                  or None for point-mass drafts (n-gram lookup, argmax drafting: each drafted token
                  had probability 1).
    target_probs  float [batch, k+1, vocab]: the (warped) target distributions; row i follows the
                  prompt and drafts 0..i-1, row k is for the bonus token.
    generator     torch.Generator on the tensors' device; the only source of randomness (the global
                  RNG is never used). Draws, in order: uniforms [batch, k], then uniforms [batch].
    rule          "token": token-level speculative sampling; "block": block verification (the
                  optimal rule for one draft chain: at least as many accepted tokens in
                  expectation; point-mass drafts fall back to "token", named in rule_used).
    draft_lengths int64 [batch] or None: row b uses its first draft_lengths[b] drafts (0 allowed)
                  and target_probs[b, draft_lengths[b]] is its bonus distribution.
    validate      True (default) also checks every probability row the rule may read: finite,
                  non-negative, summing to 1 within checks.SUM_TOLERANCE (1e-6 float64, 1e-4
                  float32, 1e-2 float16/bfloat16). This reads all of both tensors; a caller that
                  made the probabilities itself (the decoding loop) may pass False. Shapes, dtypes,
                  devices, token ids and draft_lengths are always checked.

    Returns a VerifyResult: tokens int64 [batch, k+1] (accepted drafts, then one recovered or bonus
    token, padded with -1) and num_accepted int64 [batch]. Computation is in float32 or wider
    whatever the input dtype.
    """
    draft_tokens = checks.check_draft_tokens(draft_tokens)
    target_probs = checks.check_probs("target_probs", target_probs, "[batch, k+1, vocab]")
    if draft_probs is not None:
        draft_probs = checks.check_probs("draft_probs", draft_probs, "[batch, k, vocab]")
    checks.check_shapes(draft_tokens, draft_probs, target_probs)
    checks.check_devices(draft_tokens, draft_probs, target_probs, draft_lengths)
    device = target_probs.device
    checks.check_generator(generator, device)
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {sorted(RULES)}, got {rule!r}")
    batch, k = draft_tokens.shape
    vocab = target_probs.shape[2]
    draft_lengths = checks.check_draft_lengths(draft_lengths, batch, k, device)
    in_draft = checks.positions_below(draft_lengths, k)  # [batch, k]
    checks.check_token_range(draft_tokens, in_draft, vocab)
    # Ids past a row's draft length are never used; make them valid indices for the gathers.
    draft_tokens = torch.where(in_draft, draft_tokens, 0)
    if draft_probs is not None:
        checks.check_drafted_tokens_possible(draft_tokens, draft_probs, in_draft)
    if validate:
        checks.check_distribution_values(
            "target_probs", target_probs, checks.positions_below(draft_lengths + 1, k + 1)
        )
        if draft_probs is not None:
            checks.check_distribution_values("draft_probs", draft_probs, in_draft)
    accept_uniforms, sample_uniforms = draw_uniforms(batch, k, generator, device)
    return chain_rule_for(rule, device)(
        draft_tokens, draft_probs, target_probs, draft_lengths, accept_uniforms, sample_uniforms
    )


def chain_rule_for(rule: str, device: torch.device):
    """The function that runs chain rule `rule` on `device`: the one-launch Triton kernel
    (specsample.kernels) for CUDA tensors when triton is installed, else the torch rule. Both
    make the same decisions on the same uniforms."""
    if device.type == "cuda":
        from specsample import kernels  # imported on first CUDA use: triton is optional

        if kernels.available():
            return kernels.RULES[rule]
    return RULES[rule]
