"""Money stays right when the journal misbehaves (issue 10, gateway side):

- D1: a write whose commit failed has an unknown outcome; the gateway voids
  what it may have written before it answers, or stays closed until it can;
- D2: one Gateway shared by threads;
- D3/D4: a lost, emptied or rolled-back journal is refused at open (its
  anchor remembers how far it got), and `recover_gateway` goes on from what
  is left without letting an old token pass again;
- D5: damage SQLite's quick_check misses is a typed error;
- D7/D8: the deny list's signing time bounds trusted time; a clock that
  reads NaN or inf is untrusted.

Real syscall faults (fdatasync/pwrite64 failing under a whole gateway day)
are in test_gateway_faults.py; SIGKILLs in test_gateway_crash.py.
"""

from __future__ import annotations

import math
import random
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qrpay import (
    Credential, DeviceKey, GatewayKey, IssuerKey, Reason, Scene, TokenGenerator, TrustStore,
    errors, generate_batch,
)
from qrpay.anchor import ANCHOR_FILE, SLOT_SIZE, AnchorFile
from qrpay.denylist import sign_deny_list
from qrpay.gateway import JOURNAL_FILE, Gateway, GatewayPolicy
from qrpay.journal import Journal
from qrpay.recovery import recover_gateway
from qrpay.wire import split_document, unpack_strict

POLICY = GatewayPolicy(deny_list_max_age=None, max_offline_uses=10_000, retention=0)
RIDERS = 8


@pytest.fixture
def gateway_key() -> GatewayKey:
    return GatewayKey(bytes(range(100, 132)))


@pytest.fixture
def riders(issuer: IssuerKey) -> tuple[list[Credential], list[DeviceKey]]:
    return make_riders(issuer)


def make_riders(issuer: IssuerKey) -> tuple[list[Credential], list[DeviceKey]]:
    devices = [DeviceKey(bytes([200 + i]) * 32) for i in range(RIDERS)]
    creds = [issuer.issue(account=7000 + i, device_public=d.public, limit=10**9,
                          scenes=[Scene.BUS], not_before=1_700_000_000,
                          not_after=1_900_000_000, serial=5000 + i)
             for i, d in enumerate(devices)]
    return creds, devices


class Tokens:
    """Distinct tokens of the riders, counters never repeating."""

    def __init__(self, riders: tuple[list[Credential], list[DeviceKey]]) -> None:
        self.creds, self.devices = riders
        self.counter = 0
        self.lock = threading.Lock()

    def make(self, n: int, t: int) -> list[bytes]:
        with self.lock:
            counters = list(range(self.counter + 1, self.counter + n + 1))
            self.counter += n
        who = [c % RIDERS for c in counters]
        rows = generate_batch([self.creds[i] for i in who], [self.devices[i] for i in who],
                              np.full(n, int(Scene.BUS)), counters, t)
        return [bytes(row) for row in rows]


def journal_tokens(directory: Path) -> list[bytes]:
    """Token bytes of every record, read with plain sqlite3 (no qrpay)."""
    with sqlite3.connect(directory / JOURNAL_FILE) as db:
        return [row[0] for row in db.execute("SELECT token FROM records ORDER BY seq")]


def crash(gw: Gateway) -> None:
    """Stop like a killed process: no anchor sync, no checkpoint; only the
    handles go (as the kernel would close them)."""
    assert gw._journal is not None and gw._anchor is not None
    gw._journal._db.close()
    gw._anchor.close()
    gw._unlock()


# -- D1: a failed commit is not a refusal -------------------------------------------------

def _committed_then_failed(journal_method: Any) -> Any:
    """A journal write that reaches the disk and then reports failure: the
    worst case of a failed sync (the bytes are there after a crash)."""
    def write(self: Journal, *args: Any) -> Any:
        journal_method(self, *args)
        raise errors.JournalUnavailable("disk I/O error (injected after the commit)")
    return write


