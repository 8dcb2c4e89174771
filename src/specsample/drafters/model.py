"""A draft model: samples drafts from its warped distribution Q and returns Q with them, so the
verification rule sees exactly the distribution each draft was drawn from. Under the coupled
rule it drafts the Gumbel-max pick argmax(log Q + g) with the request's (seed, position) noise
instead, a point mass."""

from __future__ import annotations

import torch

from specsample.adapters.cursor import ModelCursor
from specsample.adapters.protocol import LanguageModel
from specsample.drafters.base import CursorDrafter, Draft
from specsample.rules.coupled import coupled_sample
from specsample.rules.sampling import sample_from_weights
from specsample.warpers import RowSampling

# The command line's default `confidence`, chosen by benchmarks/decode_speed.py (the library's
# default stays 0: a plain drafter drafts what it is asked to).
DEFAULT_CONFIDENCE = 0.4
# The command line's default `survival` (with lengths from the costs: see AdaptiveDraftLength).
DEFAULT_SURVIVAL = 0.25
# The command line's default `greedy_survival`: for greedy rows the draft's plain top
# probability understates the chance that its argmax is the target's (benchmarks/draft_stops.md:
# where the draft's top probability was 0.3-0.6 its argmax was the target's token 56-61% of the
# time, while at T = 0.7 the warped top probability was about the keep rate), so the survival
# product reads low and the stop sits lower; chosen by replaying the stop rules on the
# target's own texts there.
DEFAULT_GREEDY_SURVIVAL = 0.1


class ModelDrafter(CursorDrafter):
    """Drafts with a small model through the LanguageModel protocol.

    confidence: stop drafting a row before position i when the draft's largest probability there
    is below this (0 disables it).
    survival: stop drafting a row before position i when the product of the draft's largest
    probabilities at positions 1..i falls below this (0 disables it). That product estimates the
    chance that every draft up to i is kept, which is what an extra draft position buys: long
    drafts where the draft is sure, short ones where it is not.
    greedy_survival: the survival stop of greedy rows (None: `survival`).
    They use the warped draft distribution's top probability (for greedy decoding, where that
    is a point mass, the plain softmax's). Every decision depends only on the draft's own
    distribution, so verification stays exact.
    """

    fixed_depth = None

    def __init__(
        self,
        model: LanguageModel,
        *,
        confidence: float = 0.0,
        survival: float = 0.0,
        greedy_survival: float | None = None,
    ):
        if not 0 <= confidence < 1:
            raise ValueError(f"confidence: expected a number in [0, 1), got {confidence!r}")
        if not 0 <= survival < 1:
            raise ValueError(f"survival: expected a number in [0, 1), got {survival!r}")
        if greedy_survival is not None and not 0 <= greedy_survival < 1:
            raise ValueError(
                f"greedy_survival: expected None or a number in [0, 1), got {greedy_survival!r}"
            )
        self.cursor = ModelCursor(model, lazy=True)
        self.confidence = confidence
        self.survival = survival
        self.greedy_survival = survival if greedy_survival is None else greedy_survival
        self.forward_passes = 0

    @property
    def stops_itself(self) -> bool:
        """Whether it stops a row's draft where it is unsure (a confidence or survival stop
        set): the adaptive draft length then offers the longest draft the costs justify and
        leaves the stop to it (AdaptiveDraftLength, lengths="auto")."""
        return self.confidence > 0 or self.survival > 0 or self.greedy_survival > 0

    def release(self) -> None:
        """Drafting has stopped for now (the draft-length policy found it cannot pay): the
        draft model drops its rows and stops prefilling the prompts of requests that join;
        a later draft prefills every row first (timed as prefill)."""
        self.cursor.release()

    def propose(
        self, sequences: list[list[int]], max_lengths: torch.Tensor, sampling: RowSampling
    ) -> Draft:
        batch = len(sequences)
        k = int(max_lengths.max()) if batch else 0
        if k == 0:
            return Draft.empty(batch)
        drafting = max_lengths > 0  # [batch]
        logits = self.cursor.feed(sequences, drafting.tolist())[:, 0]  # [batch, vocab]
        self.forward_passes += int(self.cursor.fed)  # none: every row was ready
        tokens, probs = [], []
        lengths = torch.zeros(batch, dtype=torch.int64)
        survival = torch.ones(batch, dtype=torch.float64)
        greedy = sampling.greedy  # [batch]
        # each row's survival stop (0: none)
        floor = torch.where(greedy.cpu(), self.greedy_survival, self.survival).double()
        surviving = self.survival > 0 or self.greedy_survival > 0
        # coupled rows (rule "coupled") draft with their (seed, position) noise, the others
        # draw from their generators: a batch may hold both
        noise = sampling.gumbel(k, self.vocab_size, logits.device) if sampling.coupled else None
        coupled = sampling.coupled_mask
        for i in range(k):
            q = sampling.warp(logits.float())  # [batch, vocab]
            if self.confidence > 0 or surviving:
                # Greedy warping makes q a point mass; its confidence is the plain softmax's.
                plain = torch.softmax(logits.float(), dim=-1)
                scores = torch.where(greedy.to(q.device)[:, None], plain, q)
                top = scores.amax(dim=-1).double().cpu()
                survival *= top
                if self.confidence > 0:
                    drafting &= top >= self.confidence
                if surviving:
                    drafting &= survival >= floor
            drafting &= max_lengths > i
            if not bool(drafting.any()):
                break
            # Each drafting row draws one uniform from its own generator (greedy rows too, so a
            # row's draws never depend on its neighbours); a greedy row's q is one-hot.
            # A coupled row draws nothing: the same noise the target's token will use.
            drawing = drafting & ~coupled
            token = torch.zeros(batch, dtype=torch.int64, device=q.device)
            if bool(drawing.any()):
                uniforms = sampling.uniforms(drawing.long().tolist(), q.device)[:, 0]
                token = sample_from_weights(q, uniforms)
            if noise is not None:
                picked = coupled_sample(q, noise[:, i])
                token = torch.where(coupled.to(q.device), picked, token)
            token = torch.where(drafting.to(token.device), token, 0)
            tokens.append(token)
            probs.append(q)
            lengths += drafting.long()
            if i + 1 < k and bool((drafting & (max_lengths > i + 1)).any()):
                logits = self.cursor.append(token[:, None].cpu(), drafting.long())[:, 0]
                self.forward_passes += 1
        if not tokens:
            return Draft.empty(batch)
        draft_tokens = torch.stack(tokens, dim=1).cpu()
        # coupled rows' probabilities are never read (they are verified by the coupled rule)
        point_masses = sampling.all_greedy or sampling.all_coupled
        draft_probs = None if point_masses else torch.stack(probs, dim=1)
        return Draft.chain(draft_tokens, draft_probs, lengths)
