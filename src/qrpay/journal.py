"""The gateway's journal: the single source of truth for what it accepted.

SQLite (stdlib) in WAL mode with synchronous=FULL: a transaction that
committed survives a crash or a power cut. Every accepted scan is a row;
uploads are rows of `batches`. Any SQLite or OS failure becomes
JournalUnavailable, and the transaction that hit it is rolled back whole.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from qrpay import sqlitedb
from qrpay.errors import JournalUnavailable
from qrpay.format import TOKEN_ISSUED_AT

SCHEMA_VERSION = 1
# No index beyond the two keys: every scan pays for each index on insert, and
# the one query by time (rebuilding replay state on open) can scan the table.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    serial INTEGER NOT NULL,
    counter INTEGER NOT NULL,
    account INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    scene INTEGER NOT NULL,
    gateway_time INTEGER NOT NULL,
    token BLOB NOT NULL,
    UNIQUE (serial, counter)
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    body BLOB NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
);
"""

_I64 = 1 << 63


def to_sql(value: int) -> int:
    """A uint64 as SQLite's signed 64-bit INTEGER (two's complement)."""
    return value - (1 << 64) if value >= _I64 else value


def from_sql(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


class Record(NamedTuple):
    """One journaled payment. (A tuple: the gateway builds one per scan.)"""

    seq: int
    serial: int
    counter: int
    account: int
    amount: int
    scene: int
    gateway_time: int
    token: bytes


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    first: int
    last: int
    body: bytes
    acked: bool


class Pruned(NamedTuple):
    """What one Journal.prune deleted: records 1..through_record and the
    upload batches that held them."""

    records: int
    through_record: int
    keys: builtins.set[int]     # their (serial, counter) as serial << 32 | counter
    newest_issued_at: int       # the latest issued_at among their tokens


class Journal:
    """One SQLite file. Not shared between processes: the gateway owns it.
    With `create=False` a file without a journal in it is refused rather than
    made into a new, empty journal."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        # integrity_check, not quick_check: a record whose bytes changed but
        # still read as a valid row (another serial, say) would let its token
        # pass again, and only the index comparison sees it. It costs about
        # 0.75 s more per million records at open.
        self._db = sqlitedb.connect(self.path, JournalUnavailable, check="integrity_check")
        try:
            if not create and not self._query(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"):
                raise JournalUnavailable(f"{self.path} holds no journal")
            with self.transaction() as db:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                found = self._get("schema_version")
                if found is None:
                    self._set("schema_version", SCHEMA_VERSION)
                elif found != SCHEMA_VERSION:
                    raise JournalUnavailable(f"journal schema {found} is not {SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """A durable transaction; failures are JournalUnavailable."""
        return sqlitedb.transaction(self._db, JournalUnavailable)

    def _get(self, key: str) -> object:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set(self, key: str, value: object) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        return sqlitedb.query(self._db, JournalUnavailable, "journal", sql, args)

    def get(self, key: str) -> object:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def get_int(self, key: str, default: int = 0) -> int:
        value = self.get(key)
        return value if isinstance(value, int) else default

    def set(self, key: str, value: object) -> None:
        self.set_many({key: value})

    def set_many(self, values: Mapping[str, object]) -> None:
        """Several meta values in one durable transaction."""
        with self.transaction():
            for key, value in values.items():
                self._set(key, value)

    def integrity_check(self) -> list[str]:
        """SQLite's full check (every index against its table): ["ok"] or
        what is wrong. Costs a read of the whole file."""
        return [str(row[0]) for row in self._query("PRAGMA integrity_check")]

    def next_record_seq(self) -> int:
        # Numbering carries on past pruned records (pruning keeps the latest
        # record, but this does not rely on it) and past records lost before
        # a recovery.
        return max(self._query_one("SELECT COALESCE(MAX(seq), 0) FROM records"),
                   self.get_int("pruned_through_record"),
                   self.get_int("recovered_through_record")) + 1

    def void(self, doubt: int, first_record: int, first_batch: int) -> None:
        """Settle a doubt: one durable transaction that deletes every record
        numbered `first_record` or later and every batch numbered `first_batch`
        or later (0: none), and notes `doubt` as resolved. Called after a
        commit whose sync failed and before anything else is committed, so
        those rows can only be that commit's. It always writes, so in the
        connection that saw the failure it also overwrites the failed commit's
        frames in the WAL: what a crash would otherwise have brought back."""
        with self.transaction() as db:
            if first_record:
                db.execute("DELETE FROM records WHERE seq >= ?", (first_record,))
            if first_batch:
                db.execute("DELETE FROM batches WHERE seq >= ?", (first_batch,))
            self._set("resolved_doubt", doubt)

    def append(self, records: Sequence[Record]) -> None:
        """Write records in one durable transaction."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO records(seq, serial, counter, account, amount, scene, gateway_time,"
                " token) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.seq, to_sql(r.serial), r.counter, to_sql(r.account), r.amount, r.scene,
                  r.gateway_time, r.token) for r in records])

    def time_floor(self) -> int:
        """The gateway's trusted time floor: the latest scan time journaled
        (or the time of a recovery, if later). Derived, not stored: pruning
        never deletes the latest record (it keeps everything younger than the
        floor minus the retention)."""
        return max(self._query_one("SELECT COALESCE(MAX(gateway_time), 0) FROM records"),
                   self.get_int("recovered_floor"))

    def records(self, after_seq: int = 0, limit: int = -1, since_time: int | None = None
                ) -> list[Record]:
        """Records with seq > after_seq (and, if given, gateway_time >= since_time
        as an alternative), in seq order."""
        if since_time is None:
            sql = "SELECT * FROM records WHERE seq > ? ORDER BY seq LIMIT ?"
            args: tuple[int, ...] = (after_seq, limit)
        else:
            sql = ("SELECT * FROM records WHERE seq > ? OR gateway_time >= ? "
                   "ORDER BY seq LIMIT ?")
            args = (after_seq, since_time, limit)
        rows = self._query(sql, args)
        _check_types(rows, "record", (int, int, int, int, int, int, int, bytes))
        return [Record(seq, from_sql(serial), counter, from_sql(account), amount, scene, t, tok)
                for seq, serial, counter, account, amount, scene, t, tok in rows]

    def keys(self) -> builtins.set[int]:  # (`set` here is the method below)
        """Every journaled (serial, counter) as one int, serial << 32 | counter."""
        rows = self._query("SELECT serial, counter FROM records")
        _check_types(rows, "record key", (int, int))
        return {from_sql(serial) << 32 | counter for serial, counter in rows}

    def batches(self, where: str = "1", args: tuple[int, ...] = ()) -> list[Batch]:
        rows = self._query(f"SELECT seq, first, last, body, acked FROM batches WHERE {where} "
                           "ORDER BY seq", args)
        _check_types(rows, "batch", (int, int, int, bytes, int))
        return [Batch(s, f, la, b, bool(a)) for s, f, la, b, a in rows]

    def batch_summary(self) -> tuple[int, int, int]:
        """(highest batch seq, last record exported, last record acked),
        counting the batches pruning deleted (all of them were acked)."""
        [row] = self._query("SELECT COALESCE(MAX(seq), 0), COALESCE(MAX(last), 0), "
                            "COALESCE(MAX(CASE WHEN acked THEN last END), 0) FROM batches")
        _check_types([row], "batch summary", (int, int, int))
        batch, record = self.get_int("pruned_through_batch"), self.get_int("pruned_through_record")
        # Batches lost before a recovery keep their numbers taken.
        highest = max(row[0], batch, self.get_int("recovered_through_batch"))
        return highest, max(row[1], record), max(row[2], record)

    def add_batch(self, batch: Batch) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO batches(seq, first, last, body, acked) VALUES (?, ?, ?, ?, 0)",
                       (batch.seq, batch.first, batch.last, batch.body))

    def ack_batch(self, seq: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE batches SET acked = 1 WHERE seq = ?", (seq,))

    def prune(self, before_time: int) -> Pruned | None:
        """Delete the oldest acknowledged upload batches, in order, while every
        record in them was scanned before `before_time`, with their records;
        one durable transaction. Stops at the first batch that is not acked or
        holds a later record, so what is left is always a suffix. Returns what
        went, or None if nothing could."""
        with self.transaction() as db:
            batch = record = 0
            for seq, last, acked, newest in db.execute(
                    "SELECT b.seq, b.last, b.acked, (SELECT MAX(gateway_time) FROM records "
                    "WHERE seq BETWEEN b.first AND b.last) FROM batches b ORDER BY b.seq"):
                if not acked or (newest is not None and newest >= before_time):
                    break
                batch, record = seq, last
            if not batch:
                return None
            rows = db.execute("SELECT serial, counter, token FROM records WHERE seq <= ?",
                              (record,)).fetchall()
            keys = {from_sql(serial) << 32 | counter for serial, counter, _ in rows}
            issued = [int.from_bytes(token[TOKEN_ISSUED_AT:TOKEN_ISSUED_AT + 4], "little")
                      for _, _, token in rows]
            newest_issued = max([*issued, self.get_int("forgotten_issued_at", -1)])
            db.execute("DELETE FROM records WHERE seq <= ?", (record,))
            db.execute("DELETE FROM batches WHERE seq <= ?", (batch,))
            self._set("pruned_through_record", record)
            self._set("pruned_through_batch", batch)
            self._set("forgotten_issued_at", newest_issued)
        return Pruned(len(rows), record, keys, newest_issued)

    def _query_one(self, sql: str) -> int:
        value = self._query(sql)[0][0]
        _check_types([(value,)], "journal summary", (int,))
        return int(value)


def _check_types(rows: list[Any], what: str, types: tuple[type, ...]) -> None:
    """Damage that SQLite's checks can miss (a column's type byte flipped)
    must not surface as a TypeError deep in the gateway."""
    for row in rows:
        if any(type(value) is not kind for value, kind in zip(row, types)):
            raise JournalUnavailable(
                f"the journal is damaged: a {what} reads back as {row!r:.120}; restore it from a "
                "backup or run `qrpay gateway recover` (docs/GATEWAY.md, Failure modes)")
