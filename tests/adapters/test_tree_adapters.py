"""Token trees through the model adapters: every node's logits must equal a fresh forward of the
row followed by the path to that node, and after `commit_path` the model must behave exactly as
if the kept path had been appended with `extend` (caches of both models end consistent with the
accepted path)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import TINY_CONFIG, tiny_causal_lm  # noqa: E402
from specsample.adapters.hf import HFCausalLM  # noqa: E402
from specsample.adapters.protocol import TreeLanguageModel  # noqa: E402
from specsample.adapters.toy import ToyLM  # noqa: E402

VOCAB = TINY_CONFIG["vocab_size"]
ATOL = 1e-4


def _hf(arch: str, attn: str) -> tuple[TreeLanguageModel, Callable[[list[int]], torch.Tensor]]:
    model = tiny_causal_lm(arch, attn=attn)

    @torch.inference_mode()
    def last_logits(seq: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()

    return HFCausalLM(model, compact_slack=4), last_logits


def _toy() -> tuple[TreeLanguageModel, Callable[[list[int]], torch.Tensor]]:
    toy = ToyLM(VOCAB, seed=5)
    return toy, toy.logits_for


ADAPTERS = {
    "qwen2-sdpa": lambda: _hf("qwen2", "sdpa"),
    "llama-eager": lambda: _hf("llama", "eager"),
    "toy": _toy,
}


@pytest.fixture(params=sorted(ADAPTERS))
def adapter(request: pytest.FixtureRequest):
    return ADAPTERS[request.param]()


def random_tree(rng: random.Random, batch: int, before: list[list[bool]], n: int):
    """A random layer of n nodes per row whose parents are -1 or earlier valid nodes."""
    tokens = torch.tensor([[rng.randrange(VOCAB) for _ in range(n)] for _ in range(batch)])
    parents = torch.full((batch, n), -1, dtype=torch.int64)
    valid = torch.zeros(batch, n, dtype=torch.bool)
    for b in range(batch):
        for j in range(n):
            known = [i for i, ok in enumerate(before[b] + valid[b, :j].tolist()) if ok]
            valid[b, j] = rng.random() < 0.85
            parents[b, j] = rng.choice([-1, *known])
    return tokens, parents, valid


def test_adapters_implement_the_tree_protocol(adapter) -> None:
    lm, _ = adapter
    assert isinstance(lm, TreeLanguageModel)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_nodes_and_committed_paths_match_fresh_forwards(adapter, seed: int) -> None:
    lm, last_logits = adapter
    rng = random.Random(seed)
    seqs = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))] for _ in range(3)]
    lm.prefill(seqs)
    for _ in range(4):
        # A linear extend with ragged rows, so the tree starts after holes and padding.
        n = rng.randint(1, 3)
        tokens = torch.tensor([[rng.randrange(VOCAB) for _ in range(n)] for _ in seqs])
        num_valid = torch.tensor([rng.randint(0, n) for _ in seqs])
        lm.extend(tokens, num_valid)
        for b, seq in enumerate(seqs):
            seq += tokens[b, : int(num_valid[b])].tolist()
        # A tree grown over two calls.
        paths: list[list[list[int]]] = [[] for _ in seqs]
        parents_of: list[list[int]] = [[] for _ in seqs]
        valid_of: list[list[bool]] = [[] for _ in seqs]
        for _call in range(2):
            tokens, parents, valid = random_tree(rng, len(seqs), valid_of, rng.randint(1, 4))
            logits = lm.extend_tree(tokens, parents, valid)
            assert torch.isfinite(logits).all()
            for b, seq in enumerate(seqs):
                for j in range(tokens.shape[1]):
                    parent = int(parents[b, j])
                    path = ([] if parent < 0 else paths[b][parent]) + [int(tokens[b, j])]
                    paths[b].append(path if bool(valid[b, j]) else [])
                    parents_of[b].append(parent if bool(valid[b, j]) else -1)
                    valid_of[b].append(bool(valid[b, j]))
                    if valid[b, j]:
                        torch.testing.assert_close(
                            logits[b, j], last_logits(seq + path), atol=ATOL, rtol=0
                        )
            assert lm.lengths.tolist() == [len(s) for s in seqs]  # nodes are not committed
        # Keep a random root-to-node path per row (possibly empty).
        kept = []
        for b in range(len(seqs)):
            ends = [-1] + [i for i, ok in enumerate(valid_of[b]) if ok]
            node, chain = rng.choice(ends), []
            while node >= 0:
                chain.insert(0, node)
                node = parents_of[b][node]
            kept.append(chain)
            seqs[b] += [] if not chain else paths[b][chain[-1]]
        depth = max(1, max(len(c) for c in kept))
        lm.commit_path(torch.tensor([c + [-1] * (depth - len(c)) for c in kept]))
        assert lm.lengths.tolist() == [len(s) for s in seqs]
        # The next linear pass sees exactly the committed sequences.
        probe = torch.tensor([[rng.randrange(VOCAB)] for _ in seqs])
        logits = lm.extend(probe, torch.ones(len(seqs), dtype=torch.int64))
        for b, seq in enumerate(seqs):
            seq.append(int(probe[b, 0]))
            torch.testing.assert_close(logits[b, 0], last_logits(seq), atol=ATOL, rtol=0)
        keep = [max(1, len(s) - rng.randint(0, 2)) for s in seqs]
        lm.truncate(torch.tensor(keep))
        seqs = [s[:k] for s, k in zip(seqs, keep, strict=True)]


def test_open_tree_refuses_linear_calls_and_bad_paths(adapter) -> None:
    lm, _ = adapter
    lm.prefill([[1, 2, 3]])
    with pytest.raises(RuntimeError, match="commit_path"):
        lm.commit_path(torch.tensor([[0]]))
    tokens = torch.tensor([[4, 5, 6]])
    lm.extend_tree(tokens, torch.tensor([[-1, -1, 0]]), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="tree is open"):
        lm.extend(torch.tensor([[1]]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="tree is open"):
        lm.truncate(torch.tensor([1]))
    with pytest.raises(ValueError, match="path\\[0\\]: expected a chain"):
        lm.commit_path(torch.tensor([[1, 2]]))  # 2 hangs under 0, not 1
    with pytest.raises(ValueError, match="path\\[0\\]: expected ids of valid nodes"):
        lm.commit_path(torch.tensor([[7]]))
    lm.commit_path(torch.tensor([[0, 2]]))
    assert lm.lengths.tolist() == [5]


def test_extend_tree_rejects_bad_parents_and_tokens(adapter) -> None:
    lm, _ = adapter
    lm.prefill([[1, 2, 3]])
    ones = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="parents: expected -1 or the id of an earlier node"):
        lm.extend_tree(torch.tensor([[4, 5]]), torch.tensor([[1, -1]]), ones)
    with pytest.raises(ValueError, match="parents: expected valid parent"):
        lm.extend_tree(
            torch.tensor([[4, 5]]), torch.tensor([[-1, 0]]), torch.tensor([[False, True]])
        )
    with pytest.raises(ValueError, match="tokens: expected valid token ids"):
        lm.extend_tree(torch.tensor([[4, VOCAB]]), torch.tensor([[-1, 0]]), ones)
    with pytest.raises(TypeError, match="valid: expected a bool tensor"):
        lm.extend_tree(torch.tensor([[4, 5]]), torch.tensor([[-1, 0]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="parents: expected the shape of tokens"):
        lm.extend_tree(torch.tensor([[4, 5]]), torch.tensor([[-1]]), ones)
