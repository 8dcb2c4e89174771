"""check_extend_rows (the list-returning check a llama.cpp model uses) against check_extend_args
(the tensor check the other models use): the same arguments are accepted with the same tokens
and counts, and the same bad arguments are refused with the same error and message."""

from __future__ import annotations

import pytest
import torch

from specsample.adapters.protocol import check_extend_args, check_extend_rows

VOCAB = 11

GOOD = [
    (torch.tensor([[3, 4, 5]]), torch.tensor([3])),
    (torch.tensor([[3, 4, 5], [1, 0, 0]]), torch.tensor([3, 1])),
    (torch.tensor([[3, 99], [0, -7]]), torch.tensor([1, 0])),  # padding is not checked
    (torch.tensor([[10]], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)),
    (torch.zeros(2, 0, dtype=torch.int64), torch.tensor([0, 0])),
]

BAD = [
    ([[1, 2]], torch.tensor([2])),  # not a tensor
    (torch.tensor([[1.0, 2.0]]), torch.tensor([2])),  # floating tokens
    (torch.tensor([[1, 2]]), torch.tensor([True])),  # boolean counts
    (torch.tensor([1, 2]), torch.tensor([2])),  # one dimension
    (torch.tensor([[1, 2], [3, 4]]), torch.tensor([2, 2])),  # two rows for a batch of one
    (torch.tensor([[1, 2]]), torch.tensor([[2]])),  # counts of the wrong shape
    (torch.tensor([[1, 2]]), torch.tensor([3])),  # a count past the width
    (torch.tensor([[1, 2]]), torch.tensor([-1])),  # a negative count
    (torch.tensor([[1, VOCAB]]), torch.tensor([2])),  # an id past the vocabulary
    (torch.tensor([[-1, 2]]), torch.tensor([1])),  # a negative id
]


@pytest.mark.parametrize("tokens, num_valid", GOOD)
def test_accepts_what_the_tensor_check_accepts(tokens, num_valid):
    batch = tokens.shape[0]
    rows, counts = check_extend_rows(tokens, num_valid, batch, VOCAB)
    checked, valid = check_extend_args(tokens, num_valid, batch, VOCAB)
    assert counts == valid.tolist()
    assert rows == [row[:k] for row, k in zip(checked.tolist(), counts, strict=True)]
    assert all(type(t) is int for row in rows for t in row)


@pytest.mark.parametrize("tokens, num_valid", BAD)
def test_refuses_what_the_tensor_check_refuses_with_its_message(tokens, num_valid):
    with pytest.raises((TypeError, ValueError)) as expected:
        check_extend_args(tokens, num_valid, 1, VOCAB)
    with pytest.raises(expected.type) as got:
        check_extend_rows(tokens, num_valid, 1, VOCAB)
    assert str(got.value) == str(expected.value)
