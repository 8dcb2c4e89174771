"""Behaviour of `generate`: greedy speculative output equals target-only greedy output token for
token (tiny random-weight transformers models and toy models), limits, EOS, streaming callback,
seeding, the global RNG, statistics and argument checks."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import tiny_causal_lm
from specsample.adapters.toy import ToyLM
from specsample.drafters.model import ModelDrafter
from specsample.drafters.ngram import NgramDrafter
from specsample.engine import ACCEPTED, BONUS, RECOVERED, generate
from specsample.engine.stats import DecodeStats
from specsample.warpers import SamplingConfig
from stats_identities import assert_stats_identities

GREEDY = SamplingConfig(temperature=0)
PROMPTS = [[5, 17, 3], [60, 2, 9, 9, 41, 7, 13], [1]]  # ragged, one of length 1
NEW_TOKENS = 24


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def toy_pair(vocab: int = 16, noise: float = 0.7) -> tuple[ToyLM, ToyLM]:
    target = ToyLM(vocab, seed=1, scale=1.5)
    return target, ToyLM(vocab, seed=2, base=target, noise=noise)


def toy_greedy(model: ToyLM, prompt: list[int], new_tokens: int, eos=()) -> list[int]:
    """Oracle: argmax of the exact logits, one token at a time, stopping after an EOS."""
    sequence = list(prompt)
    for _ in range(new_tokens):
        sequence.append(int(model.logits_for(sequence).argmax()))
        if sequence[-1] in eos:
            break
    return sequence[len(prompt) :]


DRAFTERS = ["model-k1", "model-k3", "model-k5", "ngram-k3"]


def make_drafter(name: str, draft) -> tuple[ModelDrafter | NgramDrafter, int]:
    """A drafter named in DRAFTERS ("model-k3": ModelDrafter over `draft`, k = 3) and its k."""
    kind, k = name.split("-k")
    return (ModelDrafter(draft) if kind == "model" else NgramDrafter()), int(k)


# ---------------------------------------------------------------- greedy identity (transformers)


@pytest.fixture(scope="module")
def hf_pair():
    """A 2-layer random-weight Qwen2 target and a 1-layer draft that shares its embeddings, first
    layer and head (so greedy agreement is moderate), both float32."""
    pytest.importorskip("transformers")

    def build(layers: int) -> torch.nn.Module:
        return tiny_causal_lm(
            seed=0, vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=layers
        )

    target, draft = build(2), build(1)
    draft.load_state_dict(target.state_dict(), strict=False)  # drops the target's layer 1
    return target, draft


@pytest.fixture(scope="module")
def hf_target_only_greedy(hf_pair) -> list[list[int]]:
    from specsample.adapters.hf import HFCausalLM

    out = generate(
        HFCausalLM(hf_pair[0]),
        PROMPTS,
        generator=seeded(),
        sampling=GREEDY,
        max_new_tokens=NEW_TOKENS,
    )
    return out.tokens


def test_target_only_greedy_matches_uncached_argmax_loop(hf_pair, hf_target_only_greedy):
    target = hf_pair[0]
    for prompt, tokens in zip(PROMPTS, hf_target_only_greedy, strict=True):
        sequence = list(prompt)
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                sequence.append(int(target(torch.tensor([sequence])).logits[0, -1].argmax()))
        assert tokens == sequence[len(prompt) :]


@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_speculative_equals_target_only_greedy_hf(name, hf_pair, hf_target_only_greedy):
    from specsample.adapters.hf import HFCausalLM

    drafter, k = make_drafter(name, HFCausalLM(hf_pair[1]))
    out = generate(
        HFCausalLM(hf_pair[0]),
        PROMPTS,
        generator=seeded(),
        drafter=drafter,
        sampling=GREEDY,
        max_new_tokens=NEW_TOKENS,
        draft_length=k,
    )
    assert out.tokens == hf_target_only_greedy
    assert out.stats.accepted > 0, "no draft was ever accepted: the test saw only rejections"
    assert out.stats.accepted < out.stats.drafted, "no draft was ever rejected"


# ---------------------------------------------------------------- greedy identity (toy models)


@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_speculative_equals_target_only_greedy_toy(name):
    target, draft = toy_pair()
    prompts = [[p % 16 for p in prompt] for prompt in PROMPTS]
    drafter, k = make_drafter(name, draft)
    out = generate(
        target,
        prompts,
        generator=seeded(),
        drafter=drafter,
        sampling=GREEDY,
        max_new_tokens=NEW_TOKENS,
        draft_length=k,
    )
    assert out.tokens == [toy_greedy(target, p, NEW_TOKENS) for p in prompts]
    assert 0 < out.stats.accepted < out.stats.drafted


# ---------------------------------------------------------------- limits and EOS


class RecordingDrafter:
    """Passes through to a drafter and records every call's sequences and max_lengths."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[list[int], list[int]]] = []

    @property
    def forward_passes(self) -> int:
        return self.inner.forward_passes

    fixed_depth = None

    def set_rows(self, sequences, keep, prompts):
        self.inner.set_rows(sequences, keep, prompts)

    def propose(self, sequences, max_lengths, sampling):
        self.calls.append(([len(s) for s in sequences], max_lengths.tolist()))
        return self.inner.propose(sequences, max_lengths, sampling)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig()], ids=["greedy", "sampled"])
