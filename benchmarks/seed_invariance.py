"""How often a seeded request's text depends on its batch, on real models.

With a fixed draft length every draw of a request comes from its own generator, so on models whose
logits do not depend on the batch (ToyLM) a seed gives the same tokens alone and in any batch
(tests/engine/test_engine.py). Real kernels may round differently with the batch shape; this
script measures how often that changes the text: each request is run alone, then all together in
one batch, and the token sequences are compared (and where they part).

    .venv/bin/python benchmarks/seed_invariance.py --backend llama.cpp --max-new-tokens 32
Writes benchmarks/seed_invariance.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import cpu_info, load_average, load_prompts
from specsample import Engine, SamplingConfig
from specsample.adapters.loading import load_pair
from specsample.drafters.model import ModelDrafter
from specsample.engine.text import encode_prompt, eos_token_ids

HERE = Path(__file__).parent


def run(engine_factory, prompts, seeds, sampling, max_new_tokens, eos) -> list[list[int]]:
    engine = engine_factory()
    ids = [
        engine.add_request(
            p, sampling=sampling, max_new_tokens=max_new_tokens, seed=s, eos_token_ids=eos
        )
        for p, s in zip(prompts, seeds, strict=True)
    ]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.tokens)
    return [tokens[i] for i in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--out", type=Path, default=HERE / "seed_invariance.md")
    args = parser.parse_args()
    started = time.perf_counter()
    pair = load_pair(backend=args.backend, draft_quantize="none", max_batch=16)
    eos = eos_token_ids(pair.tokenizer, pair.target_config)
    texts = [p["prompt"] for p in load_prompts()]
    prompts, seeds = [], []
    for text in texts:
        for s in range(args.seeds):
            prompts.append(encode_prompt(pair.tokenizer, text))
            seeds.append(1000 + s)
    sampling = SamplingConfig(temperature=args.temperature)

    def factory() -> Engine:
        return Engine(pair.target, ModelDrafter(pair.draft), draft_length=args.k, max_batch=16)

    alone = [
        run(factory, [p], [s], sampling, args.max_new_tokens, eos)[0]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    batched = run(factory, prompts, seeds, sampling, args.max_new_tokens, eos)
    rows = []
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        parted = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if parted is None and len(a) != len(b):
            parted = min(len(a), len(b))
        rows.append({"request": i, "equal": a == b, "parted_at": parted, "tokens": len(a)})
    equal = sum(r["equal"] for r in rows)
    lines = [
        "# Seeded requests alone vs batched on real models",
        "",
        f"Machine: {json.dumps(cpu_info())}, load {load_average()}. "
        f"Backend {pair.backend}, {pair.description}; "
        f"k = {args.k} fixed, T = {args.temperature}, {args.max_new_tokens} new tokens, "
        f"{len(rows)} requests ({len(texts)} prompts x {args.seeds} seeds), batch of "
        f"{len(rows)} vs alone. Wall time {time.perf_counter() - started:.0f} s.",
        "",
        f"**Equal text: {equal} of {len(rows)}.**",
        "",
        "| request | equal | first differing token | tokens |",
        "|---|---|---|---|",
    ]
    for r in rows:
        parted = "-" if r["parted_at"] is None else str(r["parted_at"])
        lines.append(f"| {r['request']} | {r['equal']} | {parted} | {r['tokens']} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
