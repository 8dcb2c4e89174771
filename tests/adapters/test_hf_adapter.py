"""HFCausalLM must match a fresh, uncached, unpadded forward of each row, whatever the
sequence of ragged prefill / extend / truncate calls (holes, rollback, compaction)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import TINY_CONFIG, check_add_rows_last, tiny_causal_lm  # noqa: E402
from specsample.adapters.hf import HFCausalLM  # noqa: E402
from specsample.adapters.protocol import LanguageModel, PromptScoring  # noqa: E402

VOCAB = TINY_CONFIG["vocab_size"]
ATOL = 1e-4

MODELS = {
    "qwen2-sdpa": lambda: tiny_causal_lm("qwen2", attn="sdpa"),
    "qwen2-eager": lambda: tiny_causal_lm("qwen2", attn="eager"),
    "llama-sdpa": lambda: tiny_causal_lm("llama", attn="sdpa"),
    "llama-eager": lambda: tiny_causal_lm("llama", attn="eager"),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def qwen() -> torch.nn.Module:
    return MODELS["qwen2-sdpa"]()


def reference(model: torch.nn.Module) -> Callable[[list[int]], torch.Tensor]:
    """Logits `[seq, vocab]` of a fresh forward of one unpadded sequence, no cache."""

    @torch.inference_mode()
    def run(seq: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float()

    return run


def random_walk(lm: HFCausalLM, model: torch.nn.Module, seed: int, steps: int = 6) -> None:
    """Drive `lm` through ragged prefill/extend/truncate and check every valid logit."""
    rng = random.Random(seed)
    ref = reference(model)
    seqs = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 7))] for _ in range(3)]
    first = lm.prefill(seqs)
    assert first.shape == (3, VOCAB) and first.dtype == torch.float32
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(first[b], ref(seq)[-1], atol=ATOL, rtol=0)
    for _ in range(steps):
        n = rng.randint(1, 4)
        tokens = torch.tensor([[rng.randrange(VOCAB) for _ in range(n)] for _ in seqs])
        num_valid = torch.tensor([rng.randint(0, n) for _ in seqs])
        logits = lm.extend(tokens, num_valid)
        assert logits.shape == (3, n, VOCAB) and torch.isfinite(logits).all()
        for b, seq in enumerate(seqs):
            k = int(num_valid[b])
            seq += tokens[b, :k].tolist()
            if k:
                torch.testing.assert_close(logits[b, :k], ref(seq)[-k:], atol=ATOL, rtol=0)
        assert lm.lengths.tolist() == [len(s) for s in seqs]
        keep = [max(0, len(s) - rng.randint(0, 3)) for s in seqs]
        if rng.random() < 0.2:
            keep[rng.randrange(3)] = 0  # a row may even be rolled back to nothing
        lm.truncate(torch.tensor(keep))
        seqs = [s[:k] for s, k in zip(seqs, keep, strict=True)]
        assert lm.lengths.tolist() == keep
        if lm.compact_slack is not None:
            assert lm.timeline_length <= max(keep) + lm.compact_slack


@pytest.mark.parametrize(("compact_slack", "seed"), [(None, 0), (0, 1), (3, 2)])
def test_random_walk_matches_fresh_forward(
    model: torch.nn.Module, compact_slack: int | None, seed: int
) -> None:
    random_walk(HFCausalLM(model, compact_slack=compact_slack), model, seed)


def test_is_language_model(qwen: torch.nn.Module) -> None:
    assert isinstance(HFCausalLM(qwen), LanguageModel)


def test_truncate_then_extend_equals_never_extended(qwen: torch.nn.Module) -> None:
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    later = torch.tensor([[11, 12, 13], [14, 15, 16], [17, 18, 19]])
    direct = HFCausalLM(qwen, compact_slack=None)
    direct.prefill(prompts)
    want = direct.extend(later, torch.tensor([3, 2, 1]))

    rolled = HFCausalLM(qwen, compact_slack=None)
    rolled.prefill(prompts)
    rolled.extend(torch.tensor([[20, 21, 22], [23, 24, 25], [26, 27, 28]]), torch.tensor([3, 1, 2]))
    rolled.truncate(torch.tensor([5, 2, 3]))
    got = rolled.extend(later, torch.tensor([3, 2, 1]))
    for b, k in enumerate([3, 2, 1]):
        torch.testing.assert_close(got[b, :k], want[b, :k], atol=1e-5, rtol=0)


def test_rows_are_independent(qwen: torch.nn.Module) -> None:
    alone = HFCausalLM(qwen)
    alone.prefill([[3, 1, 4]])
    want = alone.extend(torch.tensor([[1, 5, 9]]), torch.tensor([3]))

    crowd = HFCausalLM(qwen)
    crowd.prefill([[2, 7, 1, 8, 2, 8, 1, 8], [3, 1, 4], [5]])
    crowd.extend(torch.tensor([[9, 9], [0, 0], [4, 4]]), torch.tensor([2, 0, 1]))
    crowd.truncate(torch.tensor([4, 3, 2]))  # other rows roll back, row 1 is untouched
    got = crowd.extend(torch.tensor([[6, 6, 6], [1, 5, 9], [7, 7, 7]]), torch.tensor([1, 3, 3]))
    torch.testing.assert_close(got[1], want[0], atol=ATOL, rtol=0)


def test_vocab_size_slices_padded_head(qwen: torch.nn.Module) -> None:
    full, sliced = HFCausalLM(qwen), HFCausalLM(qwen, vocab_size=50)
    assert sliced.vocab_size == 50
    a, b = full.prefill([[1, 2]]), sliced.prefill([[1, 2]])
    assert b.shape == (1, 50)
    torch.testing.assert_close(b, a[:, :50])
    assert sliced.extend(torch.tensor([[3, 4]]), torch.tensor([2])).shape == (1, 2, 50)
    with pytest.raises(ValueError, match="vocab_size"):
        HFCausalLM(qwen, vocab_size=VOCAB + 1)


def test_errors_name_argument_expected_and_got(qwen: torch.nn.Module) -> None:
    lm = HFCausalLM(qwen)
    with pytest.raises(RuntimeError, match="prefill"):
        lm.extend(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prompts\[1\].*empty"):
        lm.prefill([[1], []])
    with pytest.raises(ValueError, match=r"prompts\[0\].*\[0, 64\).*\[64\]"):
        lm.prefill([[64]])
    lm.prefill([[1, 2, 3], [4]])
    ok = torch.ones(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"tokens: expected shape \(batch=2, n\), got \(2,\)"):
        lm.extend(torch.zeros(2, dtype=torch.long), ok)
    with pytest.raises(ValueError, match=r"tokens: .*got \(3, 1\)"):
        lm.extend(torch.zeros(3, 1, dtype=torch.long), ok)
    with pytest.raises(TypeError, match="tokens: expected an integer tensor"):
        lm.extend(torch.zeros(2, 1), ok)
    with pytest.raises(ValueError, match=r"num_valid: expected shape \(2,\).*got \(2, 1\)"):
        lm.extend(torch.zeros(2, 1, dtype=torch.long), ok[:, None])
    with pytest.raises(ValueError, match=r"num_valid: expected 0 <= num_valid\[b\] <= n=1"):
        lm.extend(torch.zeros(2, 1, dtype=torch.long), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="num_valid: .*bad rows \\[1\\]"):
        lm.extend(torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"tokens: expected valid token ids in \[0, 64\)"):
        lm.extend(torch.tensor([[0], [99]]), ok)
    with pytest.raises(ValueError, match=r"lengths: .*current length \[3, 1\], got \[3, 2\]"):
        lm.truncate(torch.tensor([3, 2]))
    with pytest.raises(ValueError, match=r"lengths: .*got \[-1, 1\]"):
        lm.truncate(torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\).*got \(3,\)"):
        lm.truncate(torch.tensor([1, 1, 1]))
    # Failed calls leave the state untouched; padding beyond num_valid may be anything.
    assert lm.lengths.tolist() == [3, 1]
    assert lm.timeline_length == 3
    lm.extend(torch.tensor([[5, -7], [123, 456]]), torch.tensor([1, 0]))
    assert lm.lengths.tolist() == [4, 1]


def test_sliding_window_and_flash_rejected() -> None:
    windowed = tiny_causal_lm(
        "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0
    )
    with pytest.raises(ValueError, match="full attention"):
        HFCausalLM(windowed)
    model = tiny_causal_lm("llama")
    model.config._attn_implementation = "flash_attention_2"  # pretend; we only inspect it
    with pytest.raises(ValueError, match="attn_implementation"):
        HFCausalLM(model)


def test_long_prefill_returns_last_logits_only(qwen: torch.nn.Module) -> None:
    # Left-padded prefill uses logits_to_keep=1; check it still picks each row's last token.
    lm, ref = HFCausalLM(qwen), reference(qwen)
    prompts = [list(range(40)), [5, 6]]
    got = lm.prefill(prompts)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(got[b], ref(p)[-1], atol=ATOL, rtol=0)
    assert lm.timeline_length == 40


def test_add_rows_last_scores_the_last_tokens_of_each_prompt(model: torch.nn.Module) -> None:
    """The prompt pass of rows that join scores their last tokens (a request's prompt and its
    first drafts, fed together), next to running rows, and the rows continue exactly."""
    lm, ref = HFCausalLM(model), reference(model)
    assert isinstance(lm, PromptScoring)
    check_add_rows_last(lm, ref, VOCAB, ATOL)
    short = HFCausalLM(model).add_rows_last([[1, 2]], 4)  # every prompt shorter than `last`
    assert short.shape == (1, 4, VOCAB)
    torch.testing.assert_close(short[0, 2:], ref([1, 2]), atol=ATOL, rtol=0)


def test_from_pretrained_roundtrip(qwen: torch.nn.Module, tmp_path: object) -> None:
    qwen.save_pretrained(tmp_path)
    lm = HFCausalLM.from_pretrained(str(tmp_path), torch.float32, "cpu", vocab_size=60)
    want = HFCausalLM(qwen, vocab_size=60).prefill([[1, 2, 3]])
    torch.testing.assert_close(lm.prefill([[1, 2, 3]]), want)
