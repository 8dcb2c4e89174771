"""Loading a target/draft pair for decoding: the embedded default pair, or any model for each
side, on one of two backends:

* llama.cpp (`LlamaCppLM`): GGUF files as they are (quantised weights, no conversion); the
  default on CPUs for GGUF files and the default pair, when llama-cpp-python is installed;
* transformers (`HFCausalLM`): hub ids, local folders and GGUF files (dequantised); the default
  for hub ids and folders, and on CUDA.

A real tokenizer mismatch between the two models is an error before any generation; a
vocabulary-size difference made of padding rows is not (the decoding loop gives missing ids
probability 0)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specsample.adapters.gguf_meta import (
    check_gguf_file,
    check_same_gguf_tokenizer,
    read_gguf_tokenizer,
)
from specsample.adapters.hf import HFCausalLM
from specsample.adapters.hf_loading import load_tokenizer
from specsample.adapters.protocol import LanguageModel
from specsample.adapters.quantize import (
    DRAFT_QUANTIZATIONS,
    quantize_draft,
    quantize_draft_cached,
)

BACKENDS = ("auto", "llama.cpp", "transformers")


@dataclass
class LoadedPair:
    """target/draft: LanguageModels (HFCausalLM or LlamaCppLM); tokenizer: the target's, with
    transformers' encode/decode interface; target_config: the transformers config, or None on
    llama.cpp."""

    target: LanguageModel
    draft: LanguageModel | None
    tokenizer: Any
    target_config: Any
    seconds: float
    rss_bytes: int
    description: str
    backend: str = "transformers"

    @property
    def trained_context(self) -> int | None:
        """The positions the target was trained for: the GGUF's context length on llama.cpp,
        the config's max_position_embeddings on transformers; None where neither says."""
        trained = getattr(self.target, "n_ctx_train", None)
        if trained is None:
            trained = getattr(self.target_config, "max_position_embeddings", None)
        return trained if isinstance(trained, int) and trained > 0 else None


def _is_gguf(name: str | None) -> bool:
    return name is None or Path(name).suffix == ".gguf"


