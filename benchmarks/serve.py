"""Serving benchmark: `specsample serve` under 1, 4, 8 and 16 concurrent streaming clients.

--models tiny (default): speculative (adaptive and fixed draft length) vs target-only, on a tiny
random-weight transformers pair built in-process, the server's app in this process.

The pair: a Qwen2-shaped target (8 layers, hidden 256) and, as its drafter, its own first 2
layers with the same embeddings and head (a layer-skipping draft). The lm_head is scaled up so
the distributions are not flat, and the later layers are damped so that the draft agrees with
the target often (alpha about 0.85). A character tokenizer is built in-process. Each client
sends its requests one after the other (streaming /v1/completions, temperature 1, a seed each);
the server runs on 127.0.0.1 in this process (uvicorn in a thread), the clients are asyncio
tasks (httpx).

--models default-pair: the default pair's GGUF files (specsample.adapters.default_pair:
Qwen2.5-Coder-1.5B-Instruct drafted by 0.5B-Instruct, Q4_K_M), three servers, each in its own
process on 127.0.0.1, one after the other:

- ours, speculative: `specsample serve --backend llama.cpp --target T --draft D` with its
  defaults (--max-batch 16, block verification; on llama.cpp --k auto and --repack; before
  2026-11-29 evening --k 4 and no repacking); "speculative:4" gives --k 4, ":no-repack"
  --no-repack;
- ours, target-only: the same with `--drafter none`;
- llama-cpp-python's own OpenAI server on the same target GGUF: `python -m llama_cpp.server
  --model T --n_threads N --n_threads_batch N --n_ctx C --interrupt_requests False`. It
  serialises requests: one global lock around its single Llama object, so one request decodes
  at a time and the others wait for it (with its default --interrupt_requests True, a waiting
  request would instead cut the running stream short). Requests to it also send top_k 0, top_p 1,
  min_p 0 and repeat_penalty 1 (its defaults are 40, 0.95, 0.05 and 1.1), so that all three
  sample the same plain temperature-T distribution.

All three get the same --threads (llama.cpp threads, prompt and decode), the same context per
request (--context: ours `--context`, llama_cpp.server `--n_ctx`), and the same clients,
requests, prompts, seeds and max_tokens. The models may stop at EOS before max_tokens: tokens
are the usage the response reports (ours), else max_tokens for finish_reason "length" and
the streamed text chunks for "stop" (llama_cpp.server streams one chunk per token, without usage).

llama_cpp.server needs llama-cpp-python's `server` extra. Installed here next to the existing
llama-cpp-python (not reinstalling or upgrading it, which would compile llama.cpp again):

    .venv/bin/pip install 'sse-starlette>=1.6.1' 'starlette-context>=0.3.6,<0.4' \
        'pydantic-settings>=2.0.1'
    .venv/bin/python -c "import llama_cpp.server.app"   # check

(uvicorn, fastapi and PyYAML, the rest of the extra, are already this project's dependencies.)

Measured per level: total throughput (completion tokens / wall time), p50 / p99 request latency,
p50 / p99 time to first token (first chunk with text), the acceptance rate the responses report
(ours, speculative), errors, and (default pair) the server's RSS after the level. The issue's
goals: with 8 clients, total throughput >= 2.5x one client's; ours speculative >= llama-cpp-
python's server at every level.

Run: python benchmarks/serve.py [--requests 6] [--max-tokens 64] [--json out.json]
     python benchmarks/serve.py --models default-pair [--clients 1,4,8,16] [--requests 4]
         [--max-tokens 128] [--threads 2] [--contenders speculative,target-only,llama_cpp.server]
     (ours with options after colons: speculative:auto or speculative:4 for --k, :repack or
     :no-repack)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import torch
import transformers
import uvicorn
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from common import cpu_info
from specsample import Engine
from specsample.adapters.hf import HFCausalLM
from specsample.drafters.model import ModelDrafter
from specsample.serve.app import create_app
from specsample.serve.completion import ServedModels

LEVELS = (1, 4, 8, 16)
CONTENDERS = ("speculative", "target-only", "llama_cpp.server")
# llama_cpp.server's sampling defaults turned off: plain temperature sampling, as ours does
LLAMA_CPP_PLAIN = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
PROMPTS = ["def fib(n):", "the quick brown fox", "once upon a time", "import numpy as np"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")


def tiny_pair(
    vocab: int, layers: int = 8, draft_layers: int = 2, head_scale: float = 10.0, damp: float = 0.1
):
    """(target, draft): random weights (seed 0); the draft is the target's first layers. The
    later layers' output projections are scaled by `damp` (they refine what the first layers
    computed, as in a trained model, so the draft agrees with the target often)."""
    config = dict(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    target = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(num_hidden_layers=layers, **config)
    ).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(head_scale)
        for layer in target.model.layers[draft_layers:]:
            layer.self_attn.o_proj.weight.mul_(damp)
            layer.mlp.down_proj.weight.mul_(damp)
    draft = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(num_hidden_layers=draft_layers, **config)
    ).eval()
    draft.load_state_dict(target.state_dict(), strict=False)  # layers >= draft_layers unused
    return target, draft


def served(
    tokenizer, target, draft, speculative: bool, max_batch: int, draft_length="auto"
) -> ServedModels:
    target_lm = HFCausalLM(target)
    draft_lm = HFCausalLM(draft)

    def make_engine() -> Engine:
        drafter = ModelDrafter(draft_lm) if speculative else None
        length = draft_length if speculative else "auto"
        return Engine(target_lm, drafter, draft_length=length, max_batch=max_batch)

    return ServedModels(
        make_engine=make_engine,
        tokenizer=tokenizer,
        name="tiny",
        context_length=1024,
        vocab_size=len(tokenizer),
        eos_token_ids=(),  # every request runs to max_tokens: equal work per request
        speculative=speculative,
    )


class Server:
    def __init__(self, app):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1/completions"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streaming request. Tokens: the usage chunk's completion_tokens when the server sends
    one, else max_tokens when it finished for "length", else the text chunks streamed."""
    started = time.perf_counter()
    first = finish = None
    usage = stats = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    choice = chunk["choices"][0]
                    if choice["text"]:
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - started
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    usage, stats = chunk["usage"], chunk.get("specsample")
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    if usage:
        tokens = usage["completion_tokens"]
    else:
        tokens = body["max_tokens"] if finish == "length" else chunks
    return {
        "latency": time.perf_counter() - started,
        "ttft": first,
        "tokens": tokens,
        "alpha": stats.get("acceptance_rate") if stats else None,
    }


