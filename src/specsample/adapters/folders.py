"""Where specsample keeps what it caches: one root for the default pair's files, the cost
memories and the prompt caches (a light module: no torch, so any part can ask)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Cache root: $SPECSAMPLE_CACHE, else $XDG_CACHE_HOME/specsample, else ~/.cache/specsample."""
    if env := os.environ.get("SPECSAMPLE_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "specsample"
    return Path.home() / ".cache" / "specsample"


def cache_folder(environment: str, name: str) -> Path | None:
    """The folder named by $`environment` (None when it says "off"), else `name` in the
    cache root."""
    if (chosen := os.environ.get(environment)) is not None:
        return None if chosen.strip().lower() == "off" else Path(chosen)
    return cache_dir() / name
