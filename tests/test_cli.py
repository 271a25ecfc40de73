"""The command line: `qrpay simulate` and argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qrpay import cli, simulate


def test_simulate_catches_every_planted_attack(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    code = cli.main(["simulate", "--citizens", "300", "--trips", "3", "--seed", "7",
                     "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.out
    report = json.loads(out.read_text())
    assert report["ok"] and report["failures"] == []
    assert report["tokens"] == 300 * 3 + len(report["planted"])
    assert report["by_reason"]["OK"] == 900
    assert len(report["planted"]) >= 10 and all(p["caught"] for p in report["planted"])
    assert "result: OK" in printed.out
    assert "tokens verified" in printed.err  # progress goes to stderr


def test_simulate_is_reproducible_with_a_seed() -> None:
    a = simulate.run(citizens=50, trips=2, seed=3, threads=1, progress=_Null())
    b = simulate.run(citizens=50, trips=2, seed=3, threads=2, progress=_Null())
    assert a.by_reason == b.by_reason and a.accepted == b.accepted == 100


def test_simulate_reports_a_missed_attack_as_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    # If a check were switched off, the run must fail loudly, not report OK.
    real = simulate._plant

    def plant_with_wrong_expectation(*args: object) -> object:
        tokens, planted = real(*args)  # type: ignore[arg-type]
        planted[0].expected = simulate.Reason.OK
        return tokens, planted

    monkeypatch.setattr(simulate, "_plant", plant_with_wrong_expectation)
    report = simulate.run(citizens=20, trips=1, seed=1, threads=1, progress=_Null())
    assert report.failures and "planted" in report.failures[0]
    assert "FAILED" in simulate.format_report(report)


@pytest.mark.parametrize("args", [["simulate", "--citizens", "0"],
                                  ["simulate", "--citizens", "many"], ["nonsense"], []])
def test_bad_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    assert "usage: qrpay" in capsys.readouterr().err


def test_unwritable_json_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["simulate", "--citizens", "5", "--json", str(tmp_path / "no" / "r.json")])
    assert code == 2
    assert "cannot write" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    run = subprocess.run([sys.executable, "-m", "qrpay", "simulate", "--help"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "--citizens" in run.stdout


class _Null:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
