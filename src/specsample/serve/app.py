"""The OpenAI-compatible HTTP API over an `EngineLoop`: /v1/completions, /v1/chat/completions
(JSON or server-sent events), /v1/models, /health and /metrics.

`create_app` takes the models as objects (`ServedModels`), so tests and embedders can serve
in-process models; `specsample serve` loads them from the command line's options.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specsample.engine.engine import Engine, RequestOutput
from specsample.engine.text import stop_string_condition
from specsample.serve.choices import ChoiceText, Piece
from specsample.serve.loop import Draining, EngineLoop, QueueFull, RequestSpec
from specsample.serve.metrics import CONTENT_TYPE, ServerMetrics
from specsample.serve.protocol import (
    CHAT,
    COMPLETIONS,
    GenerationRequest,
    RequestError,
    ServedModel,
    finish_reason,
    parse_request,
)

RETRY_AFTER_SECONDS = 1


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


class ServerError(Exception):
    """A request the server cannot take right now (429 queue full, 503 shutting down) or an
    internal failure of one request (500)."""

    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def create_app(
    models: ServedModels,
    *,
    max_queue: int = 256,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine thread and stops it; `app.state.loop` is
    the EngineLoop (a server calls `app.state.loop.drain(grace)` on SIGTERM)."""
    metrics = ServerMetrics()
    loop = EngineLoop(models.make_engine, max_queue=max_queue, on_step=metrics.on_step)
    served = ServedModel(
        models.name,
        models.tokenizer,
        models.context_length,
        models.vocab_size,
        models.default_max_tokens,
        max_choices=loop.capacity,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        yield
        loop.close()

    app = FastAPI(title="specsample", lifespan=lifespan)
    app.state.loop = loop
    app.state.metrics = metrics
    _add_error_handlers(app, metrics)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = RequestError(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                metrics.requests.labels(request.url.path, "401").inc()
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if loop.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "running": loop.admitted, "capacity": loop.capacity}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(loop.queue_depth()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [
                {
                    "id": models.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "specsample",
                    "max_model_len": models.context_length,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, COMPLETIONS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, CHAT)

    async def _generate(request: Request, kind: str):
        endpoint = request.url.path
        body = await _read_json(request)
        parsed = parse_request(body, kind, served)
        run = _Run(parsed, models, loop)
        run.submit()
        metrics.prompt_tokens.inc(sum(len(p) for p in parsed.prompts) * parsed.n)
        if parsed.stream:
            metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(
                run.stream(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        response = await run.collect(request)
        metrics.requests.labels(endpoint, "200").inc()
        return response

    return app


async def _read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(
            400, f"request body: expected JSON, could not parse it ({error})"
        ) from None


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def count(request: Request, status: int) -> None:
        metrics.requests.labels(request.url.path, str(status)).inc()

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        count(request, error.status)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ServerError)
    async def server_error(request: Request, error: ServerError):
        count(request, error.status)
        body = {
            "error": {"message": error.message, "type": error.kind, "param": None, "code": None}
        }
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        count(request, 422)
        return JSONResponse(RequestError(422, str(error)).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        count(request, error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        code = "not_found" if error.status_code == 404 else None
        body = RequestError(error.status_code, message, code=code).body()
        return JSONResponse(body, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        count(request, 500)
        body = {
            "error": {
                "message": f"internal error: {type(error).__name__}: {error}",
                "type": "internal_error",
                "param": None,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=500)


class _Run:
    """One HTTP request's choices in flight: submits them, gathers their outputs from the
    engine thread through an asyncio queue, and renders OpenAI's JSON or chunks."""

    def __init__(self, request: GenerationRequest, models: ServedModels, loop: EngineLoop):
        self.request = request
        self.models = models
        self.loop = loop
        self.id = ("chatcmpl-" if request.kind == CHAT else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        count = request.num_choices
        self.texts = [ChoiceText(models.tokenizer, request.stop) for _ in range(count)]
        self.reasons: list[str | None] = [None] * count
        self.stats: list[Any] = [None] * count
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list = []

    def submit(self) -> None:
        event_loop = asyncio.get_running_loop()
        stop = stop_string_condition(self.models.tokenizer, self.request.stop)
        specs = []
        for index in range(self.request.num_choices):

            def sink(item, index=index):
                event_loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))

            specs.append(
                RequestSpec(
                    prompt=self.request.choice_prompt(index),
                    sampling=self.request.sampling,
                    max_new_tokens=self.request.max_tokens,
                    sink=sink,
                    seed=self.request.choice_seed(index),
                    eos_token_ids=self.models.eos_token_ids,
                    stop=None if stop is None else (lambda tokens, stop=stop: stop(0, tokens)),
                )
            )
        try:
            self.handles = self.loop.submit(specs)
        except QueueFull as error:
            raise ServerError(
                429,
                f"the server is busy: {error}; retry later",
                "rate_limit_exceeded",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        except Draining as error:
            raise ServerError(503, str(error), "service_unavailable") from None

    def abort_unfinished(self) -> None:
        for index, handle in enumerate(self.handles):
            if self.reasons[index] is None:
                self.loop.abort(handle)

    @property
    def finished(self) -> bool:
        return all(r is not None for r in self.reasons)

    async def _next(self) -> tuple[int, list[Piece]]:
        """The next output of any choice, as released pieces. Raises the request's error."""
        index, item = await self.queue.get()
        if isinstance(item, BaseException):
            self.reasons[index] = "error"
            raise ServerError(
                500, f"internal error: {type(item).__name__}: {item}", "internal_error"
            )
        output: RequestOutput = item
        text = self.texts[index]
        pieces = text.push(output.tokens, output.logprobs)
        if output.finished or text.stopped:
            pieces += text.finish()
            self.reasons[index] = finish_reason(output.finish_reason, text.stopped)
            self.stats[index] = output.stats
            if not output.finished:  # a stop string the engine's check did not see yet
                self.loop.abort(self.handles[index])
        return index, pieces

    # ------------------------------------------------------------------ JSON

    async def collect(self, http: Request) -> JSONResponse:
        pieces: list[list[Piece]] = [[] for _ in self.texts]
        watcher = asyncio.create_task(self._abort_on_disconnect(http))
        try:
            while not self.finished:
                index, new = await self._next()
                pieces[index] += new
        finally:
            watcher.cancel()
            self.abort_unfinished()
        return JSONResponse(self._response(pieces))

    async def _abort_on_disconnect(self, http: Request, every: float = 0.5) -> None:
        """A client gone before its JSON answer: its choices end at the next step."""
        while not self.finished:
            await asyncio.sleep(every)
            if await http.is_disconnected():
                self.abort_unfinished()
                return

    def _response(self, pieces: list[list[Piece]]) -> dict:
        choices = []
        for index, choice in enumerate(pieces):
            text = "".join(p.text for p in choice)
            entry: dict[str, Any] = {"index": index, "finish_reason": self.reasons[index]}
            if self.request.kind == CHAT:
                entry["message"] = {"role": "assistant", "content": text}
                entry["logprobs"] = _chat_logprobs(choice) if self.request.logprobs else None
            else:
                if self.request.echo:
                    prompt = self.request.choice_prompt(index)
                    text = self.models.tokenizer.decode(prompt) + text
                entry["text"] = text
                entry["logprobs"] = _completion_logprobs(choice) if self.request.logprobs else None
            choices.append(entry)
        return {
            "id": self.id,
            "object": "chat.completion" if self.request.kind == CHAT else "text_completion",
            "created": self.created,
            "model": self.models.name,
            "choices": choices,
            "usage": self._usage(),
            "specsample": self._specsample(),
        }

    def _usage(self) -> dict:
        prompt = sum(len(p) for p in self.request.prompts) * self.request.n
        completion = sum(t.num_tokens for t in self.texts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _specsample(self) -> dict:
        return specsample_stats(self.stats, self.models)

    # ------------------------------------------------------------------ server-sent events

    async def stream(self) -> AsyncIterator[str]:
        try:
            if self.request.kind == CHAT:
                for index in range(len(self.texts)):
                    yield _event(self._chunk(index, [], None, role=True))
            while not self.finished:
                try:
                    index, pieces = await self._next()
                except ServerError as error:
                    body = {"error": {"message": error.message, "type": error.kind}}
                    yield _event(body)
                    break
                reason = self.reasons[index]
                if pieces or reason is not None:
                    yield _event(self._chunk(index, pieces, reason))
            if self.request.include_usage:
                usage = self._chunk(0, [], None)
                usage["choices"] = []
                usage["usage"] = self._usage()
                usage["specsample"] = self._specsample()
                yield _event(usage)
            yield "data: [DONE]\n\n"
        finally:
            self.abort_unfinished()

    def _chunk(self, index: int, pieces: list[Piece], reason: str | None, role=False) -> dict:
        text = "".join(p.text for p in pieces)
        if self.request.kind == CHAT:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if pieces:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta}
            choice["logprobs"] = (
                _chat_logprobs(pieces) if self.request.logprobs and pieces else None
            )
        else:
            choice = {"index": index, "text": text}
            choice["logprobs"] = (
                _completion_logprobs(pieces) if self.request.logprobs and pieces else None
            )
        choice["finish_reason"] = reason
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.request.kind == CHAT else "text_completion",
            "created": self.created,
            "model": self.models.name,
            "choices": [choice],
        }
        if reason is not None:
            chunk["specsample"] = specsample_stats([self.stats[index]], self.models)
        return chunk


def specsample_stats(stats: list, models: ServedModels) -> dict:
    """The `specsample` object of a response: the rule, and the acceptance statistics of the
    request's choices together (None where a choice ended without statistics)."""
    present = [s for s in stats if s is not None]
    accepted = sum(s.accepted for s in present)
    keep_tests = sum(s.keep_tests for s in present)
    tokens = sum(s.new_tokens for s in present)
    row_steps = sum(s.row_steps for s in present)
    return {
        "rule": models.rule,
        "lossy": models.lossy,
        "speculative": models.speculative,
        "acceptance_rate": round(accepted / keep_tests, 4) if keep_tests else None,
        "tokens_per_pass": round(tokens / row_steps, 4) if row_steps else None,
        "target_passes": max((s.target_passes for s in present), default=0),
        "drafted": sum(s.drafted for s in present),
        "accepted": accepted,
    }


def _completion_logprobs(pieces: list[Piece]) -> dict:
    offsets, position = [], 0
    for piece in pieces:
        offsets.append(position)
        position += len(piece.text)
    return {
        "tokens": [p.text for p in pieces],
        "token_logprobs": [p.logprob for p in pieces],
        "top_logprobs": [{p.text: p.logprob} for p in pieces],
        "text_offset": offsets,
    }


def _chat_logprobs(pieces: list[Piece]) -> dict:
    return {
        "content": [
            {
                "token": p.text,
                "logprob": p.logprob,
                "bytes": list(p.text.encode()),
                "top_logprobs": [],
            }
            for p in pieces
        ]
    }


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
