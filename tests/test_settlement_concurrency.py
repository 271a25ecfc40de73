"""Settlement shared: two processes creating one new store at the same instant
must both open (issue 10, D6: the second failed at once with `database is
locked`), and one Settlement object shared by threads mixing every call
(issue 10, D2's settlement half) holds exactly what the calls acknowledged."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from qrpay import (
    DeviceKey, Gateway, GatewayKey, IssuerKey, Scene, TokenGenerator, TrustStore,
)
from qrpay.denylist import DenyList
from qrpay.gateway import GatewayPolicy
from qrpay.settlement import IngestStatus, Settlement
from stores import location, open_settlement


TRIALS = 1000        # racing pairs per run: ~3 s
SPACING = 0.003      # seconds between the pairs' start instants (an open takes ~1 ms on tmpfs)
SHM = Path("/dev/shm")

# One racer: opens Settlement(base/i) at start + i * spacing for every trial i,
# sleeping, then spinning up to that instant so that both racers start together.
# The window that made the old code fail is ~10 us wide (both must hold SQLite's
# shared lock on the new file at once), so racers are long-lived and spin.
RACER = """
import json, sys, time
from qrpay import IssuerKey, TrustStore
from qrpay.settlement import Settlement
base, start, spacing, trials = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
trust = TrustStore()
trust.add(IssuerKey(bytes(range(32))).public)
out = []
for i in range(trials):
    at = start + i * spacing
    time.sleep(max(0.0, at - time.time() - 0.002))   # a sleeper gets the CPU when it wakes
    while time.time() < at:
        pass
    try:
        Settlement(f"{base}/{i}", trust).close()
        out.append("opened")
    except Exception as exc:
        out.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(out))
"""


def test_two_processes_create_one_new_store_at_once(tmp_path: Path) -> None:
    # On tmpfs an open is 5x faster than on disk (no real fsync): 5x more races
    # in the same time. The race is over locks, which tmpfs has the same.
    on_shm = SHM.is_dir() and os.access(SHM, os.W_OK)
    with tempfile.TemporaryDirectory(dir=SHM if on_shm else tmp_path) as base:
        for i in range(TRIALS):   # made here: two mkdirs of one name would not start together
            Path(base, str(i)).mkdir()
        # Imports take a while: the first instant is far enough ahead for both.
        start = time.time() + 2.0
        racers = [subprocess.Popen([sys.executable, "-c", RACER, base, str(start), str(SPACING),
                                    str(TRIALS)], stdout=subprocess.PIPE, text=True)
                  for _ in range(2)]
        results = [json.loads(p.communicate(timeout=120)[0]) for p in racers]
    failed = [r for both in zip(*results) for r in both if r != "opened"]
    assert failed == [], f"{len(failed)} of {2 * TRIALS} opens failed: {failed[:3]}"


# -- one Settlement shared by threads ---------------------------------------------------------

NOW = 1_800_000_000
THREADS = 6
CALLS = 25           # per thread


def _batches(tmp_path: Path, issuer: IssuerKey, trust: TrustStore
             ) -> tuple[list[GatewayKey], list[bytes]]:
    """Three gateways' upload batches, four each, of three payments each."""
    device = DeviceKey(bytes([5]) * 32)
    credential = issuer.issue(account=42, device_public=device.public, limit=10**6,
                              scenes=[Scene.BUS], not_before=NOW - 3600, not_after=NOW + 86400)
    phone = TokenGenerator(credential, device)
    keys = [GatewayKey(bytes([60 + i]) * 32) for i in range(3)]
    policy = GatewayPolicy(deny_list_max_age=None, max_offline_uses=10_000)
    batches = []
    for i, key in enumerate(keys):
        with Gateway(tmp_path / f"gw{i}", key, trust, policy) as gateway:
            for seq in range(1, 5):
                for _ in range(3):
                    gateway.scan(phone.make(Scene.BUS, NOW), 10, Scene.BUS, NOW)
                batch = gateway.export_batch(now=NOW + 60)
                assert batch is not None
                batches.append(batch)
                gateway.ack(seq)
    return keys, batches


