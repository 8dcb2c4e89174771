"""`audit_server`: a black-box exactness audit of an OpenAI-compatible server.

It sends many short completions (temperature 1, top_p 1, a different seed each) to
`/v1/completions` and compares, prompt by prompt, what comes out with a reference:

- `reference_url`: the same model with speculation off on another server. The outcome is the
  completion's text (its first `max_tokens` tokens); a two-sample G-test on pooled cells asks
  whether both servers draw it from one distribution.
- `reference_logprobs`: the audited server's own top log-probabilities of the first token (one
  token per completion). A goodness-of-fit G-test compares the first tokens with them (the
  tokens every answer lists), the other tokens pooled into one "other" cell.

Each prompt is one test at alpha / prompts. The power is stated as the smallest total-variation
error (between the pooled outcome distributions) detected with probability 0.99 (see `stats`).
Requests are bounded in number (`max_requests`), rate and concurrency, each has a timeout, and
the first failed request stops the audit with "could not judge". Only the standard library
talks HTTP.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from specsample.audit import stats
from specsample.audit.report import heading

# Prompts whose next tokens are uncertain, where a drafter and its target tend to disagree.
BUILT_IN_PROMPTS = (
    "Once upon a time",
    "My favourite number between 1 and 100 is",
    "The colour I would paint my door is",
    "A random fruit:",
    "def add(a, b):\n    return",
    "The weather tomorrow will be",
    "In one word, the sea is",
    "Here is a name for a cat:",
)

PASS, REJECTED, COULD_NOT_JUDGE = "pass", "rejected", "could not judge"
EXIT_CODES = {PASS: 0, REJECTED: 1, COULD_NOT_JUDGE: 2}
POWER = 0.99
REFERENCE_SEED_OFFSET = 1_000_003  # the reference's seeds start this far from the server's
OTHER = "<other>"  # the cell of first tokens outside the reference's top log-probabilities


class RequestFailed(Exception):
    """A request to a server failed: the audit cannot judge."""


@dataclass(frozen=True)
class ServerAuditConfig:
    """What to audit and how hard. samples: completions per prompt and server."""

    url: str
    model: str
    reference_url: str | None = None
    reference_model: str | None = None
    reference_logprobs: bool = False
    prompts: tuple[str, ...] = BUILT_IN_PROMPTS
    samples: int = 1000
    max_tokens: int = 2
    top_logprobs: int = 20
    alpha: float = 1e-4
    concurrency: int = 4
    rate: float = 20.0
    timeout: float = 30.0
    max_requests: int = 20_000
    api_key: str | None = None
    extra_body: dict | None = None  # merged into every request (e.g. {"top_k": 0})
    seed: int = 0
    progress: bool = True

    @property
    def requests_needed(self) -> int:
        servers = 2 if self.reference_url else 1
        return len(self.prompts) * self.samples * servers


@dataclass
class PromptResult:
    """One prompt's test."""

    prompt: str
    status: str
    p_value: float = math.nan
    df: int = 0
    cells: int = 0
    samples: int = 0
    reference_samples: int = 0
    observed_tv: float = math.nan
    tv_upper_bound: float = math.nan
    detectable_tv: float = math.nan
    top_outcomes: list[tuple[str, int, float]] = field(default_factory=list)


@dataclass
class ServerAuditReport:
    url: str
    model: str
    reference: str
    max_tokens: int
    samples: int
    alpha: float
    alpha_per_test: float
    requests: int
    seconds: float
    prompts: list[PromptResult]
    message: str = ""

    @property
    def verdict(self) -> str:
        if self.message or not self.prompts:
            return COULD_NOT_JUDGE
        statuses = {prompt.status for prompt in self.prompts}
        if REJECTED in statuses:
            return REJECTED
        return COULD_NOT_JUDGE if COULD_NOT_JUDGE in statuses else PASS

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["verdict"], data["exit_code"] = self.verdict, self.exit_code
        return data


# HTTP.


def completions_url(base: str) -> str:
    """base + /v1/completions (or + /completions when base already ends in /v1)."""
    base = base.rstrip("/")
    return base + ("/completions" if base.endswith("/v1") else "/v1/completions")


def post_completion(url: str, payload: dict, *, timeout: float, api_key: str | None) -> dict:
    """POSTs one completion request and returns its first choice; RequestFailed otherwise."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        detail = error.read()[:200].decode(errors="replace")
        raise RequestFailed(f"{url} answered HTTP {error.code}: {detail}") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise RequestFailed(f"{url} could not be reached: {reason}") from error
    try:
        return json.loads(body)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise RequestFailed(
            f"{url} answered something that is not a completion: {body[:200]!r}"
        ) from error


class RateLimiter:
    """At most `rate` requests per second across threads (evenly spaced)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_time = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.next_time)
            self.next_time = slot + self.interval
        time.sleep(max(0.0, slot - now))


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.lock = threading.Lock()
        self.last = 0.0

    def step(self) -> None:
        with self.lock:
            self.done += 1
            now = time.monotonic()
            if self.enabled and (now - self.last > 0.2 or self.done == self.total):
                self.last = now
                filled = int(30 * self.done / self.total)
                bar = "#" * filled + "." * (30 - filled)
                print(f"\r[{bar}] {self.done}/{self.total} requests", end="", file=sys.stderr)
                if self.done == self.total:
                    print(file=sys.stderr)


