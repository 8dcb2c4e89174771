"""How many tokens to draft next, per row.

- FixedDraftLength(k): always k.
- AdaptiveDraftLength: a per-row schedule that grows by one after every draft of a row was kept
  and shrinks by one after a rejection (within [1, max_k]), capped by the batch-wide best k of
  the speedup theory (analysis.theory.best_draft_length) with the measured acceptance rate, the
  measured cost ratio c and the measured cost of target passes by length (their lower envelope,
  optimistic where a length was not measured yet: see StepCosts.relative_pass_cost). When the
  best k is 0, drafting does not pay: rows draft nothing (target-only steps) and one step in
  `probe_every` drafts start_k tokens to keep measuring. The draft length never depends on the
  target's future, so every choice here keeps verification exact.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from specsample.analysis.theory import best_draft_length


class FixedDraftLength:
    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k: expected an integer >= 0, got {k!r}")
        self.k = k

    def next_lengths(self, rows: int | Sequence[Hashable]) -> torch.Tensor:
        count = rows if isinstance(rows, int) else len(rows)
        return torch.full((count,), self.k, dtype=torch.int64)

    def update(self, *args: object) -> None:
        pass

    def forget(self, row: Hashable) -> None:
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


@dataclass
class _RowSchedule:
    """One request's schedule: its draft length and its decayed acceptance counts."""

    k: int
    kept_weight: float = 0.0
    test_weight: float = 0.0
    tests_seen: int = 0
    alpha: float | None = None
    paused: bool = False
    best_k: int = 0
    steps: int = 0


class AdaptiveDraftLength:
    """A schedule per request (rows are named by any hashable id, e.g. the engine's request ids;
    `next_lengths(batch)` with an int names them 0..batch-1). A request that joins starts from
    the prior (start_k, PRIOR_KEPT of PRIOR_TESTS); the measured costs are shared.

    smoothing: weight of the newest step in the acceptance estimate (older steps decay by
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
        self.min_tests = min_tests
        self.rows: dict[Hashable, _RowSchedule] = {}
        self._measure_single_pass = False  # the next step is target-only, to time a 1-token pass
        self._single_pass_requested = False

    def schedule(self, row: Hashable) -> _RowSchedule:
        if row not in self.rows:
            self.rows[row] = _RowSchedule(k=self.start_k, best_k=self.max_k)
        return self.rows[row]

    def forget(self, row: Hashable) -> None:
        self.rows.pop(row, None)

    def next_lengths(self, rows: int | Sequence[Hashable]) -> torch.Tensor:
        ids = list(range(rows)) if isinstance(rows, int) else list(rows)
        if self._measure_single_pass:
            # One target-only step as soon as drafting has been measured: the theory needs the
            # cost of a 1-token target pass to tell whether drafting pays at all.
            self._measure_single_pass = False
            return torch.zeros(len(ids), dtype=torch.int64)
        out = []
        for row in ids:
            state = self.schedule(row)
            state.steps += 1
            if state.paused:
                # A probe drafts start_k tokens: enough keep tests for one request's decayed
                # estimate to climb past the prior when drafting pays again.
                out.append(self.start_k if state.steps % self.probe_every == 0 else 0)
            else:
                out.append(min(state.k, state.best_k))
        return torch.tensor(out, dtype=torch.int64)

    def update(self, *args: object) -> None:
        """update(rows, drafted, accepted, costs), or update(drafted, accepted, costs) for rows
        0..batch-1: drafted, accepted int64 [batch] for the step just verified."""
        if len(args) == 3:
            drafted, accepted, costs = args
            rows: Sequence[Hashable] = range(len(drafted))
        else:
            rows, drafted, accepted, costs = args
        drafted_any = False
        for row, d, a in zip(rows, drafted.tolist(), accepted.tolist(), strict=True):
            if d > 0:
                drafted_any = True
                self._update_row(self.schedule(row), d, a, costs)
        if drafted_any and costs.target_pass and 1 not in costs.target_pass:
            self._measure_single_pass = not self._single_pass_requested
            self._single_pass_requested = True

    def _update_row(self, state: _RowSchedule, drafted: int, accepted: int, costs: StepCosts):
        if not state.paused:
            state.k = max(1, min(self.max_k, state.k + (1 if accepted == drafted else -1)))
        # Per-test acceptance: each kept draft passed a keep test, each rejection failed one.
        failed = 1 if accepted < drafted else 0
        decay = 1 - self.smoothing
        state.kept_weight = decay * state.kept_weight + accepted
        state.test_weight = decay * state.test_weight + accepted + failed
        state.tests_seen += accepted + failed
        # A weak prior (PRIOR_KEPT of PRIOR_TESTS) keeps one unlucky early step from deciding.
        state.alpha = (state.kept_weight + PRIOR_KEPT) / (state.test_weight + PRIOR_TESTS)
        if state.tests_seen >= self.min_tests:
            state.paused = not self._drafting_pays(state, costs)

    def _drafting_pays(self, state: _RowSchedule, costs: StepCosts) -> bool:
        """Sets the row's best_k from the theory; False when it is 0."""
        single = costs.target(1)
        if state.alpha is None or single is None:
            return True
        # A drafter without a model (n-gram lookup) records no draft passes: its c is 0, and only
        # the extra cost of verifying more tokens can make drafting lose.
        c = costs.draft_step.value / single if costs.draft_step.count else 0.0
        state.best_k = best_draft_length(
            min(state.alpha, 0.999),
            c,
            max_k=self.max_k,
            verify_cost=lambda k: costs.relative_pass_cost(k + 1) or 1.0,
        )
        return state.best_k > 0


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
