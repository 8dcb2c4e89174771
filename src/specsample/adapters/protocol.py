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
    "check_extend_args",
    "check_prompts",
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


def check_extend_args(
    tokens: object, num_valid: object, batch: int, vocab_limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate `extend` arguments; returns `(tokens, num_valid)` as int64 on their device.

    tokens: `[batch, n]`; num_valid: `[batch]` with `0 <= num_valid[b] <= n`; the valid
    tokens (not the padding) must lie in `[0, vocab_limit)`.
    """
    tokens = _check_int_tensor(tokens, "tokens")
    num_valid = _check_int_tensor(num_valid, "num_valid")
    if tokens.dim() != 2 or tokens.shape[0] != batch:
        raise ValueError(f"tokens: expected shape (batch={batch}, n), got {tuple(tokens.shape)}")
    n = tokens.shape[1]
    if tuple(num_valid.shape) != (batch,):
        raise ValueError(
            f"num_valid: expected shape ({batch},) (one count per row), "
            f"got {tuple(num_valid.shape)}"
        )
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
