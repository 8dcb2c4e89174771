"""The contenders of benchmarks/llamacpp_speed.py and how one run of each is made.

In-process contenders run in workers: subprocesses of llamacpp_speed.py (`--worker KIND`) that
load their models once and then answer one JSON line per run, so that each contender has its own
process and its own peak RSS, and an idle worker takes no CPU while another runs. Kinds:

* llamacpp: llama.cpp target-only through llama-cpp-python's low-level API (llama_decode and a
  llama_sampler chain: temperature + dist, or greedy), llama.cpp's defaults (weights repacked);
  one context per batch size, one sequence per row;
* lookup: llama-cpp-python's prompt lookup (`Llama(draft_model=LlamaPromptLookupDecoding())`,
  its defaults: 2-gram, 10 tokens), driven through `Llama.generate`;
* ours-model / ours-ngram / ours-none: specsample's `generate` on llama.cpp (`load_pair`,
  backend llama.cpp), as `specsample generate` runs it: model drafter with the defaults of
  --draft-confidence and --draft-survival, adaptive draft length (--k auto, max 16), block
  verification (--rule auto), weights repacked, and a cost memory per worker (a temporary
  folder; the warm-up run fills it, as a setting's first run does for the command line) unless
  a run asks for none (`memory: false`: the first run of a setting);
* hf: specsample's `generate` on transformers, float32 target, int8 draft (target-only and
  model drafter in one process: one float32 target copy);
* probe: one-off, times target and draft passes of K tokens (the cost curve) and exits.

llama.cpp's `llama-speculative-simple` runs as a subprocess per run: llamacpp_tool.py. This
module imports nothing heavy at import time (the parsing test loads it).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llamacpp_tool import N_CTX

MAX_K = 20  # --max-k's default
TARGET_KS = (1, 2, 3, 4, 5, 8, 11)  # cost curve: target pass sizes (prompt lookup feeds <= 11)
DRAFT_KS = (1, 2, 4)
PROBE_REPEATS = 3


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------ workers


class Worker:
    """A worker subprocess: `request(dict) -> dict`, `close() -> peak RSS of the worker`."""

    def __init__(self, script: Path, kind: str, threads: int, gguf: tuple[Path, Path]):
        self.kind = kind
        command = [sys.executable, str(script), "--worker", kind, "--threads", str(threads)]
        command += ["--gguf", str(gguf[0]), str(gguf[1])]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.ready = self._read()
        self.rss = self.ready.get("rss", 0)

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.kind} exited (code {self.process.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.kind}: {reply['error']}")
        return reply

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        reply = self._read()
        self.rss = max(self.rss, reply.get("rss", 0))
        return reply

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        return self.rss


def serve(kind: str, threads: int, gguf: tuple[str, str]) -> int:
    """The worker's loop: load, say ready, answer one JSON line per request line on stdin.
    llama.cpp's own prints go to stderr: the replies use a copy of the original stdout. gguf:
    the target's and the draft's files (passed in, so that the llama-cpp-python workers never
    import torch, which would add to their RSS)."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    replies = os.fdopen(reply_fd, "w", buffering=1)
    try:
        runner = RUNNERS[kind](threads, (Path(gguf[0]), Path(gguf[1])))
    except Exception as error:  # noqa: BLE001 - reported to the parent
        replies.write(json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n")
        return 1
    replies.write(json.dumps({"ready": True, "rss": peak_rss(), **runner.facts}) + "\n")
    for line in sys.stdin:
        try:
            result = runner.run(**json.loads(line))
        except Exception as error:  # noqa: BLE001
            replies.write(json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n")
            return 1
        replies.write(json.dumps({**result, "rss": peak_rss()}) + "\n")
    return 0


def _quiet_llama():
    """llama_cpp with llama.cpp's log discarded (the callback is kept alive in the module)."""
    import llama_cpp

    if not hasattr(_quiet_llama, "callback"):

        @llama_cpp.llama_log_callback
        def discard(level, text, user_data):
            pass

        llama_cpp.llama_log_set(discard, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _quiet_llama.callback = discard
    return llama_cpp


class RawLlama:
    """llama.cpp target-only: llama_decode of one token per row per pass, llama_sampler per
    row. Model and context parameters are llama.cpp's defaults except threads, n_ctx, n_batch
    and the sequences (one per row)."""

    def __init__(self, threads: int, gguf: tuple[Path, Path]):
        self.llama = _quiet_llama()
        self.threads = threads
        target = gguf[0]
        params = self.llama.llama_model_default_params()
        self.model = self.llama.llama_model_load_from_file(str(target).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {target}")
        self.contexts: dict[int, Any] = {}
        self.facts = {"repack": bool(getattr(params, "use_extra_bufts", True))}

    def _context(self, batch: int):
        if batch not in self.contexts:
            params = self.llama.llama_context_default_params()
            params.n_ctx, params.n_batch, params.n_seq_max = N_CTX, 2048, batch
            params.n_threads = params.n_threads_batch = self.threads
            ctx = self.llama.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError("llama.cpp could not create a context")
            self.contexts[batch] = (ctx, self.llama.llama_batch_init(2048, 0, 1))
        return self.contexts[batch]

    def _sampler(self, temperature: float, seed: int):
        llama = self.llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        if temperature > 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(temperature))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
        else:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        return chain

    def run(self, prompt, temperature, seed, tokens, batch=1, **_) -> dict[str, Any]:
        llama = self.llama
        ctx, feed = self._context(batch)
        llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
        samplers = [self._sampler(temperature, seed + b) for b in range(batch)]

        def decode(entries: list[tuple[int, int, int, bool]]) -> None:
            for i, (token, pos, seq, wanted) in enumerate(entries):
                feed.token[i], feed.pos[i], feed.n_seq_id[i] = token, pos, 1
                feed.seq_id[i][0], feed.logits[i] = seq, wanted
            feed.n_tokens = len(entries)
            if llama.llama_decode(ctx, feed) != 0:
                raise RuntimeError("llama_decode failed")

        started = time.perf_counter()
        n = len(prompt)
        decode([(t, i, b, i == n - 1) for b in range(batch) for i, t in enumerate(prompt)])
        last = [llama.llama_sampler_sample(samplers[b], ctx, (b + 1) * n - 1) for b in range(batch)]
        passes = 1
        for step in range(tokens - 1):
            decode([(last[b], n + step, b, True) for b in range(batch)])
            last = [llama.llama_sampler_sample(samplers[b], ctx, b) for b in range(batch)]
            passes += 1
        seconds = time.perf_counter() - started
        for chain in samplers:
            llama.llama_sampler_free(chain)
        return {"seconds": seconds, "new_tokens": tokens * batch, "row_steps": passes * batch}


class Lookup:
    """llama-cpp-python's prompt lookup at its defaults, sampled through `Llama.generate` with a
    plain temperature (top-k/top-p/min-p off, no repeat penalty)."""

    def __init__(self, threads: int, gguf: tuple[Path, Path]):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        _quiet_llama()
        target = gguf[0]
        self.drafter = LlamaPromptLookupDecoding()
        self.llm = Llama(
            model_path=str(target),
            n_ctx=N_CTX,
            n_threads=threads,
            n_threads_batch=threads,
            draft_model=self.drafter,
            verbose=False,
        )
        self.facts = {
            "max_ngram_size": self.drafter.max_ngram_size,
            "num_pred_tokens": self.drafter.num_pred_tokens,
        }

    def run(self, prompt, temperature, seed, tokens, batch=1, **_) -> dict[str, Any]:
        if batch != 1:
            raise ValueError("prompt lookup runs one sequence")
        llm, out, evals = self.llm, [], []
        plain_eval = type(llm).eval

        def counting_eval(fed):
            evals.append((len(out), list(fed)))
            return plain_eval(llm, fed)

        llm.reset()
        llm.set_seed(seed)
        llm.eval = counting_eval
        started = time.perf_counter()
        generator = llm.generate(
            prompt, temp=temperature, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0
        )
        for token in generator:
            out.append(int(token))
            if len(out) >= tokens:
                break
        generator.close()
        seconds = time.perf_counter() - started
        del llm.eval
        drafted, accepted = lookup_acceptance(evals[1:], out)
        return {
            "seconds": seconds,
            "new_tokens": len(out),
            "row_steps": len(evals),
            "drafted": drafted,
            "accepted": accepted,
            "mean_fed": statistics.mean(len(f) for _, f in evals[1:]) if evals[1:] else 1.0,
        }


def lookup_acceptance(evals: list[tuple[int, list[int]]], out: list[int]) -> tuple[int, int]:
    """Drafted and accepted tokens of prompt lookup's decode passes. A pass made when `p` tokens
    had been emitted feeds [out[p-1], drafts...]; its drafts are kept while they equal out[p:].
    A pass whose outcome the run's end cut off is left out."""
    drafted = accepted = 0
    for p, fed in evals:
        drafts = fed[1:]
        kept = 0
        while kept < len(drafts) and p + kept < len(out) and out[p + kept] == drafts[kept]:
            kept += 1
        if p + kept >= len(out):  # the run ended before this pass's outcome was seen
            continue
        drafted += len(drafts)
        accepted += kept
    return drafted, accepted


class Ours:
    """specsample's `generate` on llama.cpp or transformers, set up as `specsample generate`."""

    def __init__(self, threads: int, backend: str, drafter: str):
        import torch

        from specsample.adapters.loading import load_pair

        torch.set_grad_enabled(False)
        torch.set_num_threads(threads)
        self.torch, self.drafter = torch, drafter
        transformers = backend == "transformers"
        self.pair = load_pair(
            backend=backend,
            threads=threads,
            use_draft=drafter in ("model", "both"),
            draft_quantize="int8" if transformers else "none",
            dtype=torch.float32 if transformers else None,
            repack=not transformers,  # the command line's default on llama.cpp
        )  # n_ctx and max_batch: the command line's (load_pair's defaults)
        self.facts = {"description": self.pair.description, "load_seconds": self.pair.seconds}
        # the cost memory of this worker's runs (as the command line keeps one per setting)
        self.memory_folder = tempfile.mkdtemp(prefix="specsample-bench-costs-")

    def run(
        self, prompt, temperature, seed, tokens, batch=1, drafter=None, memory=True, k=None, **_
    ) -> dict:
        from specsample.drafters.model import (
            DEFAULT_CONFIDENCE,
            DEFAULT_GREEDY_SURVIVAL,
            DEFAULT_SURVIVAL,
            ModelDrafter,
        )
        from specsample.drafters.ngram import NgramDrafter
        from specsample.engine import AdaptiveDraftLength, generate
        from specsample.engine.memory import CostMemory
        from specsample.warpers import SamplingConfig

        kind = drafter or self.drafter
        made = {
            "model": lambda: ModelDrafter(
                self.pair.draft,
                confidence=DEFAULT_CONFIDENCE,
                survival=DEFAULT_SURVIVAL,
                greedy_survival=DEFAULT_GREEDY_SURVIVAL,
            ),
            "ngram": NgramDrafter,
            "none": lambda: None,
        }[kind]()
        policy = AdaptiveDraftLength(MAX_K) if made is not None else 0
        if k is not None and kind == "model":  # a fixed length, the drafter without stops
            made, policy = ModelDrafter(self.pair.draft), k
        elif made is not None and memory:
            policy.recall(CostMemory({"drafter": kind}, self.memory_folder))
        started = time.perf_counter()
        out = generate(
            self.pair.target,
            [prompt] * batch,
            generator=self.torch.Generator().manual_seed(seed),
            drafter=made,
            sampling=SamplingConfig(temperature=temperature),
            max_new_tokens=tokens,
            draft_length=policy,
            eos_token_ids=(),
            rule="block",  # what --rule auto runs for one chain
        )
        seconds = time.perf_counter() - started
        stats = out.stats
        return {
            "seconds": seconds,
            "new_tokens": sum(len(t) for t in out.tokens),
            "row_steps": stats.row_steps,
            "drafted": stats.drafted if made is not None else None,
            "accepted": stats.accepted if made is not None else None,
            "stats": dataclasses.asdict(stats),
        }


class Probe:
    """The cost curve: median seconds of one pass of K tokens after a 100-token context, for
    the target and the draft, through llama.cpp at its defaults (weights repacked), as
    llama-speculative-simple runs them."""

    def __init__(self, threads: int, gguf: tuple[Path, Path]):
        self.threads, self.gguf = threads, gguf
        self.facts: dict[str, Any] = {}

    def run(self, prompt, repeats=PROBE_REPEATS, **_) -> dict[str, Any]:
        import torch

        from specsample.adapters.llamacpp import LlamaCppLM

        context = (prompt * (100 // len(prompt) + 1))[:100]
        continuation = (prompt * 2)[: max(TARGET_KS + DRAFT_KS)]
        curves = {}
        for name, path, ks in zip(
            ("target", "draft"), self.gguf, (TARGET_KS, DRAFT_KS), strict=True
        ):
            lm = LlamaCppLM(path, n_ctx=1024, max_batch=1, threads=self.threads, repack=True)
            lm.prefill([context])
            curve = {}
            for k in ks:
                samples = []
                for _ in range(repeats + 1):  # the first is a warm-up
                    started = time.perf_counter()
                    lm.extend(torch.tensor([continuation[:k]]), torch.tensor([k]))
                    samples.append(time.perf_counter() - started)
                    lm.truncate(torch.tensor([len(context)]))
                curve[k] = statistics.median(samples[1:])
            curves[name] = curve
            lm.close()
        return curves


RUNNERS = {
    "llamacpp": RawLlama,
    "lookup": Lookup,
    "ours-model": lambda threads, gguf: Ours(threads, "llama.cpp", "model"),
    "ours-ngram": lambda threads, gguf: Ours(threads, "llama.cpp", "ngram"),
    "ours-none": lambda threads, gguf: Ours(threads, "llama.cpp", "none"),
    "hf": lambda threads, gguf: Ours(threads, "transformers", "both"),
    "probe": Probe,
}
