"""ModelCursor: the logits it returns follow the committed sequences and the fed tokens, whether
a row's distribution comes from its prompt pass (a row just prefilled keeps it: "ready"), from
a prompt pass that also scored its first drafts (a model with `add_rows_last`), or from a pass
over its pending token. The toy model's logits depend on the prefix alone, so every returned
row can be compared with the model's own distribution after that prefix."""

from __future__ import annotations

import pytest
import torch

from specsample.adapters.cursor import ModelCursor
from specsample.adapters.protocol import PromptScoring
from specsample.adapters.toy import ToyLM


class PlainToyLM(ToyLM):
    """A ToyLM without `add_rows_last`: rows that join get a prompt pass of their own."""

    add_rows_last = None


def expected(model: ToyLM, prefix: list[int]) -> torch.Tensor:
    return model.logits_for(prefix)


def test_rows_just_prefilled_need_no_pass_and_follow_their_prompt():
    model = PlainToyLM(16, seed=3)
    cursor = ModelCursor(model)
    prompts = [[1, 2, 3], [4, 5]]
    cursor.start(prompts)
    calls = model.num_calls
    logits = cursor.feed(prompts, [True, True])
    assert not cursor.fed and model.num_calls == calls  # both rows served by the prompt pass
    for b, prompt in enumerate(prompts):
        assert torch.allclose(logits[b, 0], expected(model, prompt))


def test_a_ready_row_feeds_its_drafts_alone_next_to_a_row_with_a_pending_token():
    model = PlainToyLM(16, seed=3)
    cursor = ModelCursor(model)
    cursor.start([[1, 2, 3]])
    cursor.feed([[1, 2, 3]], [True])  # its first token drawn from the prompt pass
    sequences = [[1, 2, 3, 7], [9, 8]]
    cursor.set_rows(sequences[:1], torch.tensor([0]), [[9, 8]])  # row 1 joins: ready
    drafts = torch.tensor([[5, 6], [10, 11]])
    logits = cursor.feed(sequences, [True, True], drafts, torch.tensor([2, 2]))
    assert cursor.fed and cursor.fed_width == 3  # row 0: pending 7 and 2 drafts; row 1: 2
    assert (cursor.fed_tokens, cursor.fed_rows) == (5, 2)  # what a ragged pass costs by
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
    model = PlainToyLM(16, seed=3)
    cursor = ModelCursor(model)
    cursor.start([[1, 2, 3]])
    logits = cursor.feed([[1, 2, 4]], [True])  # not the prompt it holds
    assert cursor.fed and cursor.cached == [[1, 2, 4]] == model.sequences
    assert torch.allclose(logits[0, 0], expected(model, [1, 2, 4]))


@pytest.mark.parametrize("model_class", [PlainToyLM, ToyLM])
def test_a_tree_hangs_under_a_fed_pending_token_also_for_a_ready_row(model_class):
    """With add_rows_last (ToyLM) the row joins at the tree's step: it gets a prompt pass of
    its own first (not one with the tree), then the tree hangs under its fed last token."""
    model = model_class(16, seed=3)
    cursor = ModelCursor(model)
    cursor.start([[1, 2, 3]])
    tokens = torch.tensor([[5, 6, 7]])
    parents = torch.tensor([-1, -1, 0])
    valid = torch.ones(1, 3, dtype=torch.bool)
    logits = cursor.feed_tree([[1, 2, 3]], [True], tokens, parents, valid)
    assert cursor.fed and cursor.fed_width == 4 and not cursor.prompt_scored
    assert (cursor.fed_tokens, cursor.fed_rows) == (4, 1)  # the pending token and 3 nodes
    prefixes = [[1, 2, 3], [1, 2, 3, 5], [1, 2, 3, 6], [1, 2, 3, 5, 7]]
    for j, prefix in enumerate(prefixes):
        assert torch.allclose(logits[0, j], expected(model, prefix)), j
    # keep node 0 (token 5), then the bonus: the next feed closes the tree on that path
    logits = cursor.feed([[1, 2, 3, 5, 9]], [True])
    assert cursor.cached == [[1, 2, 3, 5, 9]] == model.sequences
    assert torch.allclose(logits[0, 0], expected(model, [1, 2, 3, 5, 9]))


def test_the_plain_toy_model_has_no_prompt_scoring():
    assert isinstance(ToyLM(4), PromptScoring) and not isinstance(PlainToyLM(4), PromptScoring)


def assert_follows(model, logits, sequences, drafts=None, lengths=None):
    """Row b's logits [b, 0] follow sequences[b], [b, j] its first j drafts."""
    for b, seq in enumerate(sequences):
        n = 0 if lengths is None else int(lengths[b])
        for j in range(n + 1):
            prefix = seq + ([] if drafts is None else drafts[b, :j].tolist())
            assert torch.allclose(logits[b, j], expected(model, prefix)), (b, j)


def test_rows_that_join_are_scored_with_their_first_drafts_in_their_prompt_pass():
    model = ToyLM(16, seed=3)
    cursor = ModelCursor(model)
    prompts = [[1, 2, 3], [4, 5]]
    cursor.start(prompts)
    assert model.num_calls == 0  # nothing runs before the first feed
    drafts, lengths = torch.tensor([[6, 7, 8], [9, 0, 0]]), torch.tensor([3, 1])
    logits = cursor.feed(prompts, [True, True], drafts, lengths)
    assert model.num_calls == 1 and cursor.prompt_scored and not cursor.fed
    assert_follows(model, logits, prompts, drafts, lengths)
    assert cursor.cached == [[1, 2, 3, 6, 7, 8], [4, 5, 9]] == model.sequences
    assert cursor.ready == [None, None]
    # row 0 kept one draft and drew 10; row 1 kept its draft and drew 11: the next feed rolls
    # back to the committed tokens and feeds the pending ones with new drafts
    sequences = [[1, 2, 3, 6, 10], [4, 5, 9, 11]]
    drafts, lengths = torch.tensor([[12, 13], [14, 15]]), torch.tensor([2, 2])
    logits = cursor.feed(sequences, [True, True], drafts, lengths)
    assert model.num_calls == 2 and not cursor.prompt_scored and cursor.fed_width == 3
    assert_follows(model, logits, sequences, drafts, lengths)
    assert model.sequences == [s + d.tolist() for s, d in zip(sequences, drafts, strict=True)]


