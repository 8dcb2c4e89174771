"""What a GGUF file says about itself, read without loading its weights: the metadata key/value
section (architecture, tokenizer, chat template) and the tokenizer identity two models must
share for one to draft for the other.

The reader parses only the header and the key/value section (a few MB for a 150k-token
vocabulary), so checking a pair costs well under a second even for multi-GB files. Shared by
the llama.cpp and transformers backends; needs nothing beyond the standard library.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "GGUFTokenizer",
    "check_gguf_file",
    "check_same_gguf_tokenizer",
    "read_gguf_metadata",
    "read_gguf_tokenizer",
]

GGUF_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# GGUF value type -> struct format (little-endian).
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_U64 = struct.Struct("<Q")
_DIGEST_KEYS = ("tokenizer.ggml.merges",)
# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL = 1


class _Truncated(Exception):
    """The metadata section ends before its declared content."""


def check_gguf_file(argument: str, path: str | Path) -> Path:
    """Return `path` as a Path; FileNotFoundError unless it is an existing file, ValueError
    unless it starts with the GGUF magic bytes. `argument` names the option in messages."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"{argument}: expected a GGUF file, got {str(path)!r}, which {what}"
        )
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{argument}: expected a GGUF file (starting with b'GGUF'), got {str(path)!r}, which "
            f"starts with {magic!r}"
        )
    return path


class _Cursor:
    """Sequential little-endian reads from a buffer; raises _Truncated past its end."""

    def __init__(self, data: Any):
        self.data = data
        self.at = 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def string(self) -> bytes:
        n = self.unpack("<Q")
        if self.at + n > len(self.data):
            raise _Truncated
        value = bytes(self.data[self.at : self.at + n])
        self.at += n
        return value

    def _strings(self, count: int, keep: bool) -> list[bytes] | None:
        """`count` strings in a row (token lists: a tight loop, no per-item method calls)."""
        data, at, items = self.data, self.at, []
        unpack = _U64.unpack_from
        try:
            for _ in range(count):
                (n,) = unpack(data, at)
                if keep:
                    items.append(data[at + 8 : at + 8 + n])
                at += 8 + n
        except struct.error:
            raise _Truncated from None
        if at > len(data):
            raise _Truncated
        self.at = at
        return items if keep else None

    def skip_value(self, kind: int) -> None:
        self.value(kind, keep=False)

    def value(self, kind: int, keep: bool = True) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in _SCALARS:  # fixed-size items: one slice
                size = struct.calcsize(_SCALARS[item_kind]) * count
                if self.at + size > len(self.data):
                    raise _Truncated
                start, self.at = self.at, self.at + size
                if not keep:
                    return None
                fmt = f"<{count}{_SCALARS[item_kind][1:]}"
                return list(struct.unpack_from(fmt, self.data, start))
            if item_kind == _STRING:
                return self._strings(count, keep)
            items = [self.value(item_kind, keep) for _ in range(count)]
            return items if keep else None
        raise ValueError(f"unknown GGUF value type {kind}")


