"""The llama.cpp backend (`LlamaCppLM`, `LlamaCppTokenizer`) on tiny GGUF models written in-process.

The reference for "the logits after a sequence of tokens" is a fresh context that is fed the
sequence one token per pass. llama.cpp's results depend slightly on how many tokens a pass
holds, so comparisons hold to a tolerance per numerics setting:

* "float32": float32 keys/values, no flash attention. Measured gap about 5e-6 (float32
  rounding); tolerance 1e-4.
* "default": llama.cpp's defaults (float16 keys/values, flash attention as llama.cpp decides),
  what the command line runs. Measured gap about 2e-3 (half-precision accumulation in the
  1-token path); tolerance 1e-2.

A wrong mask, position or stale cache cell moves logits by far more: the negative control
test_a_wrong_context_is_far_outside_the_tolerance checks that for this model.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llamacpp extra)")
pytest.importorskip("gguf", reason="the tiny test models are written with the gguf package")

from tiny_gguf import CHAT_TEMPLATE, EOS, TOKENS, VOCAB, write_tiny_gguf  # noqa: E402

from helpers import check_add_rows_last  # noqa: E402
from specsample.adapters.gguf_meta import read_gguf_metadata  # noqa: E402
from specsample.adapters.llamacpp import LlamaCppLM, LlamaCppTokenizer  # noqa: E402
from specsample.adapters.protocol import (  # noqa: E402
    LanguageModel,
    PromptScoring,
    TreeLanguageModel,
)

NUMERICS = {  # name -> (LlamaCppLM options, tolerance)
    "float32": (dict(kv_type="f32", flash_attn=False), 1e-4),
    "default": ({}, 1e-2),
}
ATOL = NUMERICS["float32"][1]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("llamacpp") / "tiny.gguf")


@pytest.fixture(scope="module")
def reference(gguf_path: Path):
    """logits(seq) -> float32 [len(seq), vocab]: the logits after each prefix of seq, from a
    fresh float32 context fed one token per pass."""
    return make_reference(gguf_path, NUMERICS["float32"][0])


@pytest.fixture(scope="module", params=sorted(NUMERICS))
def numerics(request, gguf_path: Path):
    """(options, reference, tolerance) for each numerics setting."""
    options, tolerance = NUMERICS[request.param]
    return options, make_reference(gguf_path, options), tolerance


def make_reference(gguf_path: Path, options: dict):
    ref = LlamaCppLM(gguf_path, n_ctx=256, max_batch=1, threads=1, **options)
    rows: dict[tuple[int, ...], torch.Tensor] = {}  # prefix -> logits after it
    held: list[int] = []  # the tokens the reference context holds

    def logits(seq: list[int]) -> torch.Tensor:
        missing = next((i for i in range(len(seq)) if tuple(seq[: i + 1]) not in rows), None)
        if missing is not None:
            # Roll back to the longest prefix shared with what the context holds, then feed the
            # rest one token per pass (re-fed tokens give the same rows: same cache, same pass).
            common = next(
                (i for i, (a, b) in enumerate(zip(held, seq, strict=False)) if a != b),
                min(len(held), len(seq)),
            )
            common = min(common, missing)
            if common == 0:
                rows[tuple(seq[:1])] = ref.prefill([seq[:1]])[0]
                common = 1
            else:
                ref.truncate(torch.tensor([common]))
            for i in range(common, len(seq)):
                step = ref.extend(torch.tensor([[seq[i]]]), torch.tensor([1]))[0, 0]
                rows.setdefault(tuple(seq[: i + 1]), step)
            held[:] = seq
        return torch.stack([rows[tuple(seq[: i + 1])] for i in range(len(seq))])

    return logits


@pytest.fixture
def lm(gguf_path: Path) -> LlamaCppLM:
    return LlamaCppLM(gguf_path, n_ctx=512, max_batch=8, threads=1, **NUMERICS["float32"][0])


def random_seq(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(rng.randint(low, high))]


def test_implements_the_protocols(lm):
    assert isinstance(lm, LanguageModel) and isinstance(lm, TreeLanguageModel)
    assert isinstance(lm, PromptScoring)
    assert lm.vocab_size == VOCAB
    assert lm.architecture == "qwen2"


def test_k_token_passes_match_one_token_passes(lm, reference):
    """Prefill (one pass of the whole prompt) and extend (k tokens per pass) against one token
    per pass; records the gap so a regression in numerics shows up here first."""
    rng = random.Random(0)
    seq = random_seq(rng, 20, 20)
    first = lm.prefill([seq[:4]])
    logits = lm.extend(torch.tensor([seq[4:]]), torch.tensor([16]))
    full = torch.cat([first, logits[0]])
    gap = (full - reference(seq)[3:]).abs().max().item()
    assert gap < ATOL, f"K-token vs 1-token max |logit difference| {gap:.2e}"


def test_a_wrong_context_is_far_outside_the_tolerance(reference):
    """Negative control: dropping, swapping or adding one context token changes the next
    logits by far more than either tolerance, so the comparisons below can fail."""
    rng = random.Random(7)
    loosest = max(tolerance for _, tolerance in NUMERICS.values())
    for _ in range(20):
        seq = random_seq(rng, 3, 12)
        right = reference(seq)[-1]
        i = rng.randrange(len(seq) - 1)
        dropped = seq[:i] + seq[i + 1 :]
        swapped = seq[:i] + [seq[i + 1], seq[i]] + seq[i + 2 :]
        added = seq[:i] + [rng.randrange(VOCAB)] + seq[i:]
        for wrong in (dropped, swapped, added):
            if wrong != seq:
                assert (reference(wrong)[-1] - right).abs().max() > 10 * loosest


def test_ragged_prefill_and_extend_match_the_reference(lm, reference):
    rng = random.Random(1)
    seqs = [random_seq(rng, 1, 9) for _ in range(4)]
    first = lm.prefill(seqs)
    assert first.shape == (4, VOCAB) and lm.lengths.tolist() == [len(s) for s in seqs]
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(first[b], reference(seq)[-1], atol=ATOL, rtol=0)
    tokens = torch.tensor([[rng.randrange(VOCAB) for _ in range(5)] for _ in seqs])
    num_valid = torch.tensor([5, 0, 2, 3])
    logits = lm.extend(tokens, num_valid)
    assert logits.shape == (4, 5, VOCAB) and torch.isfinite(logits).all()
    for b, seq in enumerate(seqs):
        k = int(num_valid[b])
        seq += tokens[b, :k].tolist()
        torch.testing.assert_close(logits[b, :k], reference(seq)[len(seq) - k :], atol=ATOL, rtol=0)
        assert (logits[b, k:] == 0).all()  # padding: finite, never read
    assert lm.lengths.tolist() == [len(s) for s in seqs]


def test_advance_appends_like_extend_without_logits(lm, reference):
    """advance (a drafter catching up on tokens it skipped) keeps what extend keeps: every
    row continues from its tokens, ragged counts and empty rows included."""
    rng = random.Random(4)
    seqs = [random_seq(rng, 1, 6) for _ in range(3)]
    lm.prefill(seqs)
    tokens = torch.tensor([[rng.randrange(VOCAB) for _ in range(7)] for _ in seqs])
    num_valid = torch.tensor([7, 0, 3])
    calls = lm.num_calls
    assert lm.advance(tokens, num_valid) is None
    assert lm.num_calls == calls + 1  # one pass for every row
    for b, seq in enumerate(seqs):
        seq += tokens[b, : int(num_valid[b])].tolist()
    assert lm.lengths.tolist() == [len(s) for s in seqs]
    probe = torch.tensor([[rng.randrange(VOCAB)] for _ in seqs])
    logits = lm.extend(probe, torch.ones(3, dtype=torch.int64))
    for b, seq in enumerate(seqs):
        seq.append(int(probe[b, 0]))
        torch.testing.assert_close(logits[b, 0], reference(seq)[-1], atol=ATOL, rtol=0)
    lm.advance(torch.zeros(3, 1, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    assert lm.lengths.tolist() == [len(s) for s in seqs]
    with pytest.raises(ValueError, match="num_valid"):
        lm.advance(torch.tensor([[1], [2], [3]]), torch.tensor([2, 0, 0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_sequence_of_calls_equals_a_fresh_prefill(gguf_path, numerics, seed):
    """extend / truncate / add_rows / remove_rows in random order: each row's logits always equal
    those of its tokens fed afresh."""
    options, reference, atol = numerics
    lm = LlamaCppLM(gguf_path, n_ctx=512, max_batch=8, threads=1, **options)
    rng = random.Random(seed)
    seqs = [random_seq(rng, 1, 6) for _ in range(3)]
    lm.prefill(seqs)
    for _ in range(8):
        op = rng.choice(["extend", "extend", "truncate", "add", "add_last", "remove"])
        if op == "extend" and seqs:
            n = rng.randint(1, 4)
            tokens = torch.tensor([[rng.randrange(VOCAB) for _ in range(n)] for _ in seqs])
            num_valid = torch.tensor([rng.randint(0, n) for _ in seqs])
            logits = lm.extend(tokens, num_valid)
            for b, seq in enumerate(seqs):
                k = int(num_valid[b])
                seq += tokens[b, :k].tolist()
                expected = reference(seq)[len(seq) - k :]
                torch.testing.assert_close(logits[b, :k], expected, atol=atol, rtol=0)
        elif op == "truncate" and seqs:
            keep = [rng.randint(0, len(s)) for s in seqs]
            lm.truncate(torch.tensor(keep))
            seqs = [s[:k] for s, k in zip(seqs, keep, strict=True)]
        elif op == "add" and len(seqs) < 6:
            new = [random_seq(rng, 1, 5) for _ in range(rng.randint(1, 2))]
            logits = lm.add_rows(new)
            for row, seq in zip(logits, new, strict=True):
                torch.testing.assert_close(row, reference(seq)[-1], atol=atol, rtol=0)
            seqs += new
        elif op == "add_last" and len(seqs) < 6:
            new = [random_seq(rng, 1, 5) for _ in range(rng.randint(1, 2))]
            last = rng.randint(1, 6)
            logits = lm.add_rows_last(new, last)
            assert logits.shape == (len(new), last, VOCAB)
            for row, seq in zip(logits, new, strict=True):
                scored = min(last, len(seq))
                expected = reference(seq)[len(seq) - scored :]
                torch.testing.assert_close(row[last - scored :], expected, atol=atol, rtol=0)
            seqs += new
        elif op == "remove" and seqs:
            keep = sorted(rng.sample(range(len(seqs)), rng.randint(0, len(seqs))))
            lm.remove_rows(torch.tensor(keep, dtype=torch.int64))
            seqs = [seqs[b] for b in keep]
        assert lm.lengths.tolist() == [len(s) for s in seqs]
    # Every row, emptied or not, continues exactly from its tokens.
    if seqs:
        probe = torch.tensor([[rng.randrange(VOCAB)] for _ in seqs])
        logits = lm.extend(probe, torch.ones(len(seqs), dtype=torch.int64))
        for b, seq in enumerate(seqs):
            seq.append(int(probe[b, 0]))
            torch.testing.assert_close(logits[b, 0], reference(seq)[-1], atol=atol, rtol=0)
    assert lm.cells_used == sum(len(s) for s in seqs)


def test_add_rows_last_scores_the_last_tokens_of_each_prompt(lm, reference):
    """The prompt pass of rows that join scores their last tokens (a request's prompt and its
    first drafts, fed together); it equals add_rows followed by extend, next to running rows."""
    check_add_rows_last(lm, reference, VOCAB, ATOL)
    assert lm.cells_used == 13  # the rows' 4 + 6 + 3 tokens, nothing more


def test_rows_can_all_leave_and_new_ones_join(lm, reference):
    lm.prefill([[1, 2, 3], [4, 5]])
    lm.remove_rows(torch.zeros(0, dtype=torch.int64))
    assert lm.lengths.tolist() == [] and lm.cells_used == 0
    logits = lm.add_rows([[7, 8, 9, 10]])
    torch.testing.assert_close(logits[0], reference([7, 8, 9, 10])[-1], atol=ATOL, rtol=0)
    assert lm.lengths.tolist() == [4]


def random_layer(rng: random.Random, batch: int, before: list[list[bool]], n: int):
    """n nodes per row whose parents are -1 or earlier valid nodes (of this or earlier calls)."""
    tokens = torch.tensor([[rng.randrange(VOCAB) for _ in range(n)] for _ in range(batch)])
    parents = torch.full((batch, n), -1, dtype=torch.int64)
    valid = torch.zeros(batch, n, dtype=torch.bool)
    for b in range(batch):
        for j in range(n):
            known = [i for i, ok in enumerate(before[b] + valid[b, :j].tolist()) if ok]
            valid[b, j] = rng.random() < 0.85
            parents[b, j] = rng.choice([-1, *known])
    return tokens, parents, valid


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tree_nodes_and_committed_paths_match_the_reference(gguf_path, numerics, seed):
    """Trees grown over several calls (branching at cached and at new nodes): each node's logits
    equal those of the row followed by the path to it; after commit_path the row continues as
    if the path had been extended, and every temporary sequence is gone."""
    options, reference, atol = numerics
    lm = LlamaCppLM(gguf_path, n_ctx=512, max_batch=8, threads=1, **options)
    rng = random.Random(seed)
    seqs = [random_seq(rng, 1, 6) for _ in range(3)]
    lm.prefill(seqs)
    for _round in range(3):
        paths: list[list[list[int]]] = [[] for _ in seqs]
        parents_of: list[list[int]] = [[] for _ in seqs]
        valid_of: list[list[bool]] = [[] for _ in seqs]
        for _call in range(rng.randint(1, 3)):
            tokens, parents, valid = random_layer(rng, len(seqs), valid_of, rng.randint(1, 5))
            logits = lm.extend_tree(tokens, parents, valid)
            assert torch.isfinite(logits).all()
            for b, seq in enumerate(seqs):
                for j in range(tokens.shape[1]):
                    parent = int(parents[b, j])
                    path = ([] if parent < 0 else paths[b][parent]) + [int(tokens[b, j])]
                    ok = bool(valid[b, j])
                    paths[b].append(path if ok else [])
                    parents_of[b].append(parent if ok else -1)
                    valid_of[b].append(ok)
                    if ok:
                        expected = reference(seq + path)[-1]
                        torch.testing.assert_close(logits[b, j], expected, atol=atol, rtol=0)
            assert lm.lengths.tolist() == [len(s) for s in seqs]
        kept = []
        for b in range(len(seqs)):
            node, chain = rng.choice([-1] + [i for i, ok in enumerate(valid_of[b]) if ok]), []
            while node >= 0:
                chain.insert(0, node)
                node = parents_of[b][node]
            kept.append(chain)
            seqs[b] += paths[b][chain[-1]] if chain else []
        depth = max(1, *(len(c) for c in kept))
        lm.commit_path(torch.tensor([c + [-1] * (depth - len(c)) for c in kept]))
        assert lm.lengths.tolist() == [len(s) for s in seqs]
        assert lm.cells_used == sum(len(s) for s in seqs)
        assert len(lm._free) == lm.n_seq_max - len(seqs)  # temporary sequences returned
        probe = torch.tensor([[rng.randrange(VOCAB)] for _ in seqs])
        logits = lm.extend(probe, torch.ones(len(seqs), dtype=torch.int64))
        for b, seq in enumerate(seqs):
            seq.append(int(probe[b, 0]))
            torch.testing.assert_close(logits[b, 0], reference(seq)[-1], atol=atol, rtol=0)


def test_open_tree_refuses_linear_calls(lm):
    lm.prefill([[1, 2, 3]])
    with pytest.raises(RuntimeError, match="no tree is open"):
        lm.commit_path(torch.tensor([[0]]))
    lm.extend_tree(torch.tensor([[4, 5, 6]]), torch.tensor([[-1, -1, 0]]), torch.ones(1, 3) > 0)
    for call in (
        lambda: lm.extend(torch.tensor([[1]]), torch.tensor([1])),
        lambda: lm.advance(torch.tensor([[1]]), torch.tensor([1])),
        lambda: lm.truncate(torch.tensor([1])),
        lambda: lm.add_rows([[1]]),
        lambda: lm.remove_rows(torch.tensor([0])),
    ):
        with pytest.raises(RuntimeError, match="tree is open"):
            call()
    with pytest.raises(ValueError, match="path\\[0\\]: expected a chain"):
        lm.commit_path(torch.tensor([[1, 2]]))
    lm.commit_path(torch.tensor([[0, 2]]))
    assert lm.lengths.tolist() == [5]


# ---------------------------------------------------------------------- bad input


def test_missing_and_non_gguf_files_name_the_argument(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=r"^target: expected a GGUF file.*does not exist"):
        LlamaCppLM(missing, argument="target")
    zip_file = tmp_path / "model.gguf"
    zip_file.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    with pytest.raises(ValueError, match=r"^draft: expected a GGUF file \(starting with b'GGUF'\)"):
        LlamaCppLM(zip_file, argument="draft")


@pytest.mark.parametrize("cut_at", [2000, 0.98])
def test_truncated_gguf_is_refused_with_the_reason(gguf_path, tmp_path, cut_at):
    """Cut inside the metadata or inside the tensor data: either way a ValueError naming the
    argument, the file and llama.cpp's reason, before any generation."""
    data = gguf_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(cut_at if cut_at > 1 else len(data) * cut_at)])
    with pytest.raises(ValueError, match=r"^target: expected a GGUF model llama.cpp can load") as e:
        LlamaCppLM(cut, argument="target")
    assert str(cut) in str(e.value)


