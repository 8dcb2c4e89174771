"""How many tokens to draft next, per row.

- FixedDraftLength(k): always k.
- AdaptiveDraftLength: a per-row schedule that grows by one after every draft of a row was kept
  and shrinks by one after a rejection (within [1, max_k]); and a batch-wide check, from the
  speedup theory with the measured acceptance rate and costs, that drafting pays at all. When it
  does not, rows draft nothing (target-only steps) and one step in `probe_every` drafts a single
  token to keep measuring. The draft length never depends on the target's future, so every
  choice here keeps verification exact.
"""

from __future__ import annotations

import torch

from specsample.analysis.theory import expected_speedup


class FixedDraftLength:
    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k: expected an integer >= 0, got {k!r}")
        self.k = k

    def next_lengths(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.k, dtype=torch.int64)

    def update(self, drafted: torch.Tensor, accepted: torch.Tensor, costs: StepCosts) -> None:
        pass


class StepCosts:
    """Running means of measured costs (seconds): a draft forward pass, and a target pass by the
    number of tokens it scored."""

    def __init__(self):
        self.draft_step = _Mean()
        self.target_pass: dict[int, _Mean] = {}

    def add_target_pass(self, tokens: int, seconds: float) -> None:
        self.target_pass.setdefault(tokens, _Mean()).add(seconds)

    def target(self, tokens: int) -> float | None:
        if tokens in self.target_pass:
            return self.target_pass[tokens].value
        known = sorted(self.target_pass)
        if not known:
            return None
        nearest = min(known, key=lambda n: abs(n - tokens))
        return self.target_pass[nearest].value


class AdaptiveDraftLength:
    def __init__(
        self,
        max_k: int = 8,
        *,
        start_k: int | None = None,
        probe_every: int = 8,
        smoothing: float = 0.2,
    ):
        if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
            raise ValueError(f"max_k: expected an integer >= 1, got {max_k!r}")
        if start_k is not None and (
            isinstance(start_k, bool) or not isinstance(start_k, int) or start_k < 1
        ):
            raise ValueError(f"start_k: expected None or an integer >= 1, got {start_k!r}")
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every: expected an integer >= 1, got {probe_every!r}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing: expected a number in (0, 1], got {smoothing!r}")
        self.max_k = max_k
        self.start_k = min(start_k or 4, max_k)
        self.probe_every = probe_every
        self.smoothing = smoothing
        self.row_k: torch.Tensor | None = None
        self.alpha: float | None = None
        self.paused = False
        self.steps = 0

    def next_lengths(self, batch: int) -> torch.Tensor:
        if self.row_k is None or len(self.row_k) != batch:
            self.row_k = torch.full((batch,), self.start_k, dtype=torch.int64)
        self.steps += 1
        if self.paused:
            probe = self.steps % self.probe_every == 0
            return torch.full((batch,), 1 if probe else 0, dtype=torch.int64)
        return self.row_k.clone()

    def update(self, drafted: torch.Tensor, accepted: torch.Tensor, costs: StepCosts) -> None:
        """drafted, accepted: int64 [batch] for the step just verified."""
        assert self.row_k is not None
        tried = drafted > 0
        if not bool(tried.any()):
            return
        if not self.paused:
            grow = tried & (accepted == drafted)
            self.row_k = torch.where(
                grow, self.row_k + 1, torch.where(tried, self.row_k - 1, self.row_k)
            )
            self.row_k = self.row_k.clamp(1, self.max_k)
        rate = float(accepted[tried].sum()) / float(
            (accepted[tried] + (accepted < drafted)[tried].long()).sum()
        )
        self.alpha = (
            rate
            if self.alpha is None
            else ((1 - self.smoothing) * self.alpha + self.smoothing * rate)
        )
        self.paused = not self._drafting_pays(costs)

    def _drafting_pays(self, costs: StepCosts) -> bool:
        single = costs.target(1)
        if self.alpha is None or costs.draft_step.count == 0 or single is None:
            return True
        c = costs.draft_step.value / single
        alpha = min(self.alpha, 0.999)
        best = max(
            expected_speedup(alpha, k, c, lambda n: (costs.target(n + 1) or single) / single)
            for k in range(1, self.max_k + 1)
        )
        return best > 1.0


class _Mean:
    def __init__(self):
        self.total = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    @property
    def value(self) -> float:
        return self.total / max(self.count, 1)
