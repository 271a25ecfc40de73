"""`qrpay gateway status`: the figures a gateway's journal holds, read
without opening the gateway (human, --json, --metrics for the textfile
collector), checked against the gateway's own answers; read while another
process scans into the gateway; the last sync recorded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qrpay import GatewayKey, Scene, cli
from qrpay.cli_status import read_status
from qrpay.denylist import sign_deny_list
from qrpay.gateway import Gateway, GatewayPolicy
from qrpay.metrics import STATUS_GAUGES, write_textfile
from qrpay.sync import SettlementClient
from qrpay.token import DEFAULT_SKEW
from qrpay.wire import split_document, unpack_strict

from test_service import ISSUER, NOW, _phone, _trust   # one issuer and phones for all
GATEWAY_KEY = GatewayKey(b"\x46" * 32)
POLICY = GatewayPolicy(deny_list_max_age=None, max_offline_uses=10**6)
# (phone, amount) of each scan, in order: records 1..8.
SCANS = [(1, 100), (2, 250), (3, 40), (1, 100), (2, 300), (3, 5), (1, 700), (2, 20)]

TOP_KEYS = {"gateway", "directory", "now", "journal", "records", "batches", "offline_spend",
            "deny_list", "time_floor", "journal_time_floor", "last_sync",
            "last_sync_age_seconds"}


@pytest.fixture
def gateway_dir(tmp_path: Path) -> Path:
    """A gateway with 8 records: batch 1 (records 1-4) acked, batch 2
    (5-6) exported and not acked, 7-8 not exported; deny list version 3."""
    directory = tmp_path / "gw"
    phones = {n: _phone(n) for n in (1, 2, 3)}
    with Gateway(directory, GATEWAY_KEY, _trust(), POLICY) as gateway:
        for i, (n, amount) in enumerate(SCANS[:6]):
            gateway.scan(phones[n].make(Scene.BUS, NOW + i), amount, Scene.BUS, NOW + i)
        assert gateway.export_batch(max_records=4, now=NOW + 10) is not None
        gateway.ack(1)
        assert gateway.export_batch(max_records=4, now=NOW + 11) is not None
        gateway.update_deny_list(sign_deny_list(ISSUER, 3, [1, 2], NOW + 12), now=NOW + 12)
        for i, (n, amount) in enumerate(SCANS[6:], start=20):
            gateway.scan(phones[n].make(Scene.BUS, NOW + i), amount, Scene.BUS, NOW + i)
    (tmp_path / "gw.key").write_text(GATEWAY_KEY.secret_text())
    return directory


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir())}


def test_json_has_the_documented_keys_and_the_gateways_own_figures(
        gateway_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                          "--now", str(NOW + 3600), "--top", "2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == TOP_KEYS
    assert set(doc["journal"]) == {"bytes", "file_bytes", "wal_bytes"}
    assert set(doc["records"]) == {"last", "since_ack", "not_exported", "unacked"}
    assert set(doc["batches"]) == {"last", "unacked"}
    assert set(doc["offline_spend"]) == {"accounts", "amount", "uses", "top"}
    assert set(doc["deny_list"]) == {"version", "serials", "issued_at", "age_seconds"}
    for row in doc["offline_spend"]["top"]:
        assert set(row) == {"account", "amount", "uses"}
    for row in doc["batches"]["unacked"]:
        assert set(row) == {"seq", "first", "last", "records"}

    with Gateway(gateway_dir, GATEWAY_KEY, _trust(), POLICY) as gateway:
        spend = {7000 + n: gateway.offline_spend(7000 + n) for n in (1, 2, 3)}
        assert doc["gateway"] == gateway.id
        assert doc["records"]["unacked"] == gateway.unacked_records() == 4
        assert doc["time_floor"] == gateway.time_floor
        assert doc["deny_list"]["version"] == gateway.deny_list.version == 3
        assert doc["deny_list"]["serials"] == len(gateway.deny_list) == 2
        assert doc["deny_list"]["issued_at"] == gateway.deny_list.issued_at == NOW + 12
        assert len(gateway.records()) == doc["records"]["last"] == 8
    assert doc["now"] == NOW + 3600
    assert doc["deny_list"]["age_seconds"] == 3600 - 12
    assert doc["records"] == {"last": 8, "since_ack": 4, "not_exported": 2, "unacked": 4}
    assert doc["batches"] == {"last": 2, "unacked": [
        {"seq": 2, "first": 5, "last": 6, "records": 2}]}
    # Records 5-8 count against offline limits: the gateway's own figures.
    charged = {a: s for a, s in spend.items() if s[1]}
    assert doc["offline_spend"]["accounts"] == len(charged) == 3
    assert doc["offline_spend"]["amount"] == sum(a for a, _ in charged.values()) == 1025
    assert doc["offline_spend"]["uses"] == 4
    ranked = sorted(charged.items(), key=lambda kv: -kv[1][0])[:2]
    assert [(r["account"], r["amount"], r["uses"]) for r in doc["offline_spend"]["top"]] == [
        (account, amount, uses) for account, (amount, uses) in ranked]
    assert doc["journal_time_floor"] == NOW + 21
    assert doc["time_floor"] == max(NOW + 21, NOW + 12 - DEFAULT_SKEW)
    journal = gateway_dir / "journal.sqlite3"
    assert doc["journal"]["file_bytes"] == journal.stat().st_size > 0
    assert doc["journal"]["bytes"] == doc["journal"]["file_bytes"] + doc["journal"]["wal_bytes"]
    assert doc["last_sync"] is None and doc["last_sync_age_seconds"] is None


def test_human_output_and_top(gateway_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                          "--now", "2027-01-15T09:00:00Z")
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines() if line[:1] != " "}
    assert "4 since the last ack, 2 not exported, 4 unacked (last record 8)" in lines["records"]
    assert "1 unacked: 2 (records 5-6)" in lines["batches"]
    assert "1,025 in 4 uses by 3 accounts" in out
    assert ("version 3, 2 serials, issued 2027-01-15T08:00:12Z (59m 48s ago)"
            in lines["deny"])
    assert "2027-01-15T08:00:21Z" in lines["time"]
    assert "none recorded" in lines["last"]
    # The top accounts, largest first: 7001 spent 700 (record 7), 7002 300 + 20.
    listed = [line.split() for line in out.splitlines() if line.startswith("         ")]
    assert [row[0] for row in listed] == ["7001", "7002", "7003"]
    code, out, _ = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                        "--top", "0", "--json")
    doc = json.loads(out)
    assert doc["offline_spend"]["top"] == [] and doc["offline_spend"]["accounts"] == 3


def test_needs_no_key_checks_one_given_and_refuses_other_directories(
        gateway_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                        "--gateway-key", str(tmp_path / "gw.key"), "--json")
    assert code == 0, err
    other = tmp_path / "other.key"
    other.write_text(GatewayKey(b"\x47" * 32).secret_text())
    code, _, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                        "--gateway-key", str(other))
    assert code == 2 and "another gateway key" in err
    code, _, err = _run(capsys, "gateway", "status", "--gateway-dir", str(tmp_path / "nope"))
    assert code == 2 and "not a gateway directory" in err
    assert not (tmp_path / "nope").exists()
    # The anchor is there and the journal is not: unavailable (75), not a new journal.
    (tmp_path / "lost").mkdir()
    (tmp_path / "lost" / "gateway.anchor").write_bytes((gateway_dir / "gateway.anchor")
                                                       .read_bytes())
    code, _, err = _run(capsys, "gateway", "status", "--gateway-dir", str(tmp_path / "lost"))
    assert code == 75 and "missing" in err
    assert sorted(p.name for p in (tmp_path / "lost").iterdir()) == ["gateway.anchor"]


def test_status_changes_nothing_in_the_directory(gateway_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = _files(gateway_dir)
    assert "journal.sqlite3-wal" not in before   # closed: the WAL was checkpointed away
    for _ in range(3):
        code, _, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                            "--json")
        assert code == 0, err
    # No -wal or -shm made (a reader's files could lock the gateway's user out).
    assert _files(gateway_dir) == before


# -- while the gateway runs in another process --------------------------------------------

SCANNER = r"""
import sys, time
from pathlib import Path
from qrpay import DeviceKey, GatewayKey, IssuerKey, Role, Scene, TokenGenerator, TrustStore
from qrpay.gateway import Gateway, GatewayPolicy
NOW = 1_800_000_000
directory, stop = sys.argv[1], Path(sys.argv[2])
issuer = IssuerKey(bytes(range(32)))
trust = TrustStore()
trust.add(issuer, roles=Role.CREDENTIALS | Role.DENY_LIST)
device = DeviceKey(b"\x05" * 32)
credential = issuer.issue(account=5005, device_public=device.public, limit=10**8,
                          scenes=[Scene.BUS], not_before=NOW - 3600, not_after=NOW + 86400,
                          serial=555)
