"""The hard cases an audited verifier runs on, how their inputs are drawn, and the exact law its
output must follow.

Each case is a pair of Markov "models" over a small vocabulary: the target gives the first token
the distribution `first_target` and the token after v the row `next_target[v]`; the drafter
likewise (`first_draft`, `next_draft`). One trial draws a draft chain x_1..x_k from the drafter
(x_1 ~ first_draft, x_{i+1} ~ next_draft[x_i]; the argmax instead for point-mass drafts) and hands
the verifier

    draft_probs  [batch, k, vocab]    row 0 = first_draft, row i = next_draft[x_i]
    target_probs [batch, k+1, vocab]  row 0 = first_target, row i = next_target[x_i]

What is observed is the pair (t1, t2) of the first two tokens a decoder would produce: the first
two emitted tokens, or, when the verifier emitted only one, t1 and a token the audit itself draws
from the target after t1 (the decoder's next step, which would start from a fresh draft). For an
exact verifier this pair follows the target's own joint law

    P(t1, t2) = first_target[t1] * next_target[t1, t2],

whatever rule it uses (token, block or tree) and however many tokens it keeps; a verifier that
emits t2 after t1 must have drawn it from the row after t1, which is the row after x_1 only when
t1 = x_1. The law is computed from the probabilities exactly as the verifier receives them (cast
to the case's dtype), renormalised in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAD = -1


@dataclass(frozen=True)
class Case:
    """One hard case: a target and a drafter over `vocab` tokens, k drafts per trial.

    first_target, first_draft: float64 [vocab]; next_target, next_draft: float64 [vocab, vocab]
    (row v: the distribution after token v). dtype: what the verifier receives. point_mass: pass
    draft_probs=None and draft the argmax. ragged: each row gets a random draft length in 0..k,
    passed as draft_lengths=; entries past it hold other valid values.
    """

    name: str
    description: str
    k: int
    first_target: torch.Tensor
    next_target: torch.Tensor
    first_draft: torch.Tensor
    next_draft: torch.Tensor
    dtype: torch.dtype = torch.float32
    point_mass: bool = False
    ragged: bool = False
    rows: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def vocab(self) -> int:
        return int(self.first_target.shape[0])

    def received(self, name: str) -> torch.Tensor:
        """The rows as the verifier receives them (cast to dtype), float64 renormalised."""
        if name not in self.rows:
            cast = getattr(self, name).to(self.dtype).to(torch.float64)
            self.rows[name] = cast / cast.sum(dim=-1, keepdim=True)
        return self.rows[name]

    def first_token_law(self) -> torch.Tensor:
        """float64 [vocab]: the law of the first emitted token."""
        return self.received("first_target")

    def two_token_law(self) -> torch.Tensor:
        """float64 [vocab * vocab]: the law of (t1, t2), cell t1 * vocab + t2."""
        first = self.received("first_target")
        return (first[:, None] * self.received("next_target")).flatten()


@dataclass(frozen=True)
class Trials:
    """One batch of verifier inputs drawn for a case."""

    draft_tokens: torch.Tensor  # int64 [batch, k]
    draft_probs: torch.Tensor | None  # [batch, k, vocab] in the case's dtype, or None
    target_probs: torch.Tensor  # [batch, k+1, vocab] in the case's dtype
    draft_lengths: torch.Tensor | None  # int64 [batch] for ragged cases


def draw_trials(case: Case, batch: int, generator: torch.Generator) -> Trials:
    """Draws `batch` draft chains from the case's drafter and builds the verifier's inputs."""
    k, vocab = case.k, case.vocab
    first_draft, next_draft = case.received("first_draft"), case.received("next_draft")
    drafts = torch.empty(batch, k, dtype=torch.int64)
    previous: torch.Tensor | None = None
    for i in range(k):
        rows = first_draft.expand(batch, vocab) if previous is None else next_draft[previous]
        if case.point_mass:
            drafts[:, i] = rows.argmax(dim=-1)
        else:
            drafts[:, i] = sample_rows(rows, generator)
        previous = drafts[:, i]
    target = torch.empty(batch, k + 1, vocab, dtype=case.dtype)
    target[:, 0] = case.first_target.to(case.dtype)
    target[:, 1:] = case.next_target.to(case.dtype)[drafts]
    draft_probs = None
    if not case.point_mass:
        draft_probs = torch.empty(batch, k, vocab, dtype=case.dtype)
        draft_probs[:, 0] = case.first_draft.to(case.dtype)
        draft_probs[:, 1:] = case.next_draft.to(case.dtype)[drafts[:, :-1]]
    lengths = None
    if case.ragged:
        lengths = torch.randint(0, k + 1, (batch,), generator=generator)
        # Past a row's length: other valid ids and uniform rows, so that a verifier reading them
        # goes wrong visibly.
        past = torch.arange(k)[None, :] >= lengths[:, None]  # [batch, k]
        drafts = torch.where(past, torch.randint(0, vocab, (batch, k), generator=generator), drafts)
        uniform = torch.full((vocab,), 1.0 / vocab, dtype=case.dtype)
        target[:, 1:][past] = uniform
        if draft_probs is not None:
            draft_probs[past] = uniform
    return Trials(drafts, draft_probs, target, lengths)


def sample_rows(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """int64 [batch]: one index per row of float64 probabilities [batch, vocab] (inverse CDF; ids
    of probability 0 are never drawn)."""
    cumulative = weights.cumsum(dim=-1)
    uniforms = torch.rand(weights.shape[0], 1, dtype=torch.float64, generator=generator)
    uniforms = uniforms * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, uniforms, right=True)[:, 0]
    return index.clamp(max=weights.shape[1] - 1)


def observed_pairs(
    case: Case, tokens: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t1, t2) int64 [batch] each from checked verifier output tokens [batch, k+1]: t2 is the
    second emitted token, or a draw from the target after t1 where only one was emitted."""
    first = tokens[:, 0]
    second = tokens[:, 1].clone() if tokens.shape[1] > 1 else torch.full_like(first, PAD)
    missing = second == PAD
    if bool(missing.any()):
        second[missing] = sample_rows(case.received("next_target")[first[missing]], generator)
    return first, second


