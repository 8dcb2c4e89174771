"""The prompt cache of the llama.cpp backend (adapters/prompt_cache.py) on tiny GGUF models
written in-process.

A prompt found whole comes back bit for bit (state and logits: the run that saved it). A
shared prefix is restored and the rest computed: those logits are compared with a fresh
context fed one token per pass, within the tolerances of tests/adapters/test_llamacpp.py
(float32 keys and values: 1e-4; llama.cpp's defaults: 1e-2). The negative control restores
another prompt's state under this prompt's tokens and lands far outside them.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llamacpp extra)")
pytest.importorskip("gguf", reason="the tiny test models are written with the gguf package")

from test_llamacpp import NUMERICS, make_reference  # noqa: E402
from tiny_gguf import VOCAB, write_tiny_gguf  # noqa: E402

from specsample.adapters import prompt_cache  # noqa: E402
from specsample.adapters.llamacpp import LlamaCppLM  # noqa: E402
from specsample.adapters.prompt_cache import (  # noqa: E402
    ENVIRONMENT,
    MAX_ENTRIES,
    MIN_TOKENS,
    PromptCache,
    _file_stem,
    prompt_cache_directory,
)

KEY = {"model": "tiny.gguf", "kv": "test"}


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("prompt_cache") / "tiny.gguf")


@pytest.fixture(scope="module")
def reference(gguf_path: Path):
    """The float32 reference of tests/adapters/test_llamacpp.py."""
    return make_reference(gguf_path, NUMERICS["float32"][0])


@pytest.fixture(scope="module", params=sorted(NUMERICS))
def numerics(request, gguf_path: Path):
    options, tolerance = NUMERICS[request.param]
    return options, make_reference(gguf_path, options), tolerance


def model(gguf_path: Path, cache: PromptCache | None, options: dict | None = None) -> LlamaCppLM:
    options = NUMERICS["float32"][0] if options is None else options
    lm = LlamaCppLM(gguf_path, n_ctx=512, max_batch=4, threads=1, **options)
    lm.prompt_cache = cache
    return lm


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def test_a_prompt_found_whole_gives_back_its_state_and_logits(gguf_path, tmp_path):
    """The second process feeds nothing for the prompt: its logits and the logits of every
    later pass are those of the process that saved it, bit for bit."""
    p, more = prompt(1, 30), [5, 17, 99]
    first = model(gguf_path, PromptCache(KEY, tmp_path))
    saved = first.prefill([p])
    saved_next = first.extend(torch.tensor([more]), torch.tensor([3]))
    cache = PromptCache(KEY, tmp_path)
    second = model(gguf_path, cache)
    assert torch.equal(second.prefill([p]), saved)
    assert second.num_positions == 0 and (cache.reused, cache.computed) == (30, 0)
    assert torch.equal(second.extend(torch.tensor([more]), torch.tensor([3])), saved_next)


def test_a_shared_prefix_is_restored_and_the_rest_computed(gguf_path, tmp_path, numerics):
    """A prompt that shares its first 20 tokens with a kept one: 20 restored, the rest fed; the
    logits after it and after later passes match a fresh context within the tolerance."""
    options, reference, tolerance = numerics
    kept = prompt(2, 24)
    model(gguf_path, PromptCache(KEY, tmp_path), options).prefill([kept])
    p = kept[:20] + prompt(3, 9)
    cache = PromptCache(KEY, tmp_path)
    lm = model(gguf_path, cache, options)
    logits = lm.prefill([p])[0]
    assert lm.num_positions == 9 and (cache.reused, cache.computed) == (20, 9)
    assert (logits - reference(p)[-1]).abs().max() < tolerance
    more = [7, 8, 9, 10]
    after = lm.extend(torch.tensor([more]), torch.tensor([4]))[0]
    assert (after - reference(p + more)[-4:]).abs().max() < tolerance


def test_positions_to_score_are_never_restored(gguf_path, tmp_path, reference):
    """add_rows_last over a kept prompt and drafts after it: the prompt's last token is fed
    again with the drafts (its logits are asked for), in a batch with a row the cache does not
    know; every scored position matches the reference."""
    p = prompt(4, 16)
    model(gguf_path, PromptCache(KEY, tmp_path)).prefill([p])
    cache = PromptCache(KEY, tmp_path)
    lm = model(gguf_path, cache)
    drafts, other = [11, 12, 13], prompt(5, 12)
    out = lm.add_rows_last([p + drafts, other], 4)
    assert lm.num_positions == 4 + len(other)
    assert (cache.reused, cache.computed) == (15, 4 + len(other))
    assert (out[0] - reference(p + drafts)[-4:]).abs().max() < NUMERICS["float32"][1]
    assert (out[1] - reference(other)[-4:]).abs().max() < NUMERICS["float32"][1]


def kept_with_other_tokens(gguf_path: Path, folder: Path, tokens: list[int], state_of: list[int]):
    """Keeps `state_of` (its file, state and logits), then gives its parts with `tokens` in
    place of its own: (the file it was kept in, the parts)."""
    cache = PromptCache(KEY, folder)
    model(gguf_path, cache).prefill([state_of])
    (path,) = cache.folder.glob("*.npz")
    with np.load(path) as data:
        parts = {name: data[name] for name in data.files}
    parts["tokens"] = np.asarray(tokens, dtype=np.int64)
    return path, parts


def test_another_prompts_state_lands_far_outside_the_tolerance(gguf_path, tmp_path, reference):
    """Negative control: a kept file whose state belongs to another prompt than its tokens say
    (named as its tokens are, so the cache takes it). The restored keys and values are wrong,
    and the comparison above would catch it."""
    p, wrong = prompt(6, 20), prompt(7, 20)
    path, parts = kept_with_other_tokens(gguf_path, tmp_path, p, wrong)
    np.savez(path.parent / f"{_file_stem(parts['tokens'])}.npz", **parts)
    path.unlink()
    lm = model(gguf_path, PromptCache(KEY, tmp_path))
    extra = [1, 2, 3]
    logits = lm.prefill([p + extra])[0]
    assert lm.num_positions == 3
    assert (logits - reference(p + extra)[-1]).abs().max() > 100 * NUMERICS["float32"][1]


def test_damaged_short_and_other_settings_files_are_not_used(gguf_path, tmp_path, reference):
    p = prompt(8, 20)
    cache = PromptCache(KEY, tmp_path)
    model(gguf_path, cache).prefill([p])
    (path,) = cache.folder.glob("*.npz")
    path.write_bytes(b"not a cache file")
    other = PromptCache({**KEY, "kv": "other"}, tmp_path)
    assert other.folder != cache.folder and other.longest_prefix(p) is None
    fresh = PromptCache(KEY, tmp_path)
    lm = model(gguf_path, fresh)
    logits = lm.prefill([p])[0]
    assert (fresh.reused, fresh.computed) == (0, 20) and lm.num_positions == 20
    assert (logits - reference(p)[-1]).abs().max() < NUMERICS["float32"][1]
    # prompts (and shared prefixes) shorter than MIN_TOKENS are neither kept nor restored
    short = PromptCache({**KEY, "kv": "short"}, tmp_path)
    model(gguf_path, short).prefill([p[: MIN_TOKENS - 1]])
    assert not short.folder.exists()


def test_a_file_whose_tokens_are_not_the_ones_its_name_stands_for_is_not_used(
    gguf_path, tmp_path, reference
):
    """A file is kept under the hash of its tokens: one whose tokens were changed under the
    same name (damaged, or written by something else) is passed over, and the prompt is
    computed as if nothing were kept."""
    p, wrong = prompt(6, 20), prompt(7, 20)
    path, parts = kept_with_other_tokens(gguf_path, tmp_path, p, wrong)
    np.savez(path, **parts)
    fresh = PromptCache(KEY, tmp_path)
    assert fresh.longest_prefix(p + [1, 2, 3]) is None
    lm = model(gguf_path, fresh)
    logits = lm.prefill([p + [1, 2, 3]])[0]
    assert lm.num_positions == 23
    assert (logits - reference(p + [1, 2, 3])[-1]).abs().max() < NUMERICS["float32"][1]


def test_lookups_open_each_kept_file_once(gguf_path, tmp_path, monkeypatch):
    """A server looks the cache up for every request that joins: a file's tokens are read
    the first time it is seen (a file another process kept included), not at every lookup;
    files dropped from the folder are forgotten, so the index holds at most what the folder
    does."""
    reads = []
    read = prompt_cache._read_tokens
    monkeypatch.setattr(prompt_cache, "_read_tokens", lambda path: reads.append(path) or read(path))
    saver = PromptCache(KEY, tmp_path)  # as another process: its own index
    first, second = prompt(20, 12), prompt(21, 12)
    model(gguf_path, saver).prefill([first])
    cache = PromptCache(KEY, tmp_path)
    assert cache.longest_prefix(first + [5])[0] == 12 and len(reads) == 1
    assert cache.longest_prefix(first[:10] + [5])[0] == 10 and len(reads) == 1
    model(gguf_path, saver).prefill([second])  # kept by the other one
    assert cache.longest_prefix(second + [5])[0] == 12 and len(reads) == 2
    assert cache.longest_prefix(first + [5])[0] == 12 and len(reads) == 2
    lm = model(gguf_path, cache)
    for i in range(MAX_ENTRIES + 2):  # kept by this one: known without a read
        lm.add_rows([prompt(300 + i, 10)])
        lm.remove_rows(torch.tensor([], dtype=torch.long))
        cache.longest_prefix(prompt(300 + i, 10))
    assert len(reads) == 2
    assert len(cache._tokens) <= MAX_ENTRIES
    assert set(cache._tokens) == {p.name for p in cache.folder.glob("*.npz")}


def test_the_least_recently_used_prompts_go_first(gguf_path, tmp_path):
    cache = PromptCache(KEY, tmp_path)
    lm = model(gguf_path, cache)
    prompts = [prompt(100 + i, 10) for i in range(MAX_ENTRIES + 2)]
    for i, p in enumerate(prompts):
        lm.add_rows([p])
        lm.remove_rows(torch.tensor([], dtype=torch.long))
        if i == 0:
            first = cache.longest_prefix(p)
    assert len(list(cache.folder.glob("*.npz"))) == MAX_ENTRIES
    assert first is not None and not first[1].exists()
    assert cache.longest_prefix(prompts[-1])[0] == 10


def test_the_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENVIRONMENT, str(tmp_path / "here"))
    assert prompt_cache_directory() == tmp_path / "here"
    monkeypatch.setenv(ENVIRONMENT, "off")
    assert prompt_cache_directory() is None and PromptCache.from_environment(KEY) is None
    with pytest.raises(ValueError, match="directory: expected a folder"):
        PromptCache(KEY)
    monkeypatch.delenv(ENVIRONMENT)
    monkeypatch.setenv("SPECSAMPLE_CACHE", str(tmp_path / "root"))
    assert prompt_cache_directory() == tmp_path / "root" / "prompts"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_run_from_the_cache_is_the_run_that_saved_it(gguf_path, tmp_path, temperature):
    """Through `generate`, target-only: the same prompt and seed twice give the same tokens,
    and the second run prefills nothing."""
    from specsample.engine import generate
    from specsample.warpers import SamplingConfig

    p = prompt(9, 25)

    def run() -> tuple[list[int], LlamaCppLM]:
        lm = model(gguf_path, PromptCache(KEY, tmp_path))
        out = generate(
            lm,
            [p],
            generator=torch.Generator().manual_seed(3),
            sampling=SamplingConfig(temperature=temperature),
            max_new_tokens=12,
            eos_token_ids=(),
        )
        return out.tokens[0], lm

    tokens, first = run()
    again, second = run()
    assert again == tokens and len(tokens) == 12
    assert first.num_positions == 25 + 11 and second.num_positions == 11


def test_a_kept_prompt_without_room_to_restore_is_computed_instead(gguf_path, tmp_path, reference):
    """A kept prompt of 30 tokens shares its first 10 with a new 12-token row, but the context
    (256 cells, 230 in use by another row) has no room to restore all 30: llama.cpp refuses
    the state, and the row is prefilled whole, as without a cache."""
    kept = prompt(10, 30)
    model(gguf_path, PromptCache(KEY, tmp_path)).prefill([kept])
    lm = LlamaCppLM(gguf_path, n_ctx=256, max_batch=2, threads=1, **NUMERICS["float32"][0])
    other = prompt(11, 230)
    lm.prefill([other])
    cache = lm.prompt_cache = PromptCache(KEY, tmp_path)
    row = kept[:10] + [3, 4]
    logits = lm.add_rows([row])[0]
    assert (cache.reused, cache.computed) == (0, 12) and lm.num_positions == 230 + 12
    assert lm.cells_used == 242
    assert (logits - reference(row)[-1]).abs().max() < NUMERICS["float32"][1]
    after = lm.extend(torch.tensor([[5], [6]]), torch.tensor([1, 1]))
    assert (after[0, 0] - reference(other + [5])[-1]).abs().max() < NUMERICS["float32"][1]
    assert (after[1, 0] - reference(row + [6])[-1]).abs().max() < NUMERICS["float32"][1]
