"""The coupled rule's parts (rules/coupled.py): the counter-based noise, Gumbel-max sampling, the
tree walk and the keep probability.

Statistical tests fail at p < ALPHA = 1e-6 (the false-failure rate of each); each has a negative
control that a wrong implementation fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import g_test_p_value, random_distribution
from specsample.rules.coupled import (
    GOLDEN,
    coupled_keep_bound,
    coupled_keep_probability,
    coupled_rule,
    coupled_sample,
    coupled_top,
    gumbel_noise,
    uniform_noise,
)
from specsample.rules.draft import Draft
from specsample.rules.registry import lookup, verify_coupled, verify_draft
from specsample.rules.tree import tree_parents
from specsample.warpers import RowSampling, SamplingConfig

ALPHA = 1e-6
MASK = (1 << 64) - 1


# ---------------------------------------------------------------- the noise


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def reference_uniform(seed: int, position: int, token: int) -> float:
    """The noise's definition as a plain Python loop over 64-bit words (the oracle)."""
    stream = _mix((seed + GOLDEN) & MASK)
    key = _mix((stream + (position + 1) * GOLDEN) & MASK)
    bits = _mix((key + (token + 1) * GOLDEN) & MASK)
    return ((bits >> 11) + 0.5) * 2.0**-53


def test_noise_equals_the_plain_splitmix64_reference_bit_for_bit():
    seeds = [0, 1, 7, 2**63 - 1, 2**63, 2**64 - 1, 123456789012345678]
    positions = torch.tensor([[0, 1, 2], [5, 0, 999], [3, 3, 3], [0, 2**40, 17]] * 2)[:7]
    u = uniform_noise(seeds, positions, 37)
    for b, seed in enumerate(seeds):
        for i in range(positions.shape[1]):
            expected = [reference_uniform(seed, int(positions[b, i]), v) for v in range(37)]
            assert u[b, i].tolist() == expected


def test_noise_depends_only_on_seed_position_and_id():
    """The same (seed, position, id) gives the same value whatever the batch row, the other
    positions asked for at once or the vocabulary size; neighbours differ."""
    together = gumbel_noise([5, 9], torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), 50)
    alone = gumbel_noise([9], torch.tensor([[2]]), 30)
    assert torch.equal(together[1, 2, :30], alone[0, 0])
    reversed_rows = gumbel_noise([9, 5], torch.tensor([[3, 1], [2, 0]]), 50)
    assert torch.equal(reversed_rows[1, 1], together[0, 0])
    assert torch.equal(reversed_rows[0, 0], together[1, 3])
    assert not torch.equal(together[0, 0], together[1, 0])  # another seed
    assert not torch.equal(together[0, 0], together[0, 1])  # another position


def test_noise_never_touches_the_global_rng():
    state = torch.random.get_rng_state()
    gumbel_noise([3], torch.tensor([[0, 1]]), 10)
    assert torch.equal(state, torch.random.get_rng_state())


def _bins_p_value(u: torch.Tensor, bins: int) -> float:
    counts = torch.bincount((u * bins).long().clamp(max=bins - 1).flatten(), minlength=bins)
    return g_test_p_value(counts, torch.full((bins,), 1.0 / bins, dtype=torch.float64))


