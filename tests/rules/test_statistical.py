"""Statistical tests of the sampled, vectorised rule through `specsample.verify`.

A small speculative loop over exact toy tables produces the first two emitted tokens of N rows (one
big batch per verification step); a G-test compares their joint frequencies with the target's
p(a) p(b | a). Each test fails when the p-value is below ALPHA = 1e-6: for a correct rule and a
random seed that is the false-failure rate (the seeds here are fixed, so a pass is reproducible).
The negative controls (always accept; recover from p instead of the residual) must fail the same
test with the same sample size.
"""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import (
    ConstantModel,
    TablePrefixModel,
    Tables,
    g_test_p_value,
    joint_counts,
    target_joint,
)
from specsample import verify
from specsample.rules import PAD

ALPHA = 1e-6
ROWS = 200_000
VOCAB = 4
K = 3


def speculative_first_two(
    target, draft, *, generator, k=K, point_mass=False, ragged=False, emit=None
):
    """The first two emitted tokens [ROWS, 2] of a speculative loop over prefix tables."""
    emit = emit or (lambda *args, **kw: verify(*args, **kw).tokens)
    first_two = torch.full((ROWS, 2), PAD, dtype=torch.int64)
    codes = torch.zeros(ROWS, dtype=torch.int64)
    rows = torch.arange(ROWS)
    filled = torch.zeros(ROWS, dtype=torch.int64)
    while bool((filled < 2).any()):
        todo = rows[filled < 2]
        prefix = codes[todo]
        drafts, draft_rows, target_rows = [], [], []
        for _ in range(k):
            q = draft[prefix]
            token = (
                q.argmax(-1) if point_mass else torch.multinomial(q, 1, generator=generator)[:, 0]
            )
            target_rows.append(target[prefix])
            draft_rows.append(q)
            drafts.append(token)
            prefix = draft.extend(prefix, token)
        target_rows.append(target[prefix])
        lengths = None
        if ragged:
            lengths = torch.randint(0, k + 1, (len(todo),), generator=generator)
        tokens = emit(
            torch.stack(drafts, 1),
            None if point_mass else torch.stack(draft_rows, 1),
            torch.stack(target_rows, 1),
            generator=generator,
            draft_lengths=lengths,
        )
        for j in range(tokens.shape[1]):
            take = (tokens[:, j] != PAD) & (filled[todo] < 2)
            who = todo[take]
            first_two[who, filled[who]] = tokens[take, j]
            codes[who] = target.extend(codes[who], tokens[take, j])
            filled[who] += 1
    return first_two


def models(seed=0):
    target = TablePrefixModel(VOCAB, seed=10 + seed, sharpness=1.5, zeros=1)
    draft = TablePrefixModel(VOCAB, seed=20 + seed, sharpness=1.5)
    return target, draft


@functools.cache
def tables():
    """Round one reads prefixes of up to K tokens, round two (one token emitted) up to K + 1."""
    target_model, draft_model = models()
    return target_model, Tables(target_model, VOCAB, K + 1), Tables(draft_model, VOCAB, K + 1)


def run(emit=None, seed=0, **options):
    target_model, target, draft = tables()
    generator = torch.Generator().manual_seed(seed)
    first_two = speculative_first_two(target, draft, generator=generator, emit=emit, **options)
    return g_test_p_value(joint_counts(first_two, VOCAB), target_joint(target_model, VOCAB))


def always_accept(draft_tokens, draft_probs, target_probs, *, generator, draft_lengths=None):
    """Negative control: keep every draft, then a bonus token from p."""
    batch, k = draft_tokens.shape
    lengths = torch.full((batch,), k) if draft_lengths is None else draft_lengths
    bonus = torch.multinomial(target_probs[torch.arange(batch), lengths], 1, generator=generator)
    tokens = torch.cat([draft_tokens, torch.full((batch, 1), PAD)], 1)
    tokens[torch.arange(k + 1)[None, :] > lengths[:, None]] = PAD
    return tokens.scatter(1, lengths[:, None], bonus)


def recover_from_target(draft_tokens, draft_probs, target_probs, *, generator, draft_lengths=None):
    """Negative control: the right keep test, the recovered token drawn from p."""
    result = verify(
        draft_tokens, draft_probs, target_probs, generator=generator, draft_lengths=draft_lengths
    )
    batch = draft_tokens.shape[0]
    n = result.num_accepted
    redrawn = torch.multinomial(target_probs[torch.arange(batch), n], 1, generator=generator)
    return result.tokens.scatter(1, n[:, None], redrawn)


@pytest.mark.parametrize(
    "options",
    [{}, {"ragged": True}, {"point_mass": True}, {"point_mass": True, "ragged": True}],
    ids=["stochastic", "ragged", "point-mass", "point-mass-ragged"],
)
def test_first_two_tokens_follow_target_joint(options):
    assert run(**options) > ALPHA


@pytest.mark.parametrize("control", [always_accept, recover_from_target])
@pytest.mark.parametrize("options", [{}, {"point_mass": True}], ids=["stochastic", "point-mass"])
def test_negative_controls_fail_the_same_test(control, options):
    assert run(emit=control, **options) < ALPHA


def test_worked_example_acceptance_and_output_frequencies():
    """Q = (1/2, 1/2), P = (1/4, 3/4), k = 1, N = 200000 rows. Acceptance 3/4 and output
    (1/4, 3/4), each checked within 6 standard deviations (false-failure rate < 1e-8 each)."""
    generator = torch.Generator().manual_seed(7)
    target, draft = ConstantModel([0.25, 0.75]).probs, ConstantModel([0.5, 0.5]).probs
    drafts = torch.multinomial(draft.expand(ROWS, 2), 1, replacement=True, generator=generator)
    result = verify(
        drafts, draft.expand(ROWS, 1, 2), target.expand(ROWS, 2, 2), generator=generator
    )
    accepted = result.num_accepted.double().mean()
    first_is_a = (result.tokens[:, 0] == 0).double().mean()
    assert abs(float(accepted) - 0.75) < 6 * (0.75 * 0.25 / ROWS) ** 0.5
    assert abs(float(first_is_a) - 0.25) < 6 * (0.25 * 0.75 / ROWS) ** 0.5
