"""The rules on a CUDA device give what they give on the CPU, on the same inputs and uniforms,
and leave every result tensor on the inputs' device (skipped without CUDA).

float64 inputs: the devices sum in different orders, and a rounding difference of about 1e-16
changes a draw only when its uniform falls that close to a boundary (about 1e-14 per draw)."""

from __future__ import annotations

import pytest
import torch

from helpers import random_case, random_tree_case
from specsample.rules import block as block_module
from specsample.rules import greedy_rule, greedy_tree_rule, token_rule, tree_rule
from specsample.rules import token as token_module
from specsample.rules.block import block_rule
from specsample.rules.tree import tree_parents

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def on(device, values):
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


def assert_same_on_cuda(rule, case, fields=("tokens", "num_accepted")):
    cpu = rule(*case)
    cuda = rule(*on(CUDA, case))
    for field in fields:
        value = getattr(cuda, field)
        assert value.device.type == "cuda", field
        assert torch.equal(value.cpu(), getattr(cpu, field)), field
    assert cuda.rule_used == cpu.rule_used


@pytest.mark.parametrize("rows_per_chunk", [None, 3])
@pytest.mark.parametrize(
    ("rule", "point_mass"),
    [(token_rule, False), (token_rule, True), (block_rule, False)],
    ids=["token", "token-point-mass", "block"],
)
def test_chain_rules_on_cuda_equal_cpu(monkeypatch, rule, point_mass, rows_per_chunk):
    batch, k, vocab = 40, 4, 3000
    if rows_per_chunk:
        monkeypatch.setattr(token_module, "CHUNK_ELEMENTS", rows_per_chunk * vocab)
        monkeypatch.setattr(block_module, "CHUNK_ELEMENTS", rows_per_chunk * vocab * (k - 1))
    for seed in range(3):
        case = random_case(
            700 + seed, batch=batch, k=k, vocab=vocab, dtype=torch.float64, point_mass=point_mass
        )
        assert_same_on_cuda(rule, case)


@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_tree_rule_on_cuda_equals_cpu(point_mass):
    parents = tree_parents((3, 2, 1))
    case = random_tree_case(
        710,
        batch=64,
        n=len(parents),
        vocab=500,
        dtype=torch.float64,
        point_mass=point_mass,
        parents=parents,
    )
    assert_same_on_cuda(tree_rule, case, ("tokens", "num_accepted", "path"))


def test_greedy_rules_on_cuda_equal_cpu():
    g = torch.Generator().manual_seed(720)
    batch, k, vocab = 32, 4, 6
    target_tokens = torch.randint(0, vocab, (batch, k + 1), generator=g)
    agree = torch.rand(batch, k, generator=g) < 0.7
    arbitrary = torch.randint(0, vocab, (batch, k), generator=g)
    draft_tokens = torch.where(agree, target_tokens[:, :k], arbitrary)
    lengths = torch.randint(0, k + 1, (batch,), generator=g)
    assert_same_on_cuda(greedy_rule, (draft_tokens, target_tokens, lengths))
    parents = tree_parents((2, 2))
    n = len(parents)
    tree_targets = torch.randint(0, vocab, (batch, n + 1), generator=g)
    tree_drafts = torch.randint(0, vocab, (batch, n), generator=g)
    tree_drafts[:, :2] = tree_targets[:, :1]  # the root's first child often right
    valid = torch.ones(batch, n, dtype=torch.bool)
    assert_same_on_cuda(
        greedy_tree_rule,
        (tree_drafts, parents, tree_targets, valid),
        ("tokens", "num_accepted", "path"),
    )
