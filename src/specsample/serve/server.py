"""Running the app under uvicorn, with a graceful SIGTERM: the listening socket closes (uvicorn),
new requests get 503, in-flight requests get `grace` seconds to finish and are then ended with a
final chunk (finish_reason "abort"), so no client hangs; then the process exits with status 0."""

from __future__ import annotations

import signal

import uvicorn
from fastapi import FastAPI


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float):
        super().__init__(config)
        self._app = app
        self._grace = grace

    def handle_exit(self, sig, frame) -> None:
        self._app.state.loop.drain(self._grace)
        super().handle_exit(sig, frame)
        # uvicorn raises a captured signal again once it has shut down (the process then dies
        # of it); a drained SIGTERM is a clean exit, status 0.
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()


def run_server(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace: float = 30.0,
    log_level="info",
) -> None:
    """Serves `app` until SIGTERM or SIGINT (see the module docstring)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=grace + 5,
        lifespan="on",
    )
    _DrainingServer(config, app, grace).run()
