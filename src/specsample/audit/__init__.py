"""Audits of other engines' exactness: does a verification function, or an OpenAI-compatible
server, sample exactly from its target?

- `audit_verifier`: runs a verification function on hard cases and tests the first two tokens it
  produces against the target's exact law (G-tests, a total-variation bound, the power).
- `audit_server`: a black-box test of a server's completions against a reference (the same model
  without speculation, or its own log-probabilities).

Needs scipy (the `audit` extra).
"""

from specsample.audit.cases import Case, default_cases
from specsample.audit.server import ServerAuditConfig, ServerAuditReport, audit_server
from specsample.audit.shims import BUILT_IN, CouldNotJudge, Verifier, load_verifier
from specsample.audit.verifier import (
    DEFAULT_ALPHA,
    DEFAULT_SAMPLES,
    AuditReport,
    CaseResult,
    TestResult,
    audit_verifier,
)

__all__ = [
    "BUILT_IN",
    "DEFAULT_ALPHA",
    "DEFAULT_SAMPLES",
    "ServerAuditConfig",
    "ServerAuditReport",
    "AuditReport",
    "Case",
    "CaseResult",
    "CouldNotJudge",
    "TestResult",
    "Verifier",
    "audit_server",
    "audit_verifier",
    "default_cases",
    "load_verifier",
]
