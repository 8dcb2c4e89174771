"""`generate`: a one-shot batch through the Engine (add every prompt, step until done)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specsample.adapters.protocol import LanguageModel
from specsample.drafters.base import Drafter
from specsample.engine.engine import Engine
from specsample.engine.length import AdaptiveDraftLength, FixedDraftLength
from specsample.engine.stats import DecodeStats
from specsample.warpers import SamplingConfig

# on_tokens(row, tokens, kinds): called as each row's tokens are committed, for streaming.
TokenCallback = Callable[[int, list[int], list[str]], None]
# stop_when(row, new_tokens): True ends the row (stop strings); checked after each commit.
StopCondition = Callable[[int, list[int]], bool]


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each row (EOS included when it ended the row)
    finished_by_eos: list[bool]
    stats: DecodeStats
    finish_reasons: list[str] | None = None
    request_stats: list[DecodeStats] | None = None


def generate(
    target: LanguageModel,
    prompts: Sequence[Sequence[int]],
    *,
    generator: torch.Generator,
    drafter: Drafter | None = None,
    sampling: SamplingConfig | Sequence[SamplingConfig] | None = None,
    max_new_tokens: int = 128,
    draft_length: int | str | FixedDraftLength | AdaptiveDraftLength = 4,
    eos_token_ids: Sequence[int] = (),
    on_tokens: TokenCallback | None = None,
    stop_when: StopCondition | None = None,
    rule: str = "token",
    seeds: Sequence[int] | None = None,
) -> Generation:
    """Samples up to max_new_tokens tokens after each prompt, exactly as the target would
    (speculatively when a drafter is given), all prompts in one batch.

    generator: seeds the requests (one seed per prompt is drawn from it) unless `seeds` is given.
    sampling: one SamplingConfig for every prompt, or one per prompt.
    rule: a registered rule name ("token", "block", "auto"; see specsample.rules.registry).
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    configs = _per_prompt_sampling(sampling, len(prompts))
    if seeds is None:
        drawn = torch.randint(
            0, 2**62, (len(prompts),), generator=generator, device=generator.device
        )
        seeds = drawn.tolist()
    elif len(seeds) != len(prompts):
        raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
    engine = Engine(
        target,
        drafter,
        rule=rule,
        draft_length=draft_length,
        max_batch=len(prompts),
        logprobs=False,  # a Generation holds no log-probabilities: none are computed
    )
    ids = []
    for b, prompt in enumerate(prompts):
        stop = None
        if stop_when is not None:
            stop = _row_stop(stop_when, b)
        try:
            request_id = engine.add_request(
                prompt,
                sampling=configs[b],
                max_new_tokens=max_new_tokens,
                seed=int(seeds[b]),
                eos_token_ids=eos_token_ids,
                stop=stop,
            )
        except (TypeError, ValueError) as error:  # name the prompt as the caller knows it
            message = str(error).replace("prompt_tokens", f"prompts[{b}]", 1)
            raise type(error)(message) from None
        ids.append(request_id)
    row_of = {request_id: b for b, request_id in enumerate(ids)}
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons: list[str] = [""] * len(prompts)
    request_stats: list[DecodeStats] = [DecodeStats() for _ in prompts]
    while engine.has_unfinished():
        for output in engine.step():
            b = row_of[output.request_id]
            tokens[b].extend(output.tokens)
            if on_tokens is not None and output.tokens:
                on_tokens(b, output.tokens, output.kinds)
            if output.finished:
                reasons[b] = output.finish_reason or ""
                request_stats[b] = output.stats or DecodeStats()
    stats = engine.stats
    return Generation(tokens, [r == "eos" for r in reasons], stats, reasons, request_stats)


def _row_stop(stop_when: StopCondition, row: int):
    return lambda new_tokens: stop_when(row, new_tokens)


def _per_prompt_sampling(sampling, count: int) -> list[SamplingConfig]:
    if sampling is None:
        return [SamplingConfig()] * count
    if isinstance(sampling, SamplingConfig):
        return [sampling] * count
    configs = list(sampling)
    if len(configs) != count:
        raise ValueError(
            f"sampling: expected one SamplingConfig or one per prompt ({count}), got {len(configs)}"
        )
    return configs
