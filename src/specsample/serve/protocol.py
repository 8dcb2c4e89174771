"""OpenAI request bodies -> what the Engine needs, checked field by field.

Shared by the server and `specsample batch` (a batch row is a request body). A bad field raises
`RequestError` with the HTTP status it deserves: 422 when a field has the wrong type or a
required one is missing, 400 when its value is out of range or the prompt does not fit the
context, 404 for a model this server does not serve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from specsample.rules.registry import EXACT
from specsample.warpers import SamplingConfig

COMPLETIONS, CHAT = "completions", "chat"
# Fields that change the distribution in ways the Engine does not implement: refused when set.
UNSUPPORTED_NONZERO = ("presence_penalty", "frequency_penalty")
UNSUPPORTED_SET = ("logit_bias", "best_of", "suffix", "tools", "functions", "response_format")
# The most alternatives per token (vLLM's default max_logprobs; OpenAI allows 5 for completions
# and 20 for chat).
MAX_TOP_LOGPROBS = 20


class RequestError(Exception):
    """A bad request: `status` (400, 404 or 422), the offending `param`, and OpenAI's error type
    and code."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class GenerationRequest:
    """One request body, parsed: the prompts (token ids; one per prompt of a completions batch)
    and everything the Engine and the response need. Choice i*n + j is prompt i, sample j, seeded
    `seed + j` when a seed is given."""

    kind: str
    prompts: list[list[int]]
    sampling: SamplingConfig
    max_tokens: int
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token with logprobs (the target's most likely)
    echo: bool = False
    rule: str | None = None  # the request's exact rule; None: the server's

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def choice_prompt(self, index: int) -> list[int]:
        return self.prompts[index // self.n]

    def choice_seed(self, index: int) -> int | None:
        return None if self.seed is None else (self.seed + index % self.n) % 2**64


@dataclass(frozen=True)
class ServedModel:
    """What the parser needs to know of the served model."""

    name: str
    tokenizer: Any
    context_length: int
    vocab_size: int
    default_max_tokens: int = 256
    max_choices: int = 64  # n times the number of prompts, at most


def parse_request(body: Any, kind: str, model: ServedModel) -> GenerationRequest:
    """Parses an OpenAI /v1/completions (kind "completions") or /v1/chat/completions ("chat")
    body. Raises RequestError."""
    if not isinstance(body, dict):
        raise RequestError(
            422, f"request body: expected a JSON object, got {_json_type(body)}", None
        )
    name = body.get("model")
    if name is not None:
        _expect_type(name, str, "model", "a string")
        if name != model.name:
            raise RequestError(
                404,
                f"model: this server serves {model.name!r}, got {name!r} (see GET /v1/models)",
                "model",
                "model_not_found",
            )
    for key in UNSUPPORTED_NONZERO:
        if body.get(key) not in (None, 0, 0.0):
            raise RequestError(
                400, f"{key}: not supported (it would change the target's distribution)", key
            )
    for key in UNSUPPORTED_SET:
        if body.get(key) is not None:
            raise RequestError(400, f"{key}: not supported by this server", key)
    if kind == CHAT:
        prompts = [_chat_prompt(body.get("messages"), model)]
        logprobs, top_logprobs = _chat_logprobs(body)
        echo = False
    else:
        prompts = _completion_prompts(body.get("prompt"), model)
        logprobs, top_logprobs = _completion_logprobs(body.get("logprobs"))
        echo = _optional(body, "echo", bool, "a boolean", False)
    n = _optional(body, "n", int, "an integer", 1)
    if n < 1:
        raise RequestError(400, f"n: expected an integer >= 1, got {n}", "n")
    if n * len(prompts) > model.max_choices:
        raise RequestError(
            400,
            f"n: expected at most {model.max_choices} choices per request (n times the number "
            f"of prompts), got {n * len(prompts)}",
            "n",
        )
    max_tokens = _max_tokens(body, kind, prompts, model)
    stream = _optional(body, "stream", bool, "a boolean", False)
    options = _optional(body, "stream_options", dict, "an object", {}) or {}
    include_usage = options.get("include_usage", False)
    _expect_type(include_usage, bool, "stream_options.include_usage", "a boolean")
    seed = _optional(body, "seed", int, "an integer", None)
    rule = _optional(body, "rule", str, "a string", None)
    if rule is not None and rule not in EXACT:
        raise RequestError(
            400,
            f"rule: expected one of {sorted(EXACT)} (the exact verification rules; a lossy "
            f"rule is never taken per request), got {rule!r}",
            "rule",
        )
    return GenerationRequest(
        kind=kind,
        prompts=prompts,
        sampling=_sampling(body),
        max_tokens=max_tokens,
        n=n,
        stop=_stop(body.get("stop")),
        seed=None if seed is None else seed % 2**64,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        echo=echo,
        rule=rule,
    )


def _sampling(body: dict) -> SamplingConfig:
    temperature = _optional(body, "temperature", float, "a number", 1.0)
    top_p = _optional(body, "top_p", float, "a number", 1.0)
    top_k = _optional(body, "top_k", int, "an integer", 0)
    min_p = _optional(body, "min_p", float, "a number", 0.0)
    if not math.isfinite(temperature) or temperature < 0:
        raise RequestError(
            400,
            f"temperature: expected a number >= 0 (0 = greedy), got {temperature}",
            "temperature",
        )
    if not 0 < top_p <= 1:
        raise RequestError(400, f"top_p: expected a number in (0, 1], got {top_p}", "top_p")
    if top_k == -1:  # vLLM's spelling of "off"
        top_k = 0
    if top_k < 0:
        raise RequestError(
            400, f"top_k: expected an integer >= 0 (0 or -1 = off), got {top_k}", "top_k"
        )
    if not 0 <= min_p < 1:
        raise RequestError(400, f"min_p: expected a number in [0, 1), got {min_p}", "min_p")
    return SamplingConfig(float(temperature), top_k, float(top_p), float(min_p))


def _max_tokens(body: dict, kind: str, prompts: list[list[int]], model: ServedModel) -> int:
    key = "max_tokens"
    if kind == CHAT and body.get("max_tokens") is None and body.get("max_completion_tokens"):
        key = "max_completion_tokens"
    longest = max(len(p) for p in prompts)
    room = model.context_length - longest
    if room < 1:
        raise RequestError(
            400,
            f"prompt: the model's context is {model.context_length} tokens and the prompt has "
            f"{longest}: no room for a completion; shorten the prompt",
            "messages" if kind == CHAT else "prompt",
            "context_length_exceeded",
        )
    value = _optional(body, key, int, "an integer", None)
    if value is None:
        return min(model.default_max_tokens, room)
    if value < 1:
        raise RequestError(400, f"{key}: expected an integer >= 1, got {value}", key)
    if value > room:
        raise RequestError(
            400,
            f"{key}: the model's context is {model.context_length} tokens; the prompt has "
            f"{longest} and {value} were asked for, {longest + value} in all; ask for at most "
            f"{room}",
            key,
            "context_length_exceeded",
        )
    return value


def _completion_prompts(prompt: Any, model: ServedModel) -> list[list[int]]:
    """prompt: a string, a list of strings, a list of token ids or a list of such lists."""
    if prompt is None:
        raise RequestError(422, "prompt: required for /v1/completions", "prompt")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise RequestError(
            422,
            f"prompt: expected a string, a list of strings or a list of token ids, got "
            f"{_json_type(prompt)}",
            "prompt",
        )
    prompts = []
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            tokens = list(model.tokenizer.encode(item))
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            tokens = [int(t) for t in item]
            bad = [t for t in tokens if not 0 <= t < model.vocab_size]
            if bad:
                raise RequestError(
                    400,
                    f"{where}: expected token ids in [0, {model.vocab_size}), got {bad[0]}",
                    "prompt",
                )
        else:
            raise RequestError(
                422,
                f"{where}: expected a string or a list of token ids, got {_json_type(item)}",
                "prompt",
            )
        if not tokens:
            raise RequestError(400, f"{where}: expected a non-empty prompt, got none", "prompt")
        prompts.append(tokens)
    return prompts


def _chat_prompt(messages: Any, model: ServedModel) -> list[int]:
    if messages is None:
        raise RequestError(422, "messages: required for /v1/chat/completions", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            422, f"messages: expected a non-empty list, got {_json_type(messages)}", "messages"
        )
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(
                422, f"messages[{i}]: expected an object with a string 'role'", "messages"
            )
        turns.append({"role": message["role"], "content": _message_text(message, i)})
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(
            400, f"messages: model {model.name!r} has no chat template; use /v1/completions"
        )
    rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    tokens = list(tokenizer.encode(rendered, add_special_tokens=False))
    if not tokens:
        raise RequestError(400, "messages: the chat template produced an empty prompt", "messages")
    return tokens


def _message_text(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RequestError(
                    400, f"messages[{i}].content: only text parts are supported", "messages"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise RequestError(
        422,
        f"messages[{i}].content: expected a string or a list of text parts, got "
        f"{_json_type(content)}",
        "messages",
    )


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(
            422, f"stop: expected a string or a list of strings, got {_json_type(stop)}", "stop"
        )
    if any(not s for s in stops):
        raise RequestError(400, "stop: expected non-empty strings, got ''", "stop")
    return stops


def _completion_logprobs(value: Any) -> tuple[bool, int]:
    """logprobs: null/false (none), true (the sampled token's only) or N in 0..20: the sampled
    token's and the N most likely tokens' at each position."""
    if value is None or value is False:
        return False, 0
    if value is True:
        return True, 0
    if not _is_int(value):
        raise RequestError(
            422, f"logprobs: expected an integer or null, got {_json_type(value)}", "logprobs"
        )
    _check_top(value, "logprobs")
    return True, value


def _chat_logprobs(body: dict) -> tuple[bool, int]:
    wanted = _optional(body, "logprobs", bool, "a boolean", False)
    top = _optional(body, "top_logprobs", int, "an integer", None)
    if top is None:
        return wanted, 0
    _check_top(top, "top_logprobs")
    if top and not wanted:
        raise RequestError(
            400,
            f"top_logprobs: needs logprobs: true, got top_logprobs {top} without it",
            "top_logprobs",
        )
    return wanted, top


def _check_top(value: int, param: str) -> None:
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise RequestError(
            400,
            f"{param}: expected an integer in [0, {MAX_TOP_LOGPROBS}] (the most likely tokens "
            f"reported per position), got {value}",
            param,
        )


def _optional(body: dict, key: str, kind: type, expected: str, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if kind is float and _is_int(value):
        return float(value)
    _expect_type(value, kind, key, expected)
    return value


def _expect_type(value: Any, kind: type, key: str, expected: str) -> None:
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        raise RequestError(422, f"{key}: expected {expected}, got {_json_type(value)}", key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    for kind, name in names.items():
        if isinstance(value, kind):
            return f"{name} ({_short(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def finish_reason(engine_reason: str | None, stopped_by_text: bool) -> str:
    """OpenAI's finish_reason for an Engine's: eos and stop strings -> "stop", the limit ->
    "length"; an abort (shutdown) stays "abort"."""
    if stopped_by_text or engine_reason in ("eos", "stop"):
        return "stop"
    return engine_reason or "stop"
