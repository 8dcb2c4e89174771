"""Per-row sampling (warpers.RowSampling, warpers.warp_rows): row b is warped with its own config
and draws from its own generator, and the result for a row is what logits_to_probs and that
generator give for the row alone."""

from __future__ import annotations

import pytest
import torch

import specsample.warpers as warpers
from helpers import WARPED_DTYPES
from specsample import SamplingConfig, logits_to_probs
from specsample.rules.coupled import gumbel_noise
from specsample.warpers import RowSampling, warp_rows

NEG_INF = float("-inf")

# One row per warper and per edge of each (top_k 1 and at or past the vocabulary, greedy).
MIXED = [
    SamplingConfig(),
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=0),
    SamplingConfig(top_k=1),
    SamplingConfig(temperature=1.3, top_k=3),
    SamplingConfig(top_k=7),  # the whole vocabulary
    SamplingConfig(top_k=50),  # more than the vocabulary
    SamplingConfig(top_p=0.6),
    SamplingConfig(temperature=0.9, min_p=0.2),
    SamplingConfig(temperature=1.7, top_k=5, top_p=0.9, min_p=0.05),
]


def one_by_one(logits, configs):
    return torch.stack([logits_to_probs(row, c) for row, c in zip(logits, configs, strict=True)])


def kept(probs):
    return (probs > 0).nonzero()[:, -1].tolist()


@pytest.mark.parametrize("shape", [(7,), (3, 7)], ids=["batch-vocab", "batch-n-vocab"])
def test_each_row_is_warped_with_its_own_config_as_logits_to_probs_warps_it(shape):
    logits = torch.randn(len(MIXED), *shape, generator=torch.Generator().manual_seed(0))
    logits = logits.to(torch.float64)
    logits[2, ..., 4] = logits[2].amax(dim=-1)  # greedy row: ties, the lowest id wins
    probs = warp_rows(logits, MIXED)
    assert probs.dtype == torch.float64 and probs.shape == logits.shape
    assert torch.allclose(probs, one_by_one(logits, MIXED), rtol=1e-12, atol=0)
    assert torch.equal(probs > 0, one_by_one(logits, MIXED) > 0)
    # the rows really differ: top-k 1 keeps one token, 7 and 50 keep all seven
    assert (probs[3] > 0).reshape(-1, 7).sum(-1).tolist() == [1] * (len(probs[3].view(-1)) // 7)
    assert bool((probs[5] > 0).all()) and bool((probs[6] > 0).all())


def test_a_row_does_not_depend_on_the_other_rows():
    logits = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    configs = [SamplingConfig(top_k=2), SamplingConfig(top_p=0.5)] * 2
    probs = warp_rows(logits, configs)
    for b in range(4):
        alone = warp_rows(logits[b : b + 1], configs[b : b + 1])
        assert torch.allclose(probs[b], alone[0], rtol=1e-12, atol=0)


def test_top_k_of_one_next_to_a_row_without_top_k():
    """The k-th largest of a row without top-k is never read; with top-k 1 it is the maximum."""
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.0], [0.3, 2.0, -1.0, 1.0]], dtype=torch.float64)
    probs = warp_rows(logits, [SamplingConfig(top_k=1), SamplingConfig(temperature=0.5)])
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert torch.allclose(probs[1], torch.softmax(logits[1] / 0.5, -1), rtol=1e-12, atol=0)


def test_top_k_at_the_vocabulary_next_to_a_smaller_one():
    logits = torch.tensor([[0.3, 2.0, -1.0], [0.3, 2.0, -1.0]], dtype=torch.float64)
    probs = warp_rows(logits, [SamplingConfig(top_k=3), SamplingConfig(top_k=2)])
    assert torch.allclose(probs[0], torch.softmax(logits[0], -1), rtol=1e-12, atol=0)
    assert kept(probs[1]) == [0, 1]


