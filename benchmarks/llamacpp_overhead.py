"""Where the time of one token goes on llama.cpp: inside llama_decode, and outside it (the
caller's own work per token), for ours' target-only decoding and for llama.cpp's own loop.

llamacpp_speed.md compares whole runs; at T = 0 ours' target-only ran 1-3% behind llama.cpp's.
Both run the same llama_decode, so the difference is the work each does between passes: ours'
engine step (the cursor, argument checks, the greedy rule, the statistics), llama.cpp's
sampler (a greedy or a temperature-and-dist chain over the vocabulary). This script times
llama_decode from inside the one process that runs both contenders (the llama_cpp module's
function is wrapped, so both go through the same wrapper), alternating them per prompt and
temperature, and reports per token:

- the seconds inside llama_decode (the prompt's prefill included, the same for both);
- the seconds outside it: the caller's own work;
- for ours, the same step with llama_decode replaced by a call that does nothing (the engine's
  work with the processor's caches warm: what a profiler of the step alone sees).

    .venv/bin/python benchmarks/llamacpp_overhead.py            # 6 prompts, T = 0 and 0.7
    .venv/bin/python benchmarks/llamacpp_overhead.py --repeats 1 --prompts 2 --out /tmp/o.md

Needs the default pair's GGUF files (the main command fetches them) and llama-cpp-python.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from common import cpu_info, load_average, load_prompts
from llamacpp_contenders import RawLlama
from specsample.adapters import default_pair
from specsample.adapters.llamacpp import LlamaCppTokenizer
from specsample.adapters.loading import load_pair
from specsample.engine import generate
from specsample.engine.text import encode_prompt
from specsample.warpers import SamplingConfig

HERE = Path(__file__).parent


class DecodeClock:
    """Wraps the llama_cpp module's llama_decode: seconds spent inside it since reset()."""

    def __init__(self, module):
        self.module, self.real = module, module.llama_decode
        self.seconds, self.calls, self.stubbed = 0.0, 0, False

        def timed(ctx, batch):
            if self.stubbed:
                return 0
            started = time.perf_counter()
            code = self.real(ctx, batch)
            self.seconds += time.perf_counter() - started
            self.calls += 1
            return code

        module.llama_decode = timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=6, help="the first N benchmark prompts")
    parser.add_argument("--temperatures", default="0,0.7")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "llamacpp_overhead.md")
    args = parser.parse_args(argv)
    for name in ("tokens", "repeats", "prompts", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    temps = [float(t) for t in args.temperatures.split(",")]
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    gguf = default_pair.gguf_paths()
    pair = load_pair(backend="llama.cpp", threads=args.threads, use_draft=False, repack=True)
    raw = RawLlama(args.threads, (Path(gguf[0]), Path(gguf[1])))
    clock = DecodeClock(pair.target._llama)
    if raw.llama is not clock.module:
        raise SystemExit("expected both contenders to call the same llama_cpp module")
    tok = LlamaCppTokenizer(gguf[0])
    prompts = load_prompts()[: args.prompts]
    ids = {p["name"]: encode_prompt(tok, p["prompt"]) for p in prompts}

    def ours(prompt: list[int], temperature: float, seed: int, tokens: int) -> None:
        generate(
            pair.target,
            [prompt],
            generator=torch.Generator().manual_seed(seed),
            sampling=SamplingConfig(temperature=temperature),
            max_new_tokens=tokens,
            draft_length=0,
            eos_token_ids=(),
        )

    def llamacpp(prompt: list[int], temperature: float, seed: int, tokens: int) -> None:
        raw.run(prompt, temperature, seed, tokens)

    contenders = {"llama.cpp target-only": llamacpp, "ours target-only": ours}
    first = ids[prompts[0]["name"]]
    for run in contenders.values():  # warm-up: first passes, the weights' pages
        run(first, 0.0, 0, 16)
    rows: dict[tuple[str, float], dict[str, list[float]]] = {}
    for repeat in range(args.repeats):
        for name in ids:
            for t in temps:
                order = list(contenders.items())
                if repeat % 2:
                    order.reverse()
                for label, run in order:
                    clock.reset()
                    begun = time.perf_counter()
                    run(ids[name], t, repeat, args.tokens)
                    total = time.perf_counter() - begun
                    cell = rows.setdefault((label, t), {"inside": [], "outside": [], "rate": []})
                    cell["inside"].append(clock.seconds / args.tokens)
                    cell["outside"].append((total - clock.seconds) / args.tokens)
                    cell["rate"].append(args.tokens / total)
                print(f"repeat {repeat + 1}: {name} T={t:g}", file=sys.stderr, flush=True)
    warm: dict[float, list[float]] = {}
    clock.stubbed = True  # llama_decode does nothing: the engine's step alone, caches warm
    try:
        for t in temps:
            for _ in range(3):
                begun = time.perf_counter()
                ours(first, t, 0, 300)
                warm.setdefault(t, []).append((time.perf_counter() - begun) / 300)
    finally:
        clock.stubbed = False
    write(args, started, load_start, rows, warm, temps)
    return 0


def write(args, started, load_start, rows, warm, temps) -> None:
    def ms(values: list[float]) -> str:
        return f"{1000 * statistics.median(values):.2f}"

    cpu = cpu_info()
    lines = [
        "# Time per token inside and outside llama_decode (default target, CPU)",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC with `benchmarks/llamacpp_overhead.py "
        f"--tokens {args.tokens} --repeats {args.repeats} --prompts {args.prompts} "
        f"--temperatures {args.temperatures} --threads {args.threads}`; CPU: {cpu['cpu']}, "
        f"{cpu['logical_cores']} logical cores, {args.threads} threads; load average at start "
        f"{load_start}, at end {load_average()}. Both contenders in one process, alternated per "
        "prompt and temperature (order reversed every other repeat); Qwen2.5-Coder-1.5B "
        "Q4_K_M, weights repacked; EOS does not stop a run. Per token = over the run's "
        f"{args.tokens} new tokens (the prompt's prefill is inside llama_decode for both). "
        "Medians over prompts and repeats.",
        "",
        "| contender | T | tokens/s | ms per token in llama_decode | ms per token outside it |",
        "|---|---|---|---|---|",
    ]
    for t in temps:
        for label in ("llama.cpp target-only", "ours target-only"):
            cell = rows[(label, t)]
            lines.append(
                f"| {label} | {t:g} | {statistics.median(cell['rate']):.2f} | "
                f"{ms(cell['inside'])} | {ms(cell['outside'])} |"
            )
    lines += [
        "",
        "Ours' step with llama_decode replaced by a call that does nothing (300 steps, median "
        "of 3; the processor's caches stay warm between steps): "
        + ", ".join(f"T = {t:g}: {ms(warm[t])} ms per token" for t in temps)
        + ".",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(args.out.read_text())


if __name__ == "__main__":
    sys.exit(main())
