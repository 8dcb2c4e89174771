"""`specsample explain`, run in-process through `main`."""

from __future__ import annotations

import math
import re
import sys

import pytest
import torch

from specsample.cli import explain
from specsample.cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def simulation_rows(out: str) -> dict[str, tuple[float, float]]:
    """token -> (P, observed) from the simulation table."""
    section = out.split("Simulation:", 1)[1].split("acceptance rate", 1)[0]
    rows = re.findall(r"^  (\S+)\s+([\d.]+)\s+([\d.]+)\s", section, flags=re.MULTILINE)
    return {label: (float(p), float(observed)) for label, p, observed in rows}


def test_default_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    assert "beta = sum min(P, Q) = 0.7500" in out
    assert "A: 0.2500 + 0.2500 * 0.0000 = 0.2500 = P(A)" in out
    assert "B: 0.5000 + 0.2500 * 1.0000 = 0.7500 = P(B)" in out
    # The wrong rule (recovered token drawn from P): min(P, Q) + (1 - beta) * P.
    assert "A: 0.2500 + 0.2500 * 0.2500 = 0.3125" in out
    assert "B: 0.5000 + 0.2500 * 0.7500 = 0.6875" in out
    assert "\033[" not in out  # no colours when stdout is not a terminal

    # N = 100000 steps. Each observed frequency is a binomial proportion with standard deviation
    # sqrt(p (1 - p) / N) <= 0.0016; allowing 6 standard deviations (plus 5e-5 for the 4 printed
    # decimals), a correct sampler fails a check with probability about 2e-9 for a random seed
    # (the seed is fixed, so the test is deterministic anyway).
    n = 100_000
    rows = simulation_rows(out)
    assert set(rows) == {"A", "B"}
    for p, observed in rows.values():
        assert abs(observed - p) <= 6 * math.sqrt(p * (1 - p) / n) + 5e-5
    acceptance = float(re.search(r"acceptance rate  observed ([\d.]+)", out)[1])
    assert abs(acceptance - 0.75) <= 6 * math.sqrt(0.75 * 0.25 / n) + 5e-5
    assert re.search(r"p-value = [\d.e-]+: consistent with P", out)

    png = tmp_path / "explain.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "PNG written to explain.png" in out


def test_custom_three_tokens_without_png(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rng_state = torch.get_rng_state()
    args = [
        "explain",
        "--target",
        "0.5,0.3,0.2",
        "--draft",
        "1/5,3/10,1/2",
        "--labels",
        "x,y,z",
        "--samples",
        "2000",
        "--seed",
        "7",
        "--no-png",
    ]
    assert main(args) == 0
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is never used
    assert list(tmp_path.iterdir()) == []
    out = capsys.readouterr().out
    # min(P, Q) = (0.2, 0.3, 0.2), beta = 0.7, residual = norm(0.3, 0, 0) = (1, 0, 0).
    assert "beta = sum min(P, Q) = 0.7000" in out
    assert "x: 0.2000 + 0.3000 * 1.0000 = 0.5000 = P(x)" in out
    assert "y: 0.3000 + 0.3000 * 0.0000 = 0.3000 = P(y)" in out
    assert "z: 0.2000 + 0.3000 * 0.0000 = 0.2000 = P(z)" in out
    assert "x: 0.2000 + 0.3000 * 0.5000 = 0.3500" in out  # the wrong rule
    assert set(simulation_rows(out)) == {"x", "y", "z"}
    assert "PNG" not in out


@pytest.mark.parametrize(
    ("args", "option", "expected"),
    [
        (["--draft", "0.2,0.3,0.5"], "--draft", "expected 2 probabilities"),
        (["--target", "1.25,-0.25"], "--target", "expected non-negative probabilities"),
        (["--draft", "0.5,0.6"], "--draft", "expected probabilities summing to 1"),
        (["--target", "a,b"], "--target", "'a' is not a number"),
        (["--target", "nan,1"], "--target", "'nan' is not a number"),
        (["--target", "1"], "--target", "expected at least 2 probabilities"),
        (["--labels", "A,B,C"], "--labels", "expected 2 distinct"),
        (["--samples", "0"], "--samples", "expected a positive number"),
        (["--samples", "many"], "--samples", "invalid int value"),
    ],
)
def test_bad_input_exits_2_naming_the_option(args, option, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["explain", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage: specsample explain" in captured.err
    assert option in captured.err
    assert expected in captured.err
    assert list(tmp_path.iterdir()) == []


def test_png_needs_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    assert main(["explain", "--samples", "100"]) == 0
    assert "pip install" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_unwritable_png_path(tmp_path, capsys):
    path = tmp_path / "missing" / "x.png"
    assert main(["explain", "--samples", "100", "--png", str(path)]) == 1
    assert "could not write" in capsys.readouterr().err


def test_top_level_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"specsample {__import__('specsample').__version__}"
    assert main(["--help"]) == 0
    assert "explain" in capsys.readouterr().out
    assert main(["explain", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--target", "--draft", "--labels", "--samples", "--seed", "--png", "--no-png"):
        assert option in help_text
    assert main([]) == 2  # a command is required


def test_chi_square_p_value():
    # X^2 = (60-50)^2/50 + (40-50)^2/50 = 4 with 1 degree of freedom: p = P(chi2_1 > 4) =
    # erfc(sqrt(2)) = 0.0455.
    statistic, df, p_value = explain.chi_square(
        torch.tensor([60, 40]), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )
    assert (statistic, df) == (pytest.approx(4.0), 1)
    assert p_value == pytest.approx(math.erfc(math.sqrt(2)), rel=1e-9)
    # A count on a token with probability 0 is impossible: p-value 0.
    assert explain.chi_square(torch.tensor([5, 1]), torch.tensor([1.0, 0.0]))[2] == 0.0
    scipy_stats = pytest.importorskip("scipy.stats")
    counts = torch.tensor([30, 20, 25, 25])
    probs = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    expected = scipy_stats.chisquare(counts.numpy(), (probs * 100).numpy())
    statistic, df, p_value = explain.chi_square(counts, probs)
    assert statistic == pytest.approx(expected.statistic)
    assert df == 3
    assert p_value == pytest.approx(expected.pvalue, rel=1e-9)
