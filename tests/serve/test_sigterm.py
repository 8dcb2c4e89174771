"""SIGTERM on a serving process: it stops accepting, ends the in-flight stream with a final chunk
and [DONE] after the grace period, and exits 0; nothing hangs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from toy_server import CONTEXT, free_port

SCRIPT = Path(__file__).with_name("toy_server.py")


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not come up")


def test_sigterm_ends_inflight_streams_with_a_final_chunk_and_exits():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--port", str(port), "--grace", "0.5", "--delay", "0.03"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_health(url, process)
        started = threading.Event()
        events: list[str] = []

        def stream():
            # about CONTEXT / 4 steps of >= 30 ms: far longer than the grace period
            body = {"prompt": "a", "max_tokens": CONTEXT - 2, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        process.send_signal(signal.SIGTERM)
        reader.join(30)
        assert not reader.is_alive()
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])["choices"][0]
        assert final["finish_reason"] == "abort"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert 0 < len(text) < CONTEXT - 2
        assert process.wait(30) == 0
        try:
            refused = httpx.post(url + "/v1/completions", json={"prompt": "a"}, timeout=2)
            assert refused.status_code == 503
        except httpx.ConnectError:
            pass  # the listening socket is closed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
