"""`LanguageModel` adapter for Hugging Face transformers causal LMs with a KV cache.

Ragged batches share one physical cache *timeline* of T slots. Each row owns a boolean
`real[batch, T]` marking which slots hold its tokens; padding and rolled-back tokens become
holes (masked out, never attended to). Because holes break the usual "position = slot index"
rule, every forward pass gets

* explicit `position_ids` = number of real tokens before that slot in the row, so RoPE sees
  exactly the positions a fresh unpadded forward would, and
* a ready-made 4-D additive mask `[batch, 1, n, T + n]` (real & causal in slot space), which
  transformers passes through untouched, so it never re-derives masks or positions from a
  2-D padding mask.

Rollback (`truncate`) only flips bits in `real` and then crops the physical cache to the last
slot any row still needs. Holes left in shorter rows are reclaimed by `compact()`, which packs
each row's real slots to the left; this is exact because RoPE is applied before caching.

transformers version quirks handled here (and nowhere else):

* the cache keyword is `cache` in 5.x (`past_key_values` before, deprecated in 5.x);
* `Cache.crop(n)` in 5.x only accepts n <= 0 (tokens to remove); older versions took an
  absolute length but also accepted negative n, so we always pass a negative count;
* KV tensors live in `cache.layers[i].keys` (>= 4.56) or `cache.key_cache[i]` (older);
* `logits_to_keep` was `num_logits_to_keep` before 4.50.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from specsample.adapters.protocol import (
    check_commit_path_args,
    check_extend_args,
    check_extend_tree_args,
    check_last,
    check_prompts,
    check_remove_rows_args,
    check_truncate_args,
)

__all__ = ["HFCausalLM"]

# Attention backends that honour an arbitrary 4-D additive mask (holes included).
_MASKABLE_ATTN = {"eager", "sdpa"}


@dataclass
class _OpenTree:
    """The token tree added since the last commit. Per row and node id: parents/valid/positions
    `[batch, N]`, sees `[batch, N, slots]` (which slots the node attends to)."""

    start: int
    parents: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    sees: torch.Tensor


def _forward_params(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _check_supported(model: Any) -> None:
    """Reject models whose attention this adapter cannot reproduce exactly."""
    cfg = _text_config(model)
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    if attn not in _MASKABLE_ATTN:
        raise ValueError(
            f"model: expected attn_implementation in {sorted(_MASKABLE_ATTN)} (the adapter "
            f"needs 4-D masks with holes), got {attn!r}"
        )
    layer_types = getattr(cfg, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t != "full_attention"})
    windowed = getattr(cfg, "sliding_window", None) is not None and getattr(
        cfg, "use_sliding_window", True
    )
    if odd or windowed:
        raise ValueError(
            "model: expected full attention in every layer, got "
            f"{odd or 'sliding_window=' + str(cfg.sliding_window)}"
        )


def _output_rows(model: torch.nn.Module) -> int:
    """Rows of the output head (a dynamically quantised head exposes weight() as a method)."""
    head = model.get_output_embeddings()
    weight = head.weight() if callable(head.weight) else head.weight
    return int(weight.shape[0])


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _map_kv(cache: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply `fn` to every cached key/value tensor `[batch, heads, T, head_dim]` in place."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys, layer.values = fn(layer.keys), fn(layer.values)
    elif hasattr(cache, "key_cache"):  # older DynamicCache
        cache.key_cache = [fn(k) if k.dim() == 4 else k for k in cache.key_cache]
        cache.value_cache = [fn(v) if v.dim() == 4 else v for v in cache.value_cache]
    else:
        raise NotImplementedError(f"cannot reindex cache of type {type(cache).__name__}")


def _zip_kv(
    cache: Any, other: Any, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> None:
    """Set every cached key/value tensor of `cache` to fn(it, the same tensor of `other`)."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        for layer, other_layer in zip(cache.layers, other.layers, strict=True):
            layer.keys = fn(layer.keys, other_layer.keys)
            layer.values = fn(layer.values, other_layer.values)
    elif hasattr(cache, "key_cache"):  # older DynamicCache
        cache.key_cache = [fn(a, b) for a, b in zip(cache.key_cache, other.key_cache, strict=True)]
        cache.value_cache = [
            fn(a, b) for a, b in zip(cache.value_cache, other.value_cache, strict=True)
        ]
    else:
        raise NotImplementedError(f"cannot merge caches of type {type(cache).__name__}")


