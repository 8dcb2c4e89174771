"""ModelDrafter's draft-side stops: they cut drafts exactly where the draft's own top
probabilities say, per row, and never change the tokens or probabilities drafted before the cut.
(Exactness of decoding with them: tests/decoding/test_exactness.py.)"""

from __future__ import annotations

import pytest
import torch

from specsample.adapters.toy import ToyLM
from specsample.drafters.model import ModelDrafter
from specsample.warpers import RowSampling, SamplingConfig

VOCAB = 5
PROMPTS = [[0, 1, 2], [3, 1], [4, 4, 4, 0], [2]]


def draft_model() -> ToyLM:
    return ToyLM(VOCAB, seed=11, scale=1.2)


def propose(drafter: ModelDrafter, k: int, sampling: SamplingConfig, seed: int = 0):
    drafter.start(PROMPTS)
    generator = torch.Generator().manual_seed(seed)
    max_lengths = torch.full((len(PROMPTS),), k, dtype=torch.int64)
    rows = RowSampling.shared(sampling, generator, len(PROMPTS))
    return drafter.propose([list(p) for p in PROMPTS], max_lengths, rows)


def top_probs_along(draft, model: ToyLM, sampling: SamplingConfig, k: int) -> torch.Tensor:
    """The draft's top probability before each of k positions, per row, following the tokens of
    an uncut draft."""
    from specsample.warpers import logits_to_probs

    tops = torch.zeros(len(PROMPTS), k, dtype=torch.float64)
    for b, prompt in enumerate(PROMPTS):
        prefix = list(prompt)
        for i in range(k):
            logits = model.logits_for(prefix)[None]
            if sampling.greedy:  # a point mass after warping: the plain softmax's confidence
                probs = torch.softmax(logits, -1)
            else:
                probs = logits_to_probs(logits, sampling)
            tops[b, i] = probs[0].max()
            prefix.append(int(draft.tokens[b, i]))
    return tops


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("rule", ["confidence", "survival"])
def test_stops_cut_where_the_draft_says(rule, temperature):
    k, threshold = 6, 0.45
    sampling = SamplingConfig(temperature=temperature)
    model = draft_model()
    full = propose(ModelDrafter(model), k, sampling)
    cut = propose(ModelDrafter(model, **{rule: threshold}), k, sampling)
    tops = top_probs_along(full, model, sampling, k)
    score = tops if rule == "confidence" else tops.cumprod(dim=1)
    expected = (score >= threshold).long().cumprod(dim=1).sum(dim=1)
    assert cut.lengths.tolist() == expected.tolist()
    assert 0 < int(expected.sum()) < k * len(PROMPTS)  # the rule cuts, and not everything
    assert len(set(expected.tolist())) > 1  # rows stop at different positions
    for b, n in enumerate(cut.lengths.tolist()):
        assert cut.tokens[b, :n].tolist() == full.tokens[b, :n].tolist()
        if temperature > 0:
            torch.testing.assert_close(cut.probs[b, :n], full.probs[b, :n])


@pytest.mark.parametrize("name", ["confidence", "survival"])
@pytest.mark.parametrize("bad", [-0.1, 1.0, 2])
def test_bad_thresholds_name_the_argument(name, bad):
    with pytest.raises(ValueError, match=name):
        ModelDrafter(draft_model(), **{name: bad})