def test_unsupported_architecture_is_refused_with_its_name(tmp_path):
    path = write_tiny_gguf(tmp_path / "odd.gguf", architecture="notamodel")
    with pytest.raises(ValueError, match=r"^model: expected a GGUF model llama.cpp can load") as e:
        LlamaCppLM(path)
    assert "notamodel" in str(e.value)


def test_load_pair_refuses_a_draft_with_another_tokenizer(gguf_path, tmp_path):
    from specsample.adapters.loading import load_pair

    swapped = list(TOKENS)
    swapped[100], swapped[101] = swapped[101], swapped[100]
    other = write_tiny_gguf(tmp_path / "other.gguf", tokens=swapped)
    with pytest.raises(ValueError, match="2 ids that name different tokens; first at id 100"):
        load_pair(str(gguf_path), str(other), backend="llama.cpp")


def test_load_pair_runs_gguf_files_on_llamacpp(gguf_path):
    from specsample.adapters.loading import load_pair

    pair = load_pair(str(gguf_path), str(gguf_path), backend="llama.cpp", threads=1, n_ctx=256)
    assert pair.backend == "llama.cpp" and "on llama.cpp (1 threads" in pair.description
    assert isinstance(pair.target, LlamaCppLM) and isinstance(pair.draft, LlamaCppLM)
    assert pair.target is not pair.draft and pair.target_config is None
    assert pair.tokenizer.encode("hello") == [TOKENS.index("hello")]
    with pytest.raises(ValueError, match=r"^draft_quantize: expected 'none' with the llama.cpp"):
        load_pair(str(gguf_path), None, backend="llama.cpp", draft_quantize="int8")


