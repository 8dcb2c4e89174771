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
    for option in ("--draft-confidence", "--draft-survival", "--draft-survival-greedy"):
        assert main(["serve", option, "1.5"]) == 2
        assert f"{option}: expected a number in [0, 1), got 1.5" in capsys.readouterr().err


def test_serving_drafter_stops_reach_the_drafter_and_pick_the_length_rule(tiny_pair):
    """The model drafter of serve and batch gets the draft-side stops (defaults 0.4, 0.25
    and 0.1 for greedy requests), and with any on, --k auto offers the longest draft the costs
    justify."""
    target, draft = tiny_pair
    common = ("--target", target, "--draft", draft, "--k", "auto", "--max-batch", "2")
    engine = _loaded_engine(*common)
    drafter = engine.drafter
    assert (drafter.confidence, drafter.survival, drafter.greedy_survival) == (0.4, 0.25, 0.1)
    assert engine.policy.length_rule == "costs" and engine.policy.max_k == 20
    off = ("--draft-confidence", "0", "--draft-survival", "0")
    assert _loaded_engine(*common, *off).policy.length_rule == "costs"  # the greedy stop is on
    engine = _loaded_engine(*common, *off, "--draft-survival-greedy", "0")
    assert engine.policy.length_rule == "theory"


def _loaded_engine(*options: str):
    import argparse

    from specsample.cli.models import ModelLoader, add_model_arguments

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    served = ModelLoader.from_args(parser.parse_args(list(options)))()
    return served.make_engine()


def _loaded_policy(*options: str):
    return _loaded_engine(*options).policy


def test_serving_draft_length_defaults_to_four_on_transformers(tiny_pair):
    from specsample.engine.length import AdaptiveDraftLength, FixedDraftLength

    target, draft = tiny_pair
    policy = _loaded_policy("--target", target, "--draft", draft, "--max-batch", "2")
    assert isinstance(policy, FixedDraftLength) and policy.k == 4
    policy = _loaded_policy("--target", target, "--draft", draft, "--k", "auto")
    assert isinstance(policy, AdaptiveDraftLength)


def test_serving_recalls_the_cost_memory_of_its_setting_unless_turned_off(tiny_pair):
    """serve and batch: an adaptive draft length starts from the cost memory of the setting
    (engine.memory), which it writes on every verdict change; --no-cost-memory leaves it out,
    and a fixed --k or --drafter none needs none."""
    target, draft = tiny_pair
    common = ["--target", target, "--draft", draft, "--k", "auto"]
    policy = _loaded_policy(*common)
    assert policy.memory is not None and policy.memory.key["max_k"] == policy.max_k
    assert policy.memory.key["drafter"] == "model" and policy.memory.key["rule"] == "auto"
    assert _loaded_policy(*common, "--no-cost-memory").memory is None
    assert _loaded_policy(*common, "--drafter", "ngram").memory.key["drafter"] == "ngram"
    assert getattr(_loaded_policy(*common, "--drafter", "none"), "memory", None) is None


def test_serving_defaults_on_llamacpp_are_auto_length_and_repacked_weights(tmp_path, monkeypatch):
    """On llama.cpp (CPUs) the default is the adaptive length (its cost check finds out per
    batch size whether drafting can pay at all; --k still fixes it), and weights repacked for
    multi-token passes (--no-repack turns it off)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    from tiny_gguf import write_tiny_gguf

    import specsample.adapters.llamacpp as llamacpp
    from specsample.engine.length import AdaptiveDraftLength, FixedDraftLength

    monkeypatch.setattr(llamacpp, "amx_kernels", lambda: False)  # not a build with AMX kernels
    gguf = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    common = ["--target", gguf, "--draft", gguf, "--threads", "1", "--context", "64"]
    engine = _loaded_engine(*common, "--max-batch", "2")
    assert isinstance(engine.policy, AdaptiveDraftLength)
    assert engine.target.model.repack and engine.drafter.cursor.model.repack
    engine = _loaded_engine(*common, "--max-batch", "2", "--k", "3", "--no-repack")
    assert isinstance(engine.policy, FixedDraftLength) and engine.policy.k == 3
    assert not engine.target.model.repack
    # a llama.cpp build with AMX kernels (they crash on repacked weights): off by default
    monkeypatch.setattr(llamacpp, "amx_kernels", lambda: True)
    assert not _loaded_engine(*common, "--max-batch", "2").target.model.repack


def test_serving_the_default_pair_on_llamacpp_loads_the_draft_at_its_first_draft(
    tmp_path, monkeypatch
):
    """serve and batch defer the default pair's draft as generate does: its weights load at
    the engine's first draft (a server whose cost memory says drafting does not pay never
    holds them), and the text is the one an eagerly loaded draft gives."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    from tiny_gguf import write_tiny_gguf

    from specsample import SamplingConfig
    from specsample.adapters import default_pair

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(default_pair, "gguf_paths", lambda: (gguf, gguf))
    common = ["--threads", "1", "--context", "64", "--max-batch", "2", "--k", "3"]
    common += ["--no-prompt-cache", "--no-cost-memory", "--backend", "llama.cpp"]

    def tokens(engine) -> list[int]:
        engine.add_request(
            list(range(3, 13)), sampling=SamplingConfig(temperature=1.0), max_new_tokens=12, seed=7
        )
        out: list[int] = []
        for _ in range(40):
            for piece in engine.step():
                out += piece.tokens
            if not engine.has_unfinished():
                return out
        raise AssertionError("the request did not finish in 40 steps")

    engine = _loaded_engine(*common)
    draft = engine.drafter.cursor.model
    assert engine.target.model.loaded and not draft.loaded
    lazy = tokens(engine)
    assert draft.loaded and engine.stats.draft_passes > 0
    eager = _loaded_engine(*common, "--target", str(gguf), "--draft", str(gguf))
    assert eager.drafter.cursor.model.loaded
    assert tokens(eager) == lazy and len(lazy) == 12


