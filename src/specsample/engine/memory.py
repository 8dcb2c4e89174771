"""The adaptive draft length's pass costs, kept across processes.

Whether drafting pays is a fact of the machine, the backend and the two models, not of the
text: on llama.cpp on 2 cores no draft length pays for the default pair, on transformers long
drafts do. Without a memory every process finds that out again: two target-only steps, then
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
(within MATCH_FACTOR either way); if it does not, the next pass is checked as well, and if
neither matches the memory of that batch size is dropped and its cost check runs as without
one (one slow pass, the machine busy for a moment, does not drop it). The policy writes the
file again whenever a verdict changes and whenever it times a pass length for the first time
or comes to trust one (at most twice per length and batch size in a process). Files older
than MAX_AGE_DAYS are not used.

The draft length never depends on the target's future, whatever it remembers: decoding stays
exact with or without a memory. Where: $SPECSAMPLE_COST_MEMORY (a folder, or "off"), else
costs/ in the cache root ($SPECSAMPLE_CACHE, else $XDG_CACHE_HOME/specsample, else
~/.cache/specsample).
"""

from __future__ import annotations

import hashlib
import json
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

    @classmethod
    def from_environment(cls, key: dict[str, Any]) -> CostMemory | None:
        """The memory in memory_directory(), or None when it is off."""
        directory = memory_directory()
        return None if directory is None else cls(key, directory)

    def load(self) -> dict[int, dict[str, Any]]:
        """The remembered entries by batch size; empty when there is no file, it is unreadable,
        older than MAX_AGE_DAYS or written for another key (a memory is a cache: a damaged one
        is ignored and written anew)."""
        try:
            data = json.loads(self.path.read_text())
            if data.get("key") != self._stored_key:
                return {}
            if time.time() - float(data["saved"]) > MAX_AGE_DAYS * 86400:
                return {}
            return {int(bucket): entry for bucket, entry in data["buckets"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def save(self, buckets: dict[int, dict[str, Any]]) -> None:
        """Writes the entries (atomically: another process never reads half a file). A folder
        that cannot be written is not an error: the run goes on without a memory."""
        data = {
            "key": self._stored_key,
            "saved": time.time(),
            "buckets": {str(bucket): entry for bucket, entry in sorted(buckets.items())},
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(data, indent=1))
            os.replace(partial, self.path)
        except OSError:
            pass
