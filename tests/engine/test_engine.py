"""The step-wise Engine: requests joining and leaving between steps, per-request sampling and
seeds, aborts, finish reasons, and statistical exactness with requests joining mid-flight.

Statistical tests: every request's first DEPTH new tokens are G-tested against the exact target
law (test_exactness.py's helpers: cells with expected count < 5 pooled), one combined p-value per
test, failing below ALPHA = 1e-6 (the false-failure rate of an exact engine). Each runs about 4000
requests; the negative controls (a drafter that reports the wrong q) reach p-values near 0 at the
same size.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from test_exactness import (
    ALPHA,
    DEPTH,
    PROMPT,
    SHORT_PROMPT,
    MisreportingDrafter,
    outcome_test,
    p_value,
    target_outcomes,
    toy_pair,
)

from specsample import Engine, RequestOutput, SamplingConfig
from specsample.adapters.cursor import ModelCursor
from specsample.adapters.toy import ToyLM
from specsample.drafters.base import Draft
from specsample.drafters.model import ModelDrafter
from specsample.drafters.ngram import NgramDrafter
from specsample.drafters.tree import TreeDrafter, TreeShape
from specsample.engine import ACCEPTED, BONUS, RECOVERED
from specsample.engine.engine import _emitted_logprobs
from specsample.engine.length import AdaptiveDraftLength, FixedDraftLength
from specsample.rules.tree import TreeResult
from stats_identities import assert_stats_identities

CONFIGS = [
    SamplingConfig(),
    SamplingConfig(temperature=0.7, top_k=2),
    SamplingConfig(temperature=1.3, top_p=0.8),
    SamplingConfig(temperature=1.0, min_p=0.3),
    SamplingConfig(temperature=0),
]


def run_to_end(engine: Engine, max_steps: int = 10_000) -> dict[int, list[RequestOutput]]:
    outputs: dict[int, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    assert not engine.has_unfinished(), "the engine did not finish in max_steps"
    return outputs


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.tokens]


def seeded_tokens(engine: Engine, requests: int, configs: int, max_new_tokens: int):
    """Runs `requests` requests on the prompt [1, 2] (request i: CONFIGS[i % configs], seed i)
    to the end; each request's tokens, in order. The engine's statistics must hold and show
    drafts both kept and rejected."""
    ids = [
        engine.add_request(
            [1, 2], sampling=CONFIGS[i % configs], max_new_tokens=max_new_tokens, seed=i
        )
        for i in range(requests)
    ]
    outputs = run_to_end(engine)
    assert_stats_identities(engine.stats)
    assert engine.stats.keep_tests > engine.stats.accepted > 0
    return [tokens_of(outputs[i]) for i in ids]


def pair16() -> tuple[ToyLM, ToyLM]:
    target = ToyLM(16, seed=1, scale=1.5)
    return target, ToyLM(16, seed=2, base=target, noise=0.8)


DRAFTERS = {
    "none": lambda draft: None,
    "model": lambda draft: ModelDrafter(draft),
    "ngram": lambda draft: NgramDrafter(max_ngram=2),
    "tree": lambda draft: TreeDrafter(draft, TreeShape((2, 2))),
    "chains": lambda draft: TreeDrafter(draft, TreeShape.chains(2, 3), children="iid"),
}


# ---------------------------------------------------------------- seed invariance


@pytest.mark.parametrize("drafter_name", sorted(DRAFTERS))
@pytest.mark.parametrize("config", [0, 1, 2, 3], ids=["t1", "t0.7-topk", "t1.3-topp", "minp"])
def test_a_seeded_request_emits_the_same_tokens_alone_in_any_batch_and_joining_late(
    drafter_name, config
):
    prompt, seed = [3, 1, 4, 1, 5], 1234
    sampling = CONFIGS[config]

    def run(neighbours: int, join_at: int) -> list[int]:
        target, draft = pair16()
        engine = Engine(target, DRAFTERS[drafter_name](draft), draft_length=3, max_batch=4)
        others = [
            engine.add_request(
                [(7 * i + 2) % 16, i % 16],
                sampling=CONFIGS[i % len(CONFIGS)],
                max_new_tokens=5 + i,
                seed=i,
            )
            for i in range(neighbours)
        ]
        outputs: dict[int, list[RequestOutput]] = {}
        for _ in range(join_at):
            for output in engine.step():
                outputs.setdefault(output.request_id, []).append(output)
        mine = engine.add_request(prompt, sampling=sampling, max_new_tokens=12, seed=seed)
        for request_id, outs in run_to_end(engine).items():
            outputs.setdefault(request_id, []).extend(outs)
        assert set(outputs) == set(others) | {mine}
        assert_stats_identities(engine.stats)
        return tokens_of(outputs[mine])

    alone = run(0, 0)
    assert len(alone) == 12
    assert run(3, 0) == alone
    assert run(5, 2) == alone  # queued behind max_batch, joins when a row frees up
    assert run(2, 3) == alone


def test_another_seed_gives_other_tokens():
    target, draft = pair16()
    engine = Engine(target, ModelDrafter(draft), draft_length=2)
    ids = [engine.add_request([1, 2], max_new_tokens=16, seed=s) for s in (1, 2)]
    outputs = run_to_end(engine)
    assert tokens_of(outputs[ids[0]]) != tokens_of(outputs[ids[1]])


def test_engine_leaves_the_global_rng_alone():
    target, draft = pair16()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    engine = Engine(target, ModelDrafter(draft), draft_length=2)
    engine.add_request([1, 2], max_new_tokens=8, seed=5)
    engine.add_request([3], max_new_tokens=8)  # seed None: drawn from the OS, not torch
    run_to_end(engine)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- outputs, limits, aborts


def test_outputs_label_every_token_and_finish_with_a_reason():
    target, draft = pair16()
    engine = Engine(target, ModelDrafter(draft), draft_length=3)
    eos = 5
    ids = [
        engine.add_request([1, 2, 3], max_new_tokens=9, seed=s, eos_token_ids=(eos,))
        for s in range(12)
    ]
    stop_id = engine.add_request([4], max_new_tokens=30, seed=3, stop=lambda t: len(t) >= 4)
    outputs = run_to_end(engine)
    for request_id in ids + [stop_id]:
        outs = outputs[request_id]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        tokens = tokens_of(outs)
        for o in outs:
            assert len(o.kinds) == len(o.tokens) == len(o.logprobs)
            # one step: accepted drafts, then at most one recovered or bonus token, last
            assert all(k == ACCEPTED for k in o.kinds[:-1])
            assert not o.kinds or o.kinds[-1] in (ACCEPTED, RECOVERED, BONUS)
            assert all(lp <= 0 for lp in o.logprobs)
        last = outs[-1]
        assert_stats_identities(last.stats)
        assert last.stats.new_tokens == len(tokens)
        if request_id == stop_id:
            assert last.finish_reason == "stop" and len(tokens) >= 4
        elif eos in tokens:
            assert last.finish_reason == "eos" and tokens.index(eos) == len(tokens) - 1
        else:
            assert last.finish_reason == "length" and len(tokens) == 9
    reasons = {outputs[i][-1].finish_reason for i in ids}
    assert reasons == {"eos", "length"}, "the seeds should reach both ends"
    assert_stats_identities(engine.stats)


def test_logprobs_are_the_targets_log_softmax_of_each_token():
    target, draft = pair16()
    engine = Engine(target, ModelDrafter(draft), draft_length=3)
    prompt = [2, 7]
    request_id = engine.add_request(
        prompt, sampling=SamplingConfig(temperature=0.5), max_new_tokens=10, seed=9
    )
    outs = run_to_end(engine)[request_id]
    sequence = list(prompt)
    for o in outs:
        for token, logprob in zip(o.tokens, o.logprobs, strict=True):
            expected = torch.log_softmax(target.logits_for(sequence).double(), -1)[token]
            assert logprob == pytest.approx(float(expected), abs=1e-5)
            sequence.append(token)


def test_abort_ends_a_running_and_a_waiting_request_and_the_others_go_on():
    target, draft = pair16()
    engine = Engine(target, ModelDrafter(draft), draft_length=2, max_batch=2)
    running = [engine.add_request([1, 2], max_new_tokens=20, seed=s) for s in range(2)]
    waiting = engine.add_request([3], max_new_tokens=20, seed=7)
    engine.step()
    assert engine.num_running() == 2 and engine.num_waiting() == 1
    assert engine.abort(running[0]) and engine.abort(waiting)
    assert not engine.abort(running[0])  # already ended
    assert not engine.abort(12345)
    outputs = engine.step()
    finals = {o.request_id: o for o in outputs if o.finished}
    assert finals[running[0]].finish_reason == "abort" and finals[running[0]].tokens == []
    assert finals[waiting].finish_reason == "abort"
    rest = run_to_end(engine)
    assert rest[running[1]][-1].finish_reason == "length"
    assert running[0] not in rest and waiting not in rest


def test_max_batch_bounds_the_running_requests_and_the_queue_drains_in_order():
    target, draft = pair16()
    engine = Engine(target, NgramDrafter(), draft_length=2, max_batch=3)
    ids = [engine.add_request([i % 16, 1], max_new_tokens=3 + i, seed=i) for i in range(8)]
    finished_order = []
    while engine.has_unfinished():
        outputs = engine.step()
        assert engine.num_running() <= 3
        finished_order += [o.request_id for o in outputs if o.finished]
    assert sorted(finished_order) == ids


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"prompt_tokens": []}, ValueError, "prompt_tokens"),
        ({"prompt_tokens": "abc"}, TypeError, "prompt_tokens"),
        ({"prompt_tokens": [99]}, ValueError, "prompt_tokens[0]"),
        ({"prompt_tokens": [1, 16]}, ValueError, "prompt_tokens[1]"),  # the vocabulary is 16
        ({"prompt_tokens": [-1]}, ValueError, "prompt_tokens[0]"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"seed": -1}, ValueError, "seed"),
        ({"sampling": {"temperature": 1}}, TypeError, "sampling"),
        ({"stop": "END"}, TypeError, "stop"),
    ],
)
def test_bad_requests_are_refused_naming_the_argument(kwargs, error, argument):
    target, _ = pair16()
    engine = Engine(target)
    call = {"prompt_tokens": [1, 2], **kwargs}
    with pytest.raises(error, match=f"^{__import__('re').escape(argument)}: "):
        engine.add_request(call.pop("prompt_tokens"), **call)


def test_a_request_longer_than_a_row_of_the_target_can_hold_is_refused():
    """A target with a bounded cache (llama.cpp's n_ctx cells, a static cache's max_length):
    a request whose prompt and max_new_tokens pass it is refused when it is added, naming
    max_new_tokens and what fits, instead of failing mid-generation; one that fits runs."""
    target, _ = pair16()
    target.n_ctx = 12  # as LlamaCppLM names its bound
    engine = Engine(target)
    with pytest.raises(ValueError, match=r"^max_new_tokens: expected at most 9 after a prompt"):
        engine.add_request([1, 2, 3], max_new_tokens=10, seed=0)
    assert not engine.has_unfinished()
    engine.add_request([1, 2, 3], max_new_tokens=9, seed=0)
    while engine.has_unfinished():
        engine.step()
    del target.n_ctx
    target.max_length = 4  # as the static cache names its bound
    with pytest.raises(ValueError, match=r"^max_new_tokens: expected at most 1 after a prompt"):
        Engine(target).add_request([1, 2, 3], max_new_tokens=2, seed=0)


def test_bad_engine_arguments_are_refused_naming_them():
    target, draft = pair16()
    with pytest.raises(TypeError, match="^target: "):
        Engine("model")
    with pytest.raises(ValueError, match="^max_batch: "):
        Engine(target, max_batch=0)
    with pytest.raises(ValueError, match="^rule: "):
        Engine(target, rule="nonsense")
    with pytest.raises(ValueError, match="^rule: 'block' applies to one draft chain"):
        Engine(target, TreeDrafter(draft, TreeShape((2,))), rule="block")


# ---------------------------------------------------------------- exactness through the engine


def engine_p_value(
    drafter,
    *,
    draft_length=2,
    abort_every: int = 0,
    seed: int = 0,
    prompt_pass_apart=False,
    max_new_tokens: int = DEPTH,
) -> float:
    """About ROWS requests over two prompts and four sampling configs; half are added before
    the first step, the rest after two steps (queued behind max_batch, joining as rows free
    up). Every `abort_every`-th request (by id, so independently of its tokens) is aborted after
    the first step and left out. Each (prompt, config) group is G-tested against its exact law.
    The toy target scores a request's prompt and first drafts in one pass (`add_rows_last`);
    with prompt_pass_apart it lacks that, and a request's prompt pass runs when it joins.
    Requests generate max_new_tokens tokens (at least DEPTH; only the first DEPTH are tested)."""
    target, _ = toy_pair()
    if prompt_pass_apart:
        target.add_rows_last = None  # not a PromptScoring model
    engine = Engine(target, drafter, draft_length=draft_length, max_batch=2500)
    groups = [(p, c) for p in (PROMPT, SHORT_PROMPT) for c in CONFIGS[:4]]
    per_group = 500
    requests: dict[int, int] = {}

    def add(count: int, offset: int) -> None:
        for i in range(count):
            g = (offset + i) % len(groups)
            prompt, config = groups[g]
            request_id = engine.add_request(
                prompt,
                sampling=config,
                max_new_tokens=max_new_tokens,
                seed=seed * 10**6 + offset + i,
            )
            requests[request_id] = g

    total = per_group * len(groups)
    add(total // 2, 0)
    outputs: dict[int, list[RequestOutput]] = {}
    for step in range(2):
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
        if step == 0 and abort_every:
            for request_id in list(requests)[::abort_every]:
                engine.abort(request_id)
    add(total - total // 2, total // 2)
    for request_id, outs in run_to_end(engine).items():
        outputs.setdefault(request_id, []).extend(outs)
    assert engine.stats.drafted > 0
    assert_stats_identities(engine.stats)
    rows: list[list[list[int]]] = [[] for _ in groups]
    for request_id, g in requests.items():
        outs = outputs[request_id]
        if outs[-1].finish_reason == "abort":
            continue
        rows[g].append(tokens_of(outs))
    tests = []
    for g, (prompt, config) in enumerate(groups):
        assert len(rows[g]) > 300
        tests.append(outcome_test(rows[g], target_outcomes(target, prompt, config, ())))
    return p_value(*tests)


ENGINE_VARIANTS = {
    "model-mixed-configs-joining": lambda: engine_p_value(ModelDrafter(toy_pair()[1])),
    "model-aborts": lambda: engine_p_value(ModelDrafter(toy_pair()[1]), abort_every=7),
    "model-prompt-pass-apart": lambda: engine_p_value(
        ModelDrafter(toy_pair()[1]), prompt_pass_apart=True
    ),
    "ngram-joining": lambda: engine_p_value(NgramDrafter(max_ngram=2), draft_length=3),
    "tree-joining-aborts": lambda: engine_p_value(
        TreeDrafter(toy_pair()[1], TreeShape((2, 1))), abort_every=5
    ),
    # The adaptive length's cost check starts with target-only steps (until FIRST_SINGLE_PASSES
    # 1-token passes are timed) before it drafts: with DEPTH tokens per request the run ends
    # before then; with one more, the last rows to join draft their third token (tested).
    "adaptive-length": lambda: engine_p_value(
        ModelDrafter(toy_pair()[1]), draft_length="auto", max_new_tokens=DEPTH + 1
    ),
}


@pytest.mark.parametrize("variant", sorted(ENGINE_VARIANTS))
def test_engine_output_follows_the_target_with_requests_joining_and_leaving(variant):
    assert ENGINE_VARIANTS[variant]() > ALPHA


def test_engine_negative_control_misreported_draft_fails_the_same_test():
    drafter = MisreportingDrafter(toy_pair()[1], argmax=True, report=lambda q: q)
    assert engine_p_value(drafter) < ALPHA


def test_pooled_stats_sum_counters_and_merge_histograms():
    target, draft = pair16()
    runs = []
    for seed in (1, 2):
        engine = Engine(target, ModelDrafter(draft), draft_length=2)
        engine.add_request([1, 2], max_new_tokens=6, seed=seed)
        run_to_end(engine)
        runs.append(engine.stats)
    pooled = type(runs[0]).pooled(runs)
    assert pooled.target_passes == sum(r.target_passes for r in runs)
    assert pooled.accepted == sum(r.accepted for r in runs)
    assert pooled.new_tokens == 12
    for length in set(runs[0].draft_lengths) | set(runs[1].draft_lengths):
        counts = [r.draft_lengths.get(length, 0) for r in runs]
        assert pooled.draft_lengths[length] == sum(counts)
    assert_stats_identities(pooled)


@pytest.mark.parametrize("drafter_name", ["model", "ngram", "tree", "chains"])
def test_stream_labels_and_pass_sizes_agree_with_the_statistics(drafter_name):
    """Without EOS no step is cut (drafts stop one short of the limit), so per request:
    recovered labels = keep tests - accepted (one per rejection), bonus labels = the other row
    steps, accepted labels = accepted; and every step with d drafted nodes recorded a target
    pass over d + 1 tokens (one request: the pass is that row's), but the first. A chain's
    first drafts were scored by the request's prompt pass (prefill time: no pass cost recorded,
    one target pass counted); a tree's first step fed its d nodes after the prompt pass, which
    left no pending token (a pass over d tokens)."""
    target, draft = pair16()
    engine = Engine(target, DRAFTERS[drafter_name](draft), draft_length=3)
    request_id = engine.add_request([1, 2, 1, 2, 1], max_new_tokens=40, seed=4)
    drafted_nodes = []
    propose = engine._propose

    def recording_propose(*args):
        proposed = propose(*args)
        drafted_nodes.append(int(proposed.valid.sum()))
        return proposed

    engine._propose = recording_propose
    outs = run_to_end(engine)[request_id]
    kinds = [k for o in outs for k in o.kinds]
    stats = outs[-1].stats
    assert_stats_identities(stats)
    assert kinds.count(RECOVERED) == stats.keep_tests - stats.accepted
    assert kinds.count(BONUS) == stats.row_steps - (stats.keep_tests - stats.accepted)
    assert kinds.count(ACCEPTED) == stats.accepted
    assert stats.accepted > 0 and kinds.count(RECOVERED) > 0
    passes = {tokens: mean.count for tokens, mean in engine.costs.target_pass.items()}
    first = drafted_nodes[0]
    assert first > 0  # else the first step ran no pass (its token came from the prompt's)
    chain = drafter_name in ("model", "ngram")
    assert sum(passes.values()) == stats.target_passes - int(chain)
    assert engine.target.prompt_scored is False  # only the first step's pass was a prompt pass
    if chain:  # nodes = draft length
        expected = {length + 1: steps for length, steps in stats.draft_lengths.items()}
        expected[first + 1] -= 1
        assert passes == {n: c for n, c in expected.items() if c}


def test_a_request_scores_its_prompt_and_first_drafts_in_one_target_pass():
    """One request, 3 drafts a step: the target runs one pass per step, the first over the
    prompt and its drafts (counted as a target pass, timed as prefill, priced as no pass
    length); a target without add_rows_last runs one pass more (its prompt pass apart)."""
    for apart in (False, True):
        target, draft = pair16()
        if apart:
            target.add_rows_last = None
        engine = Engine(target, ModelDrafter(draft), draft_length=3)
        engine.add_request([1, 2, 1, 2, 1], max_new_tokens=12, seed=4)
        run_to_end(engine)
        steps = sum(engine.stats.draft_lengths.values())
        assert engine.stats.target_passes == steps
        assert target.num_calls == steps + int(apart)
        priced = sum(mean.count for mean in engine.costs.target_pass.values())
        assert priced == steps - (0 if apart else 1)


# ---------------------------------------------------------------- a drafter's lazy prefill


class ScriptedLength(FixedDraftLength):
    """Draft lengths from a script, one per step (then `after`), the same for every row."""

    def __init__(self, script: list[int], after: int):
        super().__init__(after)
        self.script = list(script)

    def next_lengths(self, rows):
        k = self.script.pop(0) if self.script else self.k
        return torch.full((len(rows),), k, dtype=torch.int64)


def test_a_drafter_never_asked_to_draft_never_prefills():
    target, draft = pair16()
    engine = Engine(target, ModelDrafter(draft), draft_length=ScriptedLength([], 0))
    engine.add_request([3, 1, 4], max_new_tokens=6, seed=1)
    engine.add_request([2, 7], max_new_tokens=4, seed=2)
    run_to_end(engine)
    assert draft.num_calls == 0 and target.num_calls > 0


@pytest.mark.parametrize("drafter_name", ["model", "tree"])
def test_a_lazy_drafter_drafts_what_an_eager_one_drafts(drafter_name):
    """Drafting starts at step 4, after rows joined and one left (a tree drafter drafts from
    step 1: its depth is fixed): the lazy drafter prefills every row's committed tokens then,
    and each request's tokens and the draft model's cached tokens equal those of a drafter that
    prefilled up front."""
    runs = []
    for lazy in (True, False):
        target, draft = pair16()
        drafter = DRAFTERS[drafter_name](draft)
        drafter.cursor.lazy = lazy
        engine = Engine(target, drafter, draft_length=ScriptedLength([0, 0, 0], 2), max_batch=2)
        ids = [
            engine.add_request([3, 1, 4], max_new_tokens=3, seed=1),
            engine.add_request([2, 7], max_new_tokens=14, seed=2),
            engine.add_request([5], max_new_tokens=10, seed=3, sampling=CONFIGS[1]),
        ]
        outputs = run_to_end(engine)
        assert_stats_identities(engine.stats)
        assert engine.stats.draft_passes > 0
        runs.append(([tokens_of(outputs[i]) for i in ids], draft.sequences))
    assert runs[0] == runs[1]


class SlowPrefillLM(ToyLM):
    """A toy model whose prompt prefill takes `delay` seconds more (a long prompt)."""

    def __init__(self, *args, delay: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def prefill(self, prompts):
        time.sleep(self.delay)
        return super().prefill(prompts)


@pytest.mark.parametrize("drafter_name", ["model", "tree"])
def test_a_lazy_prefill_counts_as_prefill_not_as_a_draft_pass(drafter_name):
    """The draft model's prompt prefill, run at its first draft, goes to prefill_seconds: the
    draft passes the cost model times (and DecodeStats.draft_seconds) leave it out. Each draft
    pass of the toy model takes well under a millisecond; the prefill sleeps 0.4 s."""
    target = ToyLM(16, seed=1, scale=1.5)
    draft = SlowPrefillLM(16, seed=2, base=target, noise=0.8, delay=0.4)
    engine = Engine(target, DRAFTERS[drafter_name](draft), draft_length=ScriptedLength([0], 2))
    engine.add_request([3, 1, 4], max_new_tokens=8, seed=1)
    run_to_end(engine)
    assert engine.stats.draft_passes > 0 and draft.num_calls > 0
    assert engine.stats.prefill_seconds >= 0.4
    # counted once: the target's prompt pass takes milliseconds
    assert engine.stats.prefill_seconds < engine.drafter.prefill_seconds + 0.3
    assert engine.stats.draft_seconds < 0.4
    assert max(engine.costs.draft_step.samples) < 0.4 / engine.stats.draft_passes


class CatchUpLM(ToyLM):
    """A toy model that records how many tokens each extend call fed per row, and sleeps
    `delay` seconds in a call that feeds more than two tokens to a row (a long catch-up)."""

    def __init__(self, *args, delay: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.fed: list[list[int]] = []

    def extend(self, tokens, num_valid):
        self.fed.append(num_valid.tolist())
        if int(num_valid.max()) > 2:
            time.sleep(self.delay)
        return super().extend(tokens, num_valid)


def test_a_drafter_catches_up_on_skipped_steps_in_a_pass_timed_as_prefill():
    """A row that drafted nothing for three steps lacks those steps' tokens in the draft
    model. It catches up on them (all but the last) in a pass of its own, timed as prefill,
    before its draft pass: the draft passes the cost model times stay one-token passes. The
    text equals that of a drafter that fed them with its draft pass (an eager cursor)."""
    runs = []
    for lazy in (True, False):
        target = ToyLM(16, seed=1, scale=1.5)
        draft = CatchUpLM(16, seed=2, base=target, noise=0.8, delay=0.3)
        drafter = ModelDrafter(draft)
        drafter.cursor.lazy = lazy
        engine = Engine(target, drafter, draft_length=ScriptedLength([1, 0, 0, 0, 1], 0))
        engine.add_request([3, 1, 4], max_new_tokens=12, seed=5, sampling=CONFIGS[1])
        outputs = run_to_end(engine)
        assert_stats_identities(engine.stats)
        runs.append((tokens_of(next(iter(outputs.values()))), draft.sequences))
        # step 1 drafts from the prompt pass's last distribution (no extend)
        if lazy:
            # step 5: a catch-up of 3 or 4 tokens, then the pending one
            assert len(draft.fed) == 2 and draft.fed[0][0] in (3, 4), draft.fed
            assert draft.fed[1] == [1], draft.fed
            assert engine.stats.prefill_seconds >= 0.3
            assert engine.stats.draft_seconds < 0.3
            assert max(engine.costs.draft_step.samples) < 0.3
        else:  # one pass: the skipped tokens and the pending one
            assert len(draft.fed) == 1 and draft.fed[0][0] in (4, 5), draft.fed
    assert runs[0] == runs[1]


class VerdictLength(ScriptedLength):
    """A scripted length with the adaptive policy's `stopped`: True on the steps that draft
    nothing (drafting cannot pay), False on the others."""

    stopped = False

    def next_lengths(self, rows):
        lengths = super().next_lengths(rows)
        self.stopped = not bool(lengths.any())
        return lengths


def test_a_drafter_is_released_while_drafting_cannot_pay(monkeypatch):
    """Once the policy says drafting cannot pay, the draft model drops its rows and requests
    that join are not prefilled into it; if drafting resumes (the adaptive policy does only
    with rechecks), it prefills every row's committed tokens (as prefill time) and drafts what
    a drafter that kept up drafts."""
    runs = []
    for release in (True, False):
        target, draft = pair16()
        drafter = ModelDrafter(draft)
        if not release:
            monkeypatch.setattr(drafter, "release", lambda: None)
        script = [1, 1] + [0] * 4 + [2] * 3
        engine = Engine(target, drafter, draft_length=VerdictLength(script, 0), max_batch=2)
        first = engine.add_request([3, 1, 4], max_new_tokens=30, seed=1, sampling=CONFIGS[1])
        early = [out for _ in range(4) for out in engine.step()]  # 2 drafting, 2 not
        calls = draft.num_calls
        second = engine.add_request([2, 7], max_new_tokens=20, seed=2)
        early += engine.step()  # the second request joins
        if release:
            assert draft.num_calls == calls and draft.sequences == []
        else:
            assert draft.num_calls == calls + 1  # its prompt prefilled into the draft model
        outputs = run_to_end(engine)
        assert_stats_identities(engine.stats)
        # step 1 drafts from the prompt pass's distribution, step 2 makes one pass; drafting
        # resumed: 3 steps of 2, the first of them after a fresh prefill (release) again
        # without its first pass
        assert engine.stats.draft_passes == 1 + (5 if release else 6)
        texts = [tokens_of([o for o in early if o.request_id == i] + outputs[i]) for i in (0, 1)]
        assert [first, second] == [0, 1] and len(texts[0]) == 30 and len(texts[1]) == 20
        runs.append((texts, engine.stats.accepted))
    assert runs[0] == runs[1]


def test_the_cost_of_a_target_pass_includes_verifying_it(monkeypatch):
    """A step's target cost, as the draft-length policy sees it, is the scoring pass and the
    verification of its tokens: on a small model or a fast accelerator the rules' time is a
    real part of a step. Verification slowed by 0.3 s shows in every timed pass."""
    original = Engine._verify

    def slow_verify(self, *args):
        time.sleep(0.3)
        return original(self, *args)

    monkeypatch.setattr(Engine, "_verify", slow_verify)
    target, draft = pair16()
    engine = Engine(target, ModelDrafter(draft), draft_length=ScriptedLength([0], 2))
    engine.add_request([3, 1, 4], max_new_tokens=5, seed=1)
    run_to_end(engine)
    timed = [x for recent in engine.costs.target_pass.values() for x in recent.samples]
    assert set(engine.costs.target_pass) == {1, 3} and min(timed) >= 0.3


def test_each_step_records_its_drafting_scoring_and_verifying_time(monkeypatch):
    """The policy's check of real drafting steps against target-only reads each step's time:
    its draft passes, target pass and verification (verification slowed by 0.2 s and draft
    passes by 0.1 s each show in it), within the step's wall time."""
    original_verify, original_append = Engine._verify, ModelCursor.append

    def slow_verify(self, *args):
        time.sleep(0.2)
        return original_verify(self, *args)

    def slow_append(self, *args):
        time.sleep(0.1)
        return original_append(self, *args)

    monkeypatch.setattr(Engine, "_verify", slow_verify)
    monkeypatch.setattr(ModelCursor, "append", slow_append)
    target, draft = pair16()
    engine = Engine(target, ModelDrafter(draft), draft_length=ScriptedLength([0, 0, 3], 0))
    engine.add_request([3, 1, 4], max_new_tokens=8, seed=1)
    engine.step()  # its token from the prompt pass's distribution: no pass, nothing recorded
    assert engine.costs.last_step_seconds is None and not engine.costs.target_pass
    for least in (0.2, 0.2 + 2 * 0.1):  # a target-only step, then 3 drafts (2 appends)
        started = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - started
        recorded = engine.costs_by_batch[1].last_step_seconds
        assert least <= recorded <= wall and engine.costs.last_step_seconds == recorded


