"""The coupled rule against the p/q rules and sample-and-match, on exact toy model pairs.

Pairs: a ToyLM target (vocab 64, logits N(0, 3^2) per prefix: peaked, like a language model's)
and drafts equal to it plus N(0, s^2) noise on the logits, s = 0.5 (close), 1 (medium), 2 (far).
Temperatures 0.7 and 1.0.

Two tables per (pair, T):

1. Keep probability at one position, exact: along 64 target-only trajectories of 64 tokens, the
   mean over the visited contexts of
     token rule      1 - TV(p, q)  (min(1, p/q) keep test on sampled drafts)
     coupled         sum_i 1 / sum_j max(p_j / p_i, q_j / q_i)  (coupled_keep_probability)
     bound           (1 - TV) / (1 + TV)
     match           p(argmax q): greedy drafts kept when equal to the target's own sample
                     (sample-and-match: exact, since the draft does not depend on the sample)
2. Decoding, measured: 64 requests x 64 new tokens, one chain of k = 4 drafts per step (model
   drafter): acceptance alpha (kept drafts per keep test) and tokens per target pass, for the
   token and block rules and the coupled rule through the Engine, and sample-and-match
   simulated step by step with the same exact models (argmax drafts, the target samples with
   its own generator, keep while equal).

Run: .venv/bin/python benchmarks/coupled.py [--no-write]   (about a minute on 2 cores).
Writes benchmarks/coupled.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from specsample import Engine, SamplingConfig
from specsample.adapters.toy import ToyLM
from specsample.drafters.model import ModelDrafter
from specsample.rules.coupled import coupled_keep_bound, coupled_keep_probability
from specsample.warpers import logits_to_probs

VOCAB = 64
SCALE = 3.0
PAIRS = {"close (s=0.5)": 0.5, "medium (s=1)": 1.0, "far (s=2)": 2.0}
TEMPERATURES = (0.7, 1.0)
REQUESTS = 64
NEW_TOKENS = 64
K = 4
PROMPTS = [[(7 * i) % VOCAB, (3 * i + 1) % VOCAB, i % 5] for i in range(REQUESTS)]


def make_pair(noise: float) -> tuple[ToyLM, ToyLM]:
    target = ToyLM(VOCAB, seed=101, scale=SCALE)
    return target, ToyLM(VOCAB, seed=102, base=target, noise=noise)


def run_engine(target, drafter, rule: str, sampling: SamplingConfig, k: int):
    """(new tokens per request, the engine's DecodeStats)."""
    engine = Engine(target, drafter, rule=rule, draft_length=k, max_batch=REQUESTS)
    ids = [
        engine.add_request(p, sampling=sampling, seed=1000 + i, max_new_tokens=NEW_TOKENS)
        for i, p in enumerate(PROMPTS)
    ]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for output in engine.step():
            out[output.request_id].extend(output.tokens)
    return [out[i] for i in ids], engine.stats


def exact_keep(target: ToyLM, draft: ToyLM, sampling: SamplingConfig) -> dict[str, float]:
    """Mean exact keep probabilities over the contexts of target-only trajectories."""
    texts, _ = run_engine(target, None, "coupled", sampling, 0)
    sums = {"token rule (1-TV)": 0.0, "coupled": 0.0, "bound (1-TV)/(1+TV)": 0.0, "match": 0.0}
    count = 0
    for prompt, text in zip(PROMPTS, texts, strict=True):
        contexts = [prompt + text[:t] for t in range(len(text))]
        p = warped(target, contexts, sampling)
        q = warped(draft, contexts, sampling)
        tv = 0.5 * (p - q).abs().sum(-1)
        sums["token rule (1-TV)"] += float((1 - tv).sum())
        sums["coupled"] += float(coupled_keep_probability(p, q).sum())
        sums["bound (1-TV)/(1+TV)"] += float(coupled_keep_bound(p, q).sum())
        sums["match"] += float(p.gather(1, q.argmax(dim=1, keepdim=True)).sum())
        count += len(contexts)
    return {name: total / count for name, total in sums.items()}


def warped(model: ToyLM, contexts: list[list[int]], sampling: SamplingConfig) -> torch.Tensor:
    """float64 [len(contexts), vocab]: the model's warped next-token distributions."""
    logits = torch.stack([model.logits_for(c) for c in contexts]).double()
    return logits_to_probs(logits, sampling)


def simulate_match(target: ToyLM, draft: ToyLM, sampling: SamplingConfig) -> tuple[float, float]:
    """Sample-and-match with greedy drafts, k = K: (alpha, tokens per target pass)."""
    generator = torch.Generator().manual_seed(0)
    kept = tests = emitted = passes = 0
    for prompt in PROMPTS:
        text: list[int] = []
        while len(text) < NEW_TOKENS:
            limit = min(K, NEW_TOKENS - len(text) - 1)
            drafts: list[int] = []
            for _ in range(limit):
                drafts.append(int(draft.logits_for(prompt + text + drafts).argmax()))
            passes += 1
            step: list[int] = []
            for i in range(limit + 1):
                p = logits_to_probs(target.logits_for(prompt + text + step).double(), sampling)
                token = int(torch.multinomial(p, 1, generator=generator))
                step.append(token)
                if i == limit:
                    break  # the bonus token
                tests += 1
                if token != drafts[i]:
                    break
                kept += 1
            text.extend(step)
            emitted += len(step)
    return kept / tests, emitted / passes


def measure(noise: float, temperature: float) -> dict[str, object]:
    target, draft = make_pair(noise)
    sampling = SamplingConfig(temperature=temperature)
    row: dict[str, object] = {"exact": exact_keep(target, draft, sampling), "decode": {}}
    reference = None
    for rule in ("token", "block", "coupled"):
        texts, stats = run_engine(target, ModelDrafter(draft), rule, sampling, K)
        row["decode"][rule] = (stats.alpha, stats.tokens_per_pass)
        if rule == "coupled":
            reference = run_engine(target, None, "coupled", sampling, 0)[0]
            row["equal"] = sum(a == b for a, b in zip(texts, reference, strict=True))
    row["decode"]["match (greedy drafts)"] = simulate_match(target, draft, sampling)
    return row


def report(results: dict[tuple[str, float], dict]) -> str:
    lines = [
        "# Coupled rule vs p/q rules vs sample-and-match (toy model pairs)",
        "",
        f"Run {datetime.date.today().isoformat()}, `benchmarks/coupled.py`, CPU. Exact ToyLM "
        f"pairs: target vocab {VOCAB}, logits N(0, {SCALE:g}^2) per prefix; draft = target "
        "logits + N(0, s^2). No sampling noise in table 1 (exact probabilities averaged over the "
        f"contexts of {REQUESTS} target-only trajectories of {NEW_TOKENS} tokens); table 2 "
        f"decodes the same {REQUESTS} prompts, {NEW_TOKENS} new tokens each, one chain of "
        f"k = {K} drafts per step.",
        "",
        "## 1. Keep probability at one position (exact)",
        "",
        "| pair | T | token rule (1-TV) | coupled | bound (1-TV)/(1+TV) | match (greedy drafts) "
        "| coupled / token |",
        "|---|---|---|---|---|---|---|",
    ]
    for (pair, t), row in results.items():
        e = row["exact"]
        lines.append(
            f"| {pair} | {t} | {e['token rule (1-TV)']:.3f} | {e['coupled']:.3f} | "
            f"{e['bound (1-TV)/(1+TV)']:.3f} | {e['match']:.3f} | "
            f"{e['coupled'] / e['token rule (1-TV)']:.3f} |"
        )
    lines += [
        "",
        "## 2. Decoding, k = 4 (measured)",
        "",
        "alpha = kept drafts per keep test; tokens/pass = emitted tokens per target pass per row.",
        "`equal` = requests whose coupled speculative text equals coupled target-only text.",
        "",
        "| pair | T | token: alpha, tokens/pass | block | coupled | match (greedy drafts) "
        "| coupled equal |",
        "|---|---|---|---|---|---|---|",
    ]
    for (pair, t), row in results.items():
        d = row["decode"]
        cells = [f"{d[r][0]:.3f}, {d[r][1]:.2f}" for r in ("token", "block", "coupled")]
        cells.append(f"{d['match (greedy drafts)'][0]:.3f}, {d['match (greedy drafts)'][1]:.2f}")
        lines.append(f"| {pair} | {t} | " + " | ".join(cells) + f" | {row['equal']}/{REQUESTS} |")
    lines += ["", "## The issue's goals", "", *goals(results), "", "## Reading", "", READING, ""]
    return "\n".join(lines)


def goals(results: dict[tuple[str, float], dict]) -> list[str]:
    """Keep rate within 10 % of the token rule's at T = 0.7; above sample-and-match at T >= 0.7."""
    ratios = [
        row["exact"]["coupled"] / row["exact"]["token rule (1-TV)"]
        for (_, t), row in results.items()
        if t == 0.7
    ]
    above = all(row["exact"]["coupled"] > row["exact"]["match"] for row in results.values())
    return [
        f"- Coupled keep probability / token rule's at T = 0.7: {min(ratios):.3f} to "
        f"{max(ratios):.3f} (goal: >= 0.9): {'met' if min(ratios) >= 0.9 else 'NOT met'}.",
        f"- Coupled above sample-and-match with greedy drafts at T = 0.7 and 1.0 in every row: "
        f"{'yes' if above else 'NO'}.",
    ]


READING = """\
- The coupled keep probability is always between its bound (1-TV)/(1+TV) and the token rule's
  1-TV, as it must be. How close it comes to 1-TV depends on the pair: see table 1's last column.
- Sample-and-match with greedy drafts keeps p(argmax q): good when the target is nearly
  deterministic, poor as the temperature rises; the coupled rule uses the same "keep when equal"
  test but drafts the drafter's Gumbel-max pick under the target's noise, which follows p more
  closely than the argmax of q.
- The coupled rule's text equals target-only text for every request (the `equal` column): the
  speed-up comes without changing what a seed produces. The p/q rules keep more drafts but
  change the text with the drafter and the draft length.
- Real models: `benchmarks/coupled_models.py` (results: `coupled_models.md`) counts the
  seeded requests whose text on the default pair is the same with and without speculation
  (K-token and 1-token passes round differently, which could flip a near tie). Not measured:
  tokens/s (ToyLM's costs say nothing about real models)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads only add contention
    results = {}
    for pair, noise in PAIRS.items():
        for t in TEMPERATURES:
            results[(pair, t)] = measure(noise, t)
            print(pair, t, results[(pair, t)], file=sys.stderr)
    text = report(results)
    print(text)
    if not args.no_write:
        Path(__file__).with_name("coupled.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