def test_max_new_tokens_is_never_exceeded_and_drafts_stop_at_the_limit(max_new_tokens, sampling):
    target = ToyLM(8, seed=1)
    same = ToyLM(8, seed=2, base=target, noise=0.0)  # the target itself: every draft is kept
    prompts = [[1, 2], [3], [4, 5, 6, 7]]
    drafter = RecordingDrafter(ModelDrafter(same))
    out = generate(
        target,
        prompts,
        generator=seeded(),
        drafter=drafter,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        draft_length=4,
    )
    assert [len(t) for t in out.tokens] == [max_new_tokens] * len(prompts)
    for lengths, max_lengths in drafter.calls:
        for prompt, length, limit in zip(prompts, lengths, max_lengths, strict=True):
            remaining = max_new_tokens - (length - len(prompt))
            assert limit <= max(remaining - 1, 0)  # room for the recovered or bonus token
    if max_new_tokens == 1:
        assert out.stats.drafted == 0
    else:
        assert out.stats.accepted == out.stats.drafted > 0


def test_eos_ends_its_row_drops_later_tokens_of_the_step_and_other_rows_go_on():
    target = ToyLM(8, seed=11, scale=2.0)
    same = ToyLM(8, seed=12, base=target, noise=0.0)  # every draft kept: EOS lands mid-step
    prompts = [[1], [2, 3], [4, 5, 6], [7, 7], [0, 1, 2, 3], [6]]
    eos = (0,)
    steps: dict[int, list[tuple[list[int], list[str]]]] = {}
    out = generate(
        target,
        prompts,
        generator=seeded(),
        drafter=ModelDrafter(same),
        sampling=GREEDY,
        max_new_tokens=12,
        draft_length=4,
        eos_token_ids=eos,
        on_tokens=lambda row, tokens, kinds: steps.setdefault(row, []).append((tokens, kinds)),
    )
    expected = [toy_greedy(target, p, 12, eos) for p in prompts]
    assert out.tokens == expected
    assert out.finished_by_eos == [row[-1] in eos for row in expected]
    assert 0 < sum(out.finished_by_eos) < len(prompts)  # some rows end early, others go on
    # an EOS that was an accepted draft had more tokens after it in its step; they were dropped
    assert any(
        kinds[-1] == ACCEPTED and tokens[-1] in eos
        for row_steps in steps.values()
        for tokens, kinds in row_steps
    )


@pytest.mark.parametrize("k", [0, 3])
def test_sampled_rows_end_at_their_first_eos(k):
    target, draft = toy_pair(vocab=4)
    out = generate(
        target,
        [[1, 2, 3]] * 64,
        generator=seeded(3),
        drafter=ModelDrafter(draft),
        max_new_tokens=10,
        draft_length=k,
        eos_token_ids=[0],
    )
    for tokens, by_eos in zip(out.tokens, out.finished_by_eos, strict=True):
        assert 0 not in tokens[:-1]
        assert by_eos == (tokens[-1] == 0)
        assert by_eos or len(tokens) == 10
    assert 0 < sum(out.finished_by_eos) < 64


# ---------------------------------------------------------------- callback, seeding, RNG


@pytest.mark.parametrize("name", ["target-only", *DRAFTERS])
def test_on_tokens_streams_every_committed_token_in_order(name):
    target, draft = toy_pair(vocab=6)
    drafter, k = (None, 0) if name == "target-only" else make_drafter(name, draft)
    prompts = [[1, 2, 1, 2], [3], [0, 4, 5]] * 4
    streamed: list[list[int]] = [[] for _ in prompts]
    kinds_seen: list[str] = []

    def on_tokens(row: int, tokens: list[int], kinds: list[str]) -> None:
        assert tokens and len(kinds) == len(tokens)
        assert set(kinds[:-1]) <= {ACCEPTED}  # accepted drafts, then one recovered or bonus
        assert kinds[-1] in {ACCEPTED, RECOVERED, BONUS}
        streamed[row].extend(tokens)
        kinds_seen.extend(kinds)

    out = generate(
        target,
        prompts,
        generator=seeded(),
        drafter=drafter,
        max_new_tokens=15,
        draft_length=k,
        eos_token_ids=[0],
        on_tokens=on_tokens,
    )
    assert streamed == out.tokens
    if drafter is None:
        assert set(kinds_seen) == {BONUS}
    else:
        assert set(kinds_seen) == {ACCEPTED, RECOVERED, BONUS}
    # Every label is accounted for by the statistics: an accepted label per kept draft, and one
    # recovered label per rejection (minus those an EOS cut away: at most one per row).
    assert kinds_seen.count(ACCEPTED) <= out.stats.accepted
    rejections = out.stats.keep_tests - out.stats.accepted
    assert rejections - len(prompts) <= kinds_seen.count(RECOVERED) <= rejections
    assert len(kinds_seen) == sum(len(t) for t in out.tokens)


