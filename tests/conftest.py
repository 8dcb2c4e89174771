"""Suite-wide fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_cost_memory(tmp_path_factory, monkeypatch):
    """Each test gets an empty cost memory folder (engine.memory): what one test's command-line
    run remembers must not change how the next one drafts, and no test writes to the user's
    cache."""
    monkeypatch.setenv("SPECSAMPLE_COST_MEMORY", str(tmp_path_factory.mktemp("costs")))


@pytest.fixture(autouse=True)
def _own_prompt_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty prompt cache folder (adapters.prompt_cache), for the same
    reasons."""
    monkeypatch.setenv("SPECSAMPLE_PROMPT_CACHE", str(tmp_path_factory.mktemp("prompts")))