def test_top_k_keeps_the_ties_with_the_kth():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]] * 2)
    probs = warp_rows(logits, [SamplingConfig(top_k=2), SamplingConfig()])
    assert kept(probs[0]) == [0, 2, 3, 5]
    assert kept(probs[1]) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_p_and_min_p_boundaries_are_exact(dtype):
    """(1/2, 1/4, 1/4) is exact in binary: top-p 3/4 is reached by the first two tokens, so the
    third goes; min-p 1/2 puts the floor exactly at 1/4, and "at least" keeps it."""
    logits = torch.tensor([[0.5, 0.25, 0.25]] * 3, dtype=torch.float64).log().to(dtype)
    assert torch.softmax(logits, dim=-1)[0].tolist() == [0.5, 0.25, 0.25]
    configs = [SamplingConfig(top_p=0.75), SamplingConfig(min_p=0.5), SamplingConfig(min_p=0.51)]
    probs = warp_rows(logits, configs)
    assert [kept(row) for row in probs] == [[0, 1], [0, 1, 2], [0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_without_top_p_or_min_p_keep_tokens_whose_mass_rounds_away(dtype):
    """Row 0's largest probability rounds to 1, so the mass before its tiny tokens is 1: the
    top-p and min-p of the other rows must leave it alone."""
    logits = torch.tensor([[0.0, -40.0, -41.0], [0.0, -1.0, -2.0]], dtype=dtype)
    assert float(torch.softmax(logits[0], dim=-1)[0]) == 1.0
    probs = warp_rows(logits, [SamplingConfig(), SamplingConfig(top_p=0.5, min_p=0.5)])
    assert kept(probs[0]) == [0, 1, 2]
    assert torch.equal(probs[0], torch.softmax(logits[0], dim=-1))
    assert kept(probs[1]) == [0]


def test_greedy_rows_are_one_hot_on_the_raw_argmax_lowest_id_on_ties():
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0], [0.5, 2.0, -1.0, 2.0], [1.0, 0.0, 0.0, 9.0]])
    configs = [
        SamplingConfig(temperature=0, top_k=1, top_p=0.5),
        SamplingConfig(temperature=2.0),
        SamplingConfig(temperature=0),
    ]
    probs = warp_rows(logits, configs)
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert probs[2].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert torch.allclose(probs[1], torch.softmax(logits[1] / 2, -1))


def test_one_config_for_every_row_is_logits_to_probs():
    logits = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(2))
    config = SamplingConfig(temperature=0.8, top_k=4, top_p=0.9, min_p=0.1)
    assert torch.equal(warp_rows(logits, [config] * 3), logits_to_probs(logits, config))
    assert torch.equal(warp_rows(logits[:1], [config]), logits_to_probs(logits[:1], config))


@pytest.mark.parametrize(
    ("dtype", "expected"),
    WARPED_DTYPES,
)
@pytest.mark.parametrize("same", [True, False], ids=["one-config", "mixed"])
def test_output_is_float32_or_float64_for_float64_input(dtype, expected, same):
    logits = torch.randn(2, 9, generator=torch.Generator().manual_seed(5)).to(dtype)
    configs = [SamplingConfig(temperature=0.7)] * 2 if same else MIXED[:2]
    probs = warp_rows(logits, configs)
    assert probs.dtype == expected
    assert torch.allclose(probs, one_by_one(logits.to(expected), configs), rtol=1e-6, atol=0)


@pytest.mark.parametrize("logits", [[[1.0, 2.0]], torch.tensor([[1, 2, 3]]), None])
def test_non_float_logits_are_rejected_naming_them(logits):
    with pytest.raises(TypeError, match="logits"):
        warp_rows(logits, [SamplingConfig()])


@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 3)], ids=["no-batch", "fewer", "more"])
def test_logits_without_one_row_per_config_are_rejected(shape):
    with pytest.raises(ValueError, match=r"logits: expected shape \[batch=3"):
        warp_rows(torch.zeros(shape), [SamplingConfig()] * 3)


# ---------------------------------------------------------------------------- RowSampling


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_row_sampling_keeps_what_it_was_given():
    configs = [SamplingConfig(), SamplingConfig(temperature=0)]
    gens = generators(1, 2)
    sampling = RowSampling(configs, gens)
    assert len(sampling) == 2
    assert sampling.configs == configs and sampling.configs is not configs
    assert all(a is b for a, b in zip(sampling.generators, gens, strict=True))
    assert sampling.coupled is False and sampling.seeds is None and sampling.positions is None
    coupled = RowSampling(configs, gens, coupled=True, seeds=(5, 6), positions=(0, 3))
    assert coupled.coupled is True
    assert coupled.seeds == [5, 6] and coupled.positions == [0, 3]
    plain = RowSampling(configs, gens, seeds=(5, 6), positions=(0, 3))
    assert plain.seeds == [5, 6] and plain.positions == [0, 3]