async def run_level(
    url: str,
    clients: int,
    requests: int,
    max_tokens: int,
    temperature: float = 1.0,
    extra: dict | None = None,
) -> dict:
    async def client_task(client, c):
        results = []
        for r in range(requests):
            body = {
                "prompt": PROMPTS[(c + r) % len(PROMPTS)],
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": 1000 * c + r,
                "stream": True,
                "stream_options": {"include_usage": True},
                **(extra or {}),
            }
            results.append(await one_request(client, url, body))
        return results

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        done = await asyncio.gather(*(client_task(client, c) for c in range(clients)))
        wall = time.perf_counter() - started
    everything = [r for per_client in done for r in per_client]
    results = [r for r in everything if "error" not in r]
    errors = [r["error"] for r in everything if "error" in r]
    if not results:
        raise RuntimeError(f"every request failed, e.g. {errors[0]}")
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    alphas = [r["alpha"] for r in results if r["alpha"] is not None]
    return {
        "clients": clients,
        "requests": len(everything),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": sum(r["tokens"] for r in results),
        "seconds": wall,
        "throughput": sum(r["tokens"] for r in results) / wall,
        "latency_p50": _quantile(latencies, 0.5),
        "latency_p99": _quantile(latencies, 0.99),
        "ttft_p50": _quantile(ttfts, 0.5) if ttfts else float("nan"),
        "ttft_p99": _quantile(ttfts, 0.99) if ttfts else float("nan"),
        "alpha": statistics.mean(alphas) if alphas else None,
    }


