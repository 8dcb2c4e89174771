"""How many tokens to draft next, per row.

- FixedDraftLength(k): always k.
- AdaptiveDraftLength: costs first, then acceptance.

  1. Costs. The first steps are target-only until FIRST_SINGLE_PASSES = 3 1-token target passes
     are timed (at no extra cost; the first passes after loading run slow, and the costs are
     priced against the fastest of them), the next drafts PROBE_LENGTH - 1 = 4 tokens per row
     (the probe: four draft passes and a 5-token pass), and the probe is repeated until the
     costs decide (a "no" needs two samples of every cost it rests on, so that one slow first
     pass cannot decide). From then on the
     policy knows the draft cost ratio c and the relative cost r(n) of a target pass over n tokens
     (measured lengths; longer ones extrapolated along the chord from 1 to the longest measured, see
     StepCosts.relative_pass_cost). If no draft length pays even when every draft is kept
     (alpha = 1: (k + 1) / (k c + r(k + 1)) <= MARGIN = 1.1 for every k: a best case a hair
     above target-only loses to what modelled costs leave out), drafting cannot pay on this machine
     whatever the drafts: every row goes target-only for the rest of the engine's life (pass costs
     are the machine's, not the text's; a "no" stands until a step drafts again). On a
     compute-bound CPU (llama.cpp on 2 cores: a 2-token pass costs 1.7 times a 1-token pass and a
     draft pass 0.45 of it) this settles in five steps, and a "yes" (transformers on CPUs) in
     four. The verdict, "yes" as well as "no", rests on the probe: where a 2-token pass costs
     a jump over 1 token and longer ones little more (transformers on CPUs: 1.7x for 2 tokens,
     2.5x for 5, 2.8x for 16) the chord from 1 to 2 would say no wrongly, and after a "yes"
     from 2-token passes alone the schedule would price every longer draft along that chord and
     never draft more than one token (it never times a length it does not choose); lengths
     between measured ones are interpolated. (Two one-token drafting steps used to come before
     the probe; they added two steps to every check and decided nothing the probe did not.) A
     drafter that stops short of the probe's 4 drafts is given PROBE_ATTEMPTS probe steps. With
     `recheck_every` set, one step drafts one token
     after that many steps to measure again (the gap doubles after every recheck that confirms the
     verdict, up to MAX_GAP steps). Not the default: a recheck makes the draft model catch up on
     every token since the last one, which on a compute-bound CPU costs a good part of the target's
     time for those tokens (on the default pair on 2 cores, with rechecks from 64 steps, the model
     drafter ran at 0.78x llama.cpp target-only where no drafter ran at 0.95x).
     The verdict rests on modelled step costs (medians of passes, c per draft pass); real
     drafting steps can cost more (a draft pass that feeds the tokens a step committed covers
     several tokens, the machine slows down). So after a "yes" the policy also adds up the
     real drafting steps of that batch size: once GUARD_STEPS of them are in, if they took at
     least as long as target-only passes would have for the most tokens they could have emitted
     (every draft kept, plus one per row: sum over steps of sum_b (d_b + 1) against
     rows * step seconds / the fastest 1-token pass seen), the verdict turns to "no" just as
     a cost check's would (it rests on costs alone, not on what was kept). On 2 cores, where a
     "yes" near the break-even from the modelled costs once made a run draft throughout at
     0.7x target-only, this ends it after GUARD_STEPS drafting steps. With fewer than
     RETIME_BELOW 1-token passes timed, the step before that judgment is target-only (after a
     cold load the cost check's first 1-token passes can all be slow, and then every drafting
     step looks as if it paid: a cold first run on llama.cpp drafted all of its 128 tokens at
     0.7x target-only).
     Pass costs are the machine's, so they can be kept across processes: `recall` starts
     from a CostMemory (engine.memory) of the same setting, its verdict and costs per batch
     size, checks the first pass of each remembered batch size against it (dropping it when
     that pass and the next both say the machine runs at another speed) and writes it on
     every verdict change and whenever a pass length is timed for the first time or becomes
     trusted (TRUST_SAMPLES), so a later process starts from the whole cost curve this one
     learned, not the probe's part of it (on transformers with a memory written at the
     verdict only, the first drafting steps of each later run were offered 3, 3 and 9
     drafts while the curve was timed anew). The command line's default: its runs after a
     setting's first need no probes. The memory keeps the cost check's verdict, never a "no"
     from the check of real drafting steps: that one counts the drafts the drafter chose,
     which its stops cut short where the text is hard to guess, so it is the text's as much as
     the machine's (kept, one prose prompt turned drafting off for every later run of the
     setting: on transformers with the int8 draft, code prompts then decoded target-only at
     0.97-1.03x where a run without the memory drafted at 1.44-1.78x).
  2. Acceptance. Where drafting can pay, each row keeps a schedule that doubles after every
     draft of a row was kept and halves after a rejection (but not below one more than the
     drafts kept; within [1, max_k]; on transformers on CPUs, where a 16-token pass costs 2.8
     1-token passes, growing by one at a time left runs of kept drafts short), capped by the
     row's best k: the most expected tokens per unit of step cost (lengths up to EXPLORE_REACH
     times the longest timed one priced like it, so kept drafts lead to longer ones being tried
     and timed), with the acceptance counted by draft position (a_i: the rate at position i
     given the drafts before it were kept; runs of near-certain tokens make deeper positions
     likelier to pass, which a single rate misses), each position's prior the rates pooled over
     all rows (2/3 before any keep test). Before min_tests keep tests the cap is at least 1.
     When the best k is 0 (after min_tests keep tests; before, from EARLY_TESTS on, only when
     no k pays even at the upper 95% bound of the row's keep rate) the row drafts nothing, and
     after `probe_every` steps it drafts one token to measure its acceptance again (the gap
     doubles after every probe that leaves it paused, up to MAX_GAP steps, and starts over
     when it drafts again). A paused row drafts again only once its estimates say drafting
     pays: a kept probe is evidence, not a verdict (under "theory"; see _update_row). The
     pooled rates start from a CostMemory's remembered keep counts where one is recalled
     (engine.memory).
     That is lengths="theory". With lengths="costs" (the default for a drafter that stops
     a row itself where it is unsure, such as the command line's model drafter) a row that
     drafts is offered the longest draft the pass costs justify were every draft kept, and
     the drafter's confidence and survival stops decide how much of it is drafted. A row
     is judged on what its drafting steps gained over target-only: tokens emitted less their
     cost in 1-token passes (accepted + 1 - (k c + r(k + 1)) per step, decayed sums; the
     theory's position rates miss how runs of kept drafts go on). It pauses only once they
     lose with confidence: the upper PAUSE_LEVEL bound of their mean gain (PAUSE_Z standard
     errors over the decayed steps) is below 0. A step gains anything from a pass lost to a
     dozen tokens won, so the mean of the last few steps dips below 0 through every few hard
     tokens; pausing on it (the rule before) stopped rows there and left them target-only
     through the long runs of kept drafts that followed (transformers, rename-vars at
     T = 0.7: 23-45 s per text against 23-34 s never pausing, with the story prompt, where
     no drafting pays, as fast either way). A paused row resumes once the mean gain is above
     0, and its probes offer that same longest draft; the theory still cuts a batch's depth.
     On transformers on 2 cores (a 16-token pass 2.8x a 1-token one) the schedule's caps,
     which follow the keep rates a few steps late, kept drafts short where transformers'
     assisted generation (20 drafts, the same confidence stop) drafted long and won.
  3. Batch depth. A step drafts as deep as its deepest row, so the rows' lengths are cut to the
     depth with the most expected tokens over the batch per unit of step cost (at least 1).
  4. Fitting the pass (`fit_passes`, default on; chains). Once a step's drafts are made their
     draft passes are paid for, and what is left to choose is the pass that verifies them:
     `trim` keeps the width W in 0..max(depths) with the most expected tokens over the batch
     per unit of that pass's cost, sum_b E_b(min(d_b, W)) / r(W + 1) (widths past the
     longest timed one priced like it: verifying them times them), never below a probing
     row's draft; W = 0 makes the step target-only. E_b comes from the row's position rates,
     none below the upper TRIM_LEVEL bound of its keep rate: a cut verifies nothing, so
     nothing corrects an estimate that cuts (at the plain estimates, a row whose first draft
     was rejected stayed cut for the rest of the run). Where a drafter's stops leave a short
     draft on a machine whose 2-token pass costs about two 1-token ones, a draft worth less
     than its pass is dropped instead of verified (the row still pays for its draft passes:
     under "costs" they count against it, and steps whose drafts were cut whole count towards
     its pause). And the engine feeds a pass over n tokens as a wider one where a trusted
     wider length was timed at least PAD_GAIN cheaper (StepCosts.pad_width; filler tokens
     whose cache entries the next step rolls back): float32 matrix kernels on CPUs can make
     passes over some token counts dear (on one 2-core machine 3 tokens cost 2.89 1-token
     passes, 4 tokens 2.02, 7 tokens 2.95, 8 tokens 1.98), and the lower envelope the
     schedule prices lengths with assumes exactly this padding. Both depend on the drafts and
     past steps alone, not on this step's target distributions, so verification stays exact.

Costs: kept per batch size (batch_bucket: 1, 2, 4, 8, ... rows), each with its own cost check
and verdict (the engine's costs_by_batch), a "no" carried to bigger batches; a target pass's
cost includes verifying its tokens; the schedule trusts a pass length after TRUST_SAMPLES
timings (before that, one slow pass cannot price it out); see docs/theory.md. A target whose
batch passes feed each row's own tokens (`ragged_passes`: llama.cpp, which takes a flat batch
of every row's tokens and pads nothing) costs by all rows' tokens, not by its widest row: the
engine keeps such a pass as the full pass over ceil(tokens / rows) tokens per row it stands
for (full_pass_equivalent), and batch depth and trim price a step by the mean tokens per row
it feeds, read off that full-pass curve between whole widths (ragged_pass_cost). Kept by its
widest row instead, a 4-row pass where one row drafted 2 tokens (6 tokens, 1.5x a 1-token
pass on 2 cores) priced a 3-token pass over every row (12 tokens, 3x) at 1.5x, and the lower
envelope then priced every narrower width as cheap.

The draft length never depends on the target's future, so every choice here keeps verification
exact.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

COST_WINDOW = 16  # a measured cost is the median of its last COST_WINDOW samples
MAX_GAP = 1024  # the longest wait between probes of a paused row and between cost rechecks
# The schedule trusts a target pass length's cost once it was timed this many times (its median
# then ignores one slow pass); until then the length is priced optimistically, so it is tried again.
TRUST_SAMPLES = 3
# The cost check starts with target-only steps until this many 1-token passes are timed (they
# cost nothing: target-only decoding makes the same passes) and prices every cost against the
# fastest of them. The first passes after loading run slow (on a 2-core Intel Xeon: 144 and
# 95 ms, then 75 to 90 ms), and against a slow 1-token pass drafting looks cheap: with two, a
# cost check there said "yes" at 1.2x (1.015x at a warm pass) and a first run drafted at 0.71x
# target-only.
FIRST_SINGLE_PASSES = 3
# The cost check times one pass over this many tokens (4 drafts) before its verdict; after
# PROBE_ATTEMPTS probe steps whose drafts all stopped short (a drafter's confidence stop, an
# n-gram drafter without a match) it decides with the lengths it has.
PROBE_LENGTH = 5
PROBE_ATTEMPTS = 3
# The schedule prices lengths up to EXPLORE_REACH times the longest measured one like that one
# (optimistic, so a row whose drafts are kept tries longer drafts and times them), past that
# along the chord.
EXPLORE_REACH = 2
# The check of real steps: once GUARD_STEPS steps drafted after a "yes", if those steps took at
# least as long as target-only would take for every token they could have emitted (each row's
# drafts all kept, plus one), drafting cannot pay here whatever the drafts: the verdict turns
# to "no" (module docstring).
GUARD_STEPS = 8
# The check of real steps compares them with target-only at the fastest 1-token pass seen; with
# fewer than RETIME_BELOW 1-token passes timed (the cost check's FIRST_SINGLE_PASSES can all be
# slow after a cold load: weights paged in from disk), the step before its judgment is
# target-only, to time one more (a slow 1-token pass makes every drafting step look as if it
# paid).
RETIME_BELOW = FIRST_SINGLE_PASSES + 1
# Past its first GUARD_STEPS steps the check keeps judging the steps since the "yes" against
# the fastest 1-token pass seen, but drafting steps time no 1-token pass: if every one was
# timed while the machine was slow, that baseline stays slow, and steps that lose at the
# machine's real speed look as if they paid (a main-command run on llama.cpp drafted to its
# end at 0.66x target-only). So while the steps pay by less than RETIME_MARGIN over the
# baseline, a step times a fresh 1-token pass at growing gaps: after 2, 4, 8, ... times
# GUARD_STEPS drafting steps. Steps that clearly pay (drafting on transformers: 2.7x and more
# over the baseline) are never interrupted.
RETIME_MARGIN = 1.3
# The cost check's "yes" needs some draft length to beat target-only by this factor when every
# draft is kept: modelled step costs leave out what real drafting steps add (a step's first
# draft pass feeds the tokens the last one committed, the verification, the engine's own work)
# and real drafts are not all kept, so a best case a hair above target-only loses in practice
# (llama.cpp on 2 cores with repacked weights: a "yes" at 1.008 drafted 8 steps at 0.79x
# target-only before the check of real steps ended it).
MARGIN = 1.1
# A row's schedule: k * GROWTH after a draft kept whole; after a rejection k // SHRINK (at most
# k - 1), but never below one more than the drafts kept.
GROWTH = 2
SHRINK = 2
# Before min_tests keep tests a row may pause early, on strong evidence only: once it saw
# EARLY_TESTS tests or more and drafting does not pay even at the highest keep rate its counts
# leave plausible (the one-sided EARLY_LEVEL upper bound of a binomial rate from its kept of
# its tests). A row whose drafts are almost never kept (an n-gram drafter on text without
# repeats) stops paying for them after a few tests instead of min_tests; a row that kept a
# few drafts goes on to min_tests. A paused row is probed again later, as any other.
EARLY_TESTS = 4
EARLY_LEVEL = 0.95
# Padding: a pass over n tokens is fed as a wider one when a trusted longer width costs at least
# PAD_GAIN less (StepCosts.pad_width; module docstring, part 4).
PAD_GAIN = 0.1
# trim() prices a row's drafts at the one-sided upper TRIM_LEVEL bound of its keep rate
# (TRIM_Z: its normal quantile), so that it cuts only what even a high plausible rate would not
# pay for.
TRIM_LEVEL = 0.95
TRIM_Z = 1.6449
# lengths="costs": a drafting row pauses once the upper PAUSE_LEVEL bound of its steps' mean
# gain over target-only (PAUSE_Z: its normal quantile) is below 0 (_gain_upper_bound).
PAUSE_LEVEL = 0.95
PAUSE_Z = 1.6449


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


def batch_bucket(rows: int) -> int:
    """The batch sizes whose costs are kept together: 1, 2, 4, 8, ... (rows rounded up to a
    power of two)."""
    return 1 << max(0, rows - 1).bit_length()


class StepCosts:
    """Measured costs (seconds): a draft forward pass, and a target pass by the number of tokens
    it scored per row. Each is the median of its last COST_WINDOW samples: robust to one slow
    pass (a warm-up, a busy machine), and it follows the machine when its speed changes."""

    def __init__(self):
        self.draft_step = _Recent()
        self.target_pass: dict[int, _Recent] = {}
        # wall seconds of the step just recorded (draft passes, target pass, verification):
        # what the policy's check of drafting steps against target-only compares
        self.last_step_seconds: float | None = None
        # (tokens, seconds) of the last target pass added to this object (not copied: a copy
        # or costs read from a memory have timed no pass of their own yet)
        self.last_pass: tuple[int, float] | None = None

    def copy(self) -> StepCosts:
        """An independent copy of the samples (not of last_step_seconds: no step of its own)."""
        twin = StepCosts()
        twin.draft_step = self.draft_step.copy()
        twin.target_pass = {n: recent.copy() for n, recent in self.target_pass.items()}
        return twin

    def samples(self) -> dict[str, object]:
        """The windows' samples, as a CostMemory keeps them (JSON: string keys)."""
        return {
            "draft_step": list(self.draft_step.samples),
            "target_pass": {str(n): list(r.samples) for n, r in sorted(self.target_pass.items())},
        }

    @classmethod
    def from_samples(cls, entry: dict) -> StepCosts:
        """The costs `samples()` wrote (a CostMemory entry); malformed values raise ValueError
        or TypeError."""
        costs = cls()
        for value in entry.get("draft_step", []):
            costs.draft_step.add(_seconds(value))
        for tokens, values in entry.get("target_pass", {}).items():
            if int(tokens) < 1:
                raise ValueError(f"target_pass: expected pass lengths >= 1, got {tokens!r}")
            for value in values:
                costs.add_target_pass(int(tokens), _seconds(value))
        return costs

    def keep_only(self, tokens: int, seconds: float | None) -> None:
        """Forgets every sample but one pass over `tokens` of `seconds` (None: that one too)."""
        self.draft_step = _Recent()
        self.target_pass = {}
        if seconds is not None:
            self.add_target_pass(tokens, seconds)

    def add_target_pass(self, tokens: int, seconds: float) -> None:
        self.target_pass.setdefault(tokens, _Recent()).add(seconds)
        self.last_pass = (tokens, seconds)

    def pad_width(self, tokens: int, min_samples: int = TRUST_SAMPLES) -> int:
        """The width to feed a target pass over `tokens` tokens per row: the shortest longer
        width, timed at least min_samples times, whose passes cost at most 1 - PAD_GAIN of
        `tokens`' own (timed as often), else `tokens`. Matrix kernels on CPUs can make a pass
        over more tokens cheaper than one over fewer (on one 2-core machine a 3-token float32
        pass cost 2.9 1-token passes and a 4-token one 2.0); fed with filler tokens, whose
        cache entries the next step rolls back, the shorter pass costs the longer one's time.
        The filler changes nothing the drafts' verification reads (the target's distribution at
        a position comes from the tokens before it)."""
        own = self.target_pass.get(tokens)
        if own is None or own.count < min_samples or own.value <= 0:
            return tokens  # not trusted yet, or timed as free (a coarse clock): nothing to gain
        limit = own.value * (1 - PAD_GAIN)
        for n in sorted(self.target_pass):
            recent = self.target_pass[n]
            if n > tokens and recent.count >= min_samples and recent.value <= limit:
                return n
        return tokens

    def target(self, tokens: int) -> float | None:
        if tokens in self.target_pass:
            return self.target_pass[tokens].value
        known = sorted(self.target_pass)
        if not known:
            return None
        nearest = min(known, key=lambda n: abs(n - tokens))
        return self.target_pass[nearest].value

    def relative_pass_cost(
        self, tokens: int, min_samples: int = 1, interpolate: bool = False, explore: bool = False
    ) -> float | None:
        """Cost of a target pass over `tokens` tokens divided by a pass over 1, from the measured
        costs; None before any pass.

        Measured costs are not a line: on CPUs matrix kernels change with the number of rows
        (passes over 1-3 tokens may cost the same, and 13 tokens more than 20). So up to the
        longest measured length the estimate is the lower envelope of the measured costs (a
        pass over fewer tokens never costs more than one over more: it could be padded), and a
        length not measured costs what the longest measured length below it does (the
        shortest measured one, below all): optimistic, so the schedule tries it and from then
        on its real cost is used. Past the longest measured length m the cost grows along the
        chord from 1 token to m tokens, r(m) + (n - m) (r(m) - 1) / (m - 1): flat where the
        measured curve is flat (a GPU), steep where every token costs (a compute-bound CPU),
        so one measured 2-token pass is enough to see that longer drafts cannot pay there.
        With only one length measured, or no 1-token pass, the cost is flat past m.

        min_samples: lengths (other than 1) timed fewer times than this are left out of the
        curve, and such a length costs the lesser of the curve's estimate and its own median:
        one slow pass (the machine busy for a moment) must not price a length out for good,
        since a length the schedule stops choosing is never timed again. Until some length
        of 2 or more was timed that often, every measured length is used.
        """
        if not self.target_pass:
            return None
        sizes = [
            n
            for n in sorted(self.target_pass)
            if n == 1 or self.target_pass[n].count >= min_samples
        ]
        if not any(n >= 2 for n in sizes):  # no longer pass timed often enough: use them all
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
        longest = sizes[-1]
        if interpolate and sizes[0] <= tokens < longest and tokens not in sizes:
            # the cost check: the straight line between the measured lengths around it, not
            # the optimistic step (a verdict must not rest on a length never timed)
            below = max(i for i, size in enumerate(sizes) if size < tokens)
            low, high = sizes[below], sizes[below + 1]
            share = (tokens - low) / (high - low)
            estimate = (envelope[below] + share * (envelope[below + 1] - envelope[below])) / one
        elif tokens <= longest or longest == 1 or sizes[0] != 1:
            estimate = cost(tokens) / one
        else:
            slope = max(0.0, (envelope[-1] / one - 1.0) / (longest - 1))
            reach = EXPLORE_REACH * longest if explore else longest
            estimate = envelope[-1] / one + max(0, tokens - reach) * slope
        if tokens in self.target_pass and tokens not in sizes:
            estimate = min(estimate, self.target_pass[tokens].value / one)
        return estimate


