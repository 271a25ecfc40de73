"""Going on after a gateway's journal was lost or damaged (`qrpay gateway
recover`). The gateway refuses to open a journal that is missing, empty,
unreadable or behind its anchor; this is the explicit way past that, for when
no backup can be restored. What it costs is said in docs/GATEWAY.md
(Failure modes): payments that were journaled but never uploaded are lost,
and every token made before the recovery is refused from then on, so none
that the lost journal accepted can pass again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qrpay.anchor import ANCHOR_FILE, Anchor, AnchorFile
from qrpay.errors import ClockUntrusted, InvalidArgument, JournalUnavailable
from qrpay.gateway import JOURNAL_FILE, Gateway, GatewayPolicy, _is_time, _lock_directory
from qrpay.journal import Journal
from qrpay.keys import GatewayKey
from qrpay.trust import TrustStore


@dataclass(frozen=True)
class Recovery:
    """What `recover_gateway` did."""

    kept_records: int           # records that were still readable, kept and still exported
    lost_records: int           # record numbers the anchor knew of that are gone
    lost_batches: int           # upload batch numbers the anchor knew of that are gone
    moved_aside: tuple[str, ...]   # damaged files, renamed and kept for inspection
    time_floor: int             # the gateway's time floor from now on
    refused_through: int        # tokens issued at or before this are refused (TOKEN_STALE)

    def as_dict(self) -> dict[str, object]:
        return {"kept_records": self.kept_records, "lost_records": self.lost_records,
                "lost_batches": self.lost_batches, "moved_aside": list(self.moved_aside),
                "time_floor": self.time_floor, "refused_through": self.refused_through}


def recover_gateway(directory: str | Path, key: GatewayKey, trust: TrustStore,
                    policy: GatewayPolicy | None = None, now: float | None = None,
                    clock: Callable[[], float] = time.time) -> Recovery:
    """Make a gateway directory whose journal is lost, damaged or behind its
    anchor open again, keeping every record that is still readable. Record and
    batch numbers carry on after the highest the anchor knew, the time floor
    becomes `now`, and tokens issued up to `now` plus the clock skew are
    refused from then on. The gateway must not be running."""
    if not isinstance(key, GatewayKey):
        raise InvalidArgument("a gateway signs with a GatewayKey")
    policy = policy or GatewayPolicy()
    reading = clock() if now is None else now
    if not _is_time(reading):
        raise (ClockUntrusted if now is None else InvalidArgument)(
            f"recovery needs a trusted time, not {reading!r}")
    t = int(reading)
    directory = Path(directory)
    if not directory.is_dir():
        raise JournalUnavailable(f"{directory} is not a gateway directory")
    lock = _lock_directory(directory)
    try:
        moved: list[str] = []
        try:
            anchor_file, _ = AnchorFile.open(directory)
        except JournalUnavailable:   # no valid slot: kept aside, the journal says what it can
            moved += _move_aside(directory, (ANCHOR_FILE,), t)
            anchor_file, _ = AnchorFile.open(directory)
        anchor = anchor_file.current
        anchor_file.close()
        mine = key.public.to_bytes()
        if anchor.gateway_key not in (mine, b"\0" * 32):
            raise InvalidArgument("this gateway directory belongs to another gateway key")
        if t < anchor.time_floor - policy.clock_tolerance:
            raise ClockUntrusted(f"the clock reads {t}, before the gateway's last known scan "
                                 f"({anchor.time_floor})")
        journal = _readable_journal(directory, mine, t, moved)
        try:
            kept = len(journal.records())
            last_record = journal.next_record_seq() - 1
            last_batch = journal.batch_summary()[0]
            resolved = journal.get_int("resolved_doubt")
            if anchor.doubt > resolved:
                journal.void(anchor.doubt, anchor.doubt_record, anchor.doubt_batch)
            floor = max(t, journal.time_floor(), anchor.time_floor)
            refused = max(t + policy.skew, journal.get_int("forgotten_issued_at", -1))
            journal.set_many({
                "gateway_key": mine,
                "recovered_through_record": max(anchor.last_record, last_record),
                "recovered_through_batch": max(anchor.last_batch, last_batch),
                "recovered_floor": floor, "forgotten_issued_at": refused,
                "resolved_doubt": max(anchor.doubt, resolved)})
        finally:
            journal.close()
        # A fresh anchor; the gateway's own open below brings it up to the journal.
        fresh, _ = AnchorFile.open(directory)
        try:
            fresh.create(Anchor(mine, doubt=max(anchor.doubt, resolved)))
        except OSError as exc:
            raise JournalUnavailable(f"cannot write {fresh.path}: {exc}") from exc
        finally:
            fresh.close()
    finally:
        if lock is not None:
            lock.close()
    Gateway(directory, key, trust, policy, clock=lambda: t).close()
    return Recovery(kept, max(0, anchor.last_record - last_record),
                    max(0, anchor.last_batch - last_batch), tuple(moved), floor, refused)


def _readable_journal(directory: Path, key: bytes, t: int, moved: list[str]) -> Journal:
    """The journal if every row of it reads back; otherwise a new one, with
    the damaged files renamed aside."""
    path = directory / JOURNAL_FILE
    if path.exists() and path.stat().st_size > 0:
        journal: Journal | None = None
        try:
            journal = Journal(path, create=False)
            owner = journal.get("gateway_key")
            if owner not in (None, key):
                journal.close()
                raise InvalidArgument("this journal belongs to another gateway key")
            _read_everything(journal)
            return journal
        except JournalUnavailable:
            if journal is not None:
                journal.close()
    moved += _move_aside(directory, (JOURNAL_FILE, JOURNAL_FILE + "-wal",
                                     JOURNAL_FILE + "-shm"), t)
    return Journal(path, create=True)


def _read_everything(journal: Journal) -> None:
    """Raise JournalUnavailable unless every row reads back as what it should."""
    check = journal.integrity_check()
    if check != ["ok"]:
        raise JournalUnavailable(f"integrity_check: {check[:3]}")
    journal.records()
    journal.keys()
    journal.batches()
    journal.batch_summary()
    journal.time_floor()


def _move_aside(directory: Path, names: tuple[str, ...], t: int) -> list[str]:
    moved = []
    for name in names:
        path = directory / name
        if path.exists():
            target = path.with_name(f"{name}.damaged-{t}")
            try:
                os.replace(path, target)
            except OSError as exc:
                raise JournalUnavailable(f"cannot move {path} aside: {exc}") from exc
            moved.append(target.name)
    return moved
