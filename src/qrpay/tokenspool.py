"""Tokens archived as they arrive, not when their period closes.

A day's tokens are most of the bytes settlement keeps (204 of every 262),
and nothing about them changes once a batch is applied. So a settlement
store writes them out ahead of the close, a part at a time, as archive
tables in a spool folder under the archive root:

    archive/tokens-spool/
        tokens_000000001234/            one part: the tokens of the live
            tokens_000000001234.parquet batches from arrival 1234 on that
                                        had none archived yet
        .tmp-<hex>/                     a part being written (or left by a crash)

and drops them from the batch rows in the same transaction that registers
the part. The close links each registered part into its period's folder
(archive.PeriodWriter.adopt: no byte read or written again) and writes only
the tokens not spooled yet. A period's tokens tables therefore hold the
tokens of every batch that arrived while it was open, those of records
scanned after its end included (their records are in the next period's
`records` table; the two join on gateway and record number).

The module knows nothing of the store: settlement.py decides when, and
under which lock, a part is written and registered. A part folder that no
store row names (a crash between writing it and registering it) is removed
by `sweep`, which the caller runs under the same lock.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt

from qrpay import archive as archive_module
from qrpay.anchor import sync_directory
from qrpay.errors import ArchiveUnavailable

SPOOL = "tokens-spool"
PREFIX = "tokens_"   # every tokens table of a period is PREFIX + its first arrival, 12 digits


def part_name(first_arrival: int) -> str:
    """The table name of the part that starts at batch `first_arrival`:
    names sort as arrivals do."""
    return f"{PREFIX}{first_arrival:012d}"


def is_part(table: str) -> bool:
    return table.startswith(PREFIX) and table[len(PREFIX):].isdigit()


def spool_dir(archive_root: Path) -> Path:
    return Path(archive_root) / SPOOL


def tokens_table(gateway: archive_module.Labels, record: npt.NDArray[np.uint64],
                 gateway_time: npt.NDArray[np.uint32], tokens: npt.NDArray[np.uint8]
                 ) -> archive_module.Table:
    """The archive table of some records' tokens: each one's gateway and
    record number (the key into a period's `records` table), the time it
    was scanned (what re-verifying it needs), and the token's 204 bytes."""
    return {"gateway": gateway, "record": np.ascontiguousarray(record),
            "gateway_time": np.ascontiguousarray(gateway_time), "token": tokens}


def write_part(archive_root: Path, name: str, table: archive_module.Table,
               format: str | None) -> archive_module.WrittenTable:
    """Write a part into its own folder of the spool, durably: written in
    a temporary folder, then renamed. A folder of that name left by a crash
    (written, never registered) is replaced."""
    root = spool_dir(archive_root)
    try:
        if not root.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            sync_directory(root.parent)
        temp = root / f".tmp-{secrets.token_hex(8)}"
        temp.mkdir()
    except OSError as exc:
        raise ArchiveUnavailable(f"cannot make a token part under {root}: {exc}") from exc
    try:
        written = archive_module.write_table(temp, name, table, format=format)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(temp, final)
        sync_directory(root)
    except OSError as exc:
        raise ArchiveUnavailable(f"cannot write token part {name} under {root}: {exc}") from exc
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return written


def sweep(archive_root: Path, registered: set[str]) -> list[str]:
    """Remove the spool's folders no store row names (and temporary ones):
    what crashed writes left. Run only under the lock that registers parts.
    Best effort; returns the names removed."""
    root = spool_dir(archive_root)
    try:
        names = [e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    gone = [n for n in names if n not in registered]
    for name in gone:
        shutil.rmtree(root / name, ignore_errors=True)
    return gone
