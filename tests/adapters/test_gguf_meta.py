"""GGUF metadata without llama.cpp: the reader, the tokenizer identity check between a target and
a draft file, and the choice of backend. Tiny files written in-process (tiny_gguf.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf", reason="the tiny test models are written with the gguf package")

from tiny_gguf import CHAT_TEMPLATE, EOS, TOKENS, VOCAB, write_tiny_gguf  # noqa: E402

from specsample.adapters import llamacpp  # noqa: E402
from specsample.adapters.gguf_meta import (  # noqa: E402
    check_gguf_file,
    check_same_gguf_tokenizer,
    read_gguf_metadata,
    read_gguf_tokenizer,
)
from specsample.adapters.loading import resolve_backend  # noqa: E402


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("meta") / "tiny.gguf")


def test_reader_returns_what_the_writer_wrote(gguf_path):
    meta = read_gguf_metadata(gguf_path)
    assert meta["general.architecture"] == b"qwen2"
    assert meta["qwen2.block_count"] == 2
    assert meta["tokenizer.ggml.eos_token_id"] == EOS
    assert meta["tokenizer.chat_template"].decode() == CHAT_TEMPLATE
    assert [t.decode() for t in meta["tokenizer.ggml.tokens"]] == TOKENS
    tok = read_gguf_tokenizer(gguf_path)
    assert (tok.model, tok.pre, tok.architecture, tok.vocab_size) == (
        "gpt2",
        "qwen2",
        "qwen2",
        VOCAB,
    )
    assert tok.token_types[-1] == 3 and tok.token_types[0] == 1  # control, normal
    only = read_gguf_metadata(gguf_path, keys=("general.architecture",))
    assert only == {"general.architecture": b"qwen2"}


def test_same_tokenizer_with_other_weights_passes(gguf_path, tmp_path):
    other = write_tiny_gguf(tmp_path / "other-weights.gguf", seed=7)
    check_same_gguf_tokenizer(read_gguf_tokenizer(gguf_path), read_gguf_tokenizer(other))


def test_tokenizer_mismatch_names_the_draft_and_the_first_differing_id(gguf_path, tmp_path):
    swapped = list(TOKENS)
    swapped[100], swapped[101] = swapped[101], swapped[100]
    other = write_tiny_gguf(tmp_path / "swapped.gguf", tokens=swapped)
    with pytest.raises(
        ValueError,
        match=r"^draft: expected a model with the target's tokenizer; .* 2 ids that name "
        r"different tokens; first at id 100",
    ):
        check_same_gguf_tokenizer(read_gguf_tokenizer(gguf_path), read_gguf_tokenizer(other))


def test_truncated_metadata_and_non_gguf_files_are_refused(gguf_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_path.read_bytes()[:2000])  # inside the token list
    with pytest.raises(ValueError, match=r"^target: expected a complete GGUF file, got .*cut.gguf"):
        read_gguf_tokenizer(cut, "target")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=r"^draft: expected a GGUF file \(starting with b'GGUF'\)"):
        read_gguf_metadata(text, "draft")
    with pytest.raises(FileNotFoundError, match=r"^target: expected a GGUF file, .*is a folder"):
        check_gguf_file("target", tmp_path)


def test_auto_backend_is_llamacpp_for_gguf_files_on_the_cpu(monkeypatch):
    monkeypatch.setattr(llamacpp, "is_available", lambda: True)
    assert resolve_backend("auto", None, None, "cpu") == "llama.cpp"  # the default pair
    assert resolve_backend("auto", "t.gguf", "d.gguf", "cpu") == "llama.cpp"
    assert resolve_backend("auto", "t.gguf", None, "cuda") == "transformers"
    assert resolve_backend("auto", "Qwen/Qwen2.5-0.5B", None, "cpu") == "transformers"
    assert resolve_backend("auto", "t.gguf", "some/folder", "cpu") == "transformers"
    assert resolve_backend("auto", None, None, "cpu", draft_quantize="int8") == "transformers"
    monkeypatch.setattr(llamacpp, "is_available", lambda: False)
    assert resolve_backend("auto", "t.gguf", None, "cpu") == "transformers"


def test_explicit_backend_that_cannot_run_the_models_is_refused():
    with pytest.raises(ValueError, match=r"^backend: llama.cpp runs .gguf files only, got 'a/b'"):
        resolve_backend("llama.cpp", "t.gguf", "a/b", "cpu")
    with pytest.raises(ValueError, match=r"^backend: expected device 'cpu' with llama.cpp"):
        resolve_backend("llama.cpp", None, None, "cuda")
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        resolve_backend("vllm", None, None, "cpu")
    assert resolve_backend("transformers", None, None, "cpu") == "transformers"
