"""Offline batch generation: JSONL in (one OpenAI request body per line, with an `id`), JSONL out
(one response per input row, with that `id`), resumable.

Exactly once: each finished row is appended to the output, flushed and fsync'd before the next
is written; a rerun reads the output first (dropping a last line cut short by a crash) and skips
the ids already there, so after any number of crashes every input row ends up in the output
exactly once. Rows are written in the order they finish, not the input order.

Locally one EngineLoop decodes the rows with continuous batching. On Ray (`run_on_ray`), Ray
Data sends the pending rows through `map_batches` to an actor pool (`ActorPoolStrategy`), each
actor holding one engine; the driver writes what comes back, skipping any id it has already
written (a batch retried after an actor died is not written twice).
"""

from __future__ import annotations

import json
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specsample.serve.completion import Completion, ServedModels
from specsample.serve.loop import EngineLoop
from specsample.serve.protocol import CHAT, COMPLETIONS, RequestError, ServedModel, parse_request


@dataclass
class BatchRow:
    """An input row: its `id`, the request body and where it came from (1-based line)."""

    id: Any
    body: dict
    line: int

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(row_id: Any) -> str:
    """The id as compared between input and output (JSON text: 1 and "1" differ)."""
    return json.dumps(row_id, sort_keys=True)


def read_rows(path: str | Path) -> list[BatchRow]:
    """The rows of a JSONL file; each a JSON object with a unique `id`. Raises ValueError naming
    the line of a bad row."""
    rows, seen = [], {}
    with open(path, encoding="utf-8") as source:
        for number, line in enumerate(source, 1):
            if not line.strip():
                continue
            try:
                body = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: expected a JSON object, got {error}") from None
            if not isinstance(body, dict) or "id" not in body:
                raise ValueError(f"{path}:{number}: expected a JSON object with an 'id' field")
            row = BatchRow(body.pop("id"), body, number)
            if row.key in seen:
                raise ValueError(
                    f"{path}:{number}: id {row.id!r} is also on line {seen[row.key]}; ids must "
                    "be unique (the output is matched to the input by id)"
                )
            seen[row.key] = number
            rows.append(row)
    return rows


