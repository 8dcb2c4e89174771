"""The speculative decoding loop. Target-only decoding is the same loop with no drafter (k = 0:
every step emits one bonus token from the target), so both share warpers, generator and code."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specsample.adapters.protocol import LanguageModel
from specsample.adapters.cursor import ModelCursor
from specsample.engine.stats import DecodeStats
from specsample.drafters.base import Draft, Drafter
from specsample.engine.length import AdaptiveDraftLength, FixedDraftLength, StepCosts
from specsample.drafters.tree import TreeDraft, TreeDrafter
from specsample.lossy import typical_rule
from specsample.rules import RULES, draw_uniforms, greedy_rule, verify
from specsample.rules.result import VerifyResult
from specsample.rules.tree import TreeResult, greedy_tree_rule, verify_tree
from specsample.warpers import SamplingConfig, logits_to_probs

# A tree is verified node by node (recursive rejection sampling, the token rule's generalisation).
TREE_RULES = ("token",)
# LOSSY: the output is NOT distributed as the target; selectable only by name, for comparison.
LOSSY_RULES = {"typical": typical_rule}
ACCEPTED, RECOVERED, BONUS = "accepted", "recovered", "bonus"
# on_tokens(row, tokens, kinds): called as each row's tokens are committed, for streaming.
TokenCallback = Callable[[int, list[int], list[str]], None]
# stop_when(row, new_tokens): True ends the row (stop strings); checked after each commit.
StopCondition = Callable[[int, list[int]], bool]


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each row (EOS included when it ended the row)
    finished_by_eos: list[bool]
    stats: DecodeStats


def generate(
    target: LanguageModel,
    prompts: Sequence[Sequence[int]],
    *,
    generator: torch.Generator,
    drafter: Drafter | None = None,
    sampling: SamplingConfig | None = None,
    max_new_tokens: int = 128,
    draft_length: int | FixedDraftLength | AdaptiveDraftLength = 4,
    eos_token_ids: Sequence[int] = (),
    on_tokens: TokenCallback | None = None,
    stop_when: StopCondition | None = None,
    rule: str = "token",
) -> Generation:
    """Samples up to max_new_tokens tokens after each prompt, exactly as the target would
    (speculatively when a drafter is given).

    drafter: a chain drafter (ModelDrafter, NgramDrafter) or a TreeDrafter (multi-draft and
    trees: the whole tree is scored in one target pass and verified node by node).
    rule: "token" or "block" (exact, see specsample.verify); "typical" is LOSSY (Medusa's typical
    acceptance; its output is not distributed as the target), for comparison only.

    1. draft up to k tokens per row (never past max_new_tokens),
    2. score the pending token and the drafts with the target in one pass,
    3. verify: keep a prefix of the drafts, add one recovered or bonus token,
    4. commit (cut at EOS or the limit) and let the next step roll the caches back.
    """
    sampling = sampling or SamplingConfig()
    _check_generate_args(prompts, max_new_tokens, generator)
    if rule not in RULES and rule not in LOSSY_RULES:
        raise ValueError(
            f"rule: expected one of {sorted(RULES)} (exact) or {sorted(LOSSY_RULES)} (lossy), "
            f"got {rule!r}"
        )
    if isinstance(drafter, TreeDrafter) and rule not in TREE_RULES:
        raise ValueError(
            f"rule: a tree drafter is verified node by node (rule='token'); {rule!r} applies to "
            "one draft chain only"
        )
    policy = _draft_length_policy(draft_length, drafter)
    sequences = [list(p) for p in prompts]
    batch = len(sequences)
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    by_eos = [False] * batch
    eos = set(eos_token_ids)
    stats, costs = DecodeStats(), StepCosts()
    started = time.perf_counter()
    target_cursor = ModelCursor(target)
    target_cursor.start(sequences)
    if drafter is not None:
        drafter.start(sequences)
    stats.prefill_seconds = time.perf_counter() - started
    while not all(done):
        active = [not d for d in done]
        remaining = torch.tensor([max_new_tokens - len(t) for t in new_tokens])
        limits = torch.minimum(policy.next_lengths(batch), remaining - 1).clamp(min=0)
        limits = torch.where(torch.tensor(active), limits, 0)
        # 1. draft (a chain or a tree)
        clock = time.perf_counter()
        draft = _propose(drafter, sequences, limits, sampling, generator)
        draft_seconds = time.perf_counter() - clock
        # 2. score the pending tokens and every draft in one target pass
        clock = time.perf_counter()
        if isinstance(draft, TreeDraft):
            logits = target_cursor.feed_tree(
                sequences, active, draft.tokens, draft.parents, draft.valid
            )
        else:
            logits = target_cursor.feed(sequences, active, draft.tokens, draft.lengths)
        target_seconds = time.perf_counter() - clock
        # 3. verify
        clock = time.perf_counter()
        result = _verify(draft, logits, sampling, generator, rule)
        stats.verify_seconds += time.perf_counter() - clock
        # 4. commit
        kinds = _step_kinds(result, draft)
        for b in range(batch):
            if not active[b]:
                continue
            emitted = _commit(b, result, new_tokens, sequences, max_new_tokens, eos)
            if emitted and emitted[-1] in eos:
                done[b] = by_eos[b] = True
            done[b] = done[b] or len(new_tokens[b]) >= max_new_tokens
            done[b] = done[b] or (stop_when is not None and stop_when(b, new_tokens[b]))
            if on_tokens is not None and emitted:
                on_tokens(b, emitted, kinds[b][: len(emitted)])
        _record(stats, costs, draft, result, active, draft_seconds, target_seconds, drafter)
        if not isinstance(draft, TreeDraft):
            policy.update(draft.lengths, result.num_accepted, costs)
    stats.new_tokens = sum(len(t) for t in new_tokens)
    stats.total_seconds = time.perf_counter() - started
    if costs.target(1) is not None and 1 in costs.target_pass:
        stats.target_single_pass_seconds = costs.target(1)
    return Generation(new_tokens, by_eos, stats)


def _propose(drafter, sequences, limits, sampling, generator) -> Draft | TreeDraft:
    if drafter is None or int(limits.max()) == 0:
        return Draft.empty(len(sequences))
    if isinstance(drafter, TreeDrafter):
        return drafter.propose_tree(sequences, limits, sampling, generator)
    return drafter.propose(sequences, limits, sampling, generator)


def _verify(
    draft: Draft | TreeDraft,
    logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator,
    rule: str,
) -> VerifyResult | TreeResult:
    """logits [batch, k+1, target vocab] -> the verified step. Probabilities of a drafter with a
    different vocabulary size are padded with zeros (ids a model lacks have probability 0)."""
    if isinstance(draft, TreeDraft):
        return _verify_tree(draft, logits, sampling, generator, rule)
    k = draft.tokens.shape[1]
    logits = logits[:, : k + 1].float()
    if sampling.greedy:
        target_tokens = logits.argmax(dim=-1).cpu()
        return greedy_rule(draft.tokens, target_tokens, draft.lengths)
    target_probs, draft_probs = _probabilities(logits, draft.probs, sampling)
    device = target_probs.device
    if rule in LOSSY_RULES:
        batch, k = draft.tokens.shape
        accept, sample = draw_uniforms(batch, k, generator, device)
        result = LOSSY_RULES[rule](
            draft.tokens.to(device),
            draft_probs,
            target_probs,
            draft.lengths.to(device),
            accept,
            sample,
        )
        return VerifyResult(result.tokens.cpu(), result.num_accepted.cpu(), result.rule_used)
    result = verify(
        draft.tokens.to(device),
        draft_probs,
        target_probs,
        generator=generator,
        rule=rule,
        draft_lengths=draft.lengths.to(device),
        validate=False,
    )
    return VerifyResult(result.tokens.cpu(), result.num_accepted.cpu(), result.rule_used)


def _verify_tree(
    draft: TreeDraft,
    logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator,
    rule: str,
) -> TreeResult:
    """logits [batch, n+1, target vocab] (root, then each node) -> recursive rejection sampling
    over the tree (or the greedy walk at temperature 0)."""
    logits = logits.float()
    if sampling.greedy:
        target_tokens = logits.argmax(dim=-1).cpu()
        return greedy_tree_rule(draft.tokens, draft.parents, target_tokens, draft.valid)
    target_probs, draft_probs = _probabilities(logits, draft.probs, sampling)
    device = target_probs.device
    result = verify_tree(
        draft.tokens.to(device),
        draft.parents.to(device),
        draft_probs,
        target_probs,
        generator=generator,
        node_valid=draft.valid.to(device),
        validate=False,
    )
    return TreeResult(result.tokens.cpu(), result.num_accepted.cpu(), result.path.cpu())


def _probabilities(
    logits: torch.Tensor, draft_probs: torch.Tensor | None, sampling: SamplingConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The warped target probabilities, and the draft's on the target's device; when the two
    vocabularies differ in size both are padded with zeros (ids a model lacks have probability
    0)."""
    target_probs = logits_to_probs(logits, sampling)
    if draft_probs is None:
        return target_probs, None
    vocab = max(target_probs.shape[-1], draft_probs.shape[-1])
    draft_probs = _pad_vocab(draft_probs.to(target_probs.device), vocab)
    return _pad_vocab(target_probs, vocab), draft_probs


