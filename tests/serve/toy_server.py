"""Tiny in-process models for the server tests: a character-level tokenizer (built with
`tokenizers`, wrapped in transformers' PreTrainedTokenizerFast, with a small chat template) and
ToyLM target/draft pairs over its vocabulary; a uvicorn server on 127.0.0.1 in a thread; and,
run as a script, the same server in its own process (for the SIGTERM test)."""

from __future__ import annotations

import argparse
import socket
import threading
import time

import uvicorn
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specsample import Engine
from specsample.adapters.toy import ToyLM
from specsample.drafters.model import ModelDrafter
from specsample.serve.app import create_app
from specsample.serve.completion import ServedModels

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
MODEL_NAME = "toy"
CONTEXT = 256


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1}
    for char in CHARS:
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
TARGET = ToyLM(VOCAB, seed=11, scale=1.5)


class ControlledToyLM(ToyLM):
    """A ToyLM that fails (an internal error) when a prompt that joins holds the token `poison`
    (not its drafts: a request's first pass scores its prompt and first drafts at once, and a
    drafted `poison` would fail a clean request at random), and whose
    forward passes wait for `gate` to be set (to hold requests in flight) and take at least
    `delay` seconds (a slow model)."""

    def __init__(self, *args, poison: int | None = None, gate=None, delay: float = 0.0, **kw):
        super().__init__(*args, **kw)
        self.poison = poison
        self.gate = gate
        self.delay = delay

    def add_rows(self, prompts):
        self._check_poison(prompts)
        return super().add_rows(prompts)

    def add_rows_last(self, prompts, last):  # a request's first scoring pass: it waits too
        self._check_poison([p[: len(p) - (last - 1)] for p in prompts])
        self._wait()
        return super().add_rows_last(prompts, last)

    def _check_poison(self, prompts):
        if self.poison is not None and any(self.poison in p for p in prompts):
            raise RuntimeError("the model failed on this row")

    def extend(self, tokens, num_valid):
        self._wait()
        return super().extend(tokens, num_valid)

    def _wait(self):
        if self.gate is not None:
            self.gate.wait()
        time.sleep(self.delay)


def served_models(
    *,
    speculative: bool = True,
    rule: str = "auto",
    draft_noise: float = 1.0,
    draft_seed: int = 12,
    draft_length: int | str = 3,
    max_batch: int = 16,
    independent_draft: bool = False,
    poison: str | None = None,
    gate: threading.Event | None = None,
    delay: float = 0.0,
    eos: bool = True,
    target: ToyLM | None = None,
) -> ServedModels:
    """The target TARGET (or `target`; a ControlledToyLM with `poison`, `gate` or `delay`),
    drafted by a noisy copy of it (or an unrelated ToyLM), with fixed draft length
    `draft_length`; eos=False: no token ends a request early (requests run to max_tokens)."""
    if target is None and poison is None and gate is None and not delay:
        target = TARGET
    elif target is None:
        poison_id = None if poison is None else TOKENIZER.encode(poison)[0]
        target = ControlledToyLM(
            VOCAB, seed=11, scale=1.5, poison=poison_id, gate=gate, delay=delay
        )

    def make_engine() -> Engine:
        drafter = None
        if speculative:
            if independent_draft:
                draft = ToyLM(VOCAB, seed=draft_seed, scale=3.0)
            else:
                draft = ToyLM(VOCAB, seed=draft_seed, base=target, noise=draft_noise)
            drafter = ModelDrafter(draft)
        return Engine(
            target,
            drafter,
            rule=rule,
            draft_length=draft_length if speculative else "auto",
            max_batch=max_batch,
        )

    return ServedModels(
        make_engine=make_engine,
        tokenizer=TOKENIZER,
        name=MODEL_NAME,
        context_length=CONTEXT,
        vocab_size=VOCAB,
        eos_token_ids=(TOKENIZER.eos_token_id,) if eos else (),
        rule=rule,
        lossy=rule == "typical",
        speculative=speculative,
        default_max_tokens=16,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread (a context manager)."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def main() -> None:
    """Serves the toy pair in this process until SIGTERM (the SIGTERM test runs this)."""
    from specsample.serve.server import run_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("--delay", type=float, default=0.02)
    args = parser.parse_args()
    app = create_app(served_models(max_batch=4, delay=args.delay, eos=False), max_queue=4)
    run_server(app, port=args.port, grace=args.grace, log_level="warning")


if __name__ == "__main__":
    main()
