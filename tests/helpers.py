"""Small exact "models" for tests: next-token tables over short prefixes, in float64."""

from __future__ import annotations

import torch


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