class HFCausalLM:
    """`LanguageModel` over a transformers causal LM (Llama/Qwen2-style, full attention).

    Args:
        model: an `AutoModelForCausalLM`-style module; it is put in eval mode.
        device: where inputs, cache and returned tensors live; the model is moved there.
            Defaults to the device of the model's parameters.
        vocab_size: return only the first `vocab_size` logit columns, for checkpoints whose
            head is padded beyond the tokenizer (e.g. 152064 rows vs 151936 tokens).
        compact_slack: repack the cache once the timeline is this many slots longer than
            the longest row (`None`: never automatically).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device | str | None = None,
        vocab_size: int | None = None,
        compact_slack: int | None = 256,
    ) -> None:
        _check_supported(model)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.device = _model_device(model)
        head_rows = _output_rows(model)
        if vocab_size is None:
            vocab_size = head_rows
        if not 1 <= vocab_size <= head_rows:
            raise ValueError(
                f"vocab_size: expected 1 <= vocab_size <= {head_rows} (rows of the "
                f"model's output head), got {vocab_size}"
            )
        if compact_slack is not None and compact_slack < 0:
            raise ValueError(f"compact_slack: expected None or >= 0, got {compact_slack}")
        self.vocab_size = int(vocab_size)
        self.compact_slack = compact_slack
        self._input_vocab = int(model.get_input_embeddings().weight.shape[0])
        self._dtype = next(model.parameters()).dtype
        params = _forward_params(model)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None
        )
        self._cache: Any = None
        self._real = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self._lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        self._tree: _OpenTree | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        gguf_file: str | None = None,
        *,
        vocab_size: int | None = None,
        **model_kwargs: Any,
    ) -> HFCausalLM:
        """Load with `AutoModelForCausalLM.from_pretrained` (GGUF is dequantized to `dtype`).

        Extra keyword arguments (e.g. `attn_implementation="sdpa"`) go to transformers.
        """
        from transformers import AutoModelForCausalLM

        if gguf_file is not None:
            model_kwargs["gguf_file"] = gguf_file
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **model_kwargs)
        return cls(model, device=device, vocab_size=vocab_size)

    # ------------------------------------------------------------------ protocol

    @property
    def lengths(self) -> torch.Tensor:
        """Current number of tokens per row, int64 `[batch]` (a copy)."""
        return self._lengths.clone()

    @property
    def batch_size(self) -> int:
        return int(self._lengths.shape[0])

    @property
    def timeline_length(self) -> int:
        """Physical cache slots T (>= max length; the excess is holes)."""
        return int(self._real.shape[1])

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Reset to `prompts`; returns float logits `[batch, vocab]` after each prompt."""
        return self._prefill(prompts, 1)[:, -1]

    def _prefill(self, prompts: Sequence[Sequence[int]], last: int) -> torch.Tensor:
        """Reset to `prompts`; float logits `[batch, last, vocab]` after each prompt's last
        `last` tokens (left padding puts them in the final slots)."""
        rows = check_prompts(prompts, self._input_vocab)
        batch, width = len(rows), max(map(len, rows))
        # Left-pad so every row's last prompt token sits in the final slot: then one
        # logits column per row suffices (no [batch, seq, vocab] blow-up for long prompts).
        tokens = torch.zeros(batch, width, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        for b, row in enumerate(rows):
            tokens[b, width - len(row) :] = torch.tensor(row)
            valid[b, width - len(row) :] = True
        self._cache = _new_cache()
        self._tree = None
        self._real = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self._lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        logits = self._forward(tokens.to(self.device), valid.to(self.device), last=last)
        logits = logits[:, -last:]
        if logits.shape[1] < last:  # every prompt is shorter than `last`: arbitrary columns
            logits = torch.nn.functional.pad(logits, (0, 0, last - logits.shape[1], 0))
        return logits

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        """Append `tokens[b, :num_valid[b]]` (int64 `[batch, n]`, `[batch]`).

        Returns float logits `[batch, n, vocab]`; padded positions hold finite junk.
        """
        self._require_state()
        self._require_no_tree("extend")
        tokens, num_valid = check_extend_args(tokens, num_valid, self.batch_size, self._input_vocab)
        tokens, num_valid = tokens.to(self.device), num_valid.to(self.device)
        n = tokens.shape[1]
        if n == 0:
            return torch.zeros(self.batch_size, 0, self.vocab_size, device=self.device)
        valid = torch.arange(n, device=self.device) < num_valid[:, None]
        logits = self._forward(tokens, valid)
        self._trim()  # slots that are padding in every row need not stay in the cache
        return logits

    @torch.inference_mode()
    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep the first `lengths[b]` tokens of row b (int64 `[batch]`)."""
        self._require_state()
        self._require_no_tree("truncate")
        lengths = check_truncate_args(lengths, self._lengths)
        rank = self._real.long().cumsum(dim=1)  # real tokens up to and including each slot
        self._real &= rank <= lengths[:, None]
        self._lengths = lengths.clone()
        self._trim()

    @torch.inference_mode()
    def add_rows(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append one row per prompt after the existing rows; returns float logits
        `[len(prompts), vocab]` after each new prompt.

        The new rows are prefilled on their own (a fresh cache), then their cache is joined to
        the running one along the batch; the shorter timeline is padded with holes, which the
        mask never lets anyone attend to. Existing rows are untouched.
        """
        return self._add_rows(prompts, 1, "add_rows")[:, -1]

    @torch.inference_mode()
    def add_rows_last(self, prompts: Sequence[Sequence[int]], last: int) -> torch.Tensor:
        """`add_rows` returning the logits after each of each prompt's last `last` tokens,
        `[len(prompts), last, vocab]` (see `PromptScoring`)."""
        return self._add_rows(prompts, check_last(last), "add_rows_last")

    def _add_rows(self, prompts: Sequence[Sequence[int]], last: int, call: str) -> torch.Tensor:
        self._require_no_tree(call)
        rows = check_prompts(prompts, self._input_vocab)
        if self._cache is None or self.batch_size == 0:
            return self._prefill(rows, last)
        running = (self._cache, self._real, self._lengths)
        logits = self._prefill(rows, last)
        joined_cache, joined_real, joined_lengths = running
        total = max(joined_real.shape[1], self._real.shape[1])

        def pad_slots(x: torch.Tensor, slots: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, 0, 0, slots - x.shape[2]))

        def join(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return torch.cat([pad_slots(old, total), pad_slots(new, total)], dim=0)

        _zip_kv(joined_cache, self._cache, join)
        self._cache = joined_cache
        self._real = torch.cat(
            [
                torch.nn.functional.pad(joined_real, (0, total - joined_real.shape[1])),
                torch.nn.functional.pad(self._real, (0, total - self._real.shape[1])),
            ],
            dim=0,
        )
        self._lengths = torch.cat([joined_lengths, self._lengths])
        return logits

    @torch.inference_mode()
    def remove_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (int64 `[m]`, increasing), renumbered 0..m-1."""
        self._require_state()
        self._require_no_tree("remove_rows")
        keep = check_remove_rows_args(keep, self.batch_size).to(self.device)
        _map_kv(self._cache, lambda x: x.index_select(0, keep))
        self._real = self._real.index_select(0, keep)
        self._lengths = self._lengths.index_select(0, keep)
        if self.batch_size:
            self._trim()

    # ------------------------------------------------------------------ token trees

    @torch.inference_mode()
    def extend_tree(
        self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Add tree nodes (see `TreeLanguageModel.extend_tree`); one forward pass.

        Node i of the open tree sits in slot `tree_start + i`. Its RoPE position is its depth
        below the row's last token, and it attends to the row's real slots plus its own
        ancestors, so its logits equal those of a plain forward of the row followed by the path
        to it. Tree slots are not real (other rows' and later queries never see them) until
        `commit_path` moves the kept path next to the row.
        """
        self._require_state()
        if self._tree is None:
            batch = self.batch_size
            none = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
            self._tree = _OpenTree(
                start=self._real.shape[1],
                parents=none,
                valid=none.bool(),
                positions=none.clone(),
                sees=torch.zeros(
                    batch, 0, self._real.shape[1], dtype=torch.bool, device=self.device
                ),
            )
        tree = self._tree
        tokens, parents, valid = check_extend_tree_args(
            tokens, parents, valid, self.batch_size, self._input_vocab, tree.valid
        )
        tokens, parents, valid = (x.to(self.device) for x in (tokens, parents, valid))
        n = tokens.shape[1]
        if n == 0:
            return torch.zeros(self.batch_size, 0, self.vocab_size, device=self.device)
        past = self._real.shape[1]
        before = tree.valid.shape[1]
        rows = torch.arange(self.batch_size, device=self.device)
        # sees[b, i, s]: node i may attend slot s (its ancestors, itself, the row's real slots).
        sees = torch.cat(
            [
                torch.nn.functional.pad(tree.sees, (0, n)),
                torch.zeros(self.batch_size, n, past + n, dtype=torch.bool, device=self.device),
            ],
            dim=1,
        )
        positions = torch.cat([tree.positions, torch.zeros_like(parents)], dim=1)
        base = torch.nn.functional.pad(self._real, (0, n))  # [batch, past + n]
        for j in range(n):
            parent = parents[:, j]
            root = (parent < 0) | ~valid[:, j]
            above = sees[rows, parent.clamp(min=0)]  # [batch, past + n]
            row_sees = torch.where(root[:, None], base, above)
            row_sees[:, past + j] = True
            sees[:, before + j] = row_sees
            positions[:, before + j] = torch.where(
                root, self._lengths, positions[rows, parent.clamp(min=0)] + 1
            )
        new_positions = positions[:, before:]
        logits = self._run(tokens, valid, new_positions, self._additive(sees[:, before:]), None)
        self._real = torch.nn.functional.pad(self._real, (0, n))
        self._tree = _OpenTree(
            start=tree.start,
            parents=torch.cat([tree.parents, torch.where(valid, parents, -1)], dim=1),
            valid=torch.cat([tree.valid, valid], dim=1),
            positions=positions,
            sees=sees,
        )
        return logits

    @torch.inference_mode()
    def commit_path(self, path: torch.Tensor) -> None:
        """Close the open tree, keeping row b's nodes `path[b]` (see
        `TreeLanguageModel.commit_path`).

        The kept nodes' keys and values are copied to the slots right after the tree's start,
        in path order, and the rest of the tree is cropped: no holes are left behind in a row
        that kept its longest path, and only a few slots per layer are copied.
        """
        self._require_state()
        if self._tree is None:
            raise RuntimeError("commit_path: no tree is open (call extend_tree() first)")
        tree = self._tree
        path = check_commit_path_args(path, tree.parents, tree.valid).to(self.device)
        kept = (path >= 0).sum(dim=1)  # [batch]
        depth = int(kept.max()) if kept.numel() else 0
        start = tree.start
        source = start + path[:, :depth].clamp(min=0)  # [batch, depth]

        def move(x: torch.Tensor) -> torch.Tensor:
            index = source[:, None, :, None].expand(x.shape[0], x.shape[1], depth, x.shape[3])
            x[:, :, start : start + depth] = x.gather(2, index)
            return x[:, :, : start + depth]

        if depth:
            _map_kv(self._cache, move)
        else:
            _map_kv(self._cache, lambda x: x[:, :, :start])
        slots = torch.arange(depth, device=self.device)[None, :]
        self._real = torch.cat([self._real[:, :start], slots < kept[:, None]], dim=1)
        self._lengths = self._lengths + kept
        self._tree = None
        self._trim()

    # ------------------------------------------------------------------ internals

    def _require_state(self) -> None:
        if self._cache is None:
            raise RuntimeError("call prefill() before extend() or truncate()")

    def _require_no_tree(self, method: str) -> None:
        if self._tree is not None:
            raise RuntimeError(f"{method}: a token tree is open; call commit_path() first")

    def _forward(
        self, tokens: torch.Tensor, valid: torch.Tensor, last: int | None = None
    ) -> torch.Tensor:
        """Run new slots `tokens[batch, n]` (real where `valid`) through the model.

        Appends n slots to the timeline and returns float logits `[batch, n, vocab]` (with
        `last`: at least the last `last` slots').
        """
        n = tokens.shape[1]
        past = self._real.shape[1]
        real = torch.cat([self._real, valid], dim=1)  # [batch, past + n]
        # Position of a slot = real tokens of its row before it; padding gets a harmless
        # clamped value (its output is never used and its slot is masked for others).
        positions = self._lengths[:, None] + valid.long().cumsum(dim=1) - 1
        positions = positions.clamp_min(0)
        # With no padding or holes anywhere (one row, or rows kept in step) the plain causal mask
        # is the right one: let the model build it and use its fastest attention path.
        mask = None if bool(real.all()) else self._mask(real, past, n)
        logits = self._run(tokens, valid, positions, mask, last)
        self._real = real
        self._lengths = self._lengths + valid.sum(dim=1)
        return logits

    def _run(
        self,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        last: int | None,
    ) -> torch.Tensor:
        """One model call on n new slots (appended to the cache); float logits `[batch, n,
        vocab]`, or with `last` those of the last `last` slots (all n where the model cannot
        keep fewer). mask: additive `[batch, 1, n, past + n]`, or None for the plain causal
        one."""
        assert self._cache.get_seq_length() == self._real.shape[1], "cache and timeline differ"
        kwargs: dict[str, Any] = {
            "input_ids": torch.where(valid, tokens, 0),
            "attention_mask": mask,
            "position_ids": positions,
            self._cache_kw: self._cache,
            "use_cache": True,
        }
        if last is not None and self._keep_kw is not None:
            kwargs[self._keep_kw] = min(last, tokens.shape[1])
        out = self.model(**kwargs)
        returned = getattr(out, self._cache_kw, None)
        if returned is not None:  # some versions hand back a new object
            self._cache = returned
        return out.logits[..., : self.vocab_size].float()

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool `[batch, n, slots]` -> additive mask `[batch, 1, n, slots]`."""
        mask = torch.zeros(allowed.shape, dtype=self._dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self._dtype).min)
        return mask[:, None]

    def _mask(self, real: torch.Tensor, past: int, n: int) -> torch.Tensor:
        """Additive mask `[batch, 1, n, past + n]`: 0 where query slot may attend key slot.

        A query sees the real slots of its own row at or before it. Every query also sees
        itself, so padded queries (e.g. left padding in prefill) never get an all-masked
        row: kernels that treat the mask as -inf turn such rows into NaN, and a NaN value
        vector leaks into real rows through 0-weight attention in later layers.
        """
        q_slot = past + torch.arange(n, device=self.device)[:, None]  # [n, 1]
        k_slot = torch.arange(past + n, device=self.device)[None, :]  # [1, past + n]
        allowed = (real[:, None, :] & (k_slot <= q_slot)) | (k_slot == q_slot)
        return self._additive(allowed)

    def _trim(self) -> None:
        """Crop the physical cache to the last slot any row still uses; maybe compact."""
        total = self._real.shape[1]
        slot_number = torch.arange(1, total + 1, device=self.device)
        needed = int((self._real * slot_number).amax()) if self._real.numel() else 0
        if needed < total:
            self._cache.crop(needed - total)  # negative = "remove this many" in every version
            self._real = self._real[:, :needed]
        longest = int(self._lengths.max()) if self._lengths.numel() else 0
        if self.compact_slack is not None and needed - longest > self.compact_slack:
            self.compact()

    @torch.inference_mode()
    def compact(self) -> None:
        """Pack each row's real slots to the left, shrinking T to the longest row.

        Exact: cached keys already carry their RoPE positions, and slot order within a
        row is preserved, so only the (masked) holes disappear. Costs one cache copy.
        """
        self._require_state()
        self._require_no_tree("compact")
        total = self._real.shape[1]
        longest = int(self._lengths.max())
        slots = torch.arange(total, device=self.device)
        # Sort key: real slots first (in order), holes after.
        order = torch.argsort(torch.where(self._real, slots, slots + total), dim=1)
        order = order[:, :longest]

        def gather(x: torch.Tensor) -> torch.Tensor:
            assert x.shape[2] == total, "cache length differs from timeline"
            index = order[:, None, :, None].expand(x.shape[0], x.shape[1], longest, x.shape[3])
            return x.gather(2, index)

        _map_kv(self._cache, gather)
        self._real = slots[None, :longest] < self._lengths[:, None]
