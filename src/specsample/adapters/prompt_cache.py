"""A prompt cache on disk for llama.cpp models: the keys and values a model computed for a
prompt, kept for later processes, so that a prompt that starts with the same tokens skips
their prefill (llama.cpp's own command line has the same idea as --prompt-cache).

One folder per setting (the caller's key: the model file, the cache's number types, flash
attention, repacking, threads, the library version and the machine); in it one file per
prompt (`<hash of its tokens>.npz`: the tokens, llama.cpp's state of that sequence, and the
logits after its last token), at most MAX_ENTRIES files and MAX_BYTES in all, the least
recently used going first. A damaged or unreadable file, or one whose tokens are not those its
name is the hash of, is ignored (a cache, never an error). Each file's tokens are read once
per PromptCache: a server looks the cache up for every request that joins.

What a cached prefix changes: its keys and values are the ones llama.cpp computed when the
prompt was first prefilled, and the tokens after it are computed in a pass of another shape
than a fresh prefill's, so their logits can differ at the level of llama.cpp's
batch-dependent numerics (see adapters/llamacpp.py). The target stays the distribution the
pass computed, as for every pass, and verification stays exact with respect to it. A prompt
found whole, with its logits, gives back exactly the state and logits of the run that saved it.

Where: $SPECSAMPLE_PROMPT_CACHE (a folder, or "off"), else prompts/ in the cache root
($SPECSAMPLE_CACHE, else $XDG_CACHE_HOME/specsample, else ~/.cache/specsample).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specsample.adapters.folders import cache_folder

__all__ = ["CachedPrompt", "PromptCache", "prompt_cache_directory"]

CACHE_VERSION = 1
ENVIRONMENT = "SPECSAMPLE_PROMPT_CACHE"
MIN_TOKENS = 8  # shorter prompts (and shared prefixes) are prefilled as usual
MAX_ENTRIES = 8  # prompts kept per setting
MAX_BYTES = 1 << 30  # files kept per setting, in all


def prompt_cache_directory() -> Path | None:
    """The folder of the prompt caches, or None when $SPECSAMPLE_PROMPT_CACHE is "off"."""
    return cache_folder(ENVIRONMENT, "prompts")


@dataclass
class CachedPrompt:
    """One kept prompt: its tokens, the model's state of its sequence (llama.cpp's bytes) and
    the float32 logits after its last token."""

    tokens: list[int]
    state: bytes
    logits: np.ndarray


class PromptCache:
    """The kept prompts of one setting (module docstring).

    key: what identifies the setting (JSON-serialisable values). directory: the folder of
    all settings' caches (default prompt_cache_directory()).
    Counts, for statistics: `reused` tokens taken from the cache, `computed` prompt tokens
    prefilled while the cache was attached."""

    def __init__(self, key: dict[str, Any], directory: str | os.PathLike | None = None):
        if directory is None:
            directory = prompt_cache_directory()
            if directory is None:
                raise ValueError(
                    f"directory: expected a folder for the prompt cache, got none "
                    f"(${ENVIRONMENT} is 'off')"
                )
        self.key = {**key, "version": CACHE_VERSION}
        text = json.dumps(self.key, sort_keys=True, default=str)
        self.folder = Path(directory) / f"prompts-{hashlib.sha256(text.encode()).hexdigest()[:20]}"
        self.reused = 0
        self.computed = 0
        # The tokens of each kept file read so far, by file name. A file's name is the hash of
        # its tokens (save), so a name never stands for other tokens: a server looks them up
        # for every request that joins without opening the files again.
        self._tokens: dict[str, np.ndarray] = {}

    @classmethod
    def from_environment(cls, key: dict[str, Any]) -> PromptCache | None:
        """The cache in prompt_cache_directory(), or None when it is off."""
        directory = prompt_cache_directory()
        return None if directory is None else cls(key, directory)

    def longest_prefix(self, tokens: list[int]) -> tuple[int, Path] | None:
        """The kept prompt sharing the longest prefix with `tokens` (at least MIN_TOKENS):
        (shared length, its file), or None."""
        best: tuple[int, Path] | None = None
        entries = self._entries()
        present = {path.name for path in entries}
        for name in [name for name in self._tokens if name not in present]:
            del self._tokens[name]  # evicted (by this process or another)
        for path in entries:
            kept = self._tokens.get(path.name)
            if kept is None:
                kept = _read_tokens(path)
                if kept is None:
                    continue
                self._tokens[path.name] = kept
            shared = _shared_prefix(kept, tokens)
            if shared >= MIN_TOKENS and (best is None or shared > best[0]):
                best = (shared, path)
        return best

    def load(self, path: Path) -> CachedPrompt | None:
        """The prompt kept in `path` (marked as just used), or None when it cannot be read."""
        try:
            with np.load(path) as data:
                entry = CachedPrompt(
                    data["tokens"].astype(np.int64).tolist(),
                    data["state"].tobytes(),
                    np.array(data["logits"], dtype=np.float32),
                )
            os.utime(path)
        except (OSError, ValueError, KeyError):
            return None
        return entry

    def save(self, tokens: list[int], state: bytes, logits: np.ndarray) -> None:
        """Keeps a prompt (atomically; a folder that cannot be written is not an error), then
        drops the least recently used files past MAX_ENTRIES or MAX_BYTES."""
        kept = np.asarray(tokens, dtype=np.int64)
        name = _file_stem(kept)
        path = self.folder / f"{name}.npz"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = self.folder / f"{name}.{os.getpid()}.tmp.npz"
            np.savez(
                partial,
                tokens=kept,
                state=np.frombuffer(state, dtype=np.uint8),
                logits=np.asarray(logits, dtype=np.float32),
            )
            os.replace(partial, path)
            self._tokens[path.name] = kept
            self._evict()
        except OSError:
            pass

    def _entries(self) -> list[Path]:
        """The kept files, most recently used first."""
        try:
            files = [p for p in self.folder.glob("*.npz") if ".tmp" not in p.name]
            return sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True)
        except OSError:
            return []

    def _evict(self) -> None:
        total = 0
        for i, path in enumerate(self._entries()):
            total += path.stat().st_size
            if i >= MAX_ENTRIES or total > MAX_BYTES:
                path.unlink(missing_ok=True)


def _file_stem(tokens: np.ndarray) -> str:
    """The name a prompt's file is kept under: the hash of its tokens (int64)."""
    return hashlib.sha256(tokens.tobytes()).hexdigest()[:32]


def _read_tokens(path: Path) -> np.ndarray | None:
    """The tokens kept in `path` (int64), or None when the file cannot be read or its tokens
    are not the ones its name stands for (a damaged or foreign file)."""
    try:
        with np.load(path) as data:
            kept = np.asarray(data["tokens"], dtype=np.int64)
    except (OSError, ValueError, KeyError):
        return None
    return kept if _file_stem(kept) == path.name.removesuffix(".npz") else None


def _shared_prefix(kept: np.ndarray, tokens: list[int]) -> int:
    n = min(len(kept), len(tokens))
    if n == 0:
        return 0
    differ = np.flatnonzero(kept[:n] != np.asarray(tokens[:n], dtype=kept.dtype))
    return int(differ[0]) if len(differ) else n