def ragged_pass_cost(costs: StepCosts, mean_tokens: float, longest: int | None = None) -> float:
    """What a ragged batch pass (a model with `ragged_passes`: each row fed its own tokens,
    `mean_tokens` per row on average) costs relative to a 1-token pass: the full-pass curve
    (the costs are kept as passes feeding every row alike, `full_pass_equivalent`) read between
    the whole widths around the mean; lengths past `longest` priced as it (None: as
    `relative_pass_cost` extends the curve). On a compute-bound CPU one row's draft among four
    then costs a quarter of a full 2-token pass's extra; on a flat curve (a GPU) nothing, as
    there."""
    low = max(1, math.floor(mean_tokens))
    high = max(low, math.ceil(mean_tokens))

    def cost(tokens: int) -> float:
        if tokens <= 1:
            return 1.0
        if longest is not None:
            tokens = min(tokens, longest)
        return costs.relative_pass_cost(tokens, TRUST_SAMPLES) or 1.0

    return cost(low) + (mean_tokens - low) * (cost(high) - cost(low))


def full_pass_equivalent(
    width: int, seconds: float, tokens: int, rows: int, single: float | None
) -> tuple[int, float]:
    """A target pass as the costs keep it: by tokens per row (`width`: its widest row's) and
    seconds. A ragged pass (a model with `ragged_passes`: `tokens` over `rows` fed rows, not
    padded) stands for the full pass over ceil(tokens / rows) tokens per row, its extra time
    over a 1-token pass (`single`: its seconds now) scaled to that pass's extra tokens. Kept
    under its widest row instead, a batch-4 pass where one row drafted 2 tokens (6 tokens) was
    priced as a 3-token pass over every row (12) and made every wider pass look cheap."""
    if rows <= 1 or single is None or tokens <= rows:
        return width, seconds
    full = -(-tokens // rows)
    if tokens == full * rows:
        return full, seconds
    extra = max(0.0, seconds - single) * rows * (full - 1) / (tokens - rows)
    return full, single + extra


def _timed_lengths(costs: StepCosts) -> set[tuple[int, bool]]:
    """The target pass lengths timed, each with whether the schedule trusts it yet
    (TRUST_SAMPLES): what a cost memory is written again for when it grows."""
    return {(n, r.count >= TRUST_SAMPLES) for n, r in costs.target_pass.items()}


LENGTH_RULES = ("auto", "theory", "costs")  # AdaptiveDraftLength's `lengths`
PRIOR_KEPT, PRIOR_TESTS = 2.0, 3.0
MAX_REMEMBERED_POSITIONS = 32  # draft positions whose pooled keep counts a CostMemory keeps
DEPTH_PRIOR_TESTS = 1.0  # the weight of a deeper position's prior (module docstring)


@dataclass
class _RowSchedule:
    """One request's schedule: its draft length and its decayed acceptance counts (the prior's
    weight decays with them, so the estimate can reach any measured rate)."""

    k: int
    kept_weight: float = 0.0
    test_weight: float = 0.0
    prior_weight: float = 1.0
    tests_seen: int = 0
    kept_seen: int = 0
    alpha: float | None = None
    paused: bool = False
    best_k: int = 0
    steps: int = 0
    probe_gap: int = 0  # steps from one probe to the next while paused (0: not paused yet)
    # decayed keep tests run and passed at each draft position (position i is tested when the
    # row drafted past i and kept every draft before it)
    position_tests: list[float] = field(default_factory=list)
    position_kept: list[float] = field(default_factory=list)
    # lengths="costs": the row's drafting steps, decayed like its keep tests: tokens they
    # emitted, and what they cost in 1-token target passes (k c + r(k + 1) each)
    emitted_weight: float = 0.0
    cost_weight: float = 0.0
    # and, decayed alike, the squares of each step's gain (emitted - cost), the steps and the
    # squares of their weights (the mean gain's spread: _gain_upper_bound)
    gain_squares: float = 0.0
    step_weight: float = 0.0
    step_weight_squares: float = 0.0
    cut_steps: int = 0  # steps whose drafts trim() cut whole (nothing verified)
    cut_streak: int = 0  # such steps since the row last verified a draft

    def position_rates(self, max_k: int, priors: list[float] | None = None) -> list[float]:
        """Acceptance rate at each draft position 0..max_k-1, given every draft before it was
        kept. Acceptance is not independent from one position to the next (code has long runs
        of near-certain tokens: a row that kept three drafts likely keeps the fourth), so each
        position has its own estimate. Position 0 starts from its prior (priors[0], else
        PRIOR_KEPT / PRIOR_TESTS) with PRIOR_TESTS tests' weight, fading as the row's alpha
        does; a deeper position from priors[i] (else the estimate of the position before it)
        with DEPTH_PRIOR_TESTS tests' weight, so a position tested rarely follows its prior
        and one tested a few times follows its own counts (with smoothing 0.2 a position's
        decayed tests never exceed 5)."""
        rates = []
        before = None
        for i in range(max_k):
            tests = self.position_tests[i] if i < len(self.position_tests) else 0.0
            kept = self.position_kept[i] if i < len(self.position_kept) else 0.0
            if before is None:
                prior = PRIOR_KEPT / PRIOR_TESTS if priors is None else priors[0]
                weight = PRIOR_TESTS * self.prior_weight
            else:
                prior, weight = before if priors is None else priors[i], DEPTH_PRIOR_TESTS
            rate = (kept + prior * weight) / (tests + weight) if tests + weight > 0 else prior
            before = min(rate, 0.999)
            rates.append(before)
        return rates


class AdaptiveDraftLength:
    """A schedule per request (rows are named by any hashable id, e.g. the engine's request ids;
    `next_lengths(batch)` with an int names them 0..batch-1). A request that joins starts from
    the prior (start_k, PRIOR_KEPT of PRIOR_TESTS); the measured costs are shared, and so is
    the verdict of the cost check (module docstring).

    smoothing: weight of the newest step in the acceptance estimate (older steps decay by
    1 - smoothing each step); min_tests: keep tests to see before the theory may pause a row;
    early_tests: before min_tests, keep tests to see before a row may pause on strong evidence
    (no draft length pays even at the upper EARLY_LEVEL bound of its keep rate; None: never
    before min_tests); probe_every: a newly paused row drafts one token after probe_every
    steps (then after twice as many, ...); recheck_every: None (default) keeps a "drafting
    cannot pay" verdict; an int makes one step draft one token after that many steps to
    measure the costs again (then after twice as many, ...).

    lengths: how long a row that drafts drafts. "theory": its schedule capped by its best k
    (part 2 of the module docstring). "costs": the longest draft the pass costs justify were
    every draft kept (the k in 1..max_k with the most (k + 1) / (k c + r(k + 1)), longer on a
    tie), for a drafter that stops a row itself where it is unsure (a model drafter's
    confidence and survival stops): the drafter's own probabilities then decide how much of
    it is drafted, step by step, which the row's past keep rates (what "theory" goes by) can
    only follow a few steps late, and where passes cost little more for more tokens
    (transformers on CPUs, accelerators) long drafts cost little when they stop early. Rows
    pause once their drafting steps lose to target-only with confidence (module docstring),
    and a batch's depth is still cut as part 3 says. "auto" (default): "costs" when the
    engine's drafter says it stops itself (`stops_itself`), else "theory".

    fit_passes: True (default): the drafts made are cut to the width worth its pass (`trim`)
    and the engine feeds a pass as a wider one where that was timed cheaper (module
    docstring, part 4); False: every draft made is verified, in a pass as wide as it is."""

    def __init__(
        self,
        max_k: int = 16,
        *,
        start_k: int | None = None,
        probe_every: int = 8,
        recheck_every: int | None = None,
        smoothing: float = 0.2,
        min_tests: int = 12,
        early_tests: int | None = EARLY_TESTS,
        lengths: str = "auto",
        fit_passes: bool = True,
    ):
        if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
            raise ValueError(f"max_k: expected an integer >= 1, got {max_k!r}")
        if start_k is not None and (
            isinstance(start_k, bool) or not isinstance(start_k, int) or start_k < 1
        ):
            raise ValueError(f"start_k: expected None or an integer >= 1, got {start_k!r}")
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every: expected an integer >= 1, got {probe_every!r}")
        if recheck_every is not None and (
            isinstance(recheck_every, bool)
            or not isinstance(recheck_every, int)
            or recheck_every < 1
        ):
            raise ValueError(
                f"recheck_every: expected None or an integer >= 1, got {recheck_every!r}"
            )
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing: expected a number in (0, 1], got {smoothing!r}")
        if early_tests is not None and (
            isinstance(early_tests, bool) or not isinstance(early_tests, int) or early_tests < 1
        ):
            raise ValueError(f"early_tests: expected None or an integer >= 1, got {early_tests!r}")
        self.max_k = max_k
        self.start_k = min(start_k or 4, max_k)
        self.probe_every = probe_every
        self.recheck_every = recheck_every
        self.smoothing = smoothing
        self.min_tests = min_tests
        self.early_tests = early_tests
        if lengths not in LENGTH_RULES:
            raise ValueError(f"lengths: expected one of {list(LENGTH_RULES)}, got {lengths!r}")
        self.lengths = lengths
        if not isinstance(fit_passes, bool):
            raise ValueError(f"fit_passes: expected True or False, got {fit_passes!r}")
        self.fit_passes = fit_passes
        # set by the engine from its drafter (its `stops_itself`): what lengths="auto" follows
        self.drafter_stops_itself = False
        # set by the engine from its target (`ragged_passes`): a batch pass costs by all rows'
        # tokens, so a step where few rows draft is priced below a full pass of its width
        self.ragged_passes = False
        self.rows: dict[Hashable, _RowSchedule] = {}
        # Per batch size (batch_bucket): None until the costs are known (three 1-token passes, and
        # a pass that scored drafts); then whether some draft length could pay if every draft
        # were kept. The costs are those the update of a step of that size brought.
        self.verdicts: dict[int, bool | None] = {}
        # per batch size, the cost check's own verdict (or the remembered one): what the cost
        # memory keeps. A "no" from the check of real drafting steps stays in this process: it
        # rests on the drafts the drafter chose, which depend on the text as well
        self._cost_verdicts: dict[int, bool | None] = {}
        self.bucket_costs: dict[int, StepCosts] = {}
        self.can_pay: bool | None = None  # the verdict for the batch size of the last call
        self._bucket = 1  # the batch size (bucket) of the last call
        self._probe_steps: dict[int, int] = {}  # per bucket: probe steps asked for
        # per bucket, the drafting steps since its "yes": [steps, tokens they could have
        # emitted, rows x seconds they took (what target-only would have spent on as many rows)]
        self._real_steps: dict[int, list[float]] = {}
        self._retime: set[int] = set()  # batch sizes whose next step times a 1-token pass
        # per batch size, the drafting step of the tally at which the next fresh 1-token pass
        # is due while the real steps pay by less than RETIME_MARGIN
        self._retime_due: dict[int, int] = {}
        self._costs: StepCosts | None = None  # the costs for the batch size of the last call
        self._since_check = 0
        self._check_gap = recheck_every
        # trim(): rows whose drafts it cut, with the drafts they made (update() counts the
        # draft passes of the cut drafts as paid for); the paused rows probing this step
        self._proposed: dict[Hashable, int] = {}
        self._probing: set[Hashable] = set()
        # every row's keep tests by position, pooled: the prior of a row's position rates (a
        # request that joins starts from what recent requests kept, not from a fixed 2/3)
        self.pooled = _RowSchedule(k=0)
        # recall(): the position-0 keep rate the memory's pooled counts give (the prior share
        # of trim's keep-rate bound for every row; None: PRIOR_KEPT / PRIOR_TESTS), and whether
        # keep tests ran since the memory was last written
        self._keep_prior: float | None = None
        self._keep_changed = False
        # recall(): the memory written on every verdict change, and per batch size the
        # remembered costs that this process's first pass of that size is checked against
        self.memory = None
        self._recalled: dict[int, StepCosts] = {}
        # per batch size, the first pass that did not match its memory (_check_recalled), and
        # whether it was faster than the memory says
        self._mismatched: dict[int, tuple[int, float]] = {}
        self._mismatched_faster: dict[int, bool] = {}
        # per batch size, the pass lengths the memory holds (see _timed_lengths)
        self._saved_lengths: dict[int, set[tuple[int, bool]]] = {}

    @property
    def stopped(self) -> bool:
        """Drafting cannot pay at any batch size for the rest of the engine's life: a "no" for
        one row (it carries to every bigger batch) and no rechecks. The engine then lets the
        draft model drop its rows (a batch size whose own check said yes would instead make it
        prefill every row again each time the batch came back to it)."""
        return self.recheck_every is None and self.verdicts.get(1) is False

    def recall(self, memory) -> bool:
        """Starts from the pass costs and verdicts a CostMemory (engine.memory) kept from earlier
        processes with the same setting, and writes it on every verdict change and every new
        (or newly trusted) pass length from now on.
        The first step of a remembered batch size is priced against the memory: if its target
        pass (1 token after a "no", a drafting step's width after a "yes") costs what the
        remembered costs say (at most memory.MATCH_FACTOR times their median, at least their
        fastest 1-token pass's share divided by it) the remembered verdict
        and costs stand (no probes, and after a "no" no draft prefill); if neither it nor the
        next pass does, they are dropped and its cost check starts over. True when some entry
        was taken. A policy takes one memory: a second recall raises RuntimeError."""
        from specsample.engine.memory import CostMemory

        if not isinstance(memory, CostMemory):
            raise TypeError(f"memory: expected a CostMemory, got {type(memory).__name__}")
        if self.memory is not None:
            # a second memory would be merged into the first (its batch sizes overwriting, its
            # keep counts replacing) and both written with what neither measured
            raise RuntimeError(
                f"recall: expected a policy without a memory, got one that recalled "
                f"{str(self.memory.path)!r} already; a policy takes one memory"
            )
        self.memory = memory
        taken = False
        buckets, keep = memory.load_all()  # one read: both from the same write
        for bucket, entry in buckets.items():
            if bucket < 1:
                continue
            try:
                costs = StepCosts.from_samples(entry)
                verdict = entry.get("verdict")
            except (ValueError, TypeError, AttributeError):  # a damaged entry: not used
                continue
            single = costs.target_pass.get(1)
            if single is None or single.value <= 0 or verdict not in (True, False, None):
                continue
            self.bucket_costs[bucket] = costs
            self.verdicts[bucket] = self._cost_verdicts[bucket] = verdict
            self._recalled[bucket] = costs.copy()
            self._saved_lengths[bucket] = _timed_lengths(costs)
            taken = True
        if keep is not None:
            self._recall_keep(keep)
            taken = True
        memory.recalled = taken
        return taken

    def _recall_keep(self, keep: dict) -> None:
        """Seeds the pooled keep counts with the remembered ones, scaled to at most PRIOR_TESTS
        tests at position 0 (with the fixed prior making up the rest): a prior, which the
        rows' own tests outweigh within a few steps, not a verdict."""
        tests, kept = keep["tests"], keep["kept"]
        scale = min(1.0, PRIOR_TESTS / tests[0])
        self.pooled.position_tests = [t * scale for t in tests]
        self.pooled.position_kept = [k * scale for k in kept]
        self.pooled.prior_weight = max(0.0, 1.0 - tests[0] * scale / PRIOR_TESTS)
        self._keep_prior = self.pooled.position_rates(1)[0]

    def keep_state(self) -> dict[str, list[float]] | None:
        """What a CostMemory keeps of the keep tests: the pooled decayed counts by position
        (None before any test)."""
        tests = self.pooled.position_tests[:MAX_REMEMBERED_POSITIONS]
        if not tests or tests[0] <= 0:
            return None
        kept = self.pooled.position_kept[: len(tests)]
        return {"tests": [round(t, 6) for t in tests], "kept": [round(k, 6) for k in kept]}

    def memory_state(self) -> dict[int, dict]:
        """What a CostMemory keeps: per batch size with costs, the cost check's verdict (not a
        "no" from the check of real drafting steps) and cost samples."""
        return {
            bucket: {"verdict": self._cost_verdicts.get(bucket), **costs.samples()}
            for bucket, costs in self.bucket_costs.items()
        }

    def _check_recalled(self, bucket: int, costs: StepCosts) -> None:
        """The first target pass of a remembered batch size (costs.last_pass: its tokens per
        row and seconds) must cost what the remembered costs say a pass of that width costs
        (between remembered lengths, on the line between them). If it does not, the next pass
        is checked too: one slow pass (the machine busy for a moment) must not drop a memory.
        If that one does not either, the batch size's memory is dropped (its costs start from
        that pass, its verdict from the cost check), except a remembered "no" when the passes
        ran slower than remembered: it stands, with its costs (a "no" rests on cost ratios,
        not on the speed; a machine busier now than when the memory was written times the
        probes no better, and checking again would load and prefill the draft and probe for
        nothing: in a goal run on llama.cpp, runs whose memory was dropped that way ran at
        0.79-0.92x target-only). Passes faster than remembered still drop a "no": the memory
        may have been timed while the machine was busy."""
        from specsample.engine.memory import MATCH_FACTOR

        if costs.last_pass is self._mismatched.get(bucket):
            return  # no pass since the one that did not match
        remembered = self._recalled[bucket]
        width, fresh = costs.last_pass
        relative = remembered.relative_pass_cost(width, interpolate=True)
        single = remembered.target(1)
        expected = None if relative is None or single is None else relative * single
        faster = False
        if fresh is not None and expected is not None:
            # faster than the remembered median is checked against the fastest remembered
            # 1-token pass: the memory's samples include the slow first passes of a cold
            # process, and a warm one beating their median by 1.3x is the same machine
            # (recall takes only entries with a 1-token pass of positive median)
            floor = expected * min(1.0, remembered.target_pass[1].low / single)
            if floor / MATCH_FACTOR <= fresh <= expected * MATCH_FACTOR:
                del self._recalled[bucket]
                self._mismatched.pop(bucket, None)
                self._mismatched_faster.pop(bucket, None)
                return
            faster = fresh < floor / MATCH_FACTOR
        if bucket not in self._mismatched:
            self._mismatched[bucket] = costs.last_pass
            self._mismatched_faster[bucket] = faster
            return
        faster = self._mismatched_faster.pop(bucket) and faster  # both passes faster
        del self._recalled[bucket], self._mismatched[bucket]
        if self._cost_verdicts.get(bucket) is False and not faster:
            if self.memory is not None:
                self.memory.slower.append(bucket)
            return
        costs.keep_only(width, fresh)
        self.verdicts.pop(bucket, None)
        self._cost_verdicts.pop(bucket, None)
        if self.memory is not None:
            self.memory.dropped.append(bucket)

    def rates(self, state: _RowSchedule, positions: int) -> list[float]:
        """The row's acceptance rate at positions 0..positions-1, its prior the pooled rates."""
        return state.position_rates(positions, self.pooled.position_rates(positions))

    def schedule(self, row: Hashable) -> _RowSchedule:
        if row not in self.rows:
            state = _RowSchedule(k=self.start_k, best_k=self.max_k)
            if self._costs is not None:
                self._drafting_pays(state, self._costs)  # the cap at the prior's alpha
            self.rows[row] = state
        return self.rows[row]

    def forget(self, row: Hashable) -> None:
        self.rows.pop(row, None)
        if self.memory is not None and self._keep_changed:  # a request ended: keep its tests
            self._save_memory()

    def _save_memory(self) -> None:
        self.memory.save(self.memory_state(), keep=self.keep_state())
        self._keep_changed = False

    def _use_bucket(self, rows: int) -> int:
        """Selects the costs and verdict of this batch size. A batch size not settled yet
        takes a "no" from any smaller one: a bigger batch makes every pass more compute-bound,
        and drafting pays less, never more (so a server that found drafting cannot pay for one
        client does not try again for 2, 4, 8, ... clients)."""
        bucket = self._bucket = batch_bucket(rows)
        verdict = self.verdicts.get(bucket)
        if verdict is None and any(v is False for b, v in self.verdicts.items() if b < bucket):
            verdict = False
        self.can_pay = verdict
        self._costs = self.bucket_costs.get(bucket)
        return bucket

    def next_lengths(self, rows: int | Sequence[Hashable]) -> torch.Tensor:
        ids = list(range(rows)) if isinstance(rows, int) else list(rows)
        self._probing = set()
        self._use_bucket(len(ids))
        if self.can_pay is None:
            # Target-only steps time 1-token target passes for free (FIRST_SINGLE_PASSES); then
            # probe steps draft probe_length - 1 tokens per row (a draft pass per token and a
            # probe_length-token pass) until the costs decide: a "yes" after one, a "no" after
            # two (it needs two samples). Passes over fewer tokens are priced between the
            # measured lengths; a 2-token pass alone would overstate longer ones where it
            # costs a jump over 1 token and more tokens little more (transformers on CPUs:
            # 1.7x for 2, 2.5x for 5).
            costs = self._costs
            single = None if costs is None else costs.target_pass.get(1)
            if single is None or single.count < FIRST_SINGLE_PASSES:
                return torch.zeros(len(ids), dtype=torch.int64)
            self._probe_steps[self._bucket] = self._probe_steps.get(self._bucket, 0) + 1
            return torch.full((len(ids),), self._probe_length() - 1, dtype=torch.int64)
        if not self.can_pay:
            self._since_check += 1
            if self._check_gap is not None and self._since_check >= self._check_gap:
                self._since_check = 0
                self._check_gap = min(2 * self._check_gap, MAX_GAP)
                return torch.ones(len(ids), dtype=torch.int64)
            return torch.zeros(len(ids), dtype=torch.int64)
        self._check_gap = self.recheck_every
        if self._bucket in self._retime:  # a fresh 1-token pass before the check of real steps
            self._retime.discard(self._bucket)
            return torch.zeros(len(ids), dtype=torch.int64)
        cap = self._cost_cap(self._costs) if self.length_rule == "costs" else None
        out = []
        for row in ids:
            state = self.schedule(row)
            state.steps += 1
            if state.paused:
                probe = state.steps >= state.probe_gap
                if probe:
                    state.steps = 0
                    state.probe_gap = min(2 * state.probe_gap, MAX_GAP)
                    self._probing.add(row)
                # a probe under "costs" offers what a drafting row gets (the drafter's stops
                # cut it): a 1-token draft can cost more than the token it may add
                out.append((cap or 1) if probe else 0)
            else:
                # Before min_tests the cap (at the prior-weighted alpha) may shorten a draft to
                # one token but not stop it: only a row's own keep tests can pause it.
                out.append(cap or min(state.k, max(1, state.best_k)))
        if len(out) > 1 and self._costs is not None:
            depth = self._batch_depth(ids, out, self._costs)
            out = [min(k, depth) for k in out]
        return torch.tensor(out, dtype=torch.int64)

    @property
    def length_rule(self) -> str:
        """The rule in force: `lengths`, with "auto" resolved by the drafter."""
        if self.lengths != "auto":
            return self.lengths
        return "costs" if self.drafter_stops_itself else "theory"

    def _cost_cap(self, costs: StepCosts | None) -> int | None:
        """The k in 1..max_k with the most (k + 1) / (k c + r(k + 1)): the longest draft the
        costs justify were every draft kept (lengths up to EXPLORE_REACH times the longest timed
        one priced like it, so longer lengths get tried and timed; a tie goes to the longer)."""
        if costs is None or costs.target(1) is None:
            return None
        every_kept = _expected_tokens([1.0] * self.max_k)  # k + 1 tokens for k drafts
        return self._most_tokens_per_cost(every_kept, costs, shortest=1, longer_on_tie=True)

    def _batch_depth(self, ids: list[Hashable], lengths: list[int], costs: StepCosts) -> int:
        """The deepest draft of a batch step. A step drafts as deep as its deepest row (the
        draft model runs once per depth for the whole batch) and its target pass is as wide as
        its widest row, so one row that wants 10 tokens makes every row wait for 10 draft
        passes. The depth D in 1..max(lengths) kept is the one with the most expected tokens
        per unit of step cost over the batch, sum_b E(alpha_b, min(k_b, D)) / (D c + r(D + 1)),
        E(alpha, k) = 1 + alpha + ... + alpha^k (at least 1: every row that asked for a draft
        has its own theory's yes, so the batch never stops drafting here and rows keep being
        measured). A single row keeps its own length."""
        deepest = max(lengths)
        if deepest <= 1:
            return deepest
        c = _cost_ratio(costs)
        priors = self.pooled.position_rates(deepest)  # the same for every row of the step
        expected = [
            _expected_tokens(self.schedule(row).position_rates(deepest, priors)) for row in ids
        ]

        def rate(depth: int) -> float:
            tokens = sum(e[min(k, depth)] for e, k in zip(expected, lengths, strict=True))
            return tokens / (depth * c + self._pass_cost(costs, lengths, depth))

        return max(range(1, deepest + 1), key=lambda depth: (rate(depth), -depth))

    def _pass_cost(
        self, costs: StepCosts, lengths: list[int], width: int, longest: int | None = None
    ) -> float:
        """The cost of the target pass verifying min(k_b, width) drafts of each row b (lengths:
        the k_b) relative to a 1-token pass: a padded target's by the width (every row fed
        width + 1 tokens), a ragged target's by the mean tokens per row it feeds
        (ragged_pass_cost; one row: the same). Lengths past `longest` priced as it (None: as
        `relative_pass_cost` extends the curve)."""
        if self.ragged_passes:
            fed = [min(k, width) + 1 for k in lengths]
            return ragged_pass_cost(costs, sum(fed) / len(fed), longest)
        tokens = width + 1 if longest is None else min(width + 1, longest)
        return costs.relative_pass_cost(tokens, TRUST_SAMPLES) or 1.0

    def trim(self, rows: Sequence[Hashable], depths: Sequence[int]) -> int:
        """The draft width worth verifying, once the drafts are made (chains; depths: the
        drafts each row made): the W in 0..max(depths) with the most expected tokens over the
        batch per unit of the verifying pass's cost, sum_b E_b(min(d_b, W)) / r(W + 1) (r(1)
        = 1: W = 0 is a target-only step; E_b at the upper bound of row b's keep rate), a
        longer W on a tie, and never below a probing row's draft. The draft passes are paid
        for already; what is left to choose is the pass (module docstring, part 4). Only after
        the cost check's "yes": the cost check's probe must time the pass it asked for."""
        ids, depths = list(rows), [int(d) for d in depths]
        self._proposed = {}
        deepest = max(depths, default=0)
        costs = self._costs
        if (
            deepest == 0
            or not self.fit_passes
            or not self.can_pay
            or costs is None
            or costs.target(1) is None
        ):
            return deepest
        # A row's rate at each position: its position rate (deeper positions keep more where
        # runs of kept drafts go on, as in code; one rate for all cut long drafts' tails and
        # wasted their draft passes), but at least the upper TRIM_LEVEL bound of its keep
        # rate. A cut verifies nothing, so estimates that only verified drafts move must err
        # towards verifying (at the plain estimates, one early rejection left a code prompt's
        # rows cut whole for the rest of the run, at 0.93x target-only where verifying ran at
        # 1.4x). A probing row's draft is never cut: it is what measures a paused row again.
        expected = []
        for row in ids:
            state = self.schedule(row)
            bound = _keep_rate_bound(state, self._keep_prior)
            rates = self.rates(state, deepest)  # by position: runs of kept drafts go on
            expected.append(_expected_tokens([max(bound, rate) for rate in rates]))
        floor = max(
            (d for row, d in zip(ids, depths, strict=True) if row in self._probing), default=0
        )

        # Widths past the longest timed one cost what it does: the drafts are made, and
        # verifying them times that width (priced along the chord from a few short lengths, a
        # 21-token pass came to 5.4 1-token passes where it cost 2.6, and cuts kept it from
        # ever being timed)
        longest = max(costs.target_pass)

        def rate(width: int) -> float:
            tokens = sum(e[min(d, width)] for e, d in zip(expected, depths, strict=True))
            if not width:
                return tokens
            return tokens / self._pass_cost(costs, depths, width, longest)

        width = max(range(floor, deepest + 1), key=lambda w: (rate(w), w))
        self._proposed = {row: d for row, d in zip(ids, depths, strict=True) if d > width}
        return width

    def update(self, *args: object) -> None:
        """update(rows, drafted, accepted, costs), or update(drafted, accepted, costs) for rows
        0..batch-1: drafted, accepted int64 [batch] for the step just verified."""
        if len(args) not in (3, 4):
            raise TypeError(
                "update: expected (rows, drafted, accepted, costs) or (drafted, accepted, costs), "
                f"got {len(args)} arguments"
            )
        if len(args) == 3:
            drafted, accepted, costs = args
            rows: Sequence[Hashable] = range(len(drafted))
        else:
            rows, drafted, accepted, costs = args
        if not len(rows) == len(drafted) == len(accepted):
            # checked before any state changes: a mismatch must not leave half a step counted
            raise ValueError(
                "update: rows, drafted and accepted must have one entry per row, got "
                f"{len(rows)} rows, {len(drafted)} drafted and {len(accepted)} accepted"
            )
        bucket = self._use_bucket(len(rows))
        self.bucket_costs[bucket] = self._costs = costs
        cost_verdict_before = self._cost_verdicts.get(bucket)
        if bucket in self._recalled and costs.last_pass is not None:
            # the first target pass of this batch size (a request's first step may run none:
            # its token comes from the prompt pass)
            self._check_recalled(bucket, costs)
            self._use_bucket(len(rows))
        # A "no" stands until a step drafts again (only a recheck does): the target-only steps
        # after it time nothing new about drafting, and their 1-token passes drift with the
        # machine, which would flip a verdict near the break-even (the first pass of each
        # flip makes the draft model catch up on every token since).
        depths = drafted.tolist()
        drafting = any(d > 0 for d in depths)
        before = self.verdicts.get(bucket)
        verdict = None if before is False and not drafting else self._cost_verdict(costs)
        if verdict is not None:  # costs that cannot tell keep the last verdict
            self.verdicts[bucket] = self.can_pay = self._cost_verdicts[bucket] = verdict
        if before is True and drafting and not self._real_steps_pay(bucket, depths, costs):
            self.verdicts[bucket] = self.can_pay = False
        proposed, self._proposed = self._proposed, {}
        for row, d, a in zip(rows, depths, accepted.tolist(), strict=True):
            made = proposed.get(row, d)  # drafts made: more than d where trim() cut them
            if made > 0:
                self._update_row(self.schedule(row), d, a, costs, made)
        if self.memory is not None and self._cost_verdicts.get(bucket) is not None:
            timed = _timed_lengths(costs)
            changed = cost_verdict_before is not self._cost_verdicts[bucket]
            if changed or not timed <= self._saved_lengths.get(bucket, set()):
                self._save_memory()
                self._saved_lengths[bucket] = timed

    def _real_steps_pay(self, bucket: int, depths: list[int], costs: StepCosts) -> bool:
        """Adds a drafting step taken under a "yes" to its batch size's tally; False once
        GUARD_STEPS such steps took at least as long as target-only (at the fastest 1-token
        pass seen; RETIME_BELOW) would have for every token they could have emitted (module
        docstring: break-even gains nothing, so it counts as not paying).
        The tally starts over after it says False (a recheck that finds "yes" again is judged
        on its own steps). While the steps pay by less than RETIME_MARGIN, the step after
        2, 4, 8, ... times GUARD_STEPS of them times a fresh 1-token pass (RETIME_MARGIN)."""
        seconds, single = costs.last_step_seconds, costs.target_pass.get(1)
        if seconds is None or single is None or single.low <= 0:
            return True
        tally = self._real_steps.setdefault(bucket, [0, 0.0, 0.0])
        tally[0] += 1
        tally[1] += sum(d + 1 for d in depths)
        tally[2] += len(depths) * seconds  # row-seconds; priced at the judgment's fastest pass
        if tally[0] == GUARD_STEPS - 1 and single.count < RETIME_BELOW:
            self._retime.add(bucket)
        if tally[0] < GUARD_STEPS or tally[1] > tally[2] / single.low:
            if tally[0] >= GUARD_STEPS:
                due = self._retime_due.setdefault(bucket, 2 * GUARD_STEPS)
                if tally[0] >= due and tally[1] < RETIME_MARGIN * tally[2] / single.low:
                    self._retime.add(bucket)
                    self._retime_due[bucket] = 2 * due
            return True
        del self._real_steps[bucket]
        self._retime_due.pop(bucket, None)
        return False

    def _cost_verdict(self, costs: StepCosts) -> bool | None:
        """Whether some draft length pays when every draft is kept; None until three 1-token
        passes, a pass that scored drafts and the probe (a pass over probe_length tokens, or
        PROBE_ATTEMPTS tries) were timed. A "yes" waits for the probe too: past the longest
        measured length the schedule prices passes along a line, and from 2 tokens alone that
        line is far too steep where longer passes cost little more (transformers on CPUs:
        1.7x for 2 tokens, 2.5x for 5, 2.8x for 16), so drafts would stay one token long. A
        "no" needs two samples of every cost it rests on: one slow first pass (a warm-up) must
        not stop drafting. Both are priced against the fastest 1-token pass seen: the first
        passes after a cold load (weights paged in from disk) are slow, and a slow 1-token
        pass makes drafting look cheap (on llama.cpp on 2 cores a cold first run said yes and
        drafted until the check of real steps ended it)."""
        single = costs.target_pass.get(1)
        longer = [n for n in costs.target_pass if n >= 2]
        if (
            single is None
            or single.count < FIRST_SINGLE_PASSES
            or not longer
            or not self._probed(costs)
        ):
            return None
        c = _cost_ratio(costs)
        fastest = single.low / single.value if single.value > 0 else 1.0  # <= 1

        def verify_cost(k: int) -> float:
            return costs.relative_pass_cost(k + 1, interpolate=True) or 1.0

        def pays(k: int, draft_ratio: float) -> bool:
            # target-only time of k + 1 tokens at the fastest 1-token pass, against a step
            return (k + 1) * fastest / (k * draft_ratio + verify_cost(k)) > MARGIN

        if any(pays(k, c) for k in range(1, self.max_k + 1)):
            return True
        drafted = costs.draft_step.count
        if (0 < drafted < 2) or max(costs.target_pass[n].count for n in longer) < 2:
            return None
        # A "no" must hold with the fastest draft pass seen too (the first one may include
        # a lazy drafter's prefill).
        low = costs.draft_step.low / single.value if drafted and single.value else 0.0
        return any(pays(k, low) for k in range(1, self.max_k + 1))

    def _probe_length(self) -> int:
        return min(PROBE_LENGTH, self.max_k + 1)

    def _probed(self, costs: StepCosts) -> bool:
        """A target pass over probe_length tokens or more was timed, or PROBE_ATTEMPTS probe
        steps of this batch size drafted shorter (their drafter stopped early)."""
        tried = self._probe_steps.get(self._bucket, 0) >= PROBE_ATTEMPTS
        return tried or any(n >= self._probe_length() for n in costs.target_pass)

    def _update_row(
        self,
        state: _RowSchedule,
        drafted: int,
        accepted: int,
        costs: StepCosts,
        made: int | None = None,
    ):
        """One step of a row that drafted: `drafted` drafts verified, `accepted` kept, `made`
        drafts made (more than `drafted` where trim() cut them; 0 verified: nothing tested)."""
        made = drafted if made is None else made
        decay = 1 - self.smoothing
        if drafted:
            self._count_tests(state, drafted, accepted, decay)
            state.cut_streak = 0
        else:
            state.cut_steps += 1
            state.cut_streak += 1
        pays = self._drafting_pays(state, costs)
        if self.length_rule == "costs" and costs.target(1) is not None:
            # The drafter's stops choose the lengths, so the row is judged on what its drafting
            # steps did: tokens emitted against their modelled cost (target-only: 1 token per
            # 1-token pass). The per-position theory misses how runs of kept drafts go on
            # (lru-cache at T = 0 on transformers: steps that kept 15 of 15, 1 of 13, 0 of 7 and
            # 2 of 3 emitted 22 tokens for about 18 passes' cost, and the theory paused the row).
            # (the drafts trim() cut were paid for: their draft passes count)
            verify = (costs.relative_pass_cost(drafted + 1, TRUST_SAMPLES) or 1.0) if drafted else 1
            cost = made * _cost_ratio(costs) + verify
            state.emitted_weight = decay * state.emitted_weight + accepted + 1
            state.cost_weight = decay * state.cost_weight + cost
            state.gain_squares = decay * state.gain_squares + (accepted + 1 - cost) ** 2
            state.step_weight = decay * state.step_weight + 1
            state.step_weight_squares = decay * decay * state.step_weight_squares + 1
            # A drafting row pauses only once its steps lose with confidence (the upper
            # PAUSE_LEVEL bound of their mean gain over target-only below 0); a paused row
            # resumes once their mean gain is above 0. A step's gain ranges from a whole pass
            # lost to a dozen tokens won, so a mean over the last few steps a little below 0
            # says little: pausing on it (as the rule did) turned runs off through a few hard
            # tokens and left them target-only while long runs of kept drafts went by (on
            # transformers at T = 0.7, rename-vars ran at 23-45 s per text where never pausing
            # ran at 23-34 s, and the story prompt, where no drafting pays, ran as fast).
            pays = (
                state.emitted_weight > state.cost_weight
                if state.paused
                else _gain_upper_bound(state) >= 0
            )
        # (under "costs", steps whose drafts were cut whole count as evidence too: they test
        # nothing, and a row whose drafts are always cut would otherwise never pause)
        judged = state.tests_seen >= self.min_tests
        if judged or (self.length_rule == "costs" and state.cut_steps >= EARLY_TESTS):
            paused = not pays
        else:  # early: only when even a high plausible rate does not pay
            paused = (
                not pays
                and self.early_tests is not None
                and state.tests_seen >= self.early_tests
                and not self._pays_at(
                    _rate_upper_bound(state.kept_seen, state.tests_seen, EARLY_LEVEL), costs
                )
            )
        # drafts cut whole EARLY_TESTS steps in a row: whatever the rule, the drafter's work
        # (an n-gram lookup costs no draft pass but is not free) buys nothing; its probes,
        # never cut, measure it again
        paused = paused or state.cut_streak >= EARLY_TESTS
        # Under "theory" a paused row resumes when its estimates say drafting pays, not for
        # want of evidence that it does not (one probe kept, a few tests seen: on llama.cpp on
        # 2 cores an n-gram row resumed after each kept probe, verified drafts kept at 0.4
        # where 2-token passes need 0.7, and paused again with its probe gap reset). Not under
        # "costs": its decayed emitted-vs-cost sums take several probes to climb out of the
        # deficit that paused the row, and probes come ever rarer (on transformers the model
        # drafter's story row stayed paused: 0.99x its target-only against 1.03x without).
        if self.length_rule == "theory":
            paused = paused or (state.paused and not pays)
        if paused and not state.paused:
            state.steps, state.probe_gap = 0, self.probe_every
        state.paused = paused

    def _count_tests(self, state: _RowSchedule, drafted: int, accepted: int, decay: float):
        """The schedule's step and the keep tests of a row's verified drafts."""
        if not state.paused:
            if accepted == drafted:
                grown = state.k * GROWTH
            else:
                grown = max(accepted + 1, min(state.k - 1, state.k // SHRINK))
            state.k = max(1, min(self.max_k, grown))
        # Per-test acceptance: each kept draft passed a keep test, each rejection failed one.
        failed = 1 if accepted < drafted else 0
        state.kept_weight = decay * state.kept_weight + accepted
        state.test_weight = decay * state.test_weight + accepted + failed
        state.prior_weight *= decay
        state.tests_seen += accepted + failed
        state.kept_seen += accepted
        for counts in (state, self.pooled):
            _count_positions(counts, drafted, accepted, decay)
        self._keep_changed = True
        self.pooled.prior_weight *= decay
        # A weak prior (PRIOR_KEPT of PRIOR_TESTS) keeps one unlucky early step from deciding;
        # it fades like an old step, so a row's estimate can climb to any measured rate.
        state.alpha = (state.kept_weight + PRIOR_KEPT * state.prior_weight) / (
            state.test_weight + PRIOR_TESTS * state.prior_weight
        )

    def _pays_at(self, alpha: float, costs: StepCosts) -> bool:
        """Whether some draft length pays with keep rate alpha at every position."""
        if costs.target(1) is None:
            return True
        tokens = _expected_tokens([alpha] * self.max_k)
        return self._most_tokens_per_cost(tokens, costs, shortest=0, longer_on_tie=False) > 0

    def _drafting_pays(self, state: _RowSchedule, costs: StepCosts) -> bool:
        """Sets the row's best_k: the k in 0..max_k with the most expected tokens per unit of
        step cost, E(k) / (k c + r(k + 1)), E(k) = 1 + a_0 + a_0 a_1 + ... (a_i the row's
        acceptance rate at position i given the drafts before it kept; the prior's at first).
        With the same rate at every position this is the speedup theory's best k
        (analysis.theory.best_draft_length). False when it is 0."""
        if costs.target(1) is None:
            return True
        tokens = _expected_tokens(self.rates(state, self.max_k))
        state.best_k = self._most_tokens_per_cost(tokens, costs, shortest=0, longer_on_tie=False)
        return state.best_k > 0

    def _most_tokens_per_cost(
        self, tokens: list[float], costs: StepCosts, *, shortest: int, longer_on_tie: bool
    ) -> int:
        """The k in shortest..max_k with the most tokens[k] / (k c + r(k + 1)): tokens[k] the
        expected tokens of a step with k drafts, r priced for the schedule (trusted lengths;
        up to EXPLORE_REACH times the longest timed one like it)."""
        c = _cost_ratio(costs)

        def rate(k: int) -> float:
            verify = costs.relative_pass_cost(k + 1, TRUST_SAMPLES, explore=True) or 1.0
            return tokens[k] / (k * c + verify)

        tie = 1 if longer_on_tie else -1
        return max(range(shortest, self.max_k + 1), key=lambda k: (rate(k), tie * k))


def _count_positions(state: _RowSchedule, drafted: int, accepted: int, decay: float) -> None:
    """Decays the per-position counts and adds one step's: position i was tested when the row
    drafted past i and kept every draft before it, and passed when i < accepted."""
    tested = min(drafted, accepted + 1)
    while len(state.position_tests) < tested:
        state.position_tests.append(0.0)
        state.position_kept.append(0.0)
    for i in range(len(state.position_tests)):
        state.position_tests[i] = decay * state.position_tests[i] + (i < tested)
        state.position_kept[i] = decay * state.position_kept[i] + (i < accepted)


def _keep_rate_bound(state: _RowSchedule, prior: float | None = None) -> float:
    """The upper TRIM_LEVEL bound of a row's keep rate (Wilson's score bound on its decayed
    keep tests, the prior's weight included: `prior` (default PRIOR_KEPT / PRIOR_TESTS = 2/3)
    of PRIOR_TESTS tests at first; 1 with no weight)."""
    tests = state.test_weight + PRIOR_TESTS * state.prior_weight
    if tests <= 0:
        return 1.0
    share_of_prior = PRIOR_KEPT / PRIOR_TESTS if prior is None else prior
    share = (state.kept_weight + share_of_prior * PRIOR_TESTS * state.prior_weight) / tests
    z2 = TRIM_Z * TRIM_Z
    centre = share + z2 / (2 * tests)
    spread = TRIM_Z * math.sqrt(max(0.0, share * (1 - share)) / tests + z2 / (4 * tests * tests))
    return min(1.0, (centre + spread) / (1 + z2 / tests))


def _gain_upper_bound(state: _RowSchedule) -> float:
    """The upper PAUSE_LEVEL bound of a row's mean gain per drafting step over target-only
    (tokens emitted less their cost in 1-token passes; lengths="costs"), from its decayed sums:
    the weighted mean plus PAUSE_Z standard errors, with the effective number of steps
    (sum w)^2 / sum w^2 of the decayed weights."""
    weight = state.step_weight
    if weight <= 0:
        return math.inf
    mean = (state.emitted_weight - state.cost_weight) / weight
    variance = max(0.0, state.gain_squares / weight - mean * mean)
    steps = weight * weight / state.step_weight_squares
    return mean + PAUSE_Z * math.sqrt(variance / steps)


def _rate_upper_bound(kept: int, tests: int, level: float) -> float:
    """The one-sided upper confidence bound (at `level`) of a binomial rate that passed `kept`
    of `tests` trials (Clopper-Pearson): the largest a with P(X <= kept | tests, a) >=
    1 - level, by bisection."""
    if kept >= tests:
        return 1.0

    def cdf(a: float) -> float:
        return sum(math.comb(tests, i) * a**i * (1 - a) ** (tests - i) for i in range(kept + 1))

    low, high = kept / tests, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if cdf(middle) >= 1 - level:
            low = middle
        else:
            high = middle
    return low


def _expected_tokens(rates: list[float]) -> list[float]:
    """E(k) for k = 0..len(rates): expected tokens a step with k drafts emits (the kept drafts
    and one more), 1 + a_0 + a_0 a_1 + ... + a_0 ... a_(k-1)."""
    out, survive = [1.0], 1.0
    for a in rates:
        survive *= a
        out.append(out[-1] + survive)
    return out


def _cost_ratio(costs: StepCosts) -> float:
    """c = draft pass / 1-token target pass. A drafter without a model (n-gram lookup) records
    no draft passes: its c is 0, and only the extra cost of verifying more tokens can make
    drafting lose."""
    single = costs.target(1)
    if not costs.draft_step.count or not single:
        return 0.0
    return costs.draft_step.value / single


def _seconds(value: object) -> float:
    seconds = float(value)  # type: ignore[arg-type]
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"expected a pass time in seconds >= 0, got {value!r}")
    return seconds


class _Recent:
    """The median (and the least) of the last COST_WINDOW samples."""

    def __init__(self):
        self.samples: deque[float] = deque(maxlen=COST_WINDOW)
        self.count = 0

    def copy(self) -> _Recent:
        twin = _Recent()
        twin.samples.extend(self.samples)
        twin.count = self.count
        return twin

    def add(self, value: float) -> None:
        self.samples.append(value)
        self.count += 1

    @property
    def value(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.0

    @property
    def low(self) -> float:
        return min(self.samples) if self.samples else 0.0
