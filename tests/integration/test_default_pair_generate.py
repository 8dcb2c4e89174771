"""Greedy speculative decoding on the embedded default pair is token-identical to target-only
greedy decoding, on the benchmark prompts. Float32 arithmetic (the cached bfloat16 weights upcast
exactly): bfloat16 greedy outputs can differ between batch shapes on near-ties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specsample.adapters import default_pair
from specsample.adapters.hf import HFCausalLM
from specsample.drafters.model import ModelDrafter
from specsample.drafters.ngram import NgramDrafter
from specsample.engine import generate
from specsample.engine.text import encode_prompt, eos_token_ids
from specsample.warpers import SamplingConfig

pytestmark = [pytest.mark.default_pair, pytest.mark.slow]
PROMPTS = json.loads((Path(__file__).parents[2] / "benchmarks" / "prompts.json").read_text())
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def pair():
    missing = default_pair.missing_packages("target") + default_pair.missing_packages("draft")
    if missing:
        pytest.skip(
            "default pair not installed: "
            + default_pair.pip_install_command(default_pair.TARGET, missing)
        )
    loaded = default_pair.load_default_pair_with_stats(torch.bfloat16)
    target = HFCausalLM(loaded.target.to(torch.float32))
    draft = HFCausalLM(loaded.draft.to(torch.float32))
    prompts = [encode_prompt(loaded.tokenizer, p["prompt"]) for p in PROMPTS]
    eos = eos_token_ids(loaded.tokenizer, loaded.target.config)
    return target, draft, prompts, eos


def run(target, prompts, eos, drafter=None, k=4):
    return generate(
        target,
        prompts,
        generator=torch.Generator().manual_seed(0),
        drafter=drafter,
        sampling=SamplingConfig(temperature=0),
        max_new_tokens=NEW_TOKENS,
        draft_length=k,
        eos_token_ids=eos,
    ).tokens


def test_greedy_speculative_output_equals_target_only_on_default_pair(pair):
    target, draft, prompts, eos = pair
    baseline = run(target, prompts, eos)
    assert all(len(t) > 0 for t in baseline)
    assert run(target, prompts, eos, ModelDrafter(draft), k=4) == baseline
    assert run(target, prompts, eos, NgramDrafter(), k=4) == baseline
