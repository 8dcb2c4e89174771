"""HFStaticLM (static slot cache, CUDA graphs) must match a fresh, uncached forward of each row
through ragged prefill / extend / truncate / add_rows / remove_rows. On CPU its passes run
eagerly (graphs=False); with a CUDA device the graphs are replayed and checked the same way."""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import TINY_CONFIG, tiny_causal_lm  # noqa: E402
from specsample.adapters.hf_static import HFStaticLM  # noqa: E402
from specsample.adapters.protocol import LanguageModel  # noqa: E402

VOCAB = TINY_CONFIG["vocab_size"]
ATOL = 1e-4
CUDA = torch.cuda.is_available()


def fresh_logits(model, seq):
    """float32 [seq, vocab]: one unpadded sequence, no cache."""
    with torch.inference_mode():
        ids = torch.tensor([seq], device=next(model.parameters()).device)
        return model(input_ids=ids, use_cache=False).logits[0].float().cpu()


def static_lm(model, **kwargs):
    return HFStaticLM(model, max_batch=4, max_length=40, graphs=CUDA, **kwargs)


@pytest.fixture(scope="module")
def model():
    model = tiny_causal_lm("qwen2", attn="sdpa")
    return model.cuda() if CUDA else model


def test_is_a_language_model(model):
    assert isinstance(static_lm(model), LanguageModel)


@pytest.mark.parametrize("seed", [0])
def test_random_walk_matches_fresh_forwards(model, seed):
    rng = random.Random(seed)
    lm = static_lm(model)
    seqs = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 7))] for _ in range(3)]
    first = lm.prefill(seqs).cpu()
    assert first.shape == (3, VOCAB) and first.dtype == torch.float32
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(first[b], fresh_logits(model, seq)[-1], atol=ATOL, rtol=0)
    for step in range(6):
        n = rng.randint(1, 5)
        tokens = torch.tensor([[rng.randrange(VOCAB) for _ in range(n)] for _ in seqs])
        num_valid = torch.tensor([rng.randint(0, n) for _ in seqs])
        logits = lm.extend(tokens, num_valid).cpu()
        assert logits.shape == (len(seqs), n, VOCAB) and bool(torch.isfinite(logits).all())
        for b, seq in enumerate(seqs):
            k = int(num_valid[b])
            seq += tokens[b, :k].tolist()
            if k:
                expected = fresh_logits(model, seq)[-k:]
                torch.testing.assert_close(logits[b, :k], expected, atol=ATOL, rtol=0)
        keep = [max(1, len(s) - rng.randint(0, 3)) for s in seqs]
        lm.truncate(torch.tensor(keep))
        seqs = [s[:k] for s, k in zip(seqs, keep, strict=True)]
        assert lm.lengths.tolist() == keep
        if step == 2:  # a request leaves and another joins between steps
            lm.remove_rows(torch.tensor([0, 2]))
            seqs = [seqs[0], seqs[2]]
            prompt = [rng.randrange(VOCAB) for _ in range(5)]
            joined = lm.add_rows([prompt]).cpu()
            torch.testing.assert_close(
                joined[0], fresh_logits(model, prompt)[-1], atol=ATOL, rtol=0
            )
            seqs.append(prompt)


def test_a_rolled_back_token_is_never_seen_again(model):
    """Slots past a row's length hold stale keys after truncate; the next pass overwrites them
    before any query can attend to them."""
    lm = static_lm(model)
    lm.prefill([[1, 2, 3]])
    lm.extend(torch.tensor([[4, 5, 6]]), torch.tensor([3]))
    lm.truncate(torch.tensor([4]))  # keeps 1 2 3 4; 5 and 6 stay in their slots
    logits = lm.extend(torch.tensor([[7, 8]]), torch.tensor([2])).cpu()
    torch.testing.assert_close(
        logits[0], fresh_logits(model, [1, 2, 3, 4, 7, 8])[-2:], atol=ATOL, rtol=0
    )


def test_limits_are_refused_with_the_argument_named(model):
    lm = static_lm(model)
    with pytest.raises(ValueError, match="max_batch"):
        lm.prefill([[1]] * 5)
    with pytest.raises(ValueError, match="max_length"):
        lm.prefill([[1] * 41])
    lm.prefill([[1] * 38])
    with pytest.raises(ValueError, match="max_length"):
        lm.extend(torch.tensor([[1, 2, 3]]), torch.tensor([3]))
    with pytest.raises(ValueError, match="at most 16"):
        lm.extend(torch.ones(1, 17, dtype=torch.int64), torch.tensor([0]))


@pytest.mark.skipif(CUDA, reason="the refusal is for models on a CPU")
def test_graphs_on_a_cpu_are_refused_with_a_clear_message(model):
    with pytest.raises(ValueError, match="needs a model on a CUDA device.*HFCausalLM"):
        HFStaticLM(model)
