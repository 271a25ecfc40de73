"""The scripted gateway day of test_gateway_faults.py, its fault-injecting
worker, its checker and the fork server that runs them.

    LD_PRELOAD=faultshim.so python fault_day.py SHIM WORKDIR DIRROOT PLAN JOBS

The server (this script) imports qrpay once, builds the world (fixed keys, so
every process agrees) and the day with all its tokens and deny lists, then
fork()s one child per case, JOBS at a time. A case child forks the worker,
which arms tests/faultshim.c (loaded with LD_PRELOAD, disarmed everywhere
else) and plays the day on a fresh gateway directory under DIRROOT, writing
every outcome with os.write to WORKDIR/case-<id>.log right after the call
returns. When the worker has ended, the case child (a process that never
opened that directory) reopens it with the same key, checks it against the
log and writes WORKDIR/case-<id>.json; the log stays only if the check found
something (QRPAY_FAULT_KEEP=1 keeps logs and directories).

The first case is a counting run (armed, never firing): it gives the number of
fdatasync and pwrite64 calls of a clean day, from which PLAN ("all", or a
number of cases: see plan_cases) picks the faulted cases.
WORKDIR/summary.json lists the counts, the cases, their wait statuses and the
backend.

Log lines (the shim writes FAULT itself, the moment it fails a call):

    CALL <op>                                  before each call (a retry is a call)
    FAULT <syscall> <call number> <errno>
    OPEN <time floor> <records>
    OK <op> <record> <serial> <counter> <amount> <token hex>      a receipt
    DUP <op> <record> <serial> <counter> <amount> <token hex>     a double tap's receipt
    REF <op> <reason> <token hex>                                 refused
    ERR <op> <exception class> <token hex,...|-> <message>        the call raised
    UNTYPED <op> <exception class> <token hex,...|-> <message>    ... not a QrPayError
    EXPORTED <op> <batch seq> <batch hex>   (or `EXPORTED <op> none`): settlement has it
    ACKED <op> <batch seq>, DENY <op> <version>, RETRY <op> <attempt>, GAVEUP <op>
    CLOSED, COUNTS <fdatasync calls> <pwrite64 calls>
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import hashlib
import json
import os
import shutil
import signal
import sys
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

import qrpay
from qrpay import Credential, DeviceKey, GatewayKey, IssuerKey, Reason, Role, Scene, TrustStore
from qrpay import generate_batch
from qrpay.denylist import sign_deny_list
from qrpay.errors import ClockUntrusted, JournalUnavailable, QrPayError
from qrpay.gateway import Gateway, GatewayPolicy

BASE = 1_800_000_000
T0 = BASE + 10_000
RIDERS = 14
REVOKED_FIRST = 12        # on deny list 1 and 2
REVOKED_LATER = 13        # on deny list 2 only
CHECK_RIDER = 11          # used by the checker only: its fresh scan after the case
SCENE = Scene.BUS
# Real freshness, retention 0: prune_after is the replay window (125 s), so a
# clock that moves a few minutes between uploads makes ack's prune delete.
POLICY = GatewayPolicy(max_age=60, skew=30, clock_tolerance=5, max_offline_uses=1 << 20,
                       deny_list_max_age=None, retention=0)

SYSCALLS = ("fdatasync", "pwrite64")          # the shim's indices 0 and 1
ERRNOS = ("EIO", "ENOSPC")
MODES = ("crash", "retry", "never")
RETRY_LIMIT = 5           # retry mode: attempts after the fault before giving up
NEVER_LIMIT = 3           # never mode: attempts before the worker exits without close
WORKER_TIMEOUT = 60       # seconds (SIGALRM) for one worker, and for one check


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"qrpay-fault-test/" + label.encode()).digest()


@dataclass(frozen=True)
class World:
    issuer: IssuerKey
    gateway_key: GatewayKey
    trust: TrustStore
    devices: list[DeviceKey]
    credentials: list[Credential]

    def open(self, directory: str | Path, clock: Callable[[], float]) -> Gateway:
        return Gateway(directory, self.gateway_key, self.trust, POLICY, clock=clock)

    def tokens(self, riders: list[int], counters: list[int], issued_at: list[int],
               scenes: list[Scene]) -> list[bytes]:
        arr = generate_batch([self.credentials[i] for i in riders],
                             [self.devices[i] for i in riders],
                             np.array([int(s) for s in scenes], dtype=np.uint8), counters,
                             np.array(issued_at, dtype=np.uint32))
        return [bytes(row) for row in arr]


def world() -> World:
    issuer = IssuerKey(_seed("issuer"))
    trust = TrustStore()
    trust.add(issuer.public, roles=Role.CREDENTIALS | Role.DENY_LIST)
    devices = [DeviceKey(_seed(f"device-{i}")) for i in range(RIDERS)]
    credentials = [
        issuer.issue(account=60_000 + i, device_public=d.public, limit=1_000_000,
                     scenes=[Scene.BUS, Scene.METRO], not_before=BASE - 86_400,
                     not_after=BASE + 365 * 86_400, serial=8_800_000 + i)
        for i, d in enumerate(devices)]
    return World(issuer, GatewayKey(_seed("gateway")), trust, devices, credentials)


# -- the day ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    kind: str                    # open, deny, scan, batch, export, ack, close
    name: str
    now: int
    tokens: tuple[bytes, ...] = ()
    amounts: tuple[int, ...] = ()
    # per token: "ok", "dup:<op>" (a double tap of that op's token) or a Reason value
    expect: tuple[str, ...] = ()
    deny: bytes = b""
    version: int = 0
    max_records: int = 1000


@dataclass
class Day:
    ops: list[Op]
    end: int                                  # the last `now` of the day
    expect: dict[tuple[str, bytes], str]      # (op, token) -> expectation


def build_day(w: World) -> Day:
    counters = [0] * RIDERS
    ops: list[Op] = []

    def tokens(specs: list[tuple[int, int, Scene]]) -> list[bytes]:
        ctrs = []
        for rider, _, _ in specs:
            counters[rider] += 1
            ctrs.append(counters[rider])
        return w.tokens([r for r, _, _ in specs], ctrs, [t for _, t, _ in specs],
                        [s for _, _, s in specs])

    def scan(name: str, rider: int, now: int, amount: int) -> bytes:
        [tok] = tokens([(rider, now, SCENE)])
        ops.append(Op("scan", name, now, (tok,), (amount,), ("ok",)))
        return tok

    def batch(name: str, now: int, rows: list[tuple[Any, ...]]) -> None:
        """rows: (rider, issued_at, scene, amount, expect) or (token, amount, "dup:op")."""
        fresh = [r for r in rows if not isinstance(r[0], bytes)]
        made = iter(tokens([(r[0], r[1], r[2]) for r in fresh]))
        toks, amounts, expect = [], [], []
        for r in rows:
            if isinstance(r[0], bytes):
                toks.append(r[0])
                amounts.append(r[1])
                expect.append(r[2])
            else:
                toks.append(next(made))
                amounts.append(r[3])
                expect.append(r[4])
        ops.append(Op("batch", name, now, tuple(toks), tuple(amounts), tuple(expect)))

    def deny(name: str, now: int, version: int, riders: list[int]) -> None:
        data = sign_deny_list(w.issuer, version, [w.credentials[r].serial for r in riders], now)
        ops.append(Op("deny", name, now, deny=data, version=version))

    ok = "ok"
    ops.append(Op("open", "open", T0))
    deny("d1", T0, 1, [REVOKED_FIRST])
    s0 = scan("s0", 0, T0 + 1, 120)
    for k in range(1, 4):
        scan(f"s{k}", k, T0 + 1 + k, 100 + 10 * k)
    batch("b0", T0 + 10, [
        (4, T0 + 10, SCENE, 150, ok), (5, T0 + 10, SCENE, 160, ok),
        (REVOKED_FIRST, T0 + 10, SCENE, 100, str(int(Reason.REVOKED))),
        (6, T0 + 9, SCENE, 5_000, str(int(Reason.OVER_TRANSACTION_CAP))),
        (7, T0 + 10, Scene.METRO, 100, str(int(Reason.SCENE_MISMATCH))),
        (s0, 90, "dup:s0"),
        (8, T0 + 8, SCENE, 170, ok), (9, T0 + 10, SCENE, 180, ok),
    ])
    scan("s4", 10, T0 + 12, 140)
    ops.append(Op("export", "e1", T0 + 15))
    s5 = scan("s5", 0, T0 + 200, 200)           # the floor moves 185 s: batch 1 ages out
    scan("s6", 1, T0 + 201, 210)
    ops.append(Op("ack", "k1", T0 + 202))        # acks batch 1 and prunes it
    deny("d2", T0 + 203, 2, [REVOKED_FIRST, REVOKED_LATER])
    batch("b1", T0 + 210, [
        (2, T0 + 210, SCENE, 100, ok), (3, T0 + 209, SCENE, 110, ok),
        (REVOKED_LATER, T0 + 210, SCENE, 100, str(int(Reason.REVOKED))),
        (5, T0 + 100, SCENE, 100, str(int(Reason.TOKEN_STALE))),
        (s5, 300, "dup:s5"),
        (4, T0 + 210, SCENE, 120, ok),
    ])
    scan("s7", 6, T0 + 220, 130)
    scan("s8", 7, T0 + 221, 140)
    ops.append(Op("export", "e2", T0 + 230, max_records=4))
    ops.append(Op("ack", "k2", T0 + 231))        # nothing old enough: prunes nothing
    ops.append(Op("export", "e3", T0 + 232))
    scan("s9", 8, T0 + 400, 150)
    batch("b2", T0 + 401, [(r, T0 + 401, SCENE, 100 + r, ok) for r in (0, 1, 9, 10)])
    ops.append(Op("ack", "k3", T0 + 402))        # acks batch 3: batches 2 and 3 pruned
    ops.append(Op("export", "e4", T0 + 403, max_records=2))
    scan("s10", 2, T0 + 404, 160)
    ops.append(Op("close", "close", T0 + 405))
    expect = {(op.name, tok): e for op in ops for tok, e in zip(op.tokens, op.expect)}
    return Day(ops, T0 + 405, expect)


def batch_doc(data: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = msgpack.unpackb(msgpack.unpackb(data)[0])
    return doc


# -- the worker ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: int
    mode: str                  # count, crash, retry, never
    syscall: str = ""
    errno: str = ""
    k: int = 0


class Shim:
    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)      # the preloaded copy: dlopen returns its handle
        self.arm = lib.faultshim_arm
        self.arm.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int]
        self.arm.restype = None
        self.calls = lib.faultshim_calls
        self.calls.argtypes = [ctypes.c_int]
        self.calls.restype = ctypes.c_long


def run_worker(w: World, day: Day, case: Case, directory: Path, log_path: Path,
               shim: Shim) -> None:
    """Play the day under the armed shim; never returns (os._exit)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    now = [T0]
    gw: Gateway | None = None
    pending: list[int | None] = [None]     # the batch last exported

    def hexes(op: Op) -> str:
        return ",".join(t.hex() for t in op.tokens) or "-"

    def receipt_line(op: Op, tok: bytes, rc: Any) -> str:
        return (f"{'DUP' if rc.duplicate else 'OK'} {op.name} {rc.record} {rc.serial} "
                f"{rc.counter} {rc.amount} {tok.hex()}")

    def attempt(op: Op) -> bool:
        nonlocal gw
        log(f"CALL {op.name}")
        try:
            if op.kind == "open":
                gw = w.open(directory, clock=lambda: now[0])
                log(f"OPEN {gw.time_floor} {len(gw.records())}")
                return True
            assert gw is not None
            if op.kind == "scan":
                try:
                    rc = gw.scan(op.tokens[0], op.amounts[0], SCENE, op.now)
                except (JournalUnavailable, ClockUntrusted):
                    raise
                except QrPayError as exc:       # this token's own refusal
                    log(f"REF {op.name} {int(exc.reason)} {op.tokens[0].hex()}")
                    return True
                log(receipt_line(op, op.tokens[0], rc))
            elif op.kind == "batch":
                res = gw.scan_batch(list(op.tokens), list(op.amounts), SCENE, op.now)
                lines = []
                for tok, got, reason in zip(op.tokens, res.receipts, res.reasons.tolist()):
                    lines.append(receipt_line(op, tok, got) if got is not None
                                 else f"REF {op.name} {reason} {tok.hex()}")
                log("\n".join(lines))
            elif op.kind == "export":
                data = gw.export_batch(max_records=op.max_records, now=op.now)
                if data is None:
                    pending[0] = None
                    log(f"EXPORTED {op.name} none")
                else:
                    pending[0] = batch_doc(data)["seq"]
                    log(f"EXPORTED {op.name} {pending[0]} {data.hex()}")
            elif op.kind == "ack":
                if pending[0] is not None:
                    gw.ack(pending[0])
                log(f"ACKED {op.name} {pending[0]}")
            elif op.kind == "deny":
                gw.update_deny_list(op.deny, op.now)
                log(f"DENY {op.name} {op.version}")
            elif op.kind == "close":
                gw.close()
                log("CLOSED")
            return True
        except QrPayError as exc:
            message = " ".join(str(exc).split())
            log(f"ERR {op.name} {type(exc).__name__} {hexes(op)} {message}")
            return False
        except Exception as exc:  # noqa: BLE001 - an untyped error is a finding
            message = " ".join(repr(exc).split())
            log(f"UNTYPED {op.name} {type(exc).__name__} {hexes(op)} {message}")
            os._exit(0)

    if case.mode == "count":
        shim.arm(0, 0, 0, 0, fd)
    else:
        shim.arm(SYSCALLS.index(case.syscall), case.k, getattr(errno_codes, case.errno),
                 int(case.mode == "never"), fd)
    limit = {"retry": RETRY_LIMIT, "never": NEVER_LIMIT}.get(case.mode, 0)
    for op in day.ops:
        now[0] = op.now
        tries = 0
        while not attempt(op):
            if op.kind == "close" or tries >= limit:
                if tries:
                    log(f"GAVEUP {op.name}")
                os._exit(0)      # crash mode: at once, right after the refusal
            tries += 1
            log(f"RETRY {op.name} {tries}")
    if case.mode == "count":
        log(f"COUNTS {shim.calls(0)} {shim.calls(1)}")
    os._exit(0)


