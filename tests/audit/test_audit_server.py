"""`specsample.audit.audit_server` against fake OpenAI-compatible servers on 127.0.0.1 (ToyLM,
vocab 6): it passes an exact speculative server, rejects one that samples from its drafter, and
cannot judge a server that is down or answers errors. Each audit sends at most 2 x 2 x 300
requests, all with timeouts."""

from __future__ import annotations

import socket

import pytest
import torch
from fake_openai import FakeServer, first_token_tv

from specsample.audit.server import ServerAuditConfig, audit_server, completions_url, markdown
from specsample.cli.main import main

PROMPTS = ("Once upon a time", "A random fruit:")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The fake servers run tiny torch ops on many threads: one intra-op thread each is several
    times faster on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(url, **overrides):
    settings = dict(
        url=url,
        model="toy",
        prompts=PROMPTS,
        samples=300,
        max_tokens=1,
        rate=2000.0,
        concurrency=4,
        timeout=5.0,
        progress=False,
    )
    settings.update(overrides)
    return ServerAuditConfig(**settings)


def test_wrong_server_is_really_wrong_on_the_prompts():
    assert min(first_token_tv(prompt) for prompt in PROMPTS) > 0.25


def test_exact_server_passes_against_a_reference_server():
    with FakeServer("exact") as server, FakeServer("plain") as reference:
        report = audit_server(config(server.url, reference_url=reference.url, max_tokens=2))
    assert report.verdict == "pass", markdown(report)
    assert report.requests == 2 * 2 * 300
    assert not set(server.seeds) & set(reference.seeds)  # independent samples
    assert len(set(server.seeds)) == 300
    assert all(0 < prompt.detectable_tv < 1 for prompt in report.prompts)


def test_server_sampling_from_its_drafter_is_rejected_against_a_reference_server():
    with FakeServer("wrong") as server, FakeServer("plain") as reference:
        report = audit_server(config(server.url, reference_url=reference.url))
    assert report.verdict == "rejected" and report.exit_code == 1, markdown(report)


def test_logprobs_reference_passes_exact_and_rejects_wrong():
    with FakeServer("exact") as exact, FakeServer("wrong") as wrong:
        passed = audit_server(config(exact.url, reference_logprobs=True, top_logprobs=4))
        rejected = audit_server(config(wrong.url, reference_logprobs=True, top_logprobs=4))
    assert passed.verdict == "pass", markdown(passed)
    assert rejected.verdict == "rejected", markdown(rejected)


def test_logprobs_reference_passes_a_server_that_also_lists_the_sampled_token():
    """OpenAI's and vLLM's top_logprobs also hold the sampled token when it is not among the top
    ones; the reference is built from the tokens every answer lists, so this exact server
    passes (with 2 of 6 tokens listed, the sampled one is often outside them)."""
    with FakeServer("plain+sampled") as server:
        report = audit_server(config(server.url, reference_logprobs=True, top_logprobs=2))
    assert report.verdict == "pass", markdown(report)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_server_that_is_down_cannot_be_judged():
    report = audit_server(config(f"http://127.0.0.1:{free_port()}", reference_logprobs=True))
    assert report.verdict == "could not judge" and "could not be reached" in report.message


def test_server_answering_errors_cannot_be_judged():
    with FakeServer("error") as broken, FakeServer("plain") as reference:
        report = audit_server(config(reference.url, reference_url=broken.url))
    assert report.verdict == "could not judge" and "HTTP 500" in report.message


def test_server_without_logprobs_cannot_be_judged_with_the_logprobs_reference():
    with FakeServer("plain") as server:  # answers logprobs only when asked; ask for none
        report = audit_server(config(server.url, reference_logprobs=True, top_logprobs=0))
    assert report.verdict == "could not judge"


def test_too_many_requests_are_refused_before_any_is_sent():
    report = audit_server(config("http://127.0.0.1:9", reference_logprobs=True, max_requests=10))
    assert report.verdict == "could not judge" and "max_requests" in report.message


def test_exactly_one_reference_is_required():
    with pytest.raises(ValueError, match="reference"):
        audit_server(config("http://x"))


def test_completions_url():
    assert completions_url("http://h:1/") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1") == "http://h:1/v1/completions"


def test_cli_server_audit_exit_codes(tmp_path):
    with FakeServer("exact") as exact, FakeServer("wrong") as wrong:
        common = ["--model", "toy", "--reference-logprobs", "--top-logprobs", "4", "--quiet"]
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("A random fruit:\n")
        extra = ["--samples", "300", "--max-tokens", "1", "--rate", "2000", "--prompt-file"]
        args = ["audit", "server", *common, *extra, str(prompts), "--no-built-in-prompts"]
        out = tmp_path / "report"
        assert main([*args, "--url", exact.url, "--out", str(out)]) == 0
        assert (out / "audit.md").exists() and (out / "audit.json").exists()
        assert main([*args, "--url", wrong.url, "--out", str(out)]) == 1
    assert main([*args, "--url", f"http://127.0.0.1:{free_port()}", "--out", str(out)]) == 2


def test_cli_server_usage_errors(tmp_path):
    base = ["audit", "server", "--url", "http://x", "--model", "m", "--out", str(tmp_path)]
    assert main([*base]) == 2  # no reference
    assert main([*base, "--reference-logprobs", "--max-tokens", "4"]) == 2
    assert main([*base, "--reference-logprobs", "--no-built-in-prompts"]) == 2
    assert main([*base, "--reference-logprobs", "--extra-body", "[1]"]) == 2
    assert main([*base, "--reference-logprobs", "--extra-body", "{oops"]) == 2
