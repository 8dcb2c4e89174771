"""The cost memory: the adaptive draft length's costs and verdicts kept across processes."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from specsample.adapters.toy import ToyLM
from specsample.drafters.model import ModelDrafter
from specsample.engine import Engine
from specsample.engine.length import (
    FIRST_SINGLE_PASSES,
    TRUST_SAMPLES,
    AdaptiveDraftLength,
    StepCosts,
)
from specsample.engine.memory import (
    MATCH_FACTOR,
    MAX_AGE_DAYS,
    CostMemory,
    file_identity,
    memory_directory,
)

# llama.cpp on 2 cores (tests/engine/test_length.py): no draft length pays
NO_DRAFT, NO_PASSES = 0.0215, {1: 0.048, 5: 0.187}
# transformers on 2 cores: a 5-token pass 1.7x a 1-token one, a cheap int8 draft: drafting pays
YES_DRAFT, YES_PASSES = 0.05, {1: 0.40, 5: 0.68}
KEY = {"backend": "test", "target": "t.gguf", "draft": "d.gguf", "max_k": 16}


def lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def cost_check(policy: AdaptiveDraftLength, draft: float, passes: dict[int, float]) -> list[int]:
    """One row through the policy's steps until it has a verdict (at most FIRST_SINGLE_PASSES
    target-only steps and three probes), every draft kept, passes timed at the given costs.
    Returns the lengths asked."""
    measured = policy.bucket_costs.get(1) or StepCosts()
    asked = []
    for _ in range(FIRST_SINGLE_PASSES + 3):
        k = int(policy.next_lengths(1))
        asked.append(k)
        for _ in range(k):
            measured.draft_step.add(draft)
        measured.add_target_pass(k + 1, passes[k + 1])
        policy.update(lengths(k), lengths(k), measured)
        if policy.verdicts.get(1) is not None and k:
            break
    return asked


def remembered(tmp_path, draft, passes) -> CostMemory:
    """A memory written by a first process that ran the cost check."""
    first = AdaptiveDraftLength(16)
    memory = CostMemory(KEY, tmp_path)
    first.recall(memory)
    assert not memory.recalled and not memory.path.exists()
    cost_check(first, draft, passes)
    assert memory.path.exists()  # written when the verdict was reached
    return CostMemory(KEY, tmp_path)


def test_a_remembered_no_skips_the_probes_after_one_matching_target_only_step(tmp_path):
    """Without a memory a "no" takes FIRST_SINGLE_PASSES target-only steps and two probes of
    4 drafts; with one, the next process checks one 1-token pass against the remembered ones
    and drafts nothing at all (no probe, no draft prefill)."""
    fresh = AdaptiveDraftLength(16)
    assert cost_check(fresh, NO_DRAFT, NO_PASSES) == [0] * FIRST_SINGLE_PASSES + [4, 4]
    memory = remembered(tmp_path, NO_DRAFT, NO_PASSES)
    policy = AdaptiveDraftLength(16)
    assert policy.recall(memory) and memory.recalled
    assert policy.verdicts == {1: False} and policy.stopped
    measured = policy.bucket_costs[1]
    assert measured.target(5) == pytest.approx(NO_PASSES[5])
    for _ in range(50):
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, NO_PASSES[1] * 1.1)  # within MATCH_FACTOR
        policy.update(lengths(0), lengths(0), measured)
    assert policy.verdicts == {1: False} and not memory.dropped


def test_a_remembered_yes_drafts_from_the_first_step(tmp_path):
    """Without a memory a "yes" takes FIRST_SINGLE_PASSES target-only steps and a probe; with
    one, the first step drafts the longest draft the remembered costs justify, and its pass
    (here 3 tokens, between the remembered 1 and 5: priced on the line between them) is
    checked against them."""
    fresh = AdaptiveDraftLength(16)
    assert cost_check(fresh, YES_DRAFT, YES_PASSES) == [0] * FIRST_SINGLE_PASSES + [4]
    memory = remembered(tmp_path, YES_DRAFT, YES_PASSES)
    policy = AdaptiveDraftLength(16, lengths="costs")
    policy.recall(memory)
    measured = policy.bucket_costs[1]
    assert int(policy.next_lengths(1)) >= 4
    for _ in range(2):
        measured.draft_step.add(YES_DRAFT)
    between = (YES_PASSES[1] + YES_PASSES[5]) / 2
    measured.add_target_pass(3, between * 1.2)  # the drafter stopped after 2 drafts
    policy.update(lengths(2), lengths(1), measured)
    assert policy.can_pay is True and not memory.dropped
    assert int(policy.next_lengths(1)) >= 4


def test_the_memory_keeps_the_pass_lengths_timed_after_the_verdict(tmp_path):
    """The memory is written at the verdict (passes over 1 and 5 tokens), again when a pass
    length is timed for the first time and when it comes to be trusted (TRUST_SAMPLES
    timings), and not for timings that teach the curve nothing new. A later process then
    offers long drafts from its first step (with only the verdict's lengths remembered it
    offers fewer and times the longer ones anew)."""
    memory = remembered(tmp_path, YES_DRAFT, YES_PASSES)
    short_offer = int(_recalling(memory).next_lengths(1))
    policy = _recalling(memory)
    measured = policy.bucket_costs[1]

    def saved() -> dict[str, list]:
        return json.loads(memory.path.read_text())["buckets"]["1"]["target_pass"]

    assert set(saved()) == {"1", "5"}
    policy.next_lengths(1)
    for _ in range(4):  # a first step that matches the memory (the drafter stopped at 4)
        measured.draft_step.add(YES_DRAFT)
    measured.add_target_pass(5, YES_PASSES[5])
    policy.update(lengths(4), lengths(4), measured)
    assert policy.can_pay is True and not memory.dropped
    assert set(saved()) == {"1", "5"}  # nothing new
    counts = []
    for _ in range(TRUST_SAMPLES + 1):
        policy.next_lengths(1)
        for _ in range(16):
            measured.draft_step.add(YES_DRAFT)
        measured.add_target_pass(17, 0.80)
        policy.update(lengths(16), lengths(16), measured)
        counts.append(len(saved().get("17", [])))
    assert policy.can_pay is True and not memory.dropped
    # written at the first timing and at the TRUST_SAMPLES-th, not in between or after
    assert counts == [1] * (TRUST_SAMPLES - 1) + [TRUST_SAMPLES] * 2
    later = CostMemory(KEY, tmp_path)
    assert int(_recalling(later).next_lengths(1)) > short_offer


def _recalling(memory: CostMemory) -> AdaptiveDraftLength:
    policy = AdaptiveDraftLength(20, lengths="costs")
    assert policy.recall(memory)
    return policy


def test_the_match_factor_is_thirty_percent_either_way():
    assert MATCH_FACTOR == 1.3


@pytest.mark.parametrize("factor", [1.4, 1 / 1.4])
def test_a_machine_at_another_speed_drops_the_memory_and_checks_again(tmp_path, factor):
    """First 1-token passes faster than MATCH_FACTOR allows (the memory was timed while the
    machine was busy, or another setting the key does not see): after the second of them the
    remembered "no" of that batch size is dropped, its costs start from that pass, and the cost
    check runs as without a memory (target-only steps until FIRST_SINGLE_PASSES 1-token
    passes are timed, that one included, then probes); the verdict it reaches is written back.
    A remembered "yes" whose first drafting passes cost another amount, more or less, is
    dropped the same way. (A "no" with slower passes stands: below.)"""
    memory = remembered(tmp_path, NO_DRAFT, NO_PASSES)
    policy = AdaptiveDraftLength(16)
    policy.recall(memory)
    measured = policy.bucket_costs[1]
    faster = 1 / 1.4
    for _ in range(2):
        assert policy.verdicts == {1: False} and not memory.dropped
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, NO_PASSES[1] * faster)
        policy.update(lengths(0), lengths(0), measured)
    assert memory.dropped == [1] and 1 not in policy.verdicts and not memory.slower
    assert list(measured.target_pass) == [1] and measured.target_pass[1].count == 1
    assert measured.draft_step.count == 0
    # now drafting pays: a cheap draft and a flat curve at this machine's speed
    fresh = NO_PASSES[1] * faster
    scaled = {n: fresh * seconds / YES_PASSES[1] for n, seconds in YES_PASSES.items()}
    asked = cost_check(policy, YES_DRAFT * fresh / YES_PASSES[1], scaled)
    assert asked == [0] * (FIRST_SINGLE_PASSES - 1) + [4]
    saved = json.loads(memory.path.read_text())
    assert saved["buckets"]["1"]["verdict"] is True
    policy = AdaptiveDraftLength(16)
    policy.recall(CostMemory(KEY, tmp_path))
    measured = policy.bucket_costs[1]
    remembered_costs = measured.copy()
    for _ in range(2):
        assert policy.verdicts == {1: True} and not policy.memory.dropped
        k = int(policy.next_lengths(1))
        assert k >= 1
        expected = remembered_costs.relative_pass_cost(k + 1, interpolate=True)
        expected *= remembered_costs.target(1)
        measured.add_target_pass(k + 1, expected * factor)
        policy.update(lengths(k), lengths(k), measured)
    assert policy.memory.dropped == [1] and 1 not in policy.verdicts
    assert list(measured.target_pass) == [k + 1]


@pytest.mark.parametrize(
    ("first", "second"), [(1.4, 1.4), (1.4, 1 / 1.4), (1 / 1.4, 1.4), (1 / 1.4, 1 / 1.4)]
)
def test_a_remembered_no_is_dropped_only_by_passes_faster_than_remembered(tmp_path, first, second):
    """Two first 1-token passes outside MATCH_FACTOR drop a remembered "no" only when both ran
    faster than remembered. Otherwise the machine is busier than when the memory was written:
    the "no" stands with its remembered costs (a "no" rests on cost ratios, and checking
    again would load and prefill the draft and probe), the policy stays target-only, the
    memory says so (`slower`) and its file keeps the "no"."""
    memory = remembered(tmp_path, NO_DRAFT, NO_PASSES)
    policy = AdaptiveDraftLength(16)
    policy.recall(memory)
    measured = policy.bucket_costs[1]
    for factor in (first, second):
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, NO_PASSES[1] * factor)
        policy.update(lengths(0), lengths(0), measured)
    if first < 1 and second < 1:
        assert memory.dropped == [1] and not memory.slower and 1 not in policy.verdicts
        return
    assert memory.slower == [1] and not memory.dropped and policy.verdicts == {1: False}
    assert sorted(measured.target_pass) == sorted(NO_PASSES)  # the remembered costs stay
    drafts = measured.draft_step.count
    for _ in range(40):  # no probe, no further check
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, NO_PASSES[1] * 1.4)
        policy.update(lengths(0), lengths(0), measured)
    assert memory.slower == [1] and not memory.dropped and policy.verdicts == {1: False}
    assert measured.draft_step.count == drafts > 0
    assert json.loads(memory.path.read_text())["buckets"]["1"]["verdict"] is False


def test_one_pass_at_another_speed_does_not_drop_the_memory(tmp_path):
    """The machine busy for a moment: a first pass outside MATCH_FACTOR and a second one
    within it. The memory stands (a pass after the check is not checked again), and a step
    that ran no target pass in between does not count as a second mismatch."""
    memory = remembered(tmp_path, NO_DRAFT, NO_PASSES)
    policy = AdaptiveDraftLength(16)
    policy.recall(memory)
    measured = policy.bucket_costs[1]
    assert int(policy.next_lengths(1)) == 0
    measured.add_target_pass(1, NO_PASSES[1] * 2)
    policy.update(lengths(0), lengths(0), measured)
    assert int(policy.next_lengths(1)) == 0
    policy.update(lengths(0), lengths(0), measured)  # no new pass
    assert policy.verdicts == {1: False} and not memory.dropped
    for seconds in (NO_PASSES[1] * 1.1, NO_PASSES[1] * 2, NO_PASSES[1] * 2):
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, seconds)
        policy.update(lengths(0), lengths(0), measured)
        assert policy.verdicts == {1: False} and not memory.dropped


def test_the_check_waits_for_the_first_target_pass(tmp_path):
    """A request's first step may run no target pass (its token comes from the prompt pass):
    the memory is checked against the first pass that ran, not against a remembered sample
    the step's costs start from."""
    memory = remembered(tmp_path, NO_DRAFT, NO_PASSES)
    policy = AdaptiveDraftLength(16)
    policy.recall(memory)
    measured = policy.bucket_costs[1].copy()  # as an engine holds them: no pass of its own
    assert int(policy.next_lengths(1)) == 0
    policy.update(lengths(0), lengths(0), measured)  # a step without a target pass
    assert policy.verdicts == {1: False} and not memory.dropped
    for _ in range(2):
        assert int(policy.next_lengths(1)) == 0
        measured.add_target_pass(1, NO_PASSES[1] / 1.4)  # outside MATCH_FACTOR
        policy.update(lengths(0), lengths(0), measured)
    assert memory.dropped == [1] and 1 not in policy.verdicts


