"""`specsample serve`: the OpenAI-compatible server (needs the `serve` extra)."""

from __future__ import annotations

import argparse
import sys

from specsample.cli.models import ModelLoader, add_model_arguments, warn_if_lossy


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the models over an OpenAI-compatible HTTP API",
        description=(
            "Serve a target model, decoded with exact speculative sampling, behind OpenAI's "
            "API: POST /v1/completions and /v1/chat/completions (JSON or streamed), GET "
            "/v1/models, /health and /metrics (Prometheus). Requests join the running batch "
            "between steps (continuous batching) up to --max-batch; up to --max-queue more "
            "wait; beyond that the server answers 429. SIGTERM stops accepting, gives "
            "in-flight requests --shutdown-grace seconds, then ends them with a final chunk."
        ),
        epilog=(
            "Example: specsample serve --port 8000 &\n"
            "  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
            '    -d \'{"prompt": "def fib(n):", "max_tokens": 64, "seed": 1}\''
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    server.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting beyond --max-batch (256)"
    )
    server.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: no key)"
    )
    server.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM (default 30)",
    )
    server.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from specsample.serve.app import create_app
        from specsample.serve.server import run_server
    except ImportError as error:
        print(
            f"specsample serve: needs the serve extra (pip install 'specsample[serve]'): {error}",
            file=sys.stderr,
        )
        return 1
    loader = ModelLoader.from_args(args)
    if args.max_queue < 0:
        raise argparse.ArgumentTypeError(
            f"--max-queue: expected an integer >= 0, got {args.max_queue}"
        )
    if not 0 < args.port < 65536:
        raise argparse.ArgumentTypeError(f"--port: expected 1..65535, got {args.port}")
    warn_if_lossy(args, "serve")
    try:
        models = loader()
    except (ValueError, OSError) as error:
        print(f"specsample serve: {error}", file=sys.stderr)
        return 1
    app = create_app(models, max_queue=args.max_queue, api_key=args.api_key)
    print(
        f"specsample serve: {models.name} on http://{args.host}:{args.port}/v1 (rule "
        f"{models.rule}{', LOSSY' if models.lossy else ''}, max batch {args.max_batch}, "
        f"context {models.context_length})",
        file=sys.stderr,
    )
    run_server(
        app, host=args.host, port=args.port, grace=args.shutdown_grace, log_level=args.log_level
    )
    return 0