async def soak(url: str, clients: int, seconds: float, max_tokens: int) -> list[tuple]:
    """Clients send requests without pause for `seconds`; returns (elapsed s, RSS MiB,
    requests done) every 5 s, and raises on any failed request."""
    import psutil

    process = psutil.Process()
    done = 0
    started = time.perf_counter()

    async def client_task(client, c):
        nonlocal done
        r = 0
        while time.perf_counter() - started < seconds:
            body = {
                "prompt": PROMPTS[(c + r) % len(PROMPTS)],
                "max_tokens": max_tokens,
                "seed": 1000 * c + r,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            await one_request(client, url, body)
            done += 1
            r += 1

    async def sampler():
        samples = []
        while time.perf_counter() - started < seconds:
            rss = process.memory_info().rss / 2**20
            samples.append((round(time.perf_counter() - started), round(rss, 1), done))
            await asyncio.sleep(5)
        return samples

    async with httpx.AsyncClient(timeout=600) as client:
        tasks = [client_task(client, c) for c in range(clients)]
        *_, samples = await asyncio.gather(*tasks, sampler())
    return samples


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted values."""
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server command (given "--host 127.0.0.1 --port P" here) in its own process: waits up to
    start_timeout seconds until GET `ready` answers 200; on exit SIGTERM, then SIGKILL after 30 s.
    Its output goes to a temporary file, shown when it fails to start."""

    def __init__(self, command: list[str], ready: str, start_timeout: float = 600.0):
        self.port = _free_port()
        self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.base = f"http://127.0.0.1:{self.port}"
        self.ready, self.start_timeout = ready, start_timeout
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=self.log, text=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._stop()
                raise RuntimeError(f"{self.command[:4]} exited: {self.output()}")
            try:
                with urllib.request.urlopen(self.base + self.ready, timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        self._stop()
        raise RuntimeError(f"{self.command[:4]} did not start in {self.start_timeout} s")

    def rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)

    def __exit__(self, *exc) -> None:
        self._stop()
        self.log.close()


def contender_command(name: str, target: str, draft: str, args) -> tuple[list[str], str, dict]:
    """(command, readiness path, extra request fields) of one default-pair contender: a name of
    CONTENDERS, ours optionally with options after colons: "speculative:auto" (--k auto),
    "target-only:repack" (--repack), "speculative:4:no-repack" (--k 4 --no-repack)."""
    name, *options = name.split(":")
    if name == "llama_cpp.server" and not options:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", target]
        command += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
        command += ["--n_ctx", str(args.context), "--interrupt_requests", "False"]
        command += ["--verbose", "False"]
        return command, "/v1/models", LLAMA_CPP_PLAIN
    command = [sys.executable, "-m", "specsample.cli.main", "serve", "--backend", "llama.cpp"]
    command += ["--target", target, "--threads", str(args.threads)]
    command += ["--context", str(args.context), "--shutdown-grace", "0", "--log-level", "warning"]
    if name == "speculative":
        command += ["--draft", draft]
    elif name == "target-only":
        command += ["--drafter", "none"]
    else:
        raise ValueError(f"contender: expected one of {CONTENDERS}, got {name!r}")
    for option in options:
        if name == "speculative" and (option == "auto" or option.isdigit()):
            command += ["--k", option]
        elif option in ("repack", "no-repack"):
            command += [f"--{option}"]
        else:
            raise ValueError(
                f"contender {name}: unknown option {option!r} (auto, an integer k, repack, "
                "no-repack)"
            )
    return command, "/health", {}


def run_default_pair(args, levels: list[int]) -> dict:
    from specsample.adapters.default_pair import gguf_paths

    target, draft = (str(p) for p in gguf_paths())
    target, draft = args.target or target, args.draft or draft
    report = {"machine": cpu_info(), "args": vars(args), "modes": {}, "commands": {}}
    for name in args.contenders.split(","):
        command, ready, extra = contender_command(name, target, draft, args)
        report["commands"][name] = " ".join(
            Path(c).name if c.endswith(".gguf") else c for c in command[1:]
        )
        started = time.perf_counter()
        with ServerProcess(command, ready) as server:
            url = server.base + "/v1/completions"
            print(f"{name}: up in {time.perf_counter() - started:.0f} s", flush=True)
            asyncio.run(run_level(url, 1, 1, 8, args.temperature, extra))  # warm-up
            rows = []
            for clients in levels:
                row = asyncio.run(
                    run_level(url, clients, args.requests, args.max_tokens, args.temperature, extra)
                )
                row["rss_mib"] = server.rss_mib()
                rows.append(row)
                print(name, _format(row), flush=True)
        report["modes"][name] = rows
    return report


def run_tiny(args, levels: list[int]) -> dict:
    torch.set_num_threads(args.threads)
    tokenizer = char_tokenizer()
    target, draft = tiny_pair(len(tokenizer))
    if args.soak:
        app = create_app(served(tokenizer, target, draft, True, 16))
        with Server(app) as url:
            samples = asyncio.run(soak(url, 8, args.soak, args.max_tokens))
        for elapsed, rss, done in samples:
            print(f"{elapsed:5d} s  RSS {rss:8.1f} MiB  requests {done}")
        return {}
    report = {"machine": cpu_info(), "args": vars(args), "modes": {}}
    modes = (
        ("speculative, k auto", True, "auto"),
        ("speculative, k 4", True, 4),
        ("target-only", False, "auto"),
    )
    for mode, speculative, length in modes:
        app = create_app(served(tokenizer, target, draft, speculative, max(levels), length))
        with Server(app) as url:
            asyncio.run(run_level(url, 1, 1, 8))  # warm-up
            rows = []
            for clients in levels:
                row = asyncio.run(
                    run_level(url, clients, args.requests, args.max_tokens, args.temperature)
                )
                rows.append(row)
                print(mode, _format(row), flush=True)
        report["modes"][mode] = rows
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        choices=("tiny", "default-pair"),
        default="tiny",
        help="tiny: the in-process transformers pair (default); default-pair: the default "
        "pair's GGUF files, ours speculative and target-only vs llama_cpp.server, each a process",
    )
    parser.add_argument("--requests", type=int, default=6, help="requests per client (6)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--clients",
        "--levels",
        dest="levels",
        default=",".join(map(str, LEVELS)),
        help="concurrent clients per level (1,4,8,16)",
    )
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument(
        "--threads",
        type=int,
        help="tiny: torch threads (default 1: on a shared 2-core machine two threads contend and "
        "a step of the tiny models gets about 20x slower); default-pair: llama.cpp threads of "
        "every server (default 2)",
    )
    parser.add_argument(
        "--context", type=int, default=1024, help="default-pair: tokens per request (1024)"
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="default-pair")
    parser.add_argument("--target", help="default-pair: another target GGUF")
    parser.add_argument("--draft", help="default-pair: another draft GGUF")
    parser.add_argument(
        "--soak",
        type=float,
        default=0,
        help="tiny, instead of the levels: 8 speculative clients for this many seconds, printing "
        "the process RSS every 5 s (the server in its own process: benchmarks/serve_soak.py)",
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.threads is None:
        args.threads = 2 if args.models == "default-pair" else 1
    started = time.perf_counter()
    report = (
        run_default_pair(args, levels) if args.models == "default-pair" else run_tiny(args, levels)
    )
    if not report:
        return
    report["wall_seconds"] = time.perf_counter() - started
    print()
    print(markdown(report))
    print(f"\nwall {report['wall_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


def _format(row: dict) -> str:
    alpha = "-" if row["alpha"] is None else f"{row['alpha']:.2f}"
    return (
        f"clients {row['clients']:2d}: {row['throughput']:7.1f} tok/s, latency p50 "
        f"{row['latency_p50']:.2f} s p99 {row['latency_p99']:.2f} s, TTFT p50 "
        f"{row['ttft_p50']:.3f} s p99 {row['ttft_p99']:.3f} s, alpha {alpha}, "
        f"errors {row['errors']}"
    )


def markdown(report: dict) -> str:
    rss = any("rss_mib" in row for rows in report["modes"].values() for row in rows)
    lines = [
        "| mode | clients | tokens/s | x one client | latency p50 / p99 (s) | TTFT p50 / p99 (s) "
        "| alpha | tokens | errors |" + (" server RSS (MiB) |" if rss else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if rss else ""),
    ]
    for mode, rows in report["modes"].items():
        single = rows[0]["throughput"]
        for row in rows:
            alpha = "-" if not row["alpha"] else f"{row['alpha']:.2f}"
            line = (
                f"| {mode} | {row['clients']} | {row['throughput']:.1f} | "
                f"{row['throughput'] / single:.2f} | {row['latency_p50']:.2f} / "
                f"{row['latency_p99']:.2f} | {row['ttft_p50']:.3f} / {row['ttft_p99']:.3f} | "
                f"{alpha} | {row['tokens']} | {row['errors']} |"
            )
            if rss:
                line += f" {row['rss_mib']:.0f} |"
            lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