def test_a_policy_reused_by_a_second_engine_brings_its_costs_and_verdict():
    """An adaptive policy passed to a second engine on the same models keeps its verdict, and
    its measured costs start the new engine's (a copy: the first engine's stay as they were);
    the first step follows the verdict at once (no second cost check). Without its costs a
    reused "yes" would be priced on no 1-token pass (drafting steps time none), and a request
    of the new engine must not inherit the schedule of the old one's request of the same id."""
    target, draft = pair16()
    policy = AdaptiveDraftLength(max_k=4)
    first = Engine(target, ModelDrafter(draft), draft_length=policy)
    first.add_request([3, 1, 4], max_new_tokens=20, seed=1)
    run_to_end(first)
    verdict = policy.verdicts.get(1)
    assert verdict is not None
    assert policy.rows == {}  # a finished request's schedule is dropped at its last step
    singles = first.costs_by_batch[1].target_pass[1].count
    second = Engine(target, ModelDrafter(draft), draft_length=policy)
    assert second.costs_by_batch[1] is not first.costs_by_batch[1]
    assert second.costs_by_batch[1].target_pass[1].count == singles
    second.add_request([2, 7], max_new_tokens=6, seed=2)
    second.step()
    assert (second.stats.draft_passes > 0) is verdict
    assert first.costs_by_batch[1].target_pass[1].count == singles


