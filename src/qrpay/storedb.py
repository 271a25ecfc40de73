"""The settlement store's database, behind one small interface: SQLite in a
directory (the embedded default, one machine) or PostgreSQL (many service
replicas, pgstore.py). Settlement writes its SQL once, in the dialect both
share (`?` parameters, ON CONFLICT upserts, window functions, partial
indexes), and each database supplies its own schema types.

A store is named by a URL: `sqlite:///DIR` (or a plain directory path) and
`postgresql://USER@HOST:PORT/DB` (with `?schema=NAME` for a schema of its
own, created when missing). Both give the same guarantees: one writer at a
time (SQLite's BEGIN IMMEDIATE; a PostgreSQL advisory lock taken inside the
transaction, so across processes and machines), a returned commit is durable,
and a failed one is an unknown outcome that the caller resolves by retrying
an idempotent write.
"""

from __future__ import annotations

import abc
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from qrpay import sqlitedb
from qrpay.errors import InvalidArgument, StoreUnavailable

STORE_FILE = "settlement.sqlite3"
_WAL_LIMIT = 64 << 20   # bytes of WAL file kept after a checkpoint
POSTGRES_SCHEMES = ("postgresql", "postgres")


class Rows(Protocol):
    """What a statement in a transaction returns (a DB-API cursor)."""

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Transaction(Protocol):
    """A write transaction: statements in the shared dialect (`?` parameters)."""

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Rows: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], /) -> object: ...


class StoreDatabase(abc.ABC):
    """One connection to a settlement store's database. Not thread-safe:
    Settlement serialises its calls."""

    location: str      # for messages: a path or a URL without its password
    directory: Path | None   # the SQLite store's folder (None for PostgreSQL)

    @abc.abstractmethod
    def schema(self, tables: str) -> list[str]:
        """The CREATE statements of `tables` (written with SQLite's
        affinities: INTEGER, BLOB, TEXT) in this database's types."""

    @abc.abstractmethod
    def columns(self, db: Transaction, table: str) -> set[str]:
        """The columns `table` has now (to add those a newer version needs)."""

    @abc.abstractmethod
    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Every row of one read, outside any write transaction."""

    @abc.abstractmethod
    def transaction(self) -> Any:
        """A context manager: one write transaction, yielding a Transaction.
        Writers take turns across processes. Leaving it normally commits;
        an error rolls back and is raised as StoreUnavailable (ours stay
        what they are)."""

    @abc.abstractmethod
    def exclusive(self, name: str, wait: bool = True) -> Any:
        """A context manager: a lock named `name` held across several
        transactions, one holder at a time in every process using this store
        (a second caller waits; without `wait`, it goes on without the lock).
        It yields whether the lock is held."""

    def compact(self) -> None:
        """Give back space after a large write; a failure changes nothing."""

    @abc.abstractmethod
    def close(self) -> None: ...


class SqliteDatabase(StoreDatabase):
    """The store as one SQLite file in WAL mode with synchronous=FULL."""

    def __init__(self, directory: Path) -> None:
        self._folder = directory   # typed Path: `directory` is Path | None on the base
        self.directory = directory
        self.location = str(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"settlement store {directory}: {exc}") from exc
        self._db = sqlitedb.connect(directory / STORE_FILE, StoreUnavailable)
        try:
            # A close frees a day of blobs. Where SQLite is built with
            # SECURE_DELETE (Debian's is), every freed page would be zeroed
            # through the WAL: FAST zeroes only what is written anyway (the
            # archived records stay in free pages until the next day's
            # uploads reuse them). And the WAL is cut back after a checkpoint,
            # not left the size of the largest close.
            self._db.execute("PRAGMA secure_delete = FAST")
            self._db.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreUnavailable(f"{directory}: {exc}") from exc

    def schema(self, tables: str) -> list[str]:
        return [s.strip() for s in tables.split(";") if s.strip()]

    def columns(self, db: Transaction, table: str) -> set[str]:
        return {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})").fetchall()}

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return sqlitedb.query(self._db, StoreUnavailable, "settlement store", sql, tuple(args))

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with sqlitedb.transaction(self._db, StoreUnavailable) as db:
            yield db   # sqlite3.Connection: execute and executemany as a Transaction

    @contextmanager
    def exclusive(self, name: str, wait: bool = True) -> Iterator[bool]:
        if fcntl is None:   # pragma: no cover - not POSIX
            yield True
            return
        path = self._folder / f"{name}.lock"
        try:
            handle = open(path, "ab")
        except OSError as exc:
            raise StoreUnavailable(f"cannot open {path}: {exc}") from exc
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True

    def compact(self) -> None:
        # A close wrote tens of MB to the WAL: not left on disk at that size.
        sqlitedb.shrink_wal(self._db)

    def close(self) -> None:
        self._db.close()


def is_postgres(location: object) -> bool:
    return isinstance(location, str) and urlsplit(location).scheme in POSTGRES_SCHEMES


def open_database(location: str | os.PathLike[str]) -> StoreDatabase:
    """The database a store location names: `postgresql://...`,
    `sqlite:///DIR`, or a directory path (SQLite)."""
    if is_postgres(location):
        from qrpay.pgstore import PostgresDatabase   # psycopg only when asked for
        return PostgresDatabase(str(location))
    return SqliteDatabase(sqlite_directory(location))


def sqlite_directory(location: str | os.PathLike[str]) -> Path:
    """The folder of an SQLite store location (`sqlite:///DIR` or a path)."""
    if isinstance(location, str) and "://" in location:
        parts = urlsplit(location)
        if parts.scheme != "sqlite" or parts.netloc or not parts.path:
            raise InvalidArgument(f"a store is sqlite:///DIR, postgresql://USER@HOST/DB or a "
                                  f"directory, not {redact(location)!r}")
        return Path(parts.path)
    return Path(location)


def redact(url: str) -> str:
    """`url` with any password replaced by ***: safe to print and log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
