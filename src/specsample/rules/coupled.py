"""The coupled rule: drafter-invariant speculative sampling with shared Gumbel noise.

Every new token of a request has its own Gumbel noise g (one value per vocabulary id), a fixed
function of (the request's seed, the token's position among the request's new tokens, the id)
alone: a counter-based hash, never a shared random stream. So the noise of a position is the
same whichever step, batch row or draft length reaches it.

The target's token at a position is y = argmax(log p + g) over the warped target probabilities
p (Gumbel-max: an exact sample from p; log 0 = -inf; ties go to the lowest id). A drafter with
distribution q drafts x = argmax(log q + g) with the same noise. Verification walks the draft
from the root: a child is kept when its token is the target's y at that node; at the first node
with no such child, y is emitted. Every emitted token is therefore the target's own Gumbel-max
sample, and the text equals target-only decoding with the same seed token for token, whatever
the drafter, draft length or batch.

A draft token is kept with probability sum_i 1 / sum_j max(p_j / p_i, q_j / q_i) (sum over ids
with p_i, q_i > 0), which is at least (1 - TV(p, q)) / (1 + TV(p, q)); see
`coupled_keep_probability`.

The hash: splitmix64. key(seed, position) is the splitmix64 output number position + 1 of the
stream started at mix(seed + GOLDEN); the bits of id v are output number v + 1 of the stream
started at that key. The top 53 bits give u in (0, 1) and g = -log(-log u).
"""

from __future__ import annotations

import torch

from specsample.rules.tree import TreeResult, greedy_tree_rule, node_depths

_WORD = 1 << 64
GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# Rows of [*, vocab] scored at once, so no temporary grows past about 2**22 entries.
_CHUNK_ENTRIES = 1 << 22


def _signed(word: int) -> int:
    """A 64-bit word as the int64 with the same bits."""
    word %= _WORD
    return word - _WORD if word >= 1 << 63 else word


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 words (a bijection of 64-bit words; products wrap)."""
    return _mix64_(x.clone())


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    """mix64 in place (the noise tensors are large: no temporaries but one)."""
    shifted = torch.empty_like(x)
    for bits, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(x, bits, out=shifted)
        x.bitwise_xor_(shifted.bitwise_and_((1 << (64 - bits)) - 1))
        if multiplier is not None:
            x.mul_(_signed(multiplier))
    return x


def as_seed_tensor(seeds, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeds (ints in [0, 2**64) or an int64 tensor) -> int64 [batch] with the same bits."""
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype != torch.int64 or seeds.dim() != 1:
            raise TypeError(
                f"seeds: expected an int64 tensor [batch], got {seeds.dtype} {tuple(seeds.shape)}"
            )
        return seeds.to(device)
    words = []
    for b, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _WORD:
            raise ValueError(f"seeds[{b}]: expected an integer in [0, 2**64), got {seed!r}")
        words.append(_signed(seed))
    return torch.tensor(words, dtype=torch.int64, device=device)


def position_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 [batch, n]: the hash key of (seeds[b], positions[b, i])."""
    stream = mix64(seeds + _signed(GOLDEN))[:, None]  # [batch, 1]
    return mix64(stream + (positions + 1) * _signed(GOLDEN))


def uniform_noise(seeds, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """float64 [batch, n, vocab]: u in (0, 1), a function of (seed, position, id) alone."""
    seeds, positions = _check_keys(seeds, positions, vocab)
    keys = position_keys(seeds, positions)[:, :, None]  # [batch, n, 1]
    ids = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device)
    bits = _mix64_(keys + ids * _signed(GOLDEN))
    bits.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1)  # the top 53 bits
    return bits.to(torch.float64).add_(0.5).mul_(2.0**-53)


def gumbel_noise(seeds, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """float64 [batch, n, vocab]: standard Gumbel noise g = -log(-log u) for every
    (seeds[b], positions[b, i], id); positions count a request's new tokens from 0."""
    return uniform_noise(seeds, positions, vocab).log_().neg_().log_().neg_()


