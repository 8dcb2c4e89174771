"""`assert_stats_identities(stats)`: the identities every DecodeStats must satisfy, whatever the
run that produced it. Every test that decodes should call it on the stats it gets (the engine's
and each request's).

A row step (one row in one target pass) keeps `a` drafts and tests its draft to depth `t` along
the kept path: t = a + 1 when the last kept node (or the root) still had valid children, so that
one more keep test ran and failed, otherwise t = a. It adds 1 to drafted_by_position[i] for every
tested position i < t and 1 to accepted_by_position[i] for i < a; keep_tests grows by t, accepted
by a. From that alone:

 1. sum(drafted_by_position) == keep_tests          (each row step adds t to both)
 2. sum(accepted_by_position) == accepted           (each row step adds a to both)
 3. empty_steps == drafted_by_position[0] - accepted_by_position[0]
                                                    (tested position 0, kept nothing; 0 if none)
 4. drafted_by_position[0] == drafted_row_steps     (a row step drafts iff it tests position 0)
 5. len(drafted_by_position) == len(accepted_by_position)
 6. 0 <= accepted_by_position[i] <= drafted_by_position[i]
 7. drafted_by_position[i + 1] <= accepted_by_position[i]
                                                    (position i+1 is tested only after i was kept)
 8. accepted <= keep_tests <= drafted               (a keep test per tested node at most)
 9. keep_tests - accepted <= drafted_row_steps      (at most one rejection per row step: the
                                                    recovered tokens)
10. empty_steps <= drafted_row_steps <= row_steps
11. new_tokens <= row_steps + accepted              (a row step emits at most a + 1 tokens; cuts
                                                    at EOS, stop or the limit only remove)
12. sum(rules_used.values()) == target_passes       (every target pass is verified by one rule)
13. tree_steps <= target_passes
14. sum(draft_lengths.values()) == row_steps        (chain runs: every row step has one length)
15. every count and every time >= 0
16. drafted_by_position is empty or its last entry is > 0  (it is as long as the deepest
                                                    position any row step tested)

The recovered / bonus stream labels and the size of each target pass are not fields of
DecodeStats; the engine tests check those against the RequestOutputs.
"""

from __future__ import annotations

COUNTS = (
    "target_passes",
    "draft_passes",
    "new_tokens",
    "row_steps",
    "drafted",
    "accepted",
    "keep_tests",
    "empty_steps",
    "drafted_row_steps",
    "tree_steps",
)
SECONDS = (
    "prefill_seconds",
    "draft_seconds",
    "target_seconds",
    "verify_seconds",
    "total_seconds",
)


def stats_identity_violations(stats) -> list[str]:
    """The numbered identities (see the module docstring) that `stats` violates, each as
    'N. what: the values'; empty when all hold."""
    drafted_at = list(stats.drafted_by_position)
    accepted_at = list(stats.accepted_by_position)
    first_drafted = drafted_at[0] if drafted_at else 0
    first_accepted = accepted_at[0] if accepted_at else 0
    common = min(len(drafted_at), len(accepted_at))
    checks = [
        (
            "1. sum(drafted_by_position) == keep_tests",
            sum(drafted_at) == stats.keep_tests,
            f"{sum(drafted_at)} != {stats.keep_tests}",
        ),
        (
            "2. sum(accepted_by_position) == accepted",
            sum(accepted_at) == stats.accepted,
            f"{sum(accepted_at)} != {stats.accepted}",
        ),
        (
            "3. empty_steps == drafted_by_position[0] - accepted_by_position[0]",
            stats.empty_steps == first_drafted - first_accepted,
            f"{stats.empty_steps} != {first_drafted} - {first_accepted}",
        ),
        (
            "4. drafted_by_position[0] == drafted_row_steps",
            first_drafted == stats.drafted_row_steps,
            f"{first_drafted} != {stats.drafted_row_steps}",
        ),
        (
            "5. len(drafted_by_position) == len(accepted_by_position)",
            len(drafted_at) == len(accepted_at),
            f"{len(drafted_at)} != {len(accepted_at)}",
        ),
        (
            "6. 0 <= accepted_by_position[i] <= drafted_by_position[i]",
            all(0 <= a <= d for a, d in zip(accepted_at, drafted_at, strict=False)),
            f"{accepted_at} against {drafted_at}",
        ),
        (
            "7. drafted_by_position[i + 1] <= accepted_by_position[i]",
            all(drafted_at[i + 1] <= accepted_at[i] for i in range(common - 1)),
            f"{drafted_at} against {accepted_at}",
        ),
        (
            "8. accepted <= keep_tests <= drafted",
            stats.accepted <= stats.keep_tests <= stats.drafted,
            f"{stats.accepted}, {stats.keep_tests}, {stats.drafted}",
        ),
        (
            "9. keep_tests - accepted <= drafted_row_steps",
            stats.keep_tests - stats.accepted <= stats.drafted_row_steps,
            f"{stats.keep_tests} - {stats.accepted} > {stats.drafted_row_steps}",
        ),
        (
            "10. empty_steps <= drafted_row_steps <= row_steps",
            stats.empty_steps <= stats.drafted_row_steps <= stats.row_steps,
            f"{stats.empty_steps}, {stats.drafted_row_steps}, {stats.row_steps}",
        ),
        (
            "11. new_tokens <= row_steps + accepted",
            stats.new_tokens <= stats.row_steps + stats.accepted,
            f"{stats.new_tokens} > {stats.row_steps} + {stats.accepted}",
        ),
        (
            "12. sum(rules_used.values()) == target_passes",
            sum(stats.rules_used.values()) == stats.target_passes,
            f"{dict(stats.rules_used)} against {stats.target_passes}",
        ),
        (
            "13. tree_steps <= target_passes",
            stats.tree_steps <= stats.target_passes,
            f"{stats.tree_steps} > {stats.target_passes}",
        ),
        (
            "14. sum(draft_lengths.values()) == row_steps (chain runs)",
            stats.tree_steps > 0 or sum(stats.draft_lengths.values()) == stats.row_steps,
            f"{dict(stats.draft_lengths)} against {stats.row_steps}",
        ),
        (
            "16. drafted_by_position ends at the deepest tested position (last entry > 0)",
            not drafted_at or drafted_at[-1] > 0,
            f"{drafted_at}",
        ),
    ]
    negative = [name for name in COUNTS + SECONDS if getattr(stats, name) < 0]
    negative += [
        f"{name}[{i}]"
        for name in ("drafted_by_position", "accepted_by_position")
        for i, value in enumerate(getattr(stats, name))
        if value < 0
    ]
    negative += [f"draft_lengths[{k}]" for k, n in stats.draft_lengths.items() if k < 0 or n < 0]
    negative += [f"rules_used[{rule!r}]" for rule, n in stats.rules_used.items() if n < 0]
    checks.append(("15. every count and time >= 0", not negative, ", ".join(negative)))
    return [f"{name}: {values}" for name, holds, values in checks if not holds]


def assert_stats_identities(stats) -> None:
    """Raises AssertionError listing every identity of the module docstring `stats` violates."""
    violations = stats_identity_violations(stats)
    assert not violations, "DecodeStats identities violated:\n  " + "\n  ".join(violations)
