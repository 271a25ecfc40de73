"""A failed commit is not a refusal (issue 10, D1, settlement side): a worker
(settlement_fault_worker.py) runs a day of settlement writes under strace,
which fails its N-th fdatasync with EIO, for every N the day makes, in three
modes: crash right after the StoreUnavailable, retry and go on, and a fault
that never clears. The commit whose sync failed may or may not be durable.
Then a fresh connection (this process; the worker is gone, so opening runs
WAL recovery) repeats the day as docs/SETTLEMENT.md "Failures" says, and the
store must hold every write exactly once: one gateway, one batch (its
tokens in its row or in a part of the archive's spool: the worker writes a
part after every batch), each repayment once, deny-list versions 1..n
without a gap."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import settlement_fault_worker as worker

from qrpay import (
    DeviceKey, Gateway, GatewayKey, IssuerKey, Role, Scene, TokenGenerator, TrustStore,
)
from qrpay.gateway import GatewayPolicy
from qrpay import archive, tokenspool
from qrpay.settlement import STORE_FILE, Settlement

WORKER = Path(worker.__file__)
NOW = worker.NOW
ISSUER = bytes(range(32))
# (mode of the worker, strace's `when`): one fault then crash, one fault then
# retry, every sync from the N-th on failing.
MODES = (("crash", "{n}"), ("retry", "{n}"), ("retry", "{n}+"))


def _prepare(tmp_path: Path) -> dict[str, Any]:
    """A signed batch of one payment, and the worker's config without a directory."""
    issuer = IssuerKey(ISSUER)
    trust = TrustStore()
    trust.add(issuer.public, roles=Role.CREDENTIALS | Role.DENY_LIST)
    gateway_key, device = GatewayKey(bytes([7]) * 32), DeviceKey(bytes([9]) * 32)
    credential = issuer.issue(account=42, device_public=device.public, limit=5_000,
                              scenes=[Scene.BUS], not_before=NOW - 3600, not_after=NOW + 86400)
    with Gateway(tmp_path / "gateway", gateway_key, trust,
                 GatewayPolicy(deny_list_max_age=None)) as gateway:
        gateway.scan(TokenGenerator(credential, device).make(Scene.BUS, NOW), 200, Scene.BUS,
                     NOW)
        batch = gateway.export_batch(now=NOW + 60)
    assert batch is not None
    (tmp_path / "batch").write_bytes(batch)
    return {"issuer": ISSUER.hex(), "gateway": gateway_key.public.to_bytes().hex(),
            "batch": str(tmp_path / "batch")}


def _worker(strace: str, config: Path, mode: str, inject: str | None
            ) -> subprocess.CompletedProcess[str]:
    trace = [strace, "-f", "-qq", "-o", "/dev/null" if inject else f"{config}.trace",
             "-e", "trace=fdatasync"]
    if inject:
        trace += ["-e", f"inject=fdatasync:error=EIO:when={inject}"]
    return subprocess.run([*trace, sys.executable, str(WORKER), str(config), mode],
                          capture_output=True, text=True, timeout=120)


def _tokens_kept(directory: Path) -> int:
    """How many tokens the store keeps for its one batch, in its row or in
    a registered part (each part read back and checked against its digests)."""
    s = Settlement(directory)
    try:
        [(in_row,)] = s._query("SELECT length(tokens) FROM batches")
        parts = [archive.read_written(tokenspool.spool_dir(s.archive) / p.name, p.written)
                 for p in s._token_parts()]
        return int(in_row) // 204 + sum(len(part["record"]) for part in parts)
    finally:
        s.close()


def test_a_failed_commit_is_never_stored_twice(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    # CI installs it (.ci/run): without it this test would prove nothing.
    assert strace, "strace is needed to inject the faults: apt-get install strace"
    base = _prepare(tmp_path)

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**base, "directory": str(tmp_path / name)}))
        return path

    clean = config("clean")
    run = _worker(strace, clean, "retry", None)
    assert run.returncode == 0 and "done applied True 2" in run.stdout, run.stderr
    syncs = Path(f"{clean}.trace").read_text().count("fdatasync(")
    assert syncs >= 10, "the day makes fewer fdatasync calls than expected"

    faults = phantoms = 0
    for n in range(1, syncs + 1):
        for mode, when in MODES:
            name = f"{mode}-{when.format(n=n)}"
            run = _worker(strace, config(name), mode, when.format(n=n))
            assert run.returncode in (0, 3, 4), f"{name}: {run.stdout}{run.stderr}"
            failed = [line.split()[1] for line in run.stdout.splitlines()
                      if line.startswith("unavailable")]
            faults += bool(failed)
            if mode == "retry" and not when.endswith("+"):
                assert "done" in run.stdout, f"{name}: one fault, retried, must end the day"

            # A fresh connection repeats the whole day: every write lands once.
            got = worker.day(json.loads((tmp_path / f"{name}.json").read_text()),
                             lambda _name, call: call())
            assert got["repayments"] == worker.EXPECTED_REPAYMENTS, name
            assert got["batches"] == 1 and got["ingest"] in ("applied", "exists"), name
            with sqlite3.connect(tmp_path / name / STORE_FILE) as db:
                versions = [v for (v,) in db.execute("SELECT version FROM deny_lists "
                                                     "ORDER BY version")]
                assert db.execute("SELECT COUNT(*) FROM gateways").fetchone()[0] == 1, name
            db.close()
            assert versions == list(range(1, len(versions) + 1)) and len(versions) >= 1, name
            # The batch's tokens are in its row or in a registered part, whole.
            assert _tokens_kept(tmp_path / name) == 1, name
            # A repayment whose call failed turned out stored: the hole this closes.
            phantoms += "done" not in run.stdout and (
                ("repay" in failed and got["repay"] is False)
                or ("file" in failed and got["file"] == 0))
    print(f"{syncs} fdatasync calls x {len(MODES)} modes: {faults} runs hit a failure, "
          f"{phantoms} with a failed repayment found stored afterwards")
    assert faults >= syncs and phantoms >= 1
