"""The adaptive draft length's pass costs, kept across processes.

Whether drafting pays is a fact of the machine, the backend and the two models, not of the
text: on llama.cpp on 2 cores no draft length pays for the default pair, on transformers long
drafts do. Without a memory every process finds that out again: three target-only steps, then
one or two probe steps (4 drafts each) and, for a model drafter, the draft model's prefill of
the prompt, about 5% of a 128-token run of the command line on llama.cpp, and on transformers
three of the ten-odd target passes of a 64-token run spent before long drafts start.

A CostMemory is one JSON file per setting: the key names the backend, the models (path, size
and modification time of a file), the drafter and its stops, the rule, the largest draft
length, the threads, the torch and llama-cpp-python versions and the machine (processor
model, usable cores). It holds, per batch size, the last pass timings (AdaptiveDraftLength's
StepCosts windows) and the verdict. AdaptiveDraftLength.recall loads it: each remembered batch
size starts from those costs and that verdict; the target pass of its first step (1 token after
a "no", the drafting step's width after a "yes") must cost what the remembered costs say
(at most MATCH_FACTOR times their median, at least their fastest 1-token pass's share divided
by MATCH_FACTOR: the remembered samples include a cold process's slow first passes); if it
does not, the next pass is checked as well, and if neither matches the memory of that batch
size is dropped and its cost check runs as without one (one slow pass, the machine busy for a
moment, does not drop it). A remembered "no" is dropped only by passes faster than
remembered: slower ones (the machine busier than when the memory was written) leave it
standing with its costs (AdaptiveDraftLength._check_recalled). The policy writes the file
again whenever a verdict changes and whenever it times a pass length for the first time or
comes to trust one (at most twice per length and batch size in a process). Files older than
MAX_AGE_DAYS are not used.

The keep rates are of the text as well, so the memory holds them only as a prior: the decayed
keep tests of the last process's rows by draft position (pooled over its rows), written when a
request ends. A later process seeds its pooled counts with them, scaled to at most 3 tests at
the first position: the prior of its rows' position rates and of the keep-rate bound that
decides which drafts are worth their pass, which a row's own tests outweigh within a few
steps. Without it every request learns again that (say) the n-gram drafter's one-token drafts
are rarely kept, by verifying a few of them: on llama.cpp on 2 cores, where a 2-token pass
costs 1.7 1-token passes, about 5% of a 96-token run.

The draft length never depends on the target's future, whatever it remembers: decoding stays
exact with or without a memory. Where: $SPECSAMPLE_COST_MEMORY (a folder, or "off"), else
costs/ in the cache root ($SPECSAMPLE_CACHE, else $XDG_CACHE_HOME/specsample, else
~/.cache/specsample).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from specsample.adapters.folders import cache_folder

MEMORY_VERSION = 1
MATCH_FACTOR = 1.3  # a first pass within this factor of what the memory says: the same speed
MAX_AGE_DAYS = 7
ENVIRONMENT = "SPECSAMPLE_COST_MEMORY"


def memory_directory() -> Path | None:
    """The folder of the cost memories, or None when $SPECSAMPLE_COST_MEMORY is "off"."""
    return cache_folder(ENVIRONMENT, "costs")


def machine_facts() -> dict[str, Any]:
    """What makes pass costs differ between machines: the processor model, the cores this
    process may use, the architecture, and the versions of the compute libraries."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    processor = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    facts: dict[str, Any] = {
        "processor": processor,
        "cores": cores,
        "architecture": platform.machine(),
    }
    for package in ("torch", "llama-cpp-python"):
        try:
            facts[package] = version(package)
        except PackageNotFoundError:
            facts[package] = None
    return facts


def file_identity(name: str | os.PathLike | None) -> str | None:
    """A model named by a path: the resolved path, its size and modification time (a file
    replaced by another is another model); a hub id or None as it is."""
    if name is None:
        return None
    path = Path(name)
    try:
        stat = path.stat()
    except OSError:
        return str(name)
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


