"""Crash durability of the gateway journal, by killing the process.

Each round starts tests/crash_worker.py (a gateway scanning as fast as it can,
printing `ACK ...` after every acknowledged call), lets it run for a seeded
random moment after its first ACK, SIGKILLs it and reopens its directory here:

- every ACKed (serial, counter) is journaled with the ACKed record number,
  amount, time and token bytes; records from earlier rounds are untouched;
- records are numbered 1..n without gaps and no (serial, counter) is
  journaled twice; at most the one call in flight at the kill is committed
  without (complete) ACK lines, and the time floor is its time;
- every token journaled this round (ACKed or not) comes back as a double tap
  (the first receipt, duplicate=True) and a token with the same counter but
  other bytes is refused with AlreadyAccepted; neither journals anything;
- the offline spend rebuilt from the journal is the sum of the records.

A directory carries on over ROUNDS_PER_JOURNAL rounds, so the worker also
proves that a restarted gateway continues (its clock from the time floor, its
counters from the journal) without refusing anything. The worker inherits the
environment, so `QRPAY_NO_EXTENSIONS=1 pytest` kills the pure-Python backend.

QRPAY_CRASH_ROUNDS sets the number of kills (default 50, so the README's test
command, which runs the suite once per backend, kills 100 gateways here; a
long soak: QRPAY_CRASH_ROUNDS=5000 pytest tests/test_gateway_crash.py; QRPAY_CRASH_SEED
picks another seeded run, e.g. to soak on both cores at once).
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import qrpay
from qrpay import AlreadyAccepted, QrPayError, Reason, generate_batch
from qrpay.journal import Record

WORKER = Path(__file__).with_name("crash_worker.py")
ROUNDS = int(os.environ.get("QRPAY_CRASH_ROUNDS", "50"))
ROUNDS_PER_JOURNAL = 5
SEED = int(os.environ.get("QRPAY_CRASH_SEED", "20270115"))
KILL_DELAY = (0.05, 0.6)   # seconds after the first ACK line
FORGED_SAMPLE = 300        # replays with other bytes checked per round (plus the last 50)
START_TIMEOUT = 60.0


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


cw = _load_worker()


@dataclass
class Ack:
    serial: int
    counter: int
    record: int
    amount: int
    gateway_time: int
    duplicate: bool
    token: bytes


@dataclass
class RoundReport:
    number: int
    mode: str
    delay: float
    aim_at_commit: bool = False   # killed on the first WAL write after the delay
    returncode: int | None = None
    acks: int = 0                 # complete ACK lines (double taps included)
    new_records: int = 0          # records journaled this round
    largest_commit: int = 0       # records of the largest call journaled this round
    unacked_committed: int = 0    # journaled this round without a complete ACK line
    torn: bytes = b""             # the incomplete last line, if any
    uncommitted_wal_frames: int = 0  # frames of a transaction cut off mid-commit
    startup: float = 0.0          # seconds from starting the worker to its first ACK
    checking: float = 0.0         # seconds spent here checking the journal
    problems: list[str] = field(default_factory=list)


def parse_output(data: bytes, report: RoundReport) -> tuple[str, list[Ack]]:
    complete, _, report.torn = data.rpartition(b"\n")
    lines = complete.split(b"\n") if complete else []
    start = lines[0].decode() if lines else ""
    acks = []
    for line in lines[1:]:
        fields = line.split(b" ")
        if len(fields) != 8 or fields[0] != b"ACK":
            report.problems.append(f"round {report.number}: a garbled ACK line {line[:80]!r}")
            continue
        serial, counter, record, amount, gtime, dup = (int(f) for f in fields[1:7])
        acks.append(Ack(serial, counter, record, amount, gtime, bool(dup),
                        bytes.fromhex(fields[7].decode())))
    report.acks = len(acks)
    return start, acks


def uncommitted_wal_frames(wal: Path) -> int:
    """Frames of the current WAL generation after its last commit frame: pages
    a transaction had written when the kill cut it off before its commit."""
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) < 32:
        return 0
    magic, _version, page_size, _ckpt, salt1, salt2 = struct.unpack(">6I", data[:24])
    if magic not in (0x377F0682, 0x377F0683):
        return 0
    after_commit = 0
    offset = 32
    while offset + 24 <= len(data):
        _page, db_size, s1, s2 = struct.unpack(">4I", data[offset:offset + 16])
        if (s1, s2) != (salt1, salt2):
            break   # a frame left over from an earlier generation of the WAL
        after_commit = 0 if db_size else after_commit + 1
        offset += 24 + page_size
    return after_commit


def wait_for_wal_write(wal: Path, timeout: float = 5.0) -> None:
    """Return as soon as the worker writes to its WAL: the next commit has begun."""
    def stamp() -> tuple[int, int]:
        try:
            st = wal.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    first = stamp()
    deadline = time.monotonic() + timeout
    while stamp() == first and time.monotonic() < deadline:
        time.sleep(0.0001)


def run_worker(directory: Path, out_path: Path, report: RoundReport, seed: int) -> bytes:
    err_path = out_path.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(directory), str(seed), report.mode],
            stdout=out, stderr=err)
        try:
            started = time.monotonic()
            while b"\nACK" not in out_path.read_bytes():
                if proc.poll() is not None or time.monotonic() > started + START_TIMEOUT:
                    break
                time.sleep(0.002)
            else:
                report.startup = time.monotonic() - started
                time.sleep(report.delay)
                if report.aim_at_commit:
                    wait_for_wal_write(directory / "journal.sqlite3-wal")
        finally:
            proc.send_signal(signal.SIGKILL)
            report.returncode = proc.wait()
    if report.returncode != -signal.SIGKILL:
        report.problems.append(
            f"round {report.number}: the worker ended by itself ({report.returncode}): "
            f"{err_path.read_text()[-2000:]}")
    return out_path.read_bytes()


def check_journal(world: Any, directory: Path, before: list[Record], acks: list[Ack],
                  report: RoundReport, rng: random.Random) -> list[Record]:
    problems = report.problems
    n = report.number
    gateway = world.open(directory)
    try:
        records: list[Record] = gateway.records()
        if records[:len(before)] != before:
            problems.append(f"round {n}: records of earlier rounds changed or vanished")
        if [r.seq for r in records] != list(range(1, len(records) + 1)):
            problems.append(f"round {n}: record numbers are not 1..{len(records)}")
        by_key = {(r.serial, r.counter): r for r in records}
        if len(by_key) != len(records):
            problems.append(f"round {n}: a (serial, counter) is journaled twice")
        new = records[len(before):]
        report.new_records = len(new)
        per_call = Counter(r.gateway_time for r in new)   # one `now` per call
        report.largest_commit = max(per_call.values(), default=0)

        # Every ACK is in the journal, as ACKed.
        acked_records: set[int] = set()
        for ack in acks:
            r = by_key.get((ack.serial, ack.counter))
            if r is None:
                problems.append(f"round {n}: ACKed {ack.serial}/{ack.counter} "
                                f"(record {ack.record}) is not in the journal")
                continue
            got = (r.seq, r.amount, r.gateway_time, r.token)
            if got != (ack.record, ack.amount, ack.gateway_time, ack.token):
                problems.append(f"round {n}: ACKed {ack.serial}/{ack.counter} as record "
                                f"{ack.record} but the journal has record {r.seq} "
                                f"(amount {r.amount}, time {r.gateway_time}, same token: "
                                f"{r.token == ack.token})")
            if not ack.duplicate:
                if r.seq in acked_records:
                    problems.append(f"round {n}: record {r.seq} ACKed twice as a new payment")
                if r.seq <= len(before):
                    problems.append(f"round {n}: record {r.seq} of an earlier round "
                                    f"ACKed again as a new payment")
                acked_records.add(r.seq)

        # Only the call in flight at the kill may be journaled without ACK lines.
        unacked = [r for r in new if r.seq not in acked_records]
        report.unacked_committed = len(unacked)
        if unacked:
            last_acked = max(acked_records, default=0)
            if len({r.gateway_time for r in unacked}) != 1 or unacked[0].seq < last_acked:
                problems.append(f"round {n}: un-ACKed records {[r.seq for r in unacked][:10]} "
                                f"are not the tail of one commit (last ACKed {last_acked})")
        if records and gateway.time_floor != max(r.gateway_time for r in records):
            problems.append(f"round {n}: time floor {gateway.time_floor} is not the time of "
                            f"the last journaled payment")

        # An incomplete last line still names a payment that is journaled.
        fields = report.torn.split(b" ")
        if len(fields) > 4 and fields[0] == b"ACK":
            key, record = (int(fields[1]), int(fields[2])), int(fields[3])
            if key not in by_key or by_key[key].seq != record:
                problems.append(f"round {n}: torn line {report.torn[:60]!r} names a payment "
                                f"the journal does not hold")

        # The offline spend rebuilt from the journal (nothing is ever acked).
        spend: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for r in records:
            spend[r.account][0] += r.amount
            spend[r.account][1] += 1
        for account, (amount, uses) in spend.items():
            if gateway.offline_spend(account) != (amount, uses):
                problems.append(f"round {n}: offline spend of {account} is "
                                f"{gateway.offline_spend(account)}, the journal says "
                                f"{(amount, uses)}")

        if new:
            check_replays(world, gateway, new, report, rng)
            after = gateway.records()
            if len(after) != len(records) or gateway.time_floor != max(r.gateway_time
                                                                       for r in records):
                problems.append(f"round {n}: rescanning journaled tokens journaled "
                                f"{len(after) - len(records)} records or moved the floor")
        return records
    finally:
        gateway.close()


def check_replays(world: Any, gateway: qrpay.Gateway, new: list[Record],
                  report: RoundReport, rng: random.Random) -> None:
    problems = report.problems
    n = report.number
    now = gateway.time_floor
    # The very same bytes: a double tap, the first receipt, nothing charged.
    result = gateway.scan_batch([r.token for r in new],
                                [rng.randint(1, cw.MAX_AMOUNT) for _ in new], cw.SCENE, now)
    for r, reason, receipt in zip(new, result.reasons, result.receipts):
        if reason != Reason.OK or receipt is None or not receipt.duplicate or (
                (receipt.record, receipt.amount, receipt.gateway_time, receipt.serial,
                 receipt.counter) != (r.seq, r.amount, r.gateway_time, r.serial, r.counter)):
            problems.append(f"round {n}: journaled record {r.seq} rescanned: "
                            f"{Reason(int(reason)).name} {receipt}")
            break
    last = new[-1]
    try:
        single = gateway.scan(last.token, 1, cw.SCENE, now)
    except QrPayError as exc:
        problems.append(f"round {n}: a double tap of record {last.seq} raised {exc!r}")
    else:
        if not single.duplicate or single.record != last.seq:
            problems.append(f"round {n}: a double tap of record {last.seq} gave {single}")

    # The same (serial, counter) in other bytes: a replay.
    sample = new[-50:] + rng.sample(new[:-50], min(FORGED_SAMPLE, max(0, len(new) - 50)))
    index = {c.serial: i for i, c in enumerate(world.credentials)}
    riders = [index[r.serial] for r in sample]
    forged = generate_batch(
        [world.credentials[i] for i in riders], [world.devices[i] for i in riders],
        np.full(len(sample), int(cw.SCENE)), [r.counter for r in sample],
        np.array([r.gateway_time - 1 for r in sample], dtype=np.uint32))
    clones = [bytes(row) for row in forged]
    assert all(c != r.token for c, r in zip(clones, sample))
    result = gateway.scan_batch(clones, [1] * len(clones), cw.SCENE, now)
    refused = int(np.count_nonzero(result.reasons == Reason.ALREADY_ACCEPTED))
    if refused != len(clones):
        problems.append(f"round {n}: {len(clones) - refused} of {len(clones)} replays with "
                        f"other bytes were not refused as ALREADY_ACCEPTED")
    try:
        gateway.scan(clones[-1], 1, cw.SCENE, now)
    except AlreadyAccepted:
        pass
    except QrPayError as exc:
        problems.append(f"round {n}: a replay of record {sample[-1].seq} raised {exc!r}")
    else:
        problems.append(f"round {n}: a replay of record {sample[-1].seq} was accepted")


@pytest.fixture(scope="module")
def crash_rounds(tmp_path_factory: pytest.TempPathFactory) -> list[RoundReport]:
    base = tmp_path_factory.mktemp("crash")
    world = cw.world()
    rng = random.Random(SEED)
    reports: list[RoundReport] = []
    before: list[Record] = []
    for number in range(ROUNDS):
        if number % ROUNDS_PER_JOURNAL == 0:
            before = []
        directory = base / f"journal-{number // ROUNDS_PER_JOURNAL}"
        mode = "big" if number % 3 == 2 else "mixed"
        report = RoundReport(number, mode, rng.uniform(*KILL_DELAY),
                             aim_at_commit=mode == "big" and number % 2 == 1)
        reports.append(report)
        out_path = base / f"round-{number}.out"
        data = run_worker(directory, out_path, report, rng.randrange(2**32))
        if report.problems:
            break   # the worker failed by itself: later rounds would say nothing new
        report.uncommitted_wal_frames = uncommitted_wal_frames(directory / "journal.sqlite3-wal")
        start, acks = parse_output(data, report)
        if not start.startswith(f"START {qrpay.backend} "):
            report.problems.append(f"round {number}: worker started as {start!r}, "
                                   f"this process runs {qrpay.backend}")
        checking = time.monotonic()
        before = check_journal(world, directory, before, acks, report, rng)
        report.checking = time.monotonic() - checking
        if not report.problems:   # keep the worker's output only when it tells something
            for path in (out_path, out_path.with_suffix(".err")):
                path.unlink()
    return reports


def test_acknowledged_scans_survive_sigkill(crash_rounds: list[RoundReport]) -> None:
    problems = [p for report in crash_rounds for p in report.problems]
    if problems:
        pytest.fail(f"{len(problems)} problems, the first ones:\n" + "\n".join(problems[:20]),
                    pytrace=False)
    assert len(crash_rounds) == ROUNDS
    assert all(report.returncode == -signal.SIGKILL for report in crash_rounds)
    # Every round acknowledged payments before it was killed, big batches too.
    assert all(report.acks > 0 for report in crash_rounds)
    assert max(r.largest_commit for r in crash_rounds if r.mode == "big") >= 300


def test_kills_land_mid_flight(crash_rounds: list[RoundReport]) -> None:
    """The kills were not all polite: in some rounds the worker had journaled
    a call but not (completely) printed its ACKs, and some kills aimed at a
    commit landed inside it (pages in the WAL, no commit frame yet: rolled
    back on open) or just after it (committed, never acknowledged)."""
    unacked = [r.number for r in crash_rounds if r.unacked_committed]
    torn = [r.number for r in crash_rounds if r.torn]
    mid_commit = [r.number for r in crash_rounds if r.uncommitted_wal_frames]
    aimed = [r for r in crash_rounds if r.aim_at_commit]
    print(f"\n{len(crash_rounds)} rounds ({qrpay.backend}): "
          f"committed but un-ACKed in {len(unacked)} {unacked}; "
          f"torn last line in {len(torn)} {torn}; "
          f"uncommitted transaction in the WAL in {len(mid_commit)} {mid_commit} "
          f"({len(aimed)} kills aimed at a commit); "
          f"worker start-up to first ACK {np.mean([r.startup for r in crash_rounds]):.2f} s "
          f"(max {max(r.startup for r in crash_rounds):.2f}), checks "
          f"{np.mean([r.checking for r in crash_rounds]):.2f} s a round")
    assert unacked or torn
    assert any(r.uncommitted_wal_frames or r.unacked_committed for r in aimed)
