"""The chain rules as kernels: token-level speculative sampling and block verification, one
program per batch row.

Per row, the keep tests read two numbers per draft (p_i(x_i), q_i(x_i)); the final token reads
one probability row (two for a residual) to sum it, and the same row again up to the block that
holds the answer (mostly from cache). Block verification also reads rows 1..L-1 of p and q once
each to sum the residual masses R_i; the residual it samples from after tau >= 1 is one of
those rows, so its sum is not taken again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specsample.kernels.rows import row_search, row_sum
from specsample.rules.result import PAD, VerifyResult

PAD_ID = tl.constexpr(PAD)  # a module constant a kernel can read

# Ids per block of a row; one program per batch row walks its rows block by block.
BLOCK_CUDA = 2048
BLOCK_INTERPRETER = 8192  # the interpreter runs each block as numpy: fewer, larger ones
NUM_WARPS = 8


def launch_options(vocab: int, device: torch.device) -> dict:
    """BLOCK and num_warps for a row of `vocab` ids; float64 arithmetic is kept unfused (no
    multiply-add contraction) so that it rounds like the loop references."""
    on_cuda = device.type == "cuda"
    # One block size on CUDA whatever the vocabulary (masked loads cover a short row), so that
    # few variants are compiled; the interpreter pays per block, not per id.
    block = BLOCK_CUDA if on_cuda else min(BLOCK_INTERPRETER, triton.next_power_of_2(vocab))
    options = {"BLOCK": block}
    if on_cuda:
        options.update(num_warps=NUM_WARPS, enable_fp_fusion=False)
    return options


def slots_for(width: int) -> int:
    """The power of 2 (at least 8, so that few variants are compiled) that holds `width`
    output tokens."""
    return max(8, triton.next_power_of_2(width))


@triton.jit
def _final_token(
    draft_ptr,
    target_ptr,
    tokens_ptr,
    sample_ptr,
    b,
    k,
    vocab,
    row,
    rejected,
    p_scale,
    known_total,
    DENSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The recovered token from max(0, p_scale p_row - q_row) where `rejected`, else the bonus
    token from p_row; row is the index of that position in the chain. known_total is that
    weights' sum when the caller has it already (block verification's R_tau), else -1. An empty
    residual falls back to p_row."""
    at = tl.maximum(tl.minimum(row, k - 1), 0)
    drafted = tl.load(tokens_ptr + b * k + at, mask=rejected, other=0)
    p_row = target_ptr + (b * (k + 1) + row) * vocab
    q_row = draft_ptr + (b * k + at) * vocab
    subtract = rejected
    total = known_total
    if total < 0:
        total = row_sum(
            p_row, p_row, q_row, vocab, False, subtract, p_scale, 1.0, drafted, DENSE, BLOCK
        )
    if total <= 0:  # p <= q everywhere: a rejection of probability 0 in exact arithmetic
        subtract = rejected & (total > 0)
        total = row_sum(
            p_row, p_row, q_row, vocab, False, subtract, p_scale, 1.0, drafted, DENSE, BLOCK
        )
    goal = tl.load(sample_ptr + b) * total
    return row_search(
        p_row, p_row, q_row, vocab, False, subtract, p_scale, 1.0, drafted, goal, DENSE, BLOCK
    )


@triton.jit
def _store_tokens(
    tokens_ptr, out_tokens_ptr, out_accepted_ptr, b, k, accepted, final, SLOTS: tl.constexpr
):
    """tokens[b] = the first `accepted` drafts, the final token, then PAD."""
    slots = tl.arange(0, SLOTS)
    drafts = tl.load(tokens_ptr + b * k + slots, mask=slots < accepted, other=PAD_ID)
    row = tl.where(slots == accepted, final, drafts)
    tl.store(out_tokens_ptr + b * (k + 1) + slots, row, mask=slots < k + 1)
    tl.store(out_accepted_ptr + b, accepted)


@triton.jit
def _drafted_probs(
    draft_ptr, target_ptr, tokens_ptr, b, i, k, vocab, in_draft, DENSE: tl.constexpr
):
    """float64 (p_i(x_i), q_i(x_i)) of draft i of row b; q = 1 for point-mass drafts."""
    x = tl.load(tokens_ptr + b * k + i, mask=in_draft, other=0)
    target_x = tl.load(target_ptr + (b * (k + 1) + i) * vocab + x, mask=in_draft, other=0.0)
    if DENSE:
        draft_x = tl.load(draft_ptr + (b * k + i) * vocab + x, mask=in_draft, other=1.0)
        draft_x = draft_x.to(tl.float64)
    else:
        draft_x = tl.full((), 1.0, dtype=tl.float64)
    return target_x.to(tl.float64), draft_x


