"""Acceptance per drafted token, same draft model, same contexts: specsample's keep test against
llama.cpp's sample-and-match, computed exactly (no sampling noise).

At a context where the target's warped distribution is p and the draft's q:

  ours (min(1, p/q), draft sampled from q)  keeps a drafted token with probability
                                            sum_x q(x) min(1, p(x)/q(x)) = sum_x min(p(x), q(x))
  sample-and-match (greedy draft, as in     drafts argmax q and keeps it when the target's own
  llama.cpp's speculative-simple and        sample equals it: probability p(argmax q)
  server)

The decoding benchmarks measure acceptance from a few dozen keep tests per cell (ours drafts
little where drafting does not pay); this one takes both expectations at every position of
texts the target itself wrote (target-only, seeded, per prompt and temperature), so the rules
are compared on the contexts decoding meets. It also reports them at the positions where the
draft is confident (max q >= the command line's draft confidence stop), where ours drafts.

Run: python benchmarks/acceptance_rules.py [--tokens 96] [--temperatures 0.7,1.0]
Writes benchmarks/acceptance_rules.md (--no-write: markdown on stdout only).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def distributions(lm, prompt: list[int], text: list[int]) -> torch.Tensor:
    """Logits [len(text), vocab] of the distribution of each text token given everything before
    it: the prompt pass's last row, then one pass over the text."""
    first = lm.prefill([prompt])[0]
    rest = lm.extend(torch.tensor([text[:-1]]), torch.tensor([len(text) - 1]))[0]
    return torch.cat([first[None], rest]).double()


def measure(args, temperatures: list[float]) -> tuple[list[dict], str]:
    """Per temperature and prompt: both rules' acceptance at every position of the target's
    own text; and the pair's description."""
    from common import load_prompts
    from specsample.adapters.loading import load_pair
    from specsample.drafters.model import DEFAULT_CONFIDENCE
    from specsample.engine import generate
    from specsample.engine.text import encode_prompt
    from specsample.warpers import SamplingConfig, warp_rows

    pair = load_pair(backend="llama.cpp", threads=args.threads, use_draft=True, n_ctx=4096)
    rows = []
    for temperature in temperatures:
        config = SamplingConfig(temperature=temperature)
        for p in load_prompts():
            clock = time.perf_counter()
            ids = encode_prompt(pair.tokenizer, p["prompt"])
            out = generate(
                pair.target,
                [ids],
                generator=torch.Generator().manual_seed(args.seed),
                sampling=config,
                max_new_tokens=args.tokens,
                draft_length=0,
            )
            text = out.tokens[0]
            p_logits = distributions(pair.target, ids, text)
            q_logits = distributions(pair.draft, ids, text)
            vocab = max(p_logits.shape[-1], q_logits.shape[-1])
            pad = torch.nn.functional.pad
            target = pad(warp_rows(p_logits, [config] * len(text)), (0, vocab - p_logits.shape[-1]))
            draft = pad(warp_rows(q_logits, [config] * len(text)), (0, vocab - q_logits.shape[-1]))
            ours = torch.minimum(target, draft).sum(dim=-1)  # [positions]
            match = target.gather(1, draft.argmax(dim=-1)[:, None])[:, 0]
            sure = draft.amax(dim=-1) >= DEFAULT_CONFIDENCE
            rows.append(
                {
                    "T": temperature,
                    "prompt": p["name"],
                    "kind": p["kind"],
                    "ours": ours.tolist(),
                    "match": match.tolist(),
                    "sure": sure.tolist(),
                }
            )
            seconds = time.perf_counter() - clock
            print(
                f"T={temperature} {p['name']}: {len(text)} positions, ours {ours.mean():.3f}, "
                f"match {match.mean():.3f} ({seconds:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    return rows, pair.description


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "acceptance_rules.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    if any(t <= 0 for t in temperatures):
        raise SystemExit("--temperatures: expected values > 0 (at T = 0 both rules are greedy)")

    from common import cpu_info, load_average
    from specsample.drafters.model import DEFAULT_CONFIDENCE

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    rows, description = measure(args, temperatures)
    machine = cpu_info()
    lines = [
        "# Acceptance per drafted token: ours vs sample-and-match (default pair, llama.cpp)",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC with `benchmarks/acceptance_rules.py --tokens "
        f"{args.tokens} --temperatures {args.temperatures}`; {description}; CPU: "
        f"{machine['cpu']}, {machine['logical_cores']} logical cores; load average at start "
        f"{load_start}, at end {load_average()}.",
        "",
        "Every position of a text the target wrote (target-only, seed "
        f"{args.seed}, {args.tokens} new tokens per prompt of benchmarks/prompts.json, chat "
        "template), p and q warped at T (plain temperature). **ours**: the probability that a "
        "draft sampled from q is kept by min(1, p/q), sum_x min(p(x), q(x)) (the token and "
        "block rules keep each drafted token alike). **match**: llama.cpp's sample-and-match "
        "(speculative-simple, server): a greedy draft argmax q kept when the target's sample "
        "equals it, p(argmax q). Both are exact expectations at each position (no sampling "
        "noise); the tables give their means. **sure**: the positions where max q >= "
        f"{DEFAULT_CONFIDENCE} (the command line's draft confidence stop: where ours drafts).",
        "",
    ]
    for temperature in temperatures:
        picked = [r for r in rows if r["T"] == temperature]
        lines += [
            f"## T = {temperature:g}",
            "",
            "| prompt | kind | positions | ours | match | ours / match | sure positions | "
            "ours (sure) | match (sure) | ours / match (sure) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        pooled = {"ours": [], "match": [], "ours_sure": [], "match_sure": []}
        for r in picked:
            ours_sure = [o for o, s in zip(r["ours"], r["sure"], strict=True) if s]
            match_sure = [m for m, s in zip(r["match"], r["sure"], strict=True) if s]
            pooled["ours"] += r["ours"]
            pooled["match"] += r["match"]
            pooled["ours_sure"] += ours_sure
            pooled["match_sure"] += match_sure
            lines.append(_row(r["prompt"], r["kind"], r["ours"], r["match"], ours_sure, match_sure))
        lines.append(
            _row(
                "**pooled**",
                "",
                pooled["ours"],
                pooled["match"],
                pooled["ours_sure"],
                pooled["match_sure"],
            )
        )
        lines.append("")
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        args.out.write_text(markdown)
    return 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _row(name, kind, ours, match, ours_sure, match_sure) -> str:
    o, m = _mean(ours), _mean(match)
    os_, ms = _mean(ours_sure), _mean(match_sure)
    return (
        f"| {name} | {kind} | {len(ours)} | {o:.3f} | {m:.3f} | {o / m:.2f} | {len(ours_sure)} | "
        f"{os_:.3f} | {ms:.3f} | {os_ / ms if ms else float('nan'):.2f} |"
    )


if __name__ == "__main__":
    sys.exit(main())
