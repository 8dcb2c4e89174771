"""`LanguageModel` / `TreeLanguageModel` on llama.cpp, through llama-cpp-python's low-level API.

How the protocol maps onto llama.cpp:

* One llama context per model. Its KV cache is *unified*: one pool of `n_ctx` cells, each cell
  tagged with the set of sequence ids allowed to attend to it (a query sees the cells of its
  first sequence id at positions up to its own).
* Row b of the batch is one sequence id holding the row's tokens at positions 0..len-1. Only new
  tokens are fed, and logits are requested (`llama_batch.logits`) only for the positions the
  caller gets back. `truncate` removes positions [len, inf) of a row's sequence
  (`llama_memory_seq_rm`); `remove_rows` drops whole sequences and recycles their ids.
* Token trees: every root-to-tip chain of an open tree owns a temporary sequence id that holds
  the row's tokens (tagged with `llama_memory_seq_cp`: no data is copied) and the chain's nodes.
  A node is tagged with every chain through it and queries with the first one, so it attends to
  exactly the row and its ancestors. `commit_path` tags the kept chain with the row's sequence
  and removes the temporary ones.
* A prompt cache (`prompt_cache`, adapters/prompt_cache.py; the command line's `generate`
  attaches one): a row that joins restores the longest prefix the cache kept
  (`llama_state_seq_set_data`), never a position whose logits are asked for unless the prompt
  was kept whole with its logits, and gives the cache its own state afterwards.

Numerics: llama.cpp's kernels may depend on how many tokens a pass holds (repacked quantised
weights take other code paths for several tokens; some attention paths accumulate in half
precision for one token), so the logits of one position can differ between a pass of 1 token and
a pass of K tokens. Decoding is exact with respect to the distributions the verifying pass
computed: that pass defines the target for every position it scores (the position after a
prompt: the prompt pass, which may also score a request's first drafts; after a prefix from
the prompt cache, the pass over the rest). With the defaults
here (no weight repacking) the default pair's logits are identical in passes of 1 to 4 tokens;
from 8 tokens on, llama.cpp's multi-row matrix kernels move them by up to 0.7 (total variation
up to 0.04 at T = 1; benchmarks/llamacpp_passes.md). tests/adapters/test_llamacpp.py states the
tolerances the protocol's consistency properties hold to on a float32 test model.

Everything llama.cpp-specific (ctypes structures, the log callback, memory calls) stays in this
file; `specsample.adapters.gguf_meta` reads GGUF metadata without llama.cpp.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specsample.adapters.gguf_meta import check_gguf_file, read_gguf_tokenizer
from specsample.adapters.prompt_cache import MIN_TOKENS
from specsample.adapters.protocol import (
    check_commit_path_args,
    check_extend_rows,
    check_extend_tree_args,
    check_last,
    check_prompts,
    check_remove_rows_args,
    check_truncate_args,
)

__all__ = ["LlamaCppLM", "LlamaCppTokenizer", "amx_kernels", "default_threads", "is_available"]

INSTALL_HINT = (
    "install it with: pip install 'llama-cpp-python>=0.3' (or the project's `llamacpp` extra; "
    "the first install compiles llama.cpp, about 10 minutes on 2 cores)"
)
_ERROR, _CONT = 4, 5  # ggml log levels (ggml >= 0.9: none, debug, info, warn, error, cont)
_KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type of the cached keys and values
_LOG: deque[tuple[int, str]] = deque(maxlen=200)
_STATE: dict[str, Any] = {}  # the imported module and the log callback (kept alive)
# what LlamaCppLM._load() sets: a deferred model loads at the first use of one of them
_LOADED = frozenset({"_model", "_ctx", "_memory", "_batch", "_batch_views"})


def is_available() -> bool:
    """True if llama-cpp-python can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


# ggml's GGML_MAX_N_THREADS: a larger thread count aborts llama.cpp's compute set-up
MAX_THREADS = 512


