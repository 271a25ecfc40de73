"""The gateway's anchor: a small file beside the journal that remembers how
far the journal has got, so a lost, truncated or rolled-back journal is
caught when the gateway opens instead of silently starting from nothing.

Two fixed-size slots, each with its own checksum, written alternately in
place: a torn write spoils at most the slot being written, and the newer
valid slot wins. The slot is written (no fsync) after every journal commit,
which costs one small pwrite; it is synced at export, ack, deny-list updates,
close and creation. It can lag the journal after a power cut, never lead it:
it is only written after the commit it describes returned.

It also carries an open doubt: the first record and batch numbers of a
commit whose outcome is unknown (its sync failed). An open that finds a
doubt the journal has not resolved voids those rows before anything else.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

from qrpay.errors import JournalUnavailable

ANCHOR_FILE = "gateway.anchor"
_MAGIC = b"QPANCHR1"
# magic, generation, gateway key, last record, time floor, last batch,
# deny-list version, doubt id, doubt first record, doubt first batch.
_BODY = struct.Struct("<8sQ32sQQQQQQQ")
_CRC = struct.Struct("<I")
SLOT_SIZE = _BODY.size + _CRC.size
# Slots a page apart: a torn sector write cannot spoil both.
_SLOT_OFFSETS = (0, 4096)


class Anchor(NamedTuple):
    """What the journal must hold at least. Record and batch numbers are the
    highest ever committed (pruned ones included); the time floor is the
    latest scan time journaled."""

    gateway_key: bytes
    last_record: int = 0
    time_floor: int = 0
    last_batch: int = 0
    deny_version: int = 0
    doubt: int = 0               # id of the open doubt; 0 = none ever
    doubt_record: int = 0        # records numbered from here on are in doubt
    doubt_batch: int = 0         # batches numbered from here on are in doubt
    generation: int = 0

    def to_slot(self) -> bytes:
        # (A NamedTuple and a CRC: this runs after every commit, in ~3 us.)
        body = _BODY.pack(_MAGIC, self.generation, self.gateway_key, self.last_record,
                          self.time_floor, self.last_batch, self.deny_version, self.doubt,
                          self.doubt_record, self.doubt_batch)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_slot(cls, data: bytes) -> Anchor | None:
        """The anchor in one slot, or None if the slot is torn or empty."""
        if len(data) < SLOT_SIZE:
            return None
        body = data[:_BODY.size]
        if _CRC.unpack_from(data, _BODY.size)[0] != zlib.crc32(body):
            return None
        (magic, generation, key, last_record, floor, last_batch, deny, doubt, doubt_record,
         doubt_batch) = _BODY.unpack(body)
        if magic != _MAGIC:
            return None
        return cls(key, last_record, floor, last_batch, deny, doubt, doubt_record, doubt_batch,
                   generation)


class AnchorFile:
    """The anchor file of one gateway directory, open for its lifetime."""

    def __init__(self, path: Path, fd: int, current: Anchor) -> None:
        self.path = path
        self._fd = fd
        self.current = current

    @classmethod
    def open(cls, directory: Path) -> tuple[AnchorFile, bool]:
        """The directory's anchor file and whether it already held an anchor
        (False for a new or empty file: its anchor is then all zeros)."""
        path = directory / ANCHOR_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalUnavailable(f"cannot open {path}: {exc}") from exc
        try:
            found = [a for a in (Anchor.from_slot(os.pread(fd, SLOT_SIZE, offset))
                                 for offset in _SLOT_OFFSETS) if a is not None]
            size = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise JournalUnavailable(f"cannot read {path}: {exc}") from exc
        if not found and size > 0:
            os.close(fd)
            raise JournalUnavailable(
                f"{path} is damaged (no valid slot): restore the gateway directory from a "
                "backup, or run `qrpay gateway recover` (docs/GATEWAY.md, Failure modes)")
        if not found:
            return cls(path, fd, Anchor(b"\0" * 32)), False
        return cls(path, fd, max(found, key=lambda a: a.generation)), True

    def write(self, anchor: Anchor, sync: bool) -> None:
        """Store `anchor` in the older slot; with `sync`, make it durable.
        Raises OSError (the caller decides what a lagging anchor costs)."""
        new = anchor._replace(generation=self.current.generation + 1)
        os.pwrite(self._fd, new.to_slot(), _SLOT_OFFSETS[new.generation % 2])
        self.current = new
        if sync:
            os.fsync(self._fd)

    def create(self, anchor: Anchor) -> None:
        """A new anchor in both slots, synced with its directory entry."""
        self.write(anchor, sync=False)
        self.write(anchor, sync=True)
        sync_directory(self.path.parent)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def sync_directory(directory: Path) -> None:
    """fsync a directory, so a file created in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
