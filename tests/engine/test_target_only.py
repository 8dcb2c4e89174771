"""The engine's step without drafts (target-only decoding, or a batch the draft-length policy
left without drafts) draws its token straight from the warped target, without the rules'
residual machinery. It must be the same draw the rules make: the same token for the same
uniform (so a row's text does not depend on whether its batch neighbours drafted), and
distributed as the target.

Statistical tests: the first DEPTH new tokens of ROWS = 4000 rows G-tested against the exact
target law (test_exactness.py's helpers), failing below ALPHA = 1e-6, the false-failure rate of
an exact sampler; the negative control (a sampler of the squared weights) fails the same test.
"""

from __future__ import annotations

import pytest
import torch
from test_exactness import (
    ALPHA,
    PROMPT,
    SHORT_PROMPT,
    exactness_p_value,
)

from specsample.engine import engine as engine_module
from specsample.engine.engine import Engine
from specsample.rules.draft import Draft
from specsample.rules.registry import EXACT, verify_draft
from specsample.rules.sampling import sample_from_weights
from specsample.warpers import RowSampling, SamplingConfig

CONFIGS = [
    SamplingConfig(),
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=0.7, top_k=2),
    SamplingConfig(temperature=1.3, top_p=0.8),
    SamplingConfig(temperature=1.0, min_p=0.3),
    SamplingConfig(temperature=0),
]


def _rules_draw(rule, logits, configs, seeds):
    """The token the rules draw for an empty draft (verify_draft, as the engine did before its
    shortcut), and the generators after it."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    sampling = RowSampling(configs, generators)
    draft = Draft.empty(len(configs))
    target_probs = sampling.warp(logits)
    accept = sampling.uniforms(draft.used_uniforms())
    sample = sampling.uniforms([1] * draft.batch)[:, 0]
    result = verify_draft(rule, draft, None, target_probs, accept, sample)
    return result.tokens[:, 0], [g.get_state() for g in generators]


def _engine_draw(rule, logits, configs, seeds):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    sampling = RowSampling(configs, generators)
    engine = object.__new__(Engine)  # _verify_group reads no engine state
    result = engine._verify_group(Draft.empty(len(configs)), logits, sampling, rule)
    assert result.num_accepted.tolist() == [0] * len(configs)
    assert result.path.shape == (len(configs), 0)
    assert result.rule_used == "token"
    return result.tokens[:, 0], [g.get_state() for g in generators]


@pytest.mark.parametrize("vocab", [3, 1024, 1500, 151_936])
@pytest.mark.parametrize("rule", ["auto", "token", "block"])
def test_a_step_without_drafts_draws_the_token_the_rules_draw(vocab, rule):
    """Mixed configs in one batch (greedy rows among sampled ones draw a uniform too), vocab
    sizes below, at and across the sampler's 1024-id blocks, many seeds: the same tokens and
    the same generator states as verify_draft."""
    batch = len(CONFIGS)
    draws = 0
    for trial in range(40 if vocab < 100_000 else 4):
        torch.manual_seed(trial)
        logits = torch.randn(batch, 1, vocab) * (1 + trial % 4)
        seeds = [trial * 100 + b for b in range(batch)]
        mine, mine_states = _engine_draw(EXACT[rule], logits, CONFIGS, seeds)
        theirs, their_states = _rules_draw(EXACT[rule], logits, CONFIGS, seeds)
        assert mine.tolist() == theirs.tolist()
        for a, b in zip(mine_states, their_states, strict=True):
            assert torch.equal(a, b)
        draws += batch
    assert draws >= 24


@pytest.mark.parametrize(
    "sampling",
    [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=2), SamplingConfig(top_p=0.8)],
    ids=["t1", "t0.7-top-k-2", "top-p-0.8"],
)
def test_target_only_decoding_follows_the_target(sampling):
    p = exactness_p_value(None, prompts=(PROMPT, SHORT_PROMPT), sampling=sampling)
    assert p > ALPHA


def test_target_only_negative_control_a_wrong_sampler_fails_the_same_test(monkeypatch):
    def squared(weights, uniforms):
        return sample_from_weights(weights * weights, uniforms)

    monkeypatch.setattr(engine_module, "sample_from_weights", squared)
    assert exactness_p_value(None, prompts=(PROMPT, SHORT_PROMPT)) < ALPHA


def test_a_step_without_drafts_records_nothing_drafted_or_kept():
    """The bookkeeping of a step without drafts takes a shortcut (no tensors); it must say what
    the general path says: nothing kept, nothing tested, depth 0, no nodes, a chain step, and a
    bonus token (the root has no children) in every row."""
    draft = Draft.empty(3)
    result = engine_module._one_token_result(torch.tensor([[5], [6], [7]]), "token")
    recovered = engine_module._last_node_has_children(draft, result)
    assert recovered.dtype == torch.bool and recovered.tolist() == [False] * 3
    assert recovered.tolist() == draft.has_children()[:, 0].tolist()
    rows = engine_module._StepRows.of(draft, result, recovered, ["token"] * 3)
    assert rows.accepted == rows.tested_depth == rows.depths == rows.nodes == [0, 0, 0]
    assert rows.tree is False and rows.rules_used == ["token"] * 3
    assert engine_module._step_kinds(result, recovered) == [["bonus"]] * 3


def test_empty_drafts_of_one_batch_size_share_tensors_without_elements():
    draft = Draft.empty(2)
    assert Draft.empty(2) is draft and Draft.empty(3) is not draft
    assert draft.tokens.shape == (2, 0) and draft.valid.shape == (2, 0)
    assert draft.parents.shape == (0,) and draft.probs is None
    assert draft.tokens.numel() == draft.valid.numel() == draft.parents.numel() == 0
    assert draft.is_chain and draft.num_nodes == 0 and draft.depths().tolist() == [0, 0]


def test_a_drafts_fields_cannot_be_assigned():
    """Draft.empty hands out one draft per batch size (above), so a draft's fields cannot be
    assigned: a change would reach every later step of that size."""
    import dataclasses

    first = Draft.empty(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.tokens = torch.zeros(2, 1, dtype=torch.int64)
    wider = dataclasses.replace(first, probs=torch.zeros(2, 0, 4))
    assert wider is not first and first.probs is None