def default_threads() -> int:
    """The CPU cores this process may run on (llama.cpp's compute threads by default)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def checked_threads(threads: int | None) -> int:
    """`threads` for llama.cpp (None: every core), refused by name unless 1..MAX_THREADS."""
    threads = default_threads() if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive integer, got {threads!r}")
    if threads > MAX_THREADS:  # more aborts the process inside ggml (std::bad_alloc)
        raise ValueError(
            f"threads: expected at most {MAX_THREADS} (ggml's thread limit; this machine has "
            f"{default_threads()} cores), got {threads}"
        )
    return threads


def most_rows() -> int:
    """The most rows (sequences) one llama.cpp context can hold: the largest max_batch."""
    return int(_llama().llama_max_parallel_sequences())


def _check_sizes(n_ctx: int, max_batch: int) -> int:
    """Refuses by name an n_ctx or max_batch that is not a positive integer, or a max_batch
    above llama.cpp's sequences per context; returns that limit (most_rows())."""
    for name, value in (("n_ctx", n_ctx), ("max_batch", max_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    most = most_rows()
    if max_batch > most:
        raise ValueError(
            f"max_batch: expected at most {most} (llama.cpp's sequences per context), got "
            f"{max_batch}"
        )
    return most


def _llama() -> Any:
    """The llama_cpp module, initialised once, with llama.cpp's log routed into `_LOG` (printed
    only with SPECSAMPLE_LLAMA_LOG=1)."""
    if "module" in _STATE:
        return _STATE["module"]
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(
            f"the llama.cpp backend needs llama-cpp-python; {INSTALL_HINT}"
        ) from error
    echo = os.environ.get("SPECSAMPLE_LLAMA_LOG") == "1"

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: Any) -> None:
        message = text.decode("utf-8", errors="replace")
        if level == _CONT and _LOG:
            last_level, last = _LOG.pop()
            _LOG.append((last_level, last + message))
        else:
            _LOG.append((level, message))
        if echo:
            print(message, end="", file=sys.stderr)

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _STATE.update(module=llama_cpp, callback=on_log)
    return llama_cpp


def amx_kernels() -> bool:
    """True if this llama-cpp-python build compiled llama.cpp's AMX kernels (its system info
    says AMX_INT8 = 1): a build made with -march=native on a processor with AMX tiles does.
    Those kernels run on repacked weights only, and in llama.cpp as llama-cpp-python 0.3.36
    carries it they crash the process with an illegal instruction at the first pass over a
    Q4_K model (seen on a 2-core Intel Xeon with AMX, 2026-12-01). The command line turns
    repacking off for such a build, and tools/setup.sh compiles llama.cpp without AMX."""
    if not is_available():  # loading a model says what to install
        return False
    return b"AMX_INT8 = 1" in _llama().llama_print_system_info()


def _logged_errors() -> str:
    """llama.cpp's error lines since the log was last cleared, as one line."""
    lines = [
        text.strip()
        for level, text in _LOG
        if text.strip() and (level == _ERROR or "error" in text.lower())
    ]
    return "; ".join(lines[-4:])


class _Model:
    """A loaded llama_model (freed with this object) and facts about it."""

    def __init__(
        self, path: str | Path, argument: str, vocab_only: bool = False, repack: bool = False
    ):
        llama = _llama()
        self.path = check_gguf_file(argument, path)
        params = llama.llama_model_default_params()
        params.vocab_only = vocab_only
        params.use_extra_bufts = repack
        if repack and not vocab_only and amx_kernels():
            warnings.warn(
                f"{argument}: repacked weights with a llama.cpp build that has AMX kernels; "
                "in llama-cpp-python 0.3.36 they crash with an illegal instruction (pass "
                "repack=False, or compile llama.cpp without AMX as tools/setup.sh does)",
                stacklevel=3,
            )
        _LOG.clear()
        pointer = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not pointer:
            reason = _logged_errors() or "no reason given"
            raise ValueError(
                f"{argument}: expected a GGUF model llama.cpp can load, got {str(self.path)!r}: "
                f"{reason}"
            )
        self._llama, self.pointer = llama, pointer
        self.vocab = llama.llama_model_get_vocab(pointer)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self.vocab))
        self.architecture = self.meta("general.architecture") or "unknown"
        if not vocab_only:
            self._check_supported(argument)

    def meta(self, key: str) -> str | None:
        """A metadata value as llama.cpp prints it, or None."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._llama.llama_model_meta_val_str(self.pointer, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def _check_supported(self, argument: str) -> None:
        llama = self._llama
        kinds = {
            "an encoder-decoder": llama.llama_model_has_encoder(self.pointer),
            "a recurrent": llama.llama_model_is_recurrent(self.pointer),
            "a hybrid (recurrent + attention)": llama.llama_model_is_hybrid(self.pointer),
            "a diffusion": llama.llama_model_is_diffusion(self.pointer),
        }
        for kind, yes in kinds.items():
            if yes:
                self.close()
                raise ValueError(
                    f"{argument}: expected a decoder-only transformer whose cache can be rolled "
                    f"back token by token, got {kind} model (architecture "
                    f"{self.architecture!r}) in {str(self.path)!r}"
                )

    def close(self) -> None:
        if getattr(self, "pointer", None):
            self._llama.llama_model_free(self.pointer)
            self.pointer = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


@dataclass
class _RowTree:
    """One row's open tree. Per node id: parent (-1: the row's last token), depth (1 for a child
    of the root), validity, and the temporary sequences it was fed with (its home chain, the one
    it queries with, first; chains started through it by later calls are tagged in llama.cpp's
    cells only, as nothing here reads them). `tip` maps each temporary sequence to the deepest
    node of its chain."""

    parent: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)
    seqs: list[list[int]] = field(default_factory=list)
    tip: dict[int, int] = field(default_factory=dict)


class LlamaCppLM:
    """A GGUF model run by llama.cpp, implementing `LanguageModel` and `TreeLanguageModel`.

    Args:
        path: the .gguf file.
        n_ctx: KV cells of the context, shared by every row and open tree node (a row can use
            them all). Default 4096.
        max_batch: most rows at once (each is a llama.cpp sequence, at most
            `llama_max_parallel_sequences()`, 256). Default 64.
        threads: compute threads (default: every core this process may use).
        n_batch: most tokens per llama_decode call; longer feeds are split. Default
            min(n_ctx, 2048).
        tree_chains: sequence ids kept for open trees beyond max_batch (each root-to-tip chain of
            an open tree takes one; rows no longer present free theirs too). Default 64.
        kv_type: "f16" (default, llama.cpp's) or "f32" keys and values in the cache.
        flash_attn: llama.cpp's flash attention: None (default) lets llama.cpp decide.
            Measured on a float32 test model: with f16 keys/values or flash attention on, a
            position's logits in a 1-token pass and in a K-token pass differ by about 1e-3
            (half-precision accumulation in one of the two paths); with "f32" and
            flash_attn=False by about 5e-6 (float32 rounding).
        repack: let llama.cpp repack quantised weights for its multi-token CPU kernels (its
            default). Off by default here: on the default pair (Q4_K_M, AVX2) a position's
            logits then come out bit-identical in passes of 1 to 4 tokens, while repacked
            kernels move them by up to 0.6 from 4 tokens on (total variation up to 0.07 at
            T = 1); on 2 cores the pass times of up to 16 tokens were the same either way.
        argument: how error messages name this model ("target", "draft", ...).
        defer: load the weights and create the context at the first call that needs them
            (a prefill, a pass, the cache's state) instead of now. The file's header and
            tokenizer are read now (the vocabulary size comes from its token list), so a
            missing file, one that is not GGUF or one without a tokenizer is refused here; a
            file whose weights are damaged is refused at that first call. For a draft model
            that may never draft: where the cost memory says drafting does not pay, its
            weights are never read (about 0.65 GiB and half a second for the default draft).
        vocab_size: with `defer`, the length of the file's token list where the caller has
            read it already (load_pair does, to compare the tokenizers); else it is read here
            (about 50 ms for the default draft). Checked against the model when it loads.
    """

    # a batch pass feeds each row's own tokens as one flat llama.cpp batch (no padding to the
    # widest row): it costs by the tokens of all rows (the engine's cost records use this)
    ragged_passes = True

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 4096,
        max_batch: int = 64,
        threads: int | None = None,
        n_batch: int | None = None,
        tree_chains: int = 64,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
        repack: bool = False,
        argument: str = "model",
        defer: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        llama = _llama()
        if kv_type not in _KV_TYPES:
            raise ValueError(f"kv_type: expected one of {sorted(_KV_TYPES)}, got {kv_type!r}")
        if flash_attn not in (None, True, False):
            raise ValueError(f"flash_attn: expected None, True or False, got {flash_attn!r}")
        most = _check_sizes(n_ctx, max_batch)
        if not isinstance(tree_chains, int) or tree_chains < 0:
            raise ValueError(f"tree_chains: expected an integer >= 0, got {tree_chains!r}")
        # Every sequence reserves an output row of vocab floats, so ask for no more than needed.
        self.n_seq_max = min(most, max_batch + tree_chains)
        self.tree_chains = tree_chains
        threads = checked_threads(threads)
        n_batch = min(n_ctx, 2048) if n_batch is None else n_batch
        if not isinstance(n_batch, int) or n_batch < 1:
            raise ValueError(f"n_batch: expected a positive integer, got {n_batch!r}")
        if defer not in (True, False):
            raise ValueError(f"defer: expected True or False, got {defer!r}")
        if vocab_size is not None and (
            not defer
            or isinstance(vocab_size, bool)
            or not isinstance(vocab_size, int)
            or vocab_size < 1
        ):
            raise ValueError(
                f"vocab_size: expected None, or a positive integer with defer=True, got "
                f"{vocab_size!r} with defer={defer!r}"
            )
        self._llama = llama
        self.argument = argument
        self.n_ctx, self.max_batch, self.threads, self.n_batch = n_ctx, max_batch, threads, n_batch
        self.repack, self.kv_type, self.flash_attn = repack, kv_type, flash_attn
        self._rows: list[int] = []  # sequence id of each row
        self._lengths: list[int] = []
        self._free = list(range(self.n_seq_max))  # unused sequence ids, smallest first
        self._started = False
        self._tree: list[_RowTree] | None = None
        self._tree_parents = torch.zeros(0, 0, dtype=torch.long)
        self._tree_valid = torch.zeros(0, 0, dtype=torch.bool)
        self.num_calls = 0  # llama_decode calls
        self.num_positions = 0  # tokens fed
        # adapters.prompt_cache.PromptCache: prompts that join restore the longest prefix it
        # kept and give it their own state (None: every prompt is prefilled whole)
        self.prompt_cache = None
        self.load_seconds = 0.0  # the weights' load and the context's creation
        if defer:
            self.path = check_gguf_file(argument, path)
            if vocab_size is None:
                vocab_size = len(read_gguf_tokenizer(self.path, argument).tokens)
            self.vocab_size = vocab_size
            self._deferred = True  # _load() at the first use of a name in _LOADED
        else:
            self._deferred = False
            self._load(path)

    @property
    def loaded(self) -> bool:
        """Whether the weights are loaded (False only for `defer` before the first use)."""
        return not self.__dict__.get("_deferred", False)

    def __getattr__(self, name: str) -> Any:
        # only reached for names not set yet: those _load() sets, on a deferred model
        if name in _LOADED and self.__dict__.get("_deferred"):
            self._load(self.path)
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _load(self, path: str | Path) -> None:
        """Loads the weights and creates the context, its batch and their views."""
        started = time.perf_counter()
        argument = self.argument
        model = _Model(path, argument, repack=self.repack)
        if self.__dict__.get("_deferred") and model.n_vocab != self.vocab_size:
            model.close()
            raise ValueError(
                f"{argument}: expected {self.vocab_size} tokens (the file's token list), got a "
                f"model of {model.n_vocab} from {str(model.path)!r}"
            )
        self._model = model
        self.path = model.path
        self.vocab_size = model.n_vocab
        self._make_context()
        self._deferred = False
        self.load_seconds = time.perf_counter() - started

    def _make_context(self) -> None:
        """Creates the context (n_ctx cells, n_seq_max sequences), its batch and their views."""
        llama, argument = self._llama, self.argument
        n_ctx, n_batch, threads = self.n_ctx, self.n_batch, self.threads
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = self.n_seq_max
        params.n_outputs_max = max(n_batch, self.n_seq_max)  # llama.cpp needs >= n_seq_max
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # trees: one cell may belong to several sequences
        params.swa_full = True  # sliding-window models keep every cell, so rollback works
        params.no_perf = True
        params.type_k = params.type_v = _KV_TYPES[self.kv_type]
        params.flash_attn_type = {None: -1, False: 0, True: 1}[self.flash_attn]
        _LOG.clear()
        self._ctx = llama.llama_init_from_model(self._model.pointer, params)
        if not self._ctx:
            raise RuntimeError(
                f"{argument}: llama.cpp could not create a context of n_ctx={n_ctx}: "
                f"{_logged_errors() or 'no reason given'}"
            )
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(n_batch, 0, self.n_seq_max)
        self._batch_views = (
            np.ctypeslib.as_array(self._batch.token, shape=(n_batch,)),
            np.ctypeslib.as_array(self._batch.pos, shape=(n_batch,)),
            np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_batch,)),
            np.ctypeslib.as_array(self._batch.logits, shape=(n_batch,)),
        )

    def resize(self, n_ctx: int | None = None, max_batch: int | None = None) -> None:
        """Gives the context `n_ctx` KV cells and room for `max_batch` rows (None: as they
        are), before any row was added: the weights stay loaded (a deferred model stays
        deferred) and only the context is created again. For front ends that size the context
        to a job once its prompts are tokenized."""
        if self._rows or self._tree is not None:
            raise RuntimeError(
                f"resize: expected a model holding no rows, got one holding {len(self._rows)}"
            )
        n_ctx = self.n_ctx if n_ctx is None else n_ctx
        max_batch = self.max_batch if max_batch is None else max_batch
        most = _check_sizes(n_ctx, max_batch)
        if (n_ctx, max_batch) == (self.n_ctx, self.max_batch):
            return
        loaded = self.loaded
        if loaded:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
            self._llama.llama_free(self._ctx)
            self._ctx = None
        self.n_ctx, self.max_batch = n_ctx, max_batch
        self.n_batch = min(self.n_batch, n_ctx)
        self.n_seq_max = min(most, max_batch + self.tree_chains)
        self._free = list(range(self.n_seq_max))
        self._started = False
        if loaded:
            self._make_context()

    @property
    def most_rows(self) -> int:
        """The most rows (sequences) a llama.cpp context can hold: the largest max_batch."""
        return most_rows()

    @property
    def n_ctx_train(self) -> int:
        """The context the model was trained for (the GGUF's `<architecture>.context_length`):
        positions past it are not what the model learned."""
        return int(self._llama.llama_model_n_ctx_train(self._model.pointer))

    # ------------------------------------------------------------------ facts

    @property
    def lengths(self) -> torch.Tensor:
        """Current number of tokens per row, int64 `[batch]` (open tree nodes excluded)."""
        return torch.tensor(self._lengths, dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    @property
    def cells_used(self) -> int:
        """KV cells in use: every row's tokens plus the open tree's valid nodes."""
        nodes = 0 if self._tree is None else sum(sum(t.valid) for t in self._tree)
        return sum(self._lengths) + nodes

    @property
    def architecture(self) -> str:
        return self._model.architecture

    # ------------------------------------------------------------------ protocol

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Reset to `prompts`; returns float logits `[batch, vocab]` after each prompt."""
        rows = check_prompts(prompts, self.vocab_size)
        self._check_new_rows(rows, existing=0, used=0)
        self._llama.llama_memory_clear(self._memory, False)
        self._rows, self._lengths, self._tree = [], [], None
        self._free = list(range(self.n_seq_max))
        return self.add_rows(rows)

    def add_rows(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append one row per prompt; returns float logits `[len(prompts), vocab]`."""
        return self._add_rows(prompts, 1, "add_rows")[:, -1]

    def add_rows_last(self, prompts: Sequence[Sequence[int]], last: int) -> torch.Tensor:
        """`add_rows` returning the logits after each of each prompt's last `last` tokens,
        `[len(prompts), last, vocab]` (see `PromptScoring`); only those positions' logits
        are computed."""
        return self._add_rows(prompts, check_last(last), "add_rows_last")

    def _add_rows(self, prompts: Sequence[Sequence[int]], last: int, call: str) -> torch.Tensor:
        self._require_no_tree(call)
        rows = check_prompts(prompts, self.vocab_size)
        self._check_new_rows(rows, existing=len(self._rows), used=self.cells_used)
        seqs = [self._free.pop(0) for _ in rows]
        scored = [min(last, len(row)) for row in rows]  # positions whose logits are computed
        tokens, positions, seq_ids, wanted = [], [], [], []
        # per row: tokens taken from the prompt cache, and its logits when it was found whole
        kept: list[tuple[int, np.ndarray | None]] = [(0, None)] * len(rows)
        try:
            for r, (seq, row, n) in enumerate(zip(seqs, rows, scored, strict=True)):
                if self.prompt_cache is not None:
                    kept[r] = self._restore_prefix(seq, row, n)
                    self.prompt_cache.reused += kept[r][0]
                    self.prompt_cache.computed += len(row) - kept[r][0]
                start = kept[r][0]  # a whole row (kept with its logits) feeds nothing
                tokens += row[start:]
                positions += range(start, len(row))
                seq_ids += [(seq,)] * (len(row) - start)
                fed = len(row) - start
                wanted += [False] * (fed - min(n, fed)) + [True] * min(n, fed)
            logits = self._decode(tokens, positions, seq_ids, wanted)
        except BaseException:
            for seq in seqs:
                self._llama.llama_memory_seq_rm(self._memory, seq, -1, -1)
            self._free = sorted(self._free + seqs)
            raise
        self._rows += seqs
        self._lengths += [len(row) for row in rows]
        self._started = True
        out = torch.zeros(len(rows), last, self.vocab_size)
        at = 0
        for r, n in enumerate(scored):
            if kept[r][1] is not None:  # found whole: its last logits were kept with it
                out[r, last - 1] = torch.from_numpy(kept[r][1])
                continue
            out[r, last - n :] = torch.from_numpy(logits[at : at + n])
            at += n
            if self.prompt_cache is not None:
                self._keep_prompt(seqs[r], rows[r], logits[at - 1])
        return out

    def _restore_prefix(
        self, seq: int, row: list[int], scored: int
    ) -> tuple[int, np.ndarray | None]:
        """Restores into sequence `seq` the longest prefix of `row` the prompt cache kept
        (adapters/prompt_cache.py), never one of the last `scored` positions, whose logits
        the caller wants computed, unless the row was kept whole with its logits and only its
        last position is wanted. Returns (tokens restored, those logits or None)."""
        cache = self.prompt_cache
        hit = cache.longest_prefix(row)
        entry = None if hit is None else cache.load(hit[1])
        if entry is None or entry.logits.shape != (self.vocab_size,):
            return 0, None
        whole = len(entry.tokens) == len(row) == hit[0] and scored == 1
        keep = len(row) if whole else min(hit[0], len(row) - scored)
        if keep < MIN_TOKENS:
            return 0, None
        state = (ctypes.c_uint8 * len(entry.state)).from_buffer_copy(entry.state)
        llama = self._llama
        if not llama.llama_state_seq_set_data(self._ctx, state, len(entry.state), seq):
            llama.llama_memory_seq_rm(self._memory, seq, -1, -1)
            return 0, None
        if keep < len(entry.tokens):
            self._seq_rm(seq, keep)
        return keep, entry.logits if whole else None

    def _keep_prompt(self, seq: int, row: list[int], logits: np.ndarray) -> None:
        """Gives the prompt cache this row's state and last logits (rows shorter than its
        MIN_TOKENS are not kept; the caller skips rows restored whole)."""
        if len(row) < MIN_TOKENS:
            return
        llama = self._llama
        size = int(llama.llama_state_seq_get_size(self._ctx, seq))
        buffer = (ctypes.c_uint8 * size)()
        written = int(llama.llama_state_seq_get_data(self._ctx, buffer, size, seq))
        if written:
            self.prompt_cache.save(row, bytes(buffer[:written]), logits)

    def remove_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (increasing indices), renumbered 0..m-1."""
        self._require_state()
        self._require_no_tree("remove_rows")
        kept = check_remove_rows_args(keep, len(self._rows)).tolist()
        for b in sorted(set(range(len(self._rows))) - set(kept)):
            self._llama.llama_memory_seq_rm(self._memory, self._rows[b], -1, -1)
            self._free.append(self._rows[b])
        self._free.sort()
        self._rows = [self._rows[b] for b in kept]
        self._lengths = [self._lengths[b] for b in kept]

    def extend(self, tokens: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        """Append `tokens[b, :num_valid[b]]`; returns float logits `[batch, n, vocab]`."""
        logits, where = self._append(tokens, num_valid, "extend", logits=True)
        batch, width = tokens.shape[0], tokens.shape[1]
        if logits is not None and len(where) == batch * width:  # every row fed `width` tokens
            return torch.from_numpy(logits).view(batch, width, self.vocab_size)
        out = torch.zeros(batch, width, self.vocab_size)
        if where:
            index = torch.tensor(where, dtype=torch.long)
            out[index[:, 0], index[:, 1]] = torch.from_numpy(logits)
        return out

    def advance(self, tokens: torch.Tensor, num_valid: torch.Tensor) -> None:
        """`extend` without logits: appends `tokens[b, :num_valid[b]]` and computes no
        distribution (a drafter catching up on tokens it skipped needs only their keys and
        values; the vocabulary projection of every position would cost a third more on a
        0.5B model)."""
        self._append(tokens, num_valid, "advance", logits=False)

    def _append(
        self, tokens: torch.Tensor, num_valid: torch.Tensor, call: str, *, logits: bool
    ) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
        """Feeds `tokens[b, :num_valid[b]]` after each row (checked for `call`); returns the
        logits of the fed tokens (`[fed, vocab]` with `logits`, else `[0, vocab]`; None when
        nothing was fed) and each fed token's (row, column)."""
        self._require_state()
        self._require_no_tree(call)
        rows, counts = check_extend_rows(tokens, num_valid, len(self._rows), self.vocab_size)
        self._check_room(sum(counts))
        feed_tokens, positions, seq_ids, where = [], [], [], []
        for b, (row, k) in enumerate(zip(rows, counts, strict=True)):
            feed_tokens += row
            positions += range(self._lengths[b], self._lengths[b] + k)
            seq_ids += [(self._rows[b],)] * k
            where += [(b, j) for j in range(k)]
        out = None
        if where:
            out = self._decode(feed_tokens, positions, seq_ids, [logits] * len(where))
        self._lengths = [length + k for length, k in zip(self._lengths, counts, strict=True)]
        return out, where

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep the first `lengths[b]` tokens of row b (int64 `[batch]`)."""
        self._require_state()
        self._require_no_tree("truncate")
        lengths = check_truncate_args(lengths, self.lengths).tolist()
        for b, (new, old) in enumerate(zip(lengths, self._lengths, strict=True)):
            if new < old:
                self._seq_rm(self._rows[b], new)
        self._lengths = lengths

    def extend_tree(
        self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Add tree nodes (see `TreeLanguageModel.extend_tree`); logits `[batch, n, vocab]`."""
        self._require_state()
        batch = len(self._rows)
        if self._tree is None:
            trees = [_RowTree() for _ in range(batch)]
            tree_parents = torch.zeros(batch, 0, dtype=torch.long)
            tree_valid = torch.zeros(batch, 0, dtype=torch.bool)
        else:
            trees, tree_parents, tree_valid = self._tree, self._tree_parents, self._tree_valid
        tokens, parents, valid = check_extend_tree_args(
            tokens, parents, valid, batch, self.vocab_size, tree_valid
        )
        n = tokens.shape[1]
        self._check_room(int(valid.sum()))
        plans = [
            _plan_nodes(trees[b], parents[b].tolist(), valid[b].tolist()) for b in range(batch)
        ]
        fresh = sum(len(plan.copies) for plan in plans)
        if fresh > len(self._free):
            raise RuntimeError(
                f"extend_tree: the tree needs {fresh} more chains but only {len(self._free)} of "
                f"the context's {self.n_seq_max} sequence ids are free ({batch} rows hold one "
                "each); create the model with a larger tree_chains, or use narrower trees"
            )
        # Number the planned chains with real sequence ids, then tag their prefixes.
        feed_tokens, positions, seq_ids, where, taken, chain_ids = [], [], [], [], [], []
        for b, plan in enumerate(plans):
            ids = [self._free.pop(0) for _ in plan.copies]
            taken += ids
            chain_ids.append(ids)
            real = plan.renumber(ids)
            tree, length = trees[b], self._lengths[b]
            for (source_node, _), seq in zip(plan.copies, ids, strict=True):
                if source_node < 0:  # a chain from the root: the row's tokens
                    self._llama.llama_memory_seq_cp(self._memory, self._rows[b], seq, -1, -1)
                else:  # the row and the chain down to an already cached node
                    source = tree.seqs[source_node][0]
                    end = length + tree.depth[source_node]  # positions [0, end)
                    self._llama.llama_memory_seq_cp(self._memory, source, seq, -1, end)
            for j in range(n):
                if plan.valid[j]:
                    feed_tokens.append(int(tokens[b, j]))
                    positions.append(length - 1 + plan.depth[j])
                    seq_ids.append(tuple(real[j]))
                    where.append((b, j))
        out = torch.zeros(batch, n, self.vocab_size)
        try:
            if where:
                logits = self._decode(feed_tokens, positions, seq_ids, [True] * len(where))
                index = torch.tensor(where, dtype=torch.long)
                out[index[:, 0], index[:, 1]] = torch.from_numpy(logits)
        except BaseException:
            for seq in taken:  # chains of this call only; earlier ones stay as they were
                self._llama.llama_memory_seq_rm(self._memory, seq, -1, -1)
            self._free = sorted(self._free + taken)
            raise
        for tree, plan, ids in zip(trees, plans, chain_ids, strict=True):
            plan.apply(tree, ids)
        self._tree = trees
        self._tree_parents = torch.cat([tree_parents, torch.where(valid, parents, -1)], dim=1)
        self._tree_valid = torch.cat([tree_valid, valid], dim=1)
        return out

    def commit_path(self, path: torch.Tensor) -> None:
        """Close the open tree, appending row b's nodes `path[b]` (ids, -1 padded)."""
        self._require_state()
        if self._tree is None:
            raise RuntimeError("commit_path: no tree is open (call extend_tree() first)")
        path = check_commit_path_args(path, self._tree_parents, self._tree_valid)
        for b, row in enumerate(path.tolist()):
            tree, length = self._tree[b], self._lengths[b]
            kept = [node for node in row if node >= 0]
            if kept:
                last = kept[-1]
                end = length + tree.depth[last]
                home = tree.seqs[last][0]
                self._llama.llama_memory_seq_cp(self._memory, home, self._rows[b], length, end)
                self._lengths[b] = end
            for seq in tree.tip:
                self._llama.llama_memory_seq_rm(self._memory, seq, -1, -1)
                self._free.append(seq)
        self._free.sort()
        self._tree = None

    # ------------------------------------------------------------------ internals

    def _decode(
        self,
        tokens: list[int],
        positions: Sequence[int],
        seq_ids: list[tuple[int, ...]],
        wanted: list[bool],
    ) -> np.ndarray:
        """Feed tokens (with their positions and sequence ids, in an order llama.cpp accepts:
        positions increase within each sequence) in passes of at most n_batch tokens. Returns
        the logits of the `wanted` tokens, float32 `[n_wanted, vocab]`, in feeding order."""
        llama, batch = self._llama, self._batch
        token_view, pos_view, n_seq_view, logits_view = self._batch_views
        out = np.empty((sum(wanted), self.vocab_size), dtype=np.float32)
        filled = 0
        for start in range(0, len(tokens), self.n_batch):
            stop = min(start + self.n_batch, len(tokens))
            m = stop - start
            token_view[:m] = tokens[start:stop]
            pos_view[:m] = positions[start:stop]
            logits_view[:m] = wanted[start:stop]
            for i in range(m):
                ids = seq_ids[start + i]
                n_seq_view[i] = len(ids)
                slot = batch.seq_id[i]
                for k, seq in enumerate(ids):
                    slot[k] = seq
            batch.n_tokens = m
            _LOG.clear()
            code = llama.llama_decode(self._ctx, batch)
            self.num_calls += 1
            self.num_positions += m
            if code != 0:
                raise RuntimeError(self._decode_error(code, m))
            k = int(sum(wanted[start:stop]))
            if k:
                pointer = llama.llama_get_logits(self._ctx)
                block = np.ctypeslib.as_array(pointer, shape=(k, self.vocab_size))
                out[filled : filled + k] = block
                filled += k
        return out

    def _decode_error(self, code: int, m: int) -> str:
        if code == 1:
            return (
                f"{self.argument}: llama.cpp found no room for {m} more tokens in its context of "
                f"n_ctx={self.n_ctx} cells ({self.cells_used} in use); use a larger n_ctx"
            )
        return (
            f"{self.argument}: llama_decode failed with code {code}: "
            f"{_logged_errors() or 'no reason given'}"
        )

    def _seq_rm(self, seq: int, start: int) -> None:
        if not self._llama.llama_memory_seq_rm(self._memory, seq, start, -1):
            raise RuntimeError(
                f"{self.argument}: llama.cpp could not remove positions {start}.. of sequence "
                f"{seq} (this model's cache cannot be rolled back)"
            )

    def _check_new_rows(self, rows: list[list[int]], existing: int, used: int) -> None:
        if existing + len(rows) > self.max_batch:
            raise ValueError(
                f"prompts: expected at most max_batch={self.max_batch} rows in all, got "
                f"{len(rows)} new rows on top of {existing}; create the model with a larger "
                "max_batch"
            )
        for b, row in enumerate(rows):
            if len(row) > self.n_ctx:
                raise ValueError(
                    f"prompts[{b}]: expected at most n_ctx={self.n_ctx} tokens (the context "
                    f"size), got {len(row)}; create the model with a larger n_ctx"
                )
        total = sum(len(row) for row in rows)
        if used + total > self.n_ctx:
            raise ValueError(
                f"prompts: expected at most {self.n_ctx - used} tokens in all (n_ctx="
                f"{self.n_ctx} cells, {used} in use), got {total}; create the model with a "
                "larger n_ctx"
            )

    def _check_room(self, new: int) -> None:
        used = self.cells_used
        if used + new > self.n_ctx:
            raise ValueError(
                f"tokens: expected at most {self.n_ctx - used} new tokens (n_ctx={self.n_ctx} "
                f"cells shared by all rows, {used} in use), got {new}; create the model with a "
                "larger n_ctx"
            )

    def _require_no_tree(self, method: str) -> None:
        if self._tree is not None:
            raise RuntimeError(f"{method}: a token tree is open; call commit_path() first")

    def _require_state(self) -> None:
        if not self._started:
            raise RuntimeError("call prefill() before extend() or truncate()")

    def close(self) -> None:
        """Free the context now and let go of the model (also done when the object is
        collected)."""
        llama = self.__dict__.get("_llama")
        if llama is None:
            return
        self._deferred = False  # a deferred model closed unused is never loaded
        if self.__dict__.get("_batch") is not None:
            llama.llama_batch_free(self._batch)
        self._batch = None
        if self.__dict__.get("_ctx"):
            llama.llama_free(self._ctx)
        self._ctx = None
        # The model is freed with the last reference to it (a tokenizer may still share it).
        self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    def __repr__(self) -> str:
        return (
            f"LlamaCppLM({str(self.path)!r}, n_ctx={self.n_ctx}, max_batch={self.max_batch}, "
            f"threads={self.threads})"
        )


@dataclass
class _Plan:
    """Where one row's new tree nodes go. Chains are numbered -1, -2, ... until real sequence
    ids are known; `copies[c]` = (the cached node whose chain prefix chain c starts from, or -1
    for the root; chain c's placeholder). Per new column: depth, validity and chains (home
    first)."""

    parent: list[int]
    depth: list[int]
    valid: list[bool]
    seqs: list[list[int]]
    copies: list[tuple[int, int]]
    tip: dict[int, int]

    def renumber(self, ids: list[int]) -> list[list[int]]:
        """Per new column, its chains with real sequence ids (`ids[c]` for placeholder -1-c)."""
        return [[ids[-1 - s] if s < 0 else s for s in chains] for chains in self.seqs]

    def apply(self, tree: _RowTree, ids: list[int]) -> None:
        """Record the new nodes and chain tips in `tree`, with real sequence ids `ids`. Cached
        nodes that a new chain passes through need no record: only their home chain is read,
        and llama.cpp's cells already carry the new tag."""
        tree.parent += self.parent
        tree.depth += self.depth
        tree.valid += self.valid
        tree.seqs += self.renumber(ids)
        for seq, node in self.tip.items():
            tree.tip[ids[-1 - seq] if seq < 0 else seq] = node


def _plan_nodes(tree: _RowTree, parents: list[int], valid: list[bool]) -> _Plan:
    """Assign chains (sequences) to one row's new nodes, in id order.

    A node continues its parent's home chain when the parent is that chain's tip (it has no
    child yet); otherwise it starts a new chain, which holds the row, the cached ancestors
    (tagged by copying the prefix of the deepest cached ancestor's home chain) and the new
    ancestors (tagged in this pass: the chain is added to their sequence lists)."""
    first = len(tree.parent)
    plan = _Plan([], [], [], [], [], {})
    tips = dict(tree.tip)  # chain -> tip node, updated as nodes are placed

    def node_depth(node: int) -> int:
        return tree.depth[node] if node < first else plan.depth[node - first]

    def node_seqs(node: int) -> list[int]:
        return tree.seqs[node] if node < first else plan.seqs[node - first]

    for j, (parent, ok) in enumerate(zip(parents, valid, strict=True)):
        node = first + j
        plan.valid.append(bool(ok))
        if not ok:
            plan.parent.append(-1)
            plan.depth.append(0)
            plan.seqs.append([])
            continue
        plan.parent.append(parent)
        plan.depth.append(1 if parent < 0 else node_depth(parent) + 1)
        home = node_seqs(parent)[0] if parent >= 0 else None
        if home is not None and tips.get(home) == parent:
            chain = home
        else:
            chain = -1 - len(plan.copies)
            ancestor = parent
            while ancestor >= first:  # new ancestors: tagged with the chain in this pass
                plan.seqs[ancestor - first].append(chain)
                ancestor = plan.parent[ancestor - first]
            plan.copies.append((ancestor, chain))
        tips[chain] = node
        plan.tip[chain] = node
        plan.seqs.append([chain])
    return plan


class LlamaCppTokenizer:
    """Text <-> token ids with the tokenizer inside a GGUF file (llama.cpp's own), and the chat
    template from its metadata, with the parts of transformers' tokenizer interface the
    command line uses (`encode`, `decode`, `apply_chat_template`, `eos_token_id`, ...).

    Build it from a loaded `LlamaCppLM` (sharing its model) or from a path (loads the
    vocabulary only)."""

    def __init__(self, source: LlamaCppLM | str | Path, argument: str = "model"):
        self._llama = _llama()
        if isinstance(source, LlamaCppLM):
            self._model = source._model
        else:
            self._model = _Model(source, argument, vocab_only=True)
        llama, vocab = self._llama, self._model.vocab
        self._vocab = vocab
        self.vocab_size = self._model.n_vocab
        self.bos_token_id = _token_or_none(llama.llama_vocab_bos(vocab))
        self.eos_token_id = _token_or_none(llama.llama_vocab_eos(vocab))
        self.unk_token_id = None
        self.add_bos = bool(llama.llama_vocab_get_add_bos(vocab))
        template = llama.llama_model_chat_template(self._model.pointer, None)
        self.chat_template: str | None = template.decode("utf-8") if template else None

    def __len__(self) -> int:
        return self.vocab_size

    def token_text(self, token_id: int) -> str:
        """The token's text as the GGUF stores it (byte-level BPE: 'Ġ' for a space, ...)."""
        text = self._llama.llama_vocab_get_text(self._vocab, token_id)
        return (text or b"").decode("utf-8", errors="replace")

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.token_text(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.token_text(self.eos_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. '<|im_start|>') become
        their ids. add_special_tokens: add BOS/EOS where the GGUF says so."""
        data = text.encode("utf-8")
        capacity = len(data) + 16
        while True:
            buf = (self._llama.llama_token * capacity)()
            n = self._llama.llama_tokenize(
                self._vocab, data, len(data), buf, capacity, add_special_tokens, True
            )
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (an incomplete UTF-8 sequence at the end decodes to U+FFFD)."""
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        array = (self._llama.llama_token * len(ids))(*ids)
        capacity = 8 * len(ids) + 32
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = self._llama.llama_detokenize(
                self._vocab, array, len(ids), buf, capacity, False, not skip_special_tokens
            )
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            capacity = -n

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """The id of a special token written out (e.g. '<|im_end|>'), or None if the vocabulary
        has no such single token."""
        ids = self.encode(token, add_special_tokens=False)
        if len(ids) == 1 and self.token_text(ids[0]) == token:
            return ids[0]
        return None

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        **variables: Any,
    ) -> str | list[int]:
        """Render the GGUF's chat template (tokenizer.chat_template, Jinja) for `messages`."""
        if not self.chat_template:
            raise ValueError(
                "messages: this GGUF has no chat template (tokenizer.chat_template); send the "
                "prompt as raw text"
            )
        text = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **variables,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token_or_none(token: int) -> int | None:
    return None if token < 0 else int(token)


def render_chat_template(template: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """Render a Jinja chat template the way transformers does (sandboxed, trimmed blocks,
    `tojson`, `raise_exception`, `strftime_now`)."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, **variables)
