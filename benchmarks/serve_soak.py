"""Soak test of `specsample serve`: the server in its own process (so the RSS measured is the
server's alone), under a steady load of concurrent streaming clients for 10 minutes (--minutes).

The server: `specsample serve` on tiny GGUF files written in-process (tests/adapters/tiny_gguf.py:
a 2-layer random Qwen2-style target and a similar draft), llama.cpp backend, speculative (model
drafter, --k 4, --draft-confidence 0 --draft-survival 0: the tiny model is unsure everywhere and
would not draft at the defaults), --max-batch 16. --target/--draft take other GGUF files
(--drafter none for target-only). The tiny model makes each step cheap, so the load is mostly
the server's own work
(HTTP, streaming, scheduling, engine bookkeeping): many requests per minute, which is what a leak
would show in.

The load: --clients streaming clients (asyncio + httpx, in this process), each sending streaming
/v1/completions one after the other without pause until the time is up (temperature 1, a seed
each, --max-tokens each). Every response is checked: status 200, one completion id in all its
chunks and never seen before (a duplicate otherwise), exactly one finish_reason, one usage chunk,
completion_tokens == max_tokens unless finish_reason is "stop", and a final [DONE]. A request that
fails or whose stream breaks off is lost. At the end the clients' counts are compared with the
server's own (/metrics: 200s answered, tokens generated, requests still running or queued).

The server's RSS (psutil, else VmRSS from /proc/PID/status) is sampled every 10 s. Writes
benchmarks/serve_soak.md (or --out): the counts, the RSS start / min / max / end and its slope
(least squares, MiB per minute) over the last 8 minutes, and the series.

Run: nice -n 19 .venv/bin/python benchmarks/serve_soak.py [--minutes 10] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests" / "audit"))
sys.path.insert(0, str(HERE.parent / "tests" / "adapters"))

from own_server import ServeProcess  # noqa: E402

PROMPTS = ["def fib(n):", "hello world", "the quick brown fox", "import numpy as np"]
SAMPLE_EVERY = 10.0  # seconds between RSS samples
SLOPE_WINDOW = 8.0  # minutes: the RSS slope is fitted over the run's last this many minutes


def rss_mib(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


class Counts:
    def __init__(self) -> None:
        self.sent = 0
        self.completed = 0  # complete, well-formed streams
        self.tokens = 0
        self.errors: dict[str, int] = {}  # kind -> count (failed or malformed responses)
        self.lost = 0  # sent, but no complete completion came back
        self.duplicated = 0  # a completion id seen twice, or a second finish / [DONE] / usage
        self.ids: set[str] = set()
        self.finish: dict[str, int] = {}
        self.latencies: list[float] = []

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def one_request(client: httpx.AsyncClient, url: str, body: dict, counts: Counts) -> None:
    counts.sent += 1
    started = time.perf_counter()
    ids, finishes, usages, done, after_done = set(), [], [], 0, 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                counts.error(f"HTTP {response.status_code}")
                counts.lost += 1
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if done:
                    after_done += 1
                if line == "data: [DONE]":
                    done += 1
                    continue
                chunk = json.loads(line[6:])
                ids.add(chunk["id"])
                for choice in chunk["choices"]:
                    if choice.get("finish_reason"):
                        finishes.append(choice["finish_reason"])
                if chunk.get("usage"):
                    usages.append(chunk["usage"])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        counts.error(type(exc).__name__)
        counts.lost += 1
        return
    if not done or not finishes or not usages or len(ids) != 1:
        counts.error("incomplete or malformed stream")
        counts.lost += 1
        return
    if done > 1 or after_done or len(finishes) > 1 or len(usages) > 1 or ids & counts.ids:
        counts.duplicated += 1
    tokens = usages[0]["completion_tokens"]
    if tokens != body["max_tokens"] and finishes[0] != "stop":
        counts.error("short completion without stop")
    counts.ids |= ids
    counts.completed += 1
    counts.tokens += tokens
    counts.finish[finishes[0]] = counts.finish.get(finishes[0], 0) + 1
    counts.latencies.append(time.perf_counter() - started)


async def load(base: str, pid: int, args, counts: Counts) -> list[tuple[float, float, int]]:
    """Runs the clients for args.minutes; returns (elapsed s, RSS MiB, requests completed)
    every SAMPLE_EVERY seconds, from 0 to the end (a last sample once the clients are done)."""
    url = base + "/v1/completions"
    seconds = 60 * args.minutes
    started = time.perf_counter()

    async def client_task(client: httpx.AsyncClient, c: int) -> None:
        r = 0
        while time.perf_counter() - started < seconds:
            body = {
                "model": "m",
                "prompt": PROMPTS[(c + r) % len(PROMPTS)],
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "seed": 100000 * c + r,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            await one_request(client, url, body, counts)
            r += 1

    samples = []

    async def sampler() -> None:
        while True:
            elapsed = time.perf_counter() - started
            samples.append((elapsed, rss_mib(pid), counts.completed))
            if elapsed >= seconds:
                return
            await asyncio.sleep(min(SAMPLE_EVERY, seconds - elapsed) + 0.001)

    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        await asyncio.gather(sampler(), *(client_task(client, c) for c in range(args.clients)))
    samples.append((time.perf_counter() - started, rss_mib(pid), counts.completed))
    return samples


def server_metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB), in MiB per minute."""
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return 60 * sxy / sxx if sxx else 0.0


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--k", default="4")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1)")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--target", help="target GGUF (default: a tiny one written here)")
    parser.add_argument("--draft", help="draft GGUF (default: a tiny one written here)")
    parser.add_argument("--drafter", default="model", choices=("model", "none"))
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--out", type=Path, default=HERE / "serve_soak.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.target is None:
            from tiny_gguf import write_tiny_gguf

            args.target = str(write_tiny_gguf(Path(tmp) / "target.gguf", seed=0))
            if args.draft is None:
                mix = (3, 0.5)
                args.draft = str(write_tiny_gguf(Path(tmp) / "draft.gguf", seed=0, mix=mix))
        serve = ["--target", args.target, "--backend", "llama.cpp"]
        serve += ["--threads", str(args.threads), "--context", str(args.context)]
        serve += ["--max-batch", str(args.max_batch), "--model-name", "m"]
        serve += ["--log-level", "warning"]
        if args.drafter == "none":
            serve += ["--drafter", "none"]
        else:
            serve += ["--draft", args.draft, "--k", args.k, "--draft-confidence", "0"]
            serve += ["--draft-survival", "0", "--draft-survival-greedy", "0"]
        load_start = os.getloadavg()
        wall = time.time()
        counts = Counts()
        with ServeProcess(serve) as server:
            pid = server.process.pid
            rss_idle = rss_mib(pid)
            samples = asyncio.run(load(server.url, pid, args, counts))
            metrics = server_metrics(server.url)
            alive = server.process.poll() is None
        load_end = os.getloadavg()
        wall = time.time() - wall

    report = markdown(args, serve, counts, samples, metrics, rss_idle, alive, load_start, load_end)
    args.out.write_text(report)
    print(report)
    print(f"wall {wall:.0f} s; wrote {args.out}")


