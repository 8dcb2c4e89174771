"""`specsample generate --rule coupled`: the text for a seed is the same whichever drafter, draft
length or tree speculates, at temperature 1 with top-p (tiny random transformers models in
float32; the K-token and 1-token passes round alike enough that no Gumbel-max pick flips here)."""

from __future__ import annotations

import pytest
from test_generate_cli import run_json, tiny_pair  # noqa: F401 (a fixture)

SAMPLING = ["--temperature", "1.0", "--top-p", "0.9", "--seed", "5"]


@pytest.mark.parametrize(
    "options",
    [
        ["--drafter", "model", "--k", "3"],
        ["--drafter", "model", "--tree", "2x2"],
        ["--drafter", "ngram", "--k", "2"],
    ],
)
def test_coupled_text_is_the_same_with_any_drafter(tiny_pair, capsys, options):  # noqa: F811
    target, draft = tiny_pair
    common = ["def reverse(head):", "--target", target, "--rule", "coupled", *SAMPLING]
    baseline = run_json(capsys, *common, "--drafter", "none")
    off = ["--draft-confidence", "0", "--draft-survival", "0"]  # the tiny draft is unsure
    speculative = run_json(capsys, *common, "--draft", draft, *off, *options)
    assert speculative["texts"] == baseline["texts"]
    assert "coupled" in speculative["stats"]["rules_used"]


def test_token_rule_text_differs_between_drafters(tiny_pair, capsys):  # noqa: F811
    """Negative control: with the p/q rule the same seed gives other text once a drafter runs."""
    target, draft = tiny_pair
    common = ["def reverse(head):", "--target", target, "--rule", "token", *SAMPLING]
    baseline = run_json(capsys, *common, "--drafter", "none")
    off = ["--draft-confidence", "0", "--draft-survival", "0"]
    speculative = run_json(capsys, *common, "--draft", draft, *off, "--k", "3")
    assert speculative["texts"] != baseline["texts"]
