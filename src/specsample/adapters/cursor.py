"""Keeps a LanguageModel's cache in step with the committed token sequences.

Invariant between steps: the model holds every committed token of a row except the last one, the
"pending" token, which is fed at the start of the next step together with any new tokens. Holding
it back means one pass yields the distribution after the last committed token and after each new
token, and a rollback is a truncate to the longest prefix the cache shares with the sequence.

One exception: a prompt pass computes the distribution after the prompt's last token anyway, so
a row just prefilled holds its whole prompt and keeps that distribution (its "ready" logits) for
as long as its cache does not change. The row's next feed then needs no pending token: a
target-only step or a drafter's first draft is served without a pass, and drafts are fed on
their own after the prompt. That distribution is the one the prompt pass computed, so it is
"the target" for that position (on kernels whose rounding depends on the pass size, as for any
other position: the pass that scores a position defines its distribution).

Where the model can score the last tokens of a prompt pass (`PromptScoring`), a request that
joins is not prefilled when it joins: its first feed runs its prompt and its first drafts in one
pass (a model without it gets a prompt pass, then a pass over the drafts). The logits after the
prompt and after each draft then come from that one pass, "the target" for those positions.

Token trees (multi-draft and tree drafting) stay open in the model until the next step: it then
keeps the longest path of tree nodes whose tokens the committed sequence continues with. A node's
keys and values depend only on the tokens before it and its own token, so keeping any matching
path is exact, whichever node the verification accepted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specsample.adapters.protocol import LanguageModel
from specsample.rules.draft import Draft


@dataclass
class _Tree:
    """The open tree as the cursor's caller numbers it: per row, the model's node id, token and
    caller parent of each caller node (valid nodes only); the model's ids of the chain of
    committed-but-uncached tokens fed before the tree (the tail); and its tokens."""

    nodes: list[dict[int, tuple[int, int, int]]]
    tails: list[list[int]]
    tail_tokens: list[list[int]]
    columns: int  # model node ids used so far


# After a usual step a drafter's row lacks at most the last two committed tokens (the last kept
# draft, never fed to the draft model, and the bonus token); more means it skipped steps.
CATCH_UP_TAIL = 2


class ModelCursor:
    """lazy: prefill nothing until the first `feed`/`feed_tree`, which prefills every row's
    committed tokens as they are then (a drafter that the draft-length policy never asks to
    draft never prefills its prompts; one asked later catches up in one pass; a row that
    skipped drafting steps catches up on the tokens it missed in a pass of its own, timed as
    prefill)."""

    def __init__(self, model: LanguageModel, *, lazy: bool = False):
        self.model = model
        self.lazy = lazy
        self.cached: list[list[int]] = []  # per row: the tokens the model's cache holds
        # per row: the logits after every token its cache holds, while that is known (a
        # prompt pass's last position; see the module's docstring), else None
        self.ready: list[torch.Tensor | None] = []
        # tokens per row of the model pass the last feed/feed_tree ran (the most of any row; a
        # tree: 1 + its nodes); 0: it ran none (every active row was ready)
        self.fed_width = 0
        # tokens of that pass over all rows, and the rows it fed (a model whose passes cost by
        # their tokens, not their widest row, e.g. llama.cpp: `ragged_passes`)
        self.fed_tokens = 0
        self.fed_rows = 0
        self._tree: _Tree | None = None
        self._owns_rows = False  # False until this cursor reset the model's rows
        self._deferred = False  # lazy and not prefilled yet
        # eager cursors on a model with add_rows_last (PromptScoring) add rows that join at
        # the next feed, with their first drafts
        self._joins_with_drafts = not lazy and callable(getattr(model, "add_rows_last", None))
        self._unadded = 0  # rows that joined and are not in the model yet (the last ones)
        # whether the last feed ran a prompt pass that scored drafts (its time is prefill's)
        self.prompt_scored = False
        # time spent in deferred (lazy) prefills and in prompt passes run by feeds, in all
        self.prefill_seconds = 0.0

    @property
    def fed(self) -> bool:
        """Whether the last feed/feed_tree ran the model."""
        return self.fed_width > 0

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def ragged_passes(self) -> bool:
        """Whether the model's batch passes cost by the tokens of all rows rather than by the
        widest row times the rows (it feeds each row's own tokens, no padding)."""
        return bool(getattr(self.model, "ragged_passes", False))

    def start(self, prompts: list[list[int]]) -> None:
        """Prefills the prompts (lazy: at the first feed; on a PromptScoring model: at the
        first feed, with the drafts it feeds)."""
        self._tree = None
        self._owns_rows = True
        self._deferred = self.lazy
        self._unadded = 0
        if self.lazy:
            self.cached, self.ready = [], []
            return
        if self._joins_with_drafts and self._drop_all_rows():
            self.cached, self.ready = [], []
            self._join(prompts)
            return
        self._prefill(prompts)

    def _drop_all_rows(self) -> bool:
        """Drops the rows another user left in the model without a model pass; False where it
        cannot (a token tree is open: `prefill` resets that)."""
        if len(self.model.lengths) == 0:
            return True
        try:
            self.model.remove_rows(torch.zeros(0, dtype=torch.int64))
        except RuntimeError:
            return False
        return True

    def _join(self, prompts: list[list[int]]) -> None:
        """Rows for `prompts`, added to the model by the next feed."""
        self.cached.extend([] for _ in prompts)
        self.ready.extend(None for _ in prompts)
        self._unadded += len(prompts)

    def _add_unadded(self, sequences: list[list[int]], extra_rows: list[list[int]]) -> list:
        """Adds the rows that joined since the last feed to the model, each with its committed
        tokens and then its extra_rows tokens, in one prompt pass (timed as prefill). Returns
        per row of the batch None, or for a row added here its logits [1 + m, vocab]: [0]
        follows its last committed token, [j] its extra token j-1 (m: its extra tokens)."""
        out: list = [None] * len(sequences)
        if not self._unadded:
            return out
        first = len(sequences) - self._unadded
        new = range(first, len(sequences))
        rows = [list(sequences[b]) + extra_rows[b] for b in new]
        clock = time.perf_counter()
        if any(extra_rows[b] for b in new):
            last = 1 + max(len(extra_rows[b]) for b in new)
            logits = self.model.add_rows_last(rows, last)  # [rows, last, vocab]
            self.prompt_scored = True
            for r, b in enumerate(new):
                out[b] = logits[r, last - 1 - len(extra_rows[b]) :]
                self.cached[b] = rows[r]
        else:
            logits = self.model.add_rows(rows)  # [rows, vocab]
            for r, b in enumerate(new):
                out[b] = logits[r][None]
                self.cached[b], self.ready[b] = rows[r], logits[r]
        self.prefill_seconds += time.perf_counter() - clock
        self._unadded = 0
        return out

    def _flush(self, sequences: list[list[int]]) -> None:
        """Adds the rows that joined since the last feed with their committed tokens alone."""
        self._add_unadded(sequences, [[] for _ in sequences])

    def _prefill(self, prompts: list[list[int]]) -> None:
        logits = self.model.prefill(prompts)  # [batch, vocab]: after each prompt
        self.cached = [list(p) for p in prompts]
        self.ready = list(logits)

    def _catch_up(self, sequences: list[list[int]]) -> None:
        if self._deferred:
            self._deferred = False
            clock = time.perf_counter()
            self._prefill([list(seq) for seq in sequences])
            self.prefill_seconds += time.perf_counter() - clock

    def release(self) -> None:
        """A lazy cursor that drafting stopped using: drops every row from the model, and
        from now on rows that join are not prefilled; the next feed prefills every row's
        committed tokens afresh (as at the start). Nothing for an eager cursor, one not
        prefilled yet, or one with an open tree."""
        if not self.lazy or self._deferred or not self._owns_rows or self._tree is not None:
            return
        if self.cached:
            self.model.remove_rows(torch.zeros(0, dtype=torch.int64))
        self.cached, self.ready = [], []
        self._deferred = True

    def _catch_up_tails(self, sequences: list[list[int]], active: list[bool]) -> None:
        """A drafter's row that skipped steps (paused, or its batch drafted nothing) holds
        fewer tokens than it has committed; a usual step leaves it at most CATCH_UP_TAIL
        behind. The tokens beyond that, all but the last, are fed first in a pass of their
        own, without logits where the model can (`advance`), and timed as prefill: reading
        skipped tokens is not a draft pass, and its time would make the draft look costlier
        per pass than it is (the draft-length policy divides a step's draft time by its
        passes)."""
        rows = [
            seq[len(cached) : -1] if on and len(seq) - len(cached) > CATCH_UP_TAIL else []
            for seq, cached, on in zip(sequences, self.cached, active, strict=True)
        ]
        if not any(rows):
            return
        clock = time.perf_counter()
        feed = getattr(self.model, "advance", self.model.extend)  # the logits are not needed
        feed(*self._padded(rows))
        self.prefill_seconds += time.perf_counter() - clock

    def set_rows(
        self, sequences: list[list[int]], keep: torch.Tensor, prompts: list[list[int]]
    ) -> None:
        """Changes the batch between steps: closes an open tree (against `sequences`, every
        current row's committed tokens), keeps the rows `keep` (increasing indices; renumbered
        in order), then adds one row per prompt (prefilled now, or by the next feed on a model
        with add_rows_last). The first call resets the model (rows another user left in it are
        dropped)."""
        if not self._owns_rows:
            if prompts:
                self.start(prompts)
            return
        if self._deferred:  # the first feed prefills the rows as they are then
            return
        self._flush(sequences)
        if self._tree is not None:
            self._close_tree(sequences)
        keep_list = keep.tolist()
        if len(keep_list) < len(self.cached):
            self.model.remove_rows(keep.to(torch.int64))
            self.cached = [self.cached[i] for i in keep_list]
            self.ready = [self.ready[i] for i in keep_list]
        if prompts and self._joins_with_drafts:
            self._join(prompts)
        elif prompts:
            logits = self.model.add_rows(prompts)  # [len(prompts), vocab]
            self.cached.extend(list(p) for p in prompts)
            self.ready.extend(logits)

    def score(
        self,
        sequences: list[list[int]],
        active: list[bool],
        draft: Draft,
        min_width: int | None = None,
    ) -> torch.Tensor:
        """Scores every active row's pending tokens and its draft in one pass. Returns logits
        [batch, 1+n, vocab]: [b, 0] follows the last token of sequences[b], [b, 1+j] follows
        node j of the draft (arbitrary for invalid nodes and rows that are not active). A chain
        is fed as plain tokens; a tree stays open until the next call. min_width (chains): feed
        a pass over fewer tokens per row as one over this many, with filler (feed)."""
        if not draft.num_nodes:  # nothing drafted: the pending tokens alone
            return self.feed(sequences, active, None, None, min_width)
        if draft.is_chain:
            return self.feed(sequences, active, draft.tokens, draft.lengths, min_width)
        return self.feed_tree(sequences, active, draft.tokens, draft.parents, draft.valid)

    def feed(
        self,
        sequences: list[list[int]],
        active: list[bool],
        extra: torch.Tensor | None = None,
        extra_lengths: torch.Tensor | None = None,
        min_width: int | None = None,
    ) -> torch.Tensor:
        """Rolls each active row back to what it shares with its sequence, feeds the rest of the
        sequence (at least the pending token) and then the row's first extra_lengths[b] tokens of
        `extra` [batch, m], in one pass. min_width: a row that feeds fewer tokens gets filler
        after them (its last token again) up to that many; their logits are not returned and
        the next call rolls their cache entries back (where the sequence does not go on with
        the same token there, whose entry is then the one the sequence needs). Where a wider
        pass costs less (matrix kernels on CPUs), that is the cheaper way to feed.

        Returns logits [batch, 1+m, vocab]: [b, 0] follows the last token of sequences[b], [b, j]
        follows extra token j-1. Rows that are not active are left alone (their logits are
        arbitrary). A row holding its whole sequence with its ready logits feeds only its extra
        tokens; when no row has anything to feed the model does not run (`fed` says which)."""
        batch = len(sequences)
        width = 0 if extra is None else extra.shape[1]
        self._catch_up(sequences)
        lengths = [0] * batch if extra_lengths is None else extra_lengths.tolist()
        extra_rows = [
            extra[b, : lengths[b]].tolist() if (active[b] and width) else [] for b in range(batch)
        ]
        self.prompt_scored = False
        joined = self._add_unadded(sequences, extra_rows)  # rows that join: in a prompt pass
        active = [on and j is None for on, j in zip(active, joined, strict=True)]
        out = self._feed_rows(sequences, active, extra_rows, width, min_width)
        for b, row_logits in enumerate(joined):
            if row_logits is not None:
                out[b, : row_logits.shape[0]] = row_logits.to(out.device)
        return out

    def _feed_rows(
        self,
        sequences: list[list[int]],
        active: list[bool],
        extra_rows: list[list[int]],
        width: int,
        min_width: int | None = None,
    ) -> torch.Tensor:
        """`feed` for rows the model holds (rows that are not active are left alone)."""
        batch = len(sequences)
        self._roll_back(sequences, active)
        if self.lazy:
            self._catch_up_tails(sequences, active)
        tails = [
            seq[len(cached) :] if on else []
            for seq, cached, on in zip(sequences, self.cached, active, strict=True)
        ]
        rows = [tails[b] + extra_rows[b] if active[b] else [] for b in range(batch)]
        if min_width:
            rows = [row + row[-1:] * (min_width - len(row)) if row else row for row in rows]
        # [b, 0] of a row with no tail is its ready logits (active rows without a tail are
        # ready: _roll_back keeps a whole sequence only then); the rest follow the fed tokens
        ready = [self.ready[b] if (active[b] and not tails[b]) else None for b in range(batch)]
        self.fed_width = max(len(row) for row in rows)
        self.fed_tokens = sum(len(row) for row in rows)
        self.fed_rows = sum(1 for row in rows if row)
        if not self.fed:
            known = next((r for r in [*ready, *self.ready] if r is not None), None)
            if known is None:  # no row is active, or every active row just joined
                return torch.zeros(batch, 1 + width, self.vocab_size)
            return _put_ready(known.new_zeros(batch, 1 + width, known.shape[-1]), ready)
        for b, row in enumerate(rows):
            if row:  # the cache changes: its ready logits no longer follow it
                self.ready[b] = None
        logits = self._extend(rows)
        starts = [len(t) - 1 for t in tails]  # -1: no tail, [b, 0] is the ready row
        if min(starts) == 0 and max(starts) == 0 and logits.shape[1] == 1 + width:
            return logits  # already [batch, 1+m]
        positions = torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(1 + width)
        positions = positions.clamp(min=0, max=logits.shape[1] - 1).to(logits.device)
        out = logits.gather(1, positions[:, :, None].expand(-1, -1, logits.shape[2]))
        return _put_ready(out, ready)

    def append(self, tokens: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        """Feeds tokens [batch, n] (row b: its first num_valid[b]) after what each row holds.
        Returns logits [batch, n, vocab]."""
        rows = [row[:n] for row, n in zip(tokens.tolist(), num_valid.tolist(), strict=True)]
        return self._extend(rows)

    def feed_tree(
        self,
        sequences: list[list[int]],
        active: list[bool],
        tokens: torch.Tensor,
        parents: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """Like `feed`, but the new tokens form a tree scored in the same single pass: node j of
        row b (tokens [batch, n], valid [batch, n]) hangs under node parents[j] ([n]; -1: the
        last token of sequences[b]). The tree stays open until the next call.

        Returns logits [batch, 1+n, vocab]: [b, 0] follows the last token of sequences[b],
        [b, 1+j] follows node j (arbitrary for invalid nodes and rows that are not active)."""
        self._catch_up(sequences)
        self.prompt_scored = False
        self._flush(sequences)  # rows that join get a prompt pass of their own
        self._roll_back(sequences, active)
        self._hold_back_last(sequences, active)  # a tree hangs under a fed pending token
        batch, n = tokens.shape
        self.fed_width = 1 + int(valid.sum(dim=1).max()) if n else 1
        tails = [
            seq[len(cached) :] if on else []
            for seq, cached, on in zip(sequences, self.cached, active, strict=True)
        ]
        fed = [len(t) + int(valid[b].sum()) if len(t) else 0 for b, t in enumerate(tails)]
        self.fed_tokens, self.fed_rows = sum(fed), sum(1 for f in fed if f)
        width = max(len(t) for t in tails) + n
        model_tokens = torch.zeros(batch, width, dtype=torch.int64)
        model_parents = torch.full((batch, width), -1, dtype=torch.int64)
        model_valid = torch.zeros(batch, width, dtype=torch.bool)
        tree = _Tree([{} for _ in range(batch)], [], [], width)
        for b, tail in enumerate(tails):
            t = len(tail)
            tree.tails.append(list(range(t)))
            tree.tail_tokens.append(list(tail))
            if t == 0:
                continue
            model_tokens[b, :t] = torch.tensor(tail)
            model_parents[b, :t] = torch.arange(-1, t - 1)
            model_valid[b, :t] = True
            model_tokens[b, t : t + n] = tokens[b]
            model_parents[b, t : t + n] = torch.where(parents < 0, t - 1, parents + t)
            model_valid[b, t : t + n] = valid[b]
            for j in torch.nonzero(valid[b])[:, 0].tolist():
                tree.nodes[b][j] = (t + j, int(tokens[b, j]), int(parents[j]))
        logits = self.model.extend_tree(model_tokens, model_parents, model_valid)
        self._tree = tree
        starts = torch.tensor([max(len(t) - 1, 0) for t in tails], dtype=torch.int64)
        positions = (starts[:, None] + torch.arange(1 + n)[None, :]).to(logits.device)
        return logits.gather(1, positions[:, :, None].expand(-1, -1, logits.shape[2]))

    def grow_tree(
        self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor, first: int
    ) -> torch.Tensor:
        """Adds tree nodes first..first+n-1 (caller numbering; tokens/valid [batch, n], parents
        [n] in caller numbering, -1: the row's last cached token) after a `feed` that left no
        pending token, or to the tree grown so far. Returns logits [batch, n, vocab]."""
        batch, n = tokens.shape
        if self._tree is None:
            no_tail: list[list[int]] = [[] for _ in range(batch)]
            self._tree = _Tree([{} for _ in range(batch)], no_tail, [list(t) for t in no_tail], 0)
        tree = self._tree
        model_parents = torch.full((batch, n), -1, dtype=torch.int64)
        for b in range(batch):
            for j in range(n):
                parent = int(parents[j])
                if parent >= 0 and bool(valid[b, j]):
                    model_parents[b, j] = tree.nodes[b][parent][0]
        logits = self.model.extend_tree(tokens, model_parents, valid)
        for b in range(batch):
            for j in torch.nonzero(valid[b])[:, 0].tolist():
                tree.nodes[b][first + j] = (tree.columns + j, int(tokens[b, j]), int(parents[j]))
        tree.columns += n
        return logits

    def _close_tree(self, sequences: list[list[int]]) -> None:
        """Keeps, per row, the tail and then the longest chain of nodes the sequence continues
        with (never its last token: that one stays pending)."""
        tree, self._tree = self._tree, None
        paths = []
        for b, seq in enumerate(sequences):
            path = list(tree.tails[b])
            tokens = list(tree.tail_tokens[b])
            at, node = len(self.cached[b]) + len(tokens), -1
            children: dict[int, list[tuple[int, int, int]]] = {}
            for j, (model_id, token, parent) in sorted(tree.nodes[b].items()):
                children.setdefault(parent, []).append((j, model_id, token))
            while at < len(seq) - 1:
                match = next((c for c in children.get(node, []) if c[2] == seq[at]), None)
                if match is None:
                    break
                node = match[0]
                path.append(match[1])
                tokens.append(match[2])
                at += 1
            paths.append(path)
            self.cached[b].extend(tokens)
            if tokens:
                self.ready[b] = None
        depth = max(1, max(len(p) for p in paths))
        padded = [p + [-1] * (depth - len(p)) for p in paths]
        self.model.commit_path(torch.tensor(padded, dtype=torch.int64))

    def _roll_back(self, sequences: list[list[int]], active: list[bool]) -> None:
        if self._tree is not None:
            self._close_tree(sequences)
        keep = []
        for b, (seq, cached, on) in enumerate(zip(sequences, self.cached, active, strict=True)):
            if not on:  # left alone: its cache may run past its sequence (drafts after an EOS)
                keep.append(len(cached))
                continue
            whole = self.ready[b] is not None  # it may keep its whole sequence
            limit = min(len(cached), len(seq) - (0 if whole else 1))
            if cached[:limit] == seq[:limit]:  # the usual case, compared at C speed
                keep.append(limit)
                continue
            shared = 0
            while shared < limit and cached[shared] == seq[shared]:
                shared += 1
            keep.append(shared)
        self._truncate(keep)

    def _truncate(self, keep: list[int]) -> None:
        """Cuts row b's cache to its first keep[b] tokens (a row cut loses its ready logits)."""
        if any(k < len(c) for k, c in zip(keep, self.cached, strict=True)):
            self.model.truncate(torch.tensor(keep, dtype=torch.int64))
            for b, (k, c) in enumerate(zip(keep, self.cached, strict=True)):
                if k < len(c):
                    self.ready[b] = None
            self.cached = [c[:k] for c, k in zip(self.cached, keep, strict=True)]

    def _hold_back_last(self, sequences: list[list[int]], active: list[bool]) -> None:
        """Active rows holding their whole sequence (ready rows without a tail) give their last
        token back to be fed again as the pending token."""
        keep = [
            len(c) - 1 if (on and r is not None and len(c) == len(seq)) else len(c)
            for c, r, seq, on in zip(self.cached, self.ready, sequences, active, strict=True)
        ]
        self._truncate(keep)

    def _extend(self, rows: list[list[int]]) -> torch.Tensor:
        return self.model.extend(*self._padded(rows))

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's new tokens as the model takes them (tokens [batch, width], num_valid
        [batch]), now counted as cached."""
        width = max(1, max(len(r) for r in rows))
        # one tensor from padded lists (a tensor per row costs more than the copy)
        tokens = torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.int64)
        for b, row in enumerate(rows):
            self.cached[b].extend(row)
            if row:
                self.ready[b] = None
        num_valid = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        return tokens, num_valid


def _put_ready(out: torch.Tensor, ready: list[torch.Tensor | None]) -> torch.Tensor:
    """out [batch, 1+m, vocab] with row b's ready logits at column 0 where ready[b] is given."""
    for b, row_logits in enumerate(ready):
        if row_logits is not None:
            out[b, 0] = row_logits
    return out
