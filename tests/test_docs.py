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


def _run_shell(doc: str, block: int | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A doc's shell block (or all of them, for None), run as written in
    `cwd` with the installed qrpay and no QRPAY_* setting of this process."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)
    script = "\n".join(blocks) if block is None else blocks[block]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRPAY_")
           or k == "QRPAY_NO_EXTENSIONS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
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
    run = _run_shell("CLI.md", None, tmp_path)
    receipt = json.loads(run.stdout)   # the one scan with --json; the rest is quiet
    assert (receipt["account"], receipt["amount"], receipt["scene"]) == (42, 200, "bus")
    [batch] = json.loads((tmp_path / "ingested.json").read_text())["batches"]
    assert (batch["file"], batch["status"], batch["records"]) == ("-", "applied", 4)
    assert json.loads((tmp_path / "report.json").read_text())["charged_total"] == 200 + 3 * 150
    repaid = json.loads((tmp_path / "repaid.json").read_text())
    assert (repaid["rows"], repaid["stored"], repaid["total"]) == (2, 2, 650)
    header, row = (tmp_path / "history.csv").read_text().splitlines()
    history = dict(zip(header.split(","), row.split(",")))
    assert (history["charged"], history["repaid"], history["balance"]) == ("650", "650", "0")