class TiedModel(ToyLM):
    """Every logit equal after every prefix: the argmax is a tie over the whole vocabulary."""

    def logits_for(self, prefix):
        return torch.zeros(self.vocab_size)


@pytest.mark.parametrize("name", ["target-only", *DRAFTERS])
def test_greedy_ties_go_to_the_lowest_id_through_the_loop(name):
    """Greedy decoding breaks ties by the lowest id, target-only and speculative alike (the
    comparison of the two cannot see a rule that breaks ties otherwise on both sides)."""
    target = TiedModel(8, seed=1)
    drafter, k = (None, 0) if name == "target-only" else make_drafter(name, TiedModel(8, seed=2))
    out = generate(
        target,
        [[3, 5], [7]],
        generator=seeded(),
        drafter=drafter,
        sampling=GREEDY,
        max_new_tokens=6,
        draft_length=k,
    )
    assert out.tokens == [[0] * 6, [0] * 6]


def sampled_run(seed: int, drafter_name: str = "model-k3"):
    target, draft = toy_pair(vocab=6)
    drafter, k = make_drafter(drafter_name, draft)
    return generate(
        target,
        [[1, 2, 1, 2], [3], [0, 4, 5]] * 3,
        generator=seeded(seed),
        drafter=drafter,
        sampling=SamplingConfig(temperature=0.9, top_p=0.95),
        max_new_tokens=16,
        draft_length=k,
    )


@pytest.mark.parametrize("name", DRAFTERS)
def test_same_seed_gives_same_output_and_another_seed_another(name):
    first = sampled_run(7, name).tokens
    assert sampled_run(7, name).tokens == first
    assert sampled_run(8, name).tokens != first


def test_generate_leaves_the_global_torch_rng_untouched():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    sampled_run(0)
    target, _ = toy_pair()
    generate(target, [[1, 2]], generator=seeded(), max_new_tokens=5)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("name", DRAFTERS)
def test_stats_are_consistent(name):
    out = sampled_run(0, name)
    stats = out.stats
    assert_stats_identities(stats)
    for request_stats in out.request_stats:
        assert_stats_identities(request_stats)
    # the engine's statistics are the sum of its requests'
    pooled = DecodeStats.pooled(out.request_stats)
    for field in ("row_steps", "drafted", "accepted", "keep_tests", "empty_steps", "new_tokens"):
        assert getattr(pooled, field) == getattr(stats, field), field
    assert pooled.drafted_by_position == stats.drafted_by_position
    assert pooled.accepted_by_position == stats.accepted_by_position
    assert 0 < stats.accepted <= stats.keep_tests <= stats.drafted
    assert stats.new_tokens == 9 * 16
    assert stats.tokens_per_pass == stats.new_tokens / stats.row_steps
    assert stats.tokens_per_pass > 1.0
    assert len(stats.acceptance_by_position) == len(stats.drafted_by_position)
    assert all(0.0 <= a <= 1.0 for a in stats.acceptance_by_position)
    assert stats.drafted_by_position[0] == stats.drafted_row_steps
    assert 0.0 <= stats.empty_share <= 1.0
    assert 0.0 < stats.alpha <= 1.0
    if name.startswith("model"):
        assert stats.draft_passes > 0 and stats.cost_ratio is not None
    else:
        assert stats.draft_passes == 0


@pytest.mark.parametrize("name", DRAFTERS)
def test_draft_length_histogram_counts_every_chain_row_step(name):
    stats = sampled_run(0, name).stats
    assert sum(stats.draft_lengths.values()) == stats.row_steps
    assert sum(k * n for k, n in stats.draft_lengths.items()) == stats.drafted