def test_load_pair_passes_repack_to_both_models_and_only_on_llamacpp(gguf_path, monkeypatch):
    import specsample.adapters.llamacpp as llamacpp
    from specsample.adapters.loading import load_pair

    monkeypatch.setattr(llamacpp, "amx_kernels", lambda: False)  # not a build with AMX kernels

    plain = load_pair(str(gguf_path), str(gguf_path), backend="llama.cpp", threads=1, n_ctx=256)
    assert not plain.target.repack and not plain.draft.repack
    assert "repacked" not in plain.description
    pair = load_pair(
        str(gguf_path), str(gguf_path), backend="llama.cpp", threads=1, n_ctx=256, repack=True
    )
    assert pair.target.repack and pair.draft.repack
    assert pair.description.endswith(", weights repacked)")
    # The same tokens from both: repacking changes how the weights are laid out, not the model.
    prompt = [[1, 5, 9, 12]]
    assert torch.allclose(plain.target.prefill(prompt), pair.target.prefill(prompt), atol=0.05)
    with pytest.raises(ValueError, match=r"^repack: expected the llama.cpp backend"):
        load_pair(str(gguf_path), None, backend="transformers", repack=True)


def test_amx_kernels_reads_the_builds_system_info(monkeypatch):
    import llama_cpp

    from specsample.adapters.llamacpp import amx_kernels

    info = b"CPU : AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | REPACK = 1 | "
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: info)
    assert amx_kernels() is True
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: info.replace(b"AMX", b"X"))
    assert amx_kernels() is False


