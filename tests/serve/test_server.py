"""`specsample serve`'s app against a real uvicorn on 127.0.0.1 with the official openai client
(sync, async, streaming), on ToyLM models and a character tokenizer (see toy_server.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from toy_server import CONTEXT, MODEL_NAME, TARGET, TOKENIZER, ServerThread, served_models

from specsample.serve.app import create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server():
    app = create_app(served_models(max_batch=16), max_queue=256)
    with ServerThread(app) as running:
        running.app = app
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_completion_reports_usage_acceptance_and_the_targets_logprobs(client):
    prompt = "hello"
    result = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, seed=3, logprobs=1
    )
    choice = result.choices[0]
    assert result.object == "text_completion"
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= result.usage.completion_tokens <= 12
    assert result.usage.prompt_tokens == len(prompt)
    stats = result.model_extra["specsample"]
    assert stats["speculative"] and not stats["lossy"]
    assert stats["target_passes"] >= 1 and 0 <= stats["acceptance_rate"] <= 1
    # the first token's log-probability is the target's, from its raw logits
    first = TOKENIZER.encode(choice.logprobs.tokens[0])[0]
    expected = torch.log_softmax(TARGET.logits_for(TOKENIZER.encode(prompt)), dim=-1)[first]
    assert choice.logprobs.token_logprobs[0] == pytest.approx(float(expected), abs=1e-5)
    assert "".join(choice.logprobs.tokens) == choice.text


def test_chat_completion_uses_the_chat_template(client):
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, seed=5
    )
    assert result.object == "chat.completion"
    rendered = TOKENIZER.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert result.usage.prompt_tokens == len(rendered)
    assert result.choices[0].message.role == "assistant"


def test_same_seed_gives_the_same_text_streaming_or_not(client, server):
    kwargs = dict(model=MODEL_NAME, prompt="once upon", max_tokens=30, seed=42, temperature=1.0)
    first = client.completions.create(**kwargs).choices[0].text
    again = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    assert first == again == streamed
    others = {client.completions.create(**{**kwargs, "seed": s}).choices[0].text for s in range(5)}
    assert len(others) > 1  # the seed matters


def test_stream_is_openai_chunks_ending_with_done(server):
    body = {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 10, "stream": True, "seed": 1}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "acceptance_rate" in chunks[-1]["specsample"]


def test_chat_stream_with_n_choices_and_usage(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "tell"}],
        max_tokens=6,
        n=3,
        seed=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens <= 18 and not chunks[-1].choices


def test_stop_string_cuts_the_text_in_both_modes(client):
    kwargs = dict(model=MODEL_NAME, prompt="the", max_tokens=60, seed=0, stop=["e", "a"])
    texts = [
        client.completions.create(**kwargs).choices[0].text,
        "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True)),
    ]
    assert texts[0] == texts[1]
    assert "e" not in texts[0] and "a" not in texts[0]


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    for name in (
        "specsample_requests_total",
        "specsample_generation_tokens_total",
        "specsample_acceptance_rate",
        "specsample_tokens_per_pass",
        "specsample_queue_depth",
        "specsample_step_seconds_bucket",
    ):
        assert name in metrics


def test_32_concurrent_clients_times_5_requests_all_complete(server):
    async def one_client(client: openai.AsyncOpenAI, c: int) -> list[int]:
        counts = []
        for r in range(5):
            kwargs = dict(model=MODEL_NAME, prompt=f"client {c}", max_tokens=4, seed=c * 10 + r)
            if r % 2:
                text = ""
                async for chunk in await client.completions.create(**kwargs, stream=True):
                    text += chunk.choices[0].text
                counts.append(len(text) >= 0)
            else:
                result = await client.completions.create(**kwargs)
                counts.append(result.usage.completion_tokens >= 1)
        return counts

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        results = await asyncio.gather(*(one_client(client, c) for c in range(32)))
        await client.close()
        return results

    results = asyncio.run(main())
    assert sum(len(r) for r in results) == 160 and all(all(r) for r in results)
    assert wait_until(lambda: server.app.state.loop.admitted == 0)


BAD_REQUESTS = [
    ({"model": "other", "prompt": "a"}, 404, "model"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a" * CONTEXT}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": "ten"}, 422, "max_tokens"),
    ({"max_tokens": 3}, 422, "prompt"),
    ({"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": [1, 2, 999]}, 400, "prompt"),
    ({"prompt": "a", "top_k": -2}, 400, "top_k"),
    ({"prompt": "a", "min_p": 1}, 400, "min_p"),
    ({"prompt": "a", "stop": 3}, 422, "stop"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, body, status, param):
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, **body})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


def test_malformed_json_and_unknown_routes(server, client):
    response = httpx.post(
        server.url + "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], temperature=-1
        )


def test_api_key_is_required_when_set():
    app = create_app(served_models(max_batch=2), api_key="sesame")
    with ServerThread(app) as running:
        body = {"prompt": "a", "max_tokens": 2}
        url = running.url + "/v1/completions"
        assert httpx.post(url, json=body).status_code == 401
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="nope").completions.create(
                model=MODEL_NAME, prompt="a", max_tokens=2
            )
        good = openai.OpenAI(base_url=running.url + "/v1", api_key="sesame")
        assert good.completions.create(model=MODEL_NAME, prompt="a", max_tokens=2).choices
        assert httpx.get(running.url + "/health").status_code == 200


def test_full_queue_answers_429_with_retry_after():
    gate = threading.Event()  # the model waits: both admitted requests stay in flight
    app = create_app(served_models(max_batch=1, gate=gate), max_queue=1)
    with ServerThread(app) as running:
        url = running.url + "/v1/completions"
        body = {"prompt": "a", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", url, json=body) as first, httpx.stream("POST", url, json=body):
            refused = httpx.post(url, json={"prompt": "a", "max_tokens": 2})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_exceeded"
            gate.set()
            assert sse_events(first)[-1] == "[DONE]"
        assert wait_until(lambda: app.state.loop.admitted == 0)
        assert httpx.post(url, json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_client_disconnect_mid_stream_frees_its_row_and_others_go_on():
    app = create_app(served_models(max_batch=4, eos=False))
    loop = app.state.loop
    with ServerThread(app) as running:
        url = running.url + "/v1/completions"
        long = {"prompt": "z", "max_tokens": CONTEXT - 2, "stream": True}
        other: dict = {}

        def run_other():
            body = {"prompt": "y", "max_tokens": 20, "seed": 1}
            other["response"] = httpx.post(url, json=body, timeout=60)

        with httpx.stream("POST", url, json=long, timeout=60) as response:
            next(response.iter_lines())
            thread = threading.Thread(target=run_other)
            thread.start()
        thread.join(60)  # the long stream was closed after its first chunk
        assert other["response"].json()["usage"]["completion_tokens"] == 20
        assert wait_until(lambda: loop.admitted == 0, timeout=10)
        # without the abort the long request alone would have made CONTEXT - 2 tokens
        assert loop.engine.stats.new_tokens < CONTEXT - 2


def test_internal_error_fails_that_request_only():
    app = create_app(served_models(max_batch=4, poison="!"))
    with ServerThread(app) as running:
        url = running.url + "/v1/completions"
        failed = httpx.post(url, json={"prompt": "boom!", "max_tokens": 4})
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "internal_error"
        streamed = httpx.post(url, json={"prompt": "boom!", "max_tokens": 4, "stream": True})
        events = sse_events(streamed)
        assert "error" in json.loads(events[0]) and events[-1] == "[DONE]"
        ok = httpx.post(url, json={"prompt": "fine", "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"]


def test_same_seed_same_text_alone_or_in_a_busy_batch(server):
    """Each request draws from its own seeded generator and the draft length is fixed, so its
    text does not depend on which requests share its batch (ToyLM's logits do not depend on
    the batch)."""
    body = {"model": MODEL_NAME, "prompt": "seed", "max_tokens": 24, "seed": 77}

    def text(response: httpx.Response) -> str:
        return response.json()["choices"][0]["text"]

    alone = text(httpx.post(server.url + "/v1/completions", json=body, timeout=60))

    async def busy():
        async with httpx.AsyncClient(timeout=60) as client:
            others = [
                client.post(
                    server.url + "/v1/completions",
                    json={**body, "prompt": f"other {i}", "seed": i, "max_tokens": 30},
                )
                for i in range(6)
            ]
            mine = client.post(server.url + "/v1/completions", json=body)
            return (await asyncio.gather(mine, *others))[0]

    assert text(asyncio.run(busy())) == alone
