"""Prompt lookup (n-gram) drafting: the latest earlier match of the longest suffix."""

from __future__ import annotations

import pytest
import torch

from specsample.drafters.ngram import NgramDrafter
from specsample.warpers import RowSampling, SamplingConfig


def test_lookup_uses_the_longest_matching_suffix():
    # suffix [1, 2, 3] occurs once (followed by 7); its tail [2, 3] also later (followed by 9)
    sequence = [1, 2, 3, 7, 0, 2, 3, 9, 5, 1, 2, 3]
    assert NgramDrafter(max_ngram=3).lookup(sequence, 2) == [7, 0]
    assert NgramDrafter(max_ngram=2).lookup(sequence, 2) == [9, 5]


def test_lookup_takes_the_latest_earlier_match():
    sequence = [4, 8, 4, 6, 4, 5, 4]
    assert NgramDrafter(max_ngram=3).lookup(sequence, 1) == [5]


def test_lookup_never_matches_the_suffix_itself():
    # the only occurrence of [3, 4] is the suffix: fall back to the 1-gram [4]
    assert NgramDrafter(max_ngram=2).lookup([4, 1, 3, 4], 3) == [1, 3, 4]


def test_lookup_may_run_into_the_suffix():
    # match of [5, 5] at 0 is followed by the row's own tail
    assert NgramDrafter(max_ngram=2).lookup([5, 5, 5], 4) == [5]


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 10])
def test_lookup_respects_the_limit(limit):
    sequence = [1, 2, 3, 4, 5, 6, 1, 2]
    assert NgramDrafter(max_ngram=2).lookup(sequence, limit) == [3, 4, 5, 6, 1, 2][:limit]


@pytest.mark.parametrize(
    ("sequence", "sizes"),
    [
        ([], {}),
        ([7], {}),
        ([1, 2, 3, 4], {}),
        # [3, 1, 2] and [1, 2] do occur earlier, but at least 4-grams are asked for
        ([1, 2, 3, 1, 2], {"min_ngram": 4, "max_ngram": 5}),
    ],
    ids=["empty", "one-token", "all-distinct", "shorter-than-min-ngram"],
)
def test_lookup_without_a_match_is_empty(sequence, sizes):
    assert NgramDrafter(**sizes).lookup(sequence, 4) == []


def test_lookup_does_not_fall_below_min_ngram():
    sequence = [9, 1, 2, 8, 2]  # only the 1-gram [2] matches
    assert NgramDrafter(max_ngram=3, min_ngram=1).lookup(sequence, 2) == [8, 2]
    assert NgramDrafter(max_ngram=3, min_ngram=2).lookup(sequence, 2) == []


def test_propose_returns_point_mass_drafts_with_per_row_lengths():
    drafter = NgramDrafter(max_ngram=2)
    sequences = [[1, 2, 3, 1, 2], [4, 5, 6], [7, 8, 7, 8, 7]]
    sampling = RowSampling.shared(SamplingConfig(), torch.Generator().manual_seed(0), 3)
    draft = drafter.propose(sequences, torch.tensor([3, 2, 1]), sampling)
    assert draft.probs is None
    assert draft.lengths.tolist() == [3, 0, 1]
    assert draft.tokens.tolist() == [[3, 1, 2], [0, 0, 0], [8, 0, 0]]
    assert drafter.forward_passes == 0


def test_propose_with_no_match_or_zero_limits_is_empty():
    drafter = NgramDrafter()
    sampling = RowSampling.shared(SamplingConfig(), torch.Generator().manual_seed(0), 1)
    nothing = drafter.propose([[1, 2, 3]], torch.tensor([4]), sampling)
    limited = drafter.propose([[1, 2, 1, 2]], torch.tensor([0]), sampling)
    for draft in (nothing, limited):
        assert draft.tokens.shape == (1, 0) and draft.lengths.tolist() == [0]


@pytest.mark.parametrize(("min_ngram", "max_ngram"), [(0, 3), (2, 1), (-1, 2), (1, 0)], ids=str)
def test_bad_ngram_sizes_raise_naming_them(min_ngram, max_ngram):
    with pytest.raises(ValueError, match="^min_ngram, max_ngram: expected 1 <= min_ngram"):
        NgramDrafter(min_ngram=min_ngram, max_ngram=max_ngram)
