"""The load test of issue 13: two service replicas (`qrpay serve` processes)
on one PostgreSQL store, 8 gateway processes scanning and syncing 100,000
payments in all (QRPAY_LOAD_PAYMENTS to change it) through connections that
drop before a request is sent and after it was, uploading old batches
again out of order, and one replica SIGKILLed and restarted midway. Every
receipt must be charged exactly once, nothing acked that is not stored, and
the report must equal an in-process run on the same batches.

Loopback only, bounded: the workers give up after a deadline and the test
fails if any did. It runs in the compiled run (conftest.py: the twin's run
does not collect it; the servers would verify 100,000 tokens in Python)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np

from qrpay import IssuerKey, Role, TrustStore
from qrpay.settlement import IngestStatus, Settlement
from service_proc import ServiceProcess

GATEWAYS = 8
PAYMENTS = int(os.environ.get("QRPAY_LOAD_PAYMENTS", "100000"))
WORKER = Path(__file__).parent / "load_gateway.py"
ISSUER = IssuerKey(bytes(range(32)))


def test_two_replicas_eight_gateways_faults_and_a_killed_replica(
        tmp_path: Path, postgres: object) -> None:
    sys.path.insert(0, str(WORKER.parent))
    from load_gateway import gateway_key
    url = postgres.url()   # type: ignore[attr-defined]
    archive = tmp_path / "archive"
    with Settlement(url, archive=archive) as setup:
        setup.trust_issuer(ISSUER.public)
        for i in range(GATEWAYS):
            setup.register_gateway(gateway_key(i).public, f"operator-{i % 3}")
    replicas = [ServiceProcess(url, tmp_path / f"replica{r}.log", archive=str(archive)).start()
                for r in range(2)]
    urls = ",".join(r.url for r in replicas)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    workers = [subprocess.Popen(
        [sys.executable, str(WORKER), str(i), str(tmp_path), urls, str(PAYMENTS // GATEWAYS),
         str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(GATEWAYS)]
    try:
        # Midway, replica 0 dies (SIGKILL, mid-request or not) and comes back.
        with Settlement(url, archive=archive) as watcher:
            deadline = time.monotonic() + 600
            while (watcher.report().records < PAYMENTS // 2 and time.monotonic() < deadline
                   and any(w.poll() is None for w in workers)):
                time.sleep(0.2)
            stored_at_kill = watcher.report().records
        alive_at_kill = sum(w.poll() is None for w in workers)
        replicas[0].kill()
        time.sleep(1.0)
        replicas[0].start()
        outputs = [w.communicate(timeout=900) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        for r in replicas:
            r.stop()
    assert [w.returncode for w in workers] == [0] * GATEWAYS, [err[-2000:] for _o, err in outputs]
    results = [json.loads(out) for out, _err in outputs]
    assert all(r["waiting"] == 0 for r in results)
    assert [r["refused"] for r in results] == [{}] * GATEWAYS   # every scan accepted
    # The kill came midway, with gateways still syncing, and the restarted
    # replica served uploads again.
    assert alive_at_kill > 0 and stored_at_kill < PAYMENTS
    after_restart = replicas[0].log.read_text().split('"event": "serving"')[-1]
    assert '"path": "/v1/batches"' in after_restart
    # The faults happened: dropped answers (stored, not heard) and replays.
    assert sum(r["dropped"]["after"] for r in results) > 0
    assert sum(r["dropped"]["before"] for r in results) > 0
    replays = [a for r in results for a in r["again"]]
    assert replays and all(code == 200 and status == "exists" for _s, code, status in replays)

    with Settlement(url, archive=archive) as store:
        stored = {(str(g), int(s)): bytes(d).hex() for g, s, d in
                  store._query("SELECT gateway, seq, digest FROM batches")}
        # Nothing acked that is not stored, byte for byte.
        for r in results:
            for seq, digest in r["acked"].items():
                assert stored[(r["gateway"], int(seq))] == digest
        report = store.report()
        records, gateway, _t, _a = store._live()
    # Every receipt charged exactly once: one stored record per scan the
    # gateways accepted, no (gateway, record) twice, each charged.
    assert report.records == sum(r["accepted"] for r in results) == len(records)
    keys = np.rec.fromarrays([gateway.astype(str), records["record"]])
    assert len(np.unique(keys)) == len(records)
    assert report.charged_total == sum(r["amount"] for r in results)
    assert report.findings == []

    # The same batches settled in one process equal what the service stored.
    trust = TrustStore()
    trust.add(ISSUER.public, roles=Role.CREDENTIALS | Role.DENY_LIST)
    with Settlement(tmp_path / "in-process", trust,
                    [gateway_key(i).public for i in range(GATEWAYS)]) as alone:
        for i in range(GATEWAYS):
            for batch in msgpack.unpackb((tmp_path / f"batches{i}.msgpack").read_bytes()):
                assert alone.ingest(batch).status is IngestStatus.APPLIED
        reference = alone.report()
    assert reference.accounts.tolist() == report.accounts.tolist()
    assert reference.amounts.tolist() == report.amounts.tolist()
    assert reference.counts.tolist() == report.counts.tolist()
    assert reference.findings == report.findings
    assert reference.charged_total == report.charged_total
    print(f"\nload: {len(records)} payments, {sum(len(r['acked']) for r in results)} batches, "
          f"drops before/after {sum(r['dropped']['before'] for r in results)}/"
          f"{sum(r['dropped']['after'] for r in results)}, {len(replays)} replays, "
          f"slowest gateway {max(r['seconds'] for r in results)} s")