# The default suite.


def _markov_pair(
    vocab: int, seed: int, *, sharpness: float = 1.5, disagreement: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first_target, next_target, first_draft, next_draft) float64: random target rows, draft rows
    whose logits are the target's plus `disagreement` times independent noise."""
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(vocab + 1, vocab, generator=g, dtype=torch.float64) * sharpness
    draft_logits = target_logits + disagreement * torch.randn(
        vocab + 1, vocab, generator=g, dtype=torch.float64
    )
    target, draft = target_logits.softmax(-1), draft_logits.softmax(-1)
    return target[0], target[1:], draft[0], draft[1:]


def _dyadic(probs: torch.Tensor, denominator: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of multiples of 1/denominator near probs [..., vocab], exact in float16 and bfloat16;
    at least two tokens keep positive mass."""
    rows = probs.reshape(-1, probs.shape[-1])
    out = torch.empty_like(rows)
    for i, row in enumerate(rows):
        while True:
            counts = torch.multinomial(row, denominator, replacement=True, generator=generator)
            counts = torch.bincount(counts, minlength=row.shape[0]).to(torch.float64)
            if int((counts > 0).sum()) >= 2:
                break
        out[i] = counts / denominator
    return out.reshape(probs.shape)


def _tiny_masses(vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A pair where the target gives 1e-30 to tokens the drafter likes and the drafter gives 1e-30
    to tokens the target likes."""
    first_target, next_target, first_draft, next_draft = _markov_pair(vocab, seed)

    def squash(rows: torch.Tensor, ids: list[int]) -> torch.Tensor:
        rows = rows.clone()
        rows[..., ids] = 1e-30
        return rows / rows.sum(dim=-1, keepdim=True)

    target_poor, draft_poor = [0, 1], [4, 5]
    return (
        squash(first_target, target_poor),
        squash(next_target, target_poor),
        squash(first_draft, draft_poor),
        squash(next_draft, draft_poor),
    )


def _nearly_equal(vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A drafter equal to the target up to relative differences of 1e-6: the residual after a
    rare rejection is tiny and must still be normalised, not divided by zero."""
    first_target, next_target, _, _ = _markov_pair(vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)

    def nudge(rows: torch.Tensor) -> torch.Tensor:
        rows = rows * (1.0 + 1e-6 * torch.randn(rows.shape, generator=g, dtype=torch.float64))
        return rows / rows.sum(dim=-1, keepdim=True)

    return first_target, next_target, nudge(first_target), nudge(next_target)


def default_cases() -> list[Case]:
    """The default suite (fixed: the audit's seed drives only the sampling)."""
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    quarter = torch.tensor([0.25, 0.75], dtype=torch.float64)
    disjoint_target = torch.tensor([0.0, 0.0, 0.3, 0.7], dtype=torch.float64)
    disjoint_draft = torch.tensor([0.6, 0.4, 0.0, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    disjoint_next_target = torch.zeros(4, 4, dtype=torch.float64)
    disjoint_next_target[:, 2:] = torch.rand(4, 2, generator=g, dtype=torch.float64) + 0.2
    disjoint_next_target /= disjoint_next_target.sum(-1, keepdim=True)
    disjoint_next_draft = disjoint_next_target[:, [2, 3, 0, 1]]
    equal = _markov_pair(6, 11)
    dyadic_source = _markov_pair(8, 13)
    dyadic_g = torch.Generator().manual_seed(17)
    dyadic = tuple(_dyadic(rows, 64, dyadic_g) for rows in dyadic_source)
    cases = [
        Case(
            "worked_example",
            "P = (1/4, 3/4), Q = (1/2, 1/2) at every position, k = 2",
            2,
            quarter,
            quarter.expand(2, 2).clone(),
            half,
            half.expand(2, 2).clone(),
        ),
        Case(
            "disjoint_supports",
            "the drafter only proposes tokens the target never emits, k = 3",
            3,
            disjoint_target,
            disjoint_next_target,
            disjoint_draft,
            disjoint_next_draft,
        ),
        Case("p_equals_q", "drafter identical to the target, k = 3", 3, *equal[:2], *equal[:2]),
        Case(
            "nearly_equal",
            "drafter equal to the target up to relative 1e-6 (float64 inputs), k = 3",
            3,
            *_nearly_equal(6, 19),
            dtype=torch.float64,
        ),
        Case(
            "tiny_masses",
            "masses of 1e-30 on tokens one side likes and the other does not, k = 3",
            3,
            *_tiny_masses(6, 23),
        ),
        Case(
            "point_mass",
            "point-mass drafts (draft_probs None, the drafter's argmax), k = 3",
            3,
            *_markov_pair(6, 29),
            point_mass=True,
        ),
        Case("long_k", "8 drafts per trial, vocab 8", 8, *_markov_pair(8, 31)),
        Case(
            "ragged",
            "draft lengths 0..4 per row (draft_lengths=), junk past each length",
            4,
            *_markov_pair(6, 37),
            ragged=True,
        ),
        Case(
            "float16",
            "float16 inputs (multiples of 1/64, exact in float16), k = 3",
            3,
            *dyadic,
            dtype=torch.float16,
        ),
        Case(
            "bfloat16",
            "bfloat16 inputs (multiples of 1/64, exact in bfloat16), k = 3",
            3,
            *dyadic,
            dtype=torch.bfloat16,
        ),
    ]
    return cases