@pytest.mark.usefixtures("each_store")
def test_threads_sharing_a_settlement(tmp_path: Path, issuer: IssuerKey,
                                      deny_trust: TrustStore) -> None:
    """Threads mix every call on one Settlement, each batch and repayment more
    than once; the store then holds exactly what the calls acknowledged."""
    keys, batches = _batches(tmp_path, issuer, deny_trust)
    settlement = open_settlement(tmp_path / "settle", deny_trust, [k.public for k in keys])
    statuses: dict[int, list[IngestStatus]] = {i: [] for i in range(len(batches))}
    given: set[int] = set()                  # repayment references recorded
    new_rows: list[int] = []                 # how many rows each call said it stored
    versions: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def repayment(ref: int) -> tuple[int, int, int, str]:
        # Shared references: several threads record the same payment.
        return 1000 + ref % 7, 1 + ref, NOW + ref, f"TX-{ref}"

    def work(t: int) -> None:
        rng = random.Random(t)
        start.wait()
        try:
            for _ in range(CALLS):
                op = rng.randrange(6)
                if op == 0:
                    i = rng.randrange(len(batches))
                    statuses[i].append(settlement.ingest(batches[i]).status)
                elif op == 1:
                    ref = rng.randrange(40)
                    new_rows.append(int(settlement.record_repayment(*repayment(ref))))
                    given.add(ref)
                elif op == 2:
                    refs = rng.sample(range(40), 3)
                    rows = [repayment(r) for r in refs]
                    new_rows.append(settlement.record_repayments(*(list(c) for c in zip(*rows))))
                    given.update(refs)
                elif op == 3:
                    document, _ = settlement.publish_deny_list(issuer, NOW)
                    versions.append(DenyList.load(document, deny_trust).version)
                elif op == 4:
                    assert settlement.report().records <= 3 * len(batches)
                else:
                    settlement.credit_history(NOW + 86400)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []

    # Each batch applied once (the rest EXISTS), all of them stored once.
    applied = [i for i, s in statuses.items() if s]
    for i in applied:
        assert statuses[i].count(IngestStatus.APPLIED) == 1
        assert set(statuses[i]) <= {IngestStatus.APPLIED, IngestStatus.EXISTS}
    assert settlement.batch_count() == len(applied)
    assert settlement.report().records == 3 * len(applied)
    # Each repayment once, and the calls together said so once per reference.
    assert sorted(settlement.repayments()) == sorted(repayment(r)[:3] for r in given)
    assert sum(new_rows) == len(given)
    # The mix did happen: batches ingested again, some repayment given again.
    assert any(len(s) > 1 for s in statuses.values()) and len(new_rows) > len(given) / 3
    # Every publish got its own version, and they run 1..n without a gap.
    assert sorted(versions) == list(range(1, len(versions) + 1))
    assert settlement.deny_list().version == len(versions)   # type: ignore[union-attr]
    settlement.close()


# -- several processes writing one store at once ---------------------------------------------

PROCESSES = 4
# One writer process: opens the store (a new one: every process creates it
# at once), then ingests every batch twice in an order of its own, records
# shared repayments and publishes deny lists, printing what each call said.
WRITER = """
import pickle, random, sys, json
from qrpay import IssuerKey, Role, TrustStore
from qrpay.denylist import DenyList
from qrpay.settlement import Settlement
store, archive, data, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(data, "rb") as f:
    keys, batches = pickle.load(f)
issuer = IssuerKey(bytes(range(32)))
trust = TrustStore()
trust.add(issuer.public, roles=Role.CREDENTIALS | Role.DENY_LIST)
rng = random.Random(seed)
out = {"ingest": [], "repaid": 0, "versions": []}
with Settlement(store, trust, keys, archive=archive) as s:
    order = list(range(len(batches))) * 2
    rng.shuffle(order)
    for n, i in enumerate(order):
        out["ingest"].append([i, s.ingest(batches[i]).status.value])
        if n % 4 == 0:
            refs = rng.sample(range(30), 4)
            out["repaid"] += s.record_repayments([1000 + r for r in refs], [1 + r for r in refs],
                                                 [NOW + r for r in refs], [f"TX-{r}" for r in refs])
        if n % 6 == 0:
            document, _ = s.publish_deny_list(issuer, NOW)
            out["versions"].append(DenyList.load(document, trust).version)
print(json.dumps(out))
""".replace("NOW", str(NOW))


@pytest.mark.usefixtures("each_store")
def test_processes_writing_one_store_store_each_write_once(
        tmp_path: Path, issuer: IssuerKey, deny_trust: TrustStore) -> None:
    """PROCESSES processes create one new store at the same moment and write
    it at once, every batch twice each: each batch is APPLIED by exactly one
    call and stored once, each repayment reference stored once, and every
    deny list published gets a version of its own (unique keys and
    transactions in the database, no lock of one process's)."""
    keys, batches = _batches(tmp_path, issuer, deny_trust)
    data = tmp_path / "batches.pickle"
    data.write_bytes(pickle.dumps(([k.public for k in keys], batches)))
    store = location(tmp_path / "settle")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, store, str(tmp_path / "archive"),
                                 str(data), str(seed)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for seed in range(PROCESSES)]
    outputs = [p.communicate(timeout=300) for p in writers]
    assert [p.returncode for p in writers] == [0] * PROCESSES, outputs
    results = [json.loads(out) for out, _err in outputs]
    statuses: dict[int, list[str]] = {}
    for result in results:
        for i, status in result["ingest"]:
            statuses.setdefault(i, []).append(status)
    assert sorted(statuses) == list(range(len(batches)))
    for i, said in statuses.items():
        assert said.count("applied") == 1 and said.count("exists") == len(said) - 1, (i, said)
    versions = sorted(v for r in results for v in r["versions"])
    assert versions == list(range(1, len(versions) + 1))
    with open_settlement(tmp_path / "settle", deny_trust, archive=tmp_path / "archive") as s:
        assert s.batch_count() == len(batches)
        assert s.report().records == 3 * len(batches)
        references = {a for a, _m, _p in s.repayments()}
        assert len(s.repayments()) == len(references) == sum(r["repaid"] for r in results)
        assert s.deny_list().version == len(versions)   # type: ignore[union-attr]
