"""Helpers every benchmark script shares: the machine it ran on, the cost probe of a model's
forward passes, statistics pooled over runs, the prompts, and small formatting helpers.

Scripts import it as `from common import ...` (they run as `python benchmarks/<script>.py`, which
puts this folder on the path).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specsample.adapters.hf import HFCausalLM
from specsample.engine.stats import DecodeStats
from specsample.engine.text import encode_prompt

HERE = Path(__file__).parent
PROMPTS = HERE / "prompts.json"
PROBE_CONTEXT = 100  # tokens in the cache when the cost probe times a pass


# ---------------------------------------------------------------------------------- machine


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_flags": sorted(f for f in flags if "bf16" in f),
    }


def load_average() -> str:
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def sklearn_available() -> bool:
    try:
        from transformers.utils import is_sklearn_available

        return bool(is_sklearn_available())
    except ImportError:
        return False


# ---------------------------------------------------------------------------------- prompts


def load_prompts(path: Path = PROMPTS) -> list[dict[str, Any]]:
    """The benchmark prompts: a list of {"name", "kind", "prompt"}."""
    return json.loads(path.read_text())


def probe_context(tokenizer, prompts: Sequence[dict[str, Any]], length: int = PROBE_CONTEXT):
    """`length` tokens of the prompts' chat-template encodings, repeated as needed: the context
    the cost probe times its passes at."""
    context = [t for p in prompts for t in encode_prompt(tokenizer, p["prompt"])]
    return (context * (length // max(len(context), 1) + 1))[:length]


# ---------------------------------------------------------------------------------- probes


def probe_costs(
    lm: HFCausalLM, context: list[int], sizes: Sequence[int], repeats: int
) -> dict[int, float]:
    """Median seconds of one `extend` of n tokens at a len(context)-token context, per n (one
    untimed warm-up each; the cache is truncated back after every pass)."""
    lm.prefill([context])
    base = lm.lengths
    out = {}
    for n in sizes:
        tokens = torch.tensor([context[:n]], dtype=torch.int64)
        valid = torch.tensor([n], dtype=torch.int64)
        times = []
        for rep in range(repeats + 1):
            start = time.perf_counter()
            lm.extend(tokens, valid)
            seconds = time.perf_counter() - start
            lm.truncate(base)
            if rep:
                times.append(seconds)
        out[n] = statistics.median(times)
    return out


class Counter:
    """Counts forward calls of modules (a pre-hook: adds nothing measurable)."""

    def __init__(self, *modules: torch.nn.Module):
        self.calls = 0
        for module in modules:
            module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1


# ---------------------------------------------------------------------------------- statistics


def pooled(stats: Sequence[DecodeStats]) -> DecodeStats:
    """Counters and seconds summed over runs: DecodeStats.pooled."""
    return DecodeStats.pooled(stats)


# ---------------------------------------------------------------------------------- formatting


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den
