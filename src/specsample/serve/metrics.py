"""Prometheus metrics of one server, in its own registry (several servers can share a process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST as CONTENT_TYPE,
)
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from specsample.engine.engine import Engine, RequestOutput

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "specsample_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "specsample_prompt_tokens", "prompt tokens of admitted requests", registry=r
        )
        self.generation_tokens = Counter(
            "specsample_generation_tokens", "tokens generated (committed by the engine)", registry=r
        )
        self.acceptance_rate = Gauge(
            "specsample_acceptance_rate",
            "drafted tokens kept per keep test, since the engine started",
            registry=r,
        )
        self.tokens_per_pass = Gauge(
            "specsample_tokens_per_pass",
            "tokens emitted per request per target pass, since the engine started",
            registry=r,
        )
        self.queue_depth = Gauge(
            "specsample_queue_depth", "admitted requests waiting to join the batch", registry=r
        )
        self.running = Gauge(
            "specsample_running_requests", "requests in the running batch", registry=r
        )
        self.step_seconds = Histogram(
            "specsample_step_seconds",
            "duration of one engine step (draft, target pass, verify, commit)",
            buckets=STEP_BUCKETS,
            registry=r,
        )

    def on_step(self, engine: Engine, seconds: float, outputs: list[RequestOutput]) -> None:
        """Called on the engine thread after each step."""
        self.step_seconds.observe(seconds)
        self.generation_tokens.inc(sum(len(o.tokens) for o in outputs))
        stats = engine.stats
        self.acceptance_rate.set(stats.alpha)
        self.tokens_per_pass.set(stats.tokens_per_pass)
        self.running.set(engine.num_running())

    def render(self, queue_depth: int) -> bytes:
        self.queue_depth.set(queue_depth)
        return generate_latest(self.registry)