def coupled_scores(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """float64 [..., vocab]: log(probs) + noise, -inf where probs is 0."""
    return torch.log(probs.to(torch.float64)) + noise.to(probs.device)


def coupled_sample(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """int64 [...]: argmax of log(probs) + noise over the last dimension, the lowest id on ties.
    probs and noise float [..., vocab] (noise may broadcast)."""
    return coupled_scores(probs, noise).argmax(dim=-1)


def coupled_top(
    probs: torch.Tensor, noise: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The m best ids by log(probs) + noise (the first is `coupled_sample`): tokens int64
    [..., m] and valid bool [..., m] (False for ids of probability 0, and past the vocabulary)."""
    scores = coupled_scores(probs, noise)
    top = torch.topk(scores, min(m, scores.shape[-1]), dim=-1)
    tokens, valid = top.indices, top.values > float("-inf")
    missing = m - tokens.shape[-1]
    if missing:
        tokens = torch.nn.functional.pad(tokens, (0, missing))
        valid = torch.nn.functional.pad(valid, (0, missing))
    tokens[..., 0] = scores.argmax(dim=-1)  # the lowest id on ties, as coupled_sample
    return torch.where(valid, tokens, 0), valid


def coupled_rule(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    node_valid: torch.Tensor,
    noise: torch.Tensor,
) -> TreeResult:
    """Verifies one draft tree per row (a chain is a tree with one child per node).

    draft_tokens int64 [batch, n]; parents int64 [n] (-1: a child of the root), topological.
    target_probs float [batch, n+1, vocab]: row 0 after the context, row j+1 after node j.
    node_valid   bool [batch, n].
    noise        float [batch, depth+1, vocab]: noise[b, d] is the Gumbel noise of the token at
                 depth d below the root (d = 0: the token after the context); depth >= the
                 tree's depth.
    From the root, move to the first valid child whose token is the target's coupled sample at
    the current node; where none is, emit that sample (the temperature-0 tree walk of
    `greedy_tree_rule` with the coupled samples in place of the argmax). Returns a TreeResult
    (rule_used "coupled").
    """
    depths = [0] + node_depths(parents).tolist()  # of target_probs' rows
    target_tokens = _target_tokens(target_probs, noise, depths)
    result = greedy_tree_rule(draft_tokens, parents, target_tokens, node_valid)
    return TreeResult(result.tokens, result.num_accepted, result.path, "coupled")


def _target_tokens(target_probs: torch.Tensor, noise: torch.Tensor, depths: list[int]):
    """int64 [batch, n+1]: the target's coupled sample at every row of target_probs, row r
    with noise[:, depths[r]]; a few rows at a time to bound the float64 temporaries."""
    batch, rows, vocab = target_probs.shape
    if noise.shape[0] != batch or noise.shape[2] != vocab or noise.shape[1] <= max(depths):
        raise ValueError(
            f"noise: expected shape [batch={batch}, depth+1 >= {max(depths) + 1}, "
            f"vocab={vocab}], got {tuple(noise.shape)}"
        )
    out = torch.empty(batch, rows, dtype=torch.int64, device=target_probs.device)
    step = max(1, _CHUNK_ENTRIES // max(1, batch * vocab))
    depth_index = torch.tensor(depths, dtype=torch.int64, device=noise.device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk_noise = noise.index_select(1, depth_index[start:stop])
        out[:, start:stop] = coupled_sample(target_probs[:, start:stop], chunk_noise)
    return out


def coupled_keep_probability(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """float64 [...]: the chance that argmax(log p + g) = argmax(log q + g) for standard Gumbel
    g, i.e. that a coupled draft is kept: sum over i with p_i, q_i > 0 of
    1 / sum_j max(p_j / p_i, q_j / q_i). (Both pick i iff g_i - g_j > max(log p_j/p_i,
    log q_j/q_i) for every j; integrating over g_i gives 1 / (1 + sum_{j != i} ...).)
    Builds a [..., vocab, vocab] table: for small vocabularies (tests, toy benchmarks)."""
    p = target_probs.to(torch.float64)
    q = draft_probs.to(torch.float64)
    both = (p > 0) & (q > 0)
    safe_p = torch.where(both, p, 1.0)
    safe_q = torch.where(both, q, 1.0)
    # ratios[..., i, j] = max(p_j / p_i, q_j / q_i)
    ratios = torch.maximum(
        p[..., None, :] / safe_p[..., :, None], q[..., None, :] / safe_q[..., :, None]
    )
    return torch.where(both, 1.0 / ratios.sum(dim=-1), 0.0).sum(dim=-1)


def coupled_keep_bound(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """float64 [...]: (1 - TV) / (1 + TV), the lower bound on the coupled keep probability."""
    tv = 0.5 * (target_probs.to(torch.float64) - draft_probs.to(torch.float64)).abs().sum(-1)
    return (1 - tv) / (1 + tv)


def _check_keys(seeds, positions: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64:
        raise TypeError(f"positions: expected an int64 tensor [batch, n], got {positions!r:.80}")
    seeds = as_seed_tensor(seeds, positions.device)
    if positions.dim() != 2 or positions.shape[0] != seeds.shape[0]:
        raise ValueError(
            f"positions: expected shape [batch={seeds.shape[0]}, n], got {tuple(positions.shape)}"
        )
    if bool((positions < 0).any()):
        raise ValueError("positions: expected new-token positions >= 0, got a negative one")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"vocab: expected an integer >= 1, got {vocab!r}")
    return seeds, positions
