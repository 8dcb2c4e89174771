"""One choice's text as it streams: detokenised token by token, cut before the first stop
string, and held back while its tail could still become one (so a stream never sends text that a
stop string later removes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from specsample.engine.text import TextStream


@dataclass
class Piece:
    """A released token: its text (cut at a stop string), id and target log-probability, and
    the target's most likely (id, log-probability) pairs at its position when asked for."""

    text: str
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class ChoiceText:
    def __init__(self, tokenizer: Any, stops: list[str]):
        self._stream = TextStream(tokenizer, 1)
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending: list[Piece] = []
        self.text = ""  # released so far
        self.stopped = False  # a stop string was found: nothing more is released
        self.num_tokens = 0  # tokens the engine committed (for usage)

    def push(
        self, tokens: list[int], logprobs: list[float], tops: list | None = None
    ) -> list[Piece]:
        """The pieces that are safe to send after these committed tokens (tops: per token, the
        most likely (id, log-probability) pairs, or None)."""
        self.num_tokens += len(tokens)
        if self.stopped:
            return []
        texts = self._stream.push(0, tokens)
        tops = [[] for _ in tokens] if tops is None else tops
        self._pending += [
            Piece(t, k, lp, list(top))
            for t, k, lp, top in zip(texts, tokens, logprobs, tops, strict=True)
        ]
        return self._release(final=False)

    def finish(self) -> list[Piece]:
        """Everything still held back (the request ended)."""
        return [] if self.stopped else self._release(final=True)

    def _release(self, final: bool) -> list[Piece]:
        full = self.text + "".join(p.text for p in self._pending)
        cut = min((full.find(s) for s in self.stops if s in full), default=-1)
        if cut >= 0:
            limit, self.stopped = cut, True
        elif final:
            limit = len(full)
        else:
            limit = self._safe_limit(full)
        released, position = [], len(self.text)
        while self._pending:
            piece = self._pending[0]
            if position + len(piece.text) <= limit:
                released.append(self._pending.pop(0))
                position += len(piece.text)
            elif self.stopped or final:
                if position < limit:
                    released.append(
                        Piece(piece.text[: limit - position], piece.token, piece.logprob, piece.top)
                    )
                    position = limit
                self._pending.clear()
            else:
                break
        self.text = full[:position]
        return released

    def _safe_limit(self, full: str) -> int:
        """The start of the earliest tail of `full` that begins some stop string."""
        for start in range(max(len(self.text), len(full) - self._hold), len(full)):
            tail = full[start:]
            if any(s.startswith(tail) for s in self.stops):
                return start
        return len(full)