def test_serving_on_llamacpp_restores_kept_prompts_unless_turned_off(tmp_path):
    """serve and batch on llama.cpp keep prompts as generate does (--prompt-cache, default on;
    conftest points $SPECSAMPLE_PROMPT_CACHE at a fresh folder): both models get a cache, a
    request whose prompt an earlier engine kept restores all of it, and a target-only request
    with the same seed then writes the same tokens; --no-prompt-cache leaves it out."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    from tiny_gguf import write_tiny_gguf

    from specsample import SamplingConfig

    gguf = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    common = ["--target", gguf, "--draft", gguf, "--threads", "1", "--context", "64"]
    common += ["--max-batch", "2"]
    engine = _loaded_engine(*common, "--no-prompt-cache")
    assert engine.target.model.prompt_cache is None
    assert engine.drafter.cursor.model.prompt_cache is None
    engine = _loaded_engine(*common)
    assert engine.drafter.cursor.model.prompt_cache is not None
    prompt = list(range(3, 23))

    def tokens(engine) -> list[int]:
        engine.add_request(
            prompt, sampling=SamplingConfig(temperature=1.0), max_new_tokens=10, seed=5
        )
        out: list[int] = []
        for _ in range(40):
            for piece in engine.step():
                out += piece.tokens
            if not engine.has_unfinished():
                return out
        raise AssertionError("the request did not finish in 40 steps")

    first = tokens(_loaded_engine(*common, "--drafter", "none"))  # keeps the prompt
    engine = _loaded_engine(*common, "--drafter", "none")
    cache = engine.target.model.prompt_cache
    assert tokens(engine) == first and len(first) == 10
    assert (cache.reused, cache.computed) == (len(prompt), 0)
    engine = _loaded_engine(*common, "--drafter", "none", "--no-prompt-cache")
    assert tokens(engine) == first  # the state it restored was the one a prefill computes


def _loaded_models(*options: str):
    import argparse

    from specsample.cli.models import ModelLoader, add_model_arguments

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return ModelLoader.from_args(parser.parse_args(list(options)))()


def test_serving_context_is_bounded_by_what_the_target_was_trained_for(tiny_pair, tmp_path):
    """serve and batch: with no --context a request gets at most the target's trained context
    (transformers: max_position_embeddings, 256 for the tiny models; llama.cpp: the GGUF's
    context length, 512 for the tiny GGUF), capped at 4096; a --context above it is an error
    naming the option."""
    target, draft = tiny_pair
    assert _loaded_models("--target", target, "--draft", draft).context_length == 256
    assert (
        _loaded_models("--target", target, "--draft", draft, "--context", "100").context_length
        == 100
    )
    with pytest.raises(ValueError, match=r"^--context: expected at most 256 tokens \(the "):
        _loaded_models("--target", target, "--draft", draft, "--context", "300")
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    from tiny_gguf import write_tiny_gguf

    gguf = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    common = ["--target", gguf, "--threads", "1", "--max-batch", "2", "--drafter", "none"]
    assert _loaded_models(*common).context_length == 512
    with pytest.raises(ValueError, match=r"^--context: expected at most 512 tokens"):
        _loaded_models(*common, "--context", "600")
    with pytest.raises(ValueError, match=r"^--max-batch: expected at most 256 on llama.cpp"):
        _loaded_models(*common[:-4], "--max-batch", "300", "--drafter", "none")