# -- the check ----------------------------------------------------------------------------

@dataclass
class Result:
    case: dict[str, Any]
    fired: dict[str, int] = field(default_factory=dict)     # syscall -> FAULT lines
    worker_status: int = 0
    closed: bool = False
    gave_up: bool = False
    receipts: int = 0
    errors: int = 0                 # ERR lines (calls that raised)
    lost: list[str] = field(default_factory=list)
    phantom: list[str] = field(default_factory=list)
    double: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)       # outcomes the day did not expect
    reopen: str = ""                # why the checker could not open the journal
    fresh_scan: str = ""            # why a fresh token was not accepted afterwards
    stuck: str = ""                 # retry mode: the fault cleared, the op never succeeded
    untyped: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    info: dict[str, int] = field(default_factory=dict)
    records_after: int = 0


def _records_of(data: bytes) -> list[tuple[int, bytes]]:
    return [(int(r[0]), bytes(r[1])) for r in batch_doc(data)["records"]]


def check(w: World, day: Day, case: Case, directory: Path, log_path: Path,
          status: int) -> Result:
    """Read the worker's log, reopen its directory and count what went wrong.
    A token is "charged" with a record number when the reopened journal lists
    it, or a batch the worker logged as exported (settlement has it) or the
    checker exports now holds it."""
    res = Result(asdict(case), worker_status=status)
    if status != 0:
        res.untyped.append(f"the worker ended with wait status {status}")
    receipts: dict[bytes, list[tuple[str, int, bool]]] = defaultdict(list)  # (op, record, dup)
    refused: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
    failed: dict[bytes, list[str]] = defaultdict(list)       # token -> ops that raised
    charged: dict[bytes, set[int]] = defaultdict(set)       # token -> record numbers
    failed_ops: set[str] = set()
    fired: dict[str, int] = defaultdict(int)
    deny_logged = 0
    exported: int | None = None       # the batch last logged as exported
    ack_failed_for: int | None = None  # ... whose ack then raised, never logged as done
    call = 0                          # the number of the call in progress
    first_faulted_call = 0
    faulted_calls: set[int] = set()
    for raw in log_path.read_bytes().decode().splitlines():
        parts = raw.split(" ", 4)
        kind = parts[0]
        if kind == "CALL":
            call += 1
        elif kind == "FAULT":
            fired[parts[1]] += 1
            faulted_calls.add(call)
            first_faulted_call = first_faulted_call or call
        elif kind in ("OK", "DUP"):
            fields = raw.split(" ")
            op, seq, tok = fields[1], int(fields[2]), bytes.fromhex(fields[6])
            receipts[tok].append((op, seq, kind == "DUP"))
            res.receipts += kind == "OK"
            if kind == "OK" and call in faulted_calls:
                # Allowed: the fault may have hit a write after the commit was
                # durable (a best-effort one), so this is only counted.
                res.info["receipts_in_faulted_call"] = (
                    res.info.get("receipts_in_faulted_call", 0) + 1)
            if kind == "OK" and case.mode == "never" and call > first_faulted_call > 0:
                # Every write and sync has failed since an earlier call: this
                # payment cannot be durable (a power cut would lose it).
                res.lost.append(f"{op}: receipt record {seq} handed out while every "
                                f"{case.syscall} failed (since call {first_faulted_call})")
            want = day.expect.get((op, tok))
            if want is None:
                res.wrong.append(f"{op}: a receipt for a token it did not scan")
            elif want.startswith("dup:"):
                first = {s for o, s, _ in receipts[tok] if o == want[4:]}
                if kind != "DUP" or first != {seq}:
                    res.wrong.append(f"{op}: the double tap of {want[4:]} got {kind} record "
                                     f"{seq}, {want[4:]} got {sorted(first)}")
            elif want != "ok":
                res.wrong.append(f"{op}: expected {Reason(int(want)).name}, got {kind} "
                                 f"record {seq}")
        elif kind == "REF":
            op, reason, tok = parts[1], int(parts[2]), bytes.fromhex(parts[3])
            refused[tok].append((op, reason))
            want = day.expect.get((op, tok))
            if want != str(reason):
                res.wrong.append(f"{op}: refused {Reason(reason).name}, expected {want}")
        elif kind in ("ERR", "UNTYPED"):
            op, cls, toks = parts[1], parts[2], parts[3]
            res.errors += 1
            failed_ops.add(op)
            if toks != "-":
                for h in toks.split(","):
                    failed[bytes.fromhex(h)].append(op)
            if kind == "UNTYPED":
                res.untyped.append(raw[:300])
            elif cls != "JournalUnavailable":
                res.wrong.append(f"{op} raised {cls} under an I/O fault: {raw[:200]}")
            if op.startswith("k"):
                ack_failed_for = exported
        elif kind == "EXPORTED" and parts[2] != "none":
            exported = int(parts[2])
            for seq, tok in _records_of(bytes.fromhex(parts[3])):
                charged[tok].add(seq)
        elif kind == "ACKED":
            ack_failed_for = None
        elif kind == "DENY":
            deny_logged = int(parts[2])
        elif kind == "CLOSED":
            res.closed = True
        elif kind == "GAVEUP":
            res.gave_up = True
        elif kind == "COUNTS":
            res.counts = [int(parts[1]), int(parts[2])]
    res.fired = dict(fired)
    res.info["failed_ops"] = len(failed_ops)
    if case.mode == "retry" and res.gave_up:
        res.stuck = f"the fault hit once, yet {RETRY_LIMIT} retries of one call failed"
    elif case.mode in ("count", "retry") and not res.closed and "close" not in failed_ops:
        res.stuck = "the worker stopped before the end of the day"
    if case.mode == "count" and (res.errors or not res.closed):
        res.wrong.append("the clean counting run did not complete")

    # A fresh process opens the directory: the fault has cleared.
    now = day.end + 10
    try:
        gw = w.open(directory, clock=lambda: now)
    except Exception as exc:  # noqa: BLE001 - any failure to reopen is reported
        res.reopen = f"{type(exc).__name__}: {exc}"
        return res
    try:
        records = gw.records()
        res.records_after = len(records)
        for r in records:
            charged[r.token].add(r.seq)
        # In-doubt outcomes that move no money (reported, not failures): a deny
        # list or an ack that raised and is in force all the same.
        res.info["deny_applied_after_error"] = int(gw.deny_list.version > deny_logged)
        # Export everything left (a waiting batch first), as settlement would get it.
        for n in range(100):
            data = gw.export_batch(now=now)
            if data is None:
                break
            seq = batch_doc(data)["seq"]
            if n == 0 and ack_failed_for is not None:
                res.info["ack_applied_after_error"] = int(seq != ack_failed_for)
            for record, tok in _records_of(data):
                charged[tok].add(record)
            gw.ack(seq)
        else:
            res.wrong.append("export_batch never ran dry")

        # 0 lost: every receipt handed out is charged, with its record number.
        for tok, got in receipts.items():
            for op, seq, dup in got:
                if seq not in charged.get(tok, ()):
                    res.lost.append(f"{op}: {'DUP' if dup else 'OK'} receipt record {seq} is "
                                    f"not in the journal or a logged batch (the token is "
                                    f"charged as {sorted(charged.get(tok, ()))})")
        # 0 phantom: nothing is charged that no receipt was handed out for.
        for tok, seqs in charged.items():
            if tok not in receipts:
                why = (f"raised in {failed[tok]}" if tok in failed
                       else f"refused in {refused[tok]}" if tok in refused else "never scanned")
                res.phantom.append(f"records {sorted(seqs)} charge a token that got no "
                                   f"receipt ({why})")
        # 0 double: one ride, one record (a retry with the same code included).
        for tok in set(charged) | set(receipts):
            seqs = charged.get(tok, set()) | {s for _, s, _ in receipts.get(tok, [])}
            if len(seqs) > 1:
                ops = sorted({o for o, _, _ in receipts.get(tok, [])} | set(failed.get(tok, [])))
                res.double.append(f"one token charged as records {sorted(seqs)} (ops {ops})")

        # The journal scans again: a fresh token is accepted and journaled.
        [tok] = w.tokens([CHECK_RIDER], [1], [now], [SCENE])
        try:
            rc = gw.scan(tok, 100, SCENE, now)
            if rc.duplicate or rc.record not in {r.seq for r in gw.records()}:
                res.fresh_scan = f"a fresh token got {rc}"
        except Exception as exc:  # noqa: BLE001
            res.fresh_scan = f"a fresh token: {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001
        res.untyped.append(f"checking raised {type(exc).__name__}: {exc}")
    finally:
        try:
            gw.close()
        except Exception as exc:  # noqa: BLE001
            res.untyped.append(f"closing after the check raised {type(exc).__name__}: {exc}")
    return res


