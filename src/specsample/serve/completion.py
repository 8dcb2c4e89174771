"""One request's choices, from the Engine's outputs to OpenAI's JSON: the text of each choice
(stop strings applied), the finish reasons, usage, log-probabilities and the `specsample`
statistics. Shared by the server (app.py) and `specsample batch`; no web framework here."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from specsample.engine.engine import Engine, RequestOutput
from specsample.engine.text import stop_string_condition
from specsample.serve.choices import ChoiceText, Piece
from specsample.serve.loop import RequestSpec, Sink
from specsample.serve.protocol import CHAT, GenerationRequest, finish_reason


@dataclass
class ServedModels:
    """What the server runs.

    make_engine     builds the Engine (target, drafter, rule, draft length, max_batch); called
                    once at start and again to rebuild it after a failed step.
    tokenizer       text <-> ids (transformers' interface: encode, decode, apply_chat_template).
    name            the model id clients send (GET /v1/models lists it).
    context_length  tokens per request, prompt and completion together.
    rule            the verification rule's name, reported in each response; lossy marks a rule
                    whose output is NOT distributed as the target.
    """

    make_engine: Callable[[], Engine]
    tokenizer: Any
    name: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    rule: str = "auto"
    lossy: bool = False
    speculative: bool = True
    default_max_tokens: int = 256


class Completion:
    """The choices of one request: `specs` makes the Engine requests; `accept` turns each
    output into the text pieces safe to send; `response` / `chunk` render OpenAI's JSON."""

    def __init__(self, request: GenerationRequest, models: ServedModels):
        self.request = request
        self.models = models
        self.id = ("chatcmpl-" if request.kind == CHAT else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        count = request.num_choices
        self.texts = [ChoiceText(models.tokenizer, request.stop) for _ in range(count)]
        self.reasons: list[str | None] = [None] * count
        self.stats: list[Any] = [None] * count
        self.pieces: list[list[Piece]] = [[] for _ in range(count)]
        self._texts: dict[int, str] = {}  # token id -> its text decoded alone

    def specs(self, sink_for: Callable[[int], Sink]) -> list[RequestSpec]:
        """One RequestSpec per choice; sink_for(index) is where that choice's outputs go."""
        stop = stop_string_condition(self.models.tokenizer, self.request.stop)
        return [
            RequestSpec(
                prompt=self.request.choice_prompt(index),
                sampling=self.request.sampling,
                max_new_tokens=self.request.max_tokens,
                sink=sink_for(index),
                seed=self.request.choice_seed(index),
                eos_token_ids=self.models.eos_token_ids,
                stop=None if stop is None else (lambda tokens, stop=stop: stop(0, tokens)),
                rule=self.request.rule,
                top_logprobs=min(self.request.top_logprobs, self.models.vocab_size),
            )
            for index in range(self.request.num_choices)
        ]

    @property
    def finished(self) -> bool:
        return all(r is not None for r in self.reasons)

    def accept(self, index: int, output: RequestOutput) -> tuple[list[Piece], bool]:
        """The pieces of choice `index` released by `output`, and whether the choice ended
        with them. A choice cut by a stop string ends before the Engine says so (the caller
        aborts its request); the Engine's later outputs for it release nothing."""
        text = self.texts[index]
        if self.reasons[index] is not None:
            if output.stats is not None:
                self.stats[index] = output.stats
            return [], False
        pieces = text.push(output.tokens, output.logprobs, output.top_logprobs)
        ended = output.finished or text.stopped
        if ended:
            pieces += text.finish()
            self.reasons[index] = finish_reason(output.finish_reason, text.stopped)
            self.stats[index] = output.stats
        self.pieces[index] += pieces
        return pieces, ended

    def fail(self, index: int) -> None:
        self.reasons[index] = "error"

    def response(self) -> dict:
        """The non-streaming body."""
        choices = []
        for index, choice in enumerate(self.pieces):
            text = "".join(p.text for p in choice)
            entry: dict[str, Any] = {"index": index, "finish_reason": self.reasons[index]}
            if self.request.kind == CHAT:
                entry["message"] = {"role": "assistant", "content": text}
                entry["logprobs"] = self._chat_logprobs(choice) if self.request.logprobs else None
            else:
                if self.request.echo:
                    prompt = self.request.choice_prompt(index)
                    text = self.models.tokenizer.decode(prompt) + text
                entry["text"] = text
                entry["logprobs"] = (
                    self._completion_logprobs(choice) if self.request.logprobs else None
                )
            choices.append(entry)
        return {
            "id": self.id,
            "object": "chat.completion" if self.request.kind == CHAT else "text_completion",
            "created": self.created,
            "model": self.models.name,
            "choices": choices,
            "usage": self.usage(),
            "specsample": specsample_stats(self.stats, self.models, self.request.rule),
        }

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.request.prompts) * self.request.n
        completion = sum(t.num_tokens for t in self.texts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def chunk(self, index: int, pieces: list[Piece], reason: str | None, role=False) -> dict:
        """One streaming chunk of choice `index` (chat: the first carries the role)."""
        text = "".join(p.text for p in pieces)
        logprobs = self.request.logprobs and pieces
        if self.request.kind == CHAT:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if pieces:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta}
            choice["logprobs"] = self._chat_logprobs(pieces) if logprobs else None
        else:
            choice = {"index": index, "text": text}
            choice["logprobs"] = self._completion_logprobs(pieces) if logprobs else None
        choice["finish_reason"] = reason
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.request.kind == CHAT else "text_completion",
            "created": self.created,
            "model": self.models.name,
            "choices": [choice],
        }
        if reason is not None:
            chunk["specsample"] = specsample_stats(
                [self.stats[index]], self.models, self.request.rule
            )
        return chunk

    def token_text(self, token: int) -> str:
        """A token's text decoded alone, as the text stream shows it (special tokens: '')."""
        text = self._texts.get(token)
        if text is None:
            text = self.models.tokenizer.decode([token], skip_special_tokens=True)
            self._texts[token] = text
        return text

    def _completion_logprobs(self, pieces: list[Piece]) -> dict:
        """OpenAI's completions format. top_logprobs[i] maps texts to log-probabilities: the
        request's N most likely tokens at position i and the sampled one; tokens whose texts
        coincide share one entry, the log of their summed probabilities."""
        offsets, position = [], 0
        for piece in pieces:
            offsets.append(position)
            position += len(piece.text)
        return {
            "tokens": [p.text for p in pieces],
            "token_logprobs": [p.logprob for p in pieces],
            "top_logprobs": [self._top_dict(p) for p in pieces],
            "text_offset": offsets,
        }

    def _top_dict(self, piece: Piece) -> dict[str, float]:
        listed = [(self.token_text(token), logprob) for token, logprob in piece.top]
        if all(token != piece.token for token, _ in piece.top):
            listed.append((piece.text, piece.logprob))
        top: dict[str, float] = {}
        for text, logprob in listed:
            top[text] = _log_add(top[text], logprob) if text in top else logprob
        return top

    def _chat_logprobs(self, pieces: list[Piece]) -> dict:
        """OpenAI's chat format: per token its text, log-probability and bytes, and the
        request's top_logprobs most likely tokens at its position (each with its own entry)."""
        return {
            "content": [
                {
                    "token": p.text,
                    "logprob": p.logprob,
                    "bytes": list(p.text.encode()),
                    "top_logprobs": [self._alternative(t, lp) for t, lp in p.top],
                }
                for p in pieces
            ]
        }

    def _alternative(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def usage_chunk(self) -> dict:
        chunk = self.chunk(0, [], None)
        chunk["choices"] = []
        chunk["usage"] = self.usage()
        chunk["specsample"] = specsample_stats(self.stats, self.models, self.request.rule)
        return chunk


def specsample_stats(stats: list, models: ServedModels, rule: str | None = None) -> dict:
    """The `specsample` object of a response: the rule (the request's `rule`, exact, or the
    server's), and the acceptance statistics of the request's choices together (None where a
    choice ended without statistics)."""
    present = [s for s in stats if s is not None]
    accepted = sum(s.accepted for s in present)
    keep_tests = sum(s.keep_tests for s in present)
    tokens = sum(s.new_tokens for s in present)
    row_steps = sum(s.row_steps for s in present)
    return {
        "rule": models.rule if rule is None else rule,
        "lossy": models.lossy if rule is None else False,
        "speculative": models.speculative,
        "acceptance_rate": round(accepted / keep_tests, 4) if keep_tests else None,
        "tokens_per_pass": round(tokens / row_steps, 4) if row_steps else None,
        "target_passes": max((s.target_passes for s in present), default=0),
        "drafted": sum(s.drafted for s in present),
        "accepted": accepted,
    }


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b))."""
    high, low = max(a, b), min(a, b)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))
