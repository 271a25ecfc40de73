"""Kill -9 during ingest: a worker process (settlement_crash_worker.py) ingests
large prepared batches and is SIGKILLed at random (seeded) moments. After
every kill the store holds each batch whole or not at all, and everything the
worker was told was stored is there. Ingesting everything again answers
`exists` for what is present and ends with the report of a clean run. On
SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qrpay import DeviceKey, GatewayKey, IssuerKey, Scene, TrustStore, generate_batch
from qrpay._impl import core
from qrpay.format import TAG_BATCH, TOKEN_DEVICE_SIG, TOKEN_LEN
from qrpay.ledger import RECORD_DTYPE
from qrpay.settlement import STORE_FILE, IngestStatus, Settlement
from qrpay.wire import sign_document
import stores
from stores import open_settlement

pytestmark = pytest.mark.usefixtures("each_store")

WORKER = Path(__file__).with_name("settlement_crash_worker.py")
NOW = 1_800_000_000
RIDERS = 40
RECORDS = 2_500                # per batch: enough that one ingest takes a while
# (gateway, seq) in upload order; gateway 2 never sends batch 3 (a gap).
PLAN = [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2), (0, 3), (2, 4)]
MIN_KILLS = int(os.environ.get("QRPAY_CRASH_KILLS", "24"))
SEED = int(os.environ.get("QRPAY_CRASH_SEED", "20261129"))


@dataclass
class Prepared:
    issuer: IssuerKey
    gateways: list[GatewayKey]
    files: list[Path]
    batches: list[bytes]
    expected: list[tuple[int, int, int]]   # (gateway index, seq, record count) in PLAN order


def _prepare(directory: Path) -> Prepared:
    issuer = IssuerKey(bytes(range(32)))
    gateways = [GatewayKey(bytes([140 + i]) * 32) for i in range(3)]
    devices = [DeviceKey(bytes([10 + i]) * 32) for i in range(RIDERS)]
    # Riders 0..3 have small limits: they overspend while offline.
    creds = [issuer.issue(8000 + i, d.public, 2_000 if i < 4 else 10**7, [Scene.BUS],
                          NOW - 86_400, NOW + 30 * 86_400, serial=300 + i)
             for i, d in enumerate(devices)]
    total = RECORDS * len(PLAN)
    k = np.arange(total)
    rider = k % RIDERS
    counter = k // RIDERS + 1
    issued = (NOW + k // 3).astype(np.uint32)
    tokens = generate_batch([creds[r] for r in rider], [devices[r] for r in rider],
                            np.zeros(total, dtype=np.uint8), counter, issued)
    times = issued.astype(np.int64)
    amounts = 50 + (k * 37) % 900
    # Frauds and oddities, all against batch 0 (uploaded first):
    for i in range(0, RECORDS, 97):                 # double spends: batch 1 repeats its tokens
        j = RECORDS + i
        tokens[j], times[j] = tokens[i], times[i] + 3
    for i in range(5, RECORDS, 101):                # clones: batch 2, same counter, a second later
        j = 2 * RECORDS + i
        r = int(rider[i])
        tokens[j] = np.frombuffer(core.make_token(creds[r].raw, devices[r]._secret,
                                                  int(issued[i]) + 1, int(counter[i]),
                                                  int(Scene.BUS)), dtype=np.uint8)
        times[j] = int(issued[i]) + 1
    for j in range(3 * RECORDS, 4 * RECORDS, 499):  # forged: batch 3
        tokens[j, TOKEN_DEVICE_SIG + 3] ^= 0x10
    files, batches, expected = [], [], []
    next_record = [1, 1, 1]
    for b, (g, seq) in enumerate(PLAN):
        if (g, seq) == (2, 4):
            next_record[g] += 77                    # records of the missing batch 3
        first = next_record[g]
        rows = range(b * RECORDS, (b + 1) * RECORDS)
        body = {"v": 1, "gateway": gateways[g].public.to_bytes(), "seq": seq, "first": first,
                # Exported a minute after its last scan: its payments were
                # outstanding offline until then (the overspend rule).
                "last": first + RECORDS - 1,
                "created_at": int(times[b * RECORDS:(b + 1) * RECORDS].max()) + 60,
                "records": [[first + n, tokens[j].tobytes(), int(amounts[j]), int(Scene.BUS),
                             int(times[j])] for n, j in enumerate(rows)]}
        next_record[g] += RECORDS
        data = sign_document(gateways[g], TAG_BATCH, body)
        path = directory / f"batch-{b}.msgpack"
        path.write_bytes(data)
        files.append(path)
        batches.append(data)
        expected.append((g, seq, RECORDS))
    return Prepared(issuer, gateways, files, batches, expected)


def _trust(p: Prepared) -> TrustStore:
    trust = TrustStore()
    trust.add(p.issuer.public)
    return trust


def _open(p: Prepared, directory: Path) -> Settlement:
    return open_settlement(directory, _trust(p), [g.public for g in p.gateways])


def _summary(s: Settlement) -> tuple[Any, ...]:
    r = s.report()
    return (r.accounts.tolist(), r.amounts.tolist(), r.counts.tolist(), r.findings, r.records,
            r.charged_total, r.rejected_total)


def _stored(s: Settlement, directory: Path) -> list[tuple[str, int, int, int, int]]:
    """(gateway, seq, first, last, rows in the records blob) in arrival order;
    also checks the tokens blob and (SQLite) the database's integrity."""
    if stores.kind() == "sqlite":
        db = sqlite3.connect(directory / STORE_FILE)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
    rows = s._query("SELECT gateway, seq, first, last, length(records), length(tokens) "
                    "FROM batches ORDER BY arrival")
    out = []
    for gateway, seq, first, last, rec_len, tok_len in rows:
        assert rec_len % RECORD_DTYPE.itemsize == 0
        count = rec_len // RECORD_DTYPE.itemsize
        assert tok_len == count * TOKEN_LEN
        out.append((gateway, seq, first, last, count))
    return out


