"""Small models for tests: exact next-token tables over short prefixes (float64), and the one
builder of tiny random-weight transformers models (`tiny_config`, `tiny_causal_lm`)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from specsample.rules import draw_uniforms

CASE_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# logits dtype -> the dtype of the probabilities the warpers return (float64 kept, the rest
# computed in float32)
WARPED_DTYPES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
]


def random_distribution(
    vocab: int, generator: torch.Generator, *, sharpness: float = 1.0, zeros: int = 0
) -> torch.Tensor:
    """A random float64 distribution [vocab]; `zeros` ids get probability exactly 0."""
    logits = torch.randn(vocab, generator=generator, dtype=torch.float64) * sharpness
    if zeros:
        off = torch.randperm(vocab, generator=generator)[:zeros]
        logits[off] = float("-inf")
    return torch.softmax(logits, dim=0)


class TablePrefixModel:
    """prefix -> distribution, drawn once per prefix from a seeded generator (memoised)."""

    def __init__(self, vocab: int, seed: int, *, sharpness: float = 1.0, zeros: int = 0):
        self.vocab = vocab
        self.seed = seed
        self.sharpness = sharpness
        self.zeros = zeros
        self.table: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in self.table:
            g = torch.Generator().manual_seed(hash((self.seed, prefix)) % (2**62))
            self.table[prefix] = random_distribution(
                self.vocab, g, sharpness=self.sharpness, zeros=self.zeros
            )
        return self.table[prefix]


class ConstantModel:
    """The same distribution after every prefix."""

    def __init__(self, probs):
        self.probs = torch.as_tensor(probs, dtype=torch.float64)

    def __call__(self, prefix: tuple[int, ...]) -> torch.Tensor:
        return self.probs


def g_test_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """p-value of the G-test of observed counts against expected probabilities (cells with
    expected probability 0 must be empty, otherwise the p-value is 0)."""
    observed = observed.flatten().to(torch.float64)
    expected = expected_probs.flatten().to(torch.float64) * observed.sum()
    if bool((observed[expected == 0] > 0).any()):
        return 0.0
    cells = expected > 0
    o, e = observed[cells], expected[cells]
    g = 2 * float(torch.where(o > 0, o * torch.log(o / e), torch.zeros_like(o)).sum())
    return float(chi2.sf(g, df=int(cells.sum()) - 1))


def g_statistic(observed: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """(G statistic, degrees of freedom) of observed counts against expected probabilities; G is
    infinite when a cell of expected probability 0 is not empty. Several independent G statistics
    add up, and so do their degrees of freedom (a test over groups of fixed sizes)."""
    observed = observed.flatten().to(torch.float64)
    expected = expected_probs.flatten().to(torch.float64) * observed.sum()
    cells = expected > 0
    if bool((observed[~cells] > 0).any()):
        return float("inf"), int(cells.sum()) - 1
    o, e = observed[cells], expected[cells]
    g = 2 * float(torch.where(o > 0, o * torch.log(o / e), torch.zeros_like(o)).sum())
    return g, int(cells.sum()) - 1


class Tables:
    """All next-token distributions of a prefix model up to a depth, as one tensor, so that a
    whole batch of prefixes is looked up at once. Prefix codes: code * (vocab + 1) + token + 1."""

    def __init__(self, model, vocab: int, depth: int):
        self.vocab = vocab
        size = (vocab + 1) ** (depth + 1)
        self.table = torch.zeros(size, vocab, dtype=torch.float64)
        self._fill(model, (), 0, depth)

    def _fill(self, model, prefix, code, depth):
        self.table[code] = model(prefix)
        if len(prefix) < depth:
            for token in range(self.vocab):
                self._fill(model, prefix + (token,), self.extend(code, token), depth)

    def extend(self, code, token):
        return code * (self.vocab + 1) + token + 1

    def __getitem__(self, codes):
        return self.table[codes]


def joint_counts(first_two, vocab):
    return torch.bincount(first_two[:, 0] * vocab + first_two[:, 1], minlength=vocab * vocab)


def target_joint(target_model, vocab):
    return torch.stack([target_model((a,)) * target_model(())[a] for a in range(vocab)])


# The tiny transformers model every adapter, drafter and CLI test builds: 2 layers, hidden 32,
# 4 query heads sharing 2 key/value heads (grouped-query attention, as in the default pair).
TINY_CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}


def tiny_config(arch: str = "qwen2", **overrides):
    """The transformers config of a tiny `arch` ("qwen2" or "llama") model: TINY_CONFIG with
    `overrides` (any config field, e.g. vocab_size=300, num_hidden_layers=1)."""
    import transformers

    config_name, _ = ARCHITECTURES[arch]
    return getattr(transformers, config_name)(**{**TINY_CONFIG, **overrides})


def tiny_causal_lm(arch: str = "qwen2", *, seed: int = 0, attn: str = "sdpa", **overrides):
    """A float32 random-weight causal LM in eval mode, initialised after torch.manual_seed(seed)
    (so the same seed and config give the same weights)."""
    import transformers

    _, model_name = ARCHITECTURES[arch]
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model_cls = getattr(transformers, model_name)
    model = model_cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


# Random inputs for the rule functions (fast rule against its reference).


def random_logits(shape, vocab, generator, *, sharpness, zero_fraction):
    """float64 [*shape, vocab] logits; about zero_fraction of the ids are -inf (probability
    exactly 0), never a whole row."""
    logits = torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * sharpness
    off = torch.rand(*shape, vocab, generator=generator) < zero_fraction
    keep = torch.randint(0, vocab, (*shape, 1), generator=generator)
    off.scatter_(-1, keep, False)
    return logits.masked_fill(off, float("-inf"))


def random_case(seed, *, batch=None, k=None, vocab=None, dtype=None, point_mass=None):
    """A random verification input for the rule functions (draft ids valid everywhere, padding
    included) and its uniforms. Drafts are drawn from the rounded draft distributions, so every
    drafted token has positive draft probability."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    batch = batch or int(torch.randint(1, 65, (1,), generator=g))
    k = int(torch.randint(0, 6, (1,), generator=g)) if k is None else k
    vocab = vocab or pick(
        [2, 3, 5, 17, 100, 1023, 1024, 1025, 3000, int(torch.randint(2, 3001, (1,), generator=g))]
    )
    dtype = dtype or pick(CASE_DTYPES)
    point_mass = bool(torch.rand(1, generator=g) < 0.3) if point_mass is None else point_mass
    zero_fraction = pick([0.0, 0.3, 0.7])
    sharpness = pick([0.5, 2.0, 6.0])

    target_logits = random_logits((batch, k + 1), vocab, g, sharpness=sharpness, zero_fraction=0)
    # Drafts close to the target (so drafts are often kept), with their own exact zeros.
    noise = random_logits((batch, k), vocab, g, sharpness=1.0, zero_fraction=zero_fraction)
    draft_logits = target_logits[:, :k] + pick([0.1, 1.0]) * noise
    target_zeros = torch.rand(batch, k + 1, vocab, generator=g) < zero_fraction / 2
    target_zeros[..., 0] = False  # never a whole row
    target_logits = target_logits.masked_fill(target_zeros, float("-inf"))
    target_probs = torch.softmax(target_logits, dim=-1).to(dtype)
    draft_probs = torch.softmax(draft_logits, dim=-1).to(dtype)

    if point_mass:
        # Argmax drafting (often kept) mixed with arbitrary ids (often p(x) = 0).
        greedy = target_logits[:, :k].argmax(dim=-1)
        arbitrary = torch.randint(0, vocab, (batch, k), generator=g)
        draft_tokens = torch.where(torch.rand(batch, k, generator=g) < 0.7, greedy, arbitrary)
        draft_probs = None
    elif k:
        rows = draft_probs.to(torch.float64).reshape(-1, vocab)
        draft_tokens = torch.multinomial(rows, 1, generator=g).reshape(batch, k)
    else:
        draft_tokens = torch.zeros(batch, 0, dtype=torch.int64)

    draft_lengths = torch.randint(0, k + 1, (batch,), generator=g)
    draft_lengths[0] = 0
    draft_lengths[-1] = k
    accept_uniforms, sample_uniforms = draw_uniforms(batch, k, g, torch.device("cpu"))
    return (
        draft_tokens,
        draft_probs,
        target_probs,
        draft_lengths,
        accept_uniforms,
        sample_uniforms,
    )


