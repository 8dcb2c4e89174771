"""Ours on llama.cpp against llama.cpp's own decoding, on the embedded default pair (Qwen2.5-Coder
1.5B target, 0.5B draft, Q4_K_M GGUF), CPU, one run with the contenders interleaved.

Contenders (llamacpp_contenders.py says how each runs):
  llamacpp        llama.cpp target-only (low-level API, llama.cpp's defaults)     batch 1
  llamacpp-spec   llama.cpp's llama-speculative-simple, the same draft at its defaults
  lookup          llama-cpp-python's prompt lookup (LlamaPromptLookupDecoding)
  ours-none       ours target-only on llama.cpp                                   batch 1
  ours-model      ours, model drafter, --k auto, on llama.cpp                     batch 1
  ours-ngram      ours, n-gram drafter, --k auto, on llama.cpp                    batch 1
  ours-model-cold ours-model without the cost memory (a setting's first run)      batch 1
  ours-model-k3   ours, model drafter without stops, k = 3 fixed (llama.cpp's default draft
                  length): the acceptance comparison with llama.cpp's sample-and-match
  *-b4            llamacpp, ours-none/-model/-ngram with 4 copies of the prompt in one batch
  hf-none/hf-int8 ours on transformers: target-only and int8 draft (--transformers, float32,
                  --transformers-tokens tokens: a float32 1.5B pass costs ~0.4 s on 2 cores)

Every contender: the same prompt tokens (the chat template), temperature (plain: no top-k/top-p/
min-p), max tokens (EOS does not stop a run), seed per repeat and threads. For each prompt and
temperature, each repeat runs every contender once in an order rotated per repeat. Reports per
cell tokens/s (median over repeats; prompt processing included, model loading not), the ratio to
llama.cpp target-only at the same batch, acceptance per drafted token, tokens per target pass,
peak RSS, the speedup theory predicts from the measured cost curve and the projection for a flat
cost curve (a target pass costing the same for any number of tokens, as benchmarks/rules.md).

Needs the llama.cpp tools: bash benchmarks/build_llamacpp_tools.sh (about 10 minutes on 2 cores).
Run: nice .venv/bin/python benchmarks/llamacpp_speed.py [--transformers]
     (smoke: --prompts 1 --tokens 16 --temperatures 0.7 --repeats 1)
Writes benchmarks/llamacpp_speed.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import llamacpp_contenders as lc
import llamacpp_tool as tool
from llamacpp_report import Cell, write_report

HERE = Path(__file__).parent
ROOT = HERE.parent
DEFAULTS = {"tokens": 128, "repeats": 3, "temperatures": "0,0.7,1.0"}


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    worker: str | None  # worker kind; None: the llama-speculative-simple binary
    batch: int = 1
    drafter: str | None = None  # hf worker: which drafter
    library: str = "llama.cpp"
    memory: bool = True  # ours: recall the worker's cost memory (False: a setting's first run)
    k: int | None = None  # ours: a fixed draft length and no draft stops (None: the command's)


CONTENDERS = [
    Contender("llamacpp", "llama.cpp target-only", "llamacpp"),
    Contender("llamacpp-spec", "llama.cpp speculative-simple (defaults)", None),
    Contender("lookup", "llama-cpp-python prompt lookup (defaults)", "lookup", library="lcp"),
    Contender("ours-none", "ours target-only", "ours-none", library="ours"),
    Contender("ours-model", "ours model drafter, k auto", "ours-model", library="ours"),
    Contender("ours-ngram", "ours n-gram, k auto", "ours-ngram", library="ours"),
    Contender(
        "ours-model-cold",
        "ours model drafter, k auto, first run (no cost memory)",
        "ours-model",
        library="ours",
        memory=False,
    ),
    Contender(
        "ours-model-k3",
        "ours model drafter, k = 3 fixed, no stops (llama.cpp's draft length)",
        "ours-model",
        library="ours",
        k=3,
    ),
    Contender("llamacpp-b4", "llama.cpp target-only", "llamacpp", 4),
    Contender("ours-none-b4", "ours target-only", "ours-none", 4, library="ours"),
    Contender("ours-model-b4", "ours model drafter, k auto", "ours-model", 4, library="ours"),
    Contender("ours-ngram-b4", "ours n-gram, k auto", "ours-ngram", 4, library="ours"),
    Contender("hf-none", "ours target-only (transformers)", "hf", 1, "none", "transformers"),
    Contender(
        "hf-int8", "ours int8 draft, k auto (transformers)", "hf", 1, "model", "transformers"
    ),
]
TRANSFORMERS = {"hf-none", "hf-int8"}
WARM_TOKENS = 32  # ours' warm-up: the cost check decides within 4 steps


def tools_bin() -> Path:
    import llama_cpp

    return ROOT / "build" / "llamacpp-tools" / f"build-{llama_cpp.__version__}" / "bin"


def spec_defaults(binary: Path) -> dict[str, str]:
    """The draft defaults llama-speculative-simple states in its --help."""
    text = subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout
    blocks = re.split(r"\n(?=-)", text)  # one block per option
    found = {}
    for option in ("--spec-draft-n-max", "--spec-draft-n-min", "--spec-draft-p-min", "--spec-type"):
        found[option] = "?"
        for block in blocks:
            match = re.search(r"default:\s*([^)]*)\)", block)
            if re.match(rf"{option}\b", block) and match:
                found[option] = " ".join(match.group(1).split())
    return found


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=DEFAULTS["tokens"])
    parser.add_argument(
        "--prompts", default="all", help="all, a count (the first n) or comma-separated names"
    )
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    parser.add_argument("--temperatures", default=DEFAULTS["temperatures"])
    parser.add_argument(
        "--contenders", default="all", help="comma-separated keys (default: all but hf-*)"
    )
    parser.add_argument("--transformers", action="store_true", help="add hf-none and hf-int8")
    parser.add_argument("--transformers-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--probe-repeats", type=int, default=3, help="timed passes per cost-curve point"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tools", type=Path, default=None, help="bin folder of the tools")
    parser.add_argument("--out", type=Path, default=HERE / "llamacpp_speed.md")
    parser.add_argument(
        "--render", type=Path, help="only rewrite --out from this run's JSON (no measuring)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def select(args) -> tuple[list[Contender], list[dict], list[float]]:
    from common import load_prompts

    prompts = load_prompts()
    if args.prompts.isdigit():
        prompts = prompts[: int(args.prompts)]
    elif args.prompts != "all":
        names = args.prompts.split(",")
        prompts = [p for p in prompts if p["name"] in names]
    keys = {c.key for c in CONTENDERS} - TRANSFORMERS
    if args.contenders != "all":
        keys = set(args.contenders.split(","))
        unknown = keys - {c.key for c in CONTENDERS}
        if unknown:
            raise SystemExit(f"--contenders: unknown {sorted(unknown)}")
    if args.transformers:
        keys |= TRANSFORMERS
    temps = [float(t) for t in args.temperatures.split(",")]
    return [c for c in CONTENDERS if c.key in keys], prompts, temps


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return lc.serve(args.worker, args.threads, args.gguf)
    if args.render:
        return render(args.render, args.out)
    from common import cpu_info, load_average
    from specsample.adapters import default_pair
    from specsample.adapters.llamacpp import LlamaCppTokenizer

    contenders, prompts, temps = select(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    gguf = default_pair.gguf_paths()
    tok = LlamaCppTokenizer(gguf[0])
    texts = {
        p["name"]: tok.apply_chat_template(
            [{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    }
    ids = {name: tok.encode(text, add_special_tokens=False) for name, text in texts.items()}
    binary = (args.tools or tools_bin()) / "llama-speculative-simple"
    if any(c.worker is None for c in contenders) and not binary.exists():
        raise SystemExit(f"{binary} is missing: run bash benchmarks/build_llamacpp_tools.sh")
    script = Path(__file__).resolve()
    probe = lc.Worker(script, "probe", args.threads, gguf)
    curve = probe.request({"prompt": ids[prompts[0]["name"]], "repeats": args.probe_repeats})
    probe.close()
    curve = {m: {int(k): v for k, v in curve[m].items()} for m in ("target", "draft")}
    workers: dict[str, lc.Worker] = {}
    for c in contenders:
        if c.worker and c.worker not in workers:
            print(f"starting worker {c.worker}", file=sys.stderr, flush=True)
            workers[c.worker] = lc.Worker(script, c.worker, args.threads, gguf)
    for c in contenders:  # untimed: first-touch page faults, buffers, lazy set-up
        if c.worker:
            print(f"warming up {c.key}", file=sys.stderr, flush=True)
            warm = {"prompt": ids[prompts[0]["name"]], "temperature": 1.0, "seed": 0}
            # ours: long enough for the cost check's verdict, which fills the cost memory
            tokens = WARM_TOKENS if c.library in ("ours", "transformers") else 4
            warm.update(tokens=tokens, batch=c.batch, drafter=c.drafter, memory=c.memory, k=c.k)
            workers[c.worker].request(warm)

    def run_one(c: Contender, name: str, temperature: float, seed: int) -> dict:
        tokens = args.transformers_tokens if c.key in TRANSFORMERS else args.tokens
        if c.worker is not None:
            message = {"prompt": ids[name], "temperature": temperature, "seed": seed}
            message.update(tokens=tokens, batch=c.batch, drafter=c.drafter, memory=c.memory, k=c.k)
            return workers[c.worker].request(message)
        command = tool.speculative_simple_command(
            binary, *gguf, texts[name], tokens, temperature, seed, args.threads
        )
        return {**tool.run_speculative_simple(command), "prompt_tokens": len(ids[name])}

    cells = interleave(contenders, [p["name"] for p in prompts], temps, args, run_one)
    rss = {key: w.close() for key, w in workers.items()}
    meta = {
        "started": f"{started:%Y-%m-%d %H:%M} UTC",
        "command": " ".join(
            ["benchmarks/llamacpp_speed.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "cpu": cpu_info(),
        "load": (load_start, load_average()),
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "spec_defaults": spec_defaults(binary) if binary.exists() else {},
        "spec_command": " ".join(
            tool.speculative_simple_command(
                binary.relative_to(ROOT) if binary.is_relative_to(ROOT) else binary,
                Path("TARGET.gguf"),
                Path("DRAFT.gguf"),
                "PROMPT",
                args.tokens,
                0.7,
                0,
                args.threads,
            )
        ),
        "worker_facts": {key: w.ready for key, w in workers.items()},
        "threads": args.threads,
        "probe_repeats": args.probe_repeats,
        "tokens": args.tokens,
        "transformers_tokens": args.transformers_tokens,
        "repeats": args.repeats,
        "prompts": [p["name"] for p in prompts],
        "temperatures": temps,
        "contenders": [c.key for c in contenders],
        "full": _is_full(args, contenders, prompts, temps),
    }
    write_report(args.out, meta, curve, contenders, cells, rss, prompts, temps)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)
    return 0


def interleave(contenders, names, temps, args, run_one) -> dict[tuple[str, str, float], Cell]:
    """For each prompt and temperature, each repeat runs every contender once, in an order
    rotated by one per repeat (and per prompt and temperature), with one seed for all."""
    cells: dict[tuple[str, str, float], Cell] = {}
    total = len(names) * len(temps) * args.repeats * len(contenders)
    done = 0
    for name in names:
        for temperature in temps:
            for r in range(args.repeats):
                shift = done // len(contenders) % len(contenders)
                for c in contenders[shift:] + contenders[:shift]:
                    result = run_one(c, name, temperature, args.seed + r)
                    cells.setdefault((c.key, name, temperature), Cell()).runs.append(result)
                    done += 1
                    print(
                        f"[{done}/{total}] {name} T={temperature:g} {c.key}: "
                        f"{Cell(runs=[result]).summary_line()}",
                        file=sys.stderr,
                        flush=True,
                    )
    return cells


def render(path: Path, out: Path) -> int:
    """Rewrites the markdown (and JSON) from a run's JSON, e.g. after a change to the report."""
    from common import load_prompts

    data = json.loads(path.read_text())
    meta = data["meta"]
    keys = meta.get("contenders") or sorted({cell["contender"] for cell in data["cells"]})
    contenders = [c for c in CONTENDERS if c.key in keys]
    cells = {
        (cell["contender"], cell["prompt"], cell["temperature"]): Cell(runs=cell["runs"])
        for cell in data["cells"]
    }
    curve = {m: {int(k): v for k, v in c.items()} for m, c in data["cost_curve_seconds"].items()}
    prompts = [p for p in load_prompts() if p["name"] in meta["prompts"]]
    write_report(
        out, meta, curve, contenders, cells, data["rss_bytes"], prompts, meta["temperatures"]
    )
    print(f"wrote {out} from {path}", file=sys.stderr)
    return 0


def _is_full(args, contenders, prompts, temps) -> bool:
    from common import load_prompts

    return (
        len(prompts) == len(load_prompts())
        and args.tokens >= DEFAULTS["tokens"]
        and args.repeats >= DEFAULTS["repeats"]
        and len(temps) >= 3
        and len(contenders) >= len(CONTENDERS) - len(TRANSFORMERS)
    )


if __name__ == "__main__":
    sys.exit(main())
