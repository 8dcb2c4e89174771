"""The coupled rule against the p/q rules and sample-and-match on the default pair (llama.cpp):
keep rate, tokens per target pass and tokens/s.

Contenders, each through specsample.Engine with the draft model drafting a fixed chain of
k = --k tokens (draft_length=k) per step, every request sampled at temperature T:

  token     the token rule: keep drafted x iff u q(x) < p(x), drafts sampled from q
  block     the block rule (block verification) on the same kind of drafts
  coupled   the coupled (drafter-invariant) rule: Gumbel-max drafts and target picks with the
            same (seed, position) noise
  match     sample-and-match with greedy drafts (llama.cpp's speculative sampling): the draft is
            argmax q, kept while it equals the target's own sample, else the target's sample is
            emitted and the step ends
  target-only  no drafter (the tokens/s the ratios divide by)

Sample-and-match is run as the token rule with a drafter whose q is one-hot on argmax q
(`GreedyModelDrafter`: a ModelDrafter that drafts with a greedy SamplingConfig whatever the
request's sampling, so it returns point-mass drafts and the engine verifies them with q = 1,
while the target's distribution p stays warped at T). The two are the same process, law and
keep probability: with q one-hot on x = argmax q, the token rule keeps x iff u < p(x) (u
uniform), probability p(x), and at a rejection draws from the residual max(0, p - q) normalised,
which is p with x removed, renormalised: p(y) / (1 - p(x)) for y != x. Sample-and-match draws
y ~ p and keeps x iff y = x, probability p(x); given a mismatch, y has law p(y) / (1 - p(x)) for
y != x. Both emit one bonus token from p after k kept drafts. Only the uniforms that decide the
outcome differ, not the law, so the keep rate and tokens per pass measured here are those of
sample-and-match. (The greedy drafter draws its own, unused, uniforms from a private generator:
the request's generator serves the target alone.)

Per (prompt, seed) every contender decodes the same request in turn (the order rotates from
one prompt/seed to the next), at each T. No EOS stop: every request decodes --tokens tokens.
Reported per (T, rule), pooled over the requests:
  keep / drafted    kept drafts per drafted token (DecodeStats.accepted / drafted)
  keep / test       kept drafts per keep test (alpha: accepted / keep_tests; a step ends at its
                    first rejection, so later drafts of the chain are never tested)
  tokens / pass     emitted tokens per target pass
  tokens/s          median over the requests of the decode speed after the first step (the
                    first step holds both models' prompt passes: the draft model prefills
                    lazily, at its first draft), and that median over target-only's in the
                    same run.

Run: .venv/bin/python benchmarks/coupled_speed.py [--prompts 6] [--seeds 1] [--tokens 48]
     [--temperatures 0.7 1.0] [--k 4] [--threads 2] [--no-write]
Writes benchmarks/coupled_speed.md (not with --no-write). Tokens/s measured while the load
average at start was above 1.5 (other work on the machine) are not speed claims; keep rates and
tokens per pass do not depend on load.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import cpu_info, fmt, load_average, load_prompts, ratio
from specsample import Engine, SamplingConfig
from specsample.adapters.loading import load_pair
from specsample.drafters.base import Draft
from specsample.drafters.model import ModelDrafter
from specsample.engine.stats import DecodeStats
from specsample.engine.text import encode_prompt
from specsample.warpers import RowSampling

CONTENDERS = ("target-only", "token", "block", "coupled", "match")
GREEDY = SamplingConfig(temperature=0.0)
HERE = Path(__file__).parent
LOADED = 1.5  # load average above which tokens/s are not speed claims


class GreedyModelDrafter(ModelDrafter):
    """A ModelDrafter whose drafts are argmax q (q one-hot), whatever the request's sampling:
    with the token rule, sample-and-match (see the module docstring)."""

    def __init__(self, model):
        super().__init__(model)
        self._scratch = torch.Generator().manual_seed(0)  # greedy rows still draw a uniform

    def propose(
        self, sequences: list[list[int]], max_lengths: torch.Tensor, sampling: RowSampling
    ) -> Draft:
        greedy = RowSampling([GREEDY] * len(sampling), [self._scratch] * len(sampling))
        draft = super().propose(sequences, max_lengths, greedy)
        assert draft.probs is None  # point masses: the token rule tests u < p(x)
        return draft


@dataclass
class Tally:
    stats: list[DecodeStats] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)  # tokens/s per request, after step 1


def decode_one(pair, contender: str, prompt: list[int], seed: int, temperature: float, args):
    """One request through a fresh Engine: (its DecodeStats, decode tokens/s after step 1)."""
    if contender == "target-only":
        engine = Engine(pair.target, None, rule="token", draft_length=0, max_batch=1)
    else:
        drafter_type = GreedyModelDrafter if contender == "match" else ModelDrafter
        rule = "token" if contender == "match" else contender
        engine = Engine(
            pair.target, drafter_type(pair.draft), rule=rule, draft_length=args.k, max_batch=1
        )
    engine.add_request(
        prompt,
        sampling=SamplingConfig(temperature=temperature),
        seed=seed,
        max_new_tokens=args.tokens,
    )
    first = 0
    clock = None
    while engine.has_unfinished():
        outputs = engine.step()
        if clock is None:  # after the first step: both prompt passes are behind
            first = sum(len(o.tokens) for o in outputs)
            clock = time.perf_counter()
    seconds = time.perf_counter() - clock
    later = engine.stats.new_tokens - first
    return engine.stats, (later / seconds if seconds > 0 and later else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6, help="first N of prompts.json")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    parser.add_argument("--k", type=int, default=4, help="fixed draft length")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    command = " ".join(["benchmarks/coupled_speed.py", *(sys.argv[1:] if argv is None else argv)])
    load_at_start = load_average()
    started = datetime.datetime.now().isoformat(timespec="minutes")
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    pair = load_pair(backend="llama.cpp", threads=args.threads, max_batch=1)
    print(f"loaded {pair.description} in {pair.seconds:.1f} s", file=sys.stderr)
    named = load_prompts()[: args.prompts]
    encoded = [encode_prompt(pair.tokenizer, p["prompt"]) for p in named]
    tallies = {(t, c): Tally() for t in args.temperatures for c in CONTENDERS}
    turn = 0
    for temperature in args.temperatures:
        for p, prompt in enumerate(encoded):
            for seed in range(args.seeds):
                order = CONTENDERS[turn % len(CONTENDERS) :] + CONTENDERS[: turn % len(CONTENDERS)]
                turn += 1
                for contender in order:
                    stats, speed = decode_one(pair, contender, prompt, seed, temperature, args)
                    tally = tallies[(temperature, contender)]
                    tally.stats.append(stats)
                    tally.speeds.append(speed)
                    print(
                        f"T={temperature} {named[p]['name']} seed {seed} {contender}: "
                        f"alpha {stats.alpha:.3f}, {stats.tokens_per_pass:.2f} tok/pass, "
                        f"{speed:.1f} tok/s",
                        file=sys.stderr,
                    )
    text = report(args, command, started, load_at_start, pair, named, tallies)
    print(text)
    if not args.no_write:
        (HERE / "coupled_speed.md").write_text(text)
    return 0


def report(args, command, started, load_at_start, pair, named, tallies) -> str:
    cpu = cpu_info()
    loaded = _load1(load_at_start) > LOADED
    lines = [
        "# Coupled rule vs token, block and sample-and-match: default pair on llama.cpp",
        "",
        f"Run {started}: `{command}`.",
        f"{pair.description}; fixed draft length k = {args.k} (draft model, chain); "
        f"{len(named)} prompts x {args.seeds} seed(s) x {args.tokens} new tokens (no EOS stop) "
        "per temperature; contenders interleaved per prompt/seed.",
        f"CPU: {cpu['cpu']}, {cpu['logical_cores']} logical cores, {args.threads} threads. "
        f"Load average at start: {load_at_start}; at end: {load_average()}.",
        "",
    ]
    if loaded:
        lines += [
            f"**The load average at start was above {LOADED}: the machine was shared, so the "
            "tokens/s below are not speed claims** (keep rates and tokens per pass do not "
            "depend on load).",
            "",
        ]
    lines += [
        "match = sample-and-match with greedy drafts (llama.cpp's rule), run as the token rule",
        "with one-hot drafts on argmax q: the same law and keep probability p(argmax q) (see",
        "the script's docstring). keep / drafted: kept drafts per drafted token; keep / test:",
        "kept drafts per keep test (alpha); tokens/s: median over requests of the speed after",
        "the first step (prompt passes), and its ratio to target-only's median in the same run.",
        "",
        "| T | rule | drafted | keep / drafted | keep / test | tokens / pass | tokens/s "
        "| vs target-only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for temperature in args.temperatures:
        base = statistics.median(tallies[(temperature, "target-only")].speeds)
        keep = {}
        for contender in CONTENDERS:
            tally = tallies[(temperature, contender)]
            pooled = DecodeStats.pooled(tally.stats)
            speed = statistics.median(tally.speeds)
            drafted = ratio(pooled.accepted, pooled.drafted)
            keep[contender] = drafted
            lines.append(
                f"| {temperature} | {contender} | {pooled.drafted} | {fmt(drafted, 3)} | "
                f"{fmt(pooled.alpha if pooled.keep_tests else None, 3)} | "
                f"{pooled.tokens_per_pass:.2f} | {speed:.1f} | {fmt(ratio(speed, base))} |"
            )
        to_token = ratio(keep["coupled"], keep["token"])
        to_match = ratio(keep["coupled"], keep["match"])
        within = to_token is not None and to_token >= 0.9
        above = to_match is not None and to_match > 1
        goals = []
        if temperature <= 0.7 + 1e-9:
            goals.append(f"within 10% of the token rule: {'yes' if within else 'no'}")
        if temperature >= 0.7 - 1e-9:
            goals.append(f"above sample-and-match: {'yes' if above else 'no'}")
        verdicts.append(
            f"- T = {temperature}: keep rate (per drafted token) coupled / token = "
            f"{fmt(to_token, 3)}, coupled / match = {fmt(to_match, 3)}"
            + (f" ({'; '.join(goals)})" if goals else "")
            + "."
        )
    lines += ["", *verdicts, ""]
    lines += [
        "Goals: the coupled rule's keep rate within 10% of the token rule's at T = 0.7, and "
        "above sample-and-match's at T >= 0.7. Each cell pools "
        f"{len(named) * args.seeds} request(s) of {args.tokens} tokens (the drafted column): "
        "keep rates from a few hundred drafts carry a few points of sampling noise, and the "
        "requests' drafts are correlated within a text.",
        "",
    ]
    return "\n".join(lines)


def _load1(text: str) -> float:
    try:
        return float(text.split(",")[0])
    except ValueError:
        return float("inf")


if __name__ == "__main__":
    raise SystemExit(main())
