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


def test_greedy_rows_use_their_own_survival_stop():
    """greedy_survival cuts greedy rows where survival would cut them at that threshold, and
    leaves sampled rows to survival; in one batch both apply, row by row."""
    k, model = 6, draft_model()
    greedy, sampled = SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0)
    for config, expected_from in ((greedy, 0.3), (sampled, 0.6)):
        alone = propose(ModelDrafter(model, survival=expected_from), k, config)
        mixed = propose(ModelDrafter(model, survival=0.6, greedy_survival=0.3), k, config)
        assert mixed.lengths.tolist() == alone.lengths.tolist()
    assert ModelDrafter(model, survival=0.6).greedy_survival == 0.6  # None: the same stop
    assert ModelDrafter(model, greedy_survival=0.2).stops_itself

    # a batch of greedy and sampled rows: each row is cut by its own stop (a row draws from
    # its own generator, so its draft does not depend on its neighbours)
    def batch(drafter, configs):
        drafter.start(PROMPTS)
        rows = RowSampling(configs, [torch.Generator().manual_seed(b) for b in range(4)])
        return drafter.propose([list(p) for p in PROMPTS], torch.full((4,), k), rows).lengths

    mixed_configs = [greedy, sampled, greedy, sampled]
    both = batch(ModelDrafter(model, survival=0.6, greedy_survival=0.3), mixed_configs)
    as_greedy = batch(ModelDrafter(model, survival=0.3), [greedy] * 4)
    as_sampled = batch(ModelDrafter(model, survival=0.6), mixed_configs)
    assert [int(both[b]) for b in (0, 2)] == [int(as_greedy[b]) for b in (0, 2)]
    assert [int(both[b]) for b in (1, 3)] == [int(as_sampled[b]) for b in (1, 3)]
    assert any(int(both[b]) > int(as_sampled[b]) for b in (0, 2))  # greedy rows went further


@pytest.mark.parametrize("name", ["confidence", "survival", "greedy_survival"])
@pytest.mark.parametrize("bad", [-0.1, 1.0, 2])
def test_bad_thresholds_name_the_argument(name, bad):
    with pytest.raises(ValueError, match=name):
        ModelDrafter(draft_model(), **{name: bad})


def test_greedy_decoding_with_the_greedy_survival_stop_is_the_target_argmax_path():
    """Exactness at T = 0 is one sequence: the target's argmax path, whatever the drafter's
    stops (here the greedy survival stop lets rows draft further than the sampled one)."""
    from specsample.engine import generate

    target = ToyLM(VOCAB, seed=1, scale=1.5)
    draft = ToyLM(VOCAB, seed=2, base=target, noise=0.5)
    greedy = SamplingConfig(temperature=0.0)
    common = dict(sampling=greedy, max_new_tokens=12, eos_token_ids=())
    plain = generate(target, PROMPTS, generator=torch.Generator(), draft_length=0, **common)
    drafter = ModelDrafter(draft, survival=0.6, greedy_survival=0.05)
    out = generate(
        target, PROMPTS, generator=torch.Generator(), drafter=drafter, draft_length=4, **common
    )
    assert out.tokens == plain.tokens and out.stats.accepted > 0
