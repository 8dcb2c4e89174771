"""The coupled rule end to end: with rule="coupled" the Engine's text for a seed equals target-only
decoding with that seed token for token, whatever the drafter, draft length, batch or arrival
time; the law of the text is the target's; drafts are kept as often as the Gumbel coupling says.

Statistical tests fail at p < ALPHA = 1e-6 (their false-failure rate) or outside 5.3 standard
errors (two-sided normal tail 1.2e-7); each has a negative control that fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_exactness import (
    ALPHA,
    DEPTH,
    PROMPT,
    SHORT_PROMPT,
    outcome_test,
    p_value,
    target_outcomes,
    toy_pair,
)

import specsample.engine.engine as engine_module
from specsample import Engine, SamplingConfig
from specsample.adapters.toy import ToyLM
from specsample.drafters.model import ModelDrafter
from specsample.drafters.ngram import NgramDrafter
from specsample.drafters.tree import TreeDrafter, TreeShape
from specsample.engine.length import FixedDraftLength
from specsample.rules.coupled import coupled_keep_bound, coupled_keep_probability, gumbel_noise
from specsample.warpers import RowSampling, logits_to_probs

VOCAB = 12
NEW_TOKENS = 24
# Temperatures 0.3-1.5 with each warper, all of them at once, and greedy.
CONFIGS = [
    SamplingConfig(temperature=0.3),
    SamplingConfig(temperature=0.7, top_k=4),
    SamplingConfig(temperature=1.0, top_p=0.8),
    SamplingConfig(temperature=1.5, min_p=0.1),
    SamplingConfig(temperature=1.2, top_k=6, top_p=0.9, min_p=0.05),
    SamplingConfig(temperature=0),
]
PROMPTS = [[1, 2, 3, 1, 2, 3, 1], [4, 5], [6, 7, 8, 9, 6, 7], [10], [3, 3, 3, 3], [11, 0, 11]]
SEEDS = [0, 7, 2**64 - 1, 12345, 2**63, 99]


def pair(vocab: int = VOCAB) -> tuple[ToyLM, ToyLM]:
    target = ToyLM(vocab, seed=21, scale=2.0)
    return target, ToyLM(vocab, seed=22, base=target, noise=0.8)


def run(engine: Engine, requests, *, join_after: dict[int, list] | None = None) -> list[list[int]]:
    """Runs `requests` ((prompt, sampling, seed, eos) tuples) to the end; join_after[s] lists
    more requests added after step s. Returns every request's new tokens, in order added."""
    ids = [_add(engine, r) for r in requests]
    out: dict[int, list[int]] = {}
    step = 0
    while engine.has_unfinished() or (join_after and step <= max(join_after)):
        for output in engine.step():
            out.setdefault(output.request_id, []).extend(output.tokens)
        step += 1
        ids += [_add(engine, r) for r in (join_after or {}).get(step, [])]
    return [out.get(i, []) for i in ids]


def _add(engine: Engine, request) -> int:
    prompt, sampling, seed, eos = request
    return engine.add_request(
        prompt, sampling=sampling, seed=seed, max_new_tokens=NEW_TOKENS, eos_token_ids=eos
    )


def requests(eos: tuple[int, ...] = ()) -> list[tuple]:
    return [(p, c, s, eos) for p, c, s in zip(PROMPTS, CONFIGS, SEEDS, strict=True)]


def reference_text(target: ToyLM, prompt, sampling, seed, eos) -> list[int]:
    """Target-only coupled sampling straight from the definition: token t is
    argmax(log p_t + g(seed, t)) with p_t the warped target after prompt + tokens before t."""
    tokens: list[int] = []
    noise = gumbel_noise([seed], torch.arange(NEW_TOKENS)[None, :], target.vocab_size)[0]
    for t in range(NEW_TOKENS):
        p = logits_to_probs(target.logits_for(prompt + tokens), sampling)
        token = int((torch.log(p.double()) + noise[t]).argmax())
        tokens.append(token)
        if token in eos:
            break
    return tokens


def target_only(target: ToyLM, reqs) -> list[list[int]]:
    return run(Engine(target, None, rule="coupled"), reqs)


