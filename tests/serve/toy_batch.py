"""The batch tests' helpers: request rows, a loader of the toy models for Ray actors, and, run as
a script, a local batch job on a slow toy model (for the kill -9 test)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))

from toy_server import TOKENIZER, ControlledToyLM, served_models  # noqa: E402

from specsample.serve.batch import run_batch  # noqa: E402


def write_rows(path: Path, count: int, max_tokens: int = 6) -> list[int]:
    """count rows, completions and chat alternately, ids 0..count-1 (shuffled order)."""
    ids = [(i * 7) % count for i in range(count)]  # count is not a multiple of 7
    with open(path, "w") as out:
        for i in ids:
            row: dict = {"id": i, "max_tokens": max_tokens, "seed": i}
            if i % 2:
                row["messages"] = [{"role": "user", "content": f"row {i}"}]
            else:
                row["prompt"] = f"row {i}"
            out.write(json.dumps(row) + "\n")
    return ids


def output_ids(path: Path) -> list:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


class CrashingToyLM(ControlledToyLM):
    """Kills its own process (SIGKILL) the first time a row holds `crash_token`, once per
    marker file: an actor dying mid-job."""

    def __init__(self, *args, crash_token: int, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_token, self.marker = crash_token, marker

    def add_rows(self, prompts):
        self._maybe_crash(prompts)
        return super().add_rows(prompts)

    def add_rows_last(self, prompts, last):
        self._maybe_crash(prompts)
        return super().add_rows_last(prompts, last)

    def _maybe_crash(self, prompts):
        if any(self.crash_token in p for p in prompts) and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)


def load_crashing_models(marker: str):
    """ServedModels for a Ray actor whose first row with '!' in its prompt kills the actor."""
    target = CrashingToyLM(
        len(TOKENIZER), seed=11, scale=1.5, crash_token=TOKENIZER.encode("!")[0], marker=marker
    )
    return served_models(max_batch=8, target=target)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--delay", type=float, default=0.02)
    args = parser.parse_args()
    models = served_models(max_batch=4, delay=args.delay, eos=False)
    run_batch(models, args.input, args.output, progress=False)


if __name__ == "__main__":
    main()
