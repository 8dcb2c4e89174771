"""llama.cpp's `llama-speculative-simple` as a contender of benchmarks/llamacpp_speed.py: its
command line (the draft at its defaults), one run as a subprocess (peak RSS from wait4) and the
parsing of the statistics it prints. Standard library only (the parsing test loads it)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

N_CTX = 4096  # every contender's context


_FLOAT = r"([0-9.]+)"
_PATTERNS = {
    "encoded_tokens": rf"encoded\s+(\d+) tokens in\s+{_FLOAT} seconds",
    "decoded_tokens": rf"decoded\s+(\d+) tokens in\s+{_FLOAT} seconds",
    "n_draft": r"n_draft\s+=\s+(\d+)",
    "n_predict": r"n_predict\s+=\s+(\d+)",
    "n_drafted": r"n_drafted\s+=\s+(\d+)",
    "n_accept": r"n_accept\s+=\s+(\d+)",
}


def parse_speculative_simple(text: str) -> dict[str, Any]:
    """The statistics llama-speculative-simple prints at its end (stdout and stderr together):
    prompt and decode tokens and seconds, the draft length n_draft, tokens predicted, drafted and
    accepted, and, where its draft statistics line is printed, the draft calls and time. Raises
    ValueError when a required line is missing (a crash or another output format)."""
    out: dict[str, Any] = {}
    for key, pattern in _PATTERNS.items():
        match = re.search(pattern, text)
        if match is None:
            raise ValueError(f"llama-speculative-simple output: no {key!r} line")
        if key.endswith("_tokens"):
            stem = key.removesuffix("_tokens")
            out[f"{stem}_tokens"] = int(match.group(1))
            out[f"{stem}_seconds"] = float(match.group(2))
        else:
            out[key] = int(match.group(1))
    stats = re.search(
        r"statistics\s+(\S+): #calls\(b,g,a\) =\s+(\d+)\s+(\d+)\s+(\d+), #gen drafts =\s+(\d+), "
        r"#acc drafts =\s+(\d+), #gen tokens =\s+(\d+), #acc tokens =\s+(\d+)"
        r"(?:, dur\(b,g,a\) = ([0-9.]+), ([0-9.]+), ([0-9.]+) ms)?",
        text,
    )
    if stats is not None:
        out["draft_type"] = stats.group(1)
        out["draft_calls"] = int(stats.group(3))
        out["draft_ms"] = None if stats.group(10) is None else float(stats.group(10))
    out["steps"] = out["n_predict"] - out["n_accept"]  # each step emits its accepted drafts + 1
    out.update(  # the keys every contender's result has
        seconds=out["encoded_seconds"] + out["decoded_seconds"],
        new_tokens=out["n_predict"],
        row_steps=out["steps"],
        drafted=out["n_drafted"],
        accepted=out["n_accept"],
    )
    return out


def speculative_simple_command(
    binary: Path,
    target: Path,
    draft: Path,
    prompt_text: str,
    tokens: int,
    temperature: float,
    seed: int,
    threads: int,
) -> list[str]:
    """llama-speculative-simple with the draft model at its defaults. Set explicitly: threads,
    context, tokens, temperature, seed, the draft-simple method (this build speculates with no
    method unless one is named), EOS ignored (as every contender: exactly `tokens` tokens) and a
    plain temperature sampler (top-k/top-p/min-p off: the distribution every contender samples)."""
    numbers = f"-n {tokens} -c {N_CTX} -t {threads} --temp {temperature:g} --seed {seed}"
    plain = "--spec-type draft-simple --top-k 0 --top-p 1.0 --min-p 0.0 --ignore-eos"
    head = [str(binary), "-m", str(target), "-md", str(draft), "-p", prompt_text]
    return head + numbers.split() + plain.split()


def run_speculative_simple(command: list[str], timeout: float = 900) -> dict[str, Any]:
    """One run: the parsed statistics, the subprocess's wall seconds (model loading included)
    and peak RSS (from wait4, this child only)."""
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=None)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode("utf-8", errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"llama-speculative-simple exited {process.returncode}:\n{text[-3000:]}")
    parsed = parse_speculative_simple(text)
    parsed.update(wall_seconds=wall, rss=usage.ru_maxrss * 1024)
    return parsed
