"""specsample: exact (lossless) speculative sampling for large language models.

Notation used throughout: `target_probs` (P, the large model), `draft_probs` (Q, the drafter),
k = draft length, vocab = vocabulary size. Emitted tokens are *accepted* drafts, a *recovered*
token (drawn from the residual after the first rejection) or a *bonus* token (drawn from P when
every draft was kept).
"""

from specsample.analysis.theory import (
    acceptance_rate,
    best_draft_length,
    expected_speedup,
    expected_tokens_per_pass,
)
from specsample.engine import Engine, RequestOutput
from specsample.rules import VerifyResult, acceptance_probability, residual, verify
from specsample.warpers import SamplingConfig, logits_to_probs

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "RequestOutput",
    "SamplingConfig",
    "VerifyResult",
    "acceptance_probability",
    "acceptance_rate",
    "best_draft_length",
    "expected_speedup",
    "expected_tokens_per_pass",
    "logits_to_probs",
    "residual",
    "verify",
]
