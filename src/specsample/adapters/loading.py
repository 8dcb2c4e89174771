"""Loading a target/draft pair for decoding: the embedded default pair, or any transformers causal
LM (hub id, local folder or GGUF file) for each side. A real tokenizer mismatch between the two
is an error before any generation; a vocabulary-size difference made of padding rows is not (the
decoding loop gives missing ids probability 0)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specsample.adapters.hf import HFCausalLM
from specsample.adapters.quantize import DRAFT_QUANTIZATIONS, quantize_draft


@dataclass
class LoadedPair:
    target: HFCausalLM
    draft: HFCausalLM | None
    tokenizer: Any
    target_config: Any
    seconds: float
    rss_bytes: int
    description: str


def auto_dtype(device: str) -> torch.dtype:
    """float32 on CPUs, bfloat16 on GPUs. Measured on a 2-core Xeon without bfloat16
    instructions: a bfloat16 pass of the 1.5B target costs 320 ms for 1 token but 1140 ms for 5
    (slow multi-token bfloat16 matrix products), float32 500 ms and 690 ms: speculative decoding
    needs cheap multi-token passes."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_pair(
    target: str | None = None,
    draft: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    use_draft: bool = True,
    draft_quantize: str = "none",
) -> LoadedPair:
    """Loads the named models, or the embedded default pair when `target` is None. dtype: the
    compute dtype (None: auto_dtype(device)). The default pair's weights are cached once in
    bfloat16 and upcast exactly when another dtype is asked for. draft_quantize: "int8"
    quantises the draft's linear layers (CPU, float32; see adapters/quantize.py): a cheaper
    draft, still exact decoding."""
    started = time.perf_counter()
    dtype = dtype or auto_dtype(device)
    if draft_quantize not in DRAFT_QUANTIZATIONS:
        raise ValueError(
            f"draft_quantize: expected one of {list(DRAFT_QUANTIZATIONS)}, got {draft_quantize!r}"
        )
    if target is None:
        if draft is not None:
            raise ValueError(
                "draft: a draft model needs --target too (the default pair comes "
                "as a whole); got a draft with no target"
            )
        from specsample.adapters import default_pair

        pair = default_pair.load_default_pair_with_stats(torch.bfloat16, device)
        pair.target.to(dtype)
        pair.draft.to(dtype)
        if not pair.vocab.tokenizers_identical:
            raise ValueError(
                "the default pair's tokenizers differ; the cache may be corrupt: "
                f"remove {default_pair.cache_dir()} and retry"
            )
        target_lm = HFCausalLM(pair.target)
        draft_lm = None
        if use_draft:
            draft_lm = HFCausalLM(quantize_draft(pair.draft, draft_quantize))
        tokenizer, config = pair.tokenizer, pair.target.config
        description = "default pair: Qwen2.5-Coder-1.5B-Instruct (target), 0.5B-Instruct (draft)"
    else:
        _check_gguf_path("target", target)
        if draft is not None and use_draft:
            _check_gguf_path("draft", draft)
        tokenizer = _load_tokenizer(target)
        target_lm = _load_model(target, dtype, device)
        draft_lm = None
        if draft is not None and use_draft:
            check_same_tokenizer(tokenizer, _load_tokenizer(draft), target, draft)
            draft_lm = _load_model(draft, dtype, device)
            if draft_quantize != "none":
                draft_lm = HFCausalLM(
                    quantize_draft(draft_lm.model, draft_quantize), vocab_size=draft_lm.vocab_size
                )
        config = target_lm.model.config
        description = f"target {target}" + (f", draft {draft}" if draft_lm else "")
    return LoadedPair(
        target_lm, draft_lm, tokenizer, config, time.perf_counter() - started, _rss(), description
    )


def check_same_tokenizer(target_tok: Any, draft_tok: Any, target: str, draft: str) -> None:
    """Raises ValueError unless both tokenizers map the same strings to the same ids."""
    target_vocab, draft_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
    if target_vocab == draft_vocab:
        return
    shared = set(target_vocab) & set(draft_vocab)
    moved = sum(target_vocab[t] != draft_vocab[t] for t in shared)
    raise ValueError(
        f"draft: expected a model with the target's tokenizer; {draft!r} has "
        f"{len(draft_vocab)} tokens and {target!r} {len(target_vocab)}, with {moved} shared "
        f"tokens at different ids and {len(set(target_vocab) ^ set(draft_vocab))} tokens in only "
        f"one of them. Speculative sampling needs one vocabulary; pick a draft of the same family"
    )


def _check_gguf_path(argument: str, name: str) -> None:
    """For a name ending in .gguf: raises FileNotFoundError unless it is an existing file, and
    ValueError unless it starts with the GGUF magic bytes (before transformers would look for it
    on the hub or fail with a message that names no argument)."""
    path = Path(name)
    if path.suffix != ".gguf":
        return
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{argument}: expected a GGUF file, got {name!r}, which {what}")
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise ValueError(
            f"{argument}: expected a GGUF file (starting with b'GGUF'), got {name!r}, which "
            f"starts with {magic!r}"
        )


def _split_gguf(name: str) -> tuple[str, str | None]:
    path = Path(name)
    if path.suffix == ".gguf":
        return str(path.parent), path.name
    return name, None


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    folder, gguf_file = _split_gguf(name)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def _load_model(name: str, dtype: torch.dtype, device: str) -> HFCausalLM:
    folder, gguf_file = _split_gguf(name)
    return HFCausalLM.from_pretrained(folder, dtype=dtype, device=device, gguf_file=gguf_file)


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0