# ---------------------------------------------------------------- found by mutation testing


def test_has_unfinished_is_exact_around_aborts_and_the_last_step():
    """A running request aborted: the engine has an unreported final output (True) until the
    next step reports it, with an empty top-logprob list when the request asked for them;
    after the step that reports every final output, nothing is unfinished (False)."""
    target, draft = pair16()
    engine = Engine(target, ModelDrafter(draft), draft_length=ScriptedLength([0, 0], 2))
    aborted = engine.add_request([3, 1, 4], max_new_tokens=20, seed=1, top_logprobs=2)
    engine.step()
    assert engine.abort(aborted) and engine.has_unfinished()
    (final,) = engine.step()
    assert final.finished and final.finish_reason == "abort" and final.tokens == []
    assert final.top_logprobs == []
    assert not engine.has_unfinished()
    request = engine.add_request([2, 7], max_new_tokens=4, seed=2)
    started = time.perf_counter()
    last = []
    while not last:
        last = [o for o in engine.step() if o.request_id == request and o.finished]
    wall = time.perf_counter() - started
    assert not engine.has_unfinished()
    # the request's own statistics: its time within the wall time, the engine's 1-token pass
    assert 0 < last[0].stats.total_seconds <= wall
    # (as of its last step: that step's own pass may have been a 1-token pass too)
    singles = list(engine.costs.target_pass[1].samples)
    # (None when that pass is the only one: its first token needed none)
    medians = {
        statistics.median(singles[:n]) if n else None for n in (len(singles), len(singles) - 1)
    }
    assert last[0].stats.target_single_pass_seconds in medians


