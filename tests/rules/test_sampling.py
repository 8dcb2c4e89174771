"""The sampler under every rule (rules/sampling.py): block sums and prefix sums in float64, so that
ids of tiny weight next to a large one keep their share of [0, 1)."""

from __future__ import annotations

import pytest
import torch

from specsample.rules.sampling import BLOCK, block_sums_of, sample_from_weights


def test_block_sums_of_a_vocabulary_of_whole_blocks_are_float64_one_per_block():
    weights = torch.rand(3, 2 * BLOCK, generator=torch.Generator().manual_seed(0))
    sums = block_sums_of(weights)
    assert sums.dtype == torch.float64 and sums.shape == (3, 2)
    halves = weights.reshape(3, 2, BLOCK).double().sum(-1)
    assert torch.allclose(sums, halves, rtol=1e-6, atol=0)


def test_block_sums_of_a_vocabulary_with_a_partial_last_block():
    weights = torch.rand(2, 2 * BLOCK + 5, generator=torch.Generator().manual_seed(1))
    sums = block_sums_of(weights)
    assert sums.dtype == torch.float64 and sums.shape == (2, 3)
    assert torch.allclose(sums[:, 2], weights[:, 2 * BLOCK :].double().sum(-1), rtol=1e-6)


def test_tiny_weights_after_a_large_one_keep_their_share_of_the_uniforms():
    """float32 weights (1, w, w, ..., w) with w = 1e-8: in float32, 1 + w rounds to 1 and the
    tiny ids would have no room at all; the prefix sums are float64, where id j > 0 covers
    [1 + (j - 1) w, 1 + j w) of the total 1 + 9 w."""
    weights = torch.tensor([[1.0] + [1e-8] * 9])
    w = float(weights[0, 1])
    total = 1 + 9 * w
    for j in range(1, 10):
        u = torch.tensor([(1 + (j - 0.5) * w) / total], dtype=torch.float64)
        assert sample_from_weights(weights, u).tolist() == [j]
    assert sample_from_weights(weights, torch.tensor([0.0], dtype=torch.float64)).tolist() == [0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_argmax_last_is_torch_argmax_first_maximum_on_ties(dtype):
    """numpy's argmax on CPU float32/float64 (vectorised), torch's otherwise: the same ids,
    the first maximum on ties, int64, any leading shape."""
    from specsample.rules.greedy import argmax_last

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 4, 1000, generator=generator).to(dtype)
    values[0, 0, 7] = values[0, 0, 900] = 50.0  # a tie: the lower id
    got = argmax_last(values)
    assert got.dtype == torch.int64 and got.shape == (3, 4)
    assert torch.equal(got, values.argmax(dim=-1)) and int(got[0, 0]) == 7
    strided = values.transpose(0, 1)  # not contiguous
    assert torch.equal(argmax_last(strided), strided.argmax(dim=-1))
    row = values[1, 2]  # one dimension: a 0-d index
    assert argmax_last(row).shape == () and int(argmax_last(row)) == int(row.argmax())
