"""A verification rule per request: `Engine.add_request(rule=...)`. A batch whose rows ask for
different rules (coupled, token, block, auto) is verified group by group; with a fixed draft
length each row's text for a seed is exactly its text in a batch of its own rule, and a coupled
row's text equals target-only decoding with that seed (test_coupled.py's reference)."""

from __future__ import annotations

import pytest
import torch
from test_coupled import CONFIGS, NEW_TOKENS, PROMPTS, SEEDS, pair, reference_text

from specsample import Engine
from specsample.drafters.model import ModelDrafter
from specsample.drafters.ngram import NgramDrafter
from specsample.drafters.tree import TreeDrafter, TreeShape
from specsample.rules.coupled import gumbel_noise
from specsample.warpers import RowSampling, SamplingConfig
from stats_identities import assert_stats_identities

# Row i asks for RULES[i]; every rule appears at least once, coupled rows next to the others.
RULES = ["coupled", "token", "block", "coupled", "auto", "token"]
EOS = (5,)

DRAFTERS = {
    "model-k3": (lambda d: ModelDrafter(d), 3, RULES),
    "model-k5-confidence": (lambda d: ModelDrafter(d, confidence=0.3), 5, RULES),
    "ngram-k3": (lambda d: NgramDrafter(max_ngram=2), 3, RULES),
    # trees are verified node by node: "block" does not apply to them
    "tree-2x2x2": (
        lambda d: TreeDrafter(d, TreeShape((2, 2, 2))),
        "auto",
        ["coupled", "token", "auto", "coupled", "token", "auto"],
    ),
    "tree-3,1-iid": (
        lambda d: TreeDrafter(d, TreeShape((3, 1)), children="iid"),
        "auto",
        ["token", "coupled", "token", "coupled", "auto", "coupled"],
    ),
}


