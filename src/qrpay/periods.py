"""Settlement periods: settle one period's records against what the closed
periods carried forward, and carry forward what the next one needs.

Every verdict of the ledger depends only on records that arrived before it
(ledger.settle), so a stream settled in one piece or period by period gives
the same charges and findings, provided each period sees what the earlier
ones left behind. That is the Carry, and its size is set by the number of
credentials and accounts and by `horizon`, not by how many periods closed:

- the tail: the valid records scanned (or still outstanding offline) within
  `horizon` seconds before the cut, with their verdicts, against which a
  late upload's records are judged exactly;
- the floor: per serial, the highest counter and latest scan among the older
  valid records, which is all the clone check needs of them;
- the charges not yet folded into per-account credit state (credit.freeze).

Pure functions over numpy arrays: the store (settlement.py) reads and writes
them, the tests compare settling in one piece and in many.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

from qrpay import credit
from qrpay._segments import stable_order, starts
from qrpay.ledger import RECORD_DTYPE, Floor, LedgerResult, Mask, settle
from qrpay.wire import pack

Table = dict[str, npt.NDArray[np.generic]]

# Charged payments kept for the credit history (account, scan time, amount).
CHARGE_DTYPE = np.dtype([("account", "<u8"), ("time", "<i8"), ("amount", "<i8")])


@dataclass(frozen=True)
class Carry:
    """What a closed period leaves for the next one (see the module doc)."""

    tail: npt.NDArray[np.void]                 # RECORD_DTYPE, in arrival order
    tail_gateway: npt.NDArray[np.object_]      # the gateway id of each tail row
    tail_charged: Mask
    tail_flagged: Mask                         # flagged backwards when it arrived
    tail_found: Mask                           # found behind a later arrival
    floor: Floor
    charges: npt.NDArray[np.void]              # CHARGE_DTYPE, not folded into `credit`
    credit: npt.NDArray[np.void] | None        # credit.freeze state, or None

    @staticmethod
    def empty() -> Carry:
        none = np.zeros(0, dtype=np.bool_)
        return Carry(np.zeros(0, dtype=RECORD_DTYPE), np.zeros(0, dtype=object), none, none,
                     none, Floor.empty(), np.zeros(0, dtype=CHARGE_DTYPE), None)

    def to_tables(self) -> dict[str, Table]:
        """As archive tables (columns of one length each)."""
        tail: Table = {name: self.tail[name] for name in RECORD_DTYPE.names or ()}
        tail["gateway"] = self.tail_gateway
        tail["charged"], tail["flagged"] = self.tail_charged, self.tail_flagged
        tail["found"] = self.tail_found
        tables: dict[str, Table] = {
            "carry_tail": tail,
            "carry_floor": {"serial": self.floor.serial, "counter": self.floor.counter,
                            "time": self.floor.time},
            "carry_charges": charges_table(self.charges),
        }
        if self.credit is not None:
            tables["carry_credit"] = {name: self.credit[name]
                                      for name in self.credit.dtype.names or ()}
        return tables

    @staticmethod
    def from_tables(tables: dict[str, Table]) -> Carry:
        """The Carry of `to_tables`' tables; without carry_charges (as a
        period's archive holds it: the tail and floor only) its charges are
        empty and its credit state None."""
        tail_columns = tables["carry_tail"]
        tail = np.zeros(len(tail_columns["gateway"]), dtype=RECORD_DTYPE)
        for name in RECORD_DTYPE.names or ():
            tail[name] = tail_columns[name]
        floor = tables["carry_floor"]
        charges = (charges_from_table(tables["carry_charges"]) if "carry_charges" in tables
                   else np.zeros(0, dtype=CHARGE_DTYPE))
        state = None
        if "carry_credit" in tables:
            columns = tables["carry_credit"]
            state = np.zeros(len(next(iter(columns.values()))), dtype=credit.CREDIT_STATE_DTYPE)
            for name in credit.CREDIT_STATE_DTYPE.names or ():
                state[name] = columns[name]
        return Carry(tail, np.asarray(tail_columns["gateway"], dtype=object),
                     np.asarray(tail_columns["charged"], dtype=np.bool_),
                     np.asarray(tail_columns["flagged"], dtype=np.bool_),
                     np.asarray(tail_columns["found"], dtype=np.bool_),
                     Floor(np.asarray(floor["serial"], dtype=np.uint64),
                           np.asarray(floor["counter"], dtype=np.int64),
                           np.asarray(floor["time"], dtype=np.int64)),
                     charges, state)


def charges_table(charges: npt.NDArray[np.void]) -> Table:
    """CHARGE_DTYPE rows as a table (what pack_tables packs)."""
    return {name: charges[name] for name in CHARGE_DTYPE.names or ()}


def charges_from_table(columns: Table) -> npt.NDArray[np.void]:
    """The CHARGE_DTYPE rows of charges_table's table (its integer columns
    may come back narrower: unpack_tables without widen)."""
    charges = np.zeros(len(columns["account"]), dtype=CHARGE_DTYPE)
    for name in CHARGE_DTYPE.names or ():
        charges[name] = columns[name]
    return charges


@dataclass(frozen=True)
class Settled:
    """A period's records settled against a Carry. The arrays cover the
    carried tail rows the period needed first (`prior` rows: `from_tail`
    says which) and then the period's records."""

    records: npt.NDArray[np.void]          # needed tail rows + period, RECORD_DTYPE
    gateway: npt.NDArray[np.int64]         # index into `names`
    names: list[str]
    prior: int
    result: LedgerResult
    from_tail: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros(0, dtype=np.int64))   # rows of carry.tail

    @property
    def new(self) -> slice:
        return slice(self.prior, None)