# The audit.


def audit_server(config: ServerAuditConfig) -> ServerAuditReport:
    """Runs the audit described by `config` (module docstring). Never raises for a server that is
    down or answers errors: the report says it could not judge."""
    if config.reference_logprobs == bool(config.reference_url):
        raise ValueError(
            "reference: expected exactly one of reference_url and reference_logprobs, got "
            f"reference_url={config.reference_url!r}, reference_logprobs="
            f"{config.reference_logprobs!r}"
        )
    if not config.prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    max_tokens = 1 if config.reference_logprobs else config.max_tokens
    reference = config.reference_url or "top log-probabilities of the first token"
    alpha_per_test = config.alpha / len(config.prompts)
    report = ServerAuditReport(
        config.url,
        config.model,
        reference,
        max_tokens,
        config.samples,
        config.alpha,
        alpha_per_test,
        0,
        0.0,
        [],
    )
    if config.requests_needed > config.max_requests:
        report.message = (
            f"the audit needs {config.requests_needed} requests, more than max_requests="
            f"{config.max_requests}; lower samples or the number of prompts"
        )
        return report
    start = time.perf_counter()
    try:
        outcomes = _collect(config, max_tokens)
    except RequestFailed as error:
        report.message = str(error)
        report.seconds = time.perf_counter() - start
        return report
    report.requests = config.requests_needed
    for index, prompt in enumerate(config.prompts):
        if config.reference_logprobs:
            result = _fit_logprobs(prompt, outcomes[("server", index)], alpha_per_test)
        else:
            result = _two_sample(
                prompt, outcomes[("server", index)], outcomes[("reference", index)], alpha_per_test
            )
        report.prompts.append(result)
    report.seconds = time.perf_counter() - start
    return report


def _collect(config: ServerAuditConfig, max_tokens: int) -> dict[tuple[str, int], list]:
    """Sends every request; returns (server or reference, prompt index) -> list of (text of the
    outcome, top log-probabilities of the first token or None)."""
    jobs = []
    servers = [("server", config.url, config.model)]
    if config.reference_url:
        servers.append(("reference", config.reference_url, config.reference_model or config.model))
    for index in range(len(config.prompts)):
        for sample in range(config.samples):
            for role, url, model in servers:
                # The reference gets other seeds: with the same seeds, an exact server and its
                # reference can return the very same completions, and the two samples would not
                # be independent (the test would lose power).
                offset = REFERENCE_SEED_OFFSET if role == "reference" else 0
                jobs.append((role, index, url, model, config.seed + offset + sample))
    # One request to each server first: a server that is down fails fast, not once per thread.
    for role, url, model in servers:
        offset = REFERENCE_SEED_OFFSET if role == "reference" else 0
        _request(config, url, model, config.prompts[0], config.seed + offset, max_tokens)
    limiter = RateLimiter(config.rate)
    progress = Progress(len(jobs), config.progress)
    outcomes: dict[tuple[str, int], list] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def run(job) -> None:
        role, index, url, model, seed = job
        if stop.is_set():
            return
        limiter.wait()
        outcome = _request(config, url, model, config.prompts[index], seed, max_tokens)
        with lock:
            outcomes.setdefault((role, index), []).append(outcome)
        progress.step()

    with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                stop.set()
                for pending in futures:
                    pending.cancel()
                if config.progress:
                    print(file=sys.stderr)
                raise future.exception()
    return outcomes


def _request(config, url, model, prompt, seed, max_tokens):
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": seed,
        "n": 1,
    }
    if config.reference_logprobs:
        payload["logprobs"] = config.top_logprobs
    payload.update(config.extra_body or {})
    choice = post_completion(
        completions_url(url), payload, timeout=config.timeout, api_key=config.api_key
    )
    text = choice.get("text")
    if not isinstance(text, str):
        raise RequestFailed(f"{url}: a choice without text: {str(choice)[:200]}")
    if not config.reference_logprobs:
        return text, None
    try:
        logprobs = choice["logprobs"]
        first_token = logprobs["tokens"][0]
        top = {str(token): float(value) for token, value in logprobs["top_logprobs"][0].items()}
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
        raise RequestFailed(
            f"{url}: no top log-probabilities in the answer (asked logprobs="
            f"{config.top_logprobs}): {str(choice)[:200]}"
        ) from error
    return first_token, top


