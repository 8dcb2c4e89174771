"""The step-wise engine: requests join and leave between steps; each step drafts, scores every
draft in one target pass, verifies and commits, for every running request at once.

Target-only decoding is the same step with no drafter (every step emits one token per request from
the target), so both share warpers, randomness and code.

Randomness: every request draws from its own torch.Generator, seeded by its `seed`. A row's draws
(draft tokens, keep tests, the recovered or bonus token) depend only on its own state, so with a
fixed draft length a request's output for a given seed does not depend on which other requests
share the batch or when it joined (exactly so on models whose logits do not depend on the batch;
real kernels may round differently with the batch shape). With the adaptive draft length the
lengths react to measured times, so the same seed may give different (equally exact) text.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specsample.adapters.cursor import ModelCursor
from specsample.adapters.protocol import LanguageModel
from specsample.drafters.base import Draft, Drafter
from specsample.engine.length import (
    AdaptiveDraftLength,
    FixedDraftLength,
    StepCosts,
    batch_bucket,
    full_pass_equivalent,
)
from specsample.engine.stats import DecodeStats
from specsample.rules.greedy import argmax_last
from specsample.rules.registry import (
    Rule,
    check_rule_for,
    lookup,
    verify_coupled,
    verify_draft,
    verify_greedy,
)
from specsample.rules.result import PAD
from specsample.rules.sampling import sample_from_weights
from specsample.rules.tree import TreeResult, node_depths
from specsample.warpers import RowSampling, SamplingConfig

ACCEPTED, RECOVERED, BONUS = "accepted", "recovered", "bonus"
FINISH_REASONS = ("eos", "length", "stop", "abort")
# stop(new_tokens) -> True ends the request (stop strings); checked after each commit.
StopFunction = Callable[[list[int]], bool]


@dataclass
class RequestOutput:
    """What one step did for one request.

    tokens         the tokens committed this step (cut after an EOS and at max_new_tokens).
    kinds          per token: "accepted" (a kept draft), "recovered" (drawn after a rejection) or
                   "bonus" (drawn from the target after every draft was kept).
    logprobs       per token: the target's log-probability of it (log-softmax of the raw logits,
                   before temperature and truncation); None from an Engine made with
                   logprobs=False.
    top_logprobs   per token, when the request asked for top_logprobs=N > 0 (else None): the N
                   most likely ids at that position and their log-probabilities, from the same
                   log-softmax as `logprobs`, most likely first (equal values: lower id first).
    finished       True on the request's last output; finish_reason is then one of "eos",
                   "length", "stop", "abort".
    stats          the request's DecodeStats when finished, else None.
    """

    request_id: int
    tokens: list[int]
    kinds: list[str]
    logprobs: list[float] | None
    finished: bool = False
    finish_reason: str | None = None
    stats: DecodeStats | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    sampling: SamplingConfig
    max_new_tokens: int
    seed: int
    generator: torch.Generator
    eos: frozenset[int]
    stop: StopFunction | None
    rule: Rule
    top_logprobs: int = 0
    new_tokens: list[int] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.new_tokens

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.new_tokens)


class Engine:
    """Exact speculative sampling over a changing batch of requests.

    target        the target model (LanguageModel; a TreeLanguageModel for tree drafters).
    drafter       a Drafter (ModelDrafter, NgramDrafter, TreeDrafter), or None: target-only.
    rule          a rule name from specsample.rules.registry: "auto" (block verification for
                  chains, node by node for trees), "token", "block", "coupled" (the text of a
                  seed equals target-only decoding with that seed, with or without a drafter;
                  rules/coupled.py); a lossy rule only when specsample.lossy was imported and
                  it is named. The default of every request; `add_request(rule=...)` may name
                  another per request (a step verifies each group of rows with its rule).
    draft_length  "auto" (an AdaptiveDraftLength per request), an int k, or a policy object.
                  A drafter with a fixed depth (TreeDrafter) always drafts that depth.
    max_batch     requests decoded at once; later ones wait in a queue (first in, first out).
    """

    def __init__(
        self,
        target: LanguageModel,
        drafter: Drafter | None = None,
        *,
        rule: str = "auto",
        draft_length: int | str | FixedDraftLength | AdaptiveDraftLength = "auto",
        max_batch: int = 64,
        logprobs: bool = True,
    ):
        """logprobs: report each emitted token's log-probability (RequestOutput.logprobs; a
        log-sum-exp over the vocabulary per token, about 1% of a llama.cpp token on 2 cores);
        False: RequestOutput.logprobs is None and no request may ask for top_logprobs."""
        if not isinstance(target, LanguageModel):
            raise TypeError(
                f"target: expected a LanguageModel (prefill/extend/truncate/add_rows/"
                f"remove_rows), got {type(target).__name__}"
            )
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected an integer >= 1, got {max_batch!r}")
        if not isinstance(logprobs, bool):
            raise ValueError(f"logprobs: expected True or False, got {logprobs!r}")
        self.logprobs = logprobs
        self.rule = lookup(rule)
        fixed_depth = getattr(drafter, "fixed_depth", None)
        if drafter is not None:
            check_rule_for(self.rule, chain=fixed_depth is None)
        self.target = ModelCursor(target)
        self.drafter = drafter
        self.policy = _draft_length_policy(draft_length, drafter, fixed_depth)
        self.max_batch = max_batch
        self.stats = DecodeStats()
        self.costs = StepCosts()  # every step's costs (reported in DecodeStats)
        # the same by batch size (batch_bucket: 1, 2, 4, 8, ...), what the draft-length policy
        # decides with: a pass over 8 rows costs more than one over 1, and on a compute-bound
        # CPU drafting can pay for one row and not for eight, or the other way round
        self.costs_by_batch: dict[int, StepCosts] = {}
        if isinstance(self.policy, AdaptiveDraftLength):
            # what its lengths="auto" follows
            self.policy.drafter_stops_itself = bool(getattr(drafter, "stops_itself", False))
            # how its batch steps are priced (a pass over all rows' own tokens, or padded)
            self.policy.ragged_passes = self.target.ragged_passes
            # A policy reused from an earlier engine (on the same models: pass costs are the
            # machine's) keeps its verdicts, and its costs start this engine's: without them its
            # "yes" would be priced on no 1-token pass at all (drafting steps time none).
            for bucket, costs in self.policy.bucket_costs.items():
                self.costs_by_batch[bucket] = costs.copy()
        # running totals of the drafter's and the target cursor's, as last seen (`_since`)
        self._seen = {
            "draft passes": getattr(drafter, "forward_passes", 0),
            "draft prefill": getattr(drafter, "prefill_seconds", 0.0),
            "target prefill": 0.0,
        }
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # the model rows, in order
        self._done: list[_Request] = []  # finished since the last step; their rows go next step
        self._aborted: list[_Request] = []  # aborted while waiting: reported at the next step

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt_tokens: Sequence[int],
        *,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int = 128,
        seed: int | None = None,
        eos_token_ids: Sequence[int] = (),
        stop: StopFunction | None = None,
        rule: str | None = None,
        top_logprobs: int = 0,
    ) -> int:
        """Queues a request; it joins the batch at the next step with room. Returns its id.
        rule: the request's verification rule (a name as for the Engine), None: the Engine's.
        With a fixed draft length a request's text for a seed is the same whatever rules its
        batch neighbours use.
        top_logprobs: report, for every emitted token, the target's N most likely ids there
        (RequestOutput.top_logprobs; at most the vocabulary size)."""
        prompt = _check_prompt(prompt_tokens, self.target.vocab_size)
        if rule is None:
            request_rule = self.rule
        elif isinstance(rule, str):
            request_rule = lookup(rule)
            if self.drafter is not None:
                check_rule_for(
                    request_rule, chain=getattr(self.drafter, "fixed_depth", None) is None
                )
        else:
            raise TypeError(f"rule: expected None or a rule name, got {type(rule).__name__}")
        sampling = sampling or SamplingConfig()
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling: expected a SamplingConfig, got {type(sampling).__name__}")
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
        room = _row_capacity(self.target.model)
        if room is not None and len(prompt) + max_new_tokens > room:
            raise ValueError(
                f"max_new_tokens: expected at most {room - len(prompt)} after a prompt of "
                f"{len(prompt)} tokens (a row of the target holds at most {room}), got "
                f"{max_new_tokens}"
            )
        if seed is None:
            seed = random.SystemRandom().randrange(2**63)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed: expected None or an integer in [0, 2**64), got {seed!r}")
        if (
            isinstance(top_logprobs, bool)
            or not isinstance(top_logprobs, int)
            or not 0 <= top_logprobs <= self.target.vocab_size
        ):
            raise ValueError(
                f"top_logprobs: expected an integer in [0, {self.target.vocab_size}], got "
                f"{top_logprobs!r}"
            )
        if top_logprobs and not self.logprobs:
            raise ValueError(
                f"top_logprobs: expected 0 from an Engine made with logprobs=False, got "
                f"{top_logprobs}"
            )
        if stop is not None and not callable(stop):
            raise TypeError(f"stop: expected None or a callable(new_tokens), got {stop!r}")
        request = _Request(
            id=next(self._ids),
            prompt=prompt,
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            seed=seed,
            generator=torch.Generator().manual_seed(seed % 2**63),
            eos=frozenset(int(t) for t in eos_token_ids),
            stop=stop,
            rule=request_rule,
            top_logprobs=top_logprobs,
        )
        self._waiting.append(request)
        return request.id

    def abort(self, request_id: int) -> bool:
        """Ends a request; its final output (finish_reason "abort") comes with the next step.
        Returns False when no unfinished request has that id."""
        for request in self._running:
            if request.id == request_id and request.finish_reason is None:
                request.finish_reason = "abort"
                self._done.append(request)
                return True
        for request in self._waiting:
            if request.id == request_id:
                self._waiting.remove(request)
                request.finish_reason = "abort"
                self._aborted.append(request)
                return True
        return False

    def has_unfinished(self) -> bool:
        live = any(r.finish_reason is None for r in self._running)
        return live or bool(self._waiting) or bool(self._aborted) or self._has_unreported()

    def num_running(self) -> int:
        return sum(r.finish_reason is None for r in self._running)

    def num_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """One speculative step over every running request:

        1. change the batch: finished rows leave, waiting requests join (up to max_batch),
        2. draft up to k tokens (a chain or a tree) per row, never past max_new_tokens,
        3. score the pending tokens and every draft in one target pass,
        4. verify: keep a path of the drafts, add one recovered or bonus token,
        5. commit (cut at EOS, stop or the limit); the next step rolls the caches back.
        """
        started = time.perf_counter()
        outputs = self._report_aborts()
        self._change_batch()
        rows = self._running
        if not rows:
            return outputs
        sequences = [r.sequence for r in rows]
        sampling = RowSampling(
            [r.sampling for r in rows],
            [r.generator for r in rows],
            # coupled rule: noise from (seed, new-token position), see rules/coupled.py
            coupled=[r.rule.coupled for r in rows],
            seeds=[r.seed for r in rows],
            positions=[len(r.new_tokens) for r in rows],
        )
        ids = [r.id for r in rows]
        # the policy's lengths, never past a row's last token (which the step itself emits);
        # as plain ints: a step that drafts nothing builds no tensor for them
        wanted = self.policy.next_lengths(ids).tolist()
        limits = [max(0, min(k, r.remaining - 1)) for k, r in zip(wanted, rows, strict=True)]
        # 2. draft
        clock = time.perf_counter()
        draft = self._propose(sequences, limits, sampling)
        draft_seconds = time.perf_counter() - clock
        passes = int(self._since("draft passes", getattr(self.drafter, "forward_passes", 0)))
        # A lazy drafter prefills its prompts at its first draft, and a row that skipped
        # drafting steps catches up on them: prefill time, not a draft pass's (it would
        # inflate the measured draft cost the draft-length policy uses).
        draft_prefill = getattr(self.drafter, "prefill_seconds", 0.0)
        draft_seconds = self._without_prefill(draft_seconds, "draft prefill", draft_prefill)
        draft = self._trim(ids, draft)
        # 3. score
        clock = time.perf_counter()
        scorable = _scorable(draft, self.target)
        pad = self._pad_width(draft)
        if pad:
            logits = self.target.score(sequences, [True] * len(rows), scorable, min_width=pad)
            self.stats.padded_passes += 1
        else:
            logits = self.target.score(sequences, [True] * len(rows), scorable)
        target_seconds = time.perf_counter() - clock
        # Rows that join are prefilled by their first step: with their first drafts in one
        # prompt pass where the target can (prompt_scored). A prompt pass is prefill time, not
        # a pass cost the draft-length policy may price steps with.
        target_prefill = self.target.prefill_seconds
        target_seconds = self._without_prefill(target_seconds, "target prefill", target_prefill)
        # rows just prefilled hold their prompt's last distribution: a step without drafts over
        # such rows alone runs no target pass (fed_width 0: nothing is timed or counted as one)
        target_tokens = self.target.fed_width
        prompt_scored = self.target.prompt_scored
        # 4. verify
        clock = time.perf_counter()
        result, rules_used = self._verify(draft, logits, sampling, [r.rule for r in rows])
        verify_seconds = time.perf_counter() - clock
        # 5. commit
        recovered = _last_node_has_children(draft, result)  # [batch]: else bonus
        kinds = _step_kinds(result, recovered)
        if self.logprobs:
            logprobs, tops = _emitted_logprobs(logits, result, [r.top_logprobs for r in rows])
        else:
            logprobs, tops = [None] * len(rows), [None] * len(rows)
        committed = 0
        for b, request in enumerate(rows):
            emitted = _commit(request, result, b)
            committed += len(emitted)
            outputs.append(self._output(request, emitted, kinds[b], logprobs[b], tops[b]))
        timing = _StepTiming(
            draft_seconds,
            target_seconds,
            verify_seconds,
            passes,
            target_tokens,
            prompt_scored,
            self.target.fed_tokens,
            self.target.fed_rows,
        )
        self.stats.new_tokens += committed
        self._record(_StepRows.of(draft, result, recovered, rules_used), draft, timing, started)
        costs = self.costs_by_batch[batch_bucket(len(ids))]
        self.policy.update(ids, draft.depths(), result.num_accepted, costs)
        for request in rows:  # a policy may outlive this engine: drop finished rows now
            if request.finish_reason is not None:
                self.policy.forget(request.id)
        if not draft.num_nodes and getattr(self.policy, "stopped", False):
            # drafting cannot pay at any batch size: the draft model need not keep up (each
            # request that joins would cost it a prompt prefill that no draft uses)
            release = getattr(self.drafter, "release", None)
            if release is not None:
                release()
        return outputs

    def _propose(self, sequences, limits: list[int], sampling) -> Draft:
        if self.drafter is None or max(limits) == 0:
            return Draft.empty(len(sequences))
        return self.drafter.propose(sequences, torch.tensor(limits, dtype=torch.int64), sampling)

    def _trim(self, ids: list[int], draft: Draft) -> Draft:
        """A chain draft cut to the width the policy's trim() finds worth verifying (the
        draft passes are paid for; a draft whose verifying pass costs more than the tokens it
        may add is dropped). The cut depends on the drafts and past steps only, never on this
        step's target distributions: verification stays exact."""
        trim = getattr(self.policy, "trim", None)
        if trim is None or not draft.num_nodes or not draft.is_chain:
            return draft
        lengths = draft.lengths
        width = int(trim(ids, lengths.tolist()))
        if width >= int(lengths.max()):
            return draft
        self.stats.trimmed += int((lengths - width).clamp(min=0).sum())
        return draft.cut(width)

    def _pad_width(self, draft: Draft) -> int | None:
        """The width to feed this step's chain pass at, where a wider pass was measured to
        cost less (StepCosts.pad_width); None: as it is."""
        if not draft.num_nodes or not draft.is_chain:
            return None
        if not getattr(self.policy, "fit_passes", True):
            return None
        costs = self.costs_by_batch.get(batch_bucket(draft.batch))
        width = 1 + int(draft.lengths.max())
        if costs is None or width < 2:
            return None
        pad = costs.pad_width(width)
        return pad if pad > width else None

    def _verify(
        self, draft: Draft, logits: torch.Tensor, sampling: RowSampling, rules: list[Rule]
    ) -> tuple[TreeResult, list[str]]:
        """logits [batch, n+1, target vocab] -> the verified step and the rule used per row.
        Rows whose requests name different rules are verified group by group, each group with
        its own rule on its own rows of the draft, logits and sampling (a row's result depends
        only on its own rows and generator, so it is the same as in a batch of one rule)."""
        logits = logits[:, : draft.num_nodes + 1].float()
        names = [rule.name for rule in rules]
        if len(set(names)) == 1:
            result = self._verify_group(draft, logits, sampling, rules[0])
            return result, [result.rule_used] * draft.batch
        groups: dict[str, list[int]] = {}
        for b, name in enumerate(names):
            groups.setdefault(name, []).append(b)
        parts = []
        for rows in groups.values():
            index = torch.tensor(rows, dtype=torch.int64)
            part = self._verify_group(
                _draft_rows(draft, index),
                logits.index_select(0, index.to(logits.device)),
                sampling.select(rows),
                rules[rows[0]],
            )
            parts.append((index, part))
        return _merge_results(parts, draft.batch)

    def _verify_group(
        self, draft: Draft, logits: torch.Tensor, sampling: RowSampling, rule: Rule
    ) -> TreeResult:
        """The rows of one rule. Probabilities of a drafter with a different vocabulary size
        are padded with zeros (ids a model lacks have probability 0)."""
        if rule.coupled:  # noise of depths 0..depth below the root (rules/coupled.py)
            target_probs = sampling.warp(logits)
            depth = int(node_depths(draft.parents).max()) if draft.num_nodes else 0
            noise = sampling.gumbel(depth + 1, target_probs.shape[-1], target_probs.device)
            result = verify_coupled(draft, target_probs, noise)
        elif sampling.all_greedy:
            chosen = argmax_last(logits)  # [batch, n+1]
            if not draft.num_nodes:  # target-only: the argmax is the token
                return _one_token_result(chosen[:, :1], "greedy")
            result = verify_greedy(draft, chosen)
        elif not draft.num_nodes and draft.probs is None and rule.exact and rule.chain:
            # Nothing drafted (target-only, or a step the policy kept short): every exact chain
            # rule draws one token from the warped target, with the same uniform as below and
            # the same inverse-CDF sampler, so the token is identical; without the rules'
            # residual machinery (about 0.5 ms a step over a 150k vocabulary).
            target_probs = sampling.warp(logits)[:, 0]
            sample = sampling.uniforms([1] * draft.batch, target_probs.device)[:, 0]
            tokens = sample_from_weights(target_probs, sample)[:, None]
            return _one_token_result(tokens, "token")
        else:
            target_probs = sampling.warp(logits)
            draft_probs = draft.probs
            if draft_probs is not None:
                vocab = max(target_probs.shape[-1], draft_probs.shape[-1])
                draft_probs = _pad_vocab(draft_probs.to(target_probs.device), vocab)
                target_probs = _pad_vocab(target_probs, vocab)
            device = target_probs.device
            accept = sampling.uniforms(draft.used_uniforms(), device)
            accept = torch.nn.functional.pad(accept, (0, draft.num_nodes - accept.shape[1]))
            sample = sampling.uniforms([1] * draft.batch, device)[:, 0]
            result = verify_draft(rule, draft, draft_probs, target_probs, accept, sample)
        return TreeResult(
            result.tokens.cpu(), result.num_accepted.cpu(), result.path.cpu(), result.rule_used
        )

    # ------------------------------------------------------------------ batch changes

    def _change_batch(self) -> None:
        """Finished rows leave the models; waiting requests join while there is room."""
        live = [r for r in self._running if r.finish_reason is None]
        room = self.max_batch - len(live)
        joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        if len(live) == len(self._running) and not joining:
            self._done = []
            return
        sequences = [r.sequence for r in self._running]
        keep = torch.tensor(
            [i for i, r in enumerate(self._running) if r.finish_reason is None],
            dtype=torch.int64,
        )
        prompts = [r.prompt for r in joining]
        clock = time.perf_counter()
        self.target.set_rows(sequences, keep, prompts)
        if self.drafter is not None:
            self.drafter.set_rows(sequences, keep, prompts)
        self.stats.prefill_seconds += time.perf_counter() - clock
        self._since("target prefill", self.target.prefill_seconds)  # counted just now
        for request in self._running:
            if request.finish_reason is not None:
                self.policy.forget(request.id)
        self._running = live + joining
        self._done = []

    def _report_aborts(self) -> list[RequestOutput]:
        none = [] if self.logprobs else None
        outputs = [self._final(r, [], [], none) for r in self._aborted]
        outputs += [self._final(r, [], [], none) for r in self._done if r.finish_reason == "abort"]
        self._aborted = []
        return outputs

    def _has_unreported(self) -> bool:
        return any(r.finish_reason == "abort" for r in self._done)

    # ------------------------------------------------------------------ outputs and stats

    def _output(
        self, request: _Request, emitted: list[int], kinds, logprobs, tops=None
    ) -> RequestOutput:
        reason = None
        if emitted and emitted[-1] in request.eos:
            reason = "eos"
        elif request.remaining <= 0:
            reason = "length"
        elif request.stop is not None and request.stop(request.new_tokens):
            reason = "stop"
        n = len(emitted)
        tops = None if tops is None else tops[:n]
        logprobs = None if logprobs is None else logprobs[:n]
        if reason is None:
            return RequestOutput(request.id, emitted, kinds[:n], logprobs, top_logprobs=tops)
        request.finish_reason = reason
        self._done.append(request)
        return self._final(request, emitted, kinds[:n], logprobs, tops)

    def _final(self, request: _Request, emitted, kinds, logprobs, tops=None) -> RequestOutput:
        stats = request.stats
        stats.new_tokens = len(request.new_tokens)
        stats.total_seconds = time.perf_counter() - request.started
        stats.target_single_pass_seconds = self._single_pass_seconds()
        if tops is None and request.top_logprobs:
            tops = []
        return RequestOutput(
            request.id, emitted, kinds, logprobs, True, request.finish_reason, stats, tops
        )

    def _since(self, counter: str, total: float) -> float:
        """How much a running total of the drafter's or the target cursor's (`counter`: a key
        of self._seen) grew since the last call for it."""
        seen, self._seen[counter] = self._seen[counter], total
        return total - seen

    def _without_prefill(self, seconds: float, counter: str, total: float) -> float:
        """`seconds` of a step's part less the prompt prefills it ran (the growth of `total`,
        the part's prefill seconds so far), which go to stats.prefill_seconds."""
        prefill = self._since(counter, total)
        self.stats.prefill_seconds += prefill
        return max(0.0, seconds - prefill)

    def _single_pass_seconds(self) -> float | None:
        """The measured mean of a 1-token target pass, None until one was timed."""
        single = self.costs.target_pass.get(1)
        return None if single is None else single.value

    def _record(self, step: _StepRows, draft: Draft, timing: _StepTiming, started) -> None:
        step.add_to(self.stats, range(draft.batch), timing)
        for b, request in enumerate(self._running):
            step.add_to(request.stats, [b], timing)
            request.stats.draft_passes += timing.draft_passes
        self.stats.draft_passes += timing.draft_passes
        bucket = self.costs_by_batch.setdefault(batch_bucket(draft.batch), StepCosts())
        for costs in (self.costs, bucket):
            for _ in range(timing.draft_passes):
                costs.draft_step.add(timing.draft_seconds / timing.draft_passes)
            if not timing.target_tokens:  # no pass, or only a prompt pass: nothing to price
                costs.last_step_seconds = None
                continue
            # scoring and verifying: what a step with these many tokens per row costs beyond
            # drafting (a ragged pass as the full pass it stands for)
            tokens, seconds = timing.target_tokens, timing.target_seconds + timing.verify_seconds
            if self.target.ragged_passes:
                single = costs.target_pass.get(1)
                tokens, seconds = full_pass_equivalent(
                    tokens,
                    seconds,
                    timing.fed_tokens,
                    timing.fed_rows,
                    None if single is None else single.value,
                )
            costs.add_target_pass(tokens, seconds)
            costs.last_step_seconds = (
                timing.draft_seconds + timing.target_seconds + timing.verify_seconds
            )
        self.stats.total_seconds += time.perf_counter() - started
        self.stats.target_single_pass_seconds = self._single_pass_seconds()


