"""ToyLM: exact, deterministic, prefix-hashed logits behind the LanguageModel protocol."""

from __future__ import annotations

import math
import random

import pytest
import torch

from specsample.adapters.protocol import LanguageModel
from specsample.adapters.toy import ToyLM

VOCAB = 11


def test_logits_are_a_deterministic_function_of_the_prefix() -> None:
    a, b = ToyLM(VOCAB, seed=3), ToyLM(VOCAB, seed=3)
    assert torch.equal(a.logits_for([1, 2, 3]), b.logits_for((1, 2, 3)))
    assert a.logits_for([1, 2, 3]).shape == (VOCAB,)
    assert a.logits_for([1, 2, 3]).dtype == torch.float32
    assert not torch.equal(a.logits_for([1, 2, 3]), a.logits_for([2, 1, 3]))
    assert not torch.equal(a.logits_for([1, 2, 3]), ToyLM(VOCAB, seed=4).logits_for([1, 2, 3]))
    assert a.logits_for([]).shape == (VOCAB,)  # empty prefix is fine for direct access
    torch.testing.assert_close(a.probs_for([5]).sum(), torch.tensor(1.0))
    # Returned tensors are copies: mutating one must not poison the memo.
    a.logits_for([7]).zero_()
    assert a.logits_for([7]).abs().sum() > 0


def test_scale_controls_sharpness() -> None:
    flat, sharp = ToyLM(VOCAB, seed=1, scale=0.1), ToyLM(VOCAB, seed=1, scale=10.0)
    torch.testing.assert_close(sharp.logits_for([4]), 100 * flat.logits_for([4]))


def test_base_and_noise_make_similar_pairs() -> None:
    target = ToyLM(VOCAB, seed=0)
    same = ToyLM(VOCAB, seed=9, base=target, noise=0.0)
    close = ToyLM(VOCAB, seed=9, base=target, noise=0.05)
    far = ToyLM(VOCAB, seed=9, base=target, noise=5.0)
    prefix = [2, 7, 1]
    assert torch.equal(same.logits_for(prefix), target.logits_for(prefix))

    def tv(model: ToyLM) -> float:
        return 0.5 * float((model.probs_for(prefix) - target.probs_for(prefix)).abs().sum())

    assert 0 < tv(close) < tv(far)
    with pytest.raises(ValueError, match="noise"):
        ToyLM(VOCAB, noise=0.5)
    with pytest.raises(ValueError, match="base: expected a ToyLM with vocab_size=5, got 11"):
        ToyLM(5, base=target)
    with pytest.raises(ValueError, match="vocab_size"):
        ToyLM(0)


@pytest.mark.parametrize("seed", range(5))
def test_random_walk_matches_logits_for(seed: int) -> None:
    rng = random.Random(seed)
    lm = ToyLM(VOCAB, seed=seed)
    assert isinstance(lm, LanguageModel)
    seqs = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))] for _ in range(4)]
    first = lm.prefill(seqs)
    assert first.shape == (4, VOCAB)
    for b, s in enumerate(seqs):
        assert torch.equal(first[b], lm.logits_for(s))
    for _ in range(10):
        n = rng.randint(0, 4)
        tokens = torch.tensor(
            [[rng.randrange(VOCAB) for _ in range(n)] for _ in seqs], dtype=torch.long
        ).view(4, n)
        num_valid = torch.tensor([rng.randint(0, n) for _ in seqs])
        logits = lm.extend(tokens, num_valid)
        assert logits.shape == (4, n, VOCAB)
        for b, s in enumerate(seqs):
            for j in range(int(num_valid[b])):
                s.append(int(tokens[b, j]))
                assert torch.equal(logits[b, j], lm.logits_for(s))
        assert lm.sequences == seqs
        keep = [max(0, len(s) - rng.randint(0, 3)) for s in seqs]
        lm.truncate(torch.tensor(keep))
        seqs = [s[:k] for s, k in zip(seqs, keep, strict=True)]
        assert lm.lengths.tolist() == keep


