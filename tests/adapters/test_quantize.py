"""The int8 draft: a cheaper draft model that keeps decoding exact (drafts are verified against
the quantised draft's own probabilities)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import TINY_CONFIG, tiny_causal_lm  # noqa: E402
from specsample.adapters.hf import HFCausalLM  # noqa: E402
from specsample.adapters.quantize import quantize_draft  # noqa: E402
from specsample.drafters.model import ModelDrafter  # noqa: E402
from specsample.engine import generate  # noqa: E402
from specsample.warpers import RowSampling, SamplingConfig  # noqa: E402

VOCAB = TINY_CONFIG["vocab_size"]


def tiny(seed: int) -> torch.nn.Module:
    return tiny_causal_lm(seed=seed)


def test_int8_draft_replaces_linear_layers_and_stays_close():
    model = tiny(0)
    reference = tiny(0)
    quantized = quantize_draft(model, "int8")
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        a = torch.softmax(reference(input_ids=ids).logits, dim=-1)
        b = torch.softmax(quantized(input_ids=ids).logits, dim=-1)
    assert float((a - b).abs().max()) < 0.05  # a close but different model
    lm = HFCausalLM(quantized)
    assert lm.vocab_size == VOCAB


def test_greedy_decoding_with_an_int8_draft_is_identical_to_target_only():
    target = HFCausalLM(tiny(0))
    draft = HFCausalLM(quantize_draft(tiny(0), "int8"))  # same weights, int8: high acceptance
    prompts = [[1, 2, 3], [7, 8]]
    greedy = SamplingConfig(temperature=0)
    plain = generate(
        target, prompts, generator=torch.Generator(), sampling=greedy, max_new_tokens=16
    )
    fast = generate(
        target,
        prompts,
        generator=torch.Generator(),
        sampling=greedy,
        drafter=ModelDrafter(draft),
        max_new_tokens=16,
        draft_length=4,
    )
    assert fast.tokens == plain.tokens
    assert fast.stats.accepted > 0


def test_drafter_reports_the_int8_models_own_probabilities():
    """Dynamic quantisation scales activations per call, so the int8 draft's q after a prefix
    depends slightly on what else was in the pass (here: a prefill vs. a fresh forward). That
    keeps decoding exact, because the drafter reports the q it sampled from in that very pass;
    the check is that it is the int8 model's distribution (to 1e-3), not the float one's."""
    draft = HFCausalLM(quantize_draft(tiny(1), "int8"))
    drafter = ModelDrafter(draft)
    drafter.start([[1, 2, 3]])
    sampling = SamplingConfig(temperature=1.0)
    rows = RowSampling.shared(sampling, torch.Generator(), 1)
    proposal = drafter.propose([[1, 2, 3]], torch.tensor([1]), rows)
    with torch.inference_mode():
        logits = draft.model(input_ids=torch.tensor([[1, 2, 3]])).logits[0, -1]
    torch.testing.assert_close(proposal.probs[0, 0], torch.softmax(logits, -1), atol=1e-3, rtol=0)


def test_bad_quantize_arguments_name_the_argument():
    with pytest.raises(ValueError, match="draft_quantize: expected one of"):
        quantize_draft(tiny(0), "int4")
    with pytest.raises(ValueError, match="draft_quantize: int8 needs a float32 draft"):
        quantize_draft(tiny(0).to(torch.bfloat16), "int8")
    assert quantize_draft(tiny(0), "none") is not None


def test_auto_draft_quantization_is_int8_only_for_a_float32_cpu_draft():
    """The command line's default: int8 where it applies (transformers, float32, CPU)."""
    from specsample.adapters.loading import resolve_draft_quantize

    assert resolve_draft_quantize("auto", "cpu", torch.float32) == "int8"
    assert resolve_draft_quantize("auto", "cpu", torch.bfloat16) == "none"
    assert resolve_draft_quantize("auto", "cuda", torch.float32) == "none"
    assert resolve_draft_quantize("none", "cpu", torch.float32) == "none"
    assert resolve_draft_quantize("int8", "cpu", torch.float32) == "int8"


def test_cached_quantised_draft_is_written_once_and_gives_the_same_logits(tmp_path):
    from specsample.adapters.quantize import quantize_draft_cached

    cache = tmp_path / "draft-int8.pt"
    first = quantize_draft_cached(tiny(3), "int8", cache)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    again = quantize_draft_cached(tiny(4), "int8", cache)  # other weights: the cache wins
    assert cache.stat().st_mtime_ns == stamp
    tokens = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(again(input_ids=tokens).logits, first(input_ids=tokens).logits)
    cache.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="ignoring the cached quantised draft"):
        redone = quantize_draft_cached(tiny(3), "int8", cache)
    with torch.inference_mode():
        torch.testing.assert_close(redone(input_ids=tokens).logits, first(input_ids=tokens).logits)
