"""`specsample serve` in its own process on 127.0.0.1, for auditing our own server through HTTP
(tests/audit/test_audit_own_server.py, benchmarks/audit_own_server.py)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """`specsample serve ARGS --host 127.0.0.1 --port P --shutdown-grace 0` as a context manager:
    waits (up to start_timeout seconds) until /health answers 200, and on exit sends SIGTERM,
    then SIGKILL after stop_timeout seconds. The server's stderr goes to a temporary file, shown
    when it fails to start."""

    def __init__(self, args: list[str], *, start_timeout: float = 120.0, stop_timeout=20.0):
        self.args = list(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile(mode="w+")

    def __enter__(self) -> ServeProcess:
        command = [sys.executable, "-m", "specsample.cli.main", "serve", *self.args]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--shutdown-grace", "0"]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log, text=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._stop()
                raise RuntimeError(f"specsample serve exited: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self._stop()
        raise RuntimeError(f"specsample serve did not start in {self.start_timeout} s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(self.stop_timeout)

    def __exit__(self, *exc) -> None:
        self._stop()
        self.log.close()
