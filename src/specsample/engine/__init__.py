"""The step-wise Engine (requests join and leave between steps), the draft-length policies, the
decoding statistics, and `generate` (a one-shot batch through the Engine)."""

from specsample.engine.engine import (
    ACCEPTED,
    BONUS,
    FINISH_REASONS,
    RECOVERED,
    Engine,
    RequestOutput,
)
from specsample.engine.generate import Generation, generate
from specsample.engine.length import AdaptiveDraftLength, FixedDraftLength
from specsample.engine.stats import DecodeStats

__all__ = [
    "ACCEPTED",
    "BONUS",
    "FINISH_REASONS",
    "RECOVERED",
    "AdaptiveDraftLength",
    "DecodeStats",
    "Engine",
    "FixedDraftLength",
    "Generation",
    "RequestOutput",
    "generate",
]
