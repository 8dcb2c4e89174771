"""Small models for tests: exact next-token tables over short prefixes (float64), and the one
builder of tiny random-weight transformers models (`tiny_config`, `tiny_causal_lm`)."""

from __future__ import annotations

import torch
from scipy.stats import chi2


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
