"""The OpenAI-compatible HTTP API over an `EngineLoop`: /v1/completions, /v1/chat/completions
(JSON or server-sent events), /v1/models, /health and /metrics.

`create_app` takes the models as objects (`ServedModels`), so tests and embedders can serve
in-process models; `specsample serve` loads them from the command line's options.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specsample.serve.choices import Piece
from specsample.serve.completion import Completion, ServedModels
from specsample.serve.loop import Draining, EngineLoop, QueueFull
from specsample.serve.metrics import CONTENT_TYPE, ServerMetrics
from specsample.serve.protocol import (
    CHAT,
    COMPLETIONS,
    GenerationRequest,
    RequestError,
    ServedModel,
    parse_request,
)

RETRY_AFTER_SECONDS = 1


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
                    "rule": models.rule,
                    "lossy": models.lossy,
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
    """One HTTP request in flight: submits its choices to the loop and gathers their outputs
    from the engine thread through an asyncio queue."""

    def __init__(self, request: GenerationRequest, models: ServedModels, loop: EngineLoop):
        self.request = request
        self.loop = loop
        self.completion = Completion(request, models)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list = []

    def submit(self) -> None:
        event_loop = asyncio.get_running_loop()

        def sink_for(index: int):
            return lambda item: event_loop.call_soon_threadsafe(
                self.queue.put_nowait, (index, item)
            )

        try:
            self.handles = self.loop.submit(self.completion.specs(sink_for))
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
            if self.completion.reasons[index] is None:
                self.loop.abort(handle)

    async def _next(self) -> tuple[int, list[Piece], bool]:
        """The next output of any choice: (index, released pieces, whether it ended). Raises
        ServerError when the choice failed."""
        index, item = await self.queue.get()
        if isinstance(item, BaseException):
            self.completion.fail(index)
            raise ServerError(
                500, f"internal error: {type(item).__name__}: {item}", "internal_error"
            )
        pieces, ended = self.completion.accept(index, item)
        if ended and not item.finished:  # cut by a stop string before the Engine saw it
            self.loop.abort(self.handles[index])
        return index, pieces, ended

    async def collect(self, http: Request) -> JSONResponse:
        watcher = asyncio.create_task(self._abort_on_disconnect(http))
        try:
            while not self.completion.finished:
                await self._next()
        finally:
            watcher.cancel()
            self.abort_unfinished()
        return JSONResponse(self.completion.response())

    async def _abort_on_disconnect(self, http: Request, every: float = 0.5) -> None:
        """A client gone before its JSON answer: its choices end at the next step."""
        while not self.completion.finished:
            await asyncio.sleep(every)
            if await http.is_disconnected():
                self.abort_unfinished()
                return

    async def stream(self) -> AsyncIterator[str]:
        completion = self.completion
        try:
            if self.request.kind == CHAT:
                for index in range(self.request.num_choices):
                    yield _event(completion.chunk(index, [], None, role=True))
            while not completion.finished:
                try:
                    index, pieces, ended = await self._next()
                except ServerError as error:
                    yield _event({"error": {"message": error.message, "type": error.kind}})
                    break
                if pieces or ended:
                    reason = completion.reasons[index] if ended else None
                    yield _event(completion.chunk(index, pieces, reason))
            if self.request.include_usage:
                yield _event(completion.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            self.abort_unfinished()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