def test_an_engine_checks_a_remembered_no_at_its_first_target_pass(tmp_path):
    """Through the Engine on toy models (passes of about a millisecond) and a memory that
    remembers 1-token passes of 4.8 s: the first step draws its token from the prompt pass
    (no pass to check), the second's and third's passes are far outside MATCH_FACTOR, and the
    memory is dropped."""
    slow = {n: seconds * 100 for n, seconds in NO_PASSES.items()}
    memory = remembered(tmp_path, NO_DRAFT * 100, slow)
    policy = AdaptiveDraftLength(16)
    policy.recall(memory)
    target = ToyLM(16, seed=1, scale=1.5)
    engine = Engine(target, ModelDrafter(ToyLM(16, seed=2)), draft_length=policy)
    engine.add_request([3, 1, 4], max_new_tokens=6, seed=1)
    engine.step()
    assert engine.stats.target_passes == 0 and not memory.dropped
    engine.step()
    assert engine.stats.target_passes == 1 and not memory.dropped
    engine.step()
    assert engine.stats.target_passes == 2 and memory.dropped == [1]


def test_a_memory_is_per_batch_size_and_a_no_carries_to_bigger_batches(tmp_path):
    memory = remembered(tmp_path, NO_DRAFT, NO_PASSES)
    policy = AdaptiveDraftLength(16)
    policy.recall(memory)
    assert policy.next_lengths([7, 8]).tolist() == [0, 0]  # batch 2: the "no" of batch 1
    assert policy.can_pay is False


