"""The README's main command against target-only decoding, side by side: tokens per second,
start time and peak memory of `specsample generate` as a user runs it.

Each contender is one `specsample generate` process with the main command's prompt and defaults
(128 new tokens, T = 0.7), given `--json` so that its statistics can be read; the contenders run
interleaved (order rotated per repeat), each once with 4 new tokens first as a warm-up (that run
also does any one-time work: the transformers backend converts the default pair into its cache,
the prompt cache keeps the prompt). Reported per contender: median tokens per second as the
statistics count them (new tokens over the generation's seconds, prefill included), the same
relative to transformers target-only, start seconds (process wall time minus the generation's
seconds: imports, loading, tokenising, exit) and peak RSS (the process's maxrss).

Run: `.venv/bin/python benchmarks/main_command.py` (about 6 minutes on 2 cores once the default
pair is converted for transformers); writes main_command.md and main_command.json beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_info, load_average

HERE = Path(__file__).parent
ROOT = HERE.parent
CLI = ROOT / ".venv" / "bin" / "specsample"
PROMPT = "Write a Python function that reverses a linked list."  # tools/run.sh's default
OUT_MD = HERE / "main_command.md"
BASELINE = "transformers target-only"

CONTENDERS = {
    "main command (defaults)": [],
    "main command, --no-prompt-cache": ["--no-prompt-cache"],
    "llama.cpp target-only": ["--drafter", "none"],
    BASELINE: ["--backend", "transformers", "--drafter", "none"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender (default 3)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens (default 128)")
    parser.add_argument("--no-write", action="store_true", help="do not write the md/json")
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT_MD,
        help="the markdown file to write (the json beside it, same name; default main_command.md)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: expected an integer >= 1, got {args.repeats}")
    if args.tokens < 1:
        parser.error(f"--tokens: expected an integer >= 1, got {args.tokens}")
    if args.out.suffix != ".md":
        parser.error(f"--out: expected a path ending in .md, got {str(args.out)!r}")
    if not CLI.exists():
        parser.error(f"expected the command line at {CLI} (run bash tools/run.sh once first)")
    return args


def run_once(options: list[str], tokens: int, seed: int) -> dict:
    """One `specsample generate` process: its statistics, wall seconds and peak RSS."""
    command = [str(CLI), "generate", PROMPT, "--json", "--max-new-tokens", str(tokens)]
    command += ["--seed", str(seed), *options]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        began = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - began
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(), err.read().decode()
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}):\n{errors[-2000:]}")
    stats = json.loads(text)["stats"]
    generation = stats["seconds"]["total"]
    return {
        "tokens": stats["new_tokens"],
        "tokens_per_second": stats["tokens_per_second"],
        "seconds": generation,
        "prefill_seconds": stats["seconds"]["prefill"],
        "start_seconds": wall - generation,
        "rss_gib": usage.ru_maxrss / 2**20,  # KiB on Linux
        "target_passes": stats["target_passes"],
        "draft_passes": stats["draft_passes"],
    }


def main() -> None:
    args = parse_args()
    started = datetime.datetime.now().astimezone()
    load_start = load_average()
    names = list(CONTENDERS)
    for name in names:
        print(f"warm-up: {name}", file=sys.stderr, flush=True)
        run_once(CONTENDERS[name], 4, 0)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            run = run_once(CONTENDERS[name], args.tokens, repeat)
            runs[name].append(run)
            print(
                f"repeat {repeat}: {name}: {run['tokens_per_second']:.2f} tokens/s, "
                f"start {run['start_seconds']:.1f} s, {run['rss_gib']:.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
    record = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": {"start": load_start, "end": load_average()},
        "machine": cpu_info(),
        "settings": {"prompt": PROMPT, "tokens": args.tokens, "repeats": args.repeats},
        "contenders": {name: {"options": CONTENDERS[name], "runs": runs[name]} for name in names},
    }
    text = markdown(record)
    print(text)
    if not args.no_write:
        out_json = args.out.with_suffix(".json")
        args.out.write_text(text)
        out_json.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out} and {out_json}", file=sys.stderr)


def markdown(record: dict) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in record["contenders"][name]["runs"])

    base = median(BASELINE, "tokens_per_second")
    machine, settings = record["machine"], record["settings"]
    lines = [
        "# The main command against target-only decoding (CPU)",
        "",
        "Run: `.venv/bin/python benchmarks/main_command.py"
        + ("" if settings["repeats"] == 3 else f" --repeats {settings['repeats']}")
        + ("" if settings["tokens"] == 128 else f" --tokens {settings['tokens']}")
        + f"`; {record['started']} to {record['finished']}.",
        "",
        f"- machine: {machine['cpu']}, {machine['logical_cores']} logical cores; load average "
        f"(1, 5, 15 min) at start {record['load_average']['start']}, at end "
        f"{record['load_average']['end']}",
        f'- each run: `specsample generate "{settings["prompt"]}" --json --max-new-tokens '
        f"{settings['tokens']} --seed R` plus the contender's options (the main command's "
        "defaults otherwise: the default pair, T = 0.7); seeds 0.."
        f"{settings['repeats'] - 1}, contenders interleaved, each warmed up once with 4 tokens",
        "- tokens/s: new tokens over the generation's seconds (prefill included), median over "
        "the repeats; x TF TO: relative to transformers target-only in the same run; start: "
        "process wall time minus the generation's seconds (imports, loading, tokenising, "
        "exit); RSS: the process's peak resident memory",
        "",
        "| contender | options | tokens/s | x TF TO | prefill s | start s | peak RSS GiB | "
        "target passes | draft passes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in record["contenders"].items():
        rate = median(name, "tokens_per_second")
        options = " ".join(entry["options"]) or "(none)"
        lines.append(
            f"| {name} | `{options}` | {rate:.2f} | {rate / base:.2f} | "
            f"{median(name, 'prefill_seconds'):.2f} | {median(name, 'start_seconds'):.1f} | "
            f"{max(run['rss_gib'] for run in entry['runs']):.2f} | "
            f"{median(name, 'target_passes'):g} | {median(name, 'draft_passes'):g} |"
        )
    lines += ["", "Per run (tokens/s):"]
    for name, entry in record["contenders"].items():
        rates = ", ".join(f"{run['tokens_per_second']:.2f}" for run in entry["runs"])
        lines.append(f"- {name}: {rates}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