class TargetlessDrafter:
    """Drafts id 16, which a 16-id target does not have, with draft probability 1: every draft
    is rejected at its first position."""

    forward_passes = 0
    fixed_depth = None

    def set_rows(self, sequences, keep, prompts):
        pass

    def propose(self, sequences, max_lengths, sampling):
        batch, k = len(sequences), int(max_lengths.max())
        tokens = torch.full((batch, k), 16, dtype=torch.int64)
        probs = torch.zeros(batch, k, 17)
        probs[:, :, 16] = 1.0
        return Draft.chain(tokens, probs, max_lengths.clone())


@pytest.mark.parametrize("k", [1, 3])
def test_a_token_drawn_after_a_rejection_is_recovered_whatever_the_draft_length(k):
    """Every step rejects its first draft, so every token it emits is drawn from the residual:
    "recovered", also with one-token drafts (whose first node has no children). The last
    token, with one to go, is drawn by a step without a draft: "bonus"."""
    target, _ = pair16()
    engine = Engine(target, TargetlessDrafter(), draft_length=k)
    request = engine.add_request([1, 2], max_new_tokens=6, seed=3)
    outputs = run_to_end(engine)[request]
    kinds = [kind for o in outputs for kind in o.kinds]
    assert kinds == [RECOVERED] * 5 + [BONUS]
    assert engine.stats.accepted == 0 and engine.stats.empty_steps == engine.stats.row_steps - 1
    assert_stats_identities(engine.stats)


