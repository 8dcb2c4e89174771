"""`specsample audit`: is another engine's speculative sampling exact?

    specsample audit verifier TARGET   a verification function (module:function or a built-in)
    specsample audit server --url URL --model M (--reference-url URL2 | --reference-logprobs)

Exit codes: 0 nothing rejected, 1 rejected (not exact), 2 could not judge (or a usage error).
The work is in `specsample.audit`; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VERIFIER_DESCRIPTION = """\
Audit a speculative-sampling verification function for exactness.

TARGET is 'module:function' with the contract

    fn(draft_tokens [batch, k] int64, draft_probs [batch, k, vocab] or None,
       target_probs [batch, k+1, vocab], generator) -> tokens [batch, k+1]

(emitted tokens left-aligned, padded with -1; a function that also takes draft_lengths=
runs on ragged rows too), or a built-in: ours:token, ours:block, ours:tree, ours:typical
(lossy: must be rejected), transformers, flashinfer, vllm.

Each hard case draws draft chains, runs the function and compares the first two tokens a
decoder would produce with the target's exact law (G-tests at a stated false-failure rate).
The report gives, per case, the p-value, the observed total-variation distance with an upper
bound, and the smallest error the test detects with probability 0.99."""

VERIFIER_EPILOG = """\
exit codes: 0 nothing rejected, 1 rejected (not exact), 2 could not judge
examples:
  specsample audit verifier ours:token
  specsample audit verifier mypackage.spec:verify --samples 50000 --out audit-mine
  specsample audit verifier transformers --cases worked_example,p_equals_q"""

SERVER_DESCRIPTION = """\
Black-box audit of an OpenAI-compatible server's speculative decoding.

Sends many short completions (temperature 1, varied seeds) on built-in prompts (and yours)
and compares the first tokens with a reference: the same model with speculation off on
another server (--reference-url: a two-sample test on the joint of the first tokens), or the
server's own top log-probabilities of the first token (--reference-logprobs: a goodness-of-fit
test). Requests are bounded in number, rate and concurrency; progress goes to stderr."""

SERVER_EPILOG = """\
exit codes: 0 nothing rejected, 1 rejected (not exact), 2 could not judge
examples:
  specsample audit server --url http://127.0.0.1:8000 --model m --reference-url http://127.0.0.1:8001
  specsample audit server --url http://127.0.0.1:8000 --model m --reference-logprobs"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `audit` subcommand and its `verifier` and `server` subcommands."""
    parser = subparsers.add_parser(
        "audit",
        help="test another engine's speculative sampling for exactness (verifier or server)",
        description="Test another engine's speculative sampling for exactness.",
    )
    kinds = parser.add_subparsers(title="what to audit", dest="audit_kind", metavar="KIND")
    kinds.required = True
    _register_verifier(kinds)
    _register_server(kinds)


def _register_verifier(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "verifier",
        help="a verification function (module:function or a built-in shim)",
        description=VERIFIER_DESCRIPTION,
        epilog=VERIFIER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="TARGET", help="module:function or a built-in name")
    parser.add_argument(
        "--samples",
        metavar="N",
        type=int,
        default=None,
        help="trials per case (default: 200000, enough to detect a first-token TV error of 0.01 "
        "with probability 0.99)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="false-failure rate of the whole audit (default: 1e-4), split over its tests",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default: 0)")
    parser.add_argument(
        "--cases",
        metavar="NAMES",
        help="comma-separated case names (default: the whole suite; see the report for names)",
    )
    _add_output_options(parser, "audit-verifier")
    parser.set_defaults(run=run_verifier, _parser=parser)


def _register_server(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "server",
        help="an OpenAI-compatible server, against a reference",
        description=SERVER_DESCRIPTION,
        epilog=SERVER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="base URL of the server under audit")
    parser.add_argument("--model", required=True, help="model name to send in requests")
    reference = parser.add_mutually_exclusive_group(required=True)
    reference.add_argument(
        "--reference-url", metavar="URL", help="base URL of the same model with speculation off"
    )
    reference.add_argument(
        "--reference-logprobs",
        action="store_true",
        help="use the server's own top log-probabilities of the first token as the reference",
    )
    parser.add_argument(
        "--reference-model", metavar="M", help="model name at --reference-url (default: --model)"
    )
    parser.add_argument(
        "--prompt-file",
        type=Path,
        help="more prompts, one per line (added to the built-in ones)",
    )
    parser.add_argument(
        "--no-built-in-prompts",
        action="store_true",
        help="use only the prompts of --prompt-file",
    )
    parser.add_argument(
        "--samples",
        metavar="N",
        type=int,
        default=1000,
        help="completions per prompt and server (default: 1000)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=2,
        help="tokens per completion, 1 to 3; the test is on their joint (default: 2)",
    )
    parser.add_argument(
        "--top-logprobs",
        type=int,
        default=20,
        help="log-probabilities asked for with --reference-logprobs (default: 20)",
    )
    parser.add_argument("--alpha", type=float, default=1e-4, help="false-failure rate (1e-4)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (4)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (20)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (30)")
    parser.add_argument(
        "--max-requests",
        type=int,
        default=20_000,
        help="refuse to start an audit that needs more requests than this (default: 20000)",
    )
    parser.add_argument("--api-key", default=None, help="sent as a bearer token when given")
    parser.add_argument(
        "--extra-body",
        metavar="JSON",
        help='a JSON object merged into every request, e.g. \'{"top_k": 0, "min_p": 0, '
        '"repeat_penalty": 1}\' for servers whose defaults truncate or reshape the '
        "distribution (needed with --reference-logprobs there)",
    )
    parser.add_argument("--seed", type=int, default=0, help="first request seed (default: 0)")
    _add_output_options(parser, "audit-server")
    parser.set_defaults(run=run_server, _parser=parser)