def markdown(args, serve, counts, samples, metrics, rss_idle, alive, load_start, load_end) -> str:
    end = samples[-1][0]
    window = [(t, v) for t, v, _ in samples if t >= end - 60 * SLOPE_WINDOW]
    rss = [v for _, v, _ in samples]
    answered = metrics.get('specsample_requests_total{endpoint="/v1/completions",status="200"}', 0)
    generated = metrics.get("specsample_generation_tokens_total", 0)
    running = metrics.get("specsample_running_requests", -1)
    queued = metrics.get("specsample_queue_depth", -1)
    errors = sum(counts.errors.values())
    lines = [
        "# Serving soak",
        "",
        f"`nice -n 19 .venv/bin/python benchmarks/serve_soak.py --minutes {args.minutes:g} "
        f"--clients {args.clients} --max-tokens {args.max_tokens}` "
        f"({datetime.date.today().isoformat()}).",
        "",
        "`specsample serve " + " ".join(_short(a) for a in serve) + "` in its own process on "
        f"127.0.0.1; {args.clients} streaming clients in the benchmark's process, each sending "
        "streaming `/v1/completions` one after the other without pause (temperature 1, a seed "
        f"each, {args.max_tokens} tokens unless the model stops), for {args.minutes:g} minutes. "
        "The server's RSS sampled every 10 s. Machine: 2 logical cores shared with other jobs "
        f"(load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end).",
        "",
        "## Counts",
        "",
        "| | |",
        "|---|---:|",
        f"| requests sent | {counts.sent} |",
        f"| complete, well-formed completions | {counts.completed} |",
        f"| errors | {errors} {_kinds(counts.errors)}".rstrip() + " |",
        f"| lost (sent, no complete completion) | {counts.lost} |",
        f"| duplicated (id seen twice, or a second finish / usage / [DONE]) | "
        f"{counts.duplicated} |",
        f"| finish reasons | {_kinds(counts.finish) or '-'} |",
        f"| completion tokens received | {counts.tokens} |",
        f"| server: 200s answered on /v1/completions | {answered:.0f} |",
        f"| server: tokens generated | {generated:.0f} |",
        f"| server: running / queued after the load | {running:.0f} / {queued:.0f} |",
        f"| server process alive at the end | {alive} |",
        f"| requests per minute | {counts.completed / (end / 60):.0f} |",
        f"| latency p50 / p99 (s) | {_q(counts.latencies, 0.5)} / {_q(counts.latencies, 0.99)} |",
        "",
        "## RSS of the server process (MiB)",
        "",
        "| idle (before the load) | start | min | max | end | slope over the last "
        f"{min(SLOPE_WINDOW, args.minutes):g} min (MiB/min) |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {rss_idle:.1f} | {rss[0]:.1f} | {min(rss):.1f} | {max(rss):.1f} | {rss[-1]:.1f} | "
        f"{slope_per_minute(window):+.3f} |",
        "",
        "Series (every 10 s; requests = completions received by then):",
        "",
        "| elapsed (s) | RSS (MiB) | requests |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {t:.0f} | {v:.1f} | {n} |" for t, v, n in samples]
    return "\n".join(lines) + "\n"


def _short(arg: str) -> str:
    return Path(arg).name if arg.endswith(".gguf") else arg


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))


def _q(values: list[float], q: float) -> str:
    return f"{quantile(values, q):.2f}" if values else "-"


if __name__ == "__main__":
    main()