def test_predicted_speedup_averages_the_theory_over_draft_lengths():
    """Half the steps draft 0 tokens, half 4; alpha 0.5; c 0.25; every target pass (1 or 5
    tokens) costs the same. Expected tokens: (1 + (1 - 0.5^5) / 0.5) / 2 = 1.46875 per step;
    step cost: 2 draft passes per step times 0.25, plus 1: 1.5. Prediction 0.979; the theory at
    the mean k = 2 would say 1.75 / 1.5 = 1.17."""
    stats = DecodeStats(
        target_passes=10,
        row_steps=10,
        draft_passes=20,
        accepted=5,
        keep_tests=10,
        draft_seconds=5.0,
        target_seconds=10.0,
        target_single_pass_seconds=1.0,
        draft_lengths={0: 5, 4: 5},
    )
    assert stats.cost_ratio == pytest.approx(0.25)
    assert stats.predicted_speedup() == pytest.approx(1.46875 / 1.5)
    # No 1-token target pass timed: no honest prediction (the mean pass is not the 1-token one).
    stats.target_single_pass_seconds = None
    assert stats.predicted_speedup() is None


def test_target_only_stats_have_one_token_per_pass():
    target, _ = toy_pair()
    out = generate(target, [[1, 2], [3]], generator=seeded(), max_new_tokens=7)
    stats = out.stats
    assert stats.tokens_per_pass == 1.0
    # the first token of each row is drawn from its prompt pass's last distribution
    assert stats.target_passes == 6 and stats.row_steps == 14 and stats.new_tokens == 14
    assert stats.drafted == stats.accepted == stats.draft_passes == 0


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": -3}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 2.0}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": True}, ValueError, "max_new_tokens"),
        ({"generator": 0}, TypeError, "generator"),
        ({"generator": None}, TypeError, "generator"),
        ({"prompts": []}, ValueError, "prompts"),
        ({"prompts": [[]]}, ValueError, "prompts[0]"),
        ({"draft_length": "4"}, TypeError, "draft_length"),
        ({"draft_length": 2.5}, TypeError, "draft_length"),
        ({"draft_length": -1}, ValueError, "draft_length"),
    ],
    ids=lambda value: repr(value) if not isinstance(value, dict) else None,
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, argument):
    target, draft = toy_pair()
    call = {
        "prompts": [[1, 2]],
        "generator": seeded(),
        "drafter": ModelDrafter(draft),
        "max_new_tokens": 4,
        "draft_length": 2,
        **kwargs,
    }
    with pytest.raises(error, match=f"^{re.escape(argument)}: "):
        generate(target, call.pop("prompts"), **call)


# ---------------------------------------------------------------- trees


@pytest.mark.parametrize("branching", [(2, 1, 1), (2, 2), (3, 1)])
def test_greedy_tree_decoding_is_identical_to_target_only(branching):
    from specsample.drafters.tree import TreeDrafter, TreeShape

    target = ToyLM(16, seed=1, scale=2.0)
    draft = ToyLM(16, seed=2, base=target, noise=0.7)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    greedy = SamplingConfig(temperature=0)
    plain = generate(
        target, prompts, generator=torch.Generator(), sampling=greedy, max_new_tokens=12
    )
    tree = generate(
        target,
        prompts,
        generator=torch.Generator(),
        drafter=TreeDrafter(draft, TreeShape(branching)),
        sampling=greedy,
        max_new_tokens=12,
    )
    assert tree.tokens == plain.tokens
    assert tree.stats.target_passes < plain.stats.target_passes
    assert 0 < tree.stats.tree_steps <= tree.stats.target_passes


def test_tree_drafter_rejects_block_rule():
    from specsample.drafters.tree import TreeDrafter, TreeShape

    target = ToyLM(8, seed=1)
    with pytest.raises(ValueError, match="rule: .block. applies to one draft chain per row only"):
        generate(
            target,
            [[1]],
            generator=torch.Generator(),
            drafter=TreeDrafter(ToyLM(8, seed=2), TreeShape((2,))),
            rule="block",
        )


def test_tree_shape_parsing_and_errors():
    from specsample.drafters.tree import TreeShape

    assert TreeShape.parse("2x3").branching == (2, 2, 2)
    assert TreeShape.parse("4,2,1").branching == (4, 2, 1)
    assert TreeShape.chains(3, 4).branching == (3, 1, 1, 1)
    assert TreeShape((2, 2)).parents().tolist() == [-1, -1, 0, 0, 1, 1]
    assert TreeShape((2, 2)).num_nodes == 6
    with pytest.raises(ValueError, match="tree: expected WIDTHxDEPTH"):
        TreeShape.parse("wide")
    with pytest.raises(ValueError, match="branching: expected one or more integers >= 1"):
        TreeShape((2, 0))
    with pytest.raises(ValueError, match="at most 256 nodes"):
        TreeShape.parse("4x5")
