"""`specsample generate` end to end on tiny models saved to disk with their own tokenizer, built
in-process (no hub): JSON output, greedy identity between drafters, argument errors, and the
tokenizer-mismatch check."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from helpers import tiny_causal_lm
from specsample.cli.main import main

CORPUS = [
    "def reverse(head):",
    "    prev = None",
    "    while head:",
    "        head = head.next",
    "return prev",
    "the quick brown fox jumps over the lazy dog",
] * 20


def save_tiny_model(folder, seed: int, vocab_size: int = 300, corpus=CORPUS, layers: int = 2):
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    model = tiny_causal_lm(
        seed=seed,
        vocab_size=len(fast),
        num_hidden_layers=layers,
        eos_token_id=fast.eos_token_id,
    )
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_model(root / "target", seed=0), save_tiny_model(
        root / "draft", seed=1, layers=1
    )


def run_json(capsys, *args):
    code = main(["generate", *args, "--json", "--max-new-tokens", "12", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def test_generate_json_reports_texts_and_statistics(tiny_pair, capsys):
    target, draft = tiny_pair
    result = run_json(capsys, "def reverse", "--target", target, "--draft", draft, "--k", "3")
    assert len(result["texts"]) == 1
    stats = result["stats"]
    assert stats["new_tokens"] <= 12
    assert 0 <= stats["alpha"] <= 1
    assert stats["target_passes"] >= 1


@pytest.mark.parametrize(
    "options",
    [
        ["--drafter", "model", "--k", "4"],
        ["--drafter", "ngram", "--k", "4"],
        ["--drafter", "model", "--k", "4", "--rule", "block"],
        ["--drafter", "model", "--k", "4", "--draft-survival", "0.01"],
        ["--drafter", "model", "--k", "4", "--draft-confidence", "0.001"],
        ["--drafter", "model", "--k", "3", "--drafts", "3"],
        ["--drafter", "model", "--tree", "2x2"],
        ["--drafter", "model", "--tree", "3,1,1", "--tree-children", "iid"],
    ],
)
def test_greedy_output_is_the_same_with_and_without_a_drafter(tiny_pair, capsys, options):
    target, draft = tiny_pair
    common = ["def reverse(head):", "--target", target, "--temperature", "0"]
    baseline = run_json(capsys, *common, "--drafter", "none")
    # stops off (unless the case sets one): the tiny random draft would draft nothing.
    off = ["--draft-confidence", "0", "--draft-survival", "0", "--draft-survival-greedy", "0"]
    speculative = run_json(capsys, *common, "--draft", draft, *off, *options)
    assert speculative["texts"] == baseline["texts"]


@pytest.mark.parametrize(
    ("option", "temperature"),
    [
        ("--draft-confidence", "0"),
        ("--draft-survival", "0.7"),  # the survival stop of sampled rows
        ("--draft-survival-greedy", "0"),
    ],
)
def test_draft_stops_reach_the_drafter(tiny_pair, capsys, option, temperature):
    # The tiny random draft is never sure of anything (top probabilities near 1/vocab), so a
    # threshold of 0.9 stops every draft before its first token (so do the defaults,
    # confidence 0.4, survival 0.25 and 0.1 for greedy decoding); with the stops off, it
    # drafts.
    target, draft = tiny_pair
    common = ["def f", "--target", target, "--draft", draft, "--k", "3"]
    common += ["--temperature", temperature]
    off = ["--draft-confidence", "0", "--draft-survival", "0", "--draft-survival-greedy", "0"]
    assert run_json(capsys, *common, *off)["stats"]["mean_draft_length"] > 0
    assert run_json(capsys, *common, *off, option, "0.9")["stats"]["mean_draft_length"] == 0
    assert run_json(capsys, *common)["stats"]["mean_draft_length"] == 0


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        (["--tree", "2,1"], "tree"),
        (["--drafts", "2", "--tree-children", "top"], "tree"),
        (["--rule", "block"], "block"),
        ([], "block"),  # --rule auto: block verification for one chain
        (["--rule", "token"], "token"),
        (["--rule", "typical"], "typical"),
    ],
)
def test_every_rule_is_selectable_and_reported(tiny_pair, capsys, options, rule):
    target, draft = tiny_pair
    # stops off: the tiny random draft is never confident enough to draft otherwise.
    result = run_json(
        capsys,
        "def f",
        "--target",
        target,
        "--draft",
        draft,
        "--k",
        "2",
        "--draft-confidence",
        "0",
        "--draft-survival",
        "0",
        *options,
    )
    assert rule in result["stats"]["rules_used"]
    assert result["stats"]["new_tokens"] >= 1


def test_typical_rule_says_it_is_lossy(tiny_pair, capsys):
    target, draft = tiny_pair
    code = main(
        [
            "generate",
            "hi",
            "--target",
            target,
            "--draft",
            draft,
            "--rule",
            "typical",
            "--max-new-tokens",
            "3",
            "--dtype",
            "float32",
        ]
    )
    assert code == 0
    assert "LOSSY" in capsys.readouterr().err


def test_batch_file_generates_every_line(tiny_pair, capsys, tmp_path):
    target, draft = tiny_pair
    batch = tmp_path / "prompts.txt"
    batch.write_text("def reverse\n\nthe quick brown\nreturn\n")
    result = run_json(capsys, "--batch-file", str(batch), "--target", target, "--draft", draft)
    assert len(result["texts"]) == 3


def test_tokenizer_mismatch_is_an_error_before_generation(tiny_pair, capsys, tmp_path):
    target, _ = tiny_pair
    other = save_tiny_model(
        tmp_path / "other", seed=2, vocab_size=280, corpus=["completely different words here"] * 30
    )
    code = main(["generate", "hi", "--target", target, "--draft", other, "--dtype", "float32"])
    assert code == 1
    assert "draft: expected a model with the target's tokenizer" in capsys.readouterr().err


def test_repack_on_the_transformers_backend_is_an_error_naming_it(tiny_pair, capsys):
    target, draft = tiny_pair
    code = main(["generate", "hi", "--target", target, "--draft", draft, "--repack"])
    assert code == 1
    assert "repack: expected the llama.cpp backend" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--k", "-1"], "--k"),
        (["--k", "many"], "--k"),
        (["--temperature", "-0.5"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--draft-confidence", "1"], "--draft-confidence"),
        (["--draft-survival", "-0.1"], "--draft-survival"),
        (["--draft-survival-greedy", "1"], "--draft-survival-greedy"),
        (["--tree", "wide"], "--tree: expected WIDTHxDEPTH"),
        (["--tree", "2,0"], "--tree"),
        (["--drafts", "0"], "--drafts: expected an integer >= 1"),
        (["--drafts", "2", "--drafter", "ngram"], "--drafts: expected --drafter model"),
        (["--tree", "2x2", "--rule", "block"], "--tree: trees are verified node by node"),
    ],
)
def test_bad_options_exit_2_naming_the_option(tiny_pair, capsys, args, named):
    target, draft = tiny_pair
    code = main(["generate", "hi", "--target", target, "--draft", draft, *args])
    assert code == 2
    assert named in capsys.readouterr().err


def test_cost_memory_is_written_then_recalled_and_can_be_turned_off(
    tiny_pair, capsys, tmp_path, monkeypatch
):
    """--k auto: the first run writes the costs and verdict it measured into
    $SPECSAMPLE_COST_MEMORY, the next run with the same setting recalls them (--stats says
    which); --no-cost-memory neither reads nor writes, and neither does a fixed --k."""
    target, draft = tiny_pair
    folder = tmp_path / "costs"
    monkeypatch.setenv("SPECSAMPLE_COST_MEMORY", str(folder))
    common = ["generate", "def f", "--target", target, "--draft", draft, "--dtype", "float32"]
    common += ["--max-new-tokens", "16", "--draft-confidence", "0", "--draft-survival", "0"]
    common += ["--draft-survival-greedy", "0"]

    def stats_lines(*extra):
        assert main([*common, "--stats", *extra]) == 0
        return [line for line in capsys.readouterr().err.splitlines() if "cost memory" in line]

    assert main([*common, "--no-cost-memory", "--stats"]) == 0
    assert "cost memory" not in capsys.readouterr().err and not folder.exists()
    assert stats_lines("--k", "3") == [] and not folder.exists()
    first = stats_lines()
    assert len(first) == 1 and "none yet for this setting" in first[0]
    files = list(folder.glob("costs-*.json"))
    assert len(files) == 1 and str(files[0]) in first[0]
    assert json.loads(files[0].read_text())["buckets"]["1"]["verdict"] in (True, False)
    again = stats_lines()
    assert len(again) == 1 and "recalled" in again[0]
    # --json says the same
    assert main([*common, "--json"]) == 0
    fact = json.loads(capsys.readouterr().out)["cost_memory"]
    assert fact["recalled"] is True and fact["path"] == str(files[0])
    assert fact["dropped"] in (True, False)  # a faster pass than remembered drops it
    assert fact["slower"] in (True, False)
    assert main([*common, "--json", "--no-cost-memory"]) == 0
    assert "cost_memory" not in json.loads(capsys.readouterr().out)
    # another setting (here the largest draft length) is another memory
    assert "none yet" in stats_lines("--max-k", "5")[0]
    assert len(list(folder.glob("costs-*.json"))) == 2


@pytest.mark.parametrize(
    ("options", "amx", "repack"),
    [
        (["--backend", "llama.cpp"], False, True),  # llama.cpp's own default
        (["--backend", "llama.cpp", "--rule", "coupled"], False, False),  # same logits 1-4
        (["--backend", "llama.cpp", "--no-repack"], False, False),
        (["--backend", "llama.cpp", "--rule", "coupled", "--repack"], False, True),
        (["--backend", "transformers"], False, False),  # not a transformers option
        # a llama.cpp build with AMX kernels: they crash on repacked weights
        (["--backend", "llama.cpp"], True, False),
        (["--backend", "llama.cpp", "--repack"], True, True),  # as asked (load_pair warns)
        (["--backend", "transformers"], True, False),
    ],
)
def test_weights_are_repacked_by_default_on_llamacpp(monkeypatch, tmp_path, options, amx, repack):
    import specsample.adapters.llamacpp as llamacpp
    import specsample.adapters.loading as loading

    monkeypatch.setattr(llamacpp, "amx_kernels", lambda: amx)

    asked = {}

    def fake_load_pair(*args, **kwargs):
        asked.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(loading, "load_pair", fake_load_pair)
    target = str(tmp_path / "t.gguf")
    assert main(["generate", "hi", "--target", target, "--drafter", "none", *options]) == 1
    assert asked["repack"] is repack


def tiny_gguf_file(tmp_path) -> str:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    from tiny_gguf import write_tiny_gguf

    return str(write_tiny_gguf(tmp_path / "tiny.gguf"))


def test_prompt_cache_on_llamacpp_restores_a_prompt_and_can_be_turned_off(
    tmp_path, capsys, monkeypatch
):
    """llama.cpp: the first run keeps its prompt in $SPECSAMPLE_PROMPT_CACHE, the second
    restores all of it (--stats says how much) and, target-only with the same seed, writes the
    same text; --no-prompt-cache neither reads nor writes."""
    gguf = tiny_gguf_file(tmp_path)
    folder = tmp_path / "prompts"
    monkeypatch.setenv("SPECSAMPLE_PROMPT_CACHE", str(folder))
    common = ["generate", "hello there, a longer prompt", "--target", gguf, "--drafter", "none"]
    common += ["--threads", "1", "--max-new-tokens", "12", "--temperature", "1", "--no-color"]

    def run(*extra) -> tuple[str, list[str]]:
        assert main([*common, "--stats", *extra]) == 0
        out, err = capsys.readouterr()
        return out, [line for line in err.splitlines() if "prompt cache" in line]

    texts, lines = run("--no-prompt-cache")
    assert lines == [] and not folder.exists()
    first_texts, first = run()
    assert len(first) == 1 and " 0 of " in first[0] and str(folder) in first[0]
    total = int(first[0].split(" of ")[1].split()[0])
    assert total >= 8 and len(list(folder.glob("prompts-*/*.npz"))) == 1
    again_texts, again = run()
    assert f"{total} of {total} target prompt tokens restored" in again[0]
    assert again_texts == first_texts == texts
    # --json says the same
    assert main([*common, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt_cache"] == {
        "restored_tokens": total,
        "computed_tokens": 0,
        "folder": again[0].split("(")[-1].rstrip(")"),
    }
    assert main([*common, "--json", "--no-prompt-cache"]) == 0
    assert "prompt_cache" not in json.loads(capsys.readouterr().out)


def test_a_prompt_past_the_targets_context_is_refused_before_generation(tmp_path, capsys):
    """llama.cpp: the tiny GGUF was trained for 512 positions; a prompt whose tokens and
    --max-new-tokens pass them is an error naming the option and the counts, with no text."""
    gguf = tiny_gguf_file(tmp_path)
    prompt = tmp_path / "long.txt"
    prompt.write_text("ab " * 100)
    common = ["generate", "--prompt-file", str(prompt), "--target", gguf, "--drafter", "none"]
    common += ["--threads", "1", "--no-chat-template", "--no-prompt-cache", "--no-cost-memory"]
    assert main([*common, "--max-new-tokens", "400"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    found = re.search(
        r"specsample generate: error: --prompt-file: expected at most 512 tokens with "
        r"--max-new-tokens \(the target's context\), got (\d+) prompt tokens \+ 400 new tokens "
        r"= (\d+); shorten the prompt or lower --max-new-tokens",
        err,
    )
    assert found and int(found[1]) + 400 == int(found[2]) > 512, err
    prompt_tokens = int(found[1])
    # the same prompt with room for its new tokens runs
    room = 512 - prompt_tokens
    assert main([*common, "--max-new-tokens", str(room), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["texts"]) == 1


def test_a_batch_past_the_default_context_and_rows_gets_room_for_all(tmp_path, capsys):
    """llama.cpp, target and draft from one tiny GGUF: 70 prompts (more than the 64 rows a
    context holds by default), 12 of them long (more KV cells in all than the default 4096):
    both contexts are sized to the batch before generation and every prompt gets its tokens;
    more prompts than llama.cpp's 256 sequences are refused, naming the batch file."""
    gguf = tiny_gguf_file(tmp_path)
    lines = [f"ab{i} " * 90 for i in range(12)] + [f"line {i}" for i in range(58)]
    batch = tmp_path / "batch.txt"
    batch.write_text("\n".join(lines) + "\n")
    common = ["generate", "--target", gguf, "--draft", gguf, "--threads", "1"]
    common += ["--no-chat-template", "--no-prompt-cache", "--no-cost-memory", "--seed", "3"]
    code = main([*common, "--batch-file", str(batch), "--max-new-tokens", "6", "--k", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "context: target sized to 8192 cells for 70 prompt(s)" in err
    assert "context: draft sized to 8192 cells for 70 prompt(s)" in err
    assert out.count("--- [") == 70
    code = main([*common, "--batch-file", str(batch), "--max-new-tokens", "6", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and len(record["texts"]) == 70
    assert 70 <= record["stats"]["new_tokens"] <= 70 * 6  # a row ends at 6 tokens or at EOS
    too_many = tmp_path / "many.txt"
    too_many.write_text("".join(f"p{i}\n" for i in range(257)))
    assert main([*common, "--batch-file", str(too_many), "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        "specsample generate: error: --batch-file: expected at most 256 prompts (llama.cpp's "
        "sequences per context), got 257; split the file into files of at most 256 prompts"
    ) in err


def test_transformers_prompt_past_the_models_positions_is_refused(tiny_pair, capsys):
    """transformers: the config's max_position_embeddings (256 for the tiny models) bounds a
    prompt with its --max-new-tokens, before any generation."""
    target, draft = tiny_pair
    args = ["generate", "def reverse(head):", "--target", target, "--draft", draft]
    args += ["--dtype", "float32", "--no-chat-template", "--max-new-tokens", "300"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert re.search(
        r"specsample generate: error: prompt: expected at most 256 tokens with --max-new-tokens "
        r"\(the target's context\), got \d+ prompt tokens \+ 300 new tokens",
        err,
    ), err
