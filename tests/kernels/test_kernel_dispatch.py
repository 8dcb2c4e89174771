"""`specsample.verify` picks the Triton kernels for CUDA tensors and the torch rules otherwise."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import TRITON_MISSING

from helpers import random_case

pytest.importorskip("triton", reason=TRITON_MISSING)

from specsample import kernels, verify  # noqa: E402
from specsample.rules import RULES, block_rule, chain_rule_for, token_rule  # noqa: E402


def test_cpu_tensors_use_the_torch_rules():
    cpu = torch.device("cpu")
    assert chain_rule_for("token", cpu) is token_rule
    assert chain_rule_for("block", cpu) is block_rule


def test_cuda_tensors_use_the_kernels_when_triton_is_installed():
    cuda = torch.device("cuda")
    assert {name: chain_rule_for(name, cuda) for name in RULES} == kernels.RULES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule", sorted(RULES))
def test_verify_on_cuda_matches_the_torch_rule_on_the_same_uniforms(rule):
    case = random_case(9, batch=64, k=4, vocab=151936, dtype=torch.bfloat16, point_mass=False)
    draft_tokens, draft_probs, target_probs, draft_lengths = (t.cuda() for t in case[:4])
    result = verify(
        draft_tokens,
        draft_probs,
        target_probs,
        generator=torch.Generator("cuda").manual_seed(3),
        rule=rule,
        draft_lengths=draft_lengths,
    )
    # verify draws accept uniforms [batch, k], then sample uniforms [batch].
    g = torch.Generator("cuda").manual_seed(3)
    accept = torch.rand(64, 4, generator=g, dtype=torch.float64, device="cuda")
    sample = torch.rand(64, generator=g, dtype=torch.float64, device="cuda")
    expected = RULES[rule](draft_tokens, draft_probs, target_probs, draft_lengths, accept, sample)
    assert torch.equal(result.tokens, expected.tokens)
    assert torch.equal(result.num_accepted, expected.num_accepted)
