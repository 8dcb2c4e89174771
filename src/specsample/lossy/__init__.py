"""LOSSY verification rules: their output is NOT distributed as the target, for comparison only.

Every rule in `specsample.rules` is exact: the emitted tokens follow the (warped) target
distribution. The rules here trade that for more accepted drafts; they are never the default, never
reachable through `specsample.rules.verify`, and each is measured against the target exactly, by
enumeration (see `typical_distance`).

- `typical_rule`: typical acceptance (Medusa, Cai et al. 2024, arXiv 2401.10774): keep a drafted x
  while p(x) > min(epsilon, delta * exp(-H(p))).
"""

from __future__ import annotations

from specsample.lossy.typical import (
    TypicalDistance,
    exact_typical_distribution,
    typical_distance,
    typical_keep_mask,
    typical_rule,
)
from specsample.rules.registry import Rule, register_lossy

__all__ = [
    "TypicalDistance",
    "exact_typical_distribution",
    "typical_distance",
    "typical_keep_mask",
    "typical_rule",
]

register_lossy(
    Rule(
        "typical",
        exact=False,
        chain=typical_rule,
        description="LOSSY: typical acceptance; the output is not distributed as the target",
    )
)
