"""`specsample batch` locally on ToyLM models: every row once with its id and statistics, bad
rows answered with an error row, reproducible by seed, and resumable after kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from toy_batch import output_ids, write_rows
from toy_server import served_models

from specsample.serve.batch import read_rows, run_batch, written_ids

SCRIPT = Path(__file__).with_name("toy_batch.py")


def test_every_row_is_answered_once_with_its_id_and_statistics(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_rows(source, 24)
    written, skipped = run_batch(served_models(max_batch=8), source, out, progress=False)
    assert (written, skipped) == (24, 0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for row in rows:
        assert row["usage"]["completion_tokens"] <= 6
        assert row["specsample"]["target_passes"] >= 1
        kind = "chat.completion" if row["id"] % 2 else "text_completion"
        assert row["object"] == kind
    assert run_batch(served_models(), source, out, progress=False) == (0, 24)  # all done


def test_bad_rows_get_error_rows_and_the_job_goes_on(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"id": "ok", "prompt": "abc", "max_tokens": 3},
        {"id": "hot", "prompt": "abc", "temperature": -1},
        {"id": "long", "prompt": "abc", "max_tokens": 10_000},
        {"id": "n", "prompt": "abc", "max_tokens": 3, "n": 2, "stop": ["e"]},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_batch(served_models(), source, out, progress=False)
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert results["hot"]["error"]["param"] == "temperature"
    assert results["long"]["error"]["param"] == "max_tokens"
    assert len(results["n"]["choices"]) == 2 and results["ok"]["choices"][0]["text"] is not None


def test_same_seed_same_text(tmp_path):
    source = tmp_path / "in.jsonl"
    write_rows(source, 6, max_tokens=12)
    texts = []
    for name in ("a.jsonl", "b.jsonl"):
        run_batch(served_models(max_batch=3), source, tmp_path / name, progress=False)
        rows = map(json.loads, (tmp_path / name).read_text().splitlines())
        texts.append({r["id"]: json.dumps(r["choices"]) for r in rows})
    assert texts[0] == texts[1]


def test_duplicate_ids_are_refused(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    try:
        read_rows(source)
    except ValueError as error:
        assert "line 1" in str(error) and ":2:" in str(error)
    else:
        raise AssertionError("duplicate ids were accepted")


def test_a_line_cut_by_a_crash_is_dropped_and_redone(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "choices": []}\n{"id": 2, "cho')
    assert written_ids(out) == {"1"}
    assert out.read_text() == '{"id": 1, "choices": []}\n'


def test_resume_after_kill_9_writes_every_row_exactly_once(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_rows(source, 40, max_tokens=12)
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(source), str(out), "--delay", "0.03"],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while not (out.exists() and len(out.read_text().splitlines()) >= 4):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the batch job wrote nothing"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    before = output_ids(out)
    assert 4 <= len(before) < 40  # killed mid-job
    written, skipped = run_batch(served_models(max_batch=8), source, out, progress=False)
    assert skipped == len(before) and written == 40 - len(before)
    after = output_ids(out)
    assert sorted(after) == sorted(ids) and after[: len(before)] == before