def run(engine: Engine, rules, *, order=None, join_after: int | None = None):
    """Every request of PROMPTS/CONFIGS/SEEDS with rules[i] (None: the engine's), added in
    `order` (default 0..5); with join_after, the second half joins after that many steps.
    Returns the new tokens of request i, and the engine's outputs' final stats by i."""
    order = list(range(len(PROMPTS))) if order is None else order
    first = order if join_after is None else order[: len(order) // 2]
    later = [] if join_after is None else order[len(order) // 2 :]
    ids: dict[int, int] = {}

    def add(i: int) -> None:
        ids[
            engine.add_request(
                PROMPTS[i],
                sampling=CONFIGS[i],
                seed=SEEDS[i],
                max_new_tokens=NEW_TOKENS,
                eos_token_ids=EOS,
                rule=rules[i],
            )
        ] = i

    for i in first:
        add(i)
    texts: dict[int, list[int]] = {i: [] for i in order}
    stats = {}
    step = 0
    while engine.has_unfinished() or later:
        for output in engine.step():
            texts[ids[output.request_id]].extend(output.tokens)
            if output.finished:
                stats[ids[output.request_id]] = output.stats
        step += 1
        if later and step >= join_after:
            for i in later:
                add(i)
            later = []
    return [texts.get(i, []) for i in range(len(PROMPTS))], stats


def alone_texts(make, length, rules) -> list[list[int]]:
    """Each request alone in an engine whose own rule is the request's."""
    target, draft = pair()
    texts = []
    for i, rule in enumerate(rules):
        engine = Engine(target, make(draft), rule=rule, draft_length=length)
        only = [None] * len(rules)
        text, _ = run(engine, only, order=[i])
        texts.append(text[i])
    return texts


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_each_row_of_a_mixed_batch_gives_its_text_alone(name):
    make, length, rules = DRAFTERS[name]
    target, draft = pair()
    alone = alone_texts(make, length, rules)
    engine = Engine(target, make(draft), rule="token", draft_length=length)
    mixed, stats = run(engine, rules)
    assert mixed == alone
    for i, rule in enumerate(rules):
        if rule == "coupled":  # the target-only text of the seed, from the definition
            assert mixed[i] == reference_text(target, PROMPTS[i], CONFIGS[i], SEEDS[i], EOS)
    assert engine.stats.accepted > 0
    # the steps that mixed rules count once under "a+b"; each request under its own rule
    assert any("+" in key for key in engine.stats.rules_used)
    for key in engine.stats.rules_used:  # "a+b": the rules' own names, sorted, each once
        parts = key.split("+")
        assert parts == sorted(set(parts))
        assert set(parts) <= {"block", "token", "tree", "greedy", "coupled"}
    assert_stats_identities(engine.stats)
    for i, rule in enumerate(rules):
        assert_stats_identities(stats[i])
        used = set(stats[i].rules_used)
        assert "+" not in "".join(used)
        if rule == "coupled":
            assert used == {"coupled"}
        else:
            assert "coupled" not in used


def test_mixed_batch_text_does_not_depend_on_order_or_arrival():
    make, length, rules = DRAFTERS["model-k3"]
    alone = alone_texts(make, length, rules)
    target, draft = pair()

    def engine(max_batch: int = 64) -> Engine:
        return Engine(target, make(draft), rule="auto", draft_length=length, max_batch=max_batch)

    assert run(engine(), rules, order=[5, 4, 3, 2, 1, 0])[0] == alone
    assert run(engine(max_batch=2), rules)[0] == alone
    assert run(engine(), rules, join_after=2)[0] == alone


def test_request_rule_overrides_the_engines_and_none_keeps_it():
    """An engine built with rule="coupled": requests with no rule are coupled (the target-only
    text); requests naming "token" are not (another text, the negative control for the equality
    above: the two rules do give different text for the same seeds)."""
    target, draft = pair()
    coupled = [
        reference_text(target, p, c, s, EOS)
        for p, c, s in zip(PROMPTS, CONFIGS, SEEDS, strict=True)
    ]
    engine = Engine(target, ModelDrafter(draft), rule="coupled", draft_length=3)
    default, _ = run(engine, [None] * len(PROMPTS))
    assert default == coupled
    engine = Engine(target, ModelDrafter(draft), rule="coupled", draft_length=3)
    token, _ = run(engine, ["token"] * len(PROMPTS))
    assert token != coupled
    assert token == alone_texts(lambda d: ModelDrafter(d), 3, ["token"] * len(PROMPTS))


def test_target_only_engine_takes_a_rule_per_request():
    target, _ = pair()
    engine = Engine(target, None)
    rules = ["coupled", "token"] * 3
    texts, _ = run(engine, rules)
    for i, rule in enumerate(rules):
        if rule == "coupled":
            assert texts[i] == reference_text(target, PROMPTS[i], CONFIGS[i], SEEDS[i], EOS)
    alone, _ = run(Engine(target, None, rule="token"), [None] * 6, order=[1])
    assert texts[1] == alone[1]


def test_bad_request_rules_are_refused_naming_the_field():
    target, draft = pair()
    engine = Engine(target, ModelDrafter(draft), draft_length=2)
    with pytest.raises(ValueError, match=r"rule: expected one of \['auto', 'block', 'coupled'"):
        engine.add_request([1, 2], rule="nope")
    with pytest.raises(TypeError, match="rule: expected None or a rule name"):
        engine.add_request([1, 2], rule=3)
    trees = Engine(target, TreeDrafter(draft, TreeShape((2, 2))))
    with pytest.raises(ValueError, match="rule: 'block' applies to one draft chain per row"):
        trees.add_request([1, 2], rule="block")
    assert engine.num_waiting() == 0 and trees.num_waiting() == 0


def test_row_sampling_noise_only_for_coupled_rows_and_select_keeps_it():
    seeds, positions = [3, 4, 2**64 - 1], [5, 0, 2]
    sampling = RowSampling(
        [SamplingConfig()] * 3,
        [torch.Generator().manual_seed(b) for b in range(3)],
        coupled=[True, False, True],
        seeds=seeds,
        positions=positions,
    )
    assert sampling.coupled and not sampling.all_coupled
    noise = sampling.gumbel(2, 9)
    expected = gumbel_noise([3, 2**64 - 1], torch.tensor([[5, 6], [2, 3]]), 9)
    assert torch.equal(noise[[0, 2]], expected)
    assert torch.equal(noise[1], torch.zeros(2, 9, dtype=torch.float64))
    picked = sampling.select([2, 0])
    assert picked.all_coupled and picked.seeds == [2**64 - 1, 3]
    assert torch.equal(picked.gumbel(3, 9)[:, :2], expected[[1, 0]])
    assert picked.generators[1] is sampling.generators[0]
    assert not sampling.select([1]).coupled
    with pytest.raises(ValueError, match="coupled: expected a bool or one per row"):
        RowSampling([SamplingConfig()], [torch.Generator()], coupled=[True, False])
