"""Serving benchmark: `specsample serve`'s app under 1, 4, 8 and 16 concurrent streaming clients,
speculative (adaptive and fixed draft length) vs target-only, on a tiny random-weight
transformers pair built in-process.

The pair: a Qwen2-shaped target (8 layers, hidden 256) and, as its drafter, its own first 2
layers with the same embeddings and head (a layer-skipping draft). The lm_head is scaled up so
the distributions are not flat, and the later layers are damped so that the draft agrees with
the target often (alpha about 0.85). A character tokenizer is built in-process. Each client
sends its requests one after the other (streaming /v1/completions, temperature 1, a seed each);
the server runs on 127.0.0.1 in this process (uvicorn in a thread), the clients are asyncio
tasks (httpx).

Measured per level: total throughput (completion tokens / wall time), p50 / p99 request latency,
p50 / p99 time to first token (first chunk with text), and the acceptance rate the responses
report. The issue's goal: with 8 clients, total throughput >= 2.5x one client's.

Run: python benchmarks/serve.py [--requests 6] [--max-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time

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
    started = time.perf_counter()
    first = None
    usage = stats = None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                usage, stats = chunk["usage"], chunk["specsample"]
    return {
        "latency": time.perf_counter() - started,
        "ttft": first,
        "tokens": usage["completion_tokens"],
        "alpha": stats["acceptance_rate"],
    }


async def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    async def client_task(client, c):
        results = []
        for r in range(requests):
            body = {
                "prompt": PROMPTS[(c + r) % len(PROMPTS)],
                "max_tokens": max_tokens,
                "temperature": 1.0,
                "seed": 1000 * c + r,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            results.append(await one_request(client, url, body))
        return results

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        done = await asyncio.gather(*(client_task(client, c) for c in range(clients)))
        wall = time.perf_counter() - started
    results = [r for per_client in done for r in per_client]
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    alphas = [r["alpha"] for r in results if r["alpha"] is not None]
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(r["tokens"] for r in results),
        "seconds": wall,
        "throughput": sum(r["tokens"] for r in results) / wall,
        "latency_p50": _quantile(latencies, 0.5),
        "latency_p99": _quantile(latencies, 0.99),
        "ttft_p50": _quantile(ttfts, 0.5),
        "ttft_p99": _quantile(ttfts, 0.99),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6, help="requests per client (6)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine two threads contend and a "
        "step of the tiny models gets about 20x slower)",
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0,
        help="instead of the levels: 8 speculative clients for this many seconds, printing the "
        "process RSS every 5 s",
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    torch.set_num_threads(args.threads)
    tokenizer = char_tokenizer()
    target, draft = tiny_pair(len(tokenizer))
    if args.soak:
        app = create_app(served(tokenizer, target, draft, True, 16))
        with Server(app) as url:
            samples = asyncio.run(soak(url, 8, args.soak, args.max_tokens))
        for elapsed, rss, done in samples:
            print(f"{elapsed:5d} s  RSS {rss:8.1f} MiB  requests {done}")
        return
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
                row = asyncio.run(run_level(url, clients, args.requests, args.max_tokens))
                rows.append(row)
                print(mode, _format(row), flush=True)
        report["modes"][mode] = rows
    print()
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


def _format(row: dict) -> str:
    return (
        f"clients {row['clients']:2d}: {row['throughput']:7.1f} tok/s, latency p50 "
        f"{row['latency_p50']:.2f} s p99 {row['latency_p99']:.2f} s, TTFT p50 "
        f"{row['ttft_p50']:.3f} s p99 {row['ttft_p99']:.3f} s, alpha {row['alpha']}"
    )


def markdown(report: dict) -> str:
    lines = [
        "| mode | clients | tokens/s | x one client | latency p50 / p99 (s) | TTFT p50 / p99 (s) "
        "| alpha |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, rows in report["modes"].items():
        single = rows[0]["throughput"]
        for row in rows:
            alpha = "-" if not row["alpha"] else f"{row['alpha']:.2f}"
            lines.append(
                f"| {mode} | {row['clients']} | {row['throughput']:.1f} | "
                f"{row['throughput'] / single:.2f} | {row['latency_p50']:.2f} / "
                f"{row['latency_p99']:.2f} | {row['ttft_p50']:.3f} / {row['ttft_p99']:.3f} | "
                f"{alpha} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
