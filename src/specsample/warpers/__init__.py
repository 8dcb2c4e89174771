"""Logits -> probabilities, one code path for the drafter and the target.

Order (the same as transformers' sampling): temperature, then top-k, then top-p, then min-p, then
softmax. Speculative sampling is exact with respect to the warped target, which is what the user
asked to sample from; warping the drafter the same way keeps acceptance high.

- temperature: logits / T. T = 0 means greedy: one-hot on the argmax, the lowest id on ties.
- top_k:  keep the k largest logits (ties with the k-th are kept); 0 turns it off.
- top_p:  keep the smallest set of most likely tokens whose probability reaches top_p (at least
          one token); 1 turns it off.
- min_p:  keep tokens whose probability is at least min_p times the largest; 0 turns it off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or (self.temperature < 0)
        ):
            raise ValueError(
                f"temperature: expected a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: expected an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1] (1 = off), got {self.top_p!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p < 1:
            raise ValueError(f"min_p: expected a number in [0, 1) (0 = off), got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, config: SamplingConfig | None = None) -> torch.Tensor:
    """logits [..., vocab] -> warped probabilities [..., vocab], float32 (float64 for float64
    input). -inf logits get probability 0."""
    config = config or SamplingConfig()
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(
            f"logits: expected a float tensor [..., vocab], got {type(logits).__name__}"
            f"{'' if not isinstance(logits, torch.Tensor) else ' of ' + str(logits.dtype)}"
        )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if config.greedy:
        return greedy_probs(logits)
    logits = logits / config.temperature
    if config.top_k:
        logits = apply_top_k(logits, config.top_k)
    if config.top_p < 1:
        logits = apply_top_p(logits, config.top_p)
    if config.min_p > 0:
        logits = apply_min_p(logits, config.min_p)
    return torch.softmax(logits, dim=-1)


def greedy_probs(logits: torch.Tensor) -> torch.Tensor:
    """One-hot on the argmax (torch.argmax returns the first maximum: the lowest id on ties)."""
    chosen = logits.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(logits).scatter_(-1, chosen, 1.0)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p  # the first token always has mass_before 0 and stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    floor = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < floor, float("-inf"))