@dataclass(frozen=True)
class TailIndex:
    """The tail by serial, worked out once per Carry (a store keeps it while
    no period closes): the serials, each tail row's serial, each serial's
    latest scan, and the floor with every tail serial's highest counter and
    latest scan folded in."""

    serials: npt.NDArray[np.uint64]     # sorted, distinct
    at: npt.NDArray[np.int64]           # per tail row: its serial's index
    latest: npt.NDArray[np.int64]       # per serial: its latest tail scan
    merged: Floor


def index_tail(carry: Carry) -> TailIndex:
    tail = carry.tail
    serials, at = np.unique(tail["serial"], return_inverse=True)
    at = at.astype(np.int64).reshape(-1)
    latest = np.full(len(serials), -1, dtype=np.int64)
    np.maximum.at(latest, at, tail["gateway_time"].astype(np.int64))
    return TailIndex(serials, at, latest, _raise_floor(carry.floor, tail["serial"],
                                                       tail["counter"], tail["gateway_time"]))


def settle_period(carry: Carry, records: npt.NDArray[np.void],
                  gateway_ids: npt.NDArray[np.object_], slack: int,
                  index: TailIndex | None = None,
                  room: npt.NDArray[np.void] | None = None) -> Settled:
    """Settle `records` (arrival order; `gateway_ids` the gateway of each)
    after everything `carry` stands for (`index`: index_tail(carry), if the
    caller keeps it). `room`, if given, is an array that ends with
    `records` (made by with_room) whose rows before them are free: the tail
    rows the period needs are written there rather than copying the
    records after them.

    Of the tail, only the rows a period record can meet go through the
    kernel (_needed); for every other serial each of its records was
    scanned more than `slack` after all its tail rows, so the tail counts
    only as a floor (its highest counter), exactly as the kernel would use
    it."""
    index = index_tail(carry) if index is None else index
    # Sorted by serial once: for the tail lookup here and every step of the
    # kernel (from a contiguous copy: a structured array's field is strided,
    # and gathered 8 times slower).
    serial = np.ascontiguousarray(records["serial"])
    order = stable_order(serial)
    grouped = serial[order]
    needed, near = _needed(carry, index, records, slack, order, grouped)
    floor = _floor_for(carry.floor, index.merged, index.serials[near])
    tail, tail_gateway = carry.tail[needed], carry.tail_gateway[needed]
    every = np.concatenate([tail_gateway, gateway_ids]) if len(tail) else gateway_ids
    # Ids come in runs (a batch's records, the tail's), so look each run up once.
    run = np.flatnonzero(np.r_[True, every[1:] != every[:-1]]) if len(every) else np.zeros(
        0, dtype=np.int64)
    firsts = every[run].tolist()
    names = sorted(set(firsts))
    lookup = {name: i for i, name in enumerate(names)}
    gateway = np.repeat(np.fromiter((lookup[g] for g in firsts), dtype=np.int64,
                                    count=len(firsts)), np.diff(np.r_[run, len(every)]))
    both = _after(tail, records, room)
    result = settle(both, gateway, slack, prior=len(tail),
                    prior_charged=carry.tail_charged[needed],
                    prior_flagged=carry.tail_flagged[needed],
                    prior_found=carry.tail_found[needed], floor=floor,
                    serial_order=_merged_order(tail["serial"], grouped, order))
    return Settled(both, gateway, names, len(tail), result, needed)