def test_target_only_coupled_decoding_equals_the_definition():
    target, _ = pair()
    reqs = requests(eos=(5,))
    expected = [reference_text(target, *r) for r in reqs]
    assert target_only(target, reqs) == expected
    assert any(len(t) < NEW_TOKENS for t in expected)  # an EOS ended a request early


class VaryingLength(FixedDraftLength):
    """Draft lengths 0..5 that differ between the rows of a step and between steps."""

    def __init__(self):
        super().__init__(0)
        self.calls = 0

    def next_lengths(self, rows):
        self.calls += 1
        return torch.tensor([(hash(r) + self.calls) % 6 for r in rows], dtype=torch.int64)


DRAFTERS = {
    "model-k1": lambda d: (ModelDrafter(d), 1),
    "model-k4": lambda d: (ModelDrafter(d), 4),
    "model-k7-confidence": lambda d: (ModelDrafter(d, confidence=0.5), 7),
    "model-adaptive": lambda d: (ModelDrafter(d), "auto"),
    "model-varying-lengths": lambda d: (ModelDrafter(d), VaryingLength()),
    "ngram-k3": lambda d: (NgramDrafter(max_ngram=2), 3),
    "tree-2x3": lambda d: (TreeDrafter(d, TreeShape((2, 2, 2))), "auto"),
    "chains-3x3": lambda d: (TreeDrafter(d, TreeShape.chains(3, 3)), "auto"),
    "tree-4,1-iid": lambda d: (TreeDrafter(d, TreeShape((4, 1)), children="iid"), "auto"),
}


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_speculative_text_equals_target_only_text_token_for_token(name):
    target, draft = pair()
    drafter, length = DRAFTERS[name](draft)
    reqs = requests(eos=(5,))
    engine = Engine(target, drafter, rule="coupled", draft_length=length)
    assert run(engine, reqs) == target_only(target, reqs)
    assert engine.stats.accepted > 0  # drafts were kept: speculation did something
    assert set(engine.stats.rules_used) <= {"coupled"}


@pytest.mark.parametrize("name", ["model-k4", "tree-2x3", "ngram-k3"])
def test_text_does_not_depend_on_batch_composition_or_arrival_time(name):
    """The same requests alone, in reverse order, through a batch of two with a queue, and
    joining the running batch after steps 2 and 5: the text of each seed is the same."""
    target, draft = pair()
    reqs = requests()
    alone = [target_only(target, [r])[0] for r in reqs]

    def engine(max_batch: int = 64) -> Engine:
        drafter, length = DRAFTERS[name](draft)
        return Engine(target, drafter, rule="coupled", draft_length=length, max_batch=max_batch)

    assert run(engine(), reqs) == alone
    assert run(engine(), reqs[::-1]) == alone[::-1]
    assert run(engine(max_batch=2), reqs) == alone
    joining = run(engine(), reqs[:2], join_after={2: reqs[2:4], 5: reqs[4:]})
    assert joining == alone


def test_token_rule_text_differs_from_target_only_text():
    """Negative control for the equality tests: with the p/q token rule the same seeds give
    other text (the same law, another coupling), so equality is not automatic."""
    target, draft = pair()
    reqs = requests()
    base = run(Engine(target, None, rule="token"), reqs)
    speculative = run(Engine(target, ModelDrafter(draft), rule="token", draft_length=4), reqs)
    assert speculative != base


# ---------------------------------------------------------------- the law of the text

ROWS = 4000


def law_p_value(target, drafter, *, draft_length=2, prompts=(PROMPT, SHORT_PROMPT)) -> float:
    """ROWS requests (seeds 0..ROWS-1, prompts alternating), DEPTH new tokens each, in one
    batch; each prompt's rows G-tested against the exact joint law of their first DEPTH tokens
    (test_exactness's helpers: cells with expected count < 5 pooled); one combined p-value.
    Power as in test_exactness.py: a bias of KL 0.0125 nats is caught 99.6 % of the time."""
    sampling = SamplingConfig(temperature=0.9, top_p=0.95)
    engine = Engine(target, drafter, rule="coupled", draft_length=draft_length, max_batch=ROWS)
    reqs = [(prompts[i % len(prompts)], sampling, i, ()) for i in range(ROWS)]
    rows = _run_depth(engine, reqs)
    tests = []
    for g, prompt in enumerate(prompts):
        expected = target_outcomes(target, prompt, sampling, ())
        tests.append(outcome_test(rows[g :: len(prompts)], expected))
    return p_value(*tests)


