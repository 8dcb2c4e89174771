"""Drawing the children of one tree node from the drafter's distribution q.

The tree rule (`specsample.rules.tree`) needs, for every child, the distribution it was actually
drawn from given its earlier siblings; `draw_children` returns exactly that:

- "iid": m independent draws from q; every child's distribution is q (duplicates possible).
- "without_replacement": child j from q with children 0..j-1 removed and renormalised; that
  renormalised row is child j's distribution. When no mass is left (q has fewer than m tokens
  of positive probability) child j and the later ones are invalid.
- "top": the m most probable tokens (ties: lowest id), no randomness; the distributions are None
  (each child is a point mass). Tokens with q = 0 are invalid.
"""

from __future__ import annotations

import torch

from specsample.rules.sampling import sample_from_weights

MODES = ("iid", "without_replacement", "top")


def draw_children(
    q: torch.Tensor, m: int, mode: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Draws m children per row of q.

    q          float [batch, vocab]: the drafter's distribution at the parent node (a row may be
               all zero: it gets no valid children).
    m          children per row, >= 1.
    mode       "iid", "without_replacement" or "top" (see the module docstring).
    generator  the only source of randomness: float64 uniforms [batch, m] on q's device ("top"
               draws none).

    Returns (tokens int64 [batch, m], child_probs float [batch, m, vocab] or None for "top",
    valid bool [batch, m]). Invalid children have token 0 and an all-zero distribution. For
    "iid", child_probs is a broadcast view of q (do not write to it); for
    "without_replacement" it is computed in float32 or wider.
    """
    _check_arguments(q, m, mode, generator)
    if mode == "top":
        return _top_children(q, m)
    uniforms = torch.rand(q.shape[0], m, generator=generator, dtype=torch.float64, device=q.device)
    if mode == "iid":
        return _iid_children(q, m, uniforms)
    return _children_without_replacement(q, m, uniforms)


def _iid_children(
    q: torch.Tensor, m: int, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    has_mass = q.sum(dim=-1, dtype=torch.float64) > 0  # [batch]
    safe = _with_mass(q, has_mass)
    tokens = torch.stack([sample_from_weights(safe, uniforms[:, j]) for j in range(m)], dim=1)
    valid = has_mass[:, None].expand(-1, m).clone()
    tokens = torch.where(valid, tokens, 0)
    child_probs = torch.where(has_mass[:, None], q, 0.0)[:, None, :].expand(-1, m, -1)
    return tokens, child_probs, valid


def _children_without_replacement(
    q: torch.Tensor, m: int, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, vocab = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    remaining = q.to(dtype, copy=True)  # q without the children drawn so far
    tokens = torch.zeros(batch, m, dtype=torch.int64, device=q.device)
    child_probs = torch.zeros(batch, m, vocab, dtype=dtype, device=q.device)
    valid = torch.zeros(batch, m, dtype=torch.bool, device=q.device)
    for j in range(m):
        mass = remaining.sum(dim=-1, dtype=torch.float64)  # [batch]
        has_mass = mass > 0
        renormalised = remaining / torch.where(has_mass, mass, 1.0)[:, None].to(dtype)
        token = sample_from_weights(_with_mass(renormalised, has_mass), uniforms[:, j])
        token = torch.where(has_mass, token, 0)
        tokens[:, j] = token
        child_probs[:, j] = renormalised  # all zero where no mass is left
        valid[:, j] = has_mass
        remaining.scatter_(1, token[:, None], 0.0)
    return tokens, child_probs, valid


def _top_children(q: torch.Tensor, m: int) -> tuple[torch.Tensor, None, torch.Tensor]:
    batch, vocab = q.shape
    # A stable descending sort keeps the lowest id first among equal probabilities.
    order = torch.sort(q, dim=-1, descending=True, stable=True).indices[:, :m]  # [batch, <=m]
    tokens = torch.zeros(batch, m, dtype=torch.int64, device=q.device)
    tokens[:, : order.shape[1]] = order
    valid = torch.zeros(batch, m, dtype=torch.bool, device=q.device)
    valid[:, : order.shape[1]] = q.gather(1, order) > 0
    return torch.where(valid, tokens, 0), None, valid


def _with_mass(weights: torch.Tensor, has_mass: torch.Tensor) -> torch.Tensor:
    """weights with every massless row replaced by ones, so the sampler always has something to
    draw (those draws are marked invalid)."""
    if bool(has_mass.all()):
        return weights
    return torch.where(has_mass[:, None], weights, torch.ones_like(weights))


def _check_arguments(q: object, m: object, mode: object, generator: object) -> None:
    if not isinstance(q, torch.Tensor) or not q.dtype.is_floating_point:
        got = getattr(q, "dtype", type(q).__name__)
        raise TypeError(f"q: expected a float tensor [batch, vocab], got {got}")
    if q.dim() != 2 or q.shape[1] < 1:
        raise ValueError(f"q: expected shape [batch, vocab] with vocab >= 1, got {tuple(q.shape)}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m: expected a positive number of children, got {m!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: expected a torch.Generator, got {type(generator).__name__}; "
            "specsample never uses the global RNG"
        )
