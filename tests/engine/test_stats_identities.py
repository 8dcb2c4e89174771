"""`assert_stats_identities` (tests/stats_identities.py) on hand-built DecodeStats: a consistent
record of row steps of every kind passes, and breaking any one identity raises, naming it."""

from __future__ import annotations

import copy

import pytest

from specsample.engine.stats import DecodeStats
from stats_identities import assert_stats_identities, stats_identity_violations


def record(stats, *, accepted, tested, nodes, depth, emitted):
    """One row step, counted the way the identities read the fields: `tested` positions along
    the kept path (accepted + 1 after a rejection), `emitted` tokens kept after cuts."""
    assert accepted <= tested <= accepted + 1 and tested <= nodes
    stats.row_steps += 1
    stats.drafted += nodes
    stats.accepted += accepted
    stats.keep_tests += tested
    stats.drafted_row_steps += int(tested > 0)
    stats.empty_steps += int(tested > 0 and accepted == 0)
    stats.new_tokens += emitted
    stats.draft_lengths[depth] = stats.draft_lengths.get(depth, 0) + 1
    while len(stats.drafted_by_position) < tested:
        stats.drafted_by_position.append(0)
        stats.accepted_by_position.append(0)
    for i in range(tested):
        stats.drafted_by_position[i] += 1
        stats.accepted_by_position[i] += int(i < accepted)


def consistent_stats() -> DecodeStats:
    """Two target passes of three rows: no draft, nothing kept, a rejection at the third draft,
    every draft kept (a bonus token), a cut at EOS, a draft shorter than its row's limit."""
    stats = DecodeStats()
    for _ in range(2):
        stats.target_passes += 1
        stats.draft_passes += 4
        stats.rules_used["token"] = stats.rules_used.get("token", 0) + 1
    record(stats, accepted=0, tested=0, nodes=0, depth=0, emitted=1)  # target-only row
    record(stats, accepted=0, tested=1, nodes=4, depth=4, emitted=1)  # empty step
    record(stats, accepted=2, tested=3, nodes=4, depth=4, emitted=3)  # recovered at position 3
    record(stats, accepted=4, tested=4, nodes=4, depth=4, emitted=5)  # bonus token
    record(stats, accepted=3, tested=3, nodes=3, depth=3, emitted=2)  # kept all, cut at EOS
    record(stats, accepted=1, tested=2, nodes=2, depth=2, emitted=2)
    stats.draft_seconds, stats.target_seconds, stats.total_seconds = 0.5, 1.0, 2.0
    return stats


def test_a_consistent_record_and_an_empty_one_pass():
    stats = consistent_stats()
    assert stats.drafted_by_position == [5, 4, 3, 1]
    assert stats.accepted_by_position == [4, 3, 2, 1]
    assert stats_identity_violations(stats) == []
    assert_stats_identities(stats)
    assert_stats_identities(DecodeStats())


def add(name, value):
    def change(stats):
        setattr(stats, name, getattr(stats, name) + value)

    return change


def set_item(name, index, value):
    def change(stats):
        getattr(stats, name)[index] = value

    return change


BREAKS = {
    1: add("keep_tests", 1),
    2: add("accepted", 1),
    3: add("empty_steps", 1),
    4: add("drafted_row_steps", 1),
    5: lambda stats: stats.accepted_by_position.append(0),
    6: set_item("accepted_by_position", 3, 2),
    7: set_item("drafted_by_position", 2, 4),
    8: lambda stats: setattr(stats, "drafted", stats.keep_tests - 1),
    9: lambda stats: setattr(stats, "accepted", stats.keep_tests - stats.drafted_row_steps - 1),
    10: lambda stats: setattr(stats, "row_steps", stats.drafted_row_steps - 1),
    11: lambda stats: setattr(stats, "new_tokens", stats.row_steps + stats.accepted + 1),
    12: set_item("rules_used", "token", 1),
    13: lambda stats: setattr(stats, "tree_steps", stats.target_passes + 1),
    14: set_item("draft_lengths", 7, 1),
    15: add("verify_seconds", -1.0),
    16: lambda stats: (stats.drafted_by_position.append(0), stats.accepted_by_position.append(0)),
}


@pytest.mark.parametrize("identity", sorted(BREAKS))
def test_breaking_one_identity_raises_naming_it(identity):
    stats = copy.deepcopy(consistent_stats())
    BREAKS[identity](stats)
    violations = stats_identity_violations(stats)
    assert any(v.startswith(f"{identity}. ") for v in violations), violations
    with pytest.raises(AssertionError, match=f"\n  {identity}\\. "):
        assert_stats_identities(stats)


def test_the_draft_length_identity_is_for_chain_runs_only():
    stats = consistent_stats()
    stats.tree_steps = 1  # a tree step records its depth, which need not be a chain length
    stats.draft_lengths[7] = 1
    assert_stats_identities(stats)
