"""Recursive rejection sampling over a token tree as one kernel, one program per batch row.

The program walks the nodes in index order, as `specsample.rules.tree_rule` does: it tests node j
when j is valid and its parent is the current node. The current residual is kept unnormalised,
r = w / m, and is never stored while it can be computed from what is in memory:

- after an acceptance (and at the root) w is the target row after the current node;
- after a rejection of node j, w becomes max(0, w - m q_j) with mass m = its sum. That is kept
  as a pending subtraction on top of the stored w, and written to a per-row float64 workspace
  only when another sibling is tested against it (so a chain, and the last child of a node,
  never write).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specsample.kernels.chain import launch_options, slots_for
from specsample.kernels.rows import row_search, row_sum, row_weights
from specsample.rules.result import PAD
from specsample.rules.tree import TreeResult, node_depths

PAD_ID = tl.constexpr(PAD)  # a module constant a kernel can read


@triton.jit
def _weight_at(
    p_row, ws_row, q_pend_row, x, use_ws, pending, pend_scale, pend_token, DENSE: tl.constexpr
):
    """float64: the current residual's unnormalised weight w(x) of one id."""
    if use_ws:
        base = tl.load(ws_row + x).to(tl.float64)
    else:
        base = tl.load(p_row + x).to(tl.float64)
    if pending:
        if DENSE:
            q = tl.load(q_pend_row + x).to(tl.float64)
        else:
            q = (x == pend_token).to(tl.float64)
        base = tl.maximum(1.0 * base - pend_scale * q, 0.0)
    return base


