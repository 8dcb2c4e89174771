"""`logprobs` with alternatives through HTTP: completions' `logprobs: N` (N most likely tokens per
position in `top_logprobs`, plus the sampled one) and chat's `logprobs: true, top_logprobs: N`,
checked value by value against the ToyLM target's known distribution (its raw log-softmax:
before temperature and truncation, as `token_logprobs`); streaming gives the same; bad values are
a 400 or 422 naming the field."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from toy_server import MODEL_NAME, TARGET, TOKENIZER, ServerThread, served_models

from specsample.serve.app import create_app

EOS = TOKENIZER.eos_token_id


@pytest.fixture(scope="module")
def server():
    with ServerThread(create_app(served_models(max_batch=8))) as running:
        yield running


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, timeout=60)


def raw_log_probs(prefix: list[int]) -> list[float]:
    return torch.log_softmax(TARGET.logits_for(prefix).float(), dim=-1).tolist()


def most_likely(prefix: list[int], n: int) -> list[tuple[int, float]]:
    values = raw_log_probs(prefix)
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return [(i, values[i]) for i in order[:n]]


def text_of(token: int) -> str:
    return TOKENIZER.decode([token], skip_special_tokens=True)


def token_ids(texts: list[str]) -> list[int]:
    """The sampled ids from their texts (one character each; '' is the EOS, last)."""
    assert "" not in texts[:-1], "a token without text mid-completion: pick another seed"
    return [EOS if t == "" else TOKENIZER.convert_tokens_to_ids(t) for t in texts]


def expected_dict(prefix: list[int], n: int, sampled: int, sampled_text: str) -> dict:
    """Completions' top_logprobs entry: the n most likely and the sampled token, by text; texts
    shared by several tokens (here <unk> and <eos>: '') hold their summed probability."""
    listed = [(text_of(t), v) for t, v in most_likely(prefix, n)]
    if sampled not in [t for t, _ in most_likely(prefix, n)]:
        listed.append((sampled_text, raw_log_probs(prefix)[sampled]))
    out: dict[str, float] = {}
    for text, value in listed:
        out[text] = math.log(math.exp(out[text]) + math.exp(value)) if text in out else value
    return out


@pytest.mark.parametrize("n", [0, 1, 5, 20])
def test_completion_top_logprobs_are_the_targets_most_likely_tokens(server, n):
    prompt = "the cat"
    merged = False
    for seed, temperature in ((1, 1.0), (2, 0.6)):
        body = {"prompt": prompt, "max_tokens": 10, "seed": seed, "logprobs": n}
        response = post(server, "/v1/completions", {**body, "temperature": temperature})
        assert response.status_code == 200, response.text
        logprobs = response.json()["choices"][0]["logprobs"]
        ids = token_ids(logprobs["tokens"])
        prompt_ids = TOKENIZER.encode(prompt)
        for i, token in enumerate(ids):
            prefix = prompt_ids + ids[:i]
            expected = expected_dict(prefix, n, token, logprobs["tokens"][i])
            got = logprobs["top_logprobs"][i]
            assert list(got) == list(expected)  # most likely first, the sampled one last
            assert list(got.values()) == pytest.approx(list(expected.values()), abs=1e-5)
            assert logprobs["token_logprobs"][i] == pytest.approx(
                raw_log_probs(prefix)[token], abs=1e-5
            )
            assert len(got) <= n + 1
            merged |= len(got) < n  # <unk> and <eos> among the n: one '' entry
    assert merged == (n == 20)  # (the seeds are fixed: so is which case happens)


def test_chat_top_logprobs_list_each_token_with_its_bytes(server):
    messages = [{"role": "user", "content": "hi"}]
    body = {"messages": messages, "max_tokens": 8, "seed": 4, "logprobs": True, "top_logprobs": 3}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    rendered = TOKENIZER.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = TOKENIZER.encode(rendered, add_special_tokens=False)
    ids = token_ids([entry["token"] for entry in content])
    for i, entry in enumerate(content):
        expected = most_likely(prompt_ids + ids[:i], 3)
        got = entry["top_logprobs"]
        assert [a["token"] for a in got] == [text_of(t) for t, _ in expected]
        assert [a["logprob"] for a in got] == pytest.approx([v for _, v in expected], abs=1e-5)
        assert [a["bytes"] for a in got] == [list(text_of(t).encode()) for t, _ in expected]
    # logprobs without top_logprobs: the sampled tokens only
    plain = post(server, "/v1/chat/completions", {**body, "top_logprobs": None}).json()
    entries = plain["choices"][0]["logprobs"]["content"]
    assert [e["top_logprobs"] for e in entries] == [[] for _ in entries]
    assert [e["logprob"] for e in entries] == [e["logprob"] for e in content]


def test_streamed_logprobs_equal_the_json_ones(server):
    body = {"prompt": "hello", "max_tokens": 12, "seed": 8, "logprobs": 4}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    tokens, tops = [], []
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["logprobs"]:
                    tokens += choice["logprobs"]["tokens"]
                    tops += choice["logprobs"]["top_logprobs"]
    assert tokens == whole["tokens"] and tops == whole["top_logprobs"]


BAD = [
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": "5"}, 422, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": 2.5}, 422, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": "2"}, 422, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, 422, "logprobs"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_logprobs_are_refused_naming_the_field(server, path, body, status, param):
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "a"}], **body}
    response = post(server, path, {**body, "max_tokens": 2})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    if status == 400:
        assert "[0, 20]" in error["message"] or "needs logprobs: true" in error["message"]