def test_the_memory_is_keyed_by_setting_and_machine(tmp_path, monkeypatch):
    memory = remembered(tmp_path, NO_DRAFT, NO_PASSES)
    assert memory.load()
    other = CostMemory({**KEY, "max_k": 8}, tmp_path)
    assert other.path != memory.path and other.load() == {}
    assert set(memory.key["machine"]) >= {"processor", "cores", "torch", "llama-cpp-python"}
    # a file whose key differs (another machine wrote it under this name) is not used
    data = json.loads(memory.path.read_text())
    data["key"]["machine"]["cores"] = 999
    memory.path.write_text(json.dumps(data))
    assert CostMemory(KEY, tmp_path).load() == {}


def test_old_damaged_and_unwritable_memories_are_ignored(tmp_path):
    memory = remembered(tmp_path, NO_DRAFT, NO_PASSES)
    data = json.loads(memory.path.read_text())
    data["saved"] = time.time() - (MAX_AGE_DAYS + 1) * 86400
    memory.path.write_text(json.dumps(data))
    assert memory.load() == {}
    memory.path.write_text("{not json")
    assert memory.load() == {}
    policy = AdaptiveDraftLength(16)
    assert not policy.recall(memory)
    assert policy.verdicts == {} and int(policy.next_lengths(1)) == 0
    # a damaged entry is skipped, the others are used
    data["saved"] = time.time()
    data["buckets"]["2"] = {"verdict": True, "target_pass": {"1": ["slow"]}}
    data["buckets"]["4"] = {"verdict": "maybe", "target_pass": {"1": [0.1]}}
    memory.path.write_text(json.dumps(data))
    policy = AdaptiveDraftLength(16)
    assert policy.recall(memory)
    assert policy.verdicts == {1: False}
    # a folder that cannot be written: no error, no memory
    blocked = tmp_path / "file"
    blocked.write_text("")
    CostMemory(KEY, blocked / "costs").save(policy.memory_state())