@pytest.mark.parametrize("drafter_name", ["none", "model", "ngram", "tree"])
def test_draft_passes_and_prefill_time_are_counted_once(drafter_name):
    """The engine's and each request's draft passes are the drafter's own count (one request);
    step times add up; prefill time is the target's prompt pass and the drafter's lazy
    prefill, nothing more (the toy models take milliseconds; a miscount of a second shows).
    Target passes are recorded under the widest row's tokens, not the batch's total (two rows
    drafting 2 each: 3)."""
    target, draft = pair16()
    drafter = DRAFTERS[drafter_name](draft)
    engine = Engine(target, drafter, draft_length=2)
    request = engine.add_request([3, 1, 4], max_new_tokens=10, seed=1)
    started = time.perf_counter()
    final = run_to_end(engine)[request][-1]
    wall = time.perf_counter() - started
    stats = engine.stats
    # seconds: the parts within the total, the total within the wall time (summed over steps)
    parts = stats.draft_seconds + stats.target_seconds + stats.verify_seconds
    assert parts <= stats.total_seconds <= wall
    # each draft pass is timed as its share of the step's drafting time (fewer than 16 samples;
    # steps that made no draft pass, an n-gram lookup, add time but no sample)
    assert engine.costs.draft_step.count <= 16
    assert sum(engine.costs.draft_step.samples) <= stats.draft_seconds + 1e-9
    # each step's scoring and verification is one target-pass sample (fewer than 16 per length),
    # but for the first step: without drafts it took its token from the prompt pass (no target
    # pass; its verification time is in stats.verify_seconds, not in a pass's cost); a chain's
    # first drafts were scored by the prompt pass (one target pass, its time prefill's)
    timed = [x for recent in engine.costs.target_pass.values() for x in recent.samples]
    assert all(recent.count <= 16 for recent in engine.costs.target_pass.values())
    steps = sum(stats.draft_lengths.values())  # one row
    first_has_pass = drafter_name in ("model", "tree")  # they draft at step 1; none/ngram not
    first_is_timed = drafter_name == "tree"  # a tree is fed after a prompt pass of its own
    assert stats.target_passes == steps - (0 if first_has_pass else 1)
    assert len(timed) == steps - (0 if first_is_timed else 1)
    if first_is_timed:
        assert sum(timed) == pytest.approx(stats.target_seconds + stats.verify_seconds)
    else:
        assert sum(timed) < stats.target_seconds + stats.verify_seconds
    single = engine.costs.target_pass.get(1)  # none with a tree drafter: its depth is fixed
    assert stats.target_single_pass_seconds == (None if single is None else single.value)
    assert single is not None or drafter_name == "tree"
    passes = getattr(drafter, "forward_passes", 0)
    assert final.finished and final.stats is not None
    assert engine.stats.draft_passes == passes and final.stats.draft_passes == passes
    own = getattr(drafter, "prefill_seconds", 0.0)
    assert own <= engine.stats.prefill_seconds < own + 0.5
    if drafter_name in ("model", "tree"):
        assert passes > 0
    target, draft = pair16()
    batch = Engine(target, ModelDrafter(draft), draft_length=2)
    for seed in (1, 2):
        batch.add_request([3, 1, 4], max_new_tokens=3, seed=seed)
    run_to_end(batch)
    assert set(batch.costs.target_pass) <= {1, 2, 3}


