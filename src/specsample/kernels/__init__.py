"""Triton kernels for the exact rules: one launch verifies a whole batch.

Each kernel runs one program per batch row and makes the same decisions as the rules in
`specsample.rules` (`token_rule`, `block_rule`, `tree_rule`) on the same pre-drawn uniforms; the
loops in `specsample.rules.reference` are their oracles. Probabilities are read in their stored
dtype and every sum, product and comparison is done in float64, as the loop references do, so a
decision can differ from the reference only where a uniform falls within float64 rounding
(about 1e-16 relative) of a boundary.

Triton is optional (the `gpu` extra). `available()` says whether it can be imported;
`specsample.verify` uses these kernels by itself for CUDA tensors when it can. Set
TRITON_INTERPRET=1 before the first import of this package to run the kernels on CPU tensors with
Triton's interpreter (how the tests check them without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from specsample.rules.result import VerifyResult
from specsample.rules.tree import TreeResult


@functools.cache
def available() -> bool:
    """True when triton can be imported (the kernels need it; nothing else does)."""
    return importlib.util.find_spec("triton") is not None


def _require() -> None:
    if not available():
        raise RuntimeError(
            "specsample.kernels: triton is not installed; install the gpu extra "
            "(pip install 'specsample[gpu]') or use the plain rules in specsample.rules"
        )


def token_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> VerifyResult:
    """`specsample.rules.token_rule` in one kernel launch (same contract and shapes)."""
    _require()
    from specsample.kernels import chain

    return chain.token_rule(
        draft_tokens, draft_probs, target_probs, draft_lengths, accept_uniforms, sample_uniforms
    )


def block_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> VerifyResult:
    """`specsample.rules.block_rule` in one kernel launch (same contract; point-mass drafts use
    the token rule and say so in rule_used)."""
    _require()
    from specsample.kernels import chain

    return chain.block_rule(
        draft_tokens, draft_probs, target_probs, draft_lengths, accept_uniforms, sample_uniforms
    )


def tree_rule(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    node_valid: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> TreeResult:
    """`specsample.rules.tree_rule` in one kernel launch (same contract and shapes)."""
    _require()
    from specsample.kernels import tree

    return tree.tree_rule(
        draft_tokens,
        parents,
        draft_probs,
        target_probs,
        node_valid,
        accept_uniforms,
        sample_uniforms,
    )


RULES = {"token": token_rule, "block": block_rule}

__all__ = ["RULES", "available", "block_rule", "token_rule", "tree_rule"]