@triton.jit(do_not_specialize=["k", "vocab"])
def _token_kernel(
    draft_ptr,  # [batch, k, vocab], or target_ptr for point-mass drafts (never read)
    target_ptr,  # [batch, k+1, vocab]
    tokens_ptr,  # int64 [batch, k]
    lengths_ptr,  # int64 [batch]
    accept_ptr,  # float64 [batch, k]
    sample_ptr,  # float64 [batch]
    out_tokens_ptr,  # int64 [batch, k+1]
    out_accepted_ptr,  # int64 [batch]
    k,
    vocab,
    DENSE: tl.constexpr,
    BLOCK: tl.constexpr,
    SLOTS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    length = tl.load(lengths_ptr + b)
    accepted = tl.zeros((), dtype=tl.int64)
    going = accepted == 0
    for i in range(0, k):
        in_draft = i < length
        target_x, draft_x = _drafted_probs(
            draft_ptr, target_ptr, tokens_ptr, b, i, k, vocab, in_draft, DENSE
        )
        u = tl.load(accept_ptr + b * k + i, mask=in_draft, other=1.0)
        going = going & in_draft & (u * draft_x < target_x)  # keep x_i iff u q(x) < p(x)
        accepted += going.to(tl.int64)
    rejected = accepted < length
    one = tl.full((), 1.0, dtype=tl.float64)
    final = _final_token(
        draft_ptr,
        target_ptr,
        tokens_ptr,
        sample_ptr,
        b,
        k,
        vocab,
        accepted,
        rejected,
        one,
        -one,
        DENSE,
        BLOCK,
    )
    _store_tokens(tokens_ptr, out_tokens_ptr, out_accepted_ptr, b, k, accepted, final, SLOTS)


@triton.jit(do_not_specialize=["k", "vocab"])
def _block_kernel(
    draft_ptr,  # [batch, k, vocab]
    target_ptr,  # [batch, k+1, vocab]
    tokens_ptr,  # int64 [batch, k]
    lengths_ptr,  # int64 [batch]
    accept_ptr,  # float64 [batch, k]
    sample_ptr,  # float64 [batch]
    out_tokens_ptr,  # int64 [batch, k+1]
    out_accepted_ptr,  # int64 [batch]
    k,
    vocab,
    BLOCK: tl.constexpr,
    SLOTS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    length = tl.load(lengths_ptr + b)
    kept = tl.full((), 1.0, dtype=tl.float64)  # P_i, starting at P_0 = 1
    tau = tl.zeros((), dtype=tl.int64)
    kept_at_tau = kept
    mass_at_tau = tl.full((), -1.0, dtype=tl.float64)  # R_tau where tau < L, else -1
    for i in range(0, k):
        in_draft = i < length
        target_x, draft_x = _drafted_probs(
            draft_ptr, target_ptr, tokens_ptr, b, i, k, vocab, in_draft, True
        )
        kept = tl.where(in_draft, tl.minimum(1.0, kept * target_x / draft_x), kept)
        # h_{i+1}: P_L at the last draft, else R_{i+1} / (R_{i+1} + 1 - P_{i+1}) (1 for 0 / 0).
        threshold = kept
        mass = tl.full((), -1.0, dtype=tl.float64)
        if i + 1 < length:
            next_row = b * (k + 1) + i + 1
            mass = row_sum(
                target_ptr + next_row * vocab,
                target_ptr,
                draft_ptr + (b * k + i + 1) * vocab,
                vocab,
                False,
                True,
                kept,
                1.0,
                0,
                True,
                BLOCK,
            )
            denominator = mass + 1.0 - kept
            threshold = tl.where(denominator > 0, mass / tl.maximum(denominator, 1e-300), 1.0)
        u = tl.load(accept_ptr + b * k + i, mask=in_draft, other=1.0)
        passed = in_draft & (u < threshold)  # tau = the LAST i with u_i < h_i
        tau = tl.where(passed, i + 1, tau)
        kept_at_tau = tl.where(passed, kept, kept_at_tau)
        mass_at_tau = tl.where(passed, mass, mass_at_tau)
    rejected = tau < length
    final = _final_token(
        draft_ptr,
        target_ptr,
        tokens_ptr,
        sample_ptr,
        b,
        k,
        vocab,
        tau,
        rejected,
        kept_at_tau,
        mass_at_tau,
        True,
        BLOCK,
    )
    _store_tokens(tokens_ptr, out_tokens_ptr, out_accepted_ptr, b, k, tau, final, SLOTS)


def _launch(
    kernel,
    draft_tokens,
    draft_probs,
    target_probs,
    draft_lengths,
    accept_uniforms,
    sample_uniforms,
    **constants,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, k = draft_tokens.shape
    vocab = target_probs.shape[2]
    device = target_probs.device
    tokens = torch.empty(batch, k + 1, dtype=torch.int64, device=device)
    accepted = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return tokens, accepted
    target_probs = target_probs.contiguous()
    draft = target_probs if draft_probs is None else draft_probs.contiguous()
    kernel[(batch,)](
        draft,
        target_probs,
        draft_tokens.to(torch.int64).contiguous(),
        draft_lengths.to(torch.int64).contiguous(),
        accept_uniforms.to(torch.float64).contiguous(),
        sample_uniforms.to(torch.float64).contiguous(),
        tokens,
        accepted,
        k,
        vocab,
        SLOTS=slots_for(k + 1),
        **constants,
        **launch_options(vocab, device),
    )
    return tokens, accepted


def token_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> VerifyResult:
    """`specsample.rules.token_rule` as one kernel launch (shapes in its docstring)."""
    tokens, accepted = _launch(
        _token_kernel,
        draft_tokens,
        draft_probs,
        target_probs,
        draft_lengths,
        accept_uniforms,
        sample_uniforms,
        DENSE=draft_probs is not None,
    )
    return VerifyResult(tokens, accepted, "token")


def block_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_lengths: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> VerifyResult:
    """`specsample.rules.block_rule` as one kernel launch; point-mass drafts (draft_probs None)
    are verified with the token rule, named in rule_used."""
    if draft_probs is None:
        return token_rule(
            draft_tokens, None, target_probs, draft_lengths, accept_uniforms, sample_uniforms
        )
    tokens, accepted = _launch(
        _block_kernel,
        draft_tokens,
        draft_probs,
        target_probs,
        draft_lengths,
        accept_uniforms,
        sample_uniforms,
    )
    return VerifyResult(tokens, accepted, "block")
