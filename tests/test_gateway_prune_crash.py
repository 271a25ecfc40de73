"""Pruning the gateway journal, by killing the process.

Each round starts tests/crash_worker.py in "upload" mode on the same directory:
a gateway with retention 0 that scans, and after about every other call
exports a batch, prints it (`BATCH <hex>`: from then on settlement has it),
acks it (which prunes the journal in the same call) and prints `ACKED <seq>`.
The round SIGKILLs it at a seeded random moment, some kills aimed at the next
write to the WAL (a scan's commit, a batch's, an ack's or a prune's), and
reopens the directory here:

- the journal holds records P+1..M without gaps, where P is how far pruning
  has got; every pruned record was in a batch printed before it was acked;
- every ACKed payment is either still in the journal, as ACKed, or was pruned
  and is in a printed batch with the same token and amount;
- a batch number always names the same bytes, re-exported after a restart or not.

At the end everything printed, plus what the journal still holds, is ingested
into a Settlement: no findings (no gap, no conflict, no double spend) and the
charges are the sum of every record ever journaled, so pruning lost nothing
and numbering carried on over every restart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

import qrpay
from qrpay.settlement import Settlement
from qrpay.wire import split_document

from test_gateway_crash import RoundReport, cw, run_worker, uncommitted_wal_frames

ROUNDS = 16
SEED = 20_271_129
KILL_DELAY = (0.05, 0.5)   # seconds after the first ACK line


@dataclass
class Delivered:
    batches: dict[int, bytes] = field(default_factory=dict)        # seq -> bytes
    records: dict[int, tuple[bytes, int]] = field(default_factory=dict)  # seq -> token, amount


@dataclass
class PruneRound(RoundReport):
    last_line: str = ""           # the kind of the last complete line
    pruned_through: int = 0
    journaled: int = 0


def read_output(data: bytes, report: PruneRound, delivered: Delivered
                ) -> list[tuple[int, int, bytes]]:
    """The round's ACKed payments as (record, amount, token); batches it printed
    go into `delivered`."""
    complete = data.rpartition(b"\n")[0]
    lines = complete.split(b"\n")[1:] if complete else []
    acks = []
    for line in lines:
        kind, _, rest = line.partition(b" ")
        report.last_line = kind.decode()
        if kind == b"ACK":
            f = rest.split(b" ")
            acks.append((int(f[2]), int(f[3]), bytes.fromhex(f[6].decode())))
        elif kind == b"BATCH":
            batch = bytes.fromhex(rest.decode())
            doc = msgpack.unpackb(split_document(batch)[0])
            known = delivered.batches.setdefault(doc["seq"], batch)
            if known != batch:
                report.problems.append(f"round {report.number}: batch {doc['seq']} was "
                                       f"printed twice with different bytes")
            for seq, token, amount, _scene, _time in doc["records"]:
                delivered.records[seq] = (token, amount)
        elif kind != b"ACKED":
            report.problems.append(f"round {report.number}: a garbled line {line[:60]!r}")
    report.acks = len(acks)
    return acks


def check(world: Any, directory: Path, acked: dict[int, tuple[int, bytes]],
          delivered: Delivered, report: PruneRound) -> None:
    n = report.number
    gateway = world.open(directory, cw.UPLOAD_POLICY)
    try:
        pruned = gateway._journal.get_int("pruned_through_record")
        records = gateway.records()
        report.pruned_through, report.journaled = pruned, len(records)
        last = records[-1].seq if records else pruned
        if [r.seq for r in records] != list(range(pruned + 1, last + 1)):
            report.problems.append(f"round {n}: the journal holds records "
                                   f"{[r.seq for r in records][:5]}... after pruning "
                                   f"through {pruned}")
        missing = [seq for seq in range(1, pruned + 1) if seq not in delivered.records]
        if missing:
            report.problems.append(f"round {n}: records {missing[:5]} were pruned but never "
                                   f"delivered to settlement")
        by_seq = {r.seq: r for r in records}
        for seq, (amount, token) in acked.items():
            if seq > pruned:
                r = by_seq.get(seq)
                if r is None or (r.amount, r.token) != (amount, token):
                    report.problems.append(f"round {n}: ACKed record {seq} is not in the "
                                           f"journal as ACKed")
            elif delivered.records.get(seq) != (token, amount):
                report.problems.append(f"round {n}: ACKed record {seq} was pruned, and "
                                       f"settlement did not get it as ACKed")
    finally:
        gateway.close()


@pytest.fixture(scope="module")
def prune_rounds(tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[list[PruneRound], Delivered, dict[int, tuple[int, bytes]], Path]:
    base = tmp_path_factory.mktemp("prune-crash")
    directory = base / "gateway"
    world = cw.world()
    rng = random.Random(SEED)
    delivered = Delivered()
    acked: dict[int, tuple[int, bytes]] = {}     # record -> (amount, token)
    reports = []
    for number in range(ROUNDS):
        report = PruneRound(number, "upload", rng.uniform(*KILL_DELAY),
                            aim_at_commit=number % 2 == 1)
        reports.append(report)
        data = run_worker(directory, base / f"round-{number}.out", report, rng.randrange(2**32))
        if report.problems:
            break
        report.uncommitted_wal_frames = uncommitted_wal_frames(directory / "journal.sqlite3-wal")
        for seq, amount, token in read_output(data, report, delivered):
            if acked.setdefault(seq, (amount, token)) != (amount, token):
                report.problems.append(f"round {number}: record {seq} ACKed twice, "
                                       f"for different payments")
        check(world, directory, acked, delivered, report)
    return reports, delivered, acked, directory


def test_pruning_loses_no_acknowledged_payment(prune_rounds: Any) -> None:
    reports, _, _, _ = prune_rounds
    problems = [p for r in reports for p in r.problems]
    if problems:
        pytest.fail(f"{len(problems)} problems, the first ones:\n" + "\n".join(problems[:20]),
                    pytrace=False)
    assert len(reports) == ROUNDS and all(r.acks for r in reports)
    # Pruning happened, and kept going over the restarts.
    assert reports[-1].pruned_through > reports[0].pruned_through > 0
    print(f"\n{ROUNDS} rounds ({qrpay.backend}): last line before the kill "
          f"{[r.last_line for r in reports]}; pruned through "
          f"{[r.pruned_through for r in reports]}; records left "
          f"{[r.journaled for r in reports]}; killed inside a transaction in "
          f"{sum(1 for r in reports if r.uncommitted_wal_frames)}")


def test_settlement_gets_one_gapless_stream(prune_rounds: Any, tmp_path: Path) -> None:
    reports, delivered, acked, directory = prune_rounds
    world = cw.world()
    settlement = Settlement(tmp_path, world.trust, [world.gateway_key.public],
                            max_age=cw.UPLOAD_POLICY.max_age, skew=cw.UPLOAD_POLICY.skew)
    for seq in sorted(delivered.batches):
        settlement.ingest(delivered.batches[seq])
    gateway = world.open(directory, cw.UPLOAD_POLICY)
    try:
        remaining = {r.seq: r.amount for r in gateway.records()}
        while (batch := gateway.export_batch(max_records=500,
                                             now=gateway.time_floor + 1)) is not None:
            gateway.ack(settlement.ingest(batch).seq)
    finally:
        gateway.close()
    amounts = {seq: amount for seq, (_token, amount) in delivered.records.items()} | remaining
    assert set(amounts) == set(range(1, max(amounts) + 1))     # every record, once
    assert all(amounts[seq] == amount for seq, (amount, _) in acked.items())
    report = settlement.report()
    assert report.findings == []
    assert report.charged_total == sum(amounts.values())
