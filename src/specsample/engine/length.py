"""How many tokens to draft next, per row.

- FixedDraftLength(k): always k.
- AdaptiveDraftLength: a per-row schedule that grows by one after every draft of a row was kept
  and shrinks by one after a rejection (within [1, max_k]), capped by the batch-wide best k of
  the speedup theory (analysis.theory.best_draft_length) with the measured acceptance rate, the
  measured cost ratio c and the measured cost of target passes by length (their lower envelope,
  optimistic where a length was not measured yet: see StepCosts.relative_pass_cost). When the
  best k is 0, drafting does not pay: rows draft nothing (target-only steps) and one step in
  `probe_every` drafts a single token to keep measuring. The draft length never depends on the
  target's future, so every choice here keeps verification exact.
"""

from __future__ import annotations

import torch

from specsample.analysis.theory import best_draft_length


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

    def relative_pass_cost(self, tokens: int) -> float | None:
        """Cost of a target pass over `tokens` tokens divided by a pass over 1, from the measured
        means; None before any pass.

        Measured costs are not a line: on CPUs matrix kernels change with the number of rows
        (here passes over 1-3 tokens cost the same, and 13 tokens cost more than 20). So the
        estimate is the lower envelope of the measured means (a pass over fewer tokens never
        costs more than one over more: it could be padded), and a length not measured costs
        what the longest measured length below it does (the shortest measured one, below all).
        That is optimistic on purpose: the schedule tries lengths it has not measured, and
        from then on their real cost is used.
        """
        if not self.target_pass:
            return None
        sizes = sorted(self.target_pass)
        envelope = [self.target_pass[n].value for n in sizes]
        for i in range(len(envelope) - 2, -1, -1):
            envelope[i] = min(envelope[i], envelope[i + 1])

        def cost(n: int) -> float:
            below = [i for i, size in enumerate(sizes) if size <= n]
            return envelope[below[-1]] if below else envelope[0]

        one = cost(1)
        if one <= 0:
            return 1.0
        return cost(tokens) / one


PRIOR_KEPT, PRIOR_TESTS = 2.0, 3.0


class AdaptiveDraftLength:
    """smoothing: weight of the newest step in the acceptance estimate (older steps decay by
    1 - smoothing each step); min_tests: keep tests to see before the theory may cap k."""

    def __init__(
        self,
        max_k: int = 16,
        *,
        start_k: int | None = None,
        probe_every: int = 8,
        smoothing: float = 0.2,
        min_tests: int = 12,
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
        self.kept_weight = 0.0  # decayed counts of kept drafts and of keep tests
        self.test_weight = 0.0
        self.tests_seen = 0
        self.min_tests = min_tests
        self.paused = False
        self.best_k = max_k  # the theory's best k for the measured alpha and costs
        self.steps = 0

    def next_lengths(self, batch: int) -> torch.Tensor:
        if self.row_k is None or len(self.row_k) != batch:
            self.row_k = torch.full((batch,), self.start_k, dtype=torch.int64)
        self.steps += 1
        if self.paused:
            probe = self.steps % self.probe_every == 0
            return torch.full((batch,), 1 if probe else 0, dtype=torch.int64)
        return self.row_k.clamp(max=self.best_k)

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
        # Per-test acceptance: each kept draft passed a keep test, each rejection failed one.
        kept = float(accepted[tried].sum())
        failed = float((accepted < drafted)[tried].sum())
        decay = 1 - self.smoothing
        self.kept_weight = decay * self.kept_weight + kept
        self.test_weight = decay * self.test_weight + kept + failed
        self.tests_seen += int(kept + failed)
        # A weak prior (PRIOR_KEPT of PRIOR_TESTS) keeps one unlucky early step from deciding.
        self.alpha = (self.kept_weight + PRIOR_KEPT) / (self.test_weight + PRIOR_TESTS)
        if self.tests_seen >= self.min_tests:
            self.paused = not self._drafting_pays(costs)

    def _drafting_pays(self, costs: StepCosts) -> bool:
        """Sets best_k from the theory; False when it is 0."""
        single = costs.target(1)
        if self.alpha is None or single is None:
            return True
        # A drafter without a model (n-gram lookup) records no draft passes: its c is 0, and only
        # the extra cost of verifying more tokens can make drafting lose.
        c = costs.draft_step.value / single if costs.draft_step.count else 0.0
        self.best_k = best_draft_length(
            min(self.alpha, 0.999),
            c,
            max_k=self.max_k,
            verify_cost=lambda k: costs.relative_pass_cost(k + 1) or 1.0,
        )
        return self.best_k > 0


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
