"""A transformers backend for CUDA whose decoding passes are CUDA-graph replays.

`HFStaticLM` implements the `LanguageModel` protocol like `HFCausalLM` (adapters/hf.py), with a
different cache: every row owns a fixed run of slots in preallocated key/value tensors
`[max_batch, kv_heads, capacity, head_dim]`, and the token at position p of a row is always in
slot p. So

- rollback is bookkeeping: `truncate` only lowers the row's length; the stale slots are written
  again before any query can see them (a query at position p attends to slots <= p, all of which
  the row wrote at or before that pass);
- every pass has static shapes: n new tokens per row, padded up to a bucket of 1, 2, 4, 8 or 16,
  for the first rows up to a batch bucket (powers of 2 up to max_batch), attending to all
  `capacity` slots under a mask. One CUDA graph per (batch bucket, token bucket) is captured on
  first use and replayed after that: no kernel launches from Python in a decoding step.

Prompts (`prefill`, `add_rows`) run eagerly, one row at a time. Token trees are not supported
(use `HFCausalLM`). Full-attention Llama/Qwen2-style models with sdpa or eager attention only.

On a CPU the graphs cannot exist: the constructor refuses with a message, unless graphs=False
is passed, which runs the same static-cache passes eagerly (what the CPU tests check).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from specsample.adapters.hf import HFCausalLM
from specsample.adapters.protocol import (
    check_extend_args,
    check_prompts,
    check_remove_rows_args,
    check_truncate_args,
)

__all__ = ["HFStaticLM"]

TOKEN_BUCKETS = (1, 2, 4, 8, 16)


class SlotCache:
    """The key/value store the model writes into: `update` puts the new keys and values of rows
    `rows` (a slice of the physical rows) at slots `slots` `[rows, n]` and returns those rows'
    whole key/value tensors (views, no copy). Duck-types the part of transformers' Cache that a
    forward with a 4-D mask uses."""

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows = slice(0, batch)
        self.slots = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.is_compileable = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx][self.rows], self.values[layer_idx][self.rows]
        rows = torch.arange(keys.shape[0], device=keys.device)[:, None]  # [rows, 1]
        # [rows, heads, n, dim] -> [rows, n, heads, dim], the layout of keys[rows, :, slots].
        keys[rows, :, self.slots] = key_states.transpose(1, 2)
        values[rows, :, self.slots] = value_states.transpose(1, 2)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are passed explicitly; nothing reads this for them

    def select_rows(self, keep: torch.Tensor) -> None:
        """Physical rows keep[i] become rows i (the others are free)."""
        m = len(keep)
        for tensors in (self.keys, self.values):
            for x in tensors:
                x[:m] = x.index_select(0, keep)


class HFStaticLM:
    """`LanguageModel` over a transformers causal LM with a static slot cache and CUDA graphs.

    Args:
        model: an `AutoModelForCausalLM`-style module on a CUDA device (put in eval mode).
        max_batch: rows the cache holds (requests in flight at once).
        max_length: tokens a row may hold (prompt included).
        vocab_size: return only the first `vocab_size` logit columns (padded heads).
        graphs: True (default) captures one CUDA graph per (batch, tokens) bucket; False runs
            the same passes eagerly (for checks on a CPU).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_batch: int = 8,
        max_length: int = 2048,
        vocab_size: int | None = None,
        graphs: bool = True,
    ) -> None:
        device = next(model.parameters()).device
        if graphs and device.type != "cuda":
            raise ValueError(
                f"model: HFStaticLM replays CUDA graphs and needs a model on a CUDA device, got "
                f"one on {device.type!r}; use HFCausalLM (specsample.adapters.hf) there, or pass "
                "graphs=False to run the static-cache passes eagerly"
            )
        if max_batch < 1 or max_length < 1:
            raise ValueError(
                f"max_batch, max_length: expected positive sizes, got {max_batch}, {max_length}"
            )
        # The dynamic adapter checks the model (attention kind, vocab) and knows its quirks.
        self._eager = HFCausalLM(model, vocab_size=vocab_size)
        self.model = self._eager.model
        self.vocab_size = self._eager.vocab_size
        self.device = device
        self.max_batch = int(max_batch)
        self.max_length = int(max_length)
        self.graphs = graphs
        config = self._eager.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        # Padding tokens of a pass write up to TOKEN_BUCKETS[-1] - 1 slots past a full row.
        self.capacity = self.max_length + TOKEN_BUCKETS[-1]
        self._dtype = next(model.parameters()).dtype
        self._cache = SlotCache(
            config.num_hidden_layers,
            self.max_batch,
            config.num_key_value_heads,
            self.capacity,
            head_dim,
            self._dtype,
            device,
        )
        self._lengths = torch.zeros(0, dtype=torch.int64, device=device)
        self._passes: dict[tuple[int, int], _Pass] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None

    # ------------------------------------------------------------------ protocol

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths.clone()

    @property
    def batch_size(self) -> int:
        return int(self._lengths.shape[0])

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        self._lengths = torch.zeros(0, dtype=torch.int64, device=self.device)
        return self.add_rows(prompts)

    @torch.inference_mode()
    def add_rows(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        rows = check_prompts(prompts, self._eager._input_vocab)
        if self.batch_size + len(rows) > self.max_batch:
            raise ValueError(
                f"prompts: {len(rows)} new rows would make {self.batch_size + len(rows)}, more "
                f"than max_batch={self.max_batch}; remove finished rows first"
            )
        too_long = [len(r) for r in rows if len(r) > self.max_length]
        if too_long:
            raise ValueError(
                f"prompts: expected at most max_length={self.max_length} tokens each, got "
                f"{max(too_long)}"
            )
        logits = []
        for prompt in rows:  # eagerly, one row at a time: only its last logits are kept
            row = self.batch_size
            tokens = torch.tensor([prompt], dtype=torch.int64, device=self.device)
            positions = torch.arange(len(prompt), device=self.device)[None]
            logits.append(self._run(slice(row, row + 1), tokens, positions, keep_last=True)[:, -1])
            self._lengths = torch.cat([self._lengths, self._lengths.new_tensor([len(prompt)])])
        if not logits:
            return torch.zeros(0, self.vocab_size, device=self.device)
        return torch.cat(logits).float()

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        tokens, num_valid = check_extend_args(
            tokens, num_valid, self.batch_size, self._eager._input_vocab
        )
        tokens, num_valid = tokens.to(self.device), num_valid.to(self.device)
        batch, n = tokens.shape
        if n == 0 or batch == 0:
            return torch.zeros(batch, n, self.vocab_size, device=self.device)
        if n > TOKEN_BUCKETS[-1]:
            raise ValueError(
                f"tokens: expected at most {TOKEN_BUCKETS[-1]} new tokens per pass, got {n}"
            )
        new_lengths = self._lengths + num_valid
        if int(new_lengths.max()) > self.max_length:
            raise ValueError(
                f"tokens: a row would hold {int(new_lengths.max())} tokens, more than "
                f"max_length={self.max_length}"
            )
        width = next(b for b in TOKEN_BUCKETS if b >= n)
        rows = next(b for b in _batch_buckets(self.max_batch) if b >= batch)
        ids = torch.zeros(rows, width, dtype=torch.int64, device=self.device)
        ids[:batch, :n] = torch.where(
            torch.arange(n, device=self.device) < num_valid[:, None], tokens, 0
        )
        # Position = slot; rows past the batch are free rows, written at slots 0..width-1.
        starts = torch.zeros(rows, dtype=torch.int64, device=self.device)
        starts[:batch] = self._lengths
        positions = starts[:, None] + torch.arange(width, device=self.device)
        if self.graphs:
            logits = self._replay(rows, width, ids, positions)
        else:
            logits = self._run(slice(0, rows), ids, positions, keep_last=False)
        self._lengths = new_lengths
        return logits[:batch, :n].to(torch.float32, copy=True)

    def truncate(self, lengths: torch.Tensor) -> None:
        self._lengths = check_truncate_args(lengths, self._lengths).to(self.device).clone()

    @torch.inference_mode()
    def remove_rows(self, keep: torch.Tensor) -> None:
        keep = check_remove_rows_args(keep, self.batch_size).to(self.device)
        self._cache.select_rows(keep)
        self._lengths = self._lengths.index_select(0, keep)

    # ------------------------------------------------------------------ passes

    def _mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Additive `[rows, 1, n, capacity]`: a query at position p sees slots 0..p of its row."""
        slots = torch.arange(self.capacity, device=self.device)
        allowed = slots[None, None, :] <= positions[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=self._dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self._dtype).min)[:, None]

    def _run(self, rows: slice, ids: torch.Tensor, positions: torch.Tensor, keep_last: bool):
        """One eager pass of ids `[rows, n]` at `positions` `[rows, n]` (= their slots)."""
        return self._forward(rows, ids, positions, self._mask(positions), keep_last)

    def _forward(self, rows, ids, positions, mask, keep_last: bool = False) -> torch.Tensor:
        self._cache.rows = rows
        self._cache.slots = positions
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            self._eager._cache_kw: self._cache,
            "use_cache": True,
        }
        if keep_last and self._eager._keep_kw is not None:
            kwargs[self._eager._keep_kw] = 1
        return self.model(**kwargs).logits[..., : self.vocab_size]

    def _replay(self, rows: int, width: int, ids: torch.Tensor, positions: torch.Tensor):
        key = (rows, width)
        if key not in self._passes:
            self._passes[key] = _Pass.capture(self, rows, width, self._pool)
        return self._passes[key].replay(ids, positions, self._mask(positions))


class _Pass:
    """One captured pass: static inputs (ids, positions, mask) and the logits it writes."""

    def __init__(self, ids, positions, mask, logits, graph):
        self.ids, self.positions, self.mask = ids, positions, mask
        self.logits, self.graph = logits, graph

    @classmethod
    def capture(cls, lm: HFStaticLM, rows: int, width: int, pool) -> _Pass:
        device = lm.device
        ids = torch.zeros(rows, width, dtype=torch.int64, device=device)
        # Capture on free slots past every row's end would still write the cache: capture
        # where the rows are (their current ends), which the real pass overwrites anyway.
        positions = torch.arange(width, device=device).repeat(rows, 1)
        positions[: lm.batch_size] += lm._lengths[:rows, None]
        mask = lm._mask(positions)

        def forward():
            return lm._forward(slice(0, rows), ids, positions, mask)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on a side stream before capture
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = forward()
        return cls(ids, positions, mask, logits, graph)

    def replay(self, ids, positions, mask) -> torch.Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.mask.copy_(mask)
        self.graph.replay()
        return self.logits


def _batch_buckets(max_batch: int) -> list[int]:
    buckets = [1]
    while buckets[-1] < max_batch:
        buckets.append(min(2 * buckets[-1], max_batch))
    return buckets