def written_ids(path: str | Path) -> set[str]:
    """The ids already in an output file (missing file: none). A last line without its newline
    (a crash mid-write) is cut off the file."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with open(path, "r+b") as out:
            out.truncate(complete)
            out.flush()
            os.fsync(out.fileno())
    ids = set()
    for line in data[:complete].decode("utf-8").splitlines():
        if line.strip():
            ids.add(id_key(json.loads(line)["id"]))
    return ids


class RowWriter:
    """Appends output rows durably (flush + fsync per row), each id at most once."""

    def __init__(self, path: str | Path, written: set[str]):
        self.path = Path(path)
        self.written = set(written)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> bool:
        """Writes `row` unless its id was written already; returns whether it wrote."""
        key = id_key(row["id"])
        if key in self.written:
            return False
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.written.add(key)
        return True

    def close(self) -> None:
        self._file.close()


class BatchRunner:
    """One engine (an EngineLoop) decoding rows with continuous batching."""

    def __init__(self, models: ServedModels, *, max_queue: int = 256):
        self.models = models
        self.loop = EngineLoop(models.make_engine, max_queue=max_queue)
        self.served = ServedModel(
            models.name,
            models.tokenizer,
            models.context_length,
            models.vocab_size,
            models.default_max_tokens,
            max_choices=self.loop.capacity,
        )
        self.loop.start()

    def close(self) -> None:
        self.loop.close()

    def run(self, rows: Iterable[BatchRow]) -> Iterator[dict]:
        """The output row of each input row, as each finishes. A row with a bad field gets an
        output row with an `error` object instead of choices."""
        results: queue.Queue = queue.Queue()
        pending: dict[str, _PendingRow] = {}
        for row in rows:
            try:
                completion = self._completion(row)
            except RequestError as error:
                yield {"id": row.id, **error.body()}
                continue
            needed = completion.request.num_choices
            while self.loop.admitted + needed > self.loop.capacity:
                if pending:
                    yield from self._drain_one(results, pending)
                else:  # requests of finished rows still leaving the engine
                    time.sleep(0.01)
            handles = self.loop.submit(completion.specs(_sink_for(results, row.key)))
            pending[row.key] = _PendingRow(row, completion, handles)
        while pending:
            yield from self._drain_one(results, pending)

    def _completion(self, row: BatchRow) -> Completion:
        kind = CHAT if "messages" in row.body else COMPLETIONS
        request = parse_request(row.body, kind, self.served)
        if request.stream:
            raise RequestError(400, "stream: not available in a batch job", "stream")
        return Completion(request, self.models)

    def _drain_one(self, results: queue.Queue, pending: dict) -> Iterator[dict]:
        key, index, item = results.get()
        entry = pending.get(key)
        if entry is None:
            return
        if isinstance(item, BaseException):
            entry.completion.fail(index)
            entry.error = f"internal error: {type(item).__name__}: {item}"
        else:
            _, ended = entry.completion.accept(index, item)
            if ended and not item.finished:  # cut by a stop string before the engine saw it
                self.loop.abort(entry.handles[index])
        if entry.error is not None:
            for handle in entry.handles:  # a failed choice fails its row
                self.loop.abort(handle)
        if entry.completion.finished:
            del pending[key]
            yield entry.output()


@dataclass
class _PendingRow:
    row: BatchRow
    completion: Completion
    handles: list
    error: str | None = None

    def output(self) -> dict:
        if self.error is not None:
            return {"id": self.row.id, "error": {"message": self.error, "type": "internal_error"}}
        response = self.completion.response()
        response.pop("id")
        return {"id": self.row.id, **response}


def _sink_for(results: queue.Queue, key: str) -> Callable[[int], Callable]:
    return lambda index: lambda item: results.put((key, index, item))


def run_batch(
    models: ServedModels,
    in_path: str | Path,
    out_path: str | Path,
    *,
    max_queue: int = 256,
    progress: bool = True,
) -> tuple[int, int]:
    """Generates every row of in_path not yet in out_path, locally. Returns (rows written now,
    rows skipped as done)."""
    rows = read_rows(in_path)
    written = written_ids(out_path)
    todo = [row for row in rows if row.key not in written]
    writer = RowWriter(out_path, written)
    runner = BatchRunner(models, max_queue=max_queue)
    bar = _progress(len(todo), progress, len(rows) - len(todo))
    count = 0
    try:
        for output in runner.run(todo):
            count += writer.write(output)
            bar.update(1)
            bar.set_postfix_str(_postfix(output), refresh=False)
    finally:
        bar.close()
        runner.close()
        writer.close()
    return count, len(rows) - len(todo)


def _progress(total: int, enabled: bool, skipped: int):
    from tqdm import tqdm

    return tqdm(
        total=total,
        disable=not enabled,
        unit="row",
        desc=f"batch ({skipped} done before)" if skipped else "batch",
        dynamic_ncols=True,
    )


def _postfix(output: dict) -> str:
    stats = output.get("specsample") or {}
    alpha = stats.get("acceptance_rate")
    return "error" if "error" in output else f"alpha={alpha}"


# ---------------------------------------------------------------------------- Ray


class RayGenerator:
    """The actor class of a Ray Data map_batches: one engine per replica, built once by
    `load()` (a picklable callable returning ServedModels). Each batch holds raw input lines
    ("line"); it returns output rows as JSON text ("line")."""

    def __init__(self, load: Callable[[], ServedModels], max_queue: int = 256):
        self.runner = BatchRunner(load(), max_queue=max_queue)

    def __call__(self, batch: dict) -> dict:
        rows = []
        for number, line in zip(batch["number"], batch["line"], strict=True):
            body = json.loads(line)
            rows.append(BatchRow(body.pop("id"), body, int(number)))
        return {"line": [json.dumps(out, ensure_ascii=False) for out in self.runner.run(rows)]}


def run_on_ray(
    load: Callable[[], ServedModels],
    in_path: str | Path,
    out_path: str | Path,
    *,
    replicas: int = 1,
    batch_size: int = 16,
    address: str | None = None,
    num_cpus_per_replica: float = 1,
    num_gpus_per_replica: float = 0,
    max_queue: int = 256,
    progress: bool = True,
    ray_init: dict | None = None,
) -> tuple[int, int]:
    """The same job on a Ray cluster: read (the pending rows, from the driver) -> map_batches
    (RayGenerator actors, ActorPoolStrategy(size=replicas)) -> write (the driver appends each
    returned row durably, once per id). `address`: the cluster (None: RAY_ADDRESS or a local
    one). Returns (rows written now, rows skipped as done)."""
    import ray

    rows = read_rows(in_path)
    written = written_ids(out_path)
    todo = [row for row in rows if row.key not in written]
    if not ray.is_initialized():
        ray.init(address=address, **(ray_init or {}))
    writer = RowWriter(out_path, written)
    bar = _progress(len(todo), progress, len(rows) - len(todo))
    count = 0
    try:
        if todo:
            items = [
                {"number": row.line, "line": json.dumps({"id": row.id, **row.body})} for row in todo
            ]
            dataset = ray.data.from_items(items).map_batches(
                RayGenerator,
                fn_constructor_kwargs={"load": load, "max_queue": max_queue},
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=replicas),
                num_cpus=num_cpus_per_replica,
                num_gpus=num_gpus_per_replica,
            )
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for line in batch["line"]:
                    output = json.loads(line)
                    if writer.write(output):
                        count += 1
                        bar.update(1)
                        bar.set_postfix_str(_postfix(output), refresh=False)
    finally:
        bar.close()
        writer.close()
    return count, len(rows) - len(todo)
