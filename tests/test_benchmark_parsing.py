"""The pure parts of benchmarks/llamacpp_speed.py: reading llama-speculative-simple's printed
statistics, counting prompt lookup's accepted drafts, and the cost-curve interpolation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"

# The end of a real run (llama-speculative-simple from llama-cpp-python 0.3.36's sources, the
# default pair, -n 16, T 0.7), with the log prefixes this build prints.
CAPTURED = """\
<|im_start|>assistant
```python
class ListNode:
    def __init__(self, val=0, next=None):
0.17.853.898 I common_speculative_init_result: loading draft model 'draft.gguf'
1.46.658.423 I encoded   41 tokens in   18.258 seconds, speed:    2.246 t/s
1.46.658.425 I decoded   20 tokens in   50.796 seconds, speed:    0.394 t/s
1.46.658.425 I
1.46.658.426 I n_draft   = 3
1.46.658.426 I n_predict = 20
1.46.658.426 I n_drafted = 17
1.46.658.427 I n_accept  = 14
1.46.658.427 I accept    = 82.353%
1.46.658.427 I
1.46.658.428 I draft:
1.46.658.487 I
1.46.658.487 I target:
1.46.658.493 I common_perf_print:        load time =   14440.10 ms
"""

STATS_LINE = (
    "statistics     draft-simple: #calls(b,g,a) =    1     40     40, #gen drafts =     40, "
    "#acc drafts =    35, #gen tokens =    120, #acc tokens =    90, dur(b,g,a) = 0.010, "
    "1234.500, 0.020 ms\n"
)


def load(name: str):
    if str(BENCHMARKS) not in sys.path:  # the scripts import their siblings by name
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def contenders():
    return load("llamacpp_contenders")


@pytest.fixture(scope="module")
def tool():
    return load("llamacpp_tool")


def test_parse_speculative_simple_reads_the_final_statistics(tool):
    out = tool.parse_speculative_simple(CAPTURED)
    assert out["encoded_tokens"] == 41 and out["encoded_seconds"] == pytest.approx(18.258)
    assert out["decoded_tokens"] == 20 and out["decoded_seconds"] == pytest.approx(50.796)
    assert (out["n_draft"], out["n_predict"], out["n_drafted"], out["n_accept"]) == (3, 20, 17, 14)
    # each step emits its accepted drafts plus one token of the target
    assert out["steps"] == 6
    assert out["seconds"] == pytest.approx(18.258 + 50.796)
    assert (out["new_tokens"], out["row_steps"], out["drafted"], out["accepted"]) == (20, 6, 17, 14)
    assert "draft_type" not in out  # this build prints no draft statistics line by default


def test_parse_speculative_simple_reads_the_draft_statistics_line_when_printed(tool):
    out = tool.parse_speculative_simple(CAPTURED + STATS_LINE)
    assert out["draft_type"] == "draft-simple"
    assert out["draft_calls"] == 40
    assert out["draft_ms"] == pytest.approx(1234.5)


def test_parse_speculative_simple_names_a_missing_line(tool):
    with pytest.raises(ValueError, match="n_accept"):
        tool.parse_speculative_simple(CAPTURED.replace("n_accept", "n_acc"))


def test_lookup_acceptance_counts_kept_drafts_and_leaves_out_a_cut_pass(contenders):
    out = [10, 11, 12, 13, 14, 15, 16]
    evals = [
        (1, [10, 11, 12, 99]),  # drafts 11, 12, 99: two kept, then 13 was sampled
        (4, [13, 14, 15]),  # drafts 14, 15: both kept, bonus 16
        (7, [16, 17]),  # after the last token: its outcome was never seen
    ]
    assert contenders.lookup_acceptance(evals, out) == (5, 4)


def test_lookup_acceptance_with_no_drafts(contenders):
    assert contenders.lookup_acceptance([(1, [5]), (2, [6])], [4, 5, 6]) == (0, 0)


def test_interp_is_linear_between_and_beyond_the_measured_sizes():
    report = load("llamacpp_report")
    curve = {1: 10.0, 2: 12.0, 4: 20.0}
    assert report.interp(curve, 2) == 12.0
    assert report.interp(curve, 3) == pytest.approx(16.0)
    assert report.interp(curve, 6) == pytest.approx(28.0)  # the last segment's slope


def test_paired_ratio_is_the_median_of_the_per_repeat_ratios():
    report = load("llamacpp_report")

    def cell(*seconds):
        return report.Cell(runs=[{"seconds": s, "new_tokens": 96} for s in seconds])

    ours, base = cell(10.0, 12.0, 9.0), cell(10.5, 12.0, 9.9)
    # per repeat: 1.05, 1.0, 1.1; the ratio of medians (10.5 / 10.0) is 1.05 too
    assert report.paired_ratio(ours, base) == pytest.approx(1.05)
    # ours' third run fell in a slow minute, the baseline's not: it moves only its own
    # repeat's ratio, while the ratio of medians drops to 10.5 / 12.0
    slow = cell(10.0, 12.0, 15.0)
    assert report.paired_ratio(slow, base) == pytest.approx(1.0)
    assert slow.tokens_per_second / base.tokens_per_second == pytest.approx(0.875)
    assert report.paired_ratio(cell(10.0), base) is None  # repeats do not pair up
