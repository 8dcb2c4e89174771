"""The server audit at its default size, against the test suite's fake OpenAI-compatible servers
(tests/audit/fake_openai.py: ToyLM, vocab 6, on 127.0.0.1): an exact speculative server and one
that samples from its drafter, each against a plain reference server and against its own top
log-probabilities. Reports verdicts, the worst p-value, the detectable TV per prompt (power 0.99)
and the wall clock.

The rate limit is raised to 2000 requests/s here (the servers are in-process); against a real
server the default of 20 requests/s makes the two-sample audit (16000 requests) take about 13
minutes.

Writes benchmarks/audit_server_fake.md. Run: .venv/bin/python benchmarks/audit_server_fake.py
(about 5 minutes on 2 cores).
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests" / "audit"))

from fake_openai import FakeServer  # noqa: E402

from specsample.audit.server import ServerAuditConfig, audit_server  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)  # many server threads doing tiny torch ops
    rows = [
        "| server | reference | verdict | smallest p-value | detectable TV (per prompt) | "
        "requests | s |",
        "|---|---|---|---|---|---|---|",
    ]
    with FakeServer("exact") as exact, FakeServer("wrong") as wrong, FakeServer("plain") as plain:
        for name, server in (("exact", exact), ("wrong (samples the drafter)", wrong)):
            for reference in ("plain server", "log-probabilities"):
                options = (
                    {"reference_url": plain.url}
                    if reference == "plain server"
                    else {"reference_logprobs": True, "top_logprobs": 6}
                )
                config = ServerAuditConfig(
                    url=server.url, model="toy", rate=2000.0, progress=False, **options
                )
                start = time.perf_counter()
                report = audit_server(config)
                seconds = time.perf_counter() - start
                smallest = min(p.p_value for p in report.prompts) if report.prompts else 1.0
                detectable = [p.detectable_tv for p in report.prompts]
                rows.append(
                    f"| {name} | {reference} | {report.verdict} | {smallest:.2g} | "
                    f"{min(detectable):.3f} to {max(detectable):.3f} | {report.requests} | "
                    f"{seconds:.0f} |"
                )
                print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# Server audit on fake servers (default size)",
            "",
            f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
            "benchmarks/audit_server_fake.py: 8 built-in prompts, 1000 completions per prompt "
            "and server, 2 tokens each against the plain server (two-sample test on their "
            "joint), 1 token against the log-probabilities; false-failure rate 1e-4 per audit.",
            "",
            *rows,
            "",
        ]
    )
    (HERE / "audit_server_fake.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
