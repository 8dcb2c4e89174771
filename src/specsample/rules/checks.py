"""Boundary checks for `specsample.verify`: every error names the argument, what was expected and
what arrived. Internal code after these checks only asserts."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# How far a probability row's sum may be from 1, by dtype. The sum is taken in float64, so this only
# has to absorb the rounding of each stored probability (about 2^-8 relative in bfloat16).
SUM_TOLERANCE = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def check_generator(generator: object, device: torch.device) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: expected a torch.Generator (e.g. torch.Generator(device={str(device)!r})"
            f".manual_seed(0)), got {type(generator).__name__}; "
            "specsample never uses the global RNG"
        )
    if torch.device(generator.device).type != device.type:
        raise ValueError(
            f"generator: expected a generator on the tensors' device {device.type!r}, "
            f"got one on {generator.device.type!r}"
        )


def check_probs(name: str, probs: object, rank_shape: str) -> torch.Tensor:
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor {rank_shape}, got {type(probs).__name__}")
    if probs.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected float64, float32, float16 or bfloat16, got {probs.dtype}"
        )
    if probs.dim() != 3:
        raise ValueError(
            f"{name}: expected 3 dimensions {rank_shape}, got shape {tuple(probs.shape)}"
        )
    return probs


def check_draft_tokens(draft_tokens: object) -> torch.Tensor:
    if not isinstance(draft_tokens, torch.Tensor):
        raise TypeError(
            f"draft_tokens: expected an int64 tensor [batch, k], got {type(draft_tokens).__name__}"
        )
    if (
        draft_tokens.dtype.is_floating_point
        or draft_tokens.dtype.is_complex
        or (draft_tokens.dtype == torch.bool)
    ):
        raise TypeError(f"draft_tokens: expected an integer tensor, got {draft_tokens.dtype}")
    if draft_tokens.dim() != 2:
        raise ValueError(
            f"draft_tokens: expected 2 dimensions [batch, k], got shape {tuple(draft_tokens.shape)}"
        )
    return draft_tokens.long()


def check_shapes(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    *,
    length: str = "k",
    last_row: str = "row k is the bonus token's distribution",
) -> None:
    """Shapes [batch, L], [batch, L, vocab] or None, [batch, L+1, vocab]; L is named `length`
    ("k" for a chain, "n" for a tree's nodes) and `last_row` explains target_probs' extra row."""
    batch, size = draft_tokens.shape
    if tuple(target_probs.shape[:2]) != (batch, size + 1) or target_probs.dim() != 3:
        raise ValueError(
            f"target_probs: expected shape [batch={batch}, {length}+1={size + 1}, vocab] to match "
            f"draft_tokens {tuple(draft_tokens.shape)}, got {tuple(target_probs.shape)} "
            f"({last_row})"
        )
    if target_probs.shape[2] < 1:
        raise ValueError("target_probs: expected a vocabulary of at least 1 token, got 0")
    if draft_probs is None:
        return
    if tuple(draft_probs.shape[:2]) != (batch, size):
        raise ValueError(
            f"draft_probs: expected shape [batch={batch}, {length}={size}, vocab] to match "
            f"draft_tokens {tuple(draft_tokens.shape)}, got {tuple(draft_probs.shape)}"
        )
    if draft_probs.shape[2] != target_probs.shape[2]:
        raise ValueError(
            f"draft_probs: expected the same vocab size as target_probs "
            f"({target_probs.shape[2]}), got {draft_probs.shape[2]}; pad the smaller one with "
            f"zero-probability columns"
        )


def check_devices(*tensors: object, names: str | None = None) -> None:
    """All tensors on one device; `names` lists the arguments for the message (default: the
    chain rules' four)."""
    # Not-a-tensor arguments (a list for draft_lengths) get their own TypeError later.
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        found = ", ".join(sorted(str(d) for d in devices))
        names = names or "draft_tokens, draft_probs, target_probs, draft_lengths"
        raise ValueError(f"{names}: expected one device, got {found}")


def check_draft_lengths(draft_lengths: object, batch: int, k: int, device) -> torch.Tensor:
    if draft_lengths is None:
        return torch.full((batch,), k, dtype=torch.int64, device=device)
    if not isinstance(draft_lengths, torch.Tensor) or draft_lengths.dtype.is_floating_point:
        raise TypeError(
            f"draft_lengths: expected None or an int64 tensor [batch={batch}], got "
            f"{getattr(draft_lengths, 'dtype', type(draft_lengths).__name__)}"
        )
    if tuple(draft_lengths.shape) != (batch,):
        raise ValueError(
            f"draft_lengths: expected shape [batch={batch}], got {tuple(draft_lengths.shape)}"
        )
    if batch and (int(draft_lengths.min()) < 0 or int(draft_lengths.max()) > k):
        raise ValueError(
            f"draft_lengths: expected values in [0, k={k}], got min {int(draft_lengths.min())} "
            f"and max {int(draft_lengths.max())}"
        )
    return draft_lengths.long()


def positions_below(limit: torch.Tensor, width: int) -> torch.Tensor:
    """bool [batch, width]: True at positions i < limit[b]."""
    return torch.arange(width, device=limit.device)[None, :] < limit[:, None]


def check_token_range(draft_tokens: torch.Tensor, in_draft: torch.Tensor, vocab: int) -> None:
    used = draft_tokens[in_draft]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= vocab):
        raise ValueError(
            f"draft_tokens: expected ids in [0, vocab={vocab}), got min {int(used.min())} and "
            f"max {int(used.max())}"
        )


def check_distribution_values(name: str, probs: torch.Tensor, used: torch.Tensor) -> None:
    """probs [batch, n, vocab]; used bool [batch, n]: the rows the rule may read."""
    # float32 sums for float32 and narrower inputs (their rounding error, ~1e-6 for 151936 terms,
    # is far inside the tolerance; a float64 sum would copy the whole tensor first).
    sum_dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    sums = probs.sum(dim=-1, dtype=sum_dtype)[used]
    lowest = probs.amin(dim=-1)[used]
    if sums.numel() == 0:
        return
    if not bool(torch.isfinite(sums).all()):
        raise ValueError(f"{name}: expected finite probabilities, got NaN or inf")
    if float(lowest.min()) < 0:
        raise ValueError(
            f"{name}: expected non-negative probabilities, got a minimum of {float(lowest.min())}"
        )
    tolerance = SUM_TOLERANCE[probs.dtype]
    worst = float((sums - 1.0).abs().max())
    if worst > tolerance:
        raise ValueError(
            f"{name}: expected every row to sum to 1 (within {tolerance:g} for {probs.dtype}), "
            f"got a row off by {worst:.3g}; pass probabilities (softmax of logits), not logits"
        )


def check_drafted_tokens_possible(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor, in_draft: torch.Tensor
) -> None:
    drafted_q = draft_probs.gather(2, draft_tokens[:, :, None])[:, :, 0]
    impossible = (drafted_q <= 0) & in_draft
    if bool(impossible.any()):
        b, i = (int(v) for v in torch.nonzero(impossible)[0])
        raise ValueError(
            f"draft_probs: the drafted token draft_tokens[{b}, {i}] = {int(draft_tokens[b, i])} "
            "has "
            f"draft probability 0, so it cannot have been drafted from draft_probs; pass the "
            f"distribution the drafts were sampled from (or None for point-mass drafts)"
        )