def test_rows_that_join_without_drafts_get_a_plain_prompt_pass():
    model = ToyLM(16, seed=3)
    cursor = ModelCursor(model)
    prompts = [[1, 2, 3], [4, 5]]
    cursor.start(prompts)
    logits = cursor.feed(prompts, [True, True])
    assert model.num_calls == 1 and not cursor.prompt_scored and not cursor.fed
    assert_follows(model, logits, prompts)
    # they hold their whole prompt with its distribution (ready): drafts are fed alone
    assert cursor.cached == prompts and all(r is not None for r in cursor.ready)
    drafts, lengths = torch.tensor([[6], [7]]), torch.tensor([1, 1])
    logits = cursor.feed(prompts, [True, True], drafts, lengths)
    assert cursor.fed_width == 1 and model.num_calls == 2
    assert_follows(model, logits, prompts, drafts, lengths)


def test_a_row_joins_next_to_a_running_one_and_only_some_joining_rows_draft():
    model = ToyLM(16, seed=3)
    cursor = ModelCursor(model)
    cursor.start([[1, 2, 3]])
    cursor.feed([[1, 2, 3]], [True])  # its first token from the prompt pass
    sequences = [[1, 2, 3, 7], [9, 8], [5]]
    cursor.set_rows(sequences[:1], torch.tensor([0]), [[9, 8], [5]])
    assert model.num_calls == 1  # the joining rows wait for the next feed
    drafts, lengths = torch.tensor([[5, 6], [10, 11], [0, 0]]), torch.tensor([2, 2, 0])
    logits = cursor.feed(sequences, [True, True, True], drafts, lengths)
    # one prompt pass for both joining rows, one pass for the running row
    assert model.num_calls == 3 and cursor.prompt_scored and cursor.fed_width == 3
    assert_follows(model, logits, sequences, drafts, lengths)
    assert model.sequences == cursor.cached == [[1, 2, 3, 7, 5, 6], [9, 8, 10, 11], [5]]


def test_rows_that_join_are_kept_or_dropped_before_their_first_feed():
    """set_rows again before a feed (a request aborted right after it joined): the rows that
    joined are prefilled first, then the batch changes as asked."""
    model = ToyLM(16, seed=3)
    cursor = ModelCursor(model)
    cursor.start([[1, 2], [3, 4]])
    cursor.set_rows([[1, 2], [3, 4]], torch.tensor([1]), [[6]])
    assert model.sequences == [[3, 4]] and cursor.cached == [[3, 4], []]
    sequences = [[3, 4], [6]]
    drafts, lengths = torch.tensor([[7], [8]]), torch.tensor([1, 1])
    logits = cursor.feed(sequences, [True, True], drafts, lengths)
    assert_follows(model, logits, sequences, drafts, lengths)
    assert model.sequences == [[3, 4, 7], [6, 8]]


def test_start_drops_rows_left_in_the_model_without_a_pass():
    model = ToyLM(16, seed=3)
    model.prefill([[9, 9], [8]])  # another user's rows
    calls = model.num_calls
    cursor = ModelCursor(model)
    cursor.start([[1, 2]])
    assert model.num_calls == calls and model.sequences == []
    # with a token tree open it cannot drop them: it prefills (which resets the model)
    model.prefill([[9, 9]])
    model.extend_tree(torch.tensor([[3]]), torch.tensor([[-1]]), torch.ones(1, 1, dtype=torch.bool))
    cursor = ModelCursor(model)
    cursor.start([[1, 2]])
    assert model.sequences == [[1, 2]] and cursor.ready[0] is not None


def test_a_padded_feed_returns_the_same_rows_and_the_next_feed_rolls_the_filler_back():
    """min_width feeds filler (the row's last token again) after the drafts: the returned rows
    are those of the unpadded feed, the model scored min_width tokens, and the next call keeps
    what the committed sequence shares with the cache: the filler where the sequence goes on
    with that same token there (its entry is the right one), nothing past it otherwise."""
    plain, padded = PlainToyLM(16, seed=3), PlainToyLM(16, seed=3)
    cursors = [ModelCursor(plain), ModelCursor(padded)]
    prompt = [1, 2, 3]
    drafts = torch.tensor([[5, 6]])
    out = []
    for cursor, width in zip(cursors, (None, 6), strict=True):
        cursor.start([prompt])
        cursor.feed([prompt], [True])
        out.append(cursor.feed([prompt + [7]], [True], drafts, torch.tensor([2]), width))
    assert torch.equal(out[0], out[1]) and out[1].shape[1] == 3
    assert cursors[1].fed_width == 6 and padded.sequences == [prompt + [7, 5, 6, 6, 6, 6]]
    # the drafts were kept and the sequence goes on with 6 (a filler token's value): the cache
    # keeps the entries the sequence shares, the rest is rolled back
    sequence = prompt + [7, 5, 6, 6, 9]
    for cursor, model in zip(cursors, (plain, padded), strict=True):
        logits = cursor.feed([sequence], [True])
        assert torch.allclose(logits[0, 0], expected(model, sequence))
        assert model.sequences == [sequence]
    assert cursors[1].fed_width == 1  # only the pending 9: the filler 6 was kept
