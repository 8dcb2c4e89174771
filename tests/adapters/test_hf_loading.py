"""The transformers loading helpers (adapters/hf_loading.py) on a tiny GGUF file written in-process
(the writer of test_gguf_file.py): the conversion into a plain checkpoint keeps exactly the written
weights and the file's tokenizer, and a model lacking tensors is reported, not written."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("safetensors")

from test_gguf_file import _random_weights, _write_gguf  # noqa: E402

from specsample.adapters.hf_loading import (  # noqa: E402
    gguf_to_checkpoint,
    load_causal_lm,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_loading")
    path = folder / "tiny.gguf"
    weights = _random_weights()
    _write_gguf(path, weights)
    out = folder / "checkpoint"
    out.mkdir()
    missing = gguf_to_checkpoint(path, torch.float32, out)
    return path, weights, out, missing


def test_conversion_keeps_exactly_the_written_weights(converted):
    _, weights, out, missing = converted
    assert missing == []
    model = load_causal_lm(out, torch.float32, "cpu")
    assert not model.training
    state = model.state_dict()
    assert sorted(weights) == sorted(k for k in state if k in weights)
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name


def test_converted_tokenizer_equals_the_files_own(converted):
    path, _, out, _ = converted
    saved = load_tokenizer(str(out))
    direct = load_tokenizer(str(path.parent), path.name)
    assert saved.get_vocab() == direct.get_vocab()
    text = "hello world"
    assert saved.encode(text) == direct.encode(text)


def test_a_file_without_some_tensors_is_reported_and_nothing_is_written(tmp_path):
    weights = _random_weights()
    del weights["model.norm.weight"]
    path = tmp_path / "incomplete.gguf"
    _write_gguf(path, weights)
    out = tmp_path / "checkpoint"
    out.mkdir()
    assert gguf_to_checkpoint(path, torch.float32, out) == ["model.norm.weight"]
    assert list(out.iterdir()) == []