@dataclass
class _StepTiming:
    draft_seconds: float
    target_seconds: float
    verify_seconds: float
    draft_passes: int
    target_tokens: int = 1  # tokens per row of the target pass; 0: none ran
    # a prompt pass scored the first drafts of rows that joined (its time is prefill's)
    prompt_scored: bool = False
    fed_tokens: int = 0  # tokens the target pass fed over all rows
    fed_rows: int = 0  # rows it fed

    @property
    def target_pass(self) -> bool:
        """Whether the step ran a target pass that scored its rows."""
        return bool(self.target_tokens) or self.prompt_scored


@dataclass
class _StepRows:
    """One verified step, per row: kept nodes, how deep the draft was tested along the kept
    path, the depth and node count of the row's draft."""

    accepted: list[int]
    tested_depth: list[int]
    depths: list[int]
    nodes: list[int]
    tree: bool
    rules_used: list[str]  # per row

    @staticmethod
    def of(
        draft: Draft, result: TreeResult, recovered: torch.Tensor, rules_used: list[str]
    ) -> _StepRows:
        """recovered: bool [batch], the last kept node (or the root) had valid children, so one
        more keep test ran (and failed) below it. rules_used: the rule that verified each row."""
        if not draft.num_nodes:  # nothing drafted: nothing kept or tested, depth 0
            none = [0] * draft.batch
            return _StepRows(none, none, none, none, False, rules_used)
        return _StepRows(
            result.num_accepted.tolist(),
            (result.num_accepted + recovered.long()).tolist(),
            draft.depths().tolist(),
            draft.valid.sum(dim=1).tolist(),
            not draft.is_chain,
            rules_used,
        )

    def add_to(self, stats: DecodeStats, rows, timing: _StepTiming) -> None:
        """Adds the rows `rows` of this step to `stats`. A row "drafts at depth i" when its kept
        path reached a node with children there; alpha is the chance that one of those children
        is kept (for a chain: the next draft). The pass counts once in rules_used, under its
        rule, or under "a+b" when its rows were verified by several; a step that ran no target
        pass (its rows' distributions came from their prompt pass) counts in neither."""
        if timing.target_pass:
            stats.target_passes += 1
            stats.tree_steps += int(self.tree)
            rule = "+".join(sorted({self.rules_used[b] for b in rows}))
            stats.rules_used[rule] = stats.rules_used.get(rule, 0) + 1
        for b in rows:
            accepted, tested = self.accepted[b], self.tested_depth[b]
            depth = self.depths[b]
            stats.draft_lengths[depth] = stats.draft_lengths.get(depth, 0) + 1
            stats.row_steps += 1
            stats.drafted += self.nodes[b]
            stats.accepted += accepted
            stats.keep_tests += accepted + int(accepted < tested)
            stats.drafted_row_steps += int(tested > 0)
            stats.empty_steps += int(tested > 0 and accepted == 0)
            while len(stats.drafted_by_position) < tested:
                stats.drafted_by_position.append(0)
                stats.accepted_by_position.append(0)
            # position i was tested when the row drafted past i and kept everything before it
            for i in range(min(tested, accepted + 1)):
                stats.drafted_by_position[i] += 1
                stats.accepted_by_position[i] += int(accepted > i)
        stats.draft_seconds += timing.draft_seconds
        stats.target_seconds += timing.target_seconds
        stats.verify_seconds += timing.verify_seconds