def read_gguf_metadata(
    path: str | Path, argument: str = "model", keys: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (strings as bytes, arrays as lists; the BPE merges
    as a hex digest of their raw bytes). With `keys`, only those keys are decoded (others are
    skipped without building Python objects).

    Raises FileNotFoundError / ValueError naming `argument` for a missing file, a file that is
    not GGUF, an unsupported GGUF version or metadata cut short (a truncated download)."""
    path = check_gguf_file(argument, path)
    with open(path, "rb") as file:
        if path.stat().st_size == 0:
            raise ValueError(f"{argument}: expected a GGUF file, got an empty file {str(path)!r}")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _Cursor(data)
            try:
                cursor.unpack("<4s")
                version = cursor.unpack("<I")
                if version not in (2, 3):
                    raise ValueError(
                        f"{argument}: expected GGUF version 2 or 3 (little-endian), got version "
                        f"{version} in {str(path)!r}"
                    )
                cursor.unpack("<Q")  # tensor count
                n_kv = cursor.unpack("<Q")
                out: dict[str, Any] = {}
                for _ in range(n_kv):
                    key = cursor.string().decode("utf-8", errors="replace")
                    kind = cursor.unpack("<I")
                    if key in _DIGEST_KEYS and (keys is None or key in keys):
                        start = cursor.at  # only a digest is needed: hash the raw bytes
                        cursor.skip_value(kind)
                        out[key] = hashlib.sha256(data[start : cursor.at]).hexdigest()
                    elif keys is None or key in keys:
                        out[key] = cursor.value(kind)
                    else:
                        cursor.skip_value(kind)
            except _Truncated:
                raise ValueError(
                    f"{argument}: expected a complete GGUF file, got {str(path)!r}, whose "
                    f"metadata ends after {len(data)} bytes (a truncated or partial download?)"
                ) from None
    return out


@dataclass(frozen=True)
class GGUFTokenizer:
    """The tokenizer a GGUF file declares: its kind (tokenizer.ggml.model, e.g. "gpt2" for
    byte-level BPE), pre-tokenizer, token texts and token types, and a digest of its merges.

    Token ids mean the same thing in two files when their texts (and types) agree; that, not the
    merges, is what drafting needs, since only the target's tokenizer turns text into ids."""

    path: str
    model: str
    pre: str
    tokens: tuple[bytes, ...]
    token_types: tuple[int, ...]
    merges_digest: str
    architecture: str

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)


_TOKENIZER_KEYS = (
    "general.architecture",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)


def read_gguf_tokenizer(path: str | Path, argument: str = "model") -> GGUFTokenizer:
    """The GGUFTokenizer of a file; ValueError naming `argument` if it declares no token list."""
    meta = read_gguf_metadata(path, argument, _TOKENIZER_KEYS)
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(
            f"{argument}: expected a GGUF file with a tokenizer (tokenizer.ggml.tokens), got "
            f"{str(path)!r}, which has none"
        )
    types = tuple(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    return GGUFTokenizer(
        path=str(path),
        model=meta.get("tokenizer.ggml.model", b"").decode(errors="replace"),
        pre=meta.get("tokenizer.ggml.pre", b"").decode(errors="replace"),
        tokens=tuple(tokens),
        token_types=types,
        merges_digest=meta.get("tokenizer.ggml.merges", ""),
        architecture=meta.get("general.architecture", b"").decode(errors="replace"),
    )


def check_same_gguf_tokenizer(target: GGUFTokenizer, draft: GGUFTokenizer) -> None:
    """Raise ValueError (naming `draft`) unless every token id means the same token in both
    files. The longer vocabulary may carry extra ids only if none of them is a normal token
    (padding rows: the decoding loop gives ids a model lacks probability 0)."""
    if target.model != draft.model:
        raise ValueError(
            f"draft: expected a model with the target's tokenizer (kind {target.model!r}), got "
            f"{draft.path!r} with a {draft.model!r} tokenizer"
        )
    shared = min(target.vocab_size, draft.vocab_size)
    differ = [
        i
        for i in range(shared)
        if target.tokens[i] != draft.tokens[i] or target.token_types[i] != draft.token_types[i]
    ]
    longer = target if target.vocab_size > draft.vocab_size else draft
    extra_normal = sum(t == _NORMAL for t in longer.token_types[shared:])
    if differ or extra_normal:
        first = (
            f"; first at id {differ[0]}: {target.tokens[differ[0]]!r} in the target, "
            f"{draft.tokens[differ[0]]!r} in the draft"
            if differ
            else ""
        )
        raise ValueError(
            f"draft: expected a model with the target's tokenizer; {draft.path!r} has "
            f"{draft.vocab_size} tokens and {target.path!r} {target.vocab_size}, with "
            f"{len(differ)} ids that name different tokens{first} and {extra_normal} normal "
            "tokens in only one of them. Speculative sampling needs one vocabulary; pick a draft "
            "of the same family"
        )