def _pad_vocab(probs: torch.Tensor, vocab: int) -> torch.Tensor:
    missing = vocab - probs.shape[-1]
    return probs if missing == 0 else torch.nn.functional.pad(probs, (0, missing))


def _commit(b, result, new_tokens, sequences, max_new_tokens, eos) -> list[int]:
    """Appends row b's emitted tokens, cut after an EOS and at max_new_tokens."""
    count = int(result.num_accepted[b]) + 1
    emitted = result.tokens[b, :count].tolist()
    emitted = emitted[: max_new_tokens - len(new_tokens[b])]
    for j, token in enumerate(emitted):
        if token in eos:
            emitted = emitted[: j + 1]
            break
    new_tokens[b].extend(emitted)
    sequences[b].extend(emitted)
    return emitted


def _step_kinds(result: VerifyResult | TreeResult, draft: Draft | TreeDraft) -> list[list[str]]:
    """Per row: accepted for each kept draft, then bonus (the drafts ran out: a whole chain, or
    a tree node without children, was accepted) or recovered (drawn after a rejection)."""
    accepted = result.num_accepted.tolist()
    if isinstance(draft, TreeDraft):
        ran_out = ~_last_node_has_children(draft, result)
    else:
        ran_out = result.num_accepted == draft.lengths
    return [
        [ACCEPTED] * a + [BONUS if bool(out) else RECOVERED]
        for a, out in zip(accepted, ran_out, strict=True)
    ]


