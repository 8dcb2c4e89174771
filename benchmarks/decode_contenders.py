"""The contenders of the decode benchmark (decode_speed.py): ours (specsample's `generate`:
target-only, model drafter with adaptive and fixed draft length, n-gram drafter) and
transformers' (`generate`: target-only, assisted generation, prompt lookup), how one run of each
is timed, and the round robin that interleaves them. Ours' adaptive contenders keep a cost
memory (engine.memory) that the warm-up fills, as the command line does per setting; the
"first run" contender runs the cost check from scratch every time (--no-cost-memory: none).
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from common import pooled
from specsample.drafters.model import (
    DEFAULT_CONFIDENCE,
    DEFAULT_GREEDY_SURVIVAL,
    DEFAULT_SURVIVAL,
    ModelDrafter,
)
from specsample.drafters.ngram import NgramDrafter
from specsample.engine import generate
from specsample.engine.length import AdaptiveDraftLength
from specsample.engine.memory import CostMemory
from specsample.engine.stats import DecodeStats
from specsample.warpers import SamplingConfig

ADAPTIVE_MAX_K = 20  # the command line's --max-k
PROMPT_LOOKUP_TOKENS = 10

# contender names
OURS_TO = "ours target-only"
ADAPTIVE_TAG = (
    f"adaptive (max {ADAPTIVE_MAX_K}, confidence {DEFAULT_CONFIDENCE}, survival {DEFAULT_SURVIVAL}"
    f", greedy {DEFAULT_GREEDY_SURVIVAL})"
)
HF_ASSISTED_INT8 = "transformers assisted (defaults, int8 draft)"
HF_TO = "transformers target-only"
HF_ASSISTED = "transformers assisted (defaults)"
HF_LOOKUP = f"transformers prompt lookup ({PROMPT_LOOKUP_TOKENS})"
FIRST_RUN = ", first run (no cost memory)"


@dataclass(frozen=True)
class Names:
    """The names of ours' drafting contenders, which depend on the command line: the draft tag
    (" (int8 draft)" with --draft-quantize int8), --k and --ngram-k."""

    adaptive: str
    fixed: str
    ngram: str

    @classmethod
    def for_run(cls, draft_tag: str, k: int, ngram_k: int) -> Names:
        return cls(
            adaptive=f"ours model drafter{draft_tag}, {ADAPTIVE_TAG}",
            fixed=f"ours model drafter{draft_tag}, fixed k={k}",
            ngram=f"ours n-gram, adaptive (max {ngram_k})",
        )


def hf_assisted_k(k: int) -> str:
    return f"transformers assisted (k={k})"


@dataclass
class Contender:
    name: str
    library: str  # "ours" or "transformers"
    family: str  # "target-only", "model" or "ngram"
    draft_k: int | None  # fixed draft length (theory prediction), None when adaptive / none
    run: Callable[[list[list[int]], float, int, int], RunResult]


@dataclass
class RunResult:
    seconds: float
    tokens: list[list[int]]
    stats: DecodeStats | None  # ours only
    target_forwards: int  # forward calls of the target model (prefill included)
    draft_forwards: int


@dataclass
class Cell:
    """Every repeat of one contender on one prompt (or batch) at one temperature."""

    runs: list[RunResult] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.runs[0].tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds

    @property
    def stats(self) -> DecodeStats | None:
        stats = [r.stats for r in self.runs if r.stats is not None]
        return pooled(stats) if stats else None

    @property
    def target_forwards(self) -> float:
        """Forward calls of the target per run (mean over repeats), the prefill included."""
        return statistics.mean(r.target_forwards for r in self.runs)

    @property
    def draft_forwards(self) -> float:
        return statistics.mean(r.draft_forwards for r in self.runs)


def ours_runner(target_lm, counters, drafter_factory, length_factory):
    """One run of ours: `generate` with a fresh drafter and draft-length policy."""

    def run(prompts, temperature, seed, n):
        drafter = drafter_factory()
        generator = torch.Generator().manual_seed(seed)
        for c in counters.values():
            c.calls = 0
        start = time.perf_counter()
        out = generate(
            target_lm,
            prompts,
            generator=generator,
            drafter=drafter,
            sampling=SamplingConfig(temperature=temperature),
            max_new_tokens=n,
            draft_length=length_factory(),
            eos_token_ids=(),
        )
        seconds = time.perf_counter() - start
        return RunResult(
            seconds,
            out.tokens,
            out.stats,
            counters["target"].calls,
            counters["draft"].calls,
        )

    return run


def hf_runner(
    target_model,
    draft_model,
    draft_config,
    pad_id,
    counters,
    extra: dict[str, Any],
    assist_k: int | None = None,
):
    """One run of transformers' `generate` with `extra` keyword arguments (left padding)."""

    def run(prompts, temperature, seed, n):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
        mask = torch.zeros(len(prompts), width, dtype=torch.int64)
        for b, p in enumerate(prompts):  # left padding
            ids[b, width - len(p) :] = torch.tensor(p)
            mask[b, width - len(p) :] = 1
        kwargs: dict[str, Any] = {
            "max_new_tokens": n,
            "eos_token_id": None,  # no EOS stop: exactly n new tokens, as ours
            "pad_token_id": pad_id,
            "do_sample": temperature > 0,
        }
        if temperature > 0:  # the same warping as ours: temperature only
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        # assisted generation reads its settings from the assistant's own generation config
        draft_model.generation_config = copy.deepcopy(draft_config)
        if assist_k is not None:
            draft_model.generation_config.num_assistant_tokens = assist_k
            draft_model.generation_config.num_assistant_tokens_schedule = "constant"
        for c in counters.values():
            c.calls = 0
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = target_model.generate(input_ids=ids, attention_mask=mask, **kwargs, **extra)
        seconds = time.perf_counter() - start
        tokens = out[:, width:].tolist()
        return RunResult(seconds, tokens, None, counters["target"].calls, counters["draft"].calls)

    return run