class CostMemory:
    """One setting's remembered pass costs and verdicts (module docstring).

    key: what identifies the setting (JSON-serialisable values); the machine's facts are
    added. directory: where the file goes (default memory_directory())."""

    def __init__(self, key: dict[str, Any], directory: str | os.PathLike | None = None):
        if directory is None:
            directory = memory_directory()
            if directory is None:
                raise ValueError(
                    f"directory: expected a folder for the cost memory, got none "
                    f"(${ENVIRONMENT} is 'off')"
                )
        self.key = {**key, "machine": machine_facts(), "version": MEMORY_VERSION}
        text = json.dumps(self.key, sort_keys=True, default=str)
        self._stored_key = json.loads(text)  # the key as the file holds it (JSON types)
        self.path = Path(directory) / f"costs-{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"
        self.recalled = False  # set by AdaptiveDraftLength.recall when it used a remembered entry
        self.dropped: list[int] = []  # batch sizes whose memory their first pass contradicted
        # batch sizes whose remembered "no" stood though their first passes ran slower
        self.slower: list[int] = []

    @classmethod
    def from_environment(cls, key: dict[str, Any]) -> CostMemory | None:
        """The memory in memory_directory(), or None when it is off."""
        directory = memory_directory()
        return None if directory is None else cls(key, directory)

    def _read(self) -> dict[str, Any] | None:
        """The file's content when it is readable, this key's and not older than MAX_AGE_DAYS."""
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("key") != self._stored_key:
                return None
            if time.time() - float(data["saved"]) > MAX_AGE_DAYS * 86400:
                return None
            return data
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def load_all(self) -> tuple[dict[int, dict[str, Any]], dict[str, list[float]] | None]:
        """load() and load_keep() from one read of the file, so that both come from the same
        write (another process may write the file between two reads)."""
        data = self._read()
        return _buckets(data), _keep(data)

    def load(self) -> dict[int, dict[str, Any]]:
        """The remembered entries by batch size; empty when there is no file, it is unreadable,
        older than MAX_AGE_DAYS or written for another key (a memory is a cache: a damaged one
        is ignored and written anew)."""
        return _buckets(self._read())

    def load_keep(self) -> dict[str, list[float]] | None:
        """The remembered keep counts ({"tests": [...], "kept": [...]}: decayed keep tests run
        and passed by draft position, pooled over the last process's rows), or None when there
        are none or they are damaged (not two lists of the same length of finite numbers, with
        0 <= kept <= tests and tests at position 0 above 0)."""
        return _keep(self._read())

    def save(
        self, buckets: dict[int, dict[str, Any]], keep: dict[str, list[float]] | None = None
    ) -> None:
        """Writes the entries and the keep counts, if any (atomically: another process never
        reads half a file). A folder that cannot be written is not an error: the run goes on
        without a memory."""
        data = {
            "key": self._stored_key,
            "saved": time.time(),
            "buckets": {str(bucket): entry for bucket, entry in sorted(buckets.items())},
        }
        if keep is not None:
            data["keep"] = keep
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(data, indent=1))
            os.replace(partial, self.path)
        except OSError:
            pass


def _buckets(data: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """CostMemory.load's entries from the file's content (None: no usable file)."""
    try:
        return {} if data is None else {int(b): e for b, e in data["buckets"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _keep(data: dict[str, Any] | None) -> dict[str, list[float]] | None:
    """CostMemory.load_keep's counts from the file's content (None: no usable file)."""
    keep = None if data is None else data.get("keep")
    if not isinstance(keep, dict):
        return None
    tests, kept = keep.get("tests"), keep.get("kept")
    if not isinstance(tests, list) or not isinstance(kept, list) or len(tests) != len(kept):
        return None
    numbers = tests + kept
    if not tests or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        for x in numbers
    ):
        return None
    if tests[0] <= 0 or any(not 0 <= k <= t for t, k in zip(tests, kept, strict=True)):
        return None
    return {"tests": [float(t) for t in tests], "kept": [float(k) for k in kept]}