def test_recall_rejects_anything_but_a_cost_memory():
    with pytest.raises(TypeError, match=r"^memory: expected a CostMemory, got dict"):
        AdaptiveDraftLength(16).recall({})


def test_the_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSAMPLE_COST_MEMORY", "off")
    assert memory_directory() is None and CostMemory.from_environment(KEY) is None
    with pytest.raises(ValueError, match=r"^directory: expected a folder for the cost memory"):
        CostMemory(KEY)
    monkeypatch.delenv("SPECSAMPLE_COST_MEMORY")
    monkeypatch.setenv("SPECSAMPLE_CACHE", str(tmp_path / "cache"))
    assert memory_directory() == tmp_path / "cache" / "costs"
    monkeypatch.setenv("SPECSAMPLE_COST_MEMORY", str(tmp_path / "mine"))
    assert CostMemory.from_environment(KEY).path.parent == tmp_path / "mine"


def test_a_model_file_is_named_by_path_size_and_modification_time(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"1234")
    first = file_identity(model)
    assert first.startswith(str(model.resolve())) and ":4:" in first
    os.utime(model, ns=(1, 1))
    assert file_identity(model) != first
    assert file_identity("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert file_identity(None) is None


def test_a_no_from_real_drafting_steps_is_not_remembered(tmp_path):
    """The check of real drafting steps (GUARD_STEPS steps slower than target-only for the
    tokens they could have emitted) stops drafting in this process, but the memory keeps the
    cost check's "yes": those steps' drafts were cut short by the drafter's stops on this
    text, and a later process with another prompt starts drafting again. Fails when the
    memory keeps the in-process verdict."""
    from specsample.engine.length import GUARD_STEPS

    memory = remembered(tmp_path, YES_DRAFT, YES_PASSES)
    policy = _recalling(memory)
    measured = policy.bucket_costs[1]
    verdicts = []
    for _ in range(GUARD_STEPS):
        policy.next_lengths(1)
        measured.draft_step.add(YES_DRAFT)
        # one draft per step (the drafter's stops), its pass priced as the memory says, but
        # the whole step slower than the 2 tokens it could emit cost target-only
        measured.add_target_pass(2, (3 * YES_PASSES[1] + YES_PASSES[5]) / 4)
        measured.last_step_seconds = 2.25 * YES_PASSES[1]
        policy.update(lengths(1), lengths(1), measured)
        verdicts.append(policy.can_pay)
    assert verdicts[-1] is False and policy.stopped  # this process stopped drafting
    saved = json.loads(memory.path.read_text())["buckets"]["1"]
    assert saved["verdict"] is True
    later = _recalling(CostMemory(KEY, tmp_path))
    assert later.verdicts[1] is True and int(later.next_lengths(1)) >= 1


# llama.cpp on 2 cores with an n-gram drafter (no draft pass): a 2-token pass costs 1.7
STEEP = {1: 0.03, 2: 0.051, 3: 0.072, 4: 0.09, 5: 0.108}


def steep_costs() -> StepCosts:
    measured = StepCosts()
    for _ in range(TRUST_SAMPLES):
        measured.draft_step.add(0.0)
        for n, seconds in STEEP.items():
            measured.add_target_pass(n, seconds)
    return measured


def test_ended_requests_leave_their_keep_counts_as_the_next_processs_prior(tmp_path):
    """A request's end writes the pooled keep counts; the next process's rows start from
    them (scaled to at most 3 tests), not from the fixed 2 of 3: a fresh row's one-token
    draft, verified under the fixed prior (its bound 0.92 pays for a 1.7x pass), is cut
    under a remembered low keep rate. The memory is a prior: the row's own tests decide."""
    measured = steep_costs()
    first = AdaptiveDraftLength(16)
    first.recall(CostMemory(KEY, tmp_path))
    first.next_lengths([0])
    first.update([0], lengths(0), lengths(0), measured)
    assert first.can_pay
    verified = 0
    for _ in range(6):
        if int(first.next_lengths([0])):
            width = first.trim([0], [1])
            verified += width
            first.update([0], lengths(width), lengths(0), measured)  # every draft rejected
    assert verified >= 1
    assert CostMemory(KEY, tmp_path).load_keep() is None  # written at the verdict: no tests
    first.forget(0)  # the request ended: its tests are written
    keep = CostMemory(KEY, tmp_path).load_keep()
    assert keep is not None and keep["kept"][0] == 0 and keep["tests"][0] > 0

    second = AdaptiveDraftLength(16)
    assert second.recall(CostMemory(KEY, tmp_path))
    second.next_lengths([7])
    second.update([7], lengths(0), lengths(0), measured)
    second.next_lengths([7])
    assert second.trim([7], [1]) == 0
    fresh = AdaptiveDraftLength(16)  # no memory: the fixed prior verifies it
    fresh.next_lengths([7])
    fresh.update([7], lengths(0), lengths(0), measured)
    fresh.next_lengths([7])
    assert fresh.trim([7], [1]) == 1
    # scaled to a prior of at most PRIOR_TESTS tests at position 0
    assert sum(second.pooled.position_tests[:1]) <= 3.0 + 1e-9


@pytest.mark.parametrize(
    "keep",
    [
        {"tests": [2.0], "kept": [3.0]},
        {"tests": [2.0, 1.0], "kept": [1.0]},
        {"tests": [0.0], "kept": [0.0]},
        {"tests": [2.0], "kept": [-1.0]},
        {"tests": ["2"], "kept": [1.0]},
        {"tests": [True], "kept": [0.0]},
        {"tests": [float("nan")], "kept": [0.0]},
        {"tests": [], "kept": []},
        [1.0, 0.5],
    ],
)
def test_damaged_keep_counts_are_ignored_and_the_costs_still_used(tmp_path, keep):
    memory = remembered(tmp_path, NO_DRAFT, NO_PASSES)
    data = json.loads(memory.path.read_text())
    data["keep"] = keep
    memory.path.write_text(json.dumps(data))
    assert memory.load_keep() is None
    policy = AdaptiveDraftLength(16)
    assert policy.recall(memory) and policy.verdicts == {1: False}
    assert policy.pooled.position_tests == []


def test_recall_reads_the_file_once_so_costs_and_keep_counts_come_from_one_write(
    tmp_path, monkeypatch
):
    """recall takes the costs and the keep counts from one read: another process may write
    the file between two reads, and then the verdict would be one write's and the keep counts
    another's. A write between the reads (made here by the first read) changes nothing."""
    memory = remembered(tmp_path, NO_DRAFT, NO_PASSES)
    data = json.loads(memory.path.read_text())
    data["keep"] = {"tests": [4.0], "kept": [1.0]}
    memory.path.write_text(json.dumps(data))
    reads = []
    read = CostMemory._read

    def read_then_overwrite(self):
        content = read(self)
        reads.append(content)
        other = dict(content, keep={"tests": [4.0], "kept": [4.0]}, buckets={})
        self.path.write_text(json.dumps(other))  # another process's write after this read
        return content

    monkeypatch.setattr(CostMemory, "_read", read_then_overwrite)
    policy = AdaptiveDraftLength(16)
    assert policy.recall(memory)
    assert len(reads) == 1
    assert policy.verdicts == {1: False}
    assert policy.pooled.position_rates(1)[0] < 0.5  # 1 of 4 kept, not 4 of 4
