"""Where to stop a draft: the model drafter's stop rules replayed on the target's own texts.

The decoding benchmarks time whole runs, so a stop rule's effect there is mixed with the
draft-length policy's timing decisions and the machine's noise. This one isolates the rule.
For each prompt of benchmarks/prompts.json it records a text the target wrote (target-only,
seeded, T = 0 and T = 0.7) and, at every position of it, the draft's top probability (what the
confidence and survival stops read) and the probability that a draft there is kept. It then
replays decoding with each stop rule over those positions and prices every step with the
machine's measured pass costs (a k-draft step: k draft passes and a (k + 1)-token target pass):

* T = 0 (greedy): a draft is kept when the draft's argmax equals the target's token. The replay
  is exact for the passes and the kept drafts; drafts past the first mismatch (which decide
  nothing) are counted with the stop decisions of the target's text, not the draft's own
  continuation, so the drafted count there is an estimate.
* T = 0.7: a draft at a position is kept with probability sum_x min(p(x), q(x)) (the keep
  rate of min(1, p/q) for a token drawn from q), independently of the other positions, and a
  step continues along the target's text; 400 replays per prompt, seeded. This is a model of
  decoding, not decoding: the sampled tokens of a real run differ from the text.

Rules: (max drafts, confidence stop, survival stop (at T = 0 its greedy value), whether the
token below the confidence stop is still drafted). "ours": the command line's model drafter
(the confidence and survival stops cut before a position where the draft is unsure).
"assisted": transformers' assisted generation (20 drafts; its confidence check stops after
drafting a token whose probability is below 0.4, so that token is still drafted). The
draft-length policy's pauses and probes are not replayed (every step drafts under the rule
alone).

Run: python benchmarks/draft_stops.py [--tokens 64]
Writes benchmarks/draft_stops.md (--no-write: markdown on stdout only).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).parent
REPLAYS = 400  # per prompt at T > 0


@dataclass(frozen=True)
class Rule:
    name: str
    max_k: int
    confidence: float
    survival: float
    greedy_survival: float  # the survival stop at T = 0
    drafts_the_unsure_token: bool

    def survival_at(self, temperature: float) -> float:
        return self.greedy_survival if temperature == 0 else self.survival


RULES = [
    Rule(
        "ours, command line (20, confidence 0.4, survival 0.25, greedy 0.1)",
        20,
        0.4,
        0.25,
        0.1,
        False,
    ),
    Rule("ours before (16, confidence 0.4, survival 0.25)", 16, 0.4, 0.25, 0.25, False),
    Rule("16, confidence 0.4, survival 0.1", 16, 0.4, 0.1, 0.1, False),
    Rule("16, confidence 0.4, no survival stop", 16, 0.4, 0.0, 0.0, False),
    Rule("20, confidence 0.4, survival 0.25", 20, 0.4, 0.25, 0.25, False),
    Rule("20, confidence 0.4, survival 0.1", 20, 0.4, 0.1, 0.1, False),
    Rule("20, confidence 0.4, no survival stop", 20, 0.4, 0.0, 0.0, False),
    Rule("16, confidence 0.3, survival 0.1", 16, 0.3, 0.1, 0.1, False),
    Rule("16, confidence 0.5, unsure token drafted", 16, 0.5, 0.0, 0.0, True),
    Rule("16, confidence 0.4, survival 0.25, unsure token drafted", 16, 0.4, 0.25, 0.25, True),
    Rule("assisted (20, confidence 0.4, unsure token drafted)", 20, 0.4, 0.0, 0.0, True),
]
BINS = 10  # the calibration table's bins of the draft's top probability


def planned(top: list[float], start: int, end: int, rule: Rule, floor: float) -> int:
    """The drafts the rule drafts from position `start` (at most to `end`), reading the draft's
    top probability at each position; floor: its survival stop."""
    survival, k = 1.0, 0
    while k < rule.max_k and start + k < end:
        t = top[start + k]
        survival *= t
        unsure = t < rule.confidence or (floor > 0 and survival < floor)
        if unsure and not rule.drafts_the_unsure_token:
            break
        k += 1
        if unsure:
            break
    return k


def replay(cell: dict, rule: Rule, cost, draft_cost: float, rng: random.Random | None):
    """One decoding of the cell's positions: (target passes, drafted, seconds). rng None: a
    draft is kept when cell["keep"] says 1 (greedy); else with that probability."""
    top, keep = cell["top"], cell["keep"]
    n = len(top)
    floor = rule.survival_at(cell["T"])
    at = passes = drafted = 0
    seconds = 0.0
    while at < n:
        k = planned(top, at, n - 1, rule, floor)  # the last token comes from the target
        kept = 0
        for i in range(k):
            if (keep[at + i] >= 0.5) if rng is None else (rng.random() < keep[at + i]):
                kept += 1
            else:
                break
        passes += 1
        drafted += k
        seconds += k * draft_cost + cost(k + 1)
        at += kept + 1
    return passes, drafted, seconds


def pass_cost(costs: dict[int, float]):
    lengths = sorted(costs)

    def cost(n: int) -> float:
        if n in costs:
            return costs[n]
        below = max(x for x in lengths if x <= n)
        above = [x for x in lengths if x >= n]
        if not above:  # past the longest measured: along the last chord
            a, b = lengths[-2], lengths[-1]
            return costs[b] + (n - b) * (costs[b] - costs[a]) / (b - a)
        return costs[below] + (costs[above[0]] - costs[below]) * (n - below) / (above[0] - below)

    return cost


def measure(args) -> tuple[list[dict], dict[int, float], float]:
    from common import load_prompts, probe_context, probe_costs
    from specsample.adapters.default_pair import load_default_pair_with_stats
    from specsample.adapters.hf import HFCausalLM
    from specsample.adapters.quantize import quantize_draft
    from specsample.engine import generate
    from specsample.engine.text import encode_prompt
    from specsample.warpers import SamplingConfig, warp_rows

    pair = load_default_pair_with_stats(torch.bfloat16)
    pair.target.to(torch.float32)  # as benchmarks/decode_speed.py: float32, int8 draft
    pair.draft.to(torch.float32)
    target = HFCausalLM(pair.target)
    draft = HFCausalLM(quantize_draft(copy.deepcopy(pair.draft), "int8"))
    prompts = load_prompts()
    context = probe_context(pair.tokenizer, prompts)
    lengths = [1, 2, 3, 5, 9, 13, 17, 21]
    costs = probe_costs(target, context, lengths, args.probe_repeats)
    draft_cost = probe_costs(draft, context, [1], args.probe_repeats)[1]

    def distributions(lm, prompt, text) -> torch.Tensor:
        first = lm.prefill([prompt])[0]
        rest = lm.extend(torch.tensor([text[:-1]]), torch.tensor([len(text) - 1]))[0]
        return torch.cat([first[None], rest]).double()

    cells = []
    for temperature in (0.0, 0.7):
        config = SamplingConfig(temperature=temperature)
        for p in prompts:
            clock = time.perf_counter()
            ids = encode_prompt(pair.tokenizer, p["prompt"])
            out = generate(
                target,
                [ids],
                generator=torch.Generator().manual_seed(args.seed),
                sampling=config,
                max_new_tokens=args.tokens,
                draft_length=0,
                eos_token_ids=(),
            )
            text = out.tokens[0]
            p_logits, q_logits = distributions(target, ids, text), distributions(draft, ids, text)
            vocab = min(p_logits.shape[-1], q_logits.shape[-1])
            p_logits, q_logits = p_logits[:, :vocab], q_logits[:, :vocab]
            if temperature == 0:
                top = torch.softmax(q_logits, dim=-1).amax(dim=-1)  # what the stops read
                keep = (q_logits.argmax(dim=-1) == torch.tensor(text)).double()
            else:
                target_p = warp_rows(p_logits, [config] * len(text))
                draft_q = warp_rows(q_logits, [config] * len(text))
                top = draft_q.amax(dim=-1)
                keep = torch.minimum(target_p, draft_q).sum(dim=-1)
            cells.append(
                {"T": temperature, "prompt": p["name"], "top": top.tolist(), "keep": keep.tolist()}
            )
            print(
                f"T={temperature} {p['name']}: keep {keep.mean():.3f} "
                f"({time.perf_counter() - clock:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    return cells, costs, draft_cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--probe-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "draft_stops.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from common import cpu_info, load_average

    torch.set_grad_enabled(False)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    cells, costs, draft_cost = measure(args)
    machine = cpu_info()
    cost = pass_cost(costs)
    curve = ", ".join(f"{n}: {costs[n] * 1e3:.0f}" for n in sorted(costs))
    lines = [
        "# Draft stop rules replayed on the target's own texts (default pair, transformers)",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC with `benchmarks/draft_stops.py --tokens "
        f"{args.tokens}`; float32 target, int8 draft (as benchmarks/decode_speed.py); CPU: "
        f"{machine['cpu']}, {machine['logical_cores']} logical cores; load average at start "
        f"{load_start}, at end {load_average()}.",
        "",
        f"Measured costs (median ms): target pass by tokens {{{curve}}}; draft pass "
        f"{draft_cost * 1e3:.0f}. Each cell: target passes / predicted speedup over "
        f"target-only ({args.tokens} one-token passes); T = 0 exact, T = 0.7 the mean of "
        f"{REPLAYS} replays (see the module docstring for what is modelled).",
        "",
    ]
    for temperature in (0.0, 0.7):
        picked = [c for c in cells if c["T"] == temperature]
        target_only = len(picked[0]["top"]) * costs[1]
        lines += [
            f"## T = {temperature:g}",
            "",
            "| rule | " + " | ".join(c["prompt"] for c in picked) + " | mean speedup |",
            "|---|" + "---:|" * (len(picked) + 1),
        ]
        for rule in RULES:
            parts, speedups = [], []
            for c in picked:
                rng = None if temperature == 0 else random.Random(args.seed)
                runs = [
                    replay(c, rule, cost, draft_cost, rng)
                    for _ in range(1 if rng is None else REPLAYS)
                ]
                passes = statistics.mean(r[0] for r in runs)
                speedup = target_only / statistics.mean(r[2] for r in runs)
                speedups.append(speedup)
                parts.append(f"{passes:.1f} / {speedup:.2f}x")
            lines.append(
                f"| {rule.name} | " + " | ".join(parts) + f" | {statistics.mean(speedups):.3f} |"
            )
        lines.append("")
    lines += [
        "## The draft's top probability against the keep rate",
        "",
        "All positions of the texts above, by the draft's top probability (T = 0: the plain "
        "softmax's, which the stops read; the keep rate is how often the draft's argmax is the "
        "target's token. T = 0.7: the warped one; the keep rate sum_x min(p, q)).",
        "",
        "| top probability | T = 0 positions | T = 0 keep rate | T = 0.7 positions | "
        "T = 0.7 keep rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for b in range(BINS):
        row = [f"{b / BINS:.1f}-{(b + 1) / BINS:.1f}"]
        for temperature in (0.0, 0.7):
            kept = [
                k
                for c in cells
                if c["T"] == temperature
                for t, k in zip(c["top"], c["keep"], strict=True)
                if min(int(t * BINS), BINS - 1) == b
            ]
            row += [str(len(kept)), f"{statistics.mean(kept):.2f}" if kept else "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        args.out.write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