def test_a_build_with_amx_kernels_repacks_only_when_asked_and_says_why_not(gguf_path, monkeypatch):
    """llama.cpp's AMX kernels (compiled in on processors with AMX tiles) crash on repacked
    weights: the pair's description says why the weights are not repacked, and a model asked to
    repack them warns (the tiny test model's float32 weights never reach those kernels)."""
    import specsample.adapters.llamacpp as llamacpp
    from specsample.adapters.loading import load_pair

    monkeypatch.setattr(llamacpp, "amx_kernels", lambda: True)
    plain = load_pair(str(gguf_path), None, backend="llama.cpp", threads=1, n_ctx=256)
    assert plain.description.endswith(
        ", weights not repacked: this llama.cpp build's AMX kernels crash on them)"
    )
    with pytest.warns(UserWarning, match=r"^target: repacked weights with a llama.cpp build"):
        pair = load_pair(
            str(gguf_path), None, backend="llama.cpp", threads=1, n_ctx=256, repack=True
        )
    assert pair.target.repack and pair.description.endswith(", weights repacked)")
    monkeypatch.setattr(llamacpp, "amx_kernels", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = load_pair(
            str(gguf_path), None, backend="llama.cpp", threads=1, n_ctx=256, repack=True
        )
    assert other.target.repack


def test_prompt_longer_than_the_context_and_too_many_rows(gguf_path):
    lm = LlamaCppLM(gguf_path, n_ctx=16, max_batch=2, threads=1)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: expected at most n_ctx=16 tokens"):
        lm.prefill([[1, 2], list(range(17))])
    with pytest.raises(ValueError, match=r"^prompts: expected at most max_batch=2 rows in all"):
        lm.prefill([[1], [2], [3]])
    lm.prefill([[1] * 8, [2] * 6])
    with pytest.raises(ValueError, match=r"^prompts: expected at most max_batch=2 rows"):
        lm.add_rows([[3]])
    with pytest.raises(ValueError, match=r"^tokens: expected at most 2 new tokens \(n_ctx=16"):
        lm.extend(torch.tensor([[5, 5], [6, 6]]), torch.tensor([2, 1]))
    assert lm.lengths.tolist() == [8, 6]  # a refused call changes nothing
    lm.extend(torch.tensor([[5, 5], [6, 6]]), torch.tensor([1, 1]))
    lm.remove_rows(torch.tensor([1]))
    with pytest.raises(ValueError, match=r"^prompts: expected at most 9 tokens in all"):
        lm.add_rows([[4] * 10])
    with pytest.raises(ValueError, match=r"^max_batch: expected at most 256"):
        LlamaCppLM(gguf_path, max_batch=300)
    with pytest.raises(ValueError, match=r"^threads: expected a positive integer, got 0"):
        LlamaCppLM(gguf_path, threads=0)
    with pytest.raises(ValueError, match=r"^threads: expected at most 512 \(ggml's thread limit"):
        LlamaCppLM(gguf_path, threads=100_000)  # (it would abort the process in ggml)


def test_resize_gives_an_empty_model_room_for_a_larger_batch(gguf_path, reference):
    """resize() before any row: the context is created again with the new cells and
    sequences (the weights stay), and what did not fit before fits now with the reference's
    logits; a model holding rows refuses it, and bad sizes are named."""
    lm = LlamaCppLM(gguf_path, n_ctx=16, max_batch=2, threads=1, **NUMERICS["float32"][0])
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18]]
    with pytest.raises(ValueError, match=r"^prompts: expected at most max_batch=2 rows"):
        lm.prefill(prompts)
    lm.resize(n_ctx=32, max_batch=3)
    assert (lm.n_ctx, lm.max_batch, lm.batch_size) == (32, 3, 0)
    got = lm.prefill(prompts)
    for b, row in enumerate(prompts):
        assert torch.allclose(got[b], reference(row)[-1], atol=ATOL)
    lm.extend(torch.tensor([[3, 3], [4, 4], [5, 5]]), torch.tensor([2, 2, 2]))
    assert lm.cells_used == 24  # past the old 16 cells
    with pytest.raises(RuntimeError, match=r"^resize: expected a model holding no rows, got"):
        lm.resize(n_ctx=64)
    lm.remove_rows(torch.tensor([], dtype=torch.long))
    lm.resize(n_ctx=64)  # empty again: allowed
    assert lm.n_ctx == 64 and lm.n_ctx_train == 512 and lm.most_rows == 256
    for bad, match in (
        (dict(n_ctx=0), r"^n_ctx: expected a positive integer, got 0"),
        (dict(max_batch=True), r"^max_batch: expected a positive integer, got True"),
        (dict(max_batch=300), r"^max_batch: expected at most 256"),
    ):
        with pytest.raises(ValueError, match=match):
            lm.resize(**bad)
    assert (lm.n_ctx, lm.max_batch) == (64, 3)  # a refused resize changes nothing
    lazy = LlamaCppLM(gguf_path, n_ctx=16, max_batch=1, threads=1, defer=True)
    lazy.resize(n_ctx=48, max_batch=2)
    assert not lazy.loaded and (lazy.n_ctx, lazy.max_batch) == (48, 2)
    lazy.prefill([[1] * 20, [2] * 20])  # loads with the new sizes
    assert lazy.loaded and lazy.cells_used == 40


