"""The one way qrpay opens and writes its SQLite stores (the gateway journal,
the settlement store): WAL with synchronous=FULL, BEGIN IMMEDIATE
transactions, and every SQLite or OS failure turned into the store's own
typed error with the transaction rolled back whole."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qrpay.errors import QrPayError


def connect(path: Path, error: type[QrPayError]) -> sqlite3.Connection:
    """A connection in WAL mode with synchronous=FULL: a commit that returned
    survives a crash or a power cut."""
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise error(f"{path} cannot use WAL mode (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise error(f"{path} is corrupt: {check}")
        return db
    except sqlite3.Error as exc:
        raise error(f"{path}: {exc}") from exc


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
    (or re-raise a non-SQLite exception). Returning means the commit is durable."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise error(f"{exc}") from exc
    try:
        yield db
        db.execute("COMMIT")
    except BaseException as exc:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the transaction is already gone
        if isinstance(exc, (sqlite3.Error, OSError)):
            raise error(f"{exc}") from exc
        raise
