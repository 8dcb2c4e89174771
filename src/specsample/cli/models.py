"""Model options shared by `specsample serve` and `specsample batch`, and the loader that turns
them into what the server and the batch runner run (`ServedModels`).

The options mirror `specsample generate`'s (target, draft, drafter, draft length, rule, backend,
dtype, device, threads, draft quantisation); the draft-length parsing is generate's own.
`ModelLoader` is a picklable callable, so a Ray actor can load the same models on its node.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from specsample.drafters.model import (
    DEFAULT_CONFIDENCE,
    DEFAULT_GREEDY_SURVIVAL,
    DEFAULT_SURVIVAL,
)
from specsample.rules.registry import EXACT

LOSSY_RULES = ("typical",)
DEFAULT_PAIR_NAME = "qwen2.5-coder-1.5b-instruct"
DEFAULT_SERVING_K = 4


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models (as for specsample generate)")
    group.add_argument("--target", help="target model: hub id, local folder or .gguf file")
    group.add_argument("--draft", help="draft model with the same tokenizer")
    group.add_argument(
        "--drafter",
        choices=["model", "ngram", "none"],
        default="model",
        help="model: the draft model; ngram: prompt lookup; none: target-only (default model)",
    )
    group.add_argument(
        "--k",
        default=None,
        help="draft length: an integer, or 'auto' (adaptive: per request, and per batch size it "
        "first checks whether drafting can pay at all on this machine). Default: auto on "
        f"llama.cpp (on CPUs a fixed k served fewer tokens per second than target-only), "
        f"{DEFAULT_SERVING_K} on transformers (on the tiny benchmark pair a fixed k served more "
        "than auto with several clients): benchmarks/serve.md",
    )
    group.add_argument("--max-k", type=int, default=20, help="largest --k auto length (20)")
    group.add_argument(
        "--rule",
        choices=[*sorted(EXACT), *LOSSY_RULES],
        default="auto",
        help="verification rule (default auto: block verification); all exact except typical, "
        "which is LOSSY (its output is NOT distributed as the target)",
    )
    group.add_argument(
        "--draft-confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help=f"stop drafting a row below this top probability (default {DEFAULT_CONFIDENCE})",
    )
    group.add_argument(
        "--draft-survival",
        type=float,
        default=DEFAULT_SURVIVAL,
        help="stop drafting a row where the product of the draft's top probabilities so far "
        f"falls below this (0 = off; default {DEFAULT_SURVIVAL})",
    )
    group.add_argument(
        "--draft-survival-greedy",
        type=float,
        default=DEFAULT_GREEDY_SURVIVAL,
        help="--draft-survival for greedy requests (temperature 0; 0 = off; default "
        f"{DEFAULT_GREEDY_SURVIVAL})",
    )
    add_backend_arguments(group)
    group.add_argument(
        "--max-batch", type=int, default=16, help="requests decoded together (default 16)"
    )
    group.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens per request, prompt and completion (default: the model's, at most 4096)",
    )
    group.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="max_tokens of a request that gives none (default 256, within the context)",
    )
    group.add_argument("--model-name", help="the model id clients send (default: from --target)")


def add_backend_arguments(parser) -> None:
    """What runs the models: --dtype, --device, --backend, --threads, --repack, --cost-memory,
    --prompt-cache, --draft-quantize (shared by generate, serve and batch)."""
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32", "float16"],
        default="auto",
        help="compute dtype; auto (default) = float32 on CPU (multi-token bfloat16 passes are "
        "slow on CPUs without bfloat16 instructions), bfloat16 on CUDA",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--backend",
        choices=["auto", "llama.cpp", "transformers"],
        default="auto",
        help="what runs the models: llama.cpp (.gguf files as they are, CPU) or transformers "
        "(hub ids, folders, .gguf files dequantised). auto (default): llama.cpp for .gguf files "
        "and the default pair on the CPU when llama-cpp-python is installed, else transformers",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="llama.cpp compute threads (default: every core this process may use)",
    )
    parser.add_argument(
        "--repack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="llama.cpp: let it repack quantised weights for its CPU kernels (llama.cpp's own "
        "default). Faster passes (on 2 cores a 1-token pass about 5%% faster, a 4-token pass "
        "2.4x a 1-token pass instead of 3.2x), about 0.6 GB more memory and a second more to "
        "load; exact all the same (each token follows the distribution its verifying pass "
        "computed), but a position's logits then differ slightly with the pass's size. Default: "
        "on with the llama.cpp backend, except for generate --rule coupled (whose same text with "
        "and without drafts needs the same logits from passes of 1 to 4 tokens) and for a "
        "llama.cpp build with AMX kernels (they crash on repacked weights; tools/setup.sh "
        "compiles llama.cpp without them)",
    )
    parser.add_argument(
        "--cost-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--k auto: start from the pass costs and the verdict (does drafting pay here?) "
        "that earlier runs with the same models, settings and machine measured (dropped when "
        "the first two target passes cost more than 1.3x more or less than remembered; a "
        "remembered 'drafting does not pay' stands when they cost more); kept in "
        "$SPECSAMPLE_COST_MEMORY (a folder, or 'off'), default the cache's costs/ folder. "
        "Spares each run the probe steps (and, where drafting does not pay, the draft model's "
        "prefill). Exact either way. Default: on",
    )
    parser.add_argument(
        "--prompt-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="llama.cpp: keep each prompt's keys and values on disk and restore the longest "
        "kept prefix of a later prompt instead of prefilling it (at most 8 prompts per model "
        "and setting, least recently used first out); kept in $SPECSAMPLE_PROMPT_CACHE (a "
        "folder, or 'off'), default the cache's prompts/ folder. Exact with respect to the "
        "distributions the passes compute, as every pass (the tokens after a restored prefix "
        "are computed in a pass of another shape than a fresh prefill's). Default: on",
    )
    parser.add_argument(
        "--draft-quantize",
        choices=["auto", "none", "int8"],
        default="auto",
        help="int8: quantise the draft model's linear layers to int8 (CPU, float32, transformers "
        "backend): a cheaper draft step, usually a slightly lower acceptance rate; decoding "
        "stays exact (the drafts are verified against the quantised draft's own "
        "probabilities). auto (default): int8 where it applies (a float32 draft on the CPU on "
        "transformers, where it was the faster draft in the decode benchmark), none elsewhere "
        "(llama.cpp runs the GGUF as stored)",
    )


@dataclass
class ModelLoader:
    """Loads the models named by the options (a picklable callable returning ServedModels)."""

    options: dict = field(default_factory=dict)

    @staticmethod
    def from_args(args: argparse.Namespace) -> ModelLoader:
        check_model_arguments(args)
        names = (
            "target draft drafter k max_k rule draft_confidence draft_survival "
            "draft_survival_greedy dtype device "
            "backend threads draft_quantize repack max_batch context default_max_tokens "
            "model_name cost_memory prompt_cache"
        ).split()
        return ModelLoader({name: getattr(args, name) for name in names})

    def __call__(self):
        import torch

        from specsample.adapters.loading import load_pair
        from specsample.cli.generate import _draft_length
        from specsample.engine import AdaptiveDraftLength, Engine
        from specsample.engine.text import eos_token_ids
        from specsample.serve.completion import ServedModels

        o = argparse.Namespace(**self.options)
        lossy = o.rule in LOSSY_RULES
        if lossy:
            import specsample.lossy  # noqa: F401 - registers the lossy rules

        context = o.context or 4096
        check_max_batch(o)
        repack = default_repack(o, o.rule)
        pair = load_pair(
            o.target,
            o.draft,
            dtype=None if o.dtype == "auto" else getattr(torch, o.dtype),
            device=o.device,
            use_draft=o.drafter == "model",
            draft_quantize=o.draft_quantize,
            backend=o.backend,
            threads=o.threads,
            n_ctx=context * o.max_batch,
            max_batch=o.max_batch,
            repack=repack,
            # the default pair on llama.cpp: the draft's weights load at its first draft (as
            # for generate: a server whose cost memory says drafting does not pay never holds
            # them)
            defer_draft=True,
        )
        if o.drafter == "model" and pair.draft is None:
            raise ValueError("--drafter model needs --draft when --target is given")
        attach_prompt_caches(o, pair)
        trained = pair.trained_context
        if trained is not None:
            if o.context is None:
                context = min(context, trained)
            elif o.context > trained:
                raise ValueError(
                    f"--context: expected at most {trained} tokens (the context the target was "
                    f"trained for), got {o.context}"
                )
        if o.k is None:
            o.k = "auto" if pair.backend == "llama.cpp" else str(DEFAULT_SERVING_K)
        draft_length = _draft_length(o, AdaptiveDraftLength)
        if o.drafter != "none":
            recall_costs(o, pair, draft_length, o.rule)

        def make_engine() -> Engine:
            drafter = _drafter(o, pair.draft)
            return Engine(
                pair.target,
                drafter,
                rule=o.rule,
                draft_length=draft_length if drafter is not None else "auto",
                max_batch=o.max_batch,
            )

        return ServedModels(
            make_engine=make_engine,
            tokenizer=pair.tokenizer,
            name=o.model_name or (o.target or DEFAULT_PAIR_NAME),
            context_length=context,
            vocab_size=pair.target.vocab_size,
            eos_token_ids=tuple(eos_token_ids(pair.tokenizer, pair.target_config)),
            rule=o.rule,
            lossy=lossy,
            speculative=o.drafter != "none",
            default_max_tokens=o.default_max_tokens,
        )


def check_max_batch(options: argparse.Namespace) -> None:
    """On llama.cpp --max-batch is bounded by the sequences one context holds (256)."""
    from specsample.adapters.loading import resolve_backend

    backend = resolve_backend(
        options.backend, options.target, options.draft, options.device, options.draft_quantize
    )
    if backend != "llama.cpp":
        return
    from specsample.adapters.llamacpp import most_rows

    if options.max_batch > most_rows():
        raise ValueError(
            f"--max-batch: expected at most {most_rows()} on llama.cpp (the sequences one "
            f"context holds), got {options.max_batch}"
        )


def default_repack(options: argparse.Namespace, rule: str) -> bool:
    """--repack as given, else on with the llama.cpp backend (llama.cpp's own default: faster
    passes) unless the rule is coupled (drafter-invariant text needs bit-identical logits from
    passes of 1 to 4 tokens, which only unrepacked weights give) or the llama.cpp build has AMX
    kernels (they crash on repacked weights: adapters/llamacpp.amx_kernels)."""
    from specsample.adapters.loading import resolve_backend

    if options.repack is not None:
        return bool(options.repack)
    if rule == "coupled":
        return False
    chosen = resolve_backend(
        options.backend, options.target, options.draft, options.device, options.draft_quantize
    )
    if chosen != "llama.cpp":
        return False
    from specsample.adapters.llamacpp import amx_kernels

    return not amx_kernels()


def recall_costs(options: argparse.Namespace, pair, policy, rule: str, tree=None):
    """With --cost-memory (default) and an adaptive draft length: the CostMemory of this
    setting, recalled into `policy` (engine.memory); else None. The key: the backend and
    models as loaded (files by path, size and modification time), the compute settings, the
    drafter and its stops, the rule and tree, the largest draft length (and the machine, which
    CostMemory adds)."""
    from specsample.engine.length import AdaptiveDraftLength
    from specsample.engine.memory import CostMemory, file_identity

    if not getattr(options, "cost_memory", False) or not isinstance(policy, AdaptiveDraftLength):
        return None

    def model(lm, named):
        return file_identity(getattr(lm, "path", None) or named) if lm is not None else None

    key = {
        "backend": pair.backend,
        "pair": pair.description,
        "target": model(pair.target, options.target),
        "draft": model(pair.draft, options.draft),
        "dtype": options.dtype,
        "device": options.device,
        "draft_quantize": options.draft_quantize,
        "threads": getattr(pair.target, "threads", options.threads),
        "drafter": options.drafter,
        "draft_confidence": options.draft_confidence,
        "draft_survival": options.draft_survival,
        "draft_survival_greedy": options.draft_survival_greedy,
        "rule": rule,
        "tree": tree,
        "max_k": policy.max_k,
    }
    memory = CostMemory.from_environment(key)
    if memory is not None:
        policy.recall(memory)
    return memory


def attach_prompt_caches(options: argparse.Namespace, pair):
    """With --prompt-cache (default) on llama.cpp: each model gets the PromptCache of its
    setting (adapters/prompt_cache.py; key: the model file by path, size and modification
    time, the cache's number types, flash attention, repacking, threads, llama-cpp-python's
    version and the machine). Returns the target's cache, or None."""
    from specsample.adapters.prompt_cache import PromptCache
    from specsample.engine.memory import file_identity, machine_facts

    if not getattr(options, "prompt_cache", False) or pair.backend != "llama.cpp":
        return None
    caches = []
    machine = machine_facts()
    for lm in (pair.target, pair.draft):
        if lm is None:
            continue
        key = {
            "model": file_identity(lm.path),
            "settings": {
                "kv_type": lm.kv_type,
                "flash_attn": lm.flash_attn,
                "repack": lm.repack,
                "threads": lm.threads,
            },
            "machine": machine,
        }
        lm.prompt_cache = PromptCache.from_environment(key)
        caches.append(lm.prompt_cache)
    return caches[0] if caches else None