def test_trees_wider_than_the_free_sequences_are_refused(gguf_path):
    lm = LlamaCppLM(gguf_path, n_ctx=64, max_batch=1, tree_chains=2, threads=1)
    lm.prefill([[1, 2, 3]])
    three_chains = torch.tensor([[-1, -1, -1]])
    with pytest.raises(RuntimeError, match="needs 3 more chains but only 2 of the context's 3"):
        lm.extend_tree(torch.tensor([[4, 5, 6]]), three_chains, torch.ones(1, 3) > 0)
    lm.extend_tree(torch.tensor([[4, 5, 6]]), torch.tensor([[-1, 0, -1]]), torch.ones(1, 3) > 0)
    lm.commit_path(torch.tensor([[0, 1]]))
    assert lm.lengths.tolist() == [5] and len(lm._free) == 2


def test_bad_protocol_arguments_are_refused(lm):
    with pytest.raises(RuntimeError, match="call prefill"):
        lm.extend(torch.tensor([[1]]), torch.tensor([1]))
    lm.prefill([[1, 2, 3]])
    with pytest.raises(ValueError, match="tokens: expected valid token ids"):
        lm.extend(torch.tensor([[VOCAB]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="lengths: expected 0 <= lengths"):
        lm.truncate(torch.tensor([4]))
    with pytest.raises(ValueError, match="prompts\\[0\\]: expected at least one token"):
        lm.add_rows([[]])


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_text_and_parses_special_tokens(lm):
    tok = LlamaCppTokenizer(lm)
    hello, world = TOKENS.index("hello"), TOKENS.index("Ġworld")
    assert tok.encode("hello world") == [hello, world]
    assert tok.encode("hello<|im_end|>") == [hello, EOS]
    text = "héllo, wörld 42!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([hello, EOS], skip_special_tokens=True) == "hello"
    assert tok.decode([hello, EOS]) == "hello<|im_end|>"
    assert tok.eos_token_id == EOS and tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") == TOKENS.index("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|eot_id|>") is None
    assert len(tok) == VOCAB
    partial = tok.encode("é")[:1]  # the first byte of a two-byte character
    assert tok.decode(partial).endswith("\ufffd")
    lm.close()  # frees the context; the tokenizer keeps the model it shares alive
    assert tok.decode(tok.encode(text)) == text


def test_chat_template_comes_from_the_gguf(gguf_path, tmp_path):
    tok = LlamaCppTokenizer(gguf_path)  # vocabulary only, no weights
    assert tok.chat_template == CHAT_TEMPLATE
    meta = read_gguf_metadata(gguf_path, keys=("tokenizer.chat_template",))
    assert meta["tokenizer.chat_template"].decode() == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hello"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == TOKENS.index("<|im_start|>") and tok.decode(ids) == text
    bare = LlamaCppTokenizer(write_tiny_gguf(tmp_path / "bare.gguf", chat_template=None))
    assert bare.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(messages)


# ---------------------------------------------------------------------- through the engine


@pytest.mark.parametrize("shape", [None, "2,2,1"])
def test_greedy_speculative_decoding_equals_target_only(gguf_path, shape):
    """The same file as target and draft, a ragged batch, chains (model drafter) and trees (tree
    drafter): greedy output equals greedy target-only output, in fewer target passes."""
    from specsample.drafters.model import ModelDrafter
    from specsample.drafters.tree import TreeDrafter, TreeShape
    from specsample.engine import generate
    from specsample.warpers import SamplingConfig

    def model() -> LlamaCppLM:
        return LlamaCppLM(gguf_path, n_ctx=512, max_batch=4, threads=1, **NUMERICS["float32"][0])

    prompts = [[259, 264], [5, 70, 101, 33, 7, 8, 9], [104]]

    def run(drafter, rule="token"):
        return generate(
            model(),
            prompts,
            generator=torch.Generator().manual_seed(0),
            drafter=drafter,
            sampling=SamplingConfig(temperature=0),
            max_new_tokens=16,
            draft_length=3,
            rule=rule,
        )

    alone = run(None)
    assert [len(t) for t in alone.tokens] == [16] * len(prompts)
    if shape is None:
        drafted = run(ModelDrafter(model()))
    else:
        drafted = run(TreeDrafter(model(), TreeShape.parse(shape)))
    assert drafted.tokens == alone.tokens
    assert drafted.stats.drafted > 0 and drafted.stats.target_passes < alone.stats.target_passes


def _joint_of_first_two(lm: LlamaCppLM, prompt: list[int], sampling) -> torch.Tensor:
    """float64 [vocab, vocab]: the probability of each first two tokens after `prompt`, from
    the target's own (warped) distributions."""
    from specsample.warpers import logits_to_probs

    first = logits_to_probs(lm.prefill([prompt])[0].double(), sampling)
    support = first.nonzero().flatten().tolist()
    second = lm.prefill([prompt + [a] for a in support]).double()
    joint = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for a, logits in zip(support, second, strict=True):
        joint[a] = first[a] * logits_to_probs(logits, sampling)
    return joint


@pytest.mark.parametrize("rule", ["token", "block", "typical"])
def test_sampled_tokens_follow_the_target_distribution(gguf_path, tmp_path, rule):
    """G-test of the first two sampled tokens (T = 1, top-k 4, drafts of 2) against the target's
    joint distribution, with a similar draft model (acceptance about 0.8): 768 samples, a
    false failure rate of 1e-6 for the exact rules. Negative control: the lossy typical rule
    must fail the same test (measured p about 1e-40)."""
    import specsample.lossy  # noqa: F401  (registers the typical rule)
    from helpers import g_test_p_value
    from specsample.drafters.model import ModelDrafter
    from specsample.engine import generate
    from specsample.warpers import SamplingConfig

    options = dict(n_ctx=2048, max_batch=64, threads=1, **NUMERICS["float32"][0])
    draft_path = write_tiny_gguf(tmp_path / "draft.gguf", mix=(3, 0.03))
    target, draft = LlamaCppLM(gguf_path, **options), LlamaCppLM(draft_path, **options)
    sampling, prompt = SamplingConfig(temperature=1.0, top_k=4), [5, 70, 101]
    expected = _joint_of_first_two(target, prompt, sampling)
    counts = torch.zeros(VOCAB * VOCAB)
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        out = generate(
            target,
            [prompt] * 64,
            generator=generator,
            drafter=ModelDrafter(draft),
            sampling=sampling,
            max_new_tokens=3,
            draft_length=2,
            rule=rule,
        )
        assert out.stats.drafted > 0
        for tokens in out.tokens:
            counts[tokens[0] * VOCAB + tokens[1]] += 1
    p_value = g_test_p_value(counts, expected)
    if rule == "typical":
        assert p_value < 1e-6
    else:
        assert p_value > 1e-6


# ---------------------------------------------------------------------- deferred loading


def test_a_deferred_model_loads_at_its_first_pass_and_gives_the_same_logits(gguf_path):
    """defer=True reads only the file's header and tokenizer until a call needs the weights;
    then it is the model an eager load gives: the same vocabulary and the same logits."""
    eager = LlamaCppLM(gguf_path, n_ctx=64, max_batch=2, threads=1, kv_type="f32")
    lazy = LlamaCppLM(gguf_path, n_ctx=64, max_batch=2, threads=1, kv_type="f32", defer=True)
    assert eager.loaded and not lazy.loaded
    assert lazy.vocab_size == eager.vocab_size == VOCAB
    assert lazy.batch_size == 0 and lazy.cells_used == 0 and lazy.path == eager.path
    assert not lazy.loaded  # none of those reads the weights
    prompts = [[1, 5, 7], [2, 3]]
    first = lazy.prefill(prompts)
    assert lazy.loaded and lazy.load_seconds > 0
    assert torch.equal(first, eager.prefill(prompts))
    step = torch.tensor([[4], [6]])
    counts = torch.tensor([1, 1])
    assert torch.equal(lazy.extend(step, counts), eager.extend(step, counts))


def test_a_deferred_model_closed_unused_never_loads(gguf_path):
    lazy = LlamaCppLM(gguf_path, n_ctx=64, max_batch=1, threads=1, defer=True)
    lazy.close()
    assert lazy.loaded is True  # nothing left to load: a closed model stays closed
    assert lazy._ctx is None and lazy._batch is None  # closed: nothing loads on access
    with pytest.raises(AttributeError, match="_missing_name"):
        _ = lazy._missing_name  # only the names the load sets are loaded on demand
    del lazy


def test_a_deferred_model_refuses_bad_files_at_once(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=r"^draft: expected a GGUF file.*does not exist"):
        LlamaCppLM(missing, argument="draft", defer=True)
    bare = tmp_path / "bare.gguf"
    bare.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    with pytest.raises(ValueError, match=r"^draft: expected a GGUF file \(starting with"):
        LlamaCppLM(bare, argument="draft", defer=True)
    with pytest.raises(ValueError, match=r"^defer: expected True or False, got 'yes'"):
        LlamaCppLM(bare, defer="yes")


def test_a_deferred_model_with_damaged_weights_fails_at_its_first_pass(gguf_path, tmp_path):
    """The weights are read at the first call that needs them: a file cut inside its tensor
    data passes the header check and is refused there, with llama.cpp's reason."""
    data = gguf_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * 0.98)])
    lazy = LlamaCppLM(cut, argument="draft", defer=True, threads=1)
    with pytest.raises(ValueError, match=r"^draft: expected a GGUF model llama.cpp can load"):
        lazy.prefill([[1, 2]])