def _one_token_result(tokens: torch.Tensor, rule_used: str) -> TreeResult:
    """The result of a step without drafts: one token per row (int64 [batch, 1]), nothing
    accepted, an empty path."""
    batch = tokens.shape[0]
    no_path = torch.zeros(batch, 0, dtype=torch.int64)
    return TreeResult(tokens.cpu(), torch.zeros(batch, dtype=torch.int64), no_path, rule_used)


def _last_node_has_children(draft: Draft, result: TreeResult) -> torch.Tensor:
    """bool [batch]: the last accepted node (the root when none was accepted) has valid
    children, i.e. the emitted token after it was recovered, not a bonus token."""
    if not draft.num_nodes:  # the root has no children: a bonus token
        return torch.zeros(draft.batch, dtype=torch.bool)
    if result.path.shape[1] == 0:
        last = torch.zeros(draft.batch, dtype=torch.int64)
    else:
        previous = (result.num_accepted - 1).clamp(min=0)[:, None]
        last = result.path.gather(1, previous)[:, 0] + 1
        last = torch.where(result.num_accepted > 0, last, 0)  # index into [root, node 0, ...]
    return draft.has_children().gather(1, last[:, None])[:, 0]


def _step_kinds(result: TreeResult, recovered: torch.Tensor) -> list[list[str]]:
    """Per row: accepted for each kept node, then recovered (drawn after a rejection) or bonus
    (the last kept node, or the root, had no valid children)."""
    return [
        [ACCEPTED] * a + [RECOVERED if r else BONUS]
        for a, r in zip(result.num_accepted.tolist(), recovered.tolist(), strict=True)
    ]