class PaddedVocabDrafter:
    """A ModelDrafter whose draft distributions have `extra` more ids than the target's
    vocabulary, of probability 0 (a draft model with a padded embedding matrix)."""

    fixed_depth = None

    def __init__(self, inner: ModelDrafter, extra: int):
        self.inner, self.extra = inner, extra

    @property
    def forward_passes(self) -> int:
        return self.inner.forward_passes

    def set_rows(self, sequences, keep, prompts):
        self.inner.set_rows(sequences, keep, prompts)

    def propose(self, sequences, max_lengths, sampling):
        draft = self.inner.propose(sequences, max_lengths, sampling)
        probs = torch.nn.functional.pad(draft.probs, (0, self.extra))
        return Draft(draft.tokens, draft.parents, probs, draft.valid)


def test_a_drafter_with_more_ids_than_the_target_gives_the_same_tokens():
    """The target's probabilities are padded with zeros to the drafter's vocabulary: the ids
    only the drafter has are never drawn, and each request's tokens are those of the same
    drafter without the padding."""

    def run(extra: int) -> list[list[int]]:
        target, draft = pair16()
        drafter = ModelDrafter(draft)
        engine = Engine(
            target, PaddedVocabDrafter(drafter, extra) if extra else drafter, draft_length=3
        )
        return seeded_tokens(engine, requests=4, configs=4, max_new_tokens=12)

    unpadded = run(0)
    for extra in (1, 5):
        padded = run(extra)
        assert padded == unpadded
        assert all(0 <= t < 16 for tokens in padded for t in tokens)