def _record(stats, costs, draft, result, active, draft_seconds, target_seconds, drafter) -> None:
    rows = torch.tensor(active)
    accepted = result.num_accepted[rows]
    if isinstance(draft, TreeDraft):
        # A tree "drafts at depth i" for a row whose accepted path reached a node with children
        # there; alpha is then the chance that one of those children is accepted.
        stats.tree_steps += 1
        drafted = int(draft.valid[rows].sum())
        tested_depth = _tree_tested_depth(draft, result)[rows]  # [rows]: depths with children
        k = draft.depth()
        width = int(draft.valid.sum(dim=1).max()) if draft.valid.numel() else 0
    else:
        lengths = draft.lengths[rows]
        drafted = int(lengths.sum())
        for length in lengths.tolist():
            stats.draft_lengths[length] = stats.draft_lengths.get(length, 0) + 1
        tested_depth = lengths
        k = draft.tokens.shape[1]
        width = k
    stats.target_passes += 1
    stats.rules_used[result.rule_used] = stats.rules_used.get(result.rule_used, 0) + 1
    stats.row_steps += int(rows.sum())
    stats.drafted += drafted
    stats.accepted += int(accepted.sum())
    stats.keep_tests += int(accepted.sum() + (accepted < tested_depth).sum())
    stats.drafted_row_steps += int((tested_depth > 0).sum())
    stats.empty_steps += int(((tested_depth > 0) & (accepted == 0)).sum())
    while len(stats.drafted_by_position) < k:
        stats.drafted_by_position.append(0)
        stats.accepted_by_position.append(0)
    for i in range(k):
        # position i was tested when the row drafted past i and kept everything before it
        tested = (tested_depth > i) & (accepted >= i)
        stats.drafted_by_position[i] += int(tested.sum())
        stats.accepted_by_position[i] += int((tested & (accepted > i)).sum())
    passes_before = stats.draft_passes
    stats.draft_passes = drafter.forward_passes if drafter is not None else 0
    new_passes = stats.draft_passes - passes_before
    stats.draft_seconds += draft_seconds
    stats.target_seconds += target_seconds
    if new_passes:
        for _ in range(new_passes):
            costs.draft_step.add(draft_seconds / new_passes)
    costs.add_target_pass(width + 1, target_seconds)


def _tree_tested_depth(draft: TreeDraft, result: TreeResult) -> torch.Tensor:
    """int64 [batch]: how deep the tree was tested along the accepted path: the number of
    accepted nodes, plus one when the last of them (or the root) still had valid children."""
    return result.num_accepted + _last_node_has_children(draft, result).long()


def _last_node_has_children(draft: TreeDraft, result: TreeResult) -> torch.Tensor:
    """bool [batch]: the last accepted node (the root when none was accepted) has valid
    children, i.e. the emitted token after it was recovered, not a bonus token."""
    last = result.path.gather(1, (result.num_accepted - 1).clamp(min=0)[:, None])[:, 0] + 1
    last = torch.where(result.num_accepted > 0, last, 0)  # index into [root, node 0, ...]
    return draft.has_children().gather(1, last[:, None])[:, 0]


def _draft_length_policy(draft_length, drafter):
    if drafter is None:
        return FixedDraftLength(0)
    if isinstance(drafter, TreeDrafter):
        return FixedDraftLength(drafter.shape.depth)
    if isinstance(draft_length, int) and not isinstance(draft_length, bool):
        if draft_length < 0:
            raise ValueError(f"draft_length: expected an integer >= 0, got {draft_length!r}")
        return FixedDraftLength(draft_length)
    if isinstance(draft_length, (FixedDraftLength, AdaptiveDraftLength)):
        return draft_length
    raise TypeError(
        f"draft_length: expected an int or a FixedDraftLength/AdaptiveDraftLength, got "
        f"{type(draft_length).__name__}"
    )


def _check_generate_args(prompts, max_new_tokens, generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or (max_new_tokens < 1)
    ):
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
