"""`specsample batch` and `specsample serve` on the command line: a batch job end to end on tiny
transformers models saved to disk with the character tokenizer, and option errors."""

from __future__ import annotations

import json

import pytest
from toy_batch import output_ids, write_rows
from toy_server import TOKENIZER

from helpers import tiny_causal_lm
from specsample.cli.main import main


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    folders = []
    for name, seed, layers in (("target", 0, 2), ("draft", 1, 1)):
        folder = root / name
        TOKENIZER.save_pretrained(folder)
        model = tiny_causal_lm(
            seed=seed,
            vocab_size=len(TOKENIZER),
            num_hidden_layers=layers,
            eos_token_id=TOKENIZER.eos_token_id,
        )
        model.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def test_batch_command_writes_every_row_with_stats(tiny_pair, tmp_path, capsys):
    target, draft = tiny_pair
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_rows(source, 8)
    args = ["batch", str(source), str(out), "--target", target, "--draft", draft, "--k", "2"]
    assert main([*args, "--max-batch", "4", "--no-progress"]) == 0
    assert sorted(output_ids(out)) == sorted(ids)
    row = json.loads(out.read_text().splitlines()[0])
    assert row["specsample"]["speculative"] and row["usage"]["completion_tokens"] >= 1
    assert main([*args, "--no-progress"]) == 0  # nothing left to do
    assert "wrote 0 rows" in capsys.readouterr().err


def test_batch_command_rejects_bad_input_before_loading(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    assert main(["batch", str(source), str(tmp_path / "out.jsonl"), "--target", "x"]) == 1
    assert "unique" in capsys.readouterr().err
    assert main(["batch", str(source), str(tmp_path / "o"), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def test_serve_command_checks_options_before_loading(capsys):
    assert main(["serve", "--max-queue", "-1"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert main(["serve", "--k", "many"]) == 2
    assert "--k" in capsys.readouterr().err
