"""`specsample batch IN.jsonl OUT.jsonl`: offline generation, resumable, locally or on Ray."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specsample.cli.models import ModelLoader, add_model_arguments, warn_if_lossy


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="generate completions for a JSONL file of requests (resumable; Ray optional)",
        description=(
            "Read one OpenAI request body per line (id, prompt or messages, max_tokens, "
            "temperature, top_p, top_k, min_p, n, stop, seed), write one response per line with "
            "the row's id, its usage and acceptance statistics. Each row is appended and "
            "fsync'd as it finishes, so after a crash a rerun of the same command skips the ids "
            "already in OUT: every input row ends up in OUT exactly once. Rows come out in the "
            "order they finish. A row with a bad field gets an 'error' object."
        ),
        epilog=(
            "Examples:\n"
            "  specsample batch prompts.jsonl out.jsonl --max-batch 32\n"
            "  RAY_ADDRESS=ray://head:10001 specsample batch prompts.jsonl out.jsonl "
            "--ray --replicas 4"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="JSONL requests, each with a unique 'id'")
    parser.add_argument("output", type=Path, help="JSONL responses (appended to; resumable)")
    add_model_arguments(parser)
    parser.add_argument(
        "--max-queue", type=int, default=256, help="rows admitted beyond --max-batch (256)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cluster = parser.add_argument_group("Ray (needs the ray extra)")
    cluster.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster: ADDRESS, or with no value RAY_ADDRESS / a running local "
        "cluster / a new local one",
    )
    cluster.add_argument(
        "--replicas", type=int, default=1, help="engine replicas (Ray actors), default 1"
    )
    cluster.add_argument(
        "--ray-batch-size", type=int, default=16, help="rows per map_batches call (16)"
    )
    cluster.add_argument(
        "--cpus-per-replica", type=float, default=1, help="CPUs reserved per replica (1)"
    )
    cluster.add_argument(
        "--gpus-per-replica", type=float, default=0, help="GPUs reserved per replica (0)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from specsample.serve.batch import read_rows, run_batch, written_ids

    loader = ModelLoader.from_args(args)
    for option, value in (("--replicas", args.replicas), ("--ray-batch-size", args.ray_batch_size)):
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option}: expected an integer >= 1, got {value}")
    try:  # a bad input file fails before any model loads; a finished job loads none
        rows = read_rows(args.input)
        done = written_ids(args.output)
    except (OSError, ValueError) as error:
        print(f"specsample batch: {error}", file=sys.stderr)
        return 1
    if all(row.key in done for row in rows):
        print(
            f"specsample batch: wrote 0 rows to {args.output} (all {len(rows)} were there already)",
            file=sys.stderr,
        )
        return 0
    warn_if_lossy(args, "batch")
    progress = not args.no_progress
    try:
        if args.ray is not None:
            written, skipped = _run_on_ray(args, loader, progress)
        else:
            written, skipped = run_batch(
                loader(), args.input, args.output, max_queue=args.max_queue, progress=progress
            )
    except (ValueError, OSError) as error:
        print(f"specsample batch: {error}", file=sys.stderr)
        return 1
    print(
        f"specsample batch: wrote {written} rows to {args.output} ({skipped} were there already)",
        file=sys.stderr,
    )
    return 0


def _run_on_ray(args: argparse.Namespace, loader: ModelLoader, progress: bool) -> tuple[int, int]:
    from specsample.serve.batch import run_on_ray

    try:
        import ray  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"--ray needs the ray extra (pip install 'specsample[ray]'): {error}"
        ) from None
    return run_on_ray(
        loader,
        args.input,
        args.output,
        replicas=args.replicas,
        batch_size=args.ray_batch_size,
        address=None if args.ray == "auto" else args.ray,
        num_cpus_per_replica=args.cpus_per_replica,
        num_gpus_per_replica=args.gpus_per_replica,
        max_queue=args.max_queue,
        progress=progress,
    )
