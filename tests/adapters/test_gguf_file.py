"""A user's own .gguf file as --target/--draft, end to end and without a hub: a tiny Qwen2-style
model with a byte-level BPE tokenizer is written with the `gguf` package's GGUFWriter, loaded
through `load_pair` (transformers' GGUF support), and must come back with exactly the written
weights, give the same logits through HFCausalLM as a plain forward, and decode greedily to the
same tokens as target-only decoding when it drafts for itself. Bad paths give errors that name
the argument."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip(
    "accelerate", reason="transformers loads a .gguf file only with accelerate (the dev extra)"
)


# The tiny model's shape and byte-level BPE tokenizer (256 byte symbols, a few merges, three
# control tokens): the same as the llama.cpp backend's tests write.
from tiny_gguf import (  # noqa: E402
    BOS,
    EOS,
    FFN,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    TOKENS,
    VOCAB,
    finish_writer,
    start_writer,
)

from helpers import tiny_config  # noqa: E402
from specsample.adapters.hf import HFCausalLM  # noqa: E402
from specsample.adapters.loading import LoadedPair, load_pair  # noqa: E402
from specsample.cli.main import main  # noqa: E402
from specsample.drafters.model import ModelDrafter  # noqa: E402
from specsample.engine import generate  # noqa: E402
from specsample.warpers import SamplingConfig  # noqa: E402

# transformers name part -> llama.cpp (GGUF) name part, written out here rather than taken from
# either library so that the test checks transformers' mapping instead of reusing it.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def _config() -> transformers.Qwen2Config:
    return tiny_config(
        "qwen2",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )


def _random_weights() -> dict[str, torch.Tensor]:
    """Every parameter random (norms near 1, biases non-zero), matrices rounded to float16 so
    that the F16 tensors of the file hold them exactly."""
    with torch.device("meta"):
        skeleton = transformers.Qwen2ForCausalLM(_config())
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, param in skeleton.state_dict().items():
        values = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.2 * values
        elif param.dim() == 1:
            weights[name] = 0.1 * values
        else:  # std 1 / sqrt(fan_in) keeps activations O(1): clear argmax margins
            weights[name] = (values / param.shape[1] ** 0.5).half().float()
    weights["lm_head.weight"] *= 4  # sharper next-token distributions
    weights["lm_head.weight"] = weights["lm_head.weight"].half().float()
    return weights


def _write_gguf(path: Path, weights: dict[str, torch.Tensor]) -> None:
    writer = start_writer(
        path,
        architecture="qwen2",
        name="tiny-qwen2-test",
        file_type=gguf.LlamaFileType.MOSTLY_F16,
        tokens=TOKENS,
        chat_template=None,
    )
    # F32 vectors and token embeddings, F16 for every other matrix: both dequantize exactly.
    tensors = {}
    for name, tensor in weights.items():
        f32 = tensor.dim() == 1 or name == "model.embed_tokens.weight"
        tensors[_gguf_name(name)] = tensor.numpy().astype("float32" if f32 else "float16")
    finish_writer(writer, tensors)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2-f16.gguf"
    weights = _random_weights()
    _write_gguf(path, weights)
    return path, weights


@pytest.fixture(scope="module")
def pair(written: tuple[Path, dict[str, torch.Tensor]]) -> LoadedPair:
    path, _ = written
    return load_pair(str(path), str(path), dtype=torch.float32, backend="transformers")


@pytest.fixture(scope="module")
def reference(written: tuple[Path, dict[str, torch.Tensor]]) -> torch.nn.Module:
    """The written weights in a model built without the GGUF file."""
    _, weights = written
    model = transformers.Qwen2ForCausalLM._from_config(
        _config(), attn_implementation="sdpa", dtype=torch.float32
    )
    model.load_state_dict(weights, strict=True)
    return model.eval()


def test_file_is_a_gguf_with_f16_and_f32_tensors(written):
    path, weights = written
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert len(types) == len(weights)
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["output.weight"] == gguf.GGMLQuantizationType.F16
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.attn_k.bias"] == gguf.GGMLQuantizationType.F32


def test_loads_exactly_the_written_weights(pair, written):
    _, weights = written
    assert pair.draft is not None
    assert "tiny-qwen2-f16.gguf" in pair.description
    for lm in (pair.target, pair.draft):
        loaded = lm.model.state_dict()
        assert set(loaded) == set(weights)
        for name, tensor in weights.items():
            assert loaded[name].dtype == torch.float32, name
            assert torch.equal(loaded[name], tensor), name
    assert pair.target.model is not pair.draft.model


def test_config_comes_from_the_file(pair):
    config = pair.target_config
    assert config.model_type == "qwen2"
    assert (config.hidden_size, config.intermediate_size) == (HIDDEN, FFN)
    assert (config.num_hidden_layers, config.num_attention_heads) == (LAYERS, HEADS)
    assert config.num_key_value_heads == KV_HEADS
    assert config.vocab_size == VOCAB and pair.target.vocab_size == VOCAB
    assert config.tie_word_embeddings is False
    assert config.rms_norm_eps == pytest.approx(1e-6)


def test_tokenizer_comes_from_the_file(pair):
    tok = pair.tokenizer
    assert len(tok) == VOCAB
    assert tok.get_vocab() == {token: i for i, token in enumerate(TOKENS)}
    assert tok.eos_token_id == EOS and tok.bos_token_id == BOS
    hello, world = TOKENS.index("hello"), TOKENS.index("Ġworld")
    assert tok("hello world")["input_ids"] == [hello, world]
    ids = tok("hello<|im_end|>")["input_ids"]
    assert ids == [hello, EOS]  # a control token stays whole
    text = "héllo, wörld 42!"
    assert tok.decode(tok(text)["input_ids"]) == text  # bytes round-trip


def test_adapter_logits_equal_a_plain_forward(pair, reference):
    prompts = [[5, 70, 259, 264, 33, 101, 7], [264, 9], [100, 200, 3, 45, 46]]
    lm = pair.target
    first = lm.prefill(prompts)  # ragged: left padding, 4-D masks with holes
    extra = torch.tensor([[11, 12, 13], [14, 0, 0], [15, 16, 0]])
    num_valid = torch.tensor([3, 1, 2])
    more = lm.extend(extra, num_valid)
    for b, row in enumerate(prompts):
        full = row + extra[b, : num_valid[b]].tolist()
        with torch.no_grad():
            plain = lm.model(torch.tensor([full])).logits[0]
            independent = reference(torch.tensor([full])).logits[0]
        torch.testing.assert_close(independent, plain, rtol=0, atol=1e-5)
        torch.testing.assert_close(first[b], plain[len(row) - 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(more[b, : num_valid[b]], plain[len(row) :], rtol=0, atol=1e-5)


def test_greedy_speculative_decoding_equals_target_only(pair, reference):
    prompts = [[259, 264], [5, 70, 101, 33, 7, 8, 9], [104]]
    greedy = SamplingConfig(temperature=0)
    n = 24

    def run(drafter):
        return generate(
            pair.target,
            prompts,
            generator=torch.Generator().manual_seed(0),
            drafter=drafter,
            sampling=greedy,
            max_new_tokens=n,
            draft_length=4,
        )

    alone = run(None)
    assert [len(t) for t in alone.tokens] == [n] * len(prompts)
    # target-only greedy = argmax of plain forwards of the written weights, token by token
    for row, new in zip(prompts, alone.tokens, strict=True):
        seq = list(row)
        for _ in range(n):
            with torch.no_grad():
                seq.append(int(reference(torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(row) :] == new

    drafted = run(ModelDrafter(pair.draft))  # the same file as draft
    assert drafted.tokens == alone.tokens
    stats = drafted.stats
    assert stats.drafted > 0
    assert stats.accepted == stats.drafted  # a draft identical to the target is never rejected
    assert stats.target_passes < alone.stats.target_passes


def test_cli_generates_with_gguf_target_and_draft(written, capsys):
    path, _ = written
    common = [
        "generate",
        "hello world",
        "--target",
        str(path),
        "--temperature",
        "0",
        "--no-chat-template",
        "--backend",
        "transformers",
    ]
    common += ["--max-new-tokens", "12", "--json"]
    assert main([*common, "--draft", str(path), "--drafter", "model", "--k", "3"]) == 0
    speculative = capsys.readouterr().out
    assert main([*common, "--drafter", "none"]) == 0
    alone = capsys.readouterr().out
    spec_json, alone_json = json.loads(speculative), json.loads(alone)
    assert spec_json["texts"] == alone_json["texts"]
    assert spec_json["stats"]["draft_passes"] > 0


@pytest.mark.parametrize("which", ["target", "draft"])
def test_not_a_gguf_file_names_the_argument(written, tmp_path, which):
    good, _ = written
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    args = (str(bad), None) if which == "target" else (str(good), str(bad))
    with pytest.raises(ValueError, match=rf"^{which}: expected a GGUF file") as info:
        load_pair(*args)
    assert str(bad) in str(info.value) and "b'PK\\x03\\x04'" in str(info.value)


@pytest.mark.parametrize("which", ["target", "draft"])
def test_missing_gguf_file_names_the_argument(written, tmp_path, which):
    good, _ = written
    missing = tmp_path / "absent" / "model.gguf"
    args = (str(missing), None) if which == "target" else (str(good), str(missing))
    with pytest.raises(FileNotFoundError, match=rf"^{which}: expected a GGUF file") as info:
        load_pair(*args)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_cli_reports_a_bad_gguf_path(tmp_path, capsys):
    missing = tmp_path / "model.gguf"
    assert main(["generate", "hi", "--target", str(missing), "--drafter", "none"]) == 1
    err = capsys.readouterr().err
    assert f"target: expected a GGUF file, got '{missing}', which does not exist" in err


def test_hf_adapter_from_pretrained_takes_a_gguf_file(written):
    path, weights = written
    lm = HFCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    assert torch.equal(lm.model.state_dict()["lm_head.weight"], weights["lm_head.weight"])
