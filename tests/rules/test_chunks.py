"""The chunked paths of the rules, across chunk boundaries.

`sample_final_tokens` (token.py) forms the residual rows CHUNK_ELEMENTS // vocab rows at a time, and
the block rule sums its residual masses CHUNK_ELEMENTS // (vocab (k - 1)) rows at a time: at the
real size (2^20 elements) that is 6 rows at vocab 151936. Here:

- the chunk sizes are made small (monkeypatched), and the fast rules must equal their loop
  references on the same uniforms over batches that span many chunks, with rejected and bonus rows
  mixed (rejected rows are put first, so chunks hold both kinds and the boundaries fall between
  them);
- a full-size vocabulary (151936) batch larger than one real chunk, for the token, block and tree
  rules (the tree rule has no chunked path; the test pins its full-size batch all the same);
- a statistical test of the token and block rules with small chunks (G-test on the first two
  emitted tokens, rows in several contexts), and its negative control: a rule whose final tokens
  come from the first chunk's rows, as a chunk loop that re-reads its first chunk would draw them.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from scipy.stats import chi2

from helpers import TablePrefixModel, Tables, g_statistic, random_case, random_tree_case
from specsample.rules import block as block_module
from specsample.rules import draw_uniforms
from specsample.rules import token as token_module
from specsample.rules.block import block_rule, cumulative_log_acceptance
from specsample.rules.reference import (
    reference_block_rule,
    reference_token_rule,
    reference_tree_rule,
)
from specsample.rules.result import VerifyResult, assemble_tokens
from specsample.rules.token import sample_final_tokens, token_rule
from specsample.rules.tree import tree_parents, tree_rule

FULL_VOCAB = 151936
REAL_CHUNK_ROWS = token_module.CHUNK_ELEMENTS // FULL_VOCAB  # 6


def set_chunk_rows(monkeypatch, rows, vocab, k):
    """Makes both chunked loops take `rows` rows at a time at this vocab and k."""
    monkeypatch.setattr(token_module, "CHUNK_ELEMENTS", rows * vocab)
    monkeypatch.setattr(block_module, "CHUNK_ELEMENTS", rows * vocab * max(k - 1, 1))


def assert_same(fast_rule, reference_rule, case):
    fast = fast_rule(*case)
    reference = reference_rule(*case)
    assert torch.equal(fast.num_accepted, reference.num_accepted)
    assert torch.equal(fast.tokens, reference.tokens)
    return fast


def assert_both_outcomes(result, draft_lengths):
    """The batch must hold rejected rows and bonus rows, or the chunks hold only one kind."""
    assert bool((result.num_accepted < draft_lengths).any())
    assert bool((result.num_accepted == draft_lengths).any())


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 3, 5])
@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_token_rule_equals_reference_across_chunk_boundaries(
    monkeypatch, rows_per_chunk, point_mass
):
    batch, k, vocab = 23, 3, 50
    set_chunk_rows(monkeypatch, rows_per_chunk, vocab, k)
    for seed in range(3):
        case = random_case(
            400 + seed, batch=batch, k=k, vocab=vocab, dtype=torch.float32, point_mass=point_mass
        )
        result = assert_same(token_rule, reference_token_rule, case)
    assert_both_outcomes(result, case[3])


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 3, 5])
@pytest.mark.parametrize("k", [2, 4])
def test_block_rule_equals_reference_across_chunk_boundaries(monkeypatch, rows_per_chunk, k):
    batch, vocab = 23, 50
    set_chunk_rows(monkeypatch, rows_per_chunk, vocab, k)
    for seed in range(3):
        case = random_case(
            500 + seed, batch=batch, k=k, vocab=vocab, dtype=torch.float32, point_mass=False
        )
        result = assert_same(block_rule, reference_block_rule, case)
        assert result.rule_used == "block"
    assert_both_outcomes(result, case[3])


def loop_residual_masses(kept, draft_probs, target_probs):
    """float64 [batch, k]: R_i = sum_v max(0, P_i p_{i+1}(v) - q_{i+1}(v)), one row and position
    at a time; the last column 0."""
    batch, k = kept.shape
    masses = torch.zeros(batch, k, dtype=torch.float64)
    for b in range(batch):
        for i in range(k - 1):
            p = target_probs[b, i + 1].to(torch.float64)
            q = draft_probs[b, i + 1].to(torch.float64)
            masses[b, i] = float(torch.clamp(kept[b, i] * p - q, min=0.0).sum())
    return masses


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 3, 5])
@pytest.mark.parametrize("k", [2, 4])
def test_block_residual_masses_are_the_same_in_every_chunk(monkeypatch, rows_per_chunk, k):
    """The R_i decide tau only when a uniform falls between two thresholds; compared directly,
    every row of every chunk counts."""
    batch, vocab = 23, 50
    tokens, draft_probs, target_probs, lengths, _, _ = random_case(
        510, batch=batch, k=k, vocab=vocab, dtype=torch.float32, point_mass=False
    )
    kept = cumulative_log_acceptance(tokens, draft_probs, target_probs).exp()
    whole = block_module.residual_masses(kept, draft_probs, target_probs)  # one chunk
    set_chunk_rows(monkeypatch, rows_per_chunk, vocab, k)
    chunked = block_module.residual_masses(kept, draft_probs, target_probs)
    assert torch.equal(chunked, whole)
    loop = loop_residual_masses(kept, draft_probs, target_probs)
    torch.testing.assert_close(chunked, loop, rtol=1e-5, atol=1e-7)
    assert float((loop[:, : k - 1] > 0).double().mean()) > 0.5  # most masses are not 0


# A full-size vocabulary, a batch of 14 rows: 3 real chunks of the residual rows (6, 6, 2), and
# 3 real chunks of the block rule's residual masses at k = 2.
FULL_BATCH = 14


@pytest.mark.parametrize("point_mass", [False, True], ids=["stochastic", "point-mass"])
def test_token_rule_equals_reference_on_a_full_vocabulary_batch_of_several_chunks(point_mass):
    assert FULL_BATCH > 2 * REAL_CHUNK_ROWS
    case = random_case(
        600, batch=FULL_BATCH, k=2, vocab=FULL_VOCAB, dtype=torch.float32, point_mass=point_mass
    )
    result = assert_same(token_rule, reference_token_rule, case)
    assert_both_outcomes(result, case[3])


def test_block_rule_equals_reference_on_a_full_vocabulary_batch_of_several_chunks():
    k = 2
    assert FULL_BATCH > 2 * (block_module.CHUNK_ELEMENTS // (FULL_VOCAB * (k - 1)))
    case = random_case(
        602, batch=FULL_BATCH, k=k, vocab=FULL_VOCAB, dtype=torch.float32, point_mass=False
    )
    result = assert_same(block_rule, reference_block_rule, case)
    assert_both_outcomes(result, case[3])


def test_tree_rule_equals_reference_on_a_full_vocabulary_batch_larger_than_a_chunk():
    case = random_tree_case(
        603,
        batch=REAL_CHUNK_ROWS + 2,
        n=3,
        vocab=FULL_VOCAB,
        dtype=torch.float32,
        parents=tree_parents((2, 1)).narrow(0, 0, 3),
    )
    fast = tree_rule(*case)
    reference = reference_tree_rule(*case)
    assert torch.equal(fast.tokens, reference.tokens)
    assert torch.equal(fast.path, reference.path)
    assert {0, 1} <= set(fast.num_accepted.tolist())


# The statistical test. Row b starts from the context (b mod GROUPS,), so that neighbouring rows,
# and so the rows of different chunks, have different distributions; k drafts, then a second step
# for the rows that emitted only one token. G-test on the (context, first, second) counts: the sum
# of one G statistic per context, with the sum of their degrees of freedom; a correct rule fails
# with probability ALPHA.

ALPHA = 1e-6
VOCAB = 4
K = 2
GROUPS = 3
ROWS = 30_000
STAT_CHUNK_ROWS = 97  # about 300 chunks per step, never aligned with the contexts


@functools.cache
def stat_tables():
    target_model = TablePrefixModel(VOCAB, seed=61, sharpness=1.5, zeros=1)
    draft_model = TablePrefixModel(VOCAB, seed=62, sharpness=1.5)
    depth = K + 2  # the context, K drafts and the prefix of the second step
    return target_model, Tables(target_model, VOCAB, depth), Tables(draft_model, VOCAB, depth)


def first_two_tokens(rule, seed=0):
    """int64 [ROWS] contexts and [ROWS, 2] the first two emitted tokens after them."""
    target_model, target, draft = stat_tables()
    generator = torch.Generator().manual_seed(seed)

    def step(codes):
        drafts, draft_rows, target_rows, prefix = [], [], [], codes
        for _ in range(K):
            q = draft[prefix]
            token = torch.multinomial(q, 1, generator=generator)[:, 0]
            draft_rows.append(q)
            target_rows.append(target[prefix])
            drafts.append(token)
            prefix = draft.extend(prefix, token)
        target_rows.append(target[prefix])
        accept, sample = draw_uniforms(len(codes), K, generator, torch.device("cpu"))
        lengths = torch.full((len(codes),), K)
        draft_probs = torch.stack(draft_rows, 1).float()
        target_probs = torch.stack(target_rows, 1).float()
        return rule(torch.stack(drafts, 1), draft_probs, target_probs, lengths, accept, sample)

    contexts = torch.arange(ROWS) % GROUPS
    start = target.extend(torch.zeros(ROWS, dtype=torch.int64), contexts)
    first = step(start).tokens
    need = first[:, 1] < 0
    second = step(target.extend(start[need], first[need, 0])).tokens
    pairs = first[:, :2].clone()
    pairs[need, 1] = second[:, 0]
    return contexts, pairs


def grouped_p_value(contexts, pairs):
    """p-value of the G-test of each context's pair counts against p(a | c) p(b | c, a): the G
    statistics of the contexts and their degrees of freedom add up."""
    target_model = stat_tables()[0]
    statistic, dof = 0.0, 0
    for c in range(GROUPS):
        mine = pairs[contexts == c]
        counts = torch.bincount(mine[:, 0] * VOCAB + mine[:, 1], minlength=VOCAB * VOCAB)
        first = target_model((c,))
        expected = torch.stack([first[a] * target_model((c, a)) for a in range(VOCAB)])
        g, cells = g_statistic(counts, expected)
        statistic += g
        dof += cells
    return float(chi2.sf(statistic, dof))


def re_reads_first_chunk(rule):
    """Negative control: `rule`'s keep decisions, but row b's recovered or bonus token is drawn
    from the final distribution of row b mod STAT_CHUNK_ROWS (the first chunk)."""

    def control(draft_tokens, draft_probs, target_probs, lengths, accept, sample):
        result = rule(draft_tokens, draft_probs, target_probs, lengths, accept, sample)
        scale = None
        if result.rule_used == "block":  # the block residual scales p by P_tau
            log_kept = cumulative_log_acceptance(draft_tokens, draft_probs, target_probs)
            padded = torch.nn.functional.pad(log_kept, (1, 0))
            scale = padded.gather(1, result.num_accepted[:, None])[:, 0].exp()
        source = torch.arange(len(draft_tokens)) % STAT_CHUNK_ROWS
        final = sample_final_tokens(
            draft_tokens[source],
            draft_probs[source],
            target_probs[source],
            lengths[source],
            result.num_accepted[source],
            sample,
            target_scale=None if scale is None else scale[source],
        )
        tokens = assemble_tokens(draft_tokens, result.num_accepted, final)
        return VerifyResult(tokens, result.num_accepted, result.rule_used)

    return control


STAT_RULES = {"token": token_rule, "block": block_rule}


@pytest.mark.parametrize("name", sorted(STAT_RULES))
def test_first_two_tokens_follow_the_target_across_chunk_boundaries(monkeypatch, name):
    set_chunk_rows(monkeypatch, STAT_CHUNK_ROWS, VOCAB, K)
    assert grouped_p_value(*first_two_tokens(STAT_RULES[name])) > ALPHA


@pytest.mark.parametrize("name", sorted(STAT_RULES))
def test_a_rule_drawing_from_the_first_chunk_fails_the_same_test(monkeypatch, name):
    set_chunk_rows(monkeypatch, STAT_CHUNK_ROWS, VOCAB, K)
    assert grouped_p_value(*first_two_tokens(re_reads_first_chunk(STAT_RULES[name]))) < ALPHA


def test_the_chunk_loops_reuse_their_buffers_without_resizing(monkeypatch):
    """The residual rows are read into buffers of one chunk's size, reused by every chunk
    (torch warns when an output buffer of the wrong size has to be resized)."""
    batch, k, vocab = 23, 3, 50
    set_chunk_rows(monkeypatch, 4, vocab, k)
    case = random_case(520, batch=batch, k=k, vocab=vocab, dtype=torch.float32, point_mass=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token = token_rule(*case)
        block = block_rule(*case)
    assert torch.equal(token.tokens, reference_token_rule(*case).tokens)
    assert torch.equal(block.tokens, reference_block_rule(*case).tokens)