def test_load_pair_defers_only_the_default_pairs_draft(gguf_path, monkeypatch):
    """defer_draft holds back the default pair's draft (files checked whole when assembled); a
    user's draft file is loaded at once, so that a damaged one is refused before generation."""
    from specsample.adapters import default_pair
    from specsample.adapters.loading import load_pair

    user = load_pair(
        str(gguf_path), str(gguf_path), backend="llama.cpp", threads=1, n_ctx=256, defer_draft=True
    )
    assert user.draft.loaded
    monkeypatch.setattr(default_pair, "gguf_paths", lambda: (gguf_path, gguf_path))
    pair = load_pair(backend="llama.cpp", threads=1, n_ctx=256, defer_draft=True)
    assert pair.target.loaded and not pair.draft.loaded
    assert pair.draft.vocab_size == pair.target.vocab_size
    eager = load_pair(backend="llama.cpp", threads=1, n_ctx=256)
    assert eager.draft.loaded and eager.description == pair.description  # one memory key
    prompt = [[1, 5, 9, 12]]
    assert torch.equal(pair.draft.prefill(prompt), eager.draft.prefill(prompt))
    assert pair.draft.loaded


def test_a_deferred_draft_loads_only_when_the_engine_drafts(gguf_path):
    """Through the engine: a deferred draft that never drafts (draft length 0, as after a
    remembered "drafting does not pay") is never loaded, and the text is target-only's; one
    that drafts loads at its first draft and gives the text an eager draft gives."""
    from specsample.drafters.model import ModelDrafter
    from specsample.engine import generate
    from specsample.warpers import SamplingConfig

    def model(defer=False) -> LlamaCppLM:
        options = NUMERICS["float32"][0]
        return LlamaCppLM(gguf_path, n_ctx=512, max_batch=2, threads=1, defer=defer, **options)

    def run(drafter, k):
        return generate(
            model(),
            [[259, 264], [5, 70, 101]],
            generator=torch.Generator().manual_seed(3),
            drafter=drafter,
            sampling=SamplingConfig(temperature=0.8),
            max_new_tokens=12,
            draft_length=k,
            eos_token_ids=(),
        )

    idle = model(defer=True)
    alone = run(None, 0)
    assert run(ModelDrafter(idle), 0).tokens == alone.tokens
    assert not idle.loaded
    lazy = model(defer=True)
    drafted = run(ModelDrafter(lazy), 3)
    assert lazy.loaded and drafted.stats.draft_passes > 0
    assert drafted.tokens == run(ModelDrafter(model()), 3).tokens


