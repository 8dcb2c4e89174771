"""`add_request(top_logprobs=N)`: every emitted token comes with the target's N most likely ids at
its position and their log-probabilities, from the raw logits (the same log-softmax as
RequestOutput.logprobs: before temperature and truncation), most likely first; checked against
ToyLM's known distributions token by token, under speculation, in a batch with rows that ask for
none."""

from __future__ import annotations

import pytest
import torch

from specsample import Engine, SamplingConfig
from specsample.adapters.toy import ToyLM
from specsample.drafters.model import ModelDrafter
from specsample.drafters.tree import TreeDrafter, TreeShape

VOCAB = 10


def pair() -> tuple[ToyLM, ToyLM]:
    target = ToyLM(VOCAB, seed=41, scale=2.0)
    return target, ToyLM(VOCAB, seed=42, base=target, noise=0.7)


def run(engine: Engine, requests: list[dict]) -> list[dict]:
    """Each request's tokens, logprobs and top_logprobs over all its outputs."""
    ids = [engine.add_request(**request) for request in requests]
    got = {i: {"tokens": [], "logprobs": [], "top": [], "none": True} for i in ids}
    while engine.has_unfinished():
        for output in engine.step():
            entry = got[output.request_id]
            entry["tokens"] += output.tokens
            entry["logprobs"] += output.logprobs
            if output.top_logprobs is not None:
                entry["none"] = False
                assert len(output.top_logprobs) == len(output.tokens)
                entry["top"] += output.top_logprobs
    return [got[i] for i in ids]


def expected_top(target: ToyLM, prefix: list[int], n: int) -> list[tuple[int, float]]:
    log_probs = torch.log_softmax(target.logits_for(prefix).float(), dim=-1).tolist()
    order = sorted(range(VOCAB), key=lambda i: (-log_probs[i], i))
    return [(i, log_probs[i]) for i in order[:n]]


def check(target: ToyLM, prompt: list[int], result: dict, n: int) -> None:
    for i, token in enumerate(result["tokens"]):
        prefix = prompt + result["tokens"][:i]
        top = result["top"][i]
        expected = expected_top(target, prefix, n)
        assert [t for t, _ in top] == [t for t, _ in expected]
        assert [v for _, v in top] == pytest.approx([v for _, v in expected], abs=1e-6)
        raw = torch.log_softmax(target.logits_for(prefix).float(), dim=-1)
        assert result["logprobs"][i] == pytest.approx(float(raw[token]), abs=1e-6)
        if token in [t for t, _ in top]:  # the sampled token's entry is its logprob
            assert dict(top)[token] == pytest.approx(result["logprobs"][i], abs=1e-7)


@pytest.mark.parametrize(
    "make",
    [
        lambda d: (ModelDrafter(d), 3),
        lambda d: (TreeDrafter(d, TreeShape((2, 2))), "auto"),
        lambda d: (None, "auto"),
    ],
    ids=["model-k3", "tree-2x2", "target-only"],
)
def test_top_logprobs_are_the_targets_raw_distribution_at_each_position(make):
    target, draft = pair()
    drafter, length = make(draft)
    engine = Engine(target, drafter, draft_length=length)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 7, 7]]
    samplings = [
        SamplingConfig(),
        SamplingConfig(temperature=0.5, top_k=2),  # warping changes the draws, not the report
        SamplingConfig(temperature=0),
        SamplingConfig(temperature=1.3, top_p=0.8),
    ]
    tops = [5, VOCAB, 0, 1]
    requests = [
        dict(prompt_tokens=p, sampling=s, seed=i, max_new_tokens=12, top_logprobs=n)
        for i, (p, s, n) in enumerate(zip(prompts, samplings, tops, strict=True))
    ]
    results = run(engine, requests)
    for prompt, result, n in zip(prompts, results, tops, strict=True):
        assert len(result["tokens"]) == 12
        if n == 0:
            assert result["none"] and result["top"] == []
            continue
        check(target, prompt, result, n)
    # the top_k=2 row samples from its 2 most likely ids, and its report is still the raw
    # distribution over the whole vocabulary (which gives the other ids mass)
    for i, token in enumerate(results[1]["tokens"]):
        top = results[1]["top"][i]
        assert len(top) == VOCAB and token in (top[0][0], top[1][0])
        assert sum(torch.tensor([v for _, v in top]).exp().tolist()) == pytest.approx(1, abs=1e-5)
        assert top[2][1] > -30
    if drafter is not None:
        assert engine.stats.accepted > 0


def test_asking_for_top_logprobs_changes_nothing_else():
    target, draft = pair()
    request = dict(prompt_tokens=[3, 1], seed=5, max_new_tokens=16)
    plain = run(Engine(target, ModelDrafter(draft), draft_length=2), [request])[0]
    asked = run(
        Engine(target, ModelDrafter(draft), draft_length=2), [{**request, "top_logprobs": 3}]
    )
    assert asked[0]["tokens"] == plain["tokens"] and asked[0]["logprobs"] == plain["logprobs"]


@pytest.mark.parametrize("bad", [-1, VOCAB + 1, 2.0, True, "3"])
def test_bad_top_logprobs_are_refused_naming_the_argument(bad):
    target, _ = pair()
    with pytest.raises(ValueError, match=r"top_logprobs: expected an integer in \[0, 10\]"):
        Engine(target).add_request([1], top_logprobs=bad)


def test_an_engine_without_logprobs_emits_the_same_tokens_and_reports_none():
    """logprobs=False (what generate() makes: its Generation holds none) skips the per-token
    log-sum-exp; the tokens are the same, RequestOutput.logprobs is None (aborts too), and a
    request cannot ask for top_logprobs."""
    target, draft = pair()
    request = dict(prompt_tokens=[3, 1], seed=5, max_new_tokens=16, eos_token_ids=())
    plain = run(Engine(target, ModelDrafter(draft), draft_length=2), [request])[0]
    engine = Engine(target, ModelDrafter(draft), draft_length=2, logprobs=False)
    engine.add_request(**request)
    aborted = engine.add_request([4, 2], max_new_tokens=8, seed=1)
    engine.abort(aborted)
    tokens, outputs = [], []
    while engine.has_unfinished():
        outputs += engine.step()
    tokens = [t for o in outputs if o.request_id != aborted for t in o.tokens]
    assert tokens == plain["tokens"] and all(o.logprobs is None for o in outputs)
    assert any(o.request_id == aborted and o.finish_reason == "abort" for o in outputs)
    with pytest.raises(ValueError, match="top_logprobs: expected 0 from an Engine made with"):
        engine.add_request([1], top_logprobs=2)
    with pytest.raises(ValueError, match="logprobs: expected True or False, got 'no'"):
        Engine(target, logprobs="no")