def _two_sample(prompt: str, server: list, reference: list, alpha: float) -> PromptResult:
    server_counts = Counter(text for text, _ in server)
    reference_counts = Counter(text for text, _ in reference)
    keys = sorted(set(server_counts) | set(reference_counts))
    a = np.array([server_counts[key] for key in keys], dtype=np.float64)
    b = np.array([reference_counts[key] for key in keys], dtype=np.float64)
    if len(keys) < 2:  # one outcome on both sides: nothing to compare, and nothing differs
        return PromptResult(prompt, PASS, 1.0, 0, 1, len(server), len(reference), 0.0, 0.0)
    test = stats.two_sample(a, b)
    groups = stats.pool_cells(min(a.sum(), b.sum()) * (a + b) / (a + b).sum())
    pooled_a = np.bincount(groups, a) / a.sum()
    pooled_b = np.bincount(groups, b) / b.sum()
    tv = 0.5 * float(np.abs(pooled_a - pooled_b).sum())
    margin = stats.tv_margin(int(a.sum()), test.cells, 0.975) + stats.tv_margin(
        int(b.sum()), test.cells, 0.975
    )
    return PromptResult(
        prompt,
        REJECTED if test.p_value < alpha else PASS,
        test.p_value,
        test.df,
        test.cells,
        int(a.sum()),
        int(b.sum()),
        tv,
        min(1.0, tv + margin),
        stats.detectable_tv_two_sample(int(a.sum()), int(b.sum()), test.df, alpha, POWER),
        _top(keys, a, b),
    )


def _fit_logprobs(prompt: str, server: list, alpha: float) -> PromptResult:
    # The reference: the tokens listed in every answer, each with its mean probability over the
    # answers (they should agree; a server whose log-probabilities vary with the seed still gets
    # a fair reference). OpenAI's and vLLM's servers also list the sampled token when it is not
    # among the top ones: listed only in the answers that sampled it, its mean would understate
    # it, so such tokens go to the "other" cell with the rest.
    listed = set.intersection(*(set(top) for _, top in server)) if server else set()
    probabilities = {
        token: sum(math.exp(top[token]) for _, top in server) / len(server) for token in listed
    }
    keys = sorted(probabilities, key=probabilities.get, reverse=True)
    law = np.array([probabilities[key] for key in keys] + [0.0])
    law[-1] = max(0.0, 1.0 - law[:-1].sum())
    law /= law.sum()
    counts = Counter(token if token in probabilities else OTHER for token, _ in server)
    observed = np.array([counts[key] for key in keys] + [counts[OTHER]], dtype=np.float64)
    test = stats.goodness_of_fit(observed, law)
    tv = stats.total_variation(observed, law)
    n = int(observed.sum())
    return PromptResult(
        prompt,
        REJECTED if test.p_value < alpha else PASS,
        test.p_value,
        test.df,
        test.cells,
        n,
        0,
        tv,
        min(1.0, tv + stats.tv_margin(n, len(law))),
        stats.detectable_tv(n, test.df, alpha, POWER),
        _top(keys + [OTHER], observed, law * n),
    )


def _top(keys: list[str], a: np.ndarray, b: np.ndarray, count: int = 5):
    order = np.argsort(-(a + b))[:count]
    return [(keys[i], int(a[i]), float(b[i])) for i in order]


# The report.


def markdown(report: ServerAuditReport) -> str:
    lines = heading(
        f"Exactness audit of the server {report.url}",
        report.verdict,
        report.exit_code,
        report.message,
    )
    lines += [
        f"- model: {report.model}",
        f"- reference: {report.reference}",
        f"- {report.samples} completions per prompt and server, {report.max_tokens} token(s) "
        f"each, temperature 1, one seed per completion; {report.requests} requests",
        f"- false-failure rate {report.alpha:g} ({report.alpha_per_test:.3g} per prompt)",
        f"- run time: {report.seconds:.1f} s",
        "",
        "Per prompt: a G-test on the completions' outcomes (cells pooled to expect at least 5); "
        "TV is measured between the pooled outcome distributions, with an upper bound at 95% "
        "confidence; 'detectable TV' is the smallest such error detected with probability "
        f"{POWER} (noncentral chi-square, least noncentrality for that TV).",
        "",
        "| prompt | status | p-value | df | TV | TV <= | detectable TV | most frequent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in report.prompts:
        frequent = "; ".join(f"{key!r}: {a} vs {b:.0f}" for key, a, b in result.top_outcomes[:3])
        lines.append(
            f"| {result.prompt!r} | {result.status} | {result.p_value:.2g} | {result.df} | "
            f"{result.observed_tv:.3f} | {result.tv_upper_bound:.3f} | "
            f"{result.detectable_tv:.3f} | {frequent.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def write(report: ServerAuditReport, directory: Path | str, stem: str = "audit") -> list[Path]:
    """Writes STEM.md and STEM.json under `directory`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md_path, json_path = directory / f"{stem}.md", directory / f"{stem}.json"
    md_path.write_text(markdown(report))
    json_path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return [md_path, json_path]
