"""Tiny GGUF models written in-process for the llama.cpp backend's tests: a 2-layer Qwen2-style
model with a byte-level BPE tokenizer (the 256 byte symbols, a few merges, three control
tokens) and a ChatML chat template, every tensor float32 and random. Needs only numpy and the
`gguf` package (no transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LAYERS, HIDDEN, FFN, HEADS, KV_HEADS = 2, 64, 128, 4, 2
HEAD_DIM = HIDDEN // HEADS
MERGES = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NORMAL, CONTROL = 1, 3  # llama.cpp token types


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (byte-level BPE's base alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


TOKENS = byte_symbols() + ["".join(m) for m in MERGES] + SPECIALS
VOCAB = len(TOKENS)
BOS, EOS = TOKENS.index("<|endoftext|>"), TOKENS.index("<|im_end|>")


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array (PyTorch layout: [out, in]); norms near 1, biases
    non-zero, matrices scaled to keep activations O(1), a sharp output head."""
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def vector(n: int, base: float, scale: float) -> np.ndarray:
        return (base + scale * rng.standard_normal(n)).astype(np.float32)

    weights = {
        "token_embd.weight": matrix(VOCAB, HIDDEN, np.sqrt(HIDDEN)),
        "output_norm.weight": vector(HIDDEN, 1.0, 0.2),
        "output.weight": matrix(VOCAB, HIDDEN, 4.0),
    }
    for i in range(LAYERS):
        weights |= {
            f"blk.{i}.attn_norm.weight": vector(HIDDEN, 1.0, 0.2),
            f"blk.{i}.attn_q.weight": matrix(HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_q.bias": vector(HEADS * HEAD_DIM, 0.0, 0.1),
            f"blk.{i}.attn_k.weight": matrix(KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_k.bias": vector(KV_HEADS * HEAD_DIM, 0.0, 0.1),
            f"blk.{i}.attn_v.weight": matrix(KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v.bias": vector(KV_HEADS * HEAD_DIM, 0.0, 0.1),
            f"blk.{i}.attn_output.weight": matrix(HIDDEN, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_norm.weight": vector(HIDDEN, 1.0, 0.2),
            f"blk.{i}.ffn_gate.weight": matrix(FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": matrix(FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": matrix(HIDDEN, FFN),
        }
    return weights


def write_tiny_gguf(
    path: Path,
    *,
    seed: int = 0,
    architecture: str = "qwen2",
    tokens: list[str] | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    mix: tuple[int, float] | None = None,
) -> Path:
    """Write the tiny model to `path` and return it. `architecture` (only the name changes),
    `tokens` (same length as TOKENS) and `chat_template` vary the file for error tests.
    mix=(other_seed, t): every weight moved a fraction t towards the model of other_seed (a
    similar model, e.g. a draft for the model of `seed`)."""
    import gguf

    writer = start_writer(
        path,
        architecture=architecture,
        name="tiny-qwen2-llamacpp-test",
        file_type=gguf.LlamaFileType.ALL_F32,
        tokens=TOKENS if tokens is None else tokens,
        chat_template=chat_template,
    )
    weights = random_weights(seed)
    if mix is not None:
        other, t = random_weights(mix[0]), mix[1]
        weights = {
            name: ((1 - t) * w + t * other[name]).astype(np.float32) for name, w in weights.items()
        }
    finish_writer(writer, weights)
    return path


def start_writer(
    path: Path,
    *,
    architecture: str,
    name: str,
    file_type,
    tokens: list[str],
    chat_template: str | None,
):
    """A GGUFWriter for `path` with the tiny model's metadata written: its shape, the byte-level
    BPE tokenizer over `tokens` (its last len(SPECIALS) are control tokens), BOS/EOS/pad, and
    `chat_template` unless None. The caller adds the tensors (finish_writer)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([NORMAL] * (len(tokens) - len(SPECIALS)) + [CONTROL] * len(SPECIALS))
    writer.add_token_merges([" ".join(m) for m in MERGES])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_pad_token_id(BOS)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return writer


def finish_writer(writer, tensors: dict[str, np.ndarray]) -> None:
    """Adds the tensors (GGUF name -> array, stored in its own dtype) and writes the file."""
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
