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