def random_forest(n, generator):
    """int64 [n]: parents[j] uniform in [-1, j)."""
    return torch.tensor(
        [int(torch.randint(-1, j, (1,), generator=generator)) for j in range(n)], dtype=torch.int64
    )


def drop_subtrees(valid, parents, generator, rate):
    """valid with each node dropped with probability `rate`, together with its descendants."""
    valid = valid & (torch.rand(valid.shape, generator=generator) >= rate)
    for j, parent in enumerate(parents.tolist()):
        if parent >= 0:
            valid[:, j] &= valid[:, parent]
    return valid


def random_tree_case(seed, *, batch, n, vocab, dtype, point_mass=False, parents=None):
    """Inputs for tree_rule: node j's draft row is close to the target at its parent (so nodes
    are often kept) and its token is drawn from that row (rounded to dtype), or, for point-mass
    drafts, is the parent's target argmax or an arbitrary id (often p(x) = 0). Row 0 has no
    valid node; about 1 node in 5 is dropped with its subtree."""
    g = torch.Generator().manual_seed(seed)
    parents = random_forest(n, g) if parents is None else parents
    logits = torch.randn(batch, n + 1, vocab, generator=g, dtype=torch.float64) * 2
    zeros = torch.rand(batch, n + 1, vocab, generator=g) < 0.2
    zeros[..., 0] = False  # never a whole row
    target_probs = torch.softmax(logits.masked_fill(zeros, float("-inf")), dim=-1).to(dtype)
    at_parent = logits[:, parents + 1]  # [batch, n, vocab]
    noise = torch.randn(batch, n, vocab, generator=g, dtype=torch.float64)
    draft_probs = torch.softmax(at_parent + noise, dim=-1).to(dtype)
    if point_mass:
        greedy = at_parent.argmax(dim=-1)
        arbitrary = torch.randint(0, vocab, (batch, n), generator=g)
        draft_tokens = torch.where(torch.rand(batch, n, generator=g) < 0.7, greedy, arbitrary)
        draft_probs = None
    elif n:
        rows = draft_probs.to(torch.float64).reshape(-1, vocab)
        draft_tokens = torch.multinomial(rows, 1, generator=g).reshape(batch, n)
    else:
        draft_tokens = torch.zeros(batch, 0, dtype=torch.int64)
    node_valid = drop_subtrees(torch.ones(batch, n, dtype=torch.bool), parents, g, 0.2)
    node_valid[0] = False
    accept_uniforms = torch.rand(batch, n, generator=g, dtype=torch.float64)
    sample_uniforms = torch.rand(batch, generator=g, dtype=torch.float64)
    return (
        draft_tokens,
        parents,
        draft_probs,
        target_probs,
        node_valid,
        accept_uniforms,
        sample_uniforms,
    )