def test_a_deferred_models_vocabulary_size_may_come_from_the_caller(gguf_path, monkeypatch):
    """load_pair has read the draft's token list to compare the tokenizers: the deferred
    draft takes its length from there instead of reading the file again. A size that does not
    match the weights is refused when they load; a size without defer, or not a positive
    integer, at once."""
    import specsample.adapters.llamacpp as module
    from specsample.adapters import default_pair
    from specsample.adapters.loading import load_pair

    reads = []
    real = module.read_gguf_tokenizer
    monkeypatch.setattr(module, "read_gguf_tokenizer", lambda *a: reads.append(a) or real(*a))
    monkeypatch.setattr(default_pair, "gguf_paths", lambda: (gguf_path, gguf_path))
    pair = load_pair(backend="llama.cpp", threads=1, n_ctx=256, defer_draft=True)
    assert not pair.draft.loaded and pair.draft.vocab_size == VOCAB and reads == []
    LlamaCppLM(gguf_path, threads=1, defer=True)
    assert len(reads) == 1  # without the size, the model reads it itself
    wrong = LlamaCppLM(gguf_path, argument="draft", threads=1, defer=True, vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match=rf"^draft: expected {VOCAB + 1} tokens"):
        wrong.prefill([[1, 2]])
    for bad, defer in ((VOCAB, False), (0, True), (True, True), (3.0, True)):
        with pytest.raises(ValueError, match=r"^vocab_size: expected None, or a positive"):
            LlamaCppLM(gguf_path, threads=1, defer=defer, vocab_size=bad)