def _emitted_logprobs(
    logits: torch.Tensor, result: TreeResult, tops: list[int]
) -> tuple[list[list[float]], list[list[list[tuple[int, float]]] | None]]:
    """Per row: the target's log-softmax (raw logits) of each emitted token, and, for rows with
    tops[b] > 0, the tops[b] most likely (id, log-probability) pairs at each emitted token's
    position (most likely first, ties by id; else None). The token after the i-th accepted node
    was scored at that node's logits row (row 0 is the root)."""
    batch = result.tokens.shape[0]
    width = result.tokens.shape[1]
    rows = torch.zeros(batch, width, dtype=torch.int64)
    if result.path.shape[1]:
        rows[:, 1:] = (result.path[:, : width - 1] + 1).clamp(min=0)
    # Whole rows of logits by index (a copy of each picked row; a gather of [batch, width,
    # vocab] indices cost several times more per step), then log p = logit - logsumexp: the
    # emitted tokens' and the top alternatives' log-probabilities come from the same lse.
    vocab = logits.shape[2]
    if width == 1:  # one token per row (nothing kept): the root's row
        picked = logits[:, :1].float()
    else:
        flat = logits.reshape(batch * logits.shape[1], vocab)
        index = (torch.arange(batch)[:, None] * logits.shape[1] + rows).reshape(-1)
        picked = flat.index_select(0, index.to(logits.device)).float()
        picked = picked.reshape(batch, width, vocab)
    lse = torch.logsumexp(picked, dim=-1, keepdim=True)
    tokens = result.tokens.to(logits.device).clamp(min=0, max=vocab - 1)
    values = (picked.gather(2, tokens[:, :, None]) - lse)[:, :, 0].cpu()
    counts = (result.num_accepted + 1).tolist()
    chosen = [values[b, : counts[b]].tolist() for b in range(batch)]
    most = max(tops, default=0)
    if most == 0:
        return chosen, [None] * batch
    top = torch.topk(picked, most, dim=-1)
    top_values, top_ids = (top.values - lse).cpu().tolist(), top.indices.cpu().tolist()
    alternatives: list[list[list[tuple[int, float]]] | None] = []
    for b in range(batch):
        if not tops[b]:
            alternatives.append(None)
            continue
        row = []
        for i in range(counts[b]):
            pairs = sorted(zip(top_ids[b][i], top_values[b][i], strict=True), key=_by_logprob)
            row.append(pairs[: tops[b]])
        alternatives.append(row)
    return chosen, alternatives