def _drafter(o: argparse.Namespace, draft_model):
    from specsample.drafters.model import ModelDrafter
    from specsample.drafters.ngram import NgramDrafter

    if o.drafter == "model":
        return ModelDrafter(
            draft_model,
            confidence=o.draft_confidence,
            survival=o.draft_survival,
            greedy_survival=o.draft_survival_greedy,
        )
    if o.drafter == "ngram":
        return NgramDrafter()
    return None


def check_draft_stops(args: argparse.Namespace) -> None:
    """Raises argparse.ArgumentTypeError for a model drafter stop outside [0, 1)."""
    for option, value in (
        ("--draft-confidence", args.draft_confidence),
        ("--draft-survival", args.draft_survival),
        ("--draft-survival-greedy", args.draft_survival_greedy),
    ):
        if not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"{option}: expected a number in [0, 1), got {value}")


def check_model_arguments(args: argparse.Namespace) -> None:
    """Raises argparse.ArgumentTypeError for an option value out of range."""
    for option, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--context", args.context, 2),
        ("--default-max-tokens", args.default_max_tokens, 1),
    ):
        if value is not None and value < low:
            raise argparse.ArgumentTypeError(f"{option}: expected an integer >= {low}, got {value}")
    check_draft_stops(args)
    from specsample.cli.generate import _draft_length
    from specsample.engine.length import AdaptiveDraftLength

    if args.k is not None:
        _draft_length(args, AdaptiveDraftLength)  # raises for a bad --k


def warn_if_lossy(args: argparse.Namespace, command: str) -> None:
    if args.rule in LOSSY_RULES:
        bar = "!" * 78
        print(
            f"{bar}\nspecsample {command}: --rule {args.rule} is LOSSY: the output is NOT "
            f"distributed as the target model would sample it.\nEvery response says "
            f'"lossy": true. Use it to compare, never to serve real traffic.\n{bar}',
            file=sys.stderr,
        )
