"""The `LanguageModel` protocol the decoding loop talks to, plus shared argument checks.

Every framework quirk (KV caches, attention masks, padded vocabularies) hides behind this
interface. A model holds a batch of token sequences ("rows") of possibly different lengths;
shapes below are named batch, seq (or n) and vocab.

The check helpers live here so that every adapter rejects bad arguments with the same
`TypeError` / `ValueError` messages.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "LanguageModel",
    "TreeLanguageModel",
    "check_commit_path_args",
    "check_extend_args",
    "check_extend_rows",
    "check_extend_tree_args",
    "check_prompts",
    "check_remove_rows_args",
    "check_truncate_args",
]


@runtime_checkable
class LanguageModel(Protocol):
    """A stateful batch of autoregressive sequences that returns next-token logits.

    Row b of the batch is a token sequence of length `lengths[b]` (prompt included).
    Logits at a position are for the token *following* that position.
    """

    #: Number of logit columns returned (may be smaller than the model's raw head).
    vocab_size: int

    @property
    def lengths(self) -> torch.Tensor:
        """Current number of tokens per row, int64 `[batch]` (a copy)."""
        ...

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Reset the state to `prompts` (non-empty, lengths may differ).

        Returns float logits `[batch, vocab]` for the token after each prompt.
        """
        ...

    def extend(self, tokens: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        """Append the first `num_valid[b]` tokens of row b of `tokens` (int64 `[batch, n]`).

        Tokens past `num_valid[b]` are padding: ignored and not kept. Returns float logits
        `[batch, n, vocab]`; `[b, j]` is the distribution after row b's new token j for
        `j < num_valid[b]`, and arbitrary (but finite) for padded positions.
        """
        ...

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep only the first `lengths[b]` tokens of row b (int64 `[batch]`, prompt included).

        Requires `0 <= lengths[b] <= self.lengths[b]`; used to roll back rejected drafts.
        """
        ...

    def add_rows(self, prompts: list[list[int]]) -> torch.Tensor:
        """Append one new row per prompt after the existing rows (continuous batching: requests
        join between steps). Works with no rows yet; `prefill` is a reset followed by this.

        Returns float logits `[len(prompts), vocab]` for the token after each new prompt. The
        existing rows are unchanged, and a row's logits never depend on the other rows.
        """
        ...

    def remove_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (int64 `[m]`, increasing indices into the current batch; may
        be empty): they become rows 0..m-1, in order, and the others are freed. Refused while a
        token tree is open."""
        ...


@runtime_checkable
class TreeLanguageModel(LanguageModel, Protocol):
    """A `LanguageModel` that can also score a token tree in one pass (multi-draft and tree
    verification) and then keep one root-to-node path of it.

    While a tree is open, `lengths` excludes its nodes and `extend`/`truncate` are refused:
    `commit_path` closes it.
    """

    def extend_tree(
        self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Add tree nodes after each row's tokens (opening a tree if none is open).

        Node ids number the columns of every `extend_tree` call since the tree opened: the
        first call's columns are ids 0..n-1, the next call's continue from there.
        tokens  int64 `[batch, n]`: the node tokens.
        parents int64 `[batch, n]`: `parents[b, j]` is -1 (the row's last token) or the id of a
                valid node added before node j.
        valid   bool `[batch, n]`: nodes that exist; invalid columns are ignored.

        Returns float logits `[batch, n, vocab]`: `[b, j]` is the distribution after the path
        from the row's last token to node j (arbitrary but finite for invalid nodes).
        """
        ...

    def commit_path(self, path: torch.Tensor) -> None:
        """Close the open tree keeping, per row, the nodes `path[b]` (int64 `[batch, d]`, node
        ids padded with -1): a chain from a child of the root downwards, appended to the row.
        Every other node is dropped."""
        ...


@runtime_checkable
class PromptScoring(Protocol):
    """A model that can score the last tokens of new prompts in their prompt pass. The cursor
    uses it to feed a request's prompt and its first drafts in one pass instead of two (a
    prompt pass, then a pass over the drafts); a model without it gets the two."""

    def add_rows_last(self, prompts: list[list[int]], last: int) -> torch.Tensor:
        """`add_rows`, returning float logits `[len(prompts), last, vocab]` after each of each
        prompt's last `last` tokens: `[r, last - 1]` follows the last token of prompts[r],
        `[r, last - 1 - j]` follows the token j places before it (arbitrary but finite where a
        prompt is shorter than that)."""
        ...


def check_last(last: object) -> int:
    """Validate `add_rows_last`'s `last`: an int >= 1."""
    value = _as_int(last, "last")
    if value < 1:
        raise ValueError(f"last: expected an int >= 1, got {value}")
    return value


def _as_int(value: object, what: str) -> int:
    """`operator.index(value)` with a TypeError that names the offending argument."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what}: expected an int, got {type(value).__name__}") from None


def check_prompts(prompts: Sequence[Sequence[int]], vocab_limit: int) -> list[list[int]]:
    """Validate `prompts` for `prefill`; returns them as a fresh `list[list[int]]`.

    Every prompt must be non-empty (there is nothing to condition on otherwise) and hold
    token ids in `[0, vocab_limit)`.
    """
    if isinstance(prompts, (str, bytes, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    out: list[list[int]] = []
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise TypeError(
                f"prompts[{b}]: expected a list of token ids, got {type(prompt).__name__}"
            )
        if len(prompt) == 0:
            raise ValueError(f"prompts[{b}]: expected at least one token, got an empty prompt")
        row = [_as_int(t, f"prompts[{b}][{j}]") for j, t in enumerate(prompt)]
        bad = [t for t in row if not 0 <= t < vocab_limit]
        if bad:
            raise ValueError(
                f"prompts[{b}]: expected token ids in [0, {vocab_limit}), got {bad[:5]}"
            )
        out.append(row)
    return out


def _check_int_tensor(x: object, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{what}: expected an integer tensor (int64), got dtype {x.dtype}")
    return x


def _check_extend_shapes(
    tokens: object, num_valid: object, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The type and shape checks of `check_extend_args` and `check_extend_rows`."""
    tokens = _check_int_tensor(tokens, "tokens")
    num_valid = _check_int_tensor(num_valid, "num_valid")
    if tokens.dim() != 2 or tokens.shape[0] != batch:
        raise ValueError(f"tokens: expected shape (batch={batch}, n), got {tuple(tokens.shape)}")
    if tuple(num_valid.shape) != (batch,):
        raise ValueError(
            f"num_valid: expected shape ({batch},) (one count per row), "
            f"got {tuple(num_valid.shape)}"
        )
    return tokens, num_valid


def check_extend_args(
    tokens: object, num_valid: object, batch: int, vocab_limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate `extend` arguments; returns `(tokens, num_valid)` as int64 on their device.

    tokens: `[batch, n]`; num_valid: `[batch]` with `0 <= num_valid[b] <= n`; the valid
    tokens (not the padding) must lie in `[0, vocab_limit)`.
    """
    tokens, num_valid = _check_extend_shapes(tokens, num_valid, batch)
    n = tokens.shape[1]
    tokens = tokens.long()
    num_valid = num_valid.to(device=tokens.device, dtype=torch.long)
    bad_rows = ((num_valid < 0) | (num_valid > n)).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(
            f"num_valid: expected 0 <= num_valid[b] <= n={n}, got {num_valid.tolist()} "
            f"(bad rows {bad_rows})"
        )
    valid = torch.arange(n, device=tokens.device) < num_valid[:, None]
    out_of_range = valid & ((tokens < 0) | (tokens >= vocab_limit))
    if out_of_range.any():
        raise ValueError(
            f"tokens: expected valid token ids in [0, {vocab_limit}), "
            f"got {tokens[out_of_range][:5].tolist()}"
        )
    return tokens, num_valid


def check_extend_rows(
    tokens: object, num_valid: object, batch: int, vocab_limit: int
) -> tuple[list[list[int]], list[int]]:
    """`check_extend_args` for a model that feeds Python lists: the same checks and messages,
    done on the tensors' values as lists (a dozen small tensor operations cost a model that
    runs a pass in a few milliseconds more than the comparisons). Returns each row's valid
    tokens and the counts."""
    tokens, num_valid = _check_extend_shapes(tokens, num_valid, batch)
    n = tokens.shape[1]
    counts = num_valid.tolist()
    bad_rows = [b for b, k in enumerate(counts) if not 0 <= k <= n]
    if bad_rows:
        raise ValueError(
            f"num_valid: expected 0 <= num_valid[b] <= n={n}, got {counts} (bad rows {bad_rows})"
        )
    rows = [row[:k] for row, k in zip(tokens.tolist(), counts, strict=True)]
    bad = [t for row in rows for t in row if not 0 <= t < vocab_limit]
    if bad:
        raise ValueError(f"tokens: expected valid token ids in [0, {vocab_limit}), got {bad[:5]}")
    return rows, counts


def check_truncate_args(lengths: object, current: torch.Tensor) -> torch.Tensor:
    """Validate `truncate` arguments; returns `lengths` as int64 on `current`'s device.

    lengths: `[batch]` with `0 <= lengths[b] <= current[b]`.
    """
    lengths = _check_int_tensor(lengths, "lengths")
    if tuple(lengths.shape) != tuple(current.shape):
        raise ValueError(
            f"lengths: expected shape {tuple(current.shape)} (one length per row), "
            f"got {tuple(lengths.shape)}"
        )
    lengths = lengths.to(device=current.device, dtype=torch.long)
    bad_rows = ((lengths < 0) | (lengths > current)).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(
            f"lengths: expected 0 <= lengths[b] <= current length {current.tolist()}, "
            f"got {lengths.tolist()} (bad rows {bad_rows})"
        )
    return lengths


def check_extend_tree_args(
    tokens: object,
    parents: object,
    valid: object,
    batch: int,
    vocab_limit: int,
    open_valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate `extend_tree` arguments; returns `(tokens, parents, valid)` (int64, int64, bool).

    open_valid: bool `[batch, N]`, the nodes the open tree already has (N = 0 when none is
    open); a parent must be -1 or a valid node with a smaller id.
    """
    tokens = _check_int_tensor(tokens, "tokens")
    parents = _check_int_tensor(parents, "parents")
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid: expected a bool tensor, got {_describe(valid)}")
    if tokens.dim() != 2 or tokens.shape[0] != batch:
        raise ValueError(f"tokens: expected shape (batch={batch}, n), got {tuple(tokens.shape)}")
    for name, x in (("parents", parents), ("valid", valid)):
        if tuple(x.shape) != tuple(tokens.shape):
            raise ValueError(
                f"{name}: expected the shape of tokens {tuple(tokens.shape)}, got {tuple(x.shape)}"
            )
    device = tokens.device
    tokens, parents, valid = tokens.long(), parents.to(device).long(), valid.to(device)
    n, before = tokens.shape[1], open_valid.shape[1]
    ids = before + torch.arange(n, device=device)[None, :]
    bad = valid & ((parents < -1) | (parents >= ids))
    if bad.any():
        got = parents[bad][:5].tolist()
        nodes = ids.expand_as(bad)[bad][:5].tolist()
        raise ValueError(
            "parents: expected -1 or the id of an earlier node (node ids continue across the "
            f"calls of one tree), got {got} for node ids {nodes}"
        )
    known = torch.cat([open_valid.to(device), valid], dim=1)  # [batch, before + n]
    parent_valid = known.gather(1, parents.clamp(min=0)) | (parents == -1)
    bad = valid & ~parent_valid
    if bad.any():
        raise ValueError(
            f"parents: expected valid parent nodes, got invalid parents {parents[bad][:5].tolist()}"
        )
    out_of_range = valid & ((tokens < 0) | (tokens >= vocab_limit))
    if out_of_range.any():
        raise ValueError(
            f"tokens: expected valid token ids in [0, {vocab_limit}), "
            f"got {tokens[out_of_range][:5].tolist()}"
        )
    return tokens, parents, valid


def check_commit_path_args(
    path: object, tree_parents: torch.Tensor, tree_valid: torch.Tensor
) -> torch.Tensor:
    """Validate `commit_path`; returns `path` as int64. tree_parents/tree_valid `[batch, N]`
    describe the open tree. Each row's path must be -1 padded at the end and form a chain from
    a child of the root downwards through valid nodes."""
    path = _check_int_tensor(path, "path")
    batch, total = tree_valid.shape
    if path.dim() != 2 or path.shape[0] != batch:
        raise ValueError(f"path: expected shape (batch={batch}, d), got {tuple(path.shape)}")
    path = path.to(tree_valid.device).long()
    for b, row in enumerate(path.tolist()):
        previous = -1
        for i, node in enumerate(row):
            if node == -1:
                if any(x != -1 for x in row[i:]):
                    raise ValueError(f"path[{b}]: expected -1 only as trailing padding, got {row}")
                break
            if not 0 <= node < total or not bool(tree_valid[b, node]):
                raise ValueError(f"path[{b}]: expected ids of valid nodes, got {node} in {row}")
            if int(tree_parents[b, node]) != previous:
                raise ValueError(
                    f"path[{b}]: expected a chain from a child of the root (each node the "
                    f"child of the one before), got {row}"
                )
            previous = node
    return path


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of dtype {x.dtype}"
    return type(x).__name__


def check_remove_rows_args(keep: object, batch: int) -> torch.Tensor:
    """Validate `remove_rows`; returns `keep` as int64 on the CPU: `[m]`, strictly increasing
    indices in `[0, batch)`."""
    keep = _check_int_tensor(keep, "keep")
    if keep.dim() != 1:
        raise ValueError(
            f"keep: expected a 1-D tensor of row indices, got shape {tuple(keep.shape)}"
        )
    keep = keep.cpu().long()
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= batch):
        raise ValueError(f"keep: expected row indices in [0, {batch}), got {keep.tolist()}")
    if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
        raise ValueError(f"keep: expected strictly increasing row indices, got {keep.tolist()}")
    return keep