def _pairs_p_value(first: torch.Tensor, second: torch.Tensor, bins: int = 16) -> float:
    """G-test of independence and uniformity of (first, second) on a bins x bins grid."""
    cell = (first * bins).long().clamp(max=bins - 1) * bins
    cell = cell + (second * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(cell.flatten(), minlength=bins * bins)
    return g_test_p_value(counts, torch.full((bins * bins,), 1.0 / bins**2, dtype=torch.float64))


def _consecutive_noise(seeds: list[int], n: int, vocab: int) -> torch.Tensor:
    return uniform_noise(seeds, torch.arange(n).repeat(len(seeds), 1), vocab)


def test_noise_uniforms_are_uniform_and_independent_of_their_neighbours():
    """1.2 M uniforms (30 seeds in a row x 40 positions x 1000 ids): 256 bins of the marginal
    and 16 x 16 grids of pairs along each key (next id, next position, next seed) pass G-tests
    at ALPHA (the low bits too: the marginal of u * 2**20 mod 1)."""
    u = _consecutive_noise(list(range(30)), 40, 1000)  # [seed, position, id]
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert _bins_p_value(u, 256) > ALPHA
    assert _bins_p_value(torch.frac(u * 2.0**20), 256) > ALPHA
    assert _pairs_p_value(u[:, :, :-1], u[:, :, 1:]) > ALPHA
    assert _pairs_p_value(u[:, :-1], u[:, 1:]) > ALPHA
    assert _pairs_p_value(u[:-1], u[1:]) > ALPHA


def test_uniformity_checks_fail_a_hash_without_its_finaliser():
    """Negative control: the bare counter (seed, position, id) -> frac(golden ratio * counter)
    is uniform in one dimension but its neighbours are strongly dependent."""
    counter = torch.arange(30 * 40 * 1000, dtype=torch.float64).reshape(30, 40, 1000)
    weyl = torch.frac(counter * ((math.sqrt(5) - 1) / 2))
    assert _pairs_p_value(weyl[:, :, :-1], weyl[:, :, 1:]) < ALPHA


def test_gumbel_noise_has_the_standard_gumbel_moments():
    g = gumbel_noise(list(range(20)), torch.arange(50).repeat(20, 1), 1000).flatten()
    n = g.numel()  # 1e6: the mean's standard error is pi / sqrt(6 n) = 0.0013
    assert abs(float(g.mean()) - 0.5772156649) < 6 * math.pi / math.sqrt(6 * n)
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.02


# ---------------------------------------------------------------- sampling with the noise


def _picks_over_positions(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return torch.bincount(coupled_sample(probs, noise).flatten(), minlength=probs.shape[-1])


def test_coupled_sample_is_an_exact_sample_of_each_distribution():
    """100 000 positions of one seed against p with zeros and top-k-like cuts: G-test at
    ALPHA. Negative control: uniform instead of Gumbel noise fails."""
    g = torch.Generator().manual_seed(0)
    for zeros in (0, 3):
        p = random_distribution(8, g, sharpness=1.5, zeros=zeros)
        positions = torch.arange(100_000)[None, :]
        noise = gumbel_noise([11], positions, 8)
        assert g_test_p_value(_picks_over_positions(p, noise), p) > ALPHA
        wrong = uniform_noise([11], positions, 8)
        assert g_test_p_value(_picks_over_positions(p, wrong), p) < ALPHA


def test_coupled_sample_of_a_one_hot_is_its_token_and_ties_go_to_the_lowest_id():
    noise = gumbel_noise([1], torch.arange(100)[None, :], 6)
    one_hot = torch.zeros(6, dtype=torch.float64)
    one_hot[4] = 1.0
    assert bool((coupled_sample(one_hot, noise) == 4).all())
    flat = torch.full((3,), 1 / 3)
    assert int(coupled_sample(flat, torch.zeros(3))) == 0


def test_coupled_top_starts_with_the_coupled_sample_and_marks_impossible_ids():
    g = torch.Generator().manual_seed(1)
    p = torch.stack([random_distribution(10, g, zeros=7) for _ in range(4)])  # 3 ids each
    noise = gumbel_noise([5] * 4, torch.arange(4)[:, None], 10)[:, 0]
    tokens, valid = coupled_top(p, noise, 5)
    assert torch.equal(tokens[:, 0], coupled_sample(p, noise))
    assert valid.sum(dim=1).tolist() == [3, 3, 3, 3]
    assert bool((p.gather(1, tokens)[valid] > 0).all())
    scores = torch.log(p) + noise
    kept = scores.gather(1, tokens[:, :3])
    assert bool((kept[:, :-1] >= kept[:, 1:]).all())  # best first


# ---------------------------------------------------------------- the rule


def reference_walk(tokens, parents, valid, target_tokens):
    """Plain loop: from the root, move to the first valid child whose token is the target's
    sample at the current node; emit the sample where none is."""
    out, at = [], -1
    while True:
        wanted = target_tokens[at + 1]
        children = [j for j, p in enumerate(parents) if p == at and valid[j]]
        match = [j for j in children if tokens[j] == wanted]
        if not match:
            return out + [wanted], len(out)
        at = match[0]
        out.append(tokens[at])


@pytest.mark.parametrize("branching", [(1, 1, 1, 1), (3, 1, 1), (2, 2, 2), (4,)])
def test_coupled_rule_equals_the_loop_walk_and_emits_the_targets_samples(branching):
    gen = torch.Generator().manual_seed(sum(branching))
    parents = tree_parents(branching)
    batch, n, vocab = 64, len(parents), 4
    depth = len(branching)
    depth_of_row = torch.tensor([0] + _depths(parents))  # of target_probs' rows
    target_probs = torch.softmax(torch.randn(batch, n + 1, vocab, generator=gen) * 2, dim=-1)
    noise = gumbel_noise(list(range(batch)), torch.arange(depth + 1).repeat(batch, 1), vocab)
    samples = coupled_sample(target_probs, noise[:, depth_of_row])  # [batch, n+1]
    # drafts that often match: 60 % of the nodes hold the target's sample at their parent
    drafts = torch.randint(vocab, (batch, n), generator=gen)
    matching = torch.rand(batch, n, generator=gen) < 0.6
    drafts = torch.where(matching, samples[:, parents + 1], drafts)
    valid = torch.rand(batch, n, generator=gen) < 0.9
    valid = _close_under_parents(valid, parents)
    result = coupled_rule(drafts, parents, target_probs, valid, noise)
    assert result.rule_used == "coupled"
    for b in range(batch):
        emitted, accepted = reference_walk(
            drafts[b].tolist(), parents.tolist(), valid[b].tolist(), samples[b].tolist()
        )
        assert int(result.num_accepted[b]) == accepted
        assert result.tokens[b, : accepted + 1].tolist() == emitted
    assert int(result.num_accepted.sum()) > 0  # something was kept: the walk was exercised


def _depths(parents: torch.Tensor) -> list[int]:
    depths: list[int] = []
    for p in parents.tolist():
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


def _close_under_parents(valid: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    valid = valid.clone()
    for j, p in enumerate(parents.tolist()):
        if p >= 0:
            valid[:, j] &= valid[:, p]
    return valid


def test_registry_has_the_coupled_rule_and_sends_it_to_verify_coupled():
    rule = lookup("coupled")
    assert rule.exact and rule.coupled
    draft = Draft.chain(torch.tensor([[2, 1]]), None, torch.tensor([2]))
    target_probs = torch.softmax(torch.randn(1, 3, 4, generator=torch.Generator()), dim=-1)
    with pytest.raises(ValueError, match="verify_coupled"):
        verify_draft(rule, draft, None, target_probs, torch.zeros(1, 2), torch.zeros(1))
    noise = gumbel_noise([0], torch.arange(3)[None, :], 4)
    result = verify_coupled(draft, target_probs, noise)
    first = int(coupled_sample(target_probs[0, 0], noise[0, 0]))
    assert int(result.tokens[0, 0]) == first


def test_coupled_rule_rejects_noise_of_the_wrong_shape():
    draft = Draft.chain(torch.tensor([[2, 1]]), None, torch.tensor([2]))
    target_probs = torch.full((1, 3, 4), 0.25)
    with pytest.raises(ValueError, match="noise"):
        verify_coupled(draft, target_probs, torch.zeros(1, 2, 4))  # depth 2 needs 3 rows
    with pytest.raises(ValueError, match="noise"):
        verify_coupled(draft, target_probs, torch.zeros(1, 3, 5))


@pytest.mark.parametrize(
    ("seeds", "positions", "error"),
    [
        ([2**64], torch.tensor([[0]]), ValueError),
        ([-1], torch.tensor([[0]]), ValueError),
        ([1], torch.tensor([[-1]]), ValueError),
        ([1], torch.tensor([[0.0]]), TypeError),
        ([1, 2], torch.tensor([[0]]), ValueError),
    ],
)
def test_noise_rejects_bad_keys_naming_the_argument(seeds, positions, error):
    with pytest.raises(error, match="seeds|positions"):
        gumbel_noise(seeds, positions, 4)


# ---------------------------------------------------------------- the keep probability


def test_keep_probability_formula_matches_the_shared_noise_frequency():
    """Per pair (p, q): the share of 100 000 positions where the two Gumbel-max picks agree is
    within 5.3 standard errors (two-sided p < 1e-7) of coupled_keep_probability. Negative
    control: independent noise for the draft agrees sum p q of the time, which fails."""
    g = torch.Generator().manual_seed(2)
    positions = torch.arange(100_000)[None, :]
    shared = gumbel_noise([3], positions, 6)[0]
    other = gumbel_noise([4], positions, 6)[0]
    for zeros in (0, 2):
        p = random_distribution(6, g, sharpness=1.0, zeros=zeros)
        q = random_distribution(6, g, sharpness=1.0)
        expected = float(coupled_keep_probability(p, q))
        error = 5.3 * math.sqrt(expected * (1 - expected) / positions.numel())
        agree = float((coupled_sample(p, shared) == coupled_sample(q, shared)).double().mean())
        assert abs(agree - expected) < error
        independent = coupled_sample(p, shared) == coupled_sample(q, other)
        assert abs(float(independent.double().mean()) - expected) > error


def test_keep_probability_is_at_least_the_bound_and_one_for_equal_distributions():
    g = torch.Generator().manual_seed(3)
    p = torch.stack([random_distribution(7, g, sharpness=s) for s in (0.3, 1, 2, 4) * 50])
    q = torch.stack([random_distribution(7, g, sharpness=s) for s in (4, 2, 1, 0.3) * 50])
    keep, bound = coupled_keep_probability(p, q), coupled_keep_bound(p, q)
    assert bool((keep >= bound - 1e-12).all())
    tv = 0.5 * (p - q).abs().sum(-1)
    assert bool((keep <= 1 - tv + 1e-12).all())  # no coupling beats 1 - TV
    assert torch.allclose(coupled_keep_probability(p, p), torch.ones(200, dtype=torch.float64))
    disjoint = torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.3, 0.7])
    assert float(coupled_keep_probability(*disjoint)) == 0.0


def test_keep_probability_is_a_lower_bound_check_that_can_fail():
    """Negative control for the bound check: the independent-draw agreement sum p q is below
    (1 - TV) / (1 + TV) for some pair, so `keep >= bound` is not vacuous."""
    p = torch.tensor([0.9, 0.1], dtype=torch.float64)
    independent = float((p * p).sum())
    assert independent < float(coupled_keep_bound(p, p))


def test_row_sampling_noise_is_the_noise_of_each_rows_next_positions_however_asked():
    """The drafter asks first (k depths), the target then (k + 1, maybe another vocabulary):
    each answer is gumbel_noise at positions[b] + depth, made once and reused."""
    sampling = RowSampling(
        [SamplingConfig()] * 2,
        [torch.Generator()] * 2,
        coupled=True,
        seeds=[3, 2**64 - 1],
        positions=[5, 0],
    )
    expected = gumbel_noise([3, 2**64 - 1], torch.tensor([[5, 6, 7, 8], [0, 1, 2, 3]]), 12)
    assert torch.equal(sampling.gumbel(2, 12), expected[:, :2])
    assert torch.equal(sampling.gumbel(4, 12), expected)
    assert torch.equal(sampling.gumbel(3, 10), expected[:, :3, :10])
    with pytest.raises(ValueError, match="seeds, positions"):
        RowSampling([SamplingConfig()], [torch.Generator()], coupled=True, seeds=[1])
    with pytest.raises(ValueError, match="coupled=True"):
        RowSampling([SamplingConfig()], [torch.Generator()]).gumbel(1, 4)
