"""`specsample audit server` on our own `specsample serve` through HTTP on 127.0.0.1.

In-process (uvicorn in a thread, tests/serve/toy_server.py: ToyLM over a character tokenizer):
the speculative server (model drafter, k 3) passes against the same target served without a
drafter; the same server forced to the LOSSY typical acceptance rule is rejected (the negative
control), and exact enumeration shows that it is far enough from exact for the audit's power.
As a subprocess (slow): the `specsample serve` command itself on tiny GGUF files written
in-process (tests/adapters/tiny_gguf.py) on the llama.cpp backend passes the same audit.

Size: 2 prompts x 300 (subprocess: 200) completions per server, 2 tokens each; at most 1200
requests per audit, each with a 30 s timeout. The exact server's false-failure rate is the
audit's alpha (1e-4)."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))

from toy_server import MODEL_NAME, VOCAB, ServerThread, served_models  # noqa: E402

from specsample.adapters.toy import ToyLM  # noqa: E402
from specsample.audit.server import ServerAuditConfig, audit_server, markdown  # noqa: E402
from specsample.serve.app import create_app  # noqa: E402

# Prompts where typical acceptance moves the first token's law far (TV 0.46 and 0.50 by exact
# enumeration, test_the_lossy_server_is_far_from_exact_on_the_prompts).
PROMPTS = ("hello", "my door is")
SAMPLES = 300


def target() -> ToyLM:
    """toy_server's target, one object per server (a ToyLM holds its batch's rows)."""
    return ToyLM(VOCAB, seed=11, scale=1.5)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny torch ops on a server thread and the audit's client threads: one intra-op thread is
    faster on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """The same target, target-only (no drafter): the reference the audit compares with."""
    with ServerThread(
        create_app(served_models(speculative=False, max_batch=8, target=target()))
    ) as running:
        yield running


def audit(url: str, reference_url: str, model: str = MODEL_NAME, samples: int = SAMPLES):
    config = ServerAuditConfig(
        url=url,
        model=model,
        reference_url=reference_url,
        prompts=PROMPTS,
        samples=samples,
        max_tokens=2,
        concurrency=8,
        rate=5000.0,
        timeout=30.0,
        max_requests=2 * len(PROMPTS) * samples,
        progress=False,
    )
    return audit_server(config)


def test_audit_passes_our_speculative_server(reference):
    app = create_app(served_models(max_batch=8, draft_length=3, target=target()))
    with ServerThread(app) as server:
        report = audit(server.url, reference.url)
        stats = app.state.loop.engine.stats
    assert report.verdict == "pass", markdown(report)
    assert report.requests == 2 * len(PROMPTS) * SAMPLES
    assert stats.accepted > 0 and stats.new_tokens >= len(PROMPTS) * SAMPLES  # it speculated
    # the audit detects, with probability 0.99, errors smaller than the lossy control's
    assert all(0 < p.detectable_tv < 0.45 for p in report.prompts), markdown(report)


def test_the_lossy_server_is_far_from_exact_on_the_prompts():
    """The typical rule's first token (one draft: the server's first step with max_tokens 2)
    is at TV > 0.45 from the target's on each prompt, by exact enumeration; the two-token joint
    the audit tests is at least as far."""
    typical = pytest.importorskip("specsample.lossy.typical")
    from toy_server import TOKENIZER

    exact_target = target()
    draft = ToyLM(VOCAB, seed=12, base=exact_target, noise=1.0)  # served_models' draft

    def after(model: ToyLM, context: list[int]):
        return lambda prefix: model.probs_for(context + list(prefix)).double()

    for prompt in PROMPTS:
        context = TOKENIZER.encode(prompt)
        p, q = after(exact_target, context), after(draft, context)
        first = torch.zeros(VOCAB, dtype=torch.float64)
        for tokens, probability in typical.exact_typical_distribution(p, q, k=1).items():
            first[tokens[0]] += probability
        assert 0.5 * float((first - p(())).abs().sum()) > 0.45


def test_audit_rejects_our_server_forced_to_a_lossy_rule(reference):
    """Negative control: typical acceptance (LOSSY) on the same pair; the completions' law moves
    away from the target's and the same audit must say so."""
    pytest.importorskip("specsample.lossy")  # registers the typical rule
    app = create_app(served_models(max_batch=8, draft_length=3, rule="typical", target=target()))
    with ServerThread(app) as server:
        report = audit(server.url, reference.url)
    assert report.verdict == "rejected" and report.exit_code == 1, markdown(report)


def logprobs_audit(url: str, extra_body: dict | None = None):
    config = ServerAuditConfig(
        url=url,
        model=MODEL_NAME,
        reference_logprobs=True,
        top_logprobs=20,
        prompts=PROMPTS,
        samples=SAMPLES,
        concurrency=8,
        rate=5000.0,
        timeout=30.0,
        max_requests=len(PROMPTS) * SAMPLES,
        extra_body=extra_body,
        progress=False,
    )
    return audit_server(config)


def test_logprobs_audit_passes_our_server_and_rejects_truncated_sampling():
    """The audit's other reference: the server's own top_logprobs (20 of the 34 tokens) for
    the first token (max_tokens 1: a target-only step). They are the target's raw distribution,
    which a request at temperature 1 samples from: pass. With top_k 3 the server samples from
    the 3 most likely tokens while it still reports the raw distribution (as documented), so the
    same audit must reject it (the negative control)."""
    with ServerThread(create_app(served_models(max_batch=8, target=target()))) as server:
        exact = logprobs_audit(server.url)
        truncated = logprobs_audit(server.url, {"top_k": 3})
    assert exact.verdict == "pass", markdown(exact)
    assert exact.requests == len(PROMPTS) * SAMPLES
    assert truncated.verdict == "rejected", markdown(truncated)


@pytest.mark.slow  # two llama.cpp servers and 800 requests: about 40 s on 2 busy cores
def test_audit_passes_the_specsample_serve_command_on_gguf_files_with_llamacpp(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    from own_server import ServeProcess
    from tiny_gguf import write_tiny_gguf

    target = write_tiny_gguf(tmp_path / "target.gguf", seed=0)
    draft = write_tiny_gguf(tmp_path / "draft.gguf", seed=0, mix=(3, 0.5))
    common = ["--target", str(target), "--backend", "llama.cpp", "--threads", "1"]
    common += ["--context", "64", "--max-batch", "8", "--model-name", "tiny"]
    # stops off: the tiny model is unsure everywhere, and would not draft at the defaults
    speculative = ["--draft", str(draft), "--k", "3", "--draft-confidence", "0"]
    speculative += ["--draft-survival", "0", "--draft-survival-greedy", "0"]
    with (
        ServeProcess([*common, "--drafter", "none"]) as reference,
        ServeProcess([*common, *speculative]) as server,
    ):
        report = audit(server.url, reference.url, model="tiny", samples=200)
        metrics = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    assert report.verdict == "pass", markdown(report)
    assert report.requests == 2 * len(PROMPTS) * 200
    # it speculated: drafts were kept (the acceptance rate since the engine started)
    rate = [line for line in metrics.splitlines() if line.startswith("specsample_acceptance_rate")]
    assert rate and float(rate[0].split()[-1]) > 0, metrics[-2000:]