def check_add_rows_last(lm, reference, vocab: int, atol: float) -> None:
    """An adapter's `add_rows_last` (PromptScoring) next to a running row: the logits after the
    last tokens of each new prompt equal reference(seq) [len(seq), vocab] (a fresh forward of
    the sequence), a prompt shorter than `last` fills the last columns, every row continues
    exactly, and a bad `last` is refused by name. Leaves lm holding rows of lengths 4, 6, 3."""
    lm.prefill([[1, 2, 3]])
    new = [[4, 5, 6, 7, 8], [9, 10]]  # the second shorter than `last`: its first column is junk
    logits = lm.add_rows_last(new, 3)
    assert logits.shape == (2, 3, vocab) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], reference(new[0])[-3:], atol=atol, rtol=0)
    torch.testing.assert_close(logits[1, 1:], reference(new[1]), atol=atol, rtol=0)
    assert lm.lengths.tolist() == [3, 5, 2]
    step = lm.extend(torch.tensor([[11], [12], [13]]), torch.ones(3, dtype=torch.int64))
    for b, seq in enumerate([[1, 2, 3, 11], new[0] + [12], new[1] + [13]]):
        torch.testing.assert_close(step[b, 0], reference(seq)[-1], atol=atol, rtol=0)
    with pytest.raises(ValueError, match="last: expected an int >= 1, got 0"):
        lm.add_rows_last([[1]], 0)
