"""`EngineLoop`: one background thread that owns the Engine and runs `Engine.step()` while any
request is unfinished; other threads (the server's event loop, a batch job) submit and abort
requests through it.

Continuous batching is the Engine's: requests submitted while a step runs join the batch at
the next step, up to the Engine's max_batch; the rest wait in its queue. The loop bounds what it
admits (running + waiting <= max_batch + max_queue) and refuses the rest with `QueueFull`.

Each request has a `sink`, called on the loop thread with each RequestOutput of the request and,
if the request fails, once with the exception instead. A server's sink hands the item to an
asyncio queue with `call_soon_threadsafe`.

Failures: an exception raised by a request's own stop check ends that request alone (its sink
gets the exception). An exception from the batched step itself (the model pass that all rows
share) fails the requests of that step; the Engine is rebuilt and the loop goes on serving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specsample.engine.engine import Engine, RequestOutput
from specsample.warpers import SamplingConfig

Sink = Callable[[Any], None]  # receives RequestOutput items, or one Exception


class QueueFull(Exception):
    """The loop holds max_batch + max_queue requests already."""


class Draining(Exception):
    """The loop is shutting down and takes no new requests."""


@dataclass
class RequestSpec:
    """What `Engine.add_request` needs, plus where the outputs go."""

    prompt: list[int]
    sampling: SamplingConfig
    max_new_tokens: int
    sink: Sink
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    stop: Callable[[list[int]], bool] | None = None
    rule: str | None = None  # None: the Engine's
    top_logprobs: int = 0


@dataclass
class Handle:
    """A submitted request. `engine_id` is set once the loop thread added it to the Engine."""

    spec: RequestSpec
    engine_id: int | None = None
    done: bool = False
    error: BaseException | None = None  # raised by its own stop check
    submitted: float = field(default_factory=time.perf_counter)


class EngineLoop:
    """Runs `make_engine()`'s Engine on a background thread.

    make_engine   builds the Engine (called again to rebuild it after a failed step).
    max_queue     requests admitted beyond the Engine's max_batch before QueueFull.
    on_step       called on the loop thread after each step with (engine, seconds, outputs).
    """

    def __init__(
        self,
        make_engine: Callable[[], Engine],
        *,
        max_queue: int = 256,
        on_step: Callable[[Engine, float, list[RequestOutput]], None] | None = None,
    ):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue: expected an integer >= 0, got {max_queue!r}")
        self._make_engine = make_engine
        self.engine = make_engine()
        self.max_queue = max_queue
        self._on_step = on_step
        self._lock = threading.Condition()
        self._inbox: list[Handle] = []  # submitted, not yet in the Engine
        self._aborts: list[Handle] = []
        self._live: dict[int, Handle] = {}  # engine id -> handle (loop thread only)
        self._admitted = 0  # submitted and not done
        self._draining = False
        self._closing = False
        self._abort_everything = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ any thread

    @property
    def capacity(self) -> int:
        return self.engine.max_batch + self.max_queue

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def draining(self) -> bool:
        return self._draining

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="specsample-engine", daemon=True)
            self._thread.start()

    def submit(self, specs: list[RequestSpec]) -> list[Handle]:
        """Admits all of `specs` or none: raises QueueFull when they do not fit, Draining after
        `drain`."""
        handles = [Handle(spec) for spec in specs]
        with self._lock:
            if self._draining or self._closing:
                raise Draining("the server is shutting down")
            if self._admitted + len(specs) > self.capacity:
                raise QueueFull(
                    f"{self._admitted} requests are running or queued (at most {self.capacity})"
                )
            self._admitted += len(specs)
            self._inbox.extend(handles)
            self._lock.notify()
        return handles

    def abort(self, handle: Handle) -> None:
        """Ends the request at the next step (its last output has finish_reason "abort")."""
        with self._lock:
            if handle.done:
                return
            self._aborts.append(handle)
            self._lock.notify()

    def abort_all(self) -> None:
        """Ends every admitted request at the next step."""
        with self._lock:
            self._abort_everything = True
            self._lock.notify()

    def drain(self, grace: float) -> None:
        """Takes no new requests; ends those still running after `grace` seconds (each gets a
        final output with finish_reason "abort")."""
        with self._lock:
            self._draining = True
        timer = threading.Timer(grace, self.abort_all)
        timer.daemon = True
        timer.start()

    def close(self, timeout: float = 10.0) -> None:
        """Aborts everything and stops the thread."""
        self.abort_all()
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def queue_depth(self) -> int:
        """Admitted requests not yet decoding."""
        return len(self._inbox) + self.engine.num_waiting()

    # ------------------------------------------------------------------ the loop thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while (
                    not (self._inbox or self._aborts or self._closing or self._abort_everything)
                    and not self.engine.has_unfinished()
                ):
                    self._lock.wait()
                if self._closing and not self._inbox and not self.engine.has_unfinished():
                    return
                joining, self._inbox = self._inbox, []
                aborting, self._aborts = self._aborts, []
                everything, self._abort_everything = self._abort_everything, False
            for handle in joining:
                self._add(handle)
            if everything:
                aborting = list(self._live.values())
            for handle in aborting:
                if handle.engine_id is not None and not handle.done:
                    self.engine.abort(handle.engine_id)
            if self.engine.has_unfinished():
                self._step()

    def _add(self, handle: Handle) -> None:
        spec = handle.spec
        try:
            handle.engine_id = self.engine.add_request(
                spec.prompt,
                sampling=spec.sampling,
                max_new_tokens=spec.max_new_tokens,
                seed=spec.seed,
                eos_token_ids=spec.eos_token_ids,
                stop=None if spec.stop is None else _guarded_stop(handle, spec.stop),
                rule=spec.rule,
                top_logprobs=spec.top_logprobs,
            )
        except Exception as error:  # noqa: BLE001 - reported to the request's own sink
            self._finish(handle, error)
            return
        self._live[handle.engine_id] = handle

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 - fails this step's requests, not the loop
            self._fail_step(error)
            return
        seconds = time.perf_counter() - started
        for output in outputs:
            handle = self._live.get(output.request_id)
            if handle is None:
                continue
            if output.finished:
                del self._live[output.request_id]
                if handle.error is not None:
                    self._finish(handle, handle.error)
                    continue
            self._deliver(handle, output)
            if output.finished:
                self._finish(handle, None)
        if self._on_step is not None:
            self._on_step(self.engine, seconds, outputs)

    def _fail_step(self, error: Exception) -> None:
        failed = RuntimeError(f"the engine step failed: {type(error).__name__}: {error}")
        failed.__cause__ = error
        for handle in list(self._live.values()):
            self._finish(handle, failed)
        self._live.clear()
        self.engine = self._make_engine()

    def _deliver(self, handle: Handle, item: Any) -> None:
        try:
            handle.spec.sink(item)
        except Exception:  # noqa: BLE001 - a broken sink (closed event loop) ends its request
            if not handle.done and handle.engine_id is not None:
                self.engine.abort(handle.engine_id)

    def _finish(self, handle: Handle, error: BaseException | None) -> None:
        if error is not None:
            self._deliver(handle, error)
        with self._lock:
            handle.done = True
            self._admitted -= 1


def _guarded_stop(handle: Handle, stop: Callable[[list[int]], bool]):
    """The request's stop check; an exception in it ends that request with the error."""

    def check(new_tokens: list[int]) -> bool:
        try:
            return bool(stop(new_tokens))
        except Exception as error:  # noqa: BLE001 - reported when the request ends
            handle.error = error
            return True

    return check
