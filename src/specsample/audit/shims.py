"""What the audit can run: a user's function named `module:function`, or a built-in shim that gives
another implementation the audit's contract

    fn(draft_tokens [batch, k] int64, draft_probs [batch, k, vocab] | None,
       target_probs [batch, k+1, vocab], generator) -> tokens [batch, k+1]

(emitted tokens left-aligned, -1 padded). A function that also takes a `draft_lengths` keyword
(int64 [batch]) is run on the ragged case too.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch


class CouldNotJudge(Exception):
    """The audit cannot run or read the target; its verdict is neither pass nor fail."""


@dataclass(frozen=True)
class Verifier:
    """A function under audit with the contract above.

    name:       what the report calls it.
    fn:         the function.
    point_mass: whether it accepts draft_probs=None (the contract says it must; shims of
                implementations that cannot say False and the case is skipped).
    ragged:     whether it takes draft_lengths=.
    version:    the audited package and version, when known.
    note:       how the shim calls the implementation.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    point_mass: bool = True
    ragged: bool = False
    version: str = ""
    note: str = ""


def load_verifier(target: str) -> Verifier:
    """The Verifier named by `target`: a built-in shim name or `module:function`. Raises
    CouldNotJudge with the reason when it cannot be loaded."""
    if target in BUILT_IN:
        return BUILT_IN[target]()
    if ":" not in target or target.startswith("ours:"):
        names = ", ".join(sorted(BUILT_IN))
        raise CouldNotJudge(f"TARGET: expected 'module:function' or one of {names}, got {target!r}")
    module_name, _, function_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import failure means nothing can be judged
        raise CouldNotJudge(
            f"TARGET {target!r}: module {module_name!r} does not import "
            f"({type(error).__name__}: {error})"
        ) from error
    fn = module
    for part in function_name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise CouldNotJudge(
                f"TARGET {target!r}: module {module_name!r} has no attribute {function_name!r}"
            )
    return from_function(fn, name=target)


