"""The per-request `rule` field of /v1/completions, /v1/chat/completions and batch rows: an
exact rule (auto, token, block, coupled) for that request alone; "coupled" gives the target-only
text of the seed whatever the server's drafter and rule and whatever else is in the batch; a
lossy or unknown rule is a 400 naming the field."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from toy_server import MODEL_NAME, TARGET, TOKENIZER, ServerThread, served_models

from specsample import Engine, SamplingConfig
from specsample.serve.app import create_app
from specsample.serve.batch import run_batch

EOS = (TOKENIZER.eos_token_id,)
MAX_TOKENS = 20


def target_only_text(prompt_tokens: list[int], seed: int, temperature: float) -> str:
    """Target-only decoding under the coupled rule: the text every coupled request of this seed
    must give."""
    engine = Engine(TARGET, None, rule="coupled")
    engine.add_request(
        prompt_tokens,
        sampling=SamplingConfig(temperature=temperature),
        seed=seed,
        max_new_tokens=MAX_TOKENS,
        eos_token_ids=EOS,
    )
    tokens: list[int] = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens += output.tokens
    return TOKENIZER.decode(tokens, skip_special_tokens=True)


def chat_tokens(content: str) -> list[int]:
    rendered = TOKENIZER.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return TOKENIZER.encode(rendered, add_special_tokens=False)


@pytest.fixture(scope="module")
def server():
    # the server's own rule is "auto" (block verification) with a noisy draft, k = 3
    with ServerThread(create_app(served_models(max_batch=16))) as running:
        yield running


def completion(url: str, **fields) -> httpx.Response:
    body = {"model": MODEL_NAME, "max_tokens": MAX_TOKENS, **fields}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def test_coupled_completion_and_chat_equal_target_only_text(server):
    for seed, temperature in ((1, 1.0), (2, 0.7), (3, 1.3)):
        response = completion(
            server.url, prompt="the cat", seed=seed, temperature=temperature, rule="coupled"
        )
        body = response.json()
        assert body["choices"][0]["text"] == target_only_text(
            TOKENIZER.encode("the cat"), seed, temperature
        )
        assert body["specsample"]["rule"] == "coupled" and body["specsample"]["lossy"] is False
    chat = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": MAX_TOKENS,
            "seed": 9,
            "rule": "coupled",
        },
        timeout=60,
    ).json()
    assert chat["choices"][0]["message"]["content"] == target_only_text(chat_tokens("hi"), 9, 1.0)
    assert chat["specsample"]["rule"] == "coupled"


def test_mixed_rules_in_one_busy_batch_each_give_their_text_alone(server):
    """12 concurrent requests, coupled / token / block / server default in turn: each coupled one
    gives the target-only text, and every one gives the text it gives alone (fixed k, ToyLM)."""
    rules = ["coupled", "token", "block", None] * 3

    def body(i: int) -> dict:
        fields = {"model": MODEL_NAME, "prompt": f"row {i}", "max_tokens": MAX_TOKENS, "seed": i}
        return fields if rules[i] is None else {**fields, "rule": rules[i]}

    alone = [completion(server.url, **body(i)).json() for i in range(len(rules))]

    async def together():
        async with httpx.AsyncClient(timeout=60) as client:
            calls = [client.post(server.url + "/v1/completions", json=body(i)) for i in range(12)]
            return [r.json() for r in await asyncio.gather(*calls)]

    busy = asyncio.run(together())
    for i, rule in enumerate(rules):
        assert busy[i]["choices"][0]["text"] == alone[i]["choices"][0]["text"]
        assert busy[i]["specsample"]["rule"] == (rule or "auto")
        if rule == "coupled":
            expected = target_only_text(TOKENIZER.encode(f"row {i}"), i, 1.0)
            assert busy[i]["choices"][0]["text"] == expected
    # the token-rule texts are not the coupled ones (the rules do differ on these seeds)
    token_texts = [alone[i]["choices"][0]["text"] for i in range(12) if rules[i] == "token"]
    coupled = [target_only_text(TOKENIZER.encode(f"row {i}"), i, 1.0) for i in (1, 5, 9)]
    assert token_texts != coupled


@pytest.mark.parametrize(
    ("rule", "status", "says"),
    [
        ("typical", 400, "got 'typical'"),
        ("greedy", 400, "got 'greedy'"),
        ("", 400, "got ''"),
        (3, 422, "rule: expected a string"),
        (["coupled"], 422, "rule: expected a string"),
    ],
)
def test_lossy_unknown_or_mistyped_rules_are_refused(server, rule, status, says):
    response = completion(server.url, prompt="a", rule=rule)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == "rule" and says in error["message"]
    if status == 400:
        assert "['auto', 'block', 'coupled', 'token']" in error["message"]
    assert completion(server.url, prompt="a", max_tokens=2).status_code == 200


def test_a_lossy_server_serves_an_exact_rule_per_request():
    pytest.importorskip("specsample.lossy")  # registers the typical rule
    with ServerThread(create_app(served_models(rule="typical"))) as running:
        lossy = completion(running.url, prompt="the cat", seed=4).json()
        assert lossy["specsample"] == {**lossy["specsample"], "rule": "typical", "lossy": True}
        exact = completion(running.url, prompt="the cat", seed=4, rule="coupled").json()
        assert exact["specsample"]["rule"] == "coupled" and exact["specsample"]["lossy"] is False
        expected = target_only_text(TOKENIZER.encode("the cat"), 4, 1.0)
        assert exact["choices"][0]["text"] == expected


def test_batch_rows_carry_a_rule(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"id": 0, "prompt": "row 0", "max_tokens": MAX_TOKENS, "seed": 0, "rule": "coupled"},
        {"id": 1, "prompt": "row 1", "max_tokens": MAX_TOKENS, "seed": 1, "rule": "token"},
        {
            "id": 2,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": MAX_TOKENS,
            "seed": 2,
            "rule": "coupled",
        },
        {"id": 3, "prompt": "row 3", "max_tokens": MAX_TOKENS, "seed": 3},
        {"id": 4, "prompt": "row 4", "rule": "typical"},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_batch(served_models(max_batch=4), source, out, progress=False) == (5, 0)
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert results[0]["choices"][0]["text"] == target_only_text(TOKENIZER.encode("row 0"), 0, 1.0)
    assert results[2]["choices"][0]["message"]["content"] == target_only_text(
        chat_tokens("hi"), 2, 1.0
    )
    assert [results[i]["specsample"]["rule"] for i in range(4)] == [
        "coupled",
        "token",
        "coupled",
        "auto",
    ]
    assert results[4]["error"]["param"] == "rule" and "'typical'" in results[4]["error"]["message"]
