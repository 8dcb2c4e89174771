"""Through HTTP, the first token of many seeded completions follows the target's distribution
(G-test), and a lossy server (typical acceptance, LOSSY) fails the same test.

Size: 600 completions (12 requests of n=50, seeds all distinct) at temperature 1; cells with an
expected count below 5 are pooled. The exact server's false-failure rate is the test level,
ALPHA = 1e-6. The control's first-token distribution is 0.32 from the target's in total variation
(by enumeration with specsample.lossy.exact_typical_distribution), far beyond what 600 samples
resolve."""

from __future__ import annotations

import httpx
import pytest
import torch
from toy_server import MODEL_NAME, TARGET, TOKENIZER, ServerThread, served_models

from helpers import g_test_p_value
from specsample.serve.app import create_app

ALPHA = 1e-6
REQUESTS, CHOICES = 12, 50
PROMPT = "the cat"


def first_token_counts(models) -> torch.Tensor:
    counts = torch.zeros(len(TOKENIZER), dtype=torch.float64)
    with ServerThread(create_app(models)) as running:
        for r in range(REQUESTS):
            body = {
                "model": MODEL_NAME,
                "prompt": PROMPT,
                "max_tokens": 2,  # the first token comes from a step with one draft
                "n": CHOICES,
                "seed": r * CHOICES,
                "temperature": 1.0,
                "logprobs": 1,
            }
            response = httpx.post(running.url + "/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            for choice in response.json()["choices"]:
                token = TOKENIZER.convert_tokens_to_ids(choice["logprobs"]["tokens"][0] or "<eos>")
                counts[token] += 1
    return counts


def pooled_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """G-test p-value with the cells of expected count < 5 pooled into one."""
    small = probs * counts.sum() < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([probs[~small], probs[small].sum()[None]])
    return g_test_p_value(observed, expected)


def target_first_token() -> torch.Tensor:
    return TARGET.probs_for(TOKENIZER.encode(PROMPT)).double()


def test_first_tokens_through_http_follow_the_target():
    counts = first_token_counts(served_models(max_batch=64, draft_length=1))
    assert counts.sum() == REQUESTS * CHOICES
    assert pooled_p_value(counts, target_first_token()) > ALPHA


def test_negative_control_lossy_typical_rule_fails_the_same_test():
    pytest.importorskip("specsample.lossy")  # registers the lossy rule by importing it
    models = served_models(max_batch=64, draft_length=1, rule="typical")
    counts = first_token_counts(models)
    assert pooled_p_value(counts, target_first_token()) < ALPHA