class FewerIdsDrafter:
    """Drafts each token from a toy model's softmax restricted to its first `ids` ids
    (renormalised), drawn with the row's generator, and reports that distribution over `report`
    columns (`ids`, or more: zeros after them), as a draft model with a smaller vocabulary."""

    forward_passes = 0
    fixed_depth = None

    def __init__(self, model: ToyLM, ids: int, report: int):
        self.model, self.ids, self.report = model, ids, report

    def set_rows(self, sequences, keep, prompts):
        pass

    def propose(self, sequences, max_lengths, sampling):
        batch, k = len(sequences), int(max_lengths.max())
        tokens = torch.zeros(batch, k, dtype=torch.int64)
        probs = torch.zeros(batch, k, self.report)
        for b, sequence in enumerate(sequences):
            prefix = list(sequence)
            for i in range(int(max_lengths[b])):
                q = torch.softmax(self.model.logits_for(prefix), -1)[: self.ids]
                q = q / q.sum()
                token = int(torch.multinomial(q, 1, generator=sampling.generators[b]))
                tokens[b, i], probs[b, i, : self.ids] = token, q
                prefix.append(token)
        return Draft.chain(tokens, probs, max_lengths.clone())


def test_a_drafter_with_fewer_ids_than_the_target_is_padded_with_zeros():
    """Reports over 15 columns are padded to the target's 16: the tokens are those of the same
    drafts reported over 16 columns, and the id only the target has is still emitted."""

    def run(report: int) -> list[list[int]]:
        target, draft = pair16()
        engine = Engine(target, FewerIdsDrafter(draft, 15, report), draft_length=3)
        return seeded_tokens(engine, requests=6, configs=3, max_new_tokens=16)

    padded = run(15)
    assert padded == run(16)
    assert 15 in {t for tokens in padded for t in tokens}


