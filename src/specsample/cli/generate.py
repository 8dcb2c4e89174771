"""`specsample generate`: speculative sampling on real models from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from specsample.cli.models import (
    add_backend_arguments,
    attach_prompt_caches,
    check_draft_stops,
    default_repack,
    recall_costs,
)
from specsample.drafters.model import (
    DEFAULT_CONFIDENCE,
    DEFAULT_GREEDY_SURVIVAL,
    DEFAULT_SURVIVAL,
)

DEFAULT_PROMPT = "Write a Python function that reverses a linked list."
COLORS = {"accepted": "\033[32m", "recovered": "\033[33m", "bonus": "\033[36m"}
RESET = "\033[0m"
# llama.cpp contexts grow in steps of this many KV cells where a batch needs more (stable sizes)
CONTEXT_STEP = 4096


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with exact speculative sampling",
        description=(
            "Generate text from a target model, faster, with a drafter proposing tokens that the "
            "target verifies. The output is distributed exactly as the target would sample it "
            "alone (with the same temperature/top-k/top-p/min-p). With no --target, the embedded "
            "default pair is used: Qwen2.5-Coder-1.5B-Instruct drafted by Qwen2.5-Coder-0.5B-"
            "Instruct (installed by tools/run.sh; converted and cached on first use)."
        ),
        epilog=(
            "Colours (with --color or on a terminal): green = drafted token accepted, yellow = "
            "recovered after a rejection, cyan = bonus token after all drafts were accepted.\n"
            'Example: specsample generate "Write a haiku about caches" --temperature 0.7 --stats'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", nargs="?", help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    parser.add_argument(
        "--batch-file",
        type=Path,
        help="one prompt per line; all are generated together as one batch",
    )
    parser.add_argument("--target", help="target model: hub id, local folder or .gguf file")
    parser.add_argument(
        "--draft", help="draft model with the same tokenizer (default pair: its 0.5B model)"
    )
    parser.add_argument(
        "--drafter",
        choices=["model", "ngram", "none"],
        default="model",
        help="model: the draft model; ngram: prompt lookup, no model; none: "
        "target-only decoding (the baseline). Default: model",
    )
    parser.add_argument(
        "--k",
        default="auto",
        help="draft length: an integer, or 'auto' for the adaptive schedule (default)",
    )
    parser.add_argument(
        "--max-k", type=int, default=20, help="largest draft length for --k auto (default 20)"
    )
    parser.add_argument(
        "--rule",
        choices=["auto", "token", "block", "coupled", "typical"],
        default="auto",
        help="verification rule: token (token by token; with --drafts/--tree: node by node, "
        "recursive rejection sampling) or block (block verification: the optimal rule for one "
        "draft chain, never fewer accepted tokens in expectation, same cost); both exact. "
        "coupled: exact and drafter-invariant: the text for a --seed is the same with any "
        "--drafter (none included), --k, --drafts/--tree or batch (drafts and target share "
        "Gumbel noise; a draft is kept with probability >= (1-TV)/(1+TV)). auto "
        "(default): block for one chain, node by node for --drafts/--tree. typical is LOSSY "
        "(Medusa's typical acceptance: the output is NOT distributed as the target), for "
        "comparison only",
    )
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument(
        "--drafts",
        type=int,
        metavar="M",
        help="multi-draft: M candidate chains per step (each --k tokens long, 4 with --k "
        "auto), scored in one target pass and verified exactly; needs --drafter model",
    )
    shape.add_argument(
        "--tree",
        metavar="SHAPE",
        help="tree drafting: WIDTHxDEPTH (a full tree, e.g. 2x3) or children per depth (e.g. "
        "4,2,1), scored in one target pass and verified exactly; needs --drafter model",
    )
    parser.add_argument(
        "--tree-children",
        choices=["without-replacement", "iid", "top"],
        default="without-replacement",
        help="how --drafts/--tree draw a node's children from the draft: without replacement "
        "(default, distinct tokens), iid (independent draws) or top (the most probable tokens); "
        "all exact",
    )
    parser.add_argument(
        "--draft-confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help="model drafter: stop drafting a row where the draft's top probability falls below "
        f"this (0 = off; default {DEFAULT_CONFIDENCE}, chosen by benchmarks/decode_speed.py); "
        "exact either way",
    )
    parser.add_argument(
        "--draft-survival",
        type=float,
        default=DEFAULT_SURVIVAL,
        help="model drafter: stop drafting a row where the product of the draft's top "
        "probabilities so far (its estimate that every draft up to there is kept) falls below "
        f"this (0 = off; default {DEFAULT_SURVIVAL}); exact either way. With either stop on, "
        "--k auto offers the longest draft the measured pass costs justify and the stops cut it",
    )
    parser.add_argument(
        "--draft-survival-greedy",
        type=float,
        default=DEFAULT_GREEDY_SURVIVAL,
        help="model drafter: --draft-survival for greedy decoding (--temperature 0), where the "
        "draft's top probabilities understate how often its argmax is the target's (0 = off; "
        f"default {DEFAULT_GREEDY_SURVIVAL}, chosen by benchmarks/draft_stops.py); exact either "
        "way",
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 = off (default)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop string (repeatable); the text is cut before it",
    )
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="send the prompt as raw text, not as a chat user turn",
    )
    add_backend_arguments(parser)
    parser.add_argument("--stats", action="store_true", help="print decoding statistics")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (texts and statistics) instead of text",
    )
    color = parser.add_mutually_exclusive_group()
    color.add_argument(
        "--color",
        dest="color",
        action="store_true",
        default=None,
        help="colour tokens by how they were produced",
    )
    color.add_argument("--no-color", dest="color", action="store_false")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from specsample.adapters.loading import load_pair
    from specsample.drafters.model import ModelDrafter
    from specsample.drafters.ngram import NgramDrafter
    from specsample.drafters.tree import TreeDrafter
    from specsample.engine import generate
    from specsample.engine.length import AdaptiveDraftLength
    from specsample.engine.text import (
        TextStream,
        eos_token_ids,
        stop_string_condition,
        trim_at_stop,
    )

    prompts = _prompts(args)
    sampling = _sampling(args)
    draft_length = _draft_length(args, AdaptiveDraftLength)
    tree_shape = _tree_shape(args)
    rule = _rule(args, tree_shape)
    if args.rule == "typical":
        import specsample.lossy  # noqa: F401 - registers the lossy rules (front ends only)

        _note(args, "note: --rule typical is LOSSY: the output is NOT distributed as the target")
    check_draft_stops(args)
    if args.max_new_tokens < 1:
        raise argparse.ArgumentTypeError(
            f"--max-new-tokens: expected an integer >= 1, got {args.max_new_tokens}"
        )
    try:
        pair = load_pair(
            args.target,
            args.draft,
            dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
            device=args.device,
            use_draft=args.drafter == "model",
            draft_quantize=args.draft_quantize,
            backend=args.backend,
            threads=args.threads,
            repack=default_repack(args, rule),
            # the default pair on llama.cpp: the draft's weights load at its first draft (a run
            # whose cost memory says drafting does not pay here never reads them)
            defer_draft=True,
        )
    except (ValueError, OSError) as error:
        print(f"specsample generate: {error}", file=sys.stderr)
        return 1
    deferred = pair.draft is not None and not getattr(pair.draft, "loaded", True)
    _note(
        args,
        f"loaded {pair.description} in {pair.seconds:.1f} s, RSS {pair.rss_bytes / 2**30:.2f} GiB"
        + ("; the draft's weights load at its first draft" if deferred else ""),
    )
    if args.drafter == "model" and pair.draft is None:
        print(
            "specsample generate: --drafter model needs --draft when --target is given",
            file=sys.stderr,
        )
        return 2
    drafter = {
        "model": lambda: ModelDrafter(
            pair.draft,
            confidence=args.draft_confidence,
            survival=args.draft_survival,
            greedy_survival=args.draft_survival_greedy,
        ),
        "ngram": NgramDrafter,
        "none": lambda: None,
    }[args.drafter]()
    if tree_shape is not None:
        children = args.tree_children.replace("-", "_")
        drafter = TreeDrafter(pair.draft, tree_shape, children=children)
    prompt_cache = attach_prompt_caches(args, pair)
    memory = (
        recall_costs(args, pair, draft_length, rule)
        if drafter is not None and tree_shape is None
        else None
    )
    token_prompts = _encode_prompts(args, pair, prompts, draft_length, tree_shape)
    stream = TextStream(pair.tokenizer, len(prompts))
    use_color = sys.stdout.isatty() if args.color is None else args.color
    live = len(prompts) == 1 and not args.json

    def on_tokens(row: int, tokens: list[int], kinds: list[str]) -> None:
        pieces = stream.push(row, tokens)
        if live:
            for piece, kind in zip(pieces, kinds, strict=True):
                sys.stdout.write(f"{COLORS[kind]}{piece}{RESET}" if use_color else piece)
            sys.stdout.flush()

    generation = generate(
        pair.target,
        token_prompts,
        generator=torch.Generator().manual_seed(args.seed),
        drafter=drafter,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        draft_length=draft_length,
        eos_token_ids=eos_token_ids(pair.tokenizer, pair.target_config),
        on_tokens=on_tokens,
        stop_when=stop_string_condition(pair.tokenizer, args.stop),
        rule=rule,
    )
    texts = [
        trim_at_stop(pair.tokenizer.decode(t, skip_special_tokens=True), args.stop)
        for t in generation.tokens
    ]
    summary = generation.stats.summary()
    if args.json:
        record = {"prompts": prompts, "texts": texts, "stats": summary}
        record.update(_reuse_facts(memory, prompt_cache))
        print(json.dumps(record, indent=2))
        return 0
    if live:
        print()
    else:
        for b, text in enumerate(texts):
            print(f"--- [{b}] {prompts[b]}\n{text}")
    if args.stats:
        _print_stats(summary, memory, prompt_cache)
    return 0


def _encode_prompts(args, pair, prompts: list[str], draft_length, tree_shape) -> list[list[int]]:
    """The prompts' tokens (as chat user turns unless --no-chat-template), checked and given
    room by _fit_context."""
    from specsample.engine.text import encode_prompt

    token_prompts = [
        encode_prompt(pair.tokenizer, p, chat_template=not args.no_chat_template) for p in prompts
    ]
    _fit_context(args, pair, token_prompts, draft_length, tree_shape)
    return token_prompts


def _fit_context(args, pair, token_prompts, draft_length, tree_shape) -> None:
    """Before any generation: every prompt with its --max-new-tokens must fit the target's
    trained context (else an ArgumentTypeError naming the prompt's option, its tokens and the
    limit), and on llama.cpp the contexts get enough KV cells and sequences for the whole batch
    at once (its prompts, their new tokens and a step's drafts): created again larger where the
    loaded ones are too small, so that no row runs out of room mid-generation."""
    new = args.max_new_tokens
    trained = pair.trained_context
    if trained is not None:
        for b, row in enumerate(token_prompts):
            if len(row) + new > trained:
                where = (
                    f"--batch-file: prompt {b + 1}"
                    if args.batch_file is not None
                    else "--prompt-file"
                    if args.prompt_file is not None
                    else "prompt"
                )
                raise argparse.ArgumentTypeError(
                    f"{where}: expected at most {trained} tokens with --max-new-tokens "
                    f"(the target's context), got {len(row)} prompt tokens + {new} new tokens "
                    f"= {len(row) + new}; shorten the prompt or lower --max-new-tokens"
                )
    models = [lm for lm in (pair.target, pair.draft) if callable(getattr(lm, "resize", None))]
    if not models:
        return
    if tree_shape is not None:
        per_step = tree_shape.num_nodes
    else:  # a chain's drafts, or a pass widened with filler (at most the longest draft + 1)
        per_step = getattr(draft_length, "max_k", draft_length) + 1
    cells = sum(len(row) + new + per_step for row in token_prompts)
    rows = len(token_prompts)
    for lm in models:
        if rows > lm.most_rows:
            raise argparse.ArgumentTypeError(
                f"--batch-file: expected at most {lm.most_rows} prompts (llama.cpp's sequences "
                f"per context), got {rows}; split the file into files of at most "
                f"{lm.most_rows} prompts"
            )
        if cells > lm.n_ctx or rows > lm.max_batch:
            n_ctx = max(lm.n_ctx, -(-cells // CONTEXT_STEP) * CONTEXT_STEP)
            lm.resize(n_ctx=n_ctx, max_batch=max(lm.max_batch, rows))
            _note(args, f"context: {lm.argument} sized to {n_ctx} cells for {rows} prompt(s)")


def _prompts(args: argparse.Namespace) -> list[str]:
    given = [args.prompt is not None, args.prompt_file is not None, args.batch_file is not None]
    if sum(given) > 1:
        raise argparse.ArgumentTypeError(
            f"prompt, --prompt-file, --batch-file: expected at most one of them, got {sum(given)}"
        )
    if args.prompt_file is not None:
        return [_read(args.prompt_file, "--prompt-file")]
    if args.batch_file is not None:
        lines = [
            line for line in _read(args.batch_file, "--batch-file").splitlines() if line.strip()
        ]
        if not lines:
            raise argparse.ArgumentTypeError(
                f"--batch-file: expected one prompt per line, got an empty file {args.batch_file}"
            )
        return lines
    return [args.prompt if args.prompt is not None else DEFAULT_PROMPT]


def _read(path: Path, option: str) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"{option}: expected a readable file, got {error}"
        ) from None


def _sampling(args: argparse.Namespace):
    from specsample.warpers import SamplingConfig

    try:
        return SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--{str(error).replace('_', '-')}") from None


def _draft_length(args: argparse.Namespace, adaptive):
    if args.k == "auto":
        if args.max_k < 1:
            raise argparse.ArgumentTypeError(f"--max-k: expected an integer >= 1, got {args.max_k}")
        return adaptive(args.max_k)
    try:
        k = int(args.k)
    except ValueError:
        k = -1
    if k < 0:
        raise argparse.ArgumentTypeError(f"--k: expected 'auto' or an integer >= 0, got {args.k!r}")
    return k


def _rule(args: argparse.Namespace, tree_shape) -> str:
    """--rule auto: block verification for one chain (never fewer accepted drafts than token by
    token, at the same cost: see benchmarks/rules.md), node by node for trees."""
    if args.rule != "auto":
        return args.rule
    return "token" if tree_shape is not None else "block"


def _tree_shape(args: argparse.Namespace):
    """The TreeShape of --drafts / --tree, or None."""
    from specsample.drafters.tree import TreeShape

    if args.drafts is None and args.tree is None:
        return None
    option = "--drafts" if args.drafts is not None else "--tree"
    if args.drafter != "model":
        raise argparse.ArgumentTypeError(
            f"{option}: expected --drafter model (trees are drafted by a model), got "
            f"--drafter {args.drafter}"
        )
    if args.rule not in ("auto", "token", "coupled"):
        raise argparse.ArgumentTypeError(
            f"{option}: trees are verified node by node (--rule token or coupled), got --rule "
            f"{args.rule}"
        )
    try:
        if args.tree is not None:
            return TreeShape.parse(args.tree)
        if args.drafts < 1:
            raise ValueError(f"expected an integer >= 1, got {args.drafts}")
        depth = 4 if args.k == "auto" else int(args.k)
        if depth < 1:
            raise ValueError(f"needs --k >= 1 (the chain length), got --k {args.k}")
        return TreeShape.chains(args.drafts, depth)
    except ValueError as error:
        message = str(error).removeprefix("tree: ")
        raise argparse.ArgumentTypeError(f"{option}: {message}") from None


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(message, file=sys.stderr)


def _reuse_facts(memory=None, prompt_cache=None) -> dict:
    """What the run took from earlier runs: the cost memory (recalled, dropped, a "no" that stood
    though the machine ran slower, its file) and
    the target's prompt cache (prompt tokens restored and computed, its folder); a key only for
    what this run used."""
    facts: dict = {}
    if memory is not None:
        facts["cost_memory"] = {
            "recalled": bool(memory.recalled),
            "dropped": bool(memory.dropped),
            "slower": bool(memory.slower),
            "path": str(memory.path),
        }
    if prompt_cache is not None:
        facts["prompt_cache"] = {
            "restored_tokens": prompt_cache.reused,
            "computed_tokens": prompt_cache.computed,
            "folder": str(prompt_cache.folder),
        }
    return facts


def _print_stats(summary: dict, memory=None, prompt_cache=None) -> None:
    seconds = summary["seconds"]
    lines = [
        "",
        "statistics",
        f"  new tokens            {summary['new_tokens']} in {seconds['total']:.2f} s "
        f"({summary['tokens_per_second']:.2f} tokens/s)",
        f"  target passes         {summary['target_passes']}  (draft passes "
        f"{summary['draft_passes']})",
        f"  acceptance rate       {summary['alpha']:.3f}  by position "
        f"{summary['acceptance_by_position']}",
        f"  tokens per pass       {summary['tokens_per_pass']:.3f}  (mean draft length "
        f"{summary['mean_draft_length']})",
        f"  nothing accepted      {summary['empty_share']:.1%} of drafting passes",
        f"  cost ratio c          {summary['cost_ratio_c']}  (draft step / target pass)",
        f"  time split            prefill {seconds['prefill']:.2f} s, draft {seconds['draft']:.2f} "
        f"s, target {seconds['target']:.2f} "
        f"s, verify {seconds['verify']:.2f} s, rest {seconds['rest']:.2f} s",
        f"  predicted speedup     {summary['predicted_speedup']}  (theory, from alpha, the draft "
        "lengths and the measured costs; trees: from tokens per pass; None without a draft "
        "pass or a timed 1-token target pass)",
        f"  rules used            {summary['rules_used']}",
    ]
    facts = _reuse_facts(memory, prompt_cache)
    if "cost_memory" in facts:
        fact = facts["cost_memory"]
        found = "recalled" if fact["recalled"] else "none yet for this setting"
        if fact["dropped"]:
            found += ", dropped: the machine ran at another speed than remembered"
        if fact["slower"]:
            found += ", the machine ran slower than remembered: its 'no' stands"
        lines.append(f"  cost memory           {found} ({fact['path']})")
    if "prompt_cache" in facts:
        fact = facts["prompt_cache"]
        total = fact["restored_tokens"] + fact["computed_tokens"]
        lines.append(
            f"  prompt cache          {fact['restored_tokens']} of {total} target prompt tokens "
            f"restored ({fact['folder']})"
        )
    print("\n".join(lines), file=sys.stderr)