@triton.jit(do_not_specialize=["n", "depth", "vocab"])
def _tree_kernel(
    draft_ptr,  # [batch, n, vocab], or target_ptr for point-mass drafts (never read)
    target_ptr,  # [batch, n+1, vocab]
    tokens_ptr,  # int64 [batch, n]
    parents_ptr,  # int64 [n]
    valid_ptr,  # int8 [batch, n]
    accept_ptr,  # float64 [batch, n]
    sample_ptr,  # float64 [batch]
    ws_ptr,  # float64 [batch, vocab] workspace, or target_ptr where no node has two children
    out_tokens_ptr,  # int64 [batch, depth+1]
    out_accepted_ptr,  # int64 [batch]
    out_path_ptr,  # int64 [batch, depth]
    n,
    depth,
    vocab,
    DENSE: tl.constexpr,
    BLOCK: tl.constexpr,
    SLOTS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ws_row = ws_ptr + b * vocab
    zero = tl.zeros((), dtype=tl.int64)  # typed constants: loop-carried values keep one type
    no = zero != 0
    at = zero - 1  # the current node (-1: the root)
    use_ws = no  # no: the stored w is the target row after `at`; yes: the workspace row
    pend = zero - 1  # the node whose subtraction is pending, or -1
    pend_scale = tl.full((), 1.0, dtype=tl.float64)
    pend_token = zero
    mass = tl.full((), 1.0, dtype=tl.float64)  # m: the current residual is w / m
    accepted = tl.zeros((), dtype=tl.int64)
    slots = tl.arange(0, SLOTS)
    path = tl.full([SLOTS], -1, dtype=tl.int64)
    emitted = tl.full([SLOTS], PAD_ID, dtype=tl.int64)
    for j in range(0, n):
        parent = tl.load(parents_ptr + j)
        valid = tl.load(valid_ptr + b * n + j) != 0
        if valid & (parent == at):
            x = tl.load(tokens_ptr + b * n + j)
            p_row = target_ptr + (b * (n + 1) + at + 1) * vocab
            q_pend_row = draft_ptr + (b * n + tl.maximum(pend, 0)) * vocab
            pending = pend >= 0
            weight_x = _weight_at(
                p_row, ws_row, q_pend_row, x, use_ws, pending, pend_scale, pend_token, DENSE
            )
            if DENSE:
                draft_x = tl.load(draft_ptr + (b * n + j) * vocab + x).to(tl.float64)
            else:
                draft_x = tl.full((), 1.0, dtype=tl.float64)
            u = tl.load(accept_ptr + b * n + j)
            if u * draft_x * mass < weight_x:  # keep: u q(x) < r(x) = w(x) / m
                path = tl.where(slots == accepted, j, path)
                emitted = tl.where(slots == accepted, x, emitted)
                accepted += 1
                at = zero + j
                use_ws = no
                pend = zero - 1
                mass = tl.full((), 1.0, dtype=tl.float64)
            else:
                # The mass of max(0, w - m q_j), writing out a pending subtraction on the way
                # (this sibling's test already read it; the next one reads the stored copy).
                q_row = draft_ptr + (b * n + j) * vocab
                new_mass = tl.zeros((), dtype=tl.float64)
                for start in range(0, vocab, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    in_vocab = offs < vocab
                    current = row_weights(
                        p_row,
                        ws_row,
                        q_pend_row,
                        offs,
                        in_vocab,
                        use_ws,
                        pending,
                        1.0,
                        pend_scale,
                        pend_token,
                        DENSE,
                    )
                    if pending:
                        tl.store(ws_row + offs, current, mask=in_vocab)
                    if DENSE:
                        q = tl.load(q_row + offs, mask=in_vocab, other=0.0).to(tl.float64)
                    else:
                        q = (offs == x).to(tl.float64)
                    new_mass += tl.sum(tl.maximum(1.0 * current - mass * q, 0.0), axis=0)
                if pending:
                    tl.debug_barrier()  # the stored row is read by other threads from here on
                    use_ws = pending
                    pend = zero - 1
                if new_mass > 0:  # else keep r: a rejection of probability 0 in exact arithmetic
                    pend = zero + j
                    pend_scale = mass
                    pend_token = x
                    mass = new_mass
    p_row = target_ptr + (b * (n + 1) + at + 1) * vocab
    q_pend_row = draft_ptr + (b * n + tl.maximum(pend, 0)) * vocab
    pending = pend >= 0
    total = mass
    if pend < 0:
        total = row_sum(
            p_row,
            ws_row,
            q_pend_row,
            vocab,
            use_ws,
            pending,
            1.0,
            pend_scale,
            pend_token,
            DENSE,
            BLOCK,
        )
    goal = tl.load(sample_ptr + b) * total
    final = row_search(
        p_row,
        ws_row,
        q_pend_row,
        vocab,
        use_ws,
        pending,
        1.0,
        pend_scale,
        pend_token,
        goal,
        DENSE,
        BLOCK,
    )
    emitted = tl.where(slots == accepted, final, emitted)
    tl.store(out_tokens_ptr + b * (depth + 1) + slots, emitted, mask=slots < depth + 1)
    tl.store(out_path_ptr + b * depth + slots, path, mask=slots < depth)
    tl.store(out_accepted_ptr + b, accepted)


def tree_rule(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    node_valid: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> TreeResult:
    """`specsample.rules.tree_rule` as one kernel launch (shapes in its docstring)."""
    batch, n = draft_tokens.shape
    vocab = target_probs.shape[2]
    device = target_probs.device
    parent_list = [int(p) for p in parents.tolist()]
    assert len(parent_list) == n
    depth = int(node_depths(parent_list).max()) if n else 0
    tokens = torch.empty(batch, depth + 1, dtype=torch.int64, device=device)
    accepted = torch.empty(batch, dtype=torch.int64, device=device)
    path = torch.empty(batch, depth, dtype=torch.int64, device=device)
    if batch == 0:
        return TreeResult(tokens, accepted, path)
    target_probs = target_probs.contiguous()
    draft = target_probs if draft_probs is None else draft_probs.contiguous()
    # A residual is only written out where a node has a second child to test against it.
    has_siblings = len(set(parent_list)) < n
    workspace = (
        torch.empty(batch, vocab, dtype=torch.float64, device=device)
        if has_siblings
        else target_probs
    )
    _tree_kernel[(batch,)](
        draft,
        target_probs,
        draft_tokens.to(torch.int64).contiguous(),
        torch.tensor(parent_list, dtype=torch.int64, device=device),
        node_valid.to(torch.int8).contiguous(),
        accept_uniforms.to(torch.float64).contiguous(),
        sample_uniforms.to(torch.float64).contiguous(),
        workspace,
        tokens,
        accepted,
        path,
        n,
        depth,
        vocab,
        DENSE=draft_probs is not None,
        SLOTS=slots_for(depth + 1),
        **launch_options(vocab, device),
    )
    return TreeResult(tokens, accepted, path)