def resolve_backend(
    backend: str,
    target: str | None,
    draft: str | None,
    device: str,
    draft_quantize: str = "none",
) -> str:
    """The backend to run: "llama.cpp" or "transformers". auto: llama.cpp on a CPU when every
    model named is a .gguf file (None = the default pair), no draft quantisation (a
    transformers option) is asked for and llama-cpp-python is installed, else transformers. An
    explicit choice the models cannot take raises ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    on_cpu = torch.device(device).type == "cpu"
    ggufs = _is_gguf(target) and _is_gguf(draft)
    if backend == "llama.cpp":
        if not ggufs:
            named = target if not _is_gguf(target) else draft
            raise ValueError(
                f"backend: llama.cpp runs .gguf files only, got {named!r}; use --backend "
                "transformers for hub ids and folders"
            )
        if not on_cpu:
            raise ValueError(
                f"backend: expected device 'cpu' with llama.cpp, got {device!r}; use --backend "
                "transformers on CUDA"
            )
        return backend
    if backend == "transformers":
        return backend
    from specsample.adapters.llamacpp import is_available

    plain = draft_quantize in ("none", "auto")
    return "llama.cpp" if on_cpu and ggufs and plain and is_available() else "transformers"


def resolve_draft_quantize(draft_quantize: str, device: str, dtype: torch.dtype) -> str:
    """draft_quantize on the transformers backend: "auto" is int8 for a float32 draft on the CPU
    (where dynamic int8 kernels exist), none elsewhere; other values stay as they are."""
    if draft_quantize != "auto":
        return draft_quantize
    return "int8" if torch.device(device).type == "cpu" and dtype == torch.float32 else "none"


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
    backend: str = "auto",
    threads: int | None = None,
    n_ctx: int = 4096,
    max_batch: int = 64,
    repack: bool = False,
    defer_draft: bool = False,
) -> LoadedPair:
    """Loads the named models, or the embedded default pair when `target` is None, on
    `backend` (see resolve_backend). transformers: dtype is the compute dtype (None:
    auto_dtype(device)); the default pair's weights are cached once in bfloat16 and upcast
    exactly when another dtype is asked for; draft_quantize "int8" quantises the draft's linear
    layers (CPU, float32; see adapters/quantize.py): a cheaper draft, still exact decoding;
    "auto" (the command line's default) is int8 for a float32 draft on the CPU on transformers
    (the faster exact setting in the decode benchmark) and none elsewhere.
    llama.cpp: the GGUF weights run as stored (dtype is not used); threads (default: every
    core), n_ctx (KV cells shared by all rows) and max_batch (most rows) size each context;
    repack lets llama.cpp repack quantised weights for its multi-token kernels (LlamaCppLM);
    defer_draft (the default pair on llama.cpp) loads the draft's weights at its first draft
    (LlamaCppLM `defer`): a run whose cost memory says drafting does not pay never reads them.
    The default pair's files are checked whole (magic and size) when they are assembled, so
    a draft that loads later cannot fail on a damaged file mid-run; a user's draft file is
    loaded now, so that a damaged one is refused before any generation."""
    started = time.perf_counter()
    if draft_quantize not in (*DRAFT_QUANTIZATIONS, "auto"):
        raise ValueError(
            f"draft_quantize: expected one of {[*DRAFT_QUANTIZATIONS, 'auto']}, got "
            f"{draft_quantize!r}"
        )
    if target is None and draft is not None:
        raise ValueError(
            "draft: a draft model needs --target too (the default pair comes "
            "as a whole); got a draft with no target"
        )
    if resolve_backend(backend, target, draft, device, draft_quantize) == "llama.cpp":
        plain = "none" if draft_quantize == "auto" else draft_quantize
        return _load_llamacpp_pair(
            target,
            draft,
            use_draft,
            plain,
            threads,
            n_ctx,
            max_batch,
            repack,
            started,
            defer_draft=defer_draft and target is None,
        )
    if repack:
        raise ValueError(
            "repack: expected the llama.cpp backend (it repacks llama.cpp's quantised weights); "
            f"got --repack with the transformers backend (--backend {backend})"
        )
    dtype = dtype or auto_dtype(device)
    draft_quantize = resolve_draft_quantize(draft_quantize, device, dtype)
    if target is None:
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
            cache = default_pair.quantized_draft_path(draft_quantize, dtype)
            draft_lm = HFCausalLM(quantize_draft_cached(pair.draft, draft_quantize, cache))
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


def _load_llamacpp_pair(
    target: str | None,
    draft: str | None,
    use_draft: bool,
    draft_quantize: str,
    threads: int | None,
    n_ctx: int,
    max_batch: int,
    repack: bool,
    started: float,
    defer_draft: bool = False,
) -> LoadedPair:
    """Both GGUF files on llama.cpp, their tokenizers checked to match first (from the files'
    metadata, before any weights load)."""
    from specsample.adapters.llamacpp import LlamaCppLM, LlamaCppTokenizer, amx_kernels

    if draft_quantize != "none":
        raise ValueError(
            f"draft_quantize: expected 'none' with the llama.cpp backend (a GGUF draft is "
            f"quantised already), got {draft_quantize!r}; use --backend transformers for int8"
        )
    if target is None:
        from specsample.adapters import default_pair

        target_path, draft_path = default_pair.gguf_paths()
        draft_path = draft_path if use_draft else None
        description = "default pair: Qwen2.5-Coder-1.5B-Instruct (target), 0.5B-Instruct (draft)"
    else:
        target_path = check_gguf_file("target", target)
        draft_path = check_gguf_file("draft", draft) if draft is not None and use_draft else None
        description = f"target {target}" + (f", draft {draft}" if draft_path else "")
    draft_tok = None
    if draft_path is not None:
        target_tok = read_gguf_tokenizer(target_path, "target")
        draft_tok = read_gguf_tokenizer(draft_path, "draft")
        check_same_gguf_tokenizer(target_tok, draft_tok)
    sizes = dict(threads=threads, n_ctx=n_ctx, max_batch=max_batch, repack=repack)
    target_lm = LlamaCppLM(target_path, argument="target", **sizes)
    draft_lm = None
    if draft_tok is not None:
        # a deferred draft takes its vocabulary size from the token list just read
        vocab = len(draft_tok.tokens) if defer_draft else None
        draft_lm = LlamaCppLM(
            draft_path, argument="draft", defer=defer_draft, vocab_size=vocab, **sizes
        )
    description += f" on llama.cpp ({target_lm.threads} threads, n_ctx {n_ctx}"
    if repack:
        description += ", weights repacked)"
    elif amx_kernels():
        description += ", weights not repacked: this llama.cpp build's AMX kernels crash on them)"
    else:
        description += ")"
    return LoadedPair(
        target_lm,
        draft_lm,
        LlamaCppTokenizer(target_lm),
        None,
        time.perf_counter() - started,
        _rss(),
        description,
        backend="llama.cpp",
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
    """For a name ending in .gguf: check_gguf_file (before transformers would look for it on the
    hub or fail with a message that names no argument)."""
    if Path(name).suffix == ".gguf":
        check_gguf_file(argument, name)


def _split_gguf(name: str) -> tuple[str, str | None]:
    path = Path(name)
    if path.suffix == ".gguf":
        return str(path.parent), path.name
    return name, None


def _load_tokenizer(name: str) -> Any:
    folder, gguf_file = _split_gguf(name)
    return load_tokenizer(folder, gguf_file)


def _load_model(name: str, dtype: torch.dtype, device: str) -> HFCausalLM:
    folder, gguf_file = _split_gguf(name)
    return HFCausalLM.from_pretrained(folder, dtype=dtype, device=device, gguf_file=gguf_file)


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0
