"""The settlement store a test opens, on each database: tests of modules
marked `pytestmark = pytest.mark.usefixtures("each_store")` run once on
SQLite and once on PostgreSQL (the `each_store` fixture, conftest.py), and
open their stores with `open_settlement(path, ...)` where they would call
`Settlement(path, ...)`. On PostgreSQL each path names a schema of its own
on the session's server (the same path, the same store: reopening works),
with the archive in `path/archive` as on SQLite. A test that is about SQLite
itself (its WAL, its files) is marked `sqlite_only` and runs once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qrpay.settlement import Settlement

_server: Any = None                 # pg_server.PostgresServer while a PostgreSQL test runs
_schemas: dict[str, str] = {}       # path -> store URL, for the test running


def use(server: Any) -> None:
    """Open stores on `server` (a PostgresServer), or on SQLite for None."""
    global _server
    _server = server
    _schemas.clear()


def kind() -> str:
    return "sqlite" if _server is None else "postgresql"


def location(path: str | os.PathLike[str]) -> str:
    """The store URL a path stands for in the test running."""
    if _server is None:
        return str(path)
    return _schemas.setdefault(str(Path(path).resolve()), _server.url())


def open_settlement(path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Settlement:
    """Settlement(path, ...) on the database the test runs on."""
    if _server is None:
        return Settlement(path, *args, **kwargs)
    kwargs.setdefault("archive", Path(path) / "archive")
    return Settlement(location(path), *args, **kwargs)


def copy_store(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """A copy of the store at path `source` (and its archive) at `target`:
    the folder on SQLite; on PostgreSQL also every table of its schema,
    rows and identity counters, in a schema of its own."""
    import shutil
    if Path(source).exists():   # on PostgreSQL, only its archive (if any) is a folder
        shutil.copytree(source, target)
    if _server is None:
        return
    import psycopg
    from psycopg import sql
    old = _schema_of(location(source))
    new = _schema_of(location(target))
    with psycopg.connect(_server.dsn, autocommit=True) as db, db.transaction():
        db.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(new)))
        tables = [r[0] for r in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (old,)).fetchall()]
        for table in tables:
            src, dst = sql.Identifier(old, table), sql.Identifier(new, table)
            db.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(dst, src))
            db.execute(sql.SQL("INSERT INTO {} OVERRIDING SYSTEM VALUE SELECT * FROM {}"
                               ).format(dst, src))
            for (column,) in db.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
                    "AND table_name = %s AND is_identity = 'YES'", (new, table)).fetchall():
                db.execute(sql.SQL("SELECT setval(pg_get_serial_sequence(%s, %s), "
                                   "COALESCE((SELECT MAX({}) FROM {}), 0) + 1, false)").format(
                    sql.Identifier(column), dst), (f"{new}.{table}", column))


def _schema_of(url: str) -> str:
    return url.rsplit("schema=", 1)[1]