class ExtraIdsDrafter:
    """Drafts from a toy model's softmax over its 16 ids and `extra` more whose logit is the
    mean of the others: a draft model with a bigger vocabulary that gives ids the target does
    not have real probability, and draws them."""

    forward_passes = 0
    fixed_depth = None

    def __init__(self, model: ToyLM, extra: int):
        self.model, self.extra = model, extra

    def set_rows(self, sequences, keep, prompts):
        pass

    def propose(self, sequences, max_lengths, sampling):
        batch, k = len(sequences), int(max_lengths.max())
        vocab = 16 + self.extra
        tokens = torch.zeros(batch, k, dtype=torch.int64)
        probs = torch.zeros(batch, k, vocab)
        lengths = max_lengths.clone()
        for b, sequence in enumerate(sequences):
            prefix = list(sequence)
            for i in range(int(max_lengths[b])):
                logits = self.model.logits_for(prefix)
                logits = torch.cat([logits, logits.mean().repeat(self.extra)])
                q = torch.softmax(logits, -1)
                token = int(torch.multinomial(q, 1, generator=sampling.generators[b]))
                tokens[b, i], probs[b, i] = token, q
                if token >= 16:  # its own model cannot go on after an id the toy lacks
                    lengths[b] = i + 1
                    break
                prefix.append(token)
        return Draft.chain(tokens, probs, lengths)


def test_drafts_of_ids_the_target_does_not_have_are_rejected():
    """Draft ids 16 and 17 (probability about 1/9 each step) have target probability 0: they
    are never kept and never emitted; the rows go on with the target's tokens."""
    target, draft = pair16()
    engine = Engine(target, ExtraIdsDrafter(draft, 2), draft_length=3)
    emitted = seeded_tokens(engine, requests=6, configs=3, max_new_tokens=24)
    assert all(len(tokens) == 24 for tokens in emitted)
    assert all(0 <= t < 16 for tokens in emitted for t in tokens)


class ZeroProbabilityDrafter(ExtraIdsDrafter):
    """Reports probability 0 for every token after the first of its draft (a broken drafter)."""

    def propose(self, sequences, max_lengths, sampling):
        draft = super().propose(sequences, max_lengths, sampling)
        draft.probs[:, 1:] = 0.0
        return Draft.chain(draft.tokens, draft.probs, max_lengths.clone())


def test_a_drafter_that_reports_probability_zero_for_its_own_draft_is_an_error():
    """q(x) = 0 for a drafted x cannot be: the rules would divide 0 by 0 (block verification
    then kept an id the target does not have and emitted -19). The step says which draft and
    stops instead."""
    target, draft = pair16()
    engine = Engine(target, ZeroProbabilityDrafter(draft, 0), draft_length=3)
    engine.add_request([1, 2], max_new_tokens=24, seed=0)
    with pytest.raises(ValueError, match=r"^draft_probs: the drafted token draft_tokens\[0, 1\]"):
        run_to_end(engine)


def test_a_step_where_no_row_may_draft_does_not_ask_the_drafter():
    """With one token to go a row drafts nothing (a draft stops one short of the limit): the tree
    drafter, whose depth is fixed, is not called, and the token is the one target-only decoding
    draws with that seed."""
    target, draft = pair16()
    engine = Engine(target, TreeDrafter(draft, TreeShape((2, 2))))
    alone = Engine(target)
    for seed in range(8):
        ids = [
            e.add_request([3, 1], sampling=CONFIGS[seed % 4], max_new_tokens=1, seed=seed)
            for e in (engine, alone)
        ]
        assert tokens_of(run_to_end(engine)[ids[0]]) == tokens_of(run_to_end(alone)[ids[1]])
    assert draft.num_calls == 0
    assert engine.stats.tree_steps == 0 and engine.stats.draft_passes == 0


def test_top_logprobs_list_equally_likely_ids_lowest_first():
    """ids 0, 3 and 6 share the largest logit; torch.topk returns them in no particular order."""
    logits = torch.zeros(1, 1, 8)
    logits[0, 0, ::3] = 1.0
    no_path = torch.zeros(1, 0, dtype=torch.int64)
    result = TreeResult(torch.tensor([[3]]), torch.tensor([0]), no_path, "token")
    chosen, tops = _emitted_logprobs(logits, result, [3])
    top = torch.log_softmax(logits[0, 0], -1)
    assert chosen == [[float(top[3])]]
    assert tops == [[[(0, float(top[0])), (3, float(top[3])), (6, float(top[6]))]]]


def test_a_request_aborted_while_waiting_is_reported_by_the_next_step():
    target, _ = pair16()
    engine = Engine(target)
    request_id = engine.add_request([1, 2], max_new_tokens=5, seed=0)
    assert engine.abort(request_id)
    assert engine.num_waiting() == 0 and engine.num_running() == 0
    assert engine.has_unfinished()  # its final output is still to come
    outputs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason, o.tokens) for o in outputs] == [
        (request_id, True, "abort", [])
    ]
    assert not engine.has_unfinished()
    assert engine.step() == []
