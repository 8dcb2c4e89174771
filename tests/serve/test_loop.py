"""EngineLoop without HTTP (admission bound, abort, drain, a failed step) and ChoiceText (stop
strings cut and held back across tokens)."""

from __future__ import annotations

import queue
import threading

import pytest
from toy_server import TOKENIZER, served_models

from specsample.serve.choices import ChoiceText
from specsample.serve.loop import Draining, EngineLoop, QueueFull, RequestSpec
from specsample.warpers import SamplingConfig


def spec(outputs: queue.Queue, prompt=(3, 4), max_new_tokens=5, tag=0) -> RequestSpec:
    return RequestSpec(
        list(prompt), SamplingConfig(), max_new_tokens, lambda item: outputs.put((tag, item))
    )


def final_items(outputs: queue.Queue, count: int) -> dict:
    finals = {}
    while len(finals) < count:
        tag, item = outputs.get(timeout=30)
        if isinstance(item, BaseException) or item.finished:
            finals[tag] = item
    return finals


def test_admits_at_most_max_batch_plus_max_queue_and_all_finish():
    gate = threading.Event()
    loop = EngineLoop(served_models(max_batch=2, gate=gate).make_engine, max_queue=1)
    loop.start()
    outputs: queue.Queue = queue.Queue()
    loop.submit([spec(outputs, tag=0), spec(outputs, tag=1)])
    loop.submit([spec(outputs, tag=2)])
    with pytest.raises(QueueFull):
        loop.submit([spec(outputs, tag=3)])
    gate.set()
    finals = final_items(outputs, 3)
    assert {f.finish_reason for f in finals.values()} <= {"length", "eos"}
    loop.close()
    assert loop.admitted == 0


def test_abort_and_drain():
    gate = threading.Event()
    # at least 50 steps of >= 20 ms each: far beyond the grace period
    models = served_models(max_batch=2, gate=gate, eos=False, delay=0.02)
    loop = EngineLoop(models.make_engine, max_queue=4)
    loop.start()
    outputs: queue.Queue = queue.Queue()
    first, second = loop.submit(
        [spec(outputs, max_new_tokens=200, tag=0), spec(outputs, max_new_tokens=200, tag=1)]
    )
    loop.abort(first)
    loop.drain(grace=0.2)
    with pytest.raises(Draining):
        loop.submit([spec(outputs)])
    gate.set()
    finals = final_items(outputs, 2)
    assert finals[0].finish_reason == "abort" and finals[1].finish_reason == "abort"
    loop.close()


def test_a_failed_step_fails_its_requests_and_the_loop_goes_on():
    loop = EngineLoop(served_models(max_batch=4, poison="!").make_engine)
    loop.start()
    outputs: queue.Queue = queue.Queue()
    poisoned = TOKENIZER.encode("a!")
    loop.submit([spec(outputs, prompt=poisoned, tag=0)])
    assert isinstance(final_items(outputs, 1)[0], RuntimeError)
    loop.submit([spec(outputs, tag=1)])
    assert final_items(outputs, 1)[1].finish_reason in ("length", "eos")
    loop.close()


@pytest.mark.parametrize("split", [1, 2, 3])
def test_stop_string_is_cut_and_never_sent_in_pieces(split):
    text = ChoiceText(TOKENIZER, ["cat"])
    tokens = TOKENIZER.encode("a ccat here")
    sent = []
    for start in range(0, len(tokens), split):
        chunk = tokens[start : start + split]
        sent += [p.text for p in text.push(chunk, [0.0] * len(chunk))]
    sent += [p.text for p in text.finish()]
    assert "".join(sent) == "a c" and text.stopped


def test_text_held_back_for_a_possible_stop_is_released_at_the_end():
    text = ChoiceText(TOKENIZER, ["cat"])
    released = [p.text for p in text.push(TOKENIZER.encode("abc"), [0.0] * 3)]
    assert "".join(released) == "ab"  # "c" may start "cat"
    assert [p.text for p in text.finish()] == ["c"]