def test_a_scan_whose_commit_failed_is_voided_and_can_be_retried(
        tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        riders: tuple[list[Credential], list[DeviceKey]], now: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = Tokens(riders)
    gw = Gateway(tmp_path, gateway_key, deny_trust, POLICY)
    first = gw.scan(tokens.make(1, now)[0], 100, Scene.BUS, now)
    refused = tokens.make(3, now + 1)
    with monkeypatch.context() as patch:
        patch.setattr(Journal, "append", _committed_then_failed(Journal.append))
        with pytest.raises(errors.JournalUnavailable, match="nothing from this call"):
            gw.scan_batch(refused, [100] * 3, Scene.BUS, now + 1)
    # Told "refused": nothing of it is journaled, exported or counted.
    assert journal_tokens(tmp_path) == [gw.records()[0].token]
    assert gw.offline_spend(7002) == (0, 0) and gw.time_floor == now
    crash(gw)
    gw = Gateway(tmp_path, gateway_key, deny_trust, POLICY)
    assert [r.seq for r in gw.records()] == [first.record]
    # The rider shows the same codes again: charged once, numbered on.
    result = gw.scan_batch(refused, [100] * 3, Scene.BUS, now + 2)
    assert result.ok.all() and [r.record for r in result.receipts if r] == [2, 3, 4]
    batch = unpack_strict(split_document(gw.export_batch(now=now + 3) or b"")[0])
    assert [row[1] for row in batch["records"]] == [gw.records()[0].token, *refused]
    gw.close()


@pytest.mark.parametrize("operation", ["export", "ack", "deny_list", "prune"])
def test_other_writes_whose_commit_failed_leave_memory_and_journal_agreeing(
        operation: str, tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        issuer: IssuerKey, riders: tuple[list[Credential], list[DeviceKey]], now: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = Tokens(riders)
    gw = Gateway(tmp_path, gateway_key, deny_trust, POLICY)
    gw.scan_batch(tokens.make(4, now), [100] * 4, Scene.BUS, now)
    if operation in ("ack", "prune"):
        gw.export_batch(now=now)
    later = now + 10 * POLICY.replay_window
    method, call = {
        "export": ("add_batch", lambda: gw.export_batch(now=now)),
        "ack": ("ack_batch", lambda: gw.ack(1)),
        "deny_list": ("set", lambda: gw.update_deny_list(
            sign_deny_list(issuer, 1, [5001], now), now)),
        "prune": ("prune", lambda: gw.ack(1)),
    }[operation]
    if operation == "prune":   # the ack goes through; the prune it runs fails
        gw.scan(tokens.make(1, later)[0], 100, Scene.BUS, later)
    with monkeypatch.context() as patch:
        patch.setattr(Journal, method, _committed_then_failed(getattr(Journal, method)))
        with pytest.raises(errors.JournalUnavailable):
            call()
    state = (gw.records(), gw.offline_spend(7001), gw.deny_list.version,
             gw._journal.batches() if gw._journal else None)
    crash(gw)
    gw = Gateway(tmp_path, gateway_key, deny_trust, POLICY)
    assert (gw.records(), gw.offline_spend(7001), gw.deny_list.version,
            gw._journal.batches() if gw._journal else None) == state
    if operation == "export":   # a voided batch was never handed out: the number is free
        assert state[3] == []
        assert unpack_strict(split_document(gw.export_batch(now=now) or b"")[0])["seq"] == 1
    call()                       # the retry goes through
    gw.close()


def test_an_interrupt_during_a_commit_is_a_doubt_too(
        tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        riders: tuple[list[Credential], list[DeviceKey]], now: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C lands just after the commit returned: no receipt was handed
    out, so the payment is voided, and memory and journal agree."""
    tokens = Tokens(riders)
    gw = Gateway(tmp_path, gateway_key, deny_trust, POLICY)
    interrupted = tokens.make(2, now)

    def append(self: Journal, *args: Any) -> None:
        real_append(self, *args)
        raise KeyboardInterrupt

    real_append = Journal.append
    with monkeypatch.context() as patch:
        patch.setattr(Journal, "append", append)
        with pytest.raises(KeyboardInterrupt):
            gw.scan_batch(interrupted, [100, 100], Scene.BUS, now)
    assert gw.records() == [] and journal_tokens(tmp_path) == []
    receipts = gw.scan_batch(interrupted, [100, 100], Scene.BUS, now).receipts
    assert [r.record for r in receipts if r] == [1, 2]     # no clash with a ghost record
    gw.close()


def test_a_doubt_that_cannot_be_voided_closes_the_gateway_until_it_can(
        tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        riders: tuple[list[Credential], list[DeviceKey]], now: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = Tokens(riders)
    gw = Gateway(tmp_path, gateway_key, deny_trust, POLICY)
    doubtful = tokens.make(2, now)
    real_void = Journal.void
    failures = {"void": 3}

    def void(self: Journal, *args: int) -> None:
        if failures["void"]:
            failures["void"] -= 1
            raise errors.JournalUnavailable("disk I/O error (injected)")
        real_void(self, *args)

    monkeypatch.setattr(Journal, "void", void)
    with monkeypatch.context() as patch:
        patch.setattr(Journal, "append", _committed_then_failed(Journal.append))
        with pytest.raises(errors.JournalUnavailable, match="could not be undone"):
            gw.scan_batch(doubtful, [100, 100], Scene.BUS, now)
    # Still in doubt: every call is refused, and accepts nothing.
    with pytest.raises(errors.JournalUnavailable, match="still in doubt"):
        gw.scan(tokens.make(1, now)[0], 100, Scene.BUS, now)
    with pytest.raises(errors.JournalUnavailable):
        gw.export_batch(now=now)
    assert failures["void"] == 0
    # The disk is back: the next call voids the doubt first, then works.
    assert gw.records() == []
    receipts = gw.scan_batch(doubtful, [100, 100], Scene.BUS, now + 1).receipts
    assert [r.record for r in receipts if r] == [1, 2]
    gw.close()


def test_a_doubt_left_by_a_crash_is_voided_by_the_next_open(
        tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        riders: tuple[list[Credential], list[DeviceKey]], now: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = Tokens(riders)
    gw = Gateway(tmp_path, gateway_key, deny_trust, POLICY)
    gw.scan(tokens.make(1, now)[0], 100, Scene.BUS, now)

    def never(self: Journal, *args: int) -> None:
        raise errors.JournalUnavailable("disk I/O error (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(Journal, "append", _committed_then_failed(Journal.append))
        patch.setattr(Journal, "void", never)
        with pytest.raises(errors.JournalUnavailable):
            gw.scan_batch(tokens.make(3, now + 1), [100] * 3, Scene.BUS, now + 1)
    assert len(journal_tokens(tmp_path)) == 4   # the failed commit is on disk...
    crash(gw)
    gw = Gateway(tmp_path, gateway_key, deny_trust, POLICY)
    assert [r.seq for r in gw.records()] == [1]  # ...and voided by the open, from the anchor
    assert len(journal_tokens(tmp_path)) == 1
    gw.close()


# -- D2: threads -----------------------------------------------------------------------------

def test_threads_sharing_a_gateway(tmp_path: Path, gateway_key: GatewayKey,
                                   deny_trust: TrustStore, issuer: IssuerKey,
                                   riders: tuple[list[Credential], list[DeviceKey]],
                                   now: int) -> None:
    """Threads mix scans, batch scans (some tokens scanned twice), exports,
    acks, prunes and deny-list updates; every receipt must be in the journal
    under its number, each number once, and no refused token journaled."""
    tokens = Tokens(riders)
    # Threads read a shared clock and commit in any order: allow for it.
    gw = Gateway(tmp_path, gateway_key, deny_trust, replace(POLICY, clock_tolerance=3600))
    clock = [now]
    receipts: list[tuple[int, bytes, bool]] = []
    refused: list[bytes] = []
    errors_seen: list[BaseException] = []
    exported: list[bytes] = []
    log = threading.Lock()

    def scanner(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            t = clock[0]
            batch = tokens.make(rng.choice([1, 1, 3, 8]), t)
            batch += batch[:rng.randint(0, 2)]               # double taps in the same call
            result = gw.scan_batch(batch, [rng.randint(1, 300) for _ in batch], Scene.BUS, t)
            with log:
                for token, receipt, reason in zip(batch, result.receipts, result.reasons):
                    if receipt is not None:
                        receipts.append((receipt.record, token, receipt.duplicate))
                    else:
                        refused.append(token)
                        assert reason != Reason.OK

    scanning = threading.Event()
    during_scans = [0]

    def uploader() -> None:
        step = 0
        while scanning.is_set() or step < 40:
            step += 1
            clock[0] += 7
            data = gw.export_batch(max_records=25, now=clock[0])
            if data is not None:
                exported.append(data)
                during_scans[0] += scanning.is_set()
                gw.ack(unpack_strict(split_document(data)[0])["seq"])
            if step % 10 == 5:
                version = gw.deny_list.version + 1
                gw.update_deny_list(sign_deny_list(issuer, version, [9_999_999], clock[0]),
                                    clock[0])
            gw.prune()

    def guarded(target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors_seen.append(exc)

    scanners = [threading.Thread(target=guarded, args=(scanner, seed)) for seed in range(4)]
    upload = threading.Thread(target=guarded, args=(uploader,))
    scanning.set()
    for thread in [*scanners, upload]:
        thread.start()
    for thread in scanners:
        thread.join()
    scanning.clear()
    upload.join()
    assert errors_seen == []
    while (data := gw.export_batch(now=clock[0])) is not None:
        exported.append(data)
        gw.ack(unpack_strict(split_document(data)[0])["seq"])
    # Everything journaled, pruned or not, is in exactly one exported batch.
    journaled: dict[int, bytes] = {}
    for data in exported:
        for seq, token, *_ in unpack_strict(split_document(data)[0])["records"]:
            assert seq not in journaled
            journaled[seq] = token
    firsts = [(seq, token) for seq, token, duplicate in receipts if not duplicate]
    assert len({seq for seq, _ in firsts}) == len(firsts)             # no number twice
    assert all(journaled.get(seq) == token for seq, token in firsts)  # every receipt journaled
    assert len(journaled) == len(firsts)                              # and nothing else
    assert not set(refused) & set(journaled.values())
    assert all(journaled.get(seq) == token for seq, token, dup in receipts if dup)
    assert len(firsts) > 500 and during_scans[0] >= 3     # the threads did overlap
    gw.close()


# -- D3, D4: a lost or rolled-back journal ----------------------------------------------------

def scan_in_a_child_then_die(directory: Path, n: int, now: int) -> list[bytes]:
    """A child process scans n tokens, one commit each (times now, now+1, ...),
    and dies without closing; returns the tokens (the same fixtures made here)."""
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_gateway_durability import *
from qrpay import IssuerKey, Role, TrustStore
issuer = IssuerKey(bytes(range(32)))
trust = TrustStore()
trust.add(issuer, roles=Role.CREDENTIALS | Role.DENY_LIST)
tokens = Tokens(make_riders(issuer))
gw = Gateway({str(directory)!r}, GatewayKey(bytes(range(100, 132))), trust, POLICY)
for i in range({n}):
    gw.scan(tokens.make(1, {now} + i)[0], 100, Scene.BUS, {now} + i)
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    tokens = Tokens(make_riders(IssuerKey(bytes(range(32)))))
    return [tokens.make(1, now + i)[0] for i in range(n)]


def _journal_then_lose(directory: Path, how: str) -> None:
    """Damage the journal of a gateway that has journaled payments."""
    path = directory / JOURNAL_FILE
    if how == "delete":
        path.unlink()
    elif how == "truncate0":
        path.write_bytes(b"")
    elif how == "truncate1":
        path.write_bytes(b"S")
    elif how == "empty-sqlite":
        path.unlink()
        sqlite3.connect(path).execute("PRAGMA user_version=1").connection.close()
    elif how == "older-copy":
        pass  # done by the caller
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["delete", "truncate0", "truncate1", "empty-sqlite"])
def test_a_lost_journal_is_refused_and_recovery_refuses_old_tokens(
        how: str, tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        riders: tuple[list[Credential], list[DeviceKey]], now: int) -> None:
    tokens = Tokens(riders)
    accepted = tokens.make(6, now)
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        assert gw.scan_batch(accepted, [100] * 6, Scene.BUS, now).ok.all()
        gw.export_batch(max_records=2, now=now)
    _journal_then_lose(tmp_path, how)
    with pytest.raises(errors.JournalUnavailable, match="gateway recover"):
        Gateway(tmp_path, gateway_key, deny_trust, POLICY)
    done = recover_gateway(tmp_path, gateway_key, deny_trust, POLICY, now=now + 5)
    assert (done.kept_records, done.lost_records, done.lost_batches) == (0, 6, 1)
    assert done.refused_through == now + 5 + POLICY.skew
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        # Nothing the lost journal accepted passes again...
        result = gw.scan_batch(accepted, [100] * 6, Scene.BUS, now + 6)
        assert set(result.reasons.tolist()) == {Reason.TOKEN_STALE}
        # ...codes made after the recovery do, numbered after the lost ones.
        fresh = tokens.make(1, done.refused_through + 1)[0]
        assert gw.scan(fresh, 100, Scene.BUS, done.refused_through + 1).record == 7
        batch = unpack_strict(split_document(gw.export_batch(now=now + 90) or b"")[0])
        assert (batch["seq"], batch["first"]) == (2, 7)


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_a_damaged_wal_after_a_crash_is_refused(
        how: str, tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        riders: tuple[list[Credential], list[DeviceKey]], now: int) -> None:
    accepted = scan_in_a_child_then_die(tmp_path, 3, now)   # three commits, only in the WAL
    wal = tmp_path / (JOURNAL_FILE + "-wal")
    data = bytearray(wal.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 1
        wal.write_bytes(bytes(data))
    elif how == "truncate":
        wal.write_bytes(bytes(data[:len(data) // 2]))
    else:
        wal.unlink()
    with pytest.raises(errors.JournalUnavailable, match="behind its anchor|holds no journal"):
        Gateway(tmp_path, gateway_key, deny_trust, POLICY)
    done = recover_gateway(tmp_path, gateway_key, deny_trust, POLICY, now=now + 10)
    assert done.kept_records + done.lost_records == 3 and done.lost_records >= 1
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        result = gw.scan_batch(accepted, [100] * 3, Scene.BUS, now + 10)
        assert not any(r is not None and not r.duplicate for r in result.receipts)


def test_an_older_copy_of_the_journal_is_refused(
        tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        riders: tuple[list[Credential], list[DeviceKey]], now: int) -> None:
    tokens = Tokens(riders)
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        gw.scan(tokens.make(1, now)[0], 100, Scene.BUS, now)
    saved = (tmp_path / JOURNAL_FILE).read_bytes()
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        gw.scan(tokens.make(1, now + 1)[0], 100, Scene.BUS, now + 1)
    (tmp_path / JOURNAL_FILE).write_bytes(saved)          # a restore from an old backup
    with pytest.raises(errors.JournalUnavailable, match="last record is 1, the anchor's 2"):
        Gateway(tmp_path, gateway_key, deny_trust, POLICY)


def test_a_damaged_journal_file_is_moved_aside_by_recovery(
        tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        riders: tuple[list[Credential], list[DeviceKey]], now: int) -> None:
    tokens = Tokens(riders)
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        gw.scan(tokens.make(1, now)[0], 100, Scene.BUS, now)
    (tmp_path / JOURNAL_FILE).write_bytes(b"this is not a database" * 200)
    done = recover_gateway(tmp_path, gateway_key, deny_trust, POLICY, now=now + 1)
    assert done.moved_aside == (f"{JOURNAL_FILE}.damaged-{now + 1}",)
    assert (tmp_path / done.moved_aside[0]).read_bytes().startswith(b"this is not")
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        assert gw.records() == [] and gw.time_floor == now + 1


def test_recovery_refuses_a_clock_behind_the_anchor_and_another_key(
        tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        riders: tuple[list[Credential], list[DeviceKey]], now: int) -> None:
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        gw.scan(Tokens(riders).make(1, now)[0], 100, Scene.BUS, now)
    with pytest.raises(errors.ClockUntrusted):
        recover_gateway(tmp_path, gateway_key, deny_trust, POLICY, now=now - 3600)
    with pytest.raises(errors.InvalidArgument):
        recover_gateway(tmp_path, GatewayKey.generate(), deny_trust, POLICY, now=now)
    with pytest.raises(errors.ClockUntrusted):
        recover_gateway(tmp_path, gateway_key, deny_trust, POLICY, clock=lambda: math.nan)


def test_a_torn_anchor_slot_falls_back_to_the_other(
        tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
        riders: tuple[list[Credential], list[DeviceKey]], now: int) -> None:
    tokens = Tokens(riders)
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        gw.scan(tokens.make(1, now)[0], 100, Scene.BUS, now)
    anchor_path = tmp_path / ANCHOR_FILE
    handle, _ = AnchorFile.open(tmp_path)
    newest = handle.current.generation
    handle.close()
    data = bytearray(anchor_path.read_bytes())
    data[(newest % 2) * 4096 + 20] ^= 0xFF               # the newer slot is torn
    anchor_path.write_bytes(bytes(data))
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        assert len(gw.records()) == 1
    data = bytearray(anchor_path.read_bytes())
    for offset in (0, 4096):
        data[offset + SLOT_SIZE - 1] ^= 0xFF              # both torn: refused, not reset
    anchor_path.write_bytes(bytes(data))
    with pytest.raises(errors.JournalUnavailable, match="damaged"):
        Gateway(tmp_path, gateway_key, deny_trust, POLICY)


def test_another_gateways_anchor_is_refused(tmp_path: Path, gateway_key: GatewayKey,
                                           deny_trust: TrustStore) -> None:
    Gateway(tmp_path, gateway_key, deny_trust, POLICY).close()
    (tmp_path / JOURNAL_FILE).unlink()
    with pytest.raises(errors.InvalidArgument, match="another gateway"):
        Gateway(tmp_path, GatewayKey.generate(), deny_trust, POLICY)


# -- D5: damage quick_check misses -------------------------------------------------------------

def _record_header_offset(path: Path, serial: int) -> int:
    """Where the first record's SQLite cell header starts: its bytes are
    fixed by the column types of the records the test writes."""
    data = path.read_bytes()
    # header length 10; seq NULL (the rowid); serial 4-byte int; counter 1-byte; account
    # 2-byte; amount 1-byte; scene the constant 0; gateway_time 4-byte; a 204-byte token.
    header = bytes([10, 0, 4, 1, 2, 1, 8, 4, 0x83, 0x24]) + serial.to_bytes(4, "big")
    at = data.find(header)       # the first of the three records
    assert at > 0
    return at


@pytest.mark.parametrize("damage", ["type", "value"])
def test_a_damaged_record_is_a_typed_error_at_open(
        damage: str, tmp_path: Path, gateway_key: GatewayKey, trust: TrustStore,
        issuer: IssuerKey, now: int) -> None:
    device = DeviceKey(bytes([9]) * 32)
    cred = issuer.issue(account=7000, device_public=device.public, limit=10**6,
                        scenes=[Scene.BUS], not_before=now - 60, not_after=now + 86400,
                        serial=9_000_001)
    with Gateway(tmp_path, gateway_key, trust, POLICY) as gw:
        for counter in range(3, 6):      # counters of one byte: the header below
            gw.scan(TokenGenerator(cred, device, counter).make(Scene.BUS, now), 100,
                    Scene.BUS, now)
    path = tmp_path / JOURNAL_FILE
    at = _record_header_offset(path, 9_000_001)
    data = bytearray(path.read_bytes())
    if damage == "type":
        data[at + 2] = 21         # serial's type byte: a 4-byte int -> a 4-byte text
    else:
        data[at + 13] ^= 0x01     # serial's last byte: still an int, another serial
    path.write_bytes(bytes(data))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    with pytest.raises(errors.JournalUnavailable, match="damaged|integrity"):
        Gateway(tmp_path, gateway_key, trust, POLICY)


# -- D7, D8: trusted time -----------------------------------------------------------------------

def test_the_deny_list_bounds_trusted_time(tmp_path: Path, gateway_key: GatewayKey,
                                          deny_trust: TrustStore, issuer: IssuerKey,
                                          generator: TokenGenerator, now: int) -> None:
    screenshot = generator.make(Scene.BUS, now - 86_400)      # a day-old code
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY) as gw:
        gw.update_deny_list(sign_deny_list(issuer, 1, [], now), now)
        assert gw.time_floor == now - POLICY.skew
        with pytest.raises(errors.ClockUntrusted):               # the clock set back a day
            gw.scan(screenshot, 100, Scene.BUS, now - 86_400)
    with Gateway(tmp_path, gateway_key, deny_trust, POLICY, clock=lambda: now - 86_400) as gw:
        with pytest.raises(errors.ClockUntrusted):               # after a restart too
            gw.scan(screenshot, 100, Scene.BUS)
        assert gw.records() == []


@pytest.mark.parametrize("reading", [math.nan, math.inf, -math.inf, -1.0, 2.0**41, "noon", None])
def test_a_clock_that_is_not_a_time_is_untrusted(reading: object, tmp_path: Path,
                                                 gateway_key: GatewayKey, trust: TrustStore,
                                                 generator: TokenGenerator, now: int) -> None:
    with Gateway(tmp_path, gateway_key, trust, POLICY, clock=lambda: reading) as gw:  # type: ignore[arg-type,return-value]
        with pytest.raises(errors.ClockUntrusted):
            gw.scan(generator.make(Scene.BUS, now), 100, Scene.BUS)
        with pytest.raises(errors.InvalidArgument):
            gw.scan(generator.make(Scene.BUS, now), 100, Scene.BUS, math.nan)
        assert gw.records() == []


# -- the anchor keeps up, cheaply ------------------------------------------------------------------

def test_the_anchor_follows_every_commit_without_a_sync(tmp_path: Path, now: int) -> None:
    """After a kill (no close), the anchor already names the last commit, so
    a WAL that loses it is caught."""
    scan_in_a_child_then_die(tmp_path, 5, now)
    handle, found = AnchorFile.open(tmp_path)
    assert found and (handle.current.last_record, handle.current.time_floor) == (5, now + 4)
    handle.close()
