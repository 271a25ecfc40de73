"""Every Python example in README.md and docs/ runs as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for i, code in enumerate(BLOCK.findall(doc.read_text(encoding="utf-8"))):
            found.append((f"{doc.name}#{i + 1}", code))
    return found


def test_readme_has_examples() -> None:
    assert any(name.startswith("README.md") for name, _ in _examples())


@pytest.mark.parametrize("name,code", [pytest.param(n, c, id=n) for n, c in _examples()])
def test_example_runs(name: str, code: str, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Examples make their work directories with tempfile, as a reader would;
    # here those land under pytest's tmp_path and are cleaned up with it.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exec(compile(code, name, "exec"), {"__name__": "__doc_example__"})


def test_readme_command_line_block_runs(tmp_path: Path) -> None:
    """The README's CLI walk-through, run as written with the installed `qrpay`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The command line"):]
    script = re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M)[0]   # the section's first
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    [receipt] = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert receipt["account"] == 42 and receipt["amount"] == 200
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["charged_total"] == 200 and report["findings"] == []
    header, row = (tmp_path / "history.csv").read_text().splitlines()
    history = dict(zip(header.split(","), row.split(",")))
    assert (history["account"], history["charged"], history["repaid"]) == ("42", "200", "200")
    assert history["balance"] == "0" and history["on_time_share"] == ""   # nothing due yet


def _shell_env() -> dict[str, str]:
    """This process's environment for a doc's commands: the installed qrpay
    first on PATH, no QRPAY_* setting but the backend's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRPAY_")
           or k == "QRPAY_NO_EXTENSIONS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return env


def _shell_blocks(doc: str) -> list[str]:
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    return re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)


def _run_shell(doc: str, block: int | None, cwd: Path, then: str = ""
               ) -> subprocess.CompletedProcess[str]:
    """A doc's shell block (or all of them, for None), and `then`, run as
    written in `cwd` with the installed qrpay and no QRPAY_* setting of this
    process."""
    blocks = _shell_blocks(doc)
    script = ("\n".join(blocks) if block is None else blocks[block]) + "\n" + then
    env = _shell_env()
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run


def test_inspect_walk_through_runs(tmp_path: Path) -> None:
    """docs/INSPECT.md's example, as written: each verdict it claims."""
    run = _run_shell("INSPECT.md", 1, tmp_path)
    assert run.stdout.count("exit 1") == 1 and run.stdout.count("exit 2") == 1
    assert "TOKEN_STALE" in run.stdout + run.stderr
    secret = (tmp_path / "issuer.key").read_text().strip().split(":")[-1]
    assert secret not in run.stdout + run.stderr   # inspect issuer.key shows the public key


def test_cli_walk_through_runs(tmp_path: Path) -> None:
    """docs/CLI.md's shell blocks, run as written in an empty directory."""
    run = _run_shell("CLI.md", None, tmp_path, then=_shell_blocks("SETTLEMENT.md")[0])
    # The one scan with --json first; then SETTLEMENT.md's close, statement and archive.
    decoder, text = json.JSONDecoder(), run.stdout
    documents, end = [], 0
    while text[end:].strip():
        document, end = decoder.raw_decode(text, len(text) - len(text[end:].lstrip()))
        documents.append(document)
    receipt, fees, closed, verified, listed = documents
    assert fees["schedule"]["version"] == 1
    assert closed["period"] == 1 and closed["charged_total"] == 650
    assert closed["operators"][0]["operator"] == "bus-co"
    assert verified["verified"] and verified["gross"] == 650 and verified["fee"] > 0
    assert [p["period"] for p in listed["periods"]] == [1] and listed["periods"][0]["archived"]
    assert (receipt["account"], receipt["amount"], receipt["scene"]) == (42, 200, "bus")
    [batch] = json.loads((tmp_path / "ingested.json").read_text())["batches"]
    assert (batch["file"], batch["status"], batch["records"]) == ("-", "applied", 4)
    assert json.loads((tmp_path / "report.json").read_text())["charged_total"] == 200 + 3 * 150
    repaid = json.loads((tmp_path / "repaid.json").read_text())
    assert (repaid["rows"], repaid["stored"], repaid["total"]) == (2, 2, 650)
    header, row = (tmp_path / "history.csv").read_text().splitlines()
    history = dict(zip(header.split(","), row.split(",")))
    assert (history["charged"], history["repaid"], history["balance"]) == ("650", "650", "0")


def test_scoring_command_lines_run(tmp_path: Path) -> None:
    """docs/SCORING.md's command lines as written: the fits, then the
    reports (given the policy and the day's accounts they name)."""
    blocks = _shell_blocks("SCORING.md")
    between = ("qrpay score sample --accounts 3000 --seed 9 --no-label --out citizens.csv\n"
               "echo '{\"bands\": [{\"min_score\": 540, \"limits\": {\"bus\": 3000}}, "
               "{\"min_score\": 600, \"limits\": {\"bus\": 8000}}]}' > policy.json\n")
    (tmp_path / "first.sh").write_text(blocks[0] + between + blocks[1])
    env = _shell_env()
    run = subprocess.run(["bash", "-euo", "pipefail", "first.sh"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    small = json.loads((tmp_path / "small.json").read_text())
    assert [f["name"] for f in small["features"]] == ["on_time_ratio", "max_days_past_due",
                                                      "utilisation"]
    mixed = json.loads((tmp_path / "mixed.json").read_text())
    assert [f["name"] for f in mixed["features"] if f.get("kind") == "categorical"] == [
        "employment_type", "housing", "purpose", "insurance_status", "district", "phone_plan"]
    for page in ("fit.html", "today.html"):
        assert "<img" in (tmp_path / page).read_text()
    assert sorted(p.name for p in (tmp_path / "charts").iterdir())