def test_shared_gives_every_row_the_same_config_and_generator():
    config, generator = SamplingConfig(top_k=3), torch.Generator()
    sampling = RowSampling.shared(config, generator, 3)
    assert len(sampling) == 3 and sampling.configs == [config] * 3
    assert all(g is generator for g in sampling.generators)
    assert sampling.coupled is False
    assert len(RowSampling.shared(config, generator, 0)) == 0


def test_greedy_rows_and_all_greedy():
    greedy, sampled = SamplingConfig(temperature=0), SamplingConfig()
    mixed = RowSampling([greedy, sampled, greedy], generators(0, 0, 0))
    assert mixed.greedy.dtype == torch.bool
    assert mixed.greedy.tolist() == [True, False, True]
    assert mixed.all_greedy is False
    assert RowSampling([greedy, greedy], generators(0, 0)).all_greedy is True
    assert RowSampling([sampled, sampled], generators(0, 0)).all_greedy is False


def test_warp_uses_each_rows_config():
    logits = torch.randn(3, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    configs = MIXED[2:5]
    sampling = RowSampling(configs, generators(0, 0, 0))
    assert torch.equal(sampling.warp(logits), warp_rows(logits, configs))


def test_uniforms_come_from_each_rows_generator_in_order():
    sampling = RowSampling([SamplingConfig()] * 3, generators(10, 11, 12))
    first = sampling.uniforms([2, 0, 3])
    second = sampling.uniforms([1, 1, 0])
    assert first.dtype == torch.float64 and first.shape == (3, 3)
    assert second.shape == (3, 1)
    expected = [torch.rand(4, dtype=torch.float64, generator=g) for g in generators(10, 11, 12)]
    assert first[0].tolist() == expected[0][:2].tolist() + [0.5]
    assert first[1].tolist() == [0.5, 0.5, 0.5]  # a row with count 0 draws nothing
    assert first[2].tolist() == expected[2][:3].tolist()
    assert second[:, 0].tolist() == [float(expected[0][2]), float(expected[1][0]), 0.5]
    assert sampling.uniforms([]).shape == (0, 0)
    assert sampling.uniforms([0, 0, 0]).tolist() == [[], [], []]


def test_rows_sharing_a_generator_draw_in_turn():
    generator = torch.Generator().manual_seed(7)
    sampling = RowSampling.shared(SamplingConfig(), generator, 2)
    got = sampling.uniforms([2, 1])
    expected = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert got.tolist() == [expected[:2].tolist(), [float(expected[2]), 0.5]]


def test_bad_rows_are_rejected_naming_the_argument():
    config, generator = SamplingConfig(), torch.Generator()
    with pytest.raises(ValueError, match="configs, generators"):
        RowSampling([config, config], [generator])
    with pytest.raises(ValueError, match="configs, generators"):
        RowSampling([config], [generator, generator])
    with pytest.raises(TypeError, match=r"configs\[1\]"):
        RowSampling([config, {"temperature": 1.0}], [generator, generator])
    with pytest.raises(TypeError, match=r"generators\[1\]"):
        RowSampling([config, config], [generator, 7])


@pytest.mark.parametrize(
    ("seeds", "positions"),
    [(None, [0, 0]), ([1, 2], None), ([1], [0, 0]), ([1, 2], [0]), ([1, 2, 3], [0, 0])],
    ids=["no-seeds", "no-positions", "too-few-seeds", "too-few-positions", "too-many-seeds"],
)
def test_coupled_needs_one_seed_and_one_position_per_row(seeds, positions):
    rows = ([SamplingConfig()] * 2, generators(0, 0))
    with pytest.raises(ValueError, match="seeds, positions"):
        RowSampling(*rows, coupled=True, seeds=seeds, positions=positions)
    plain = RowSampling(*rows, seeds=seeds, positions=positions)  # without coupled: not needed
    assert plain.coupled is False and plain.seeds == (None if seeds is None else list(seeds))
    ok = RowSampling(*rows, coupled=True, seeds=[1, 2], positions=[0, 4])
    assert ok.gumbel(1, 3).shape == (2, 1, 3)


@pytest.fixture
def noise_made(monkeypatch):
    """The (positions, vocab) of every gumbel_noise call RowSampling makes."""
    made = []

    def recording(seeds, positions, vocab):
        made.append((positions.tolist(), vocab))
        return gumbel_noise(seeds, positions, vocab)

    monkeypatch.setattr(warpers, "gumbel_noise", recording)
    return made


def test_gumbel_makes_only_the_missing_depths_and_reuses_the_rest(noise_made):
    """The drafter asks for the noise first, the target then for one depth more: only that depth
    is made then, nothing when no depth is missing, and everything again for another vocabulary."""
    sampling = RowSampling(
        [SamplingConfig()] * 2, generators(0, 0), coupled=True, seeds=[3, 4], positions=[5, 0]
    )
    expected = gumbel_noise([3, 4], torch.tensor([[5, 6, 7], [0, 1, 2]]), 6)
    nothing = sampling.gumbel(0, 6)  # no depth asked: none made, still float64 [batch, 0, vocab]
    assert nothing.dtype == torch.float64 and nothing.shape == (2, 0, 6) and noise_made == []
    assert torch.equal(sampling.gumbel(2, 6), expected[:, :2])
    assert torch.equal(sampling.gumbel(3, 6), expected)
    assert torch.equal(sampling.gumbel(3, 6), expected)
    assert torch.equal(sampling.gumbel(1, 6), expected[:, :1])
    assert noise_made == [([[5, 6], [0, 1]], 6), ([[7], [2]], 6)]
    assert sampling.gumbel(1, 4).shape == (2, 1, 4)
    assert noise_made[2:] == [([[5], [0]], 4)]


def test_coupled_may_be_given_per_row():
    rows = ([SamplingConfig()] * 3, generators(0, 0, 0))
    keys = {"seeds": [1, 2, 3], "positions": [0, 0, 0]}
    mixed = RowSampling(*rows, coupled=[True, 0, 1], **keys)
    assert mixed.coupled_rows == [True, False, True]
    assert mixed.coupled is True and mixed.all_coupled is False
    assert mixed.coupled_mask.dtype == torch.bool
    assert mixed.coupled_mask.tolist() == [True, False, True]
    every = RowSampling(*rows, coupled=True, **keys)
    assert every.coupled_rows == [True] * 3 and every.coupled and every.all_coupled is True
    none = RowSampling(*rows, coupled=[False] * 3)
    assert none.coupled_rows == [False] * 3 and none.coupled is False and not none.all_coupled
    assert none.coupled_mask.tolist() == [False] * 3
    assert RowSampling([], [], coupled=True, seeds=[], positions=[]).all_coupled is False
    with pytest.raises(ValueError, match="coupled: expected a bool or one per row"):
        RowSampling(*rows, coupled=[True, False], **keys)
    with pytest.raises(ValueError, match="coupled: expected a bool or one per row"):
        RowSampling(*rows, coupled=[True] * 4, **keys)
    with pytest.raises(ValueError, match="seeds, positions"):
        RowSampling(*rows, coupled=[False, True, False])


def test_gumbel_of_rows_not_coupled_is_zero_and_none_is_made_for_them(noise_made):
    sampling = RowSampling(
        [SamplingConfig()] * 3,
        generators(0, 0, 0),
        coupled=[True, False, True],
        seeds=[3, 4, 5],
        positions=[2, 0, 7],
    )
    noise = sampling.gumbel(2, 6)
    assert noise.dtype == torch.float64 and noise.shape == (3, 2, 6)
    assert torch.equal(noise[[0, 2]], gumbel_noise([3, 5], torch.tensor([[2, 3], [7, 8]]), 6))
    assert torch.equal(noise[1], torch.zeros(2, 6, dtype=torch.float64))
    more = sampling.gumbel(3, 6)
    assert torch.equal(more[:, :2], noise)
    assert torch.equal(more[[0, 2], 2], gumbel_noise([3, 5], torch.tensor([[4], [9]]), 6)[:, 0])
    assert torch.equal(more[1], torch.zeros(3, 6, dtype=torch.float64))
    most = sampling.gumbel(5, 6)
    assert torch.equal(most[:, :3], more)
    assert torch.equal(most[[0, 2], 3:], gumbel_noise([3, 5], torch.tensor([[5, 6], [10, 11]]), 6))
    assert noise_made == [([[2, 3], [7, 8]], 6), ([[4], [9]], 6), ([[5, 6], [10, 11]], 6)]


def test_select_keeps_the_picked_rows_configs_generators_keys_and_noise(noise_made):
    configs = [SamplingConfig(), SamplingConfig(top_k=2), SamplingConfig(temperature=0)]
    gens = generators(1, 2, 3)
    sampling = RowSampling(
        configs, gens, coupled=[True, False, True], seeds=[7, 8, 9], positions=[1, 2, 3]
    )
    noise = sampling.gumbel(2, 5)
    picked = sampling.select((2, 0))
    assert picked.configs == [configs[2], configs[0]]
    assert picked.generators[0] is gens[2] and picked.generators[1] is gens[0]
    assert picked.coupled_rows == [True, True]
    assert picked.seeds == [9, 7] and picked.positions == [3, 1]
    assert torch.equal(picked.gumbel(2, 5), noise[[2, 0]])
    assert len(noise_made) == 1  # the noise made before the selection is reused
    expected = [torch.rand(1, dtype=torch.float64, generator=g) for g in generators(3, 1)]
    assert picked.uniforms([1, 1])[:, 0].tolist() == [float(e[0]) for e in expected]
    plain = RowSampling(configs, gens).select([1])
    assert plain.configs == [configs[1]] and plain.generators[0] is gens[1]
    assert plain.coupled_rows == [False] and plain.seeds is None and plain.positions is None
    with pytest.raises(ValueError, match="coupled=True"):
        plain.gumbel(1, 5)
    partly = sampling.select([1])
    assert partly.coupled_rows == [False] and partly.seeds == [8] and partly.positions == [2]
    nothing = sampling.select([])
    assert len(nothing) == 0 and nothing.coupled_rows == [] and nothing.seeds == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_uniforms_noise_and_warped_rows_are_on_the_asked_device():
    """A row's generator may live on the device: its uniforms are drawn there. The noise and the
    warped rows are made on the device asked for and equal the CPU's."""
    cuda = torch.device("cuda")
    gens = [torch.Generator(cuda).manual_seed(1), torch.Generator().manual_seed(2)]
    sampling = RowSampling(MIXED[:2], gens, coupled=True, seeds=[1, 2], positions=[0, 3])
    uniforms = sampling.uniforms([2, 1], cuda)
    assert uniforms.device.type == "cuda"
    first = torch.rand(
        2, generator=torch.Generator(cuda).manual_seed(1), dtype=torch.float64, device=cuda
    )
    second = torch.rand(1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert uniforms.cpu().tolist() == [first.cpu().tolist(), [float(second[0]), 0.5]]
    noise = sampling.gumbel(2, 5, cuda)
    assert noise.device.type == "cuda"
    on_cpu = RowSampling(MIXED[:2], generators(0, 0), coupled=True, seeds=[1, 2], positions=[0, 3])
    assert torch.allclose(noise.cpu(), on_cpu.gumbel(2, 5), rtol=1e-12, atol=0)
    picked = sampling.select([1, 0])  # the noise made so far moves with the rows, on the device
    assert torch.equal(picked.gumbel(2, 5, cuda), noise[[1, 0]])
    logits = torch.randn(
        len(MIXED), 7, dtype=torch.float64, generator=torch.Generator().manual_seed(8)
    )
    probs = warp_rows(logits.to(cuda), MIXED)
    assert probs.device.type == "cuda"
    assert torch.allclose(probs.cpu(), warp_rows(logits, MIXED), rtol=1e-9, atol=1e-12)