def _add_output_options(parser: argparse.ArgumentParser, default_dir: str) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(default_dir),
        help=f"directory for the markdown, JSON and PNG report (default: ./{default_dir})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _check_positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise argparse.ArgumentTypeError(f"{name}: expected a positive number, got {value}")


def run_verifier(args: argparse.Namespace) -> int:
    _check_positive("--samples", args.samples)
    if args.samples is not None and args.samples < 100:
        raise argparse.ArgumentTypeError(f"--samples: expected at least 100, got {args.samples}")
    if args.alpha is not None and not 0 < args.alpha < 1:
        raise argparse.ArgumentTypeError(f"--alpha: expected a number in (0, 1), got {args.alpha}")
    try:
        from specsample.audit import report as report_module
        from specsample.audit.verifier import DEFAULT_ALPHA, DEFAULT_SAMPLES, audit_verifier
    except ImportError as error:
        print(f"audit: needs scipy (pip install 'specsample[audit]'): {error}", file=sys.stderr)
        return 2
    cases = None
    if args.cases:
        cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        report = audit_verifier(
            args.target,
            samples=args.samples or DEFAULT_SAMPLES,
            alpha=args.alpha or DEFAULT_ALPHA,
            cases=cases,
            seed=args.seed,
            progress=progress,
        )
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("cases:", "--cases:")) from error
    written = report_module.write(report, args.out)
    _print_summary(report_module.markdown(report), report.verdict, written)
    return report.exit_code


def run_server(args: argparse.Namespace) -> int:
    if not 1 <= args.max_tokens <= 3:
        raise argparse.ArgumentTypeError(f"--max-tokens: expected 1 to 3, got {args.max_tokens}")
    for name in ("samples", "concurrency", "rate", "timeout", "max_requests", "top_logprobs"):
        _check_positive("--" + name.replace("_", "-"), getattr(args, name))
    if not 0 < args.alpha < 1:
        raise argparse.ArgumentTypeError(f"--alpha: expected a number in (0, 1), got {args.alpha}")
    try:
        from specsample.audit import server
    except ImportError as error:
        print(f"audit: needs scipy (pip install 'specsample[audit]'): {error}", file=sys.stderr)
        return 2
    prompts = [] if args.no_built_in_prompts else list(server.BUILT_IN_PROMPTS)
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text()
        except OSError as error:
            raise argparse.ArgumentTypeError(f"--prompt-file: cannot read it ({error})") from error
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise argparse.ArgumentTypeError(
            "--no-built-in-prompts: expected prompts from --prompt-file, got none"
        )
    extra_body = None
    if args.extra_body:
        try:
            extra_body = json.loads(args.extra_body)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"--extra-body: expected JSON ({error})") from error
        if not isinstance(extra_body, dict):
            raise argparse.ArgumentTypeError(
                f"--extra-body: expected a JSON object, got {args.extra_body!r}"
            )
    config = server.ServerAuditConfig(
        url=args.url,
        model=args.model,
        reference_url=args.reference_url,
        reference_model=args.reference_model,
        reference_logprobs=args.reference_logprobs,
        prompts=tuple(prompts),
        samples=args.samples,
        max_tokens=args.max_tokens,
        top_logprobs=args.top_logprobs,
        alpha=args.alpha,
        concurrency=args.concurrency,
        rate=args.rate,
        timeout=args.timeout,
        max_requests=args.max_requests,
        api_key=args.api_key,
        extra_body=extra_body,
        seed=args.seed,
        progress=not args.quiet,
    )
    report = server.audit_server(config)
    written = server.write(report, args.out)
    _print_summary(server.markdown(report), report.verdict, written)
    return report.exit_code


def _print_summary(text: str, verdict: str, written: list[Path]) -> None:
    print(text)
    print(f"verdict: {verdict}")
    print("wrote: " + ", ".join(str(path) for path in written))