# -- the server ---------------------------------------------------------------------------

def plan_cases(counts: list[int], plan: str) -> list[Case]:
    """The faulted cases: (syscall, k, errno, mode) for k from 1 to the number
    of calls the counting run made. "all": the full cross product. A number N:
    N cases, every fdatasync case first (each k with both errnos in all three
    modes: the commits, where a failed sync leaves the outcome unknown), the
    rest spread evenly over the pwrite64 calls with the six errno/mode
    combinations taken in turn (with fewer than the fdatasync product, N
    spread over it the same way)."""
    combos = [(err, mode) for err in ERRNOS for mode in MODES]
    chosen: list[tuple[str, int, str, str]] = []
    budget = None if plan == "all" else int(plan)
    for i, syscall in enumerate(SYSCALLS):
        total = counts[i] * len(combos)
        m = total if budget is None else min(total, max(0, budget - len(chosen)))
        for j in range(m):
            # Evenly spaced positions in the k-major product, the combination
            # rotating with j: no pair twice, each combination about m/6 times.
            k = 1 + (j * total // m) // len(combos)
            err, mode = combos[j % len(combos)]
            chosen.append((syscall, k, err, mode))
    return [Case(i + 1, mode, syscall, err, k) for i, (syscall, k, err, mode) in enumerate(chosen)]


def run_case(w: World, day: Day, case: Case, workdir: Path, dirroot: Path, shim: Shim,
             keep: bool) -> None:
    """In a forked case child: the worker, then the check; never returns. The
    gateway directory goes afterwards (unless `keep`); the log stays when the
    check found something."""
    code = 0
    try:
        directory = dirroot / f"gw-{case.id}"
        log_path = workdir / f"case-{case.id}.log"
        pid = os.fork()
        if pid == 0:
            try:
                signal.alarm(WORKER_TIMEOUT)
                run_worker(w, day, case, directory, log_path, shim)
            except BaseException:  # noqa: BLE001
                os.write(2, traceback.format_exc().encode())
            os._exit(70)
        _, status = os.waitpid(pid, 0)
        signal.alarm(WORKER_TIMEOUT)
        res = check(w, day, case, directory, log_path, status)
        signal.alarm(0)
        bad = (res.lost or res.phantom or res.double or res.wrong or res.reopen
               or res.fresh_scan or res.stuck or res.untyped)
        (workdir / f"case-{case.id}.json").write_text(json.dumps(asdict(res)))
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
        if not bad and not keep:
            log_path.unlink()
    except BaseException:  # noqa: BLE001
        os.write(2, traceback.format_exc().encode())
        code = 71
    os._exit(code)


def run_all(w: World, day: Day, cases: list[Case], workdir: Path, dirroot: Path, shim: Shim,
            jobs: int, keep: bool) -> dict[int, int]:
    """Fork a case child per case, `jobs` at a time; their wait statuses."""
    queue = list(reversed(cases))
    running: dict[int, Case] = {}
    statuses: dict[int, int] = {}
    while queue or running:
        while queue and len(running) < jobs:
            case = queue.pop()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                run_case(w, day, case, workdir, dirroot, shim, keep)
            running[pid] = case
        pid, status = os.wait()
        statuses[running.pop(pid).id] = status
    return statuses


def main(argv: list[str]) -> None:
    # The test starts this server with one thread; Python 3.12+ would warn on
    # fork() if a library had started another.
    warnings.filterwarnings("ignore", ".*fork", DeprecationWarning)
    shim_path, workdir, dirroot, plan, jobs = (argv[1], Path(argv[2]), Path(argv[3]), argv[4],
                                               int(argv[5]))
    keep = os.environ.get("QRPAY_FAULT_KEEP", "") not in ("", "0")
    shim = Shim(shim_path)
    w = world()
    day = build_day(w)
    counting = Case(0, "count")
    statuses = run_all(w, day, [counting], workdir, dirroot, shim, 1, keep)
    first = json.loads((workdir / "case-0.json").read_text())
    counts = first["counts"] or [0, 0]
    cases = plan_cases(counts, plan)
    statuses.update(run_all(w, day, cases, workdir, dirroot, shim, jobs, keep))
    (workdir / "summary.json").write_text(json.dumps({
        "backend": qrpay.backend, "counts": counts,
        "cases": [asdict(c) for c in [counting, *cases]],
        "statuses": {str(k): v for k, v in statuses.items()},
    }))


if __name__ == "__main__":
    main(sys.argv)
