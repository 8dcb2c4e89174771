"""`specsample audit verifier`, run in-process through `main`: exit codes 0 / 1 / 2 and the
report files."""

from __future__ import annotations

import json

from specsample.cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--samples", "10000", "--cases", "worked_example,point_mass", "--quiet"]


def test_exact_rule_exits_0_and_writes_the_reports(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["audit", "verifier", "ours:token", *SMALL, "--out", str(out)]) == 0
    assert "verdict: pass" in capsys.readouterr().out
    data = json.loads((out / "audit.json").read_text())
    assert data["verdict"] == "pass" and data["exit_code"] == 0
    assert [case["name"] for case in data["cases"]] == ["worked_example", "point_mass"]
    assert all(len(case["tests"]) == 2 for case in data["cases"])
    assert "| `point_mass` | pass |" in (out / "audit.md").read_text()
    assert (out / "audit.png").read_bytes().startswith(PNG_MAGIC)


def test_lossy_rule_exits_1(tmp_path):
    assert main(["audit", "verifier", "ours:typical", *SMALL, "--out", str(tmp_path)]) == 1


def test_wrong_verifier_named_module_function_exits_1(tmp_path):
    target = "audit_wrong_verifiers:recover_from_p"
    assert main(["audit", "verifier", target, *SMALL, "--out", str(tmp_path)]) == 1


def test_unimportable_target_exits_2_and_says_why(tmp_path, capsys):
    assert main(["audit", "verifier", "no_such_module:fn", "--out", str(tmp_path), "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "could not judge" in out and "does not import" in out


def test_usage_errors_exit_2(tmp_path, capsys):
    base = ["audit", "verifier", "ours:token", "--out", str(tmp_path)]
    assert main([*base, "--samples", "5"]) == 2
    assert main([*base, "--alpha", "3"]) == 2
    assert main([*base, "--cases", "no_such_case"]) == 2
    assert "--cases" in capsys.readouterr().err
