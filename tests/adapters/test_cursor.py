"""ModelCursor: the logits it returns follow the committed sequences and the fed tokens, whether
a row's distribution comes from its prompt pass (a row just prefilled keeps it: "ready") or
from a pass over its pending token. The toy model's logits depend on the prefix alone, so every
returned row can be compared with the model's own distribution after that prefix."""

from __future__ import annotations

import torch

from specsample.adapters.cursor import ModelCursor
from specsample.adapters.toy import ToyLM


def expected(model: ToyLM, prefix: list[int]) -> torch.Tensor:
    return model.logits_for(prefix)


def test_rows_just_prefilled_need_no_pass_and_follow_their_prompt():
    model = ToyLM(16, seed=3)
    cursor = ModelCursor(model)
    prompts = [[1, 2, 3], [4, 5]]
    cursor.start(prompts)
    calls = model.num_calls
    logits = cursor.feed(prompts, [True, True])
    assert not cursor.fed and model.num_calls == calls  # both rows served by the prompt pass
    for b, prompt in enumerate(prompts):
        assert torch.allclose(logits[b, 0], expected(model, prompt))


def test_a_ready_row_feeds_its_drafts_alone_next_to_a_row_with_a_pending_token():
    model = ToyLM(16, seed=3)
    cursor = ModelCursor(model)
    cursor.start([[1, 2, 3]])
    cursor.feed([[1, 2, 3]], [True])  # its first token drawn from the prompt pass
    sequences = [[1, 2, 3, 7], [9, 8]]
    cursor.set_rows(sequences[:1], torch.tensor([0]), [[9, 8]])  # row 1 joins: ready
    drafts = torch.tensor([[5, 6], [10, 11]])
    logits = cursor.feed(sequences, [True, True], drafts, torch.tensor([2, 2]))
    assert cursor.fed and cursor.fed_width == 3  # row 0: pending 7 and 2 drafts; row 1: 2
    for b, seq in enumerate(sequences):
        rows = [seq] + [seq + drafts[b, : j + 1].tolist() for j in range(2)]
        for j, prefix in enumerate(rows):
            assert torch.allclose(logits[b, j], expected(model, prefix)), (b, j)
    # the ready row's cache now holds its drafts: its prompt distribution is gone, and the next
    # step rolls back to the committed tokens and feeds the pending one
    assert cursor.ready == [None, None] and model.sequences == cursor.cached
    sequences = [[1, 2, 3, 7, 5, 4], [9, 8, 10, 12]]
    logits = cursor.feed(sequences, [True, True])
    assert cursor.cached == [seq for seq in sequences] == model.sequences
    for b, seq in enumerate(sequences):
        assert torch.allclose(logits[b, 0], expected(model, seq))


def test_a_truncated_ready_row_drops_its_prompt_distribution():
    """A row that is rolled back (here: a committed token other than what it holds) loses its
    ready logits; it is fed again from the shared prefix."""
    model = ToyLM(16, seed=3)
    cursor = ModelCursor(model)
    cursor.start([[1, 2, 3]])
    logits = cursor.feed([[1, 2, 4]], [True])  # not the prompt it holds
    assert cursor.fed and cursor.cached == [[1, 2, 4]] == model.sequences
    assert torch.allclose(logits[0, 0], expected(model, [1, 2, 4]))


def test_a_tree_hangs_under_a_fed_pending_token_also_for_a_ready_row():
    model = ToyLM(16, seed=3)
    cursor = ModelCursor(model)
    cursor.start([[1, 2, 3]])
    tokens = torch.tensor([[5, 6, 7]])
    parents = torch.tensor([-1, -1, 0])
    valid = torch.ones(1, 3, dtype=torch.bool)
    logits = cursor.feed_tree([[1, 2, 3]], [True], tokens, parents, valid)
    assert cursor.fed and cursor.fed_width == 4
    prefixes = [[1, 2, 3], [1, 2, 3, 5], [1, 2, 3, 6], [1, 2, 3, 5, 7]]
    for j, prefix in enumerate(prefixes):
        assert torch.allclose(logits[0, j], expected(model, prefix)), j
    # keep node 0 (token 5), then the bonus: the next feed closes the tree on that path
    logits = cursor.feed([[1, 2, 3, 5, 9]], [True])
    assert cursor.cached == [[1, 2, 3, 5, 9]] == model.sequences
    assert torch.allclose(logits[0, 0], expected(model, [1, 2, 3, 5, 9]))
