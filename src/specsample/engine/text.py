"""The text side of decoding: prompts through the chat template, stop strings, and incremental
detokenisation for streaming. Works with any tokenizer that has transformers' encode/decode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from specsample.engine.generate import StopCondition


def encode_prompt(tokenizer: Any, text: str, *, chat_template: bool = True) -> list[int]:
    """Token ids of `text`; through the tokenizer's chat template (one user turn, generation
    prompt added) when it has one and `chat_template` is True."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    return list(tokenizer.encode(text))


def eos_token_ids(tokenizer: Any, model_config: Any = None) -> list[int]:
    """The ids that end generation: the tokenizer's EOS and the model's generation EOS ids."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    for source in (getattr(model_config, "eos_token_id", None),):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token_id = (
            tokenizer.convert_tokens_to_ids(name)
            if hasattr(tokenizer, "convert_tokens_to_ids")
            else None
        )
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
            ids.add(token_id)
    return sorted(ids)


def stop_string_condition(tokenizer: Any, stops: Sequence[str]) -> StopCondition | None:
    """A `stop_when` for `generate` that ends a row once its text contains a stop string."""
    if not stops:
        return None
    longest = max(len(s) for s in stops)

    def stop_when(row: int, new_tokens: list[int]) -> bool:
        # Only the tail can hold a stop string that was not there before.
        tail = tokenizer.decode(new_tokens[-(longest + 8) :], skip_special_tokens=False)
        return any(s in tail for s in stops)

    return stop_when


def trim_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the first stop string."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


class TextStream:
    """Turns each row's committed tokens into new pieces of text, one piece per token where the
    tokenizer allows (a token that ends inside a multi-byte character yields '' until complete)."""

    def __init__(self, tokenizer: Any, batch: int):
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.text: list[str] = [""] * batch

    def push(self, row: int, tokens: list[int]) -> list[str]:
        pieces = []
        for token in tokens:
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
                pieces.append("")
                continue
            pieces.append(text[len(self.text[row]) :])
            self.text[row] = text
        return pieces
