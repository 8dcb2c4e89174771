"""Tiny OpenAI-compatible completion servers for tests, on 127.0.0.1 (a free port, one thread per
request), backed by ToyLM. Tokens are written as " t<id>"; a prompt becomes the prefix of its
bytes modulo the vocabulary.

Modes: "plain" samples from the target (speculation off); "exact" runs speculative sampling
(specsample.verify, token rule, 2 drafts from a noisy copy of the target); "wrong" samples from
the drafter (speculation gone wrong); "error" answers HTTP 500 to everything; "plain+sampled"
samples as "plain" and, as OpenAI's and vLLM's servers do, lists the sampled token in
top_logprobs too when it is not among the top ones.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from specsample import verify
from specsample.adapters.toy import ToyLM

VOCAB = 6
TARGET = ToyLM(VOCAB, seed=5, scale=1.0)
DRAFT = ToyLM(VOCAB, seed=6, base=TARGET, noise=2.0)
K = 2


def prefix_of(prompt: str) -> list[int]:
    return [byte % VOCAB for byte in prompt.encode()[-6:]]


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs.double(), 1, generator=generator))


def generate(mode: str, prompt: str, max_tokens: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    context = prefix_of(prompt)
    out: list[int] = []
    while len(out) < max_tokens:
        if mode == "plain":
            out.append(sample(TARGET.probs_for(context + out), generator))
        elif mode == "wrong":
            out.append(sample(DRAFT.probs_for(context + out), generator))
        else:  # exact: one speculative step
            drafts, draft_rows = [], []
            for _ in range(K):
                row = DRAFT.probs_for(context + out + drafts)
                draft_rows.append(row)
                drafts.append(sample(row, generator))
            target_rows = [TARGET.probs_for(context + out + drafts[:i]) for i in range(K + 1)]
            result = verify(
                torch.tensor([drafts]),
                torch.stack(draft_rows)[None].double(),
                torch.stack(target_rows)[None].double(),
                generator=generator,
            )
            out += [t for t in result.tokens[0].tolist() if t >= 0]
    return out[:max_tokens]


def text_of(token: int) -> str:
    return f" t{token}"


class Handler(BaseHTTPRequestHandler):
    mode = "plain"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        if self.mode == "error" or self.path != "/v1/completions":
            self._send(500, {"error": {"message": "internal error"}})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt, max_tokens, seed = body["prompt"], int(body["max_tokens"]), int(body["seed"])
        self.seeds.append(seed)
        tokens = generate(self.mode.removesuffix("+sampled"), prompt, max_tokens, seed)
        choice = {"text": "".join(text_of(t) for t in tokens), "index": 0}
        if body.get("logprobs"):
            context = prefix_of(prompt)
            top = []
            for i in range(len(tokens)):
                logprobs = TARGET.probs_for(context + tokens[:i]).double().log()
                best = torch.argsort(logprobs, descending=True)[: int(body["logprobs"])].tolist()
                if self.mode.endswith("+sampled") and tokens[i] not in best:
                    best.append(tokens[i])
                top.append({text_of(int(t)): float(logprobs[t]) for t in best})
            choice["logprobs"] = {"tokens": [text_of(t) for t in tokens], "top_logprobs": top}
        self._send(200, {"choices": [choice]})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeServer:
    """Context manager: a server in `mode` on a free port; `.url` is its base URL."""

    def __init__(self, mode: str) -> None:
        self.seeds: list[int] = []  # the seed of every request served
        handler = type(f"Handler_{mode}", (Handler,), {"mode": mode, "seeds": self.seeds})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def first_token_tv(prompt: str) -> float:
    """TV between the drafter's and the target's first token (how wrong "wrong" is)."""
    context = prefix_of(prompt)
    return 0.5 * float((TARGET.probs_for(context) - DRAFT.probs_for(context)).abs().sum())


assert math.isfinite(first_token_tv("x"))