def _run_depth(engine: Engine, reqs) -> list[list[int]]:
    ids = [engine.add_request(p, sampling=c, seed=s, max_new_tokens=DEPTH) for p, c, s, _ in reqs]
    out: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            out.setdefault(output.request_id, []).extend(output.tokens)
    return [out[i] for i in ids]


def test_coupled_text_follows_the_target_law():
    target, draft = toy_pair()
    assert law_p_value(target, ModelDrafter(draft)) > ALPHA


class StepKeyedSampling(RowSampling):
    """A wrong key: the noise of a token is keyed by its depth within the step (as if by a
    per-step counter), not by its position among the request's new tokens."""

    def __init__(self, *args, **kwargs):
        kwargs["positions"] = [0] * len(kwargs["positions"])
        super().__init__(*args, **kwargs)


def test_law_test_fails_noise_keyed_by_the_step_instead_of_the_position(monkeypatch):
    """Negative control: every step reuses the first position's noise; the joint law breaks."""
    monkeypatch.setattr(engine_module, "RowSampling", StepKeyedSampling)
    target, draft = toy_pair()
    assert law_p_value(target, ModelDrafter(draft)) < ALPHA


# ---------------------------------------------------------------- the keep rate


class IndependentNoiseDrafter(ModelDrafter):
    """Negative control: drafts with noise of another seed (an independent draw from q)."""

    def propose(self, sequences, max_lengths, sampling):
        shifted = RowSampling(
            sampling.configs,
            sampling.generators,
            coupled=True,
            seeds=[(s + 1) % 2**64 for s in sampling.seeds],
            positions=sampling.positions,
        )
        return super().propose(sequences, max_lengths, shifted)


def keep_statistics(drafter_class) -> tuple[int, float, float, float]:
    """200 requests of 20 tokens with one draft per step (k = 1) on a vocab-8 pair at T = 1:
    (kept drafts, their expected number sum_t P(keep at t), the variance of the kept count,
    sum_t (1 - TV_t) / (1 + TV_t)), the sums over every tested position t from its exact p, q."""
    target = ToyLM(8, seed=31, scale=1.5)
    draft = ToyLM(8, seed=32, base=target, noise=1.0)
    sampling = SamplingConfig(temperature=1.0)
    engine = Engine(target, drafter_class(draft), rule="coupled", draft_length=1)
    prompts = {}
    for i in range(200):
        prompt = [i % 8, (3 * i) % 8]
        prompts[engine.add_request(prompt, sampling=sampling, seed=i, max_new_tokens=20)] = prompt
    sequences = {rid: list(prompt) for rid, prompt in prompts.items()}
    kept, expected, variance, bound = 0, 0.0, 0.0, 0.0
    while engine.has_unfinished():
        before = {rid: list(seq) for rid, seq in sequences.items()}
        for output in engine.step():
            rid = output.request_id
            seq = before[rid]
            if len(seq) - len(prompts[rid]) <= 18 and output.tokens:  # a draft was tested
                p = logits_to_probs(target.logits_for(seq).double(), sampling)
                q = logits_to_probs(draft.logits_for(seq).double(), sampling)
                chance = float(coupled_keep_probability(p, q))
                kept += output.kinds[0] == "accepted"
                expected += chance
                variance += chance * (1 - chance)
                bound += float(coupled_keep_bound(p, q))
            sequences[rid].extend(output.tokens)
    return kept, expected, variance, bound


def test_measured_keep_rate_matches_the_coupling_and_beats_the_bound():
    """3 800 tested positions. The kept count is within 5.3 standard deviations of its exact
    expectation (a sum of independent-given-the-past Bernoulli trials), and that expectation is
    at least the (1 - TV) / (1 + TV) bound summed over the same positions; so the measured rate
    is above the bound up to the same margin."""
    kept, expected, variance, bound = keep_statistics(ModelDrafter)
    margin = 5.3 * math.sqrt(variance)
    assert abs(kept - expected) < margin
    assert expected >= bound
    assert kept >= bound - margin


def test_keep_rate_check_fails_a_drafter_with_independent_noise():
    kept, expected, variance, _ = keep_statistics(IndependentNoiseDrafter)
    assert abs(kept - expected) > 5.3 * math.sqrt(variance)