def _by_logprob(pair: tuple[int, float]) -> tuple[float, int]:
    return -pair[1], pair[0]


def _commit(request: _Request, result: TreeResult, b: int) -> list[int]:
    """Appends row b's emitted tokens to the request, cut after an EOS and at the limit."""
    count = int(result.num_accepted[b]) + 1
    emitted = result.tokens[b, :count].tolist()[: request.remaining]
    for j, token in enumerate(emitted):
        if token in request.eos:
            emitted = emitted[: j + 1]
            break
    request.new_tokens.extend(emitted)
    return emitted


def _draft_rows(draft: Draft, index: torch.Tensor) -> Draft:
    """The draft of rows `index` (int64 [rows], CPU), same nodes and parents."""
    probs = draft.probs
    if probs is not None:
        probs = probs.index_select(0, index.to(probs.device))
    return Draft(
        draft.tokens.index_select(0, index),
        draft.parents,
        probs,
        draft.valid.index_select(0, index),
    )


def _merge_results(
    parts: list[tuple[torch.Tensor, TreeResult]], batch: int
) -> tuple[TreeResult, list[str]]:
    """The TreeResults of groups of rows (row indices, result) as one of the whole batch, the
    tokens and paths padded with PAD to the widest group; and the rule used per row."""
    width = max(part.tokens.shape[1] for _, part in parts)
    depth = max(part.path.shape[1] for _, part in parts)
    tokens = torch.full((batch, width), PAD, dtype=torch.int64)
    path = torch.full((batch, depth), PAD, dtype=torch.int64)
    accepted = torch.zeros(batch, dtype=torch.int64)
    rules_used = [""] * batch
    for index, part in parts:
        tokens[index, : part.tokens.shape[1]] = part.tokens
        path[index, : part.path.shape[1]] = part.path
        accepted[index] = part.num_accepted
        for b in index.tolist():
            rules_used[b] = part.rule_used
    return TreeResult(tokens, accepted, path, "+".join(sorted(set(rules_used)))), rules_used