def make_contenders(
    pair, target_lm, draft_lm, args, counters, names: Names, int8_draft=None
) -> dict[str, Contender]:
    """Every contender of the run by name, in the tables' order; `counters` count each model's
    forward calls ("target", "draft")."""
    target_model, draft_model = pair.target, pair.draft
    pad_id = pair.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = 0
    draft_config = copy.deepcopy(draft_model.generation_config)

    def ours(drafter_factory, length_factory):
        return ours_runner(target_lm, counters, drafter_factory, length_factory)

    def hf(extra: dict[str, Any], assist_k: int | None = None):
        return hf_runner(target_model, draft_model, draft_config, pad_id, counters, extra, assist_k)

    # Ours' adaptive policies keep a cost memory each (a temporary folder), as the command line
    # does per setting; the warm-up run fills it. The first-run contender has none.
    folder = tempfile.mkdtemp(prefix="specsample-bench-costs-")

    def remembering(name: str, max_k: int):
        def make():
            policy = AdaptiveDraftLength(max_k)
            if not args.no_cost_memory:
                policy.recall(CostMemory({"contender": name}, folder))
            return policy

        return make

    adaptive = remembering(names.adaptive, ADAPTIVE_MAX_K)

    def model_drafter():  # fixed k: drafts all k tokens
        return ModelDrafter(draft_lm)

    def confident_drafter():  # adaptive: the command line's default draft-side stop
        return ModelDrafter(
            draft_lm,
            confidence=DEFAULT_CONFIDENCE,
            survival=DEFAULT_SURVIVAL,
            greedy_survival=DEFAULT_GREEDY_SURVIVAL,
        )

    out = [
        Contender(OURS_TO, "ours", "target-only", None, ours(lambda: None, lambda: 0)),
        Contender(names.adaptive, "ours", "model", None, ours(confident_drafter, adaptive)),
    ]
    if not args.no_cost_memory:
        cold = ours(confident_drafter, lambda: AdaptiveDraftLength(ADAPTIVE_MAX_K))
        out.append(Contender(names.adaptive + FIRST_RUN, "ours", "model", None, cold))
    if not args.no_fixed:
        out.append(
            Contender(names.fixed, "ours", "model", args.k, ours(model_drafter, lambda: args.k))
        )
    out += [
        Contender(
            names.ngram,
            "ours",
            "ngram",
            args.ngram_k,
            ours(NgramDrafter, remembering(names.ngram, args.ngram_k)),
        ),
        Contender(HF_TO, "transformers", "target-only", None, hf({})),
        Contender(HF_ASSISTED, "transformers", "model", None, hf({"assistant_model": draft_model})),
    ]
    if int8_draft is not None:  # the same cheaper draft for transformers, for a fair comparison
        int8_draft.generation_config = copy.deepcopy(draft_config)
        out.append(
            Contender(
                HF_ASSISTED_INT8, "transformers", "model", None, hf({"assistant_model": int8_draft})
            )
        )
    if args.hf_assist_k:
        out.append(
            Contender(
                hf_assisted_k(args.hf_assist_k),
                "transformers",
                "model",
                args.hf_assist_k,
                hf({"assistant_model": draft_model}, assist_k=args.hf_assist_k),
            )
        )
    out.append(
        Contender(
            HF_LOOKUP,
            "transformers",
            "ngram",
            None,
            hf({"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}),
        )
    )
    return {c.name: c for c in out}


# ---------------------------------------------------------------------------------- running


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def report(self, label: str, name: str, result: RunResult, temperature: float) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        n = sum(len(t) for t in result.tokens)
        extra = ""
        if result.stats is not None and result.stats.drafted:
            extra = f", alpha {result.stats.alpha:.2f}, {result.stats.tokens_per_pass:.2f} tok/pass"
        eta = elapsed / self.done * (self.total - self.done)
        print(
            f"[{self.done}/{self.total} {elapsed / 60:.1f} min, ~{eta / 60:.0f} min left] "
            f"{label} T={temperature:g} {name}: {n} tok in {result.seconds:.1f} s = "
            f"{n / result.seconds:.2f} tok/s{extra}",
            file=sys.stderr,
            flush=True,
        )


def round_robin(
    contenders: list[Contender],
    prompts: list[list[int]],
    temperature: float,
    seed: int,
    n: int,
    repeats: int,
    rotation: int,
    cells: dict[str, Cell],
    progress: Progress,
    label: str,
) -> None:
    """Each repeat runs every contender once, in an order rotated by one per repeat (and per
    prompt), so drift of the machine's speed affects all alike. All contenders of a repeat get
    the same seed."""
    for r in range(repeats):
        shift = (rotation + r) % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            result = c.run(prompts, temperature, seed + r, n)
            cells.setdefault(c.name, Cell()).runs.append(result)
            progress.report(label, c.name, result, temperature)