phone = TokenGenerator(credential, device)
policy = GatewayPolicy(max_offline_uses=10**6, deny_list_max_age=None)
done = 0
with Gateway(directory, GatewayKey(b"\x46" * 32), trust, policy) as gateway:
    print("open", flush=True)
    while not stop.exists() and done < 20_000:
        tokens = [phone.make(Scene.BUS, NOW + 100) for _ in range(3)]
        result = gateway.scan_batch(tokens, [1, 1, 1], Scene.BUS, NOW + 100)
        assert result.ok.all(), result.reasons
        done += 3
        if done % 30 == 0:
            gateway.export_batch(max_records=25, now=NOW + 100)   # a batch waits unacked
print(done, flush=True)
"""


@pytest.fixture
def scanner(gateway_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    stop = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-c", SCANNER, str(gateway_dir), str(stop)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "open", proc.stderr.read() if proc.stderr else ""
    yield proc, stop
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_status_while_another_process_scans_neither_blocks_nor_harms_it(
        gateway_dir: Path, scanner: tuple[subprocess.Popen[str], Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    proc, stop = scanner
    # The gateway holds its directory: opening it again is refused ...
    with pytest.raises(Exception, match="in use"):
        Gateway(gateway_dir, GATEWAY_KEY, _trust(), POLICY)
    # ... and the status reads it all the same, as a command in its own process,
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "qrpay", "gateway", "status", "--gateway-dir",
                          str(gateway_dir), "--json"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["records"]["last"] >= 8
    # ... and in this one, again and again, while the scans go on.
    seen: list[int] = []
    slowest = 0.0
    for _ in range(12):
        started = time.monotonic()
        code, out, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                              "--json")
        slowest = max(slowest, time.monotonic() - started)
        assert code == 0, err
        doc = json.loads(out)
        assert doc["offline_spend"]["uses"] == doc["records"]["since_ack"]
        seen.append(doc["records"]["last"])
        time.sleep(0.1)
    assert slowest < 5, slowest   # never waits for the gateway (SQLite's busy timeout is 5 s)
    assert seen == sorted(seen) and seen[-1] > seen[0], seen   # it kept scanning
    stop.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    scanned = int(out.split()[-1])
    assert scanned >= seen[-1] - 8
    # The gateway opens again (a full integrity check) with every scan journaled,
    # and the status agrees with it.
    with Gateway(gateway_dir, GATEWAY_KEY, _trust(), POLICY) as gateway:
        assert len(gateway.records()) == 8 + scanned
        unacked, floor = gateway.unacked_records(), gateway.time_floor
    status = read_status(gateway_dir, NOW + 200)
    assert (status.last_record, status.unacked_records, status.time_floor) == (
        8 + scanned, unacked, floor)
    assert status.unacked_batches and status.wal_bytes == 0


# -- the last sync ------------------------------------------------------------------------

def _service(gateway_id: str, calls: list[str], conflict: bool = False) -> httpx.MockTransport:
    """A settlement service that holds every batch (or answers conflict)."""
    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/batches":
            body, _signature = split_document(request.content)
            seq = unpack_strict(body)["seq"]
            if conflict:
                return httpx.Response(409, json={"status": "conflict", "ack": False,
                                                 "gateway": gateway_id, "seq": seq})
            return httpx.Response(201, json={"status": "applied", "ack": True,
                                             "gateway": gateway_id, "seq": seq, "records": 1,
                                             "invalid": 0})
        return httpx.Response(404, json={"error": "no_deny_list", "message": ""})
    return httpx.MockTransport(answer)


def _offline(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("no route to host", request=request)


def test_a_successful_sync_is_recorded_and_shown(gateway_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    with Gateway(gateway_dir, GATEWAY_KEY, _trust(), POLICY) as gateway:
        gid = gateway.id
        with SettlementClient("http://settle.test", retries=0,
                              transport=httpx.MockTransport(_offline)) as client:
            assert not gateway.sync(client, now=NOW + 500).online
        assert read_status(gateway_dir, NOW + 600).last_sync is None   # offline: not a sync
        with SettlementClient("http://settle.test", retries=0,
                              transport=_service(gid, calls, conflict=True)) as client:
            assert gateway.sync(client, now=NOW + 550).problems
        assert read_status(gateway_dir, NOW + 600).last_sync is None   # a conflict: neither
        with SettlementClient("http://settle.test", retries=0,
                              transport=_service(gid, calls)) as client:
            report = gateway.sync(client, now=NOW + 600)
        assert report.online and report.acked == 2 and not report.problems
        # Read while the gateway is open (its last write is in the WAL).
        status = read_status(gateway_dir, NOW + 660)
        assert status.last_sync == NOW + 600 and status.unacked_records == 0
    assert calls.count("/v1/batches") == 3
    code, out, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                          "--now", str(NOW + 660), "--json")
    doc = json.loads(out)
    assert (doc["last_sync"], doc["last_sync_age_seconds"]) == (NOW + 600, 60)
    assert doc["records"]["since_ack"] == 0 and doc["offline_spend"]["accounts"] == 0
    code, out, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                          "--now", str(NOW + 660))
    assert "last sync      2027-01-15T08:10:00Z (1m 0s ago)" in out


# -- --metrics: the textfile collector -----------------------------------------------------

def _parse(text: str) -> dict[str, tuple[str, dict[str, str], float]]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name] = (family.type, sample.labels, sample.value)
    return found


def test_metrics_file_parses_back_with_the_status_figures(
        gateway_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    target = textfile / "qrpay-gw.prom"
    code, out, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                          "--now", str(NOW + 3600), "--metrics", str(target), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert f"metrics written to {target}" in err
    assert [p.name for p in textfile.iterdir()] == ["qrpay-gw.prom"]   # no temporary left
    assert target.stat().st_mode & 0o777 == 0o644   # the node exporter's user reads it
    samples = _parse(target.read_text())
    assert set(samples) == set(STATUS_GAUGES)
    assert all(kind == "gauge" and labels == {"gateway": doc["gateway"]}
               for kind, labels, _ in samples.values())
    value = {name: v for name, (_, _, v) in samples.items()}
    assert value["qrpay_gateway_unacked_records"] == doc["records"]["unacked"] == 4
    assert value["qrpay_gateway_records_since_ack"] == 4
    assert value["qrpay_gateway_records_not_exported"] == 2
    assert value["qrpay_gateway_unacked_batches"] == 1
    assert value["qrpay_gateway_last_record"] == 8
    assert value["qrpay_gateway_offline_accounts"] == 3
    assert value["qrpay_gateway_offline_spend"] == 1025
    assert value["qrpay_gateway_offline_spend_max"] == 700
    assert value["qrpay_gateway_deny_list_version"] == 3
    assert value["qrpay_gateway_deny_list_serials"] == 2
    assert value["qrpay_gateway_deny_list_age_seconds"] == 3600 - 12
    assert value["qrpay_gateway_deny_list_issued_timestamp_seconds"] == NOW + 12
    assert value["qrpay_gateway_time_floor_timestamp_seconds"] == doc["time_floor"]
    assert value["qrpay_gateway_journal_bytes"] == doc["journal"]["bytes"]
    assert value["qrpay_gateway_last_sync_timestamp_seconds"] == 0
    assert value["qrpay_gateway_status_timestamp_seconds"] == NOW + 3600
    # `-`: the metrics on stdout, instead of the status.
    code, out, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                          "--now", str(NOW + 3600), "--metrics", "-")
    assert code == 0 and _parse(out) == samples
    code, _, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                        "--metrics", "-", "--json")
    assert code == 2 and "leave out --json" in err
    code, _, err = _run(capsys, "gateway", "status", "--gateway-dir", str(gateway_dir),
                        "--metrics", str(tmp_path / "no" / "such.prom"))
    assert code == 2 and "no such directory" in err


def test_the_collector_never_reads_half_a_file(tmp_path: Path) -> None:
    """A reader polling the file while it is rewritten (large and small
    versions in turn) always finds one whole version."""
    target = tmp_path / "gw.prom"
    versions = [("".join(f"qrpay_gateway_last_record{{gateway=\"g{i}\"}} {n}\n"
                         for i in range(size)) + "# EOF\n").encode()
                for n, size in enumerate((2000, 3, 700, 1))]
    write_textfile(target, versions[0])
    reads: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            reads.append(target.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(300):
            write_textfile(target, versions[round_ % len(versions)])
    finally:
        done.set()
        reader.join()
    assert reads and all(data in versions for data in reads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw.prom"]