def with_room(rows: int, room: int) -> tuple[npt.NDArray[np.void], npt.NDArray[np.void]]:
    """(buffer, records): a RECORD_DTYPE array of `room` free rows and then
    `rows` rows for the caller to fill (`records`, a view of its end), for
    settle_period's `room`. Untouched, the free rows cost no memory."""
    buffer = np.empty(room + rows, dtype=RECORD_DTYPE)
    return buffer, buffer[room:]


def _after(tail: npt.NDArray[np.void], records: npt.NDArray[np.void],
           room: npt.NDArray[np.void] | None) -> npt.NDArray[np.void]:
    """The tail rows, then the records, as one array: in `room` when the
    records are its last rows and it has room for the tail before them
    (checked: a room that is not that is not written), else a copy."""
    if not len(tail):
        return records
    start = -1 if room is None else len(room) - len(records)
    if (room is not None and room.dtype == records.dtype and room.ndim == records.ndim == 1
            and start >= len(tail) and room.flags.c_contiguous
            and room[start:].__array_interface__["data"][0]
            == records.__array_interface__["data"][0]):
        both = room[start - len(tail):]
        both[:len(tail)] = tail
        return both
    return np.concatenate([tail, records])


def _merged_order(first: npt.NDArray[np.uint64], then_sorted: npt.NDArray[np.uint64],
                  then_order: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """The rows of `first` followed by the rows of `then` sorted by serial,
    stably, given `then_order` (the sort of `then`) and `then_sorted` (its
    serials in that order): the few rows of `first` sorted and put in
    before the rows of `then` with the same serial."""
    if not len(first):
        return then_order
    first_order = np.argsort(first, kind="stable")
    at = np.searchsorted(then_sorted, first[first_order], side="left")
    return np.insert(then_order + len(first), at, first_order)


def _needed(carry: Carry, index: TailIndex, records: npt.NDArray[np.void], slack: int,
            order: npt.NDArray[np.intp], grouped: npt.NDArray[np.uint64]
            ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """The tail rows (indices, in order) a period record can meet other than
    through its serial's highest counter: every tail row of a serial that
    has a period record scanned within `slack` after (or before) one of its
    tail rows ("near" serials, also returned), and the charged tail rows
    still outstanding offline when a period record of their serial was
    scanned (overspend). `order` sorts the records by serial (stably) and
    `grouped` is their serials in that order."""
    serials = index.serials
    near = np.zeros(len(serials), dtype=np.bool_)
    if not len(carry.tail) or not len(records):
        return np.zeros(0, dtype=np.int64), near
    # Both questions are about each serial's earliest period record, so they
    # are asked once per serial, not per record.
    first = starts(grouped)
    mine_serials = grouped[first]
    first_scan = np.minimum.reduceat(records["gateway_time"].astype(np.int64)[order], first)
    where = np.searchsorted(serials, mine_serials).clip(max=len(serials) - 1)
    hit = serials[where] == mine_serials
    where, first_scan = where[hit], first_scan[hit]
    near[where] = first_scan - slack <= index.latest[where]
    earliest = np.full(len(serials), np.iinfo(np.int64).max, dtype=np.int64)
    earliest[where] = first_scan
    outstanding = carry.tail_charged & (
        carry.tail["uploaded_at"].astype(np.int64) > earliest[index.at])
    return np.flatnonzero(near[index.at] | outstanding), near


def _floor_for(floor: Floor, merged: Floor, near: npt.NDArray[np.uint64]) -> Floor:
    """The floor a period is settled against: the merged one (tail folded
    in), but for the `near` serials, whose tail rows go through the kernel,
    the carried one."""
    if not len(near):
        return merged
    drop = np.zeros(len(merged.serial), dtype=np.bool_)
    at = np.searchsorted(merged.serial, near)
    drop[at[merged.serial[at.clip(max=len(merged.serial) - 1)] == near]] = True
    back = np.searchsorted(floor.serial, near).clip(max=max(len(floor.serial) - 1, 0))
    hit = back[floor.serial[back] == near] if len(floor.serial) else back[:0]
    serial = np.concatenate([merged.serial[~drop], floor.serial[hit]])
    order = np.argsort(serial, kind="stable")
    return Floor(serial[order], np.concatenate([merged.counter[~drop], floor.counter[hit]])[order],
                 np.concatenate([merged.time[~drop], floor.time[hit]])[order])


def carry_forward(carry: Carry, settled: Settled, keep_from: int,
                  due_after: int = credit.DEFAULT_DUE_AFTER, *,
                  with_charges: bool = True) -> Carry:
    """The Carry after `settled` closes: the valid records scanned or still
    outstanding offline at or after `keep_from` (the cut less the horizon)
    stay in the tail; the older ones go into the floor. Charges and
    repayments that can no longer change are left to credit state by the
    caller (fold_credit). Without `with_charges`, the Carry's charges are
    left empty (a store keeps them apart)."""
    result, prior = settled.result, settled.prior
    new_records = settled.records[settled.new]
    found_now = np.zeros(len(carry.tail), dtype=np.bool_)
    found_now[settled.from_tail] = result.found_behind[:prior]
    # The whole tail (the rows the period did not need keep their verdicts),
    # then the period's records: each part masked apart, so that only the
    # rows kept are copied (and only their gateway ids made).
    keep_tail, drop_tail = _kept_rows(carry.tail, keep_from)
    keep_new, drop_new = _kept_rows(new_records, keep_from)
    names = np.array(settled.names, dtype=object)
    tail = np.concatenate([carry.tail[keep_tail], new_records[keep_new]])
    gateway = np.concatenate([carry.tail_gateway[keep_tail],
                              names[settled.gateway[settled.new][keep_new]]])
    charged = np.concatenate([carry.tail_charged[keep_tail],
                              result.charged[settled.new][keep_new]])
    flagged = np.concatenate([carry.tail_flagged[keep_tail],
                              result.backwards[settled.new][keep_new]])
    found = np.concatenate([(carry.tail_found | found_now)[keep_tail],
                            result.found_behind[settled.new][keep_new]])
    # Three columns of the rows dropped, not the rows (most of a day's records).
    floor = _raise_floor(carry.floor, *(
        np.concatenate([carry.tail[name][drop_tail], new_records[name][drop_new]])
        for name in ("serial", "counter", "gateway_time")))
    charges = (np.concatenate([carry.charges, period_charges(settled)]) if with_charges
               else np.zeros(0, dtype=CHARGE_DTYPE))
    return Carry(tail, gateway, charged, flagged, found, floor, charges, carry.credit)


def _kept_rows(records: npt.NDArray[np.void], keep_from: int
               ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Of `records`, the valid ones scanned or uploaded at or after
    `keep_from` (they stay in the tail) and the other valid ones (they go
    into the floor)."""
    valid = records["reason"] == 0
    recent = ((records["gateway_time"].astype(np.int64) >= keep_from)
              | (records["uploaded_at"].astype(np.int64) >= keep_from))
    return valid & recent, valid & ~recent


def period_charges(settled: Settled) -> npt.NDArray[np.void]:
    """The payments the period's records charged, as CHARGE_DTYPE rows in
    arrival order."""
    charged = settled.records[settled.new][settled.result.charged[settled.new]]
    charges = np.zeros(len(charged), dtype=CHARGE_DTYPE)
    charges["account"] = charged["account"]
    charges["time"] = charged["gateway_time"]
    charges["amount"] = charged["amount"]
    return charges


def _raise_floor(floor: Floor, serial: npt.NDArray[np.uint64], counter: npt.NDArray[Any],
                 gateway_time: npt.NDArray[Any]) -> Floor:
    """The floor with the valid records leaving the tail (their serial,
    counter and gateway time) folded in."""
    if not len(serial):
        return floor
    serial = np.concatenate([floor.serial, serial])
    counter = np.concatenate([floor.counter, counter.astype(np.int64)])
    time = np.concatenate([floor.time, gateway_time.astype(np.int64)])
    order = np.argsort(serial)   # a maximum per serial: any order within one will do
    serial, counter, time = serial[order], counter[order], time[order]
    first = np.flatnonzero(np.r_[True, serial[1:] != serial[:-1]])
    return Floor(serial[first], np.maximum.reduceat(counter, first),
                 np.maximum.reduceat(time, first))


# Integer types a column is stored in when its values fit, narrowest first.
_NARROW = tuple(np.dtype(t) for t in ("<u1", "<u2", "<u4", "<i1", "<i2", "<i4"))


def pack_tables(tables: dict[str, Table]) -> bytes:
    """Tables as one msgpack document (numeric columns as raw little-endian
    bytes, integers in the narrowest type that holds them, then each byte
    of a value after the same byte of the others and zlib-compressed where
    that saves a tenth; text columns as their distinct values and an index
    per row): how the store keeps the Carry, which is read and written at
    every close. (The carry of a day of a million records: 21.5 MB of
    columns, 10.3 MB packed, in 0.26 s.)"""
    out: dict[str, dict[str, list[Any]]] = {}
    for table, columns in tables.items():
        out[table] = {}
        for name, column in columns.items():
            if column.dtype == object:
                values = list(map(str, column.tolist()))
                distinct = sorted(set(values))   # a few gateways, many rows: no loop in Python
                codes = np.fromiter(map({v: i for i, v in enumerate(distinct)}.__getitem__,
                                        values), dtype=np.int64, count=len(values))
                out[table][name] = ["strs", distinct, *_packed(codes)]
            else:
                out[table][name] = _compressed(*_packed(column))
    return pack(out)


def _compressed(kind: str, data: bytes, stored: str | None = None) -> list[Any]:
    """[kind, bytes(, stored)] as _packed gives them, or [kind, compressed
    bytes, stored, "zs"]: the bytes shuffled (byte 0 of every value, then
    byte 1, ...) and zlib-compressed, if that is at most 90% of them."""
    width = np.dtype(stored or kind).itemsize
    if len(data) >= 4096:
        values = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
        # Random columns (serials, token ids) do not compress: a sample of
        # the first values says so before the whole column is tried.
        if len(values) <= _SAMPLE or _shrinks(values[:_SAMPLE]):
            packed = zlib.compress(np.ascontiguousarray(values.T).tobytes(), 1)
            if len(packed) <= 0.9 * len(data):
                return [kind, packed, stored or kind, "zs"]
    return [kind, data] if stored is None else [kind, data, stored]


_SAMPLE = 8192   # values


def _shrinks(values: npt.NDArray[np.uint8]) -> bool:
    """Whether these values (rows of bytes), shuffled, compress to 90%."""
    sample = np.ascontiguousarray(values.T).tobytes()
    return len(zlib.compress(sample, 1)) <= 0.9 * len(sample)


def _expanded(data: bytes, stored: str) -> bytes:
    """The bytes _compressed shuffled and compressed."""
    width = np.dtype(stored).itemsize
    planes = np.frombuffer(zlib.decompress(data), dtype=np.uint8)
    return np.ascontiguousarray(planes.reshape(width, -1).T).tobytes()


def _packed(column: npt.NDArray[Any]) -> tuple[str, bytes] | tuple[str, bytes, str]:
    """(dtype, bytes), or (dtype, bytes, the narrower dtype the bytes are in)."""
    array = np.ascontiguousarray(column, dtype=column.dtype.newbyteorder("<"))
    if array.dtype.kind in "iu" and array.size and array.dtype.itemsize > 1:
        low, high = int(array.min()), int(array.max())
        for narrow in _NARROW:
            if narrow.itemsize >= array.dtype.itemsize:
                continue
            info = np.iinfo(narrow)
            if info.min <= low and high <= info.max:
                return array.dtype.str, array.astype(narrow).tobytes(), narrow.str
    return array.dtype.str, array.tobytes()


def _unpacked(kind: str, data: bytes, stored: str | None = None, widen: bool = True
              ) -> npt.NDArray[Any]:
    if stored is None:
        return np.frombuffer(data, dtype=np.dtype(kind)).copy()
    narrow = np.frombuffer(data, dtype=np.dtype(stored))
    return narrow.astype(np.dtype(kind)) if widen else narrow.copy()


def unpack_tables(data: bytes, widen: bool = True) -> dict[str, Table]:
    """The tables pack_tables packed. Without `widen`, an integer column
    stored narrower comes back in that type (same values): for a caller
    that copies it into its own dtype anyway (Carry.from_tables)."""
    doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    tables: dict[str, Table] = {}
    for table, columns in doc.items():
        tables[table] = {}
        for name, (kind, values, *rest) in columns.items():
            if kind == "str":    # as stores packed them before "strs"
                tables[table][name] = np.array(values, dtype=object).reshape(-1)
            elif kind == "strs":
                names = np.empty(len(values), dtype=object)
                names[:] = values
                codes = rest + [None] * (3 - len(rest))   # kind, bytes[, stored]
                tables[table][name] = names[_unpacked(codes[0], codes[1], codes[2], False)]
            elif rest[1:] == ["zs"]:
                tables[table][name] = _unpacked(kind, _expanded(values, rest[0]),
                                                None if rest[0] == kind else rest[0], widen)
            else:
                tables[table][name] = _unpacked(kind, values, rest[0] if rest else None,
                                                widen)
    return tables
