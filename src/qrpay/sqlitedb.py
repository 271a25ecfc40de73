"""The one way qrpay opens and writes its SQLite stores (the gateway journal,
the settlement store): WAL with synchronous=FULL, BEGIN IMMEDIATE
transactions, and every SQLite or OS failure turned into the store's own
typed error with the transaction rolled back whole."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qrpay.errors import QrPayError


BUSY_TIMEOUT = 5.0   # seconds a connection waits for another one's lock
_SQLITE_BUSY = 5     # primary result code (sqlite3.SQLITE_BUSY is Python 3.11+)


def _busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)   # extended code, Python 3.11+
    return (code & 0xFF) == _SQLITE_BUSY if code is not None else "locked" in str(exc)


def connect(path: Path, error: type[QrPayError], check: str = "quick_check"
            ) -> sqlite3.Connection:
    """A connection in WAL mode with synchronous=FULL: a commit that returned
    survives a crash or a power cut. Another process's lock is waited for up to
    BUSY_TIMEOUT seconds, then `error`. `check` is the PRAGMA run on open:
    quick_check, or integrity_check (slower: it also compares every index
    with its table)."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                             timeout=BUSY_TIMEOUT)
    except sqlite3.Error as exc:
        raise error(f"{path}: {exc}") from exc
    try:
        while True:
            # Turning a new file to WAL takes an exclusive lock, and SQLite
            # answers SQLITE_BUSY there at once, without the busy handler: two
            # processes creating one store at once would fail. Wait, bounded.
            try:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise error(f"{path}: {exc} (waited {BUSY_TIMEOUT:g} s)") from exc
                time.sleep(0.005)
        if str(mode).lower() != "wal":
            raise error(f"{path} cannot use WAL mode (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        found = db.execute(f"PRAGMA {check}").fetchone()[0]
        if found != "ok":
            raise error(f"{path} is corrupt: {found}")
        return db
    except BaseException as exc:
        db.close()   # a failed open holds no file open
        if isinstance(exc, sqlite3.Error):
            raise error(f"{path}: {exc}") from exc
        raise


def shrink_wal(db: sqlite3.Connection) -> None:
    """Copy the WAL into the database and cut the file to nothing, if no
    other connection is reading (one that is keeps it: nothing waits). For
    after a large transaction, whose WAL would otherwise stay on disk at its
    size. A failure here changes nothing committed: it is ignored."""
    try:
        db.execute("PRAGMA busy_timeout = 0")
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    except sqlite3.Error:
        pass


def query(db: sqlite3.Connection, error: type[QrPayError], what: str, sql: str,
          args: tuple[Any, ...] = ()) -> list[Any]:
    """All rows of one read; an SQLite failure becomes `error` ("what: ...")."""
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.Error as exc:
        raise error(f"{what}: {exc}") from exc


@contextmanager
def transaction(db: sqlite3.Connection, error: type[QrPayError]) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT. On any error, roll back and raise `error`
    (or re-raise a non-SQLite exception). Returning means the commit is durable.
    Raising does NOT mean it is not: when the sync of COMMIT fails, the commit
    frame may already be in the WAL file, and WAL recovery after a crash makes
    it durable. Callers treat a raise as an unknown outcome (the gateway voids
    the rows, settlement writes are idempotent by key; docs/GATEWAY.md and
    docs/SETTLEMENT.md, failures)."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        busy = f" (another process has held it for over {BUSY_TIMEOUT:g} s)" if _busy(exc) else ""
        raise error(f"{exc}{busy}") from exc
    try:
        yield db
        db.execute("COMMIT")
    except BaseException as exc:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the transaction is already gone
        if isinstance(exc, (sqlite3.Error, OSError)) and not isinstance(exc, QrPayError):
            raise error(f"{exc}") from exc
        raise   # a typed error of ours (an archive that cannot be read) stays what it is