def _scorable(draft: Draft, target: ModelCursor) -> Draft:
    """The draft as the target scores it. A draft model with a bigger vocabulary can draft an id
    the target does not have; the target scores a placeholder (id 0) in its place. That is
    exact: the target's distribution at the id's position comes from the tokens before it, the
    keep test rejects the id for certain (its target probability is 0, the rules pad the
    target's distributions with zeros), and so nothing scored after it is ever kept."""
    if not draft.num_nodes:
        return draft
    outside = draft.tokens >= target.vocab_size
    if not bool(outside.any()):
        return draft
    return dataclasses.replace(draft, tokens=torch.where(outside, 0, draft.tokens))


def _pad_vocab(probs: torch.Tensor, vocab: int) -> torch.Tensor:
    missing = vocab - probs.shape[-1]
    return probs if missing == 0 else torch.nn.functional.pad(probs, (0, missing))


def _draft_length_policy(draft_length, drafter, fixed_depth):
    if drafter is None:
        return FixedDraftLength(0)
    if fixed_depth is not None:
        return FixedDraftLength(fixed_depth)
    if draft_length == "auto":
        return AdaptiveDraftLength()
    if isinstance(draft_length, int) and not isinstance(draft_length, bool):
        if draft_length < 0:
            raise ValueError(f"draft_length: expected an integer >= 0, got {draft_length!r}")
        return FixedDraftLength(draft_length)
    if isinstance(draft_length, (FixedDraftLength, AdaptiveDraftLength)):
        return draft_length
    raise TypeError(
        f"draft_length: expected 'auto', an int or a FixedDraftLength/AdaptiveDraftLength, got "
        f"{draft_length!r}"
    )


def _row_capacity(model) -> int | None:
    """The most tokens one row of `model` can hold, prompt included, where it has a bound:
    llama.cpp's KV cells (n_ctx, shared by the rows), a static cache's max_length; None for
    a model whose cache grows as needed."""
    for name in ("n_ctx", "max_length"):
        value = getattr(model, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _check_prompt(prompt_tokens: Sequence[int], vocab: int) -> list[int]:
    if isinstance(prompt_tokens, (str, bytes)) or not isinstance(prompt_tokens, Sequence):
        raise TypeError(
            f"prompt_tokens: expected a list of token ids, got {type(prompt_tokens).__name__}"
        )
    if len(prompt_tokens) == 0:
        raise ValueError("prompt_tokens: expected at least one token, got an empty prompt")
    prompt = []
    for j, token in enumerate(prompt_tokens):
        try:
            token = operator.index(token)
        except TypeError:
            raise TypeError(
                f"prompt_tokens[{j}]: expected an int, got {type(token).__name__}"
            ) from None
        if not 0 <= token < vocab:
            raise ValueError(
                f"prompt_tokens[{j}]: expected a token id in [0, {vocab}), got {token}"
            )
        prompt.append(int(token))
    return prompt