def test_truncate_then_extend_equals_never_extended() -> None:
    direct, rolled = ToyLM(VOCAB, seed=2), ToyLM(VOCAB, seed=2)
    prompts = [[1, 2, 3], [4]]
    later = torch.tensor([[5, 6], [7, 8]])
    direct.prefill(prompts)
    want = direct.extend(later, torch.tensor([2, 1]))
    rolled.prefill(prompts)
    rolled.extend(torch.tensor([[9, 9], [9, 9]]), torch.tensor([2, 2]))
    rolled.truncate(torch.tensor([3, 1]))
    got = rolled.extend(later, torch.tensor([2, 1]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1, :1], want[1, :1])


def test_rows_are_independent() -> None:
    alone, crowd = ToyLM(VOCAB, seed=5), ToyLM(VOCAB, seed=5)
    alone.prefill([[3, 1, 4]])
    want = alone.extend(torch.tensor([[1, 5]]), torch.tensor([2]))
    crowd.prefill([[9, 9, 9, 9], [3, 1, 4]])
    crowd.extend(torch.tensor([[2, 2], [0, 0]]), torch.tensor([2, 0]))
    crowd.truncate(torch.tensor([1, 3]))
    got = crowd.extend(torch.tensor([[6, 6], [1, 5]]), torch.tensor([1, 2]))
    assert torch.equal(got[1], want[0])


def test_padding_value_and_counters() -> None:
    lm = ToyLM(VOCAB, seed=0, pad_value=math.nan)
    lm.prefill([[1], [2, 3]])
    out = lm.extend(torch.tensor([[4, 5, 6], [7, 8, 9]]), torch.tensor([3, 1]))
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 0]).all()
    assert torch.isnan(out[1, 1:]).all()
    assert (lm.num_calls, lm.num_positions) == (2, 2 + 4)


def test_errors_name_argument_expected_and_got() -> None:
    lm = ToyLM(VOCAB)
    with pytest.raises(RuntimeError, match="prefill"):
        lm.truncate(torch.tensor([0]))
    with pytest.raises(TypeError, match="prompts: expected a list"):
        lm.prefill(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="prompts: expected at least one prompt"):
        lm.prefill([])
    with pytest.raises(ValueError, match=r"prompts\[0\].*empty"):
        lm.prefill([[]])
    with pytest.raises(TypeError, match=r"prompts\[0\]\[1\]: expected an int, got float"):
        lm.prefill([[1, 2.5]])
    lm.prefill([[1, 2], [3]])
    ok = torch.tensor([1, 1])
    with pytest.raises(ValueError, match=r"tokens: expected shape \(batch=2, n\), got \(1, 1\)"):
        lm.extend(torch.tensor([[1]]), ok)
    with pytest.raises(TypeError, match="tokens: expected a torch.Tensor, got list"):
        lm.extend([[1], [2]], ok)
    with pytest.raises(TypeError, match="num_valid: expected an integer tensor"):
        lm.extend(torch.tensor([[1], [2]]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match=r"num_valid: expected 0 <= num_valid\[b\] <= n=1"):
        lm.extend(torch.tensor([[1], [2]]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"tokens: expected valid token ids in \[0, 11\)"):
        lm.extend(torch.tensor([[1], [11]]), ok)
    with pytest.raises(ValueError, match=r"lengths: .*current length \[2, 1\], got \[3, 1\]"):
        lm.truncate(torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=r"lengths: .*bad rows \[1\]"):
        lm.truncate(torch.tensor([0, -2]))
    with pytest.raises(TypeError, match="lengths: expected an integer tensor"):
        lm.truncate(torch.tensor([1.0, 1.0]))
    assert lm.sequences == [[1, 2], [3]]


def test_add_rows_last_scores_the_last_tokens_of_each_prompt() -> None:
    model = ToyLM(VOCAB, seed=3)
    model.prefill([[1, 2]])
    logits = model.add_rows_last([[3, 4, 5], [6]], 2)
    assert logits.shape == (2, 2, VOCAB) and model.sequences == [[1, 2], [3, 4, 5], [6]]
    assert torch.equal(logits[0, 0], model.logits_for([3, 4]))
    assert torch.equal(logits[0, 1], model.logits_for([3, 4, 5]))
    assert torch.equal(logits[1, 1], model.logits_for([6]))
    assert torch.isfinite(logits[1, 0]).all()  # before the one-token prompt: arbitrary
    with pytest.raises(ValueError, match="last: expected an int >= 1, got 0"):
        model.add_rows_last([[1]], 0)