def _check_whole_or_absent(p: Prepared, directory: Path, acknowledged: int) -> int:
    """Every stored batch is complete, the stored ones are exactly the first
    ones of the upload order, and every ingest the worker saw return is
    there. Returns how many are stored."""
    s = _open(p, directory)  # opening runs SQLite recovery
    try:
        ids = [g.public.gateway_id for g in p.gateways]
        stored = _stored(s, directory)
        assert [(g, seq) for g, seq, *_ in stored] == [
            (ids[g], seq) for g, seq, _n in p.expected[:len(stored)]]
        for (g, seq, first, last, count), (_g, _s, expected) in zip(stored, p.expected):
            assert count == expected == last - first + 1, (g, seq, count)
        assert s.report().records == sum(row[4] for row in stored)
        assert s.batch_count() == len(stored)
        assert acknowledged <= len(stored)
        return len(stored)
    finally:
        s.close()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    return _prepare(tmp_path_factory.mktemp("batches"))


@pytest.fixture(scope="module")
def clean(prepared: Prepared, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[tuple[Any, ...], float]:
    """The report of an uninterrupted run, and how long one ingest takes."""
    s = Settlement(tmp_path_factory.mktemp("clean"), _trust(prepared),
                   [g.public for g in prepared.gateways])
    try:
        start = time.perf_counter()
        for data in prepared.batches:
            assert s.ingest(data).status == IngestStatus.APPLIED
        per_batch = (time.perf_counter() - start) / len(prepared.batches)
        return _summary(s), per_batch
    finally:
        s.close()


def test_the_prepared_batches_are_worth_crashing(prepared: Prepared,
                                                clean: tuple[tuple[Any, ...], float]) -> None:
    summary, _per_batch = clean
    kinds = {f.kind for f in summary[3]}
    assert kinds == {"double_spend", "clone", "invalid_token", "overspend", "sequence_gap"}
    assert summary[4] == RECORDS * len(PLAN)


def _run_worker(config: Path, rng: random.Random, per_batch: float, remaining: int,
                startup: list[float]) -> tuple[int, int]:
    """Start the worker, SIGKILL it at a random moment (unless it finishes
    first). Returns (return code, number of ingests it reported done)."""
    proc = subprocess.Popen([sys.executable, str(WORKER), str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        started = time.perf_counter()
        if rng.random() < 0.15:
            # Early: while the interpreter starts or the store is being opened.
            time.sleep(rng.uniform(0, startup[0] * 1.5))
        else:
            ready = proc.stdout.readline() if proc.stdout else ""
            assert ready.strip() == "ready", proc.communicate()[1]
            startup[0] = 0.5 * startup[0] + 0.5 * (time.perf_counter() - started)
            time.sleep(rng.uniform(0, max(remaining, 1) * per_batch * 1.1))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker failed ({proc.returncode}): {err}")
    done = [line.split() for line in out.splitlines() if line.split()[0].isdigit()]
    for n, (i, status, _records) in enumerate(done):
        assert int(i) == n and status in ("applied", "exists")
    return proc.returncode, len(done)


def test_kill_during_ingest_leaves_whole_batches(
        prepared: Prepared, clean: tuple[tuple[Any, ...], float], tmp_path: Path) -> None:
    reference, per_batch = clean
    rng = random.Random(SEED)
    startup = [0.3]
    kills = campaigns = 0
    at_kill: list[int] = []   # batches stored when a kill landed
    while kills < MIN_KILLS:
        campaigns += 1
        directory = tmp_path / f"settle-{campaigns}"
        config = tmp_path / f"config-{campaigns}.json"
        config.write_text(json.dumps({
            "directory": stores.location(directory),
            "archive": str(directory / "archive"),
            "issuer": prepared.issuer.public.to_bytes().hex(),
            "gateways": [g.public.to_bytes().hex() for g in prepared.gateways],
            "batches": [str(f) for f in prepared.files]}))
        stored = 0
        for _round in range(rng.randint(1, 6)):
            code, acknowledged = _run_worker(config, rng, per_batch,
                                             len(prepared.batches) - stored, startup)
            if stores.kind() == "postgresql" or directory.joinpath(STORE_FILE).exists():
                stored = _check_whole_or_absent(prepared, directory, acknowledged)
            else:
                assert acknowledged == 0
            if code == -signal.SIGKILL:
                kills += 1
                at_kill.append(stored)
            if code == 0:
                assert stored == len(prepared.batches)
                break
        # Retry everything, as a gateway would: what is there answers exists.
        s = _open(prepared, directory)
        try:
            statuses = [s.ingest(data).status for data in prepared.batches]
            assert statuses == ([IngestStatus.EXISTS] * stored
                                + [IngestStatus.APPLIED] * (len(prepared.batches) - stored))
            assert _summary(s) == reference
        finally:
            s.close()
    print(f"{kills} kills over {campaigns} stores; batches stored at each kill: {at_kill}")
    assert campaigns >= 2      # (kills >= MIN_KILLS is the loop's own exit condition)
    # The kills landed all along the ingest, not only before or after it.
    assert len(set(at_kill)) >= 4
