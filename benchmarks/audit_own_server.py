"""The black-box server audit (`specsample audit server`) on our own `specsample serve`: the
default pair's GGUF files on the llama.cpp backend, the speculative server (model drafter,
fixed k) against the same target served with `--drafter none`, each in its own process on
127.0.0.1. With --control, the same speculative server forced to the LOSSY typical rule is
audited too (it should be rejected, given enough completions).

Writes benchmarks/audit_own_server.md (or --out). Run:

    nice -n 19 .venv/bin/python benchmarks/audit_own_server.py [--samples 250] [--control]

Cost: 2 x prompts x samples requests per audit (default 2 x 3 x 250 = 1500), each a short prompt
and 2 new tokens through a 1.5B target on one llama.cpp thread: expect several minutes per 100
requests on a busy 2-core machine (benchmarks/audit_llamacpp.md: 1500 requests on the 0.5B
model took 585 s). --target/--draft take other GGUF files (a smoke run on tiny ones: see
tests/audit/test_audit_own_server.py).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests" / "audit"))

from own_server import ServeProcess  # noqa: E402

from specsample.audit.server import ServerAuditConfig, audit_server, markdown  # noqa: E402

PROMPTS = HERE / "audit_llamacpp_prompts.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target GGUF (default: the default pair's)")
    parser.add_argument("--draft", help="draft GGUF (default: the default pair's)")
    parser.add_argument("--samples", type=int, default=250, help="completions per prompt, server")
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per server")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--prompt-file", type=Path, default=PROMPTS)
    parser.add_argument("--control", action="store_true", help="also audit --rule typical")
    parser.add_argument("--out", type=Path, default=HERE / "audit_own_server.md")
    args = parser.parse_args()
    if args.target is None or args.draft is None:
        from specsample.adapters.default_pair import gguf_paths

        target, draft = (str(p) for p in gguf_paths())
        args.target, args.draft = args.target or target, args.draft or draft
    prompts = tuple(line for line in args.prompt_file.read_text().splitlines() if line.strip())
    common = ["--target", args.target, "--backend", "llama.cpp", "--threads", str(args.threads)]
    common += ["--context", "256", "--max-batch", str(args.concurrency), "--model-name", "m"]
    speculative = ["--draft", args.draft, "--drafter", "model", "--k", str(args.k)]
    runs = [("exact (rule auto)", [*speculative])]
    if args.control:
        runs.append(("LOSSY control (rule typical)", [*speculative, "--rule", "typical"]))
    sections, rows = [], []
    with ServeProcess([*common, "--drafter", "none"], start_timeout=600) as reference:
        for name, options in runs:
            with ServeProcess([*common, *options], start_timeout=600) as server:
                config = ServerAuditConfig(
                    url=server.url,
                    model="m",
                    reference_url=reference.url,
                    prompts=prompts,
                    samples=args.samples,
                    max_tokens=args.max_tokens,
                    concurrency=args.concurrency,
                    rate=args.rate,
                    timeout=args.timeout,
                )
                start = time.perf_counter()
                report = audit_server(config)
                seconds = time.perf_counter() - start
            detectable = [p.detectable_tv for p in report.prompts] or [float("nan")]
            smallest = min((p.p_value for p in report.prompts), default=float("nan"))
            rows.append(
                f"| {name} | {report.verdict} | {smallest:.2g} | {min(detectable):.3f} to "
                f"{max(detectable):.3f} | {report.requests} | {seconds:.0f} |"
            )
            print(rows[-1], flush=True)
            sections += [f"## {name}", "", markdown(report).split("\n", 2)[2]]
    text = "\n".join(
        [
            "# Server audit of our own `specsample serve` (llama.cpp backend)",
            "",
            f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
            f"benchmarks/audit_own_server.py: target {Path(args.target).name}, draft "
            f"{Path(args.draft).name}, k {args.k}, {args.threads} llama.cpp thread(s) per "
            f"server; reference: the same target with --drafter none; {len(prompts)} prompts "
            f"({args.prompt_file.name}), {args.samples} completions per prompt and server, "
            f"{args.max_tokens} tokens each.",
            "",
            "| server | verdict | smallest p-value | detectable TV (per prompt) | requests | s |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            *sections,
        ]
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