def from_function(fn: object, *, name: str | None = None) -> Verifier:
    """A Verifier for a callable with the audit's contract; its signature is checked here."""
    label = name or getattr(fn, "__qualname__", repr(fn))
    if not callable(fn):
        raise CouldNotJudge(f"{label}: expected a callable, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust the contract
        return Verifier(label, fn)
    try:
        signature.bind(None, None, None, None)
    except TypeError as error:
        raise CouldNotJudge(
            f"{label}: wrong signature {signature}; expected "
            f"fn(draft_tokens, draft_probs, target_probs, generator) ({error})"
        ) from error
    parameters = signature.parameters
    ragged = "draft_lengths" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    return Verifier(label, fn, ragged=ragged)


# Our own rules.


def _ours(rule: str) -> Verifier:
    from specsample.rules import verify

    def run(draft_tokens, draft_probs, target_probs, generator, *, draft_lengths=None):
        return verify(
            draft_tokens,
            draft_probs,
            target_probs,
            generator=generator,
            rule=rule,
            draft_lengths=draft_lengths,
        ).tokens

    return Verifier(f"ours:{rule}", run, ragged=True, version=_version("specsample"))


def _ours_tree() -> Verifier:
    from specsample.rules import chain_parents, verify_tree

    def run(draft_tokens, draft_probs, target_probs, generator, *, draft_lengths=None):
        batch, k = draft_tokens.shape
        valid = None
        if draft_lengths is not None:
            valid = torch.arange(k)[None, :] < draft_lengths[:, None]
        result = verify_tree(
            draft_tokens,
            chain_parents(1, k),
            draft_probs,
            target_probs,
            generator=generator,
            node_valid=valid,
        )
        return result.tokens

    return Verifier(
        "ours:tree",
        run,
        ragged=True,
        version=_version("specsample"),
        note="specsample.rules.verify_tree on a single chain (node_valid for ragged rows)",
    )


def _ours_typical() -> Verifier:
    from specsample.lossy import typical_rule
    from specsample.rules import draw_uniforms

    def run(draft_tokens, draft_probs, target_probs, generator, *, draft_lengths=None):
        batch, k = draft_tokens.shape
        if draft_lengths is None:
            draft_lengths = torch.full((batch,), k, dtype=torch.int64)
        accept, sample = draw_uniforms(batch, k, generator, target_probs.device)
        return typical_rule(
            draft_tokens, draft_probs, target_probs, draft_lengths, accept, sample
        ).tokens

    return Verifier(
        "ours:typical",
        run,
        ragged=True,
        version=_version("specsample"),
        note="specsample.lossy.typical_rule (LOSSY by design: the audit must reject it)",
    )


# Other implementations.


def _transformers() -> Verifier:
    try:
        from transformers.generation import utils
    except Exception as error:
        raise CouldNotJudge(f"transformers: not installed ({error}); could not judge") from error
    speculative_sampling = getattr(utils, "_speculative_sampling", None)
    if speculative_sampling is None:
        raise CouldNotJudge(
            f"transformers {_version('transformers')}: transformers.generation.utils has no "
            "_speculative_sampling; could not judge"
        )

    def run(draft_tokens, draft_probs, target_probs, generator):
        # transformers verifies one row at a time (assisted decoding has batch size 1) from
        # float32 logits, and draws from the global RNG: it runs on a forked RNG seeded from the
        # audit's generator, so the caller's global RNG is left as it was.
        batch, k = draft_tokens.shape
        draft_logits = draft_probs.float().log()
        target_logits = target_probs.float().log()
        tokens = torch.full((batch, k + 1), -1, dtype=torch.int64)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for row in range(batch):
                valid, _ = speculative_sampling(
                    draft_tokens[row : row + 1],
                    draft_logits[row : row + 1],
                    k,
                    target_logits[row : row + 1],
                )
                tokens[row, : valid.shape[1]] = valid[0]
        return tokens

    return Verifier(
        "transformers",
        run,
        point_mass=False,
        version=f"transformers {_version('transformers')}",
        note=(
            "transformers.generation.utils._speculative_sampling, one row per call as assisted "
            "decoding calls it, with log-probabilities as logits (float32); point-mass drafts "
            "never reach it (transformers matches them greedily), so that case is skipped"
        ),
    )


def _flashinfer() -> Verifier:
    try:
        import flashinfer.sampling as sampling
    except Exception as error:
        raise CouldNotJudge(f"flashinfer: not installed ({error}); could not judge") from error
    if not torch.cuda.is_available():
        raise CouldNotJudge("flashinfer: needs a CUDA device, none is available; could not judge")
    chain = sampling.chain_speculative_sampling

    def run(draft_tokens, draft_probs, target_probs, generator):
        device = torch.device("cuda")
        cuda_generator = torch.Generator(device=device)
        cuda_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        out = chain(
            draft_probs.to(device, torch.float32),
            draft_tokens.to(device, torch.int32),
            target_probs.to(device, torch.float32),
            generator=cuda_generator,
        )
        tokens = out[0] if isinstance(out, tuple) else out
        return tokens.long().cpu()

    return Verifier(
        "flashinfer",
        run,
        point_mass=False,
        version=f"flashinfer {_version('flashinfer-python') or _version('flashinfer')}",
        note="flashinfer.sampling.chain_speculative_sampling on CUDA (float32, int32 ids)",
    )


def _vllm() -> Verifier:
    try:
        import vllm  # noqa: F401
    except Exception as error:
        raise CouldNotJudge(f"vllm: not installed ({error}); could not judge") from error
    raise CouldNotJudge(
        f"vllm {_version('vllm')}: its rejection sampler needs vLLM's sampling metadata objects; "
        "this audit has no shim for this version yet; could not judge (audit the server instead: "
        "specsample audit server)"
    )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


BUILT_IN: dict[str, Callable[[], Verifier]] = {
    "ours:token": lambda: _ours("token"),
    "ours:block": lambda: _ours("block"),
    "ours:tree": _ours_tree,
    "ours:typical": _ours_typical,
    "transformers": _transformers,
    "flashinfer": _flashinfer,
    "vllm": _vllm,
}
