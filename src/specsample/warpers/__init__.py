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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specsample.rules.coupled import gumbel_noise
from specsample.rules.greedy import argmax_last


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
    """One-hot on the argmax (argmax_last returns the first maximum: the lowest id on ties)."""
    chosen = argmax_last(logits)[..., None]
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


class RowSampling:
    """Per-row sampling for a batch: row b is warped with `configs[b]` and draws its randomness
    from `generators[b]` alone, so what one row samples never depends on the other rows.

    configs     one SamplingConfig per row.
    generators  one torch.Generator per row (on the device the uniforms are drawn on).
    coupled     the rows under the coupled rule: True (every row), False (none) or one bool
                per row (a batch whose requests ask for different rules). A coupled row's drafts
                and target tokens are Gumbel-max picks with noise from (seeds[b], new-token
                position) (see `gumbel`), not draws from its generator.
    seeds       with a coupled row: one seed per row (an int in [0, 2**64)).
    positions   with a coupled row: per row, the position among the request's new tokens of
                the next token (0 before the first).
    """

    def __init__(
        self,
        configs: list[SamplingConfig],
        generators: list[torch.Generator],
        *,
        coupled: bool | Sequence[bool] = False,
        seeds: list[int] | None = None,
        positions: list[int] | None = None,
    ):
        if len(configs) != len(generators):
            raise ValueError(
                f"configs, generators: expected one of each per row, got {len(configs)} configs "
                f"and {len(generators)} generators"
            )
        for b, config in enumerate(configs):
            if not isinstance(config, SamplingConfig):
                raise TypeError(
                    f"configs[{b}]: expected a SamplingConfig, got {type(config).__name__}"
                )
        for b, generator in enumerate(generators):
            if not isinstance(generator, torch.Generator):
                raise TypeError(
                    f"generators[{b}]: expected a torch.Generator, got {type(generator).__name__}"
                )
        if isinstance(coupled, bool):
            coupled_rows = [coupled] * len(configs)
        else:
            coupled_rows = [bool(c) for c in coupled]
            if len(coupled_rows) != len(configs):
                raise ValueError(
                    f"coupled: expected a bool or one per row, got {len(coupled_rows)} values "
                    f"for {len(configs)} rows"
                )
        if any(coupled_rows) and (
            seeds is None
            or positions is None
            or len(seeds) != len(configs)
            or len(positions) != len(configs)
        ):
            raise ValueError(
                f"seeds, positions: expected one of each per row with a coupled row, got "
                f"{seeds!r:.60} and {positions!r:.60} for {len(configs)} rows"
            )
        self.configs = list(configs)
        self.generators = list(generators)
        self.coupled_rows = coupled_rows
        self.seeds = None if seeds is None else list(seeds)
        self.positions = None if positions is None else list(positions)
        self._gumbel: torch.Tensor | None = None  # the noise made so far (drafter, then target)

    @staticmethod
    def shared(config: SamplingConfig, generator: torch.Generator, batch: int) -> RowSampling:
        """Every row with the same config and one shared generator (rows then draw in turn)."""
        return RowSampling([config] * batch, [generator] * batch)

    def __len__(self) -> int:
        return len(self.configs)

    @property
    def coupled(self) -> bool:
        """Some row is under the coupled rule (`coupled_rows` says which)."""
        return any(self.coupled_rows)

    @property
    def all_coupled(self) -> bool:
        return bool(self.coupled_rows) and all(self.coupled_rows)

    @property
    def coupled_mask(self) -> torch.Tensor:
        """bool [batch]: the rows under the coupled rule."""
        return torch.tensor(self.coupled_rows, dtype=torch.bool)

    def select(self, rows: Sequence[int]) -> RowSampling:
        """The sampling of rows `rows` (indices, in that order): the same configs, generators
        (shared objects: a row's draws go on from where they are), seeds and positions, and the
        noise made so far."""
        rows = list(rows)
        picked = RowSampling(
            [self.configs[b] for b in rows],
            [self.generators[b] for b in rows],
            coupled=[self.coupled_rows[b] for b in rows],
            seeds=None if self.seeds is None else [self.seeds[b] for b in rows],
            positions=None if self.positions is None else [self.positions[b] for b in rows],
        )
        if self._gumbel is not None:
            index = torch.tensor(rows, dtype=torch.int64, device=self._gumbel.device)
            picked._gumbel = self._gumbel.index_select(0, index)
        return picked

    @property
    def greedy(self) -> torch.Tensor:
        """bool [batch]: rows decoded greedily (temperature 0)."""
        return torch.tensor([c.greedy for c in self.configs], dtype=torch.bool)

    @property
    def all_greedy(self) -> bool:
        return all(c.greedy for c in self.configs)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [batch, ..., vocab] -> probabilities, row b warped with configs[b]."""
        return warp_rows(logits, self.configs)

    def uniforms(self, counts: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """float64 [batch, max(counts)]: row b's first counts[b] entries are uniforms in [0, 1)
        drawn from generators[b] (in order); the rest are 0.5 and must not be read. A row with
        count 0 draws nothing."""
        width = max(counts, default=0)
        out = torch.full((len(counts), width), 0.5, dtype=torch.float64, device=device)
        for b, count in enumerate(counts):
            if count:
                generator = self.generators[b]
                out[b, :count] = torch.rand(
                    count, generator=generator, dtype=torch.float64, device=generator.device
                ).to(device)
        return out

    def gumbel(self, depth: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """float64 [batch, depth, vocab]: the coupled rule's Gumbel noise of row b's next
        `depth` new tokens (positions positions[b] .. positions[b] + depth - 1); zeros for rows
        that are not coupled (no noise is made for them). What was made for an earlier call
        (the drafter's, in a step) is reused: only missing depths are made."""
        if not self.coupled:
            raise ValueError("gumbel: this RowSampling was made without coupled=True")
        made = self._gumbel
        if made is None or made.shape[2] != vocab or made.device != torch.device(device):
            made = torch.zeros(len(self), 0, vocab, dtype=torch.float64, device=device)
        if made.shape[1] < depth:
            rows = [b for b, c in enumerate(self.coupled_rows) if c]
            positions = [self.positions[b] for b in rows]
            start = torch.tensor(positions, dtype=torch.int64, device=device)
            offsets = torch.arange(made.shape[1], depth, dtype=torch.int64, device=device)
            seeds = [self.seeds[b] for b in rows]
            noise = gumbel_noise(seeds, start[:, None] + offsets, vocab)
            if len(rows) < len(self):
                full = noise.new_zeros(len(self), depth - made.shape[1], vocab)
                full[torch.tensor(rows, dtype=torch.int64, device=device)] = noise
                noise = full
            made = torch.cat([made, noise], 1)
            self._gumbel = made
        return made[:, :depth]


def warp_rows(logits: torch.Tensor, configs: list[SamplingConfig]) -> torch.Tensor:
    """logits [batch, ..., vocab] -> warped probabilities, row b with configs[b], vectorised over
    the batch (the same order as logits_to_probs: temperature, top-k, top-p, min-p). A row's
    result depends on its own logits and config alone."""
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"logits: expected a float tensor [batch, ..., vocab], got {logits!r:.80}")
    if logits.dim() < 2 or logits.shape[0] != len(configs):
        raise ValueError(
            f"logits: expected shape [batch={len(configs)}, ..., vocab], got {tuple(logits.shape)}"
        )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if len(set(configs)) == 1:
        return logits_to_probs(logits, configs[0])
    extra = (1,) * (logits.dim() - 1)

    def per_row(values: list[float], dtype: torch.dtype = logits.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=logits.device).reshape(-1, *extra)

    greedy = per_row([float(c.greedy) for c in configs]) > 0
    temperature = per_row([c.temperature if not c.greedy else 1.0 for c in configs])
    warped = logits / temperature
    top_k = [c.top_k if c.top_k < logits.shape[-1] else 0 for c in configs]
    if any(top_k):
        kth_index = per_row([max(k, 1) - 1 for k in top_k], torch.int64)
        top = torch.topk(warped, max(top_k), dim=-1).values
        kth = top.gather(-1, kth_index.expand(*warped.shape[:-1], 1))
        cut = (per_row([float(k > 0) for k in top_k]) > 0) & (warped < kth)
        warped = warped.masked_fill(cut, float("-inf"))
    if any(c.top_p < 1 for c in configs):
        sorted_logits, order = torch.sort(warped, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        top_p = per_row([c.top_p for c in configs])
        drop_sorted = (mass_before >= top_p) & (top_p < 1)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        warped = warped.masked_fill(drop, float("-inf"))
    if any(c.min_p > 0 for c in configs):
        probs = torch.softmax(warped, dim=-1)
        min_p = per_row([c.min_p for c in configs])
        floor = min_p * probs.amax(dim=-1, keepdim=True)
        warped = warped.masked_fill((probs < floor) & (min_p > 0), float("-inf"))
    probs = torch.softmax(warped, dim=-1)
    return torch.where(greedy, greedy_probs(logits), probs)
