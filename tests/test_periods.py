"""Settling a stream in one period or cut into many gives the same verdicts.

The ledger's verdicts depend only on what arrived before (ledger.settle) and
the Carry holds what a later period needs of the closed ones (periods.py).
Here hypothesis builds streams of scans with honest riders, screenshots
shown twice, copied phones, stale counters and invalid tokens, uploaded up to
`MAX_DELAY` late, and cuts them at random moments: every charge and every
finding must be the same as settling the whole stream at once.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgpack  # type: ignore[import-untyped]
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qrpay.ledger import RECORD_DTYPE
from qrpay.periods import (
    Carry, Settled, carry_forward, pack_tables, settle_period, unpack_tables, with_room,
)
from qrpay.wire import pack

SLACK = 120
MAX_DELAY = 3_000          # how late an upload may be, in seconds after its scan
HORIZON = MAX_DELAY + SLACK


@st.composite
def streams(draw: Any) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(records, gateway ids, cut times): one row per scan, in arrival order;
    `record` holds the row's id and `uploaded_at` its arrival time."""
    n = draw(st.integers(1, 70))
    t = 10_000
    counters: dict[int, int] = {}
    rows: list[dict[str, int]] = []
    for i in range(n):
        t += draw(st.integers(0, 400))
        serial = draw(st.integers(1, 4))
        kind = draw(st.sampled_from(["honest"] * 5 + ["again", "clone", "stale"]))
        top = counters.get(serial, 0)
        at, token = t, 1_000_000 + i
        if kind == "again" and rows:
            # The same token (a screenshot) shown again within its freshness.
            other = rows[draw(st.integers(0, len(rows) - 1))]
            serial, counter, token = other["serial"], other["counter"], other["token_id"]
            at = other["gateway_time"] + draw(st.integers(0, SLACK))
        elif kind in ("clone", "stale") and top:
            counter = top if kind == "clone" else draw(st.integers(1, top))
        else:
            counter = counters[serial] = top + draw(st.integers(1, 3))
        rows.append({
            "record": i, "serial": serial, "counter": counter, "account": 500 + serial % 3,
            "amount": draw(st.integers(1, 900)), "scene": 1,
            "reason": draw(st.sampled_from([0] * 12 + [11])), "gateway_time": at,
            "issued_at": at, "limit": 1_500, "token_id": token,
            "uploaded_at": at + draw(st.integers(0, MAX_DELAY)),
            "gateway": draw(st.integers(0, 2)),
        })
    rows.sort(key=lambda r: (r["uploaded_at"], r["record"]))   # arrival order
    records = np.zeros(len(rows), dtype=RECORD_DTYPE)
    for name in RECORD_DTYPE.names or ():
        records[name] = [r[name] for r in rows]
    gateways = np.array([f"gw{r['gateway']}" for r in rows], dtype=object)
    last = int(records["uploaded_at"].max())
    cuts = sorted(set(draw(st.lists(st.integers(10_000, last + 1), max_size=6))))
    return records, gateways, cuts


def _verdicts(settled: Settled, into: Counter[tuple[Any, ...]]) -> None:
    """Add every charge and finding of a settled period, by row id."""
    records, result = settled.records, settled.result
    ids = records["record"]
    new = np.zeros(len(records), dtype=np.bool_)
    new[settled.new] = True
    for i in np.flatnonzero(result.charged & new):
        into[("charged", int(ids[i]), int(records["amount"][i]))] += 1
    for kind in ("double_spend", "duplicate", "clone"):
        for i in np.flatnonzero(getattr(result, kind)):
            into[(kind, int(ids[i]), int(ids[result.first_row[i]]))] += 1
    for kind in ("backwards", "found_behind", "invalid"):
        for i in np.flatnonzero(getattr(result, kind) & (new | (kind == "found_behind"))):
            into[(kind, int(ids[i]))] += 1


def _overspend(results: list[Settled]) -> dict[int, tuple[int, int, int, int]]:
    """Per serial, the highest peak of offline exposure found over the
    limit and its earliest moment: a period reports the moments its own
    records cover, so the union over periods is the whole stream's."""
    found: dict[int, tuple[int, int, int, int]] = {}
    for settled in results:
        r = settled.result
        for serial, at, spent, limit, account in zip(
                r.over_serial.tolist(), r.over_at.tolist(), r.over_spent.tolist(),
                r.over_limit.tolist(), r.over_account.tolist()):
            best = found.get(serial)
            if best is None or (spent, -at) > (best[0], -best[1]):
                found[serial] = (spent, at, limit, account)
    return found


def _in_periods(records: np.ndarray, gateways: np.ndarray, cuts: list[int], room: bool = False
                ) -> tuple[list[Settled], Carry]:
    """Close a period at each cut (everything that arrived before it, all of
    it scanned before it), then settle what is left as the open period
    (with `room`, each period's records in an array with room for the tail
    before them, as a store reads them)."""
    carry, results, start = Carry.empty(), [], 0
    arrival = records["uploaded_at"].astype(np.int64)
    for cut in cuts + [None]:
        stop = len(records) if cut is None else int(np.searchsorted(arrival, cut))
        part, buffer = records[start:stop], None
        if room:
            buffer, part = with_room(stop - start, len(carry.tail))
            part[:] = records[start:stop]
        settled = settle_period(carry, part, gateways[start:stop], SLACK, room=buffer)
        results.append(settled)
        if cut is not None:
            carry = carry_forward(carry, settled, cut - HORIZON)
        start = stop
    return results, carry


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_room_before_the_records_changes_nothing(stream: Any) -> None:
    """The tail rows written into the room before a period's records settle
    as the copied ones: the same rows, verdicts and findings, period by period."""
    records, gateways, cuts = stream
    plain, _ = _in_periods(records, gateways, cuts)
    roomy, _ = _in_periods(records, gateways, cuts, room=True)
    for a, b in zip(plain, roomy):
        assert a.records.tobytes() == b.records.tobytes() and a.prior == b.prior
        for name in a.result.__dataclass_fields__:
            assert np.array_equal(getattr(a.result, name), getattr(b.result, name)), name


def test_a_room_that_does_not_end_with_the_records_is_not_written() -> None:
    from qrpay.periods import _after
    tail = np.zeros(2, dtype=RECORD_DTYPE)
    tail["serial"] = 7
    buffer, records = with_room(3, 2)
    records[:] = np.zeros(3, dtype=RECORD_DTYPE)
    assert _after(tail, records, buffer)["serial"].tolist() == [7, 7, 0, 0, 0]
    assert buffer["serial"][:2].tolist() == [7, 7]          # written in place
    # Too little room, another array, none: the tail is copied, nothing written.
    for room in (with_room(3, 1)[0], np.zeros(5, dtype=RECORD_DTYPE), None):
        before = None if room is None else room.copy()
        mine_buffer, mine = with_room(3, 2)
        mine[:] = np.zeros(3, dtype=RECORD_DTYPE)
        mine_buffer["serial"][:2] = 99
        assert _after(tail, mine, room)["serial"].tolist() == [7, 7, 0, 0, 0]
        assert mine_buffer["serial"][:2].tolist() == [99, 99]
        assert room is None or room.tobytes() == before.tobytes()  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_one_period_or_many_settle_the_same(stream: Any) -> None:
    records, gateways, cuts = stream
    whole = settle_period(Carry.empty(), records, gateways, SLACK)
    pieces, _carry = _in_periods(records, gateways, cuts)
    want: Counter[tuple[Any, ...]] = Counter()
    got: Counter[tuple[Any, ...]] = Counter()
    _verdicts(whole, want)
    for settled in pieces:
        _verdicts(settled, got)
        assert not settled.result.late.any()   # every upload within the horizon
    assert got == want
    assert _overspend(pieces) == _overspend([whole])


@settings(max_examples=150, deadline=None)
@given(streams())
def test_the_carry_holds_only_the_horizon(stream: Any) -> None:
    """The tail keeps the records of the last HORIZON seconds (or still
    outstanding offline then); everything older is one floor row per serial."""
    records, gateways, cuts = stream
    if not cuts:
        return
    _pieces, carry = _in_periods(records, gateways, cuts)
    keep_from = cuts[-1] - HORIZON
    assert ((carry.tail["gateway_time"] >= keep_from)
            | (carry.tail["uploaded_at"] >= keep_from)).all()
    assert (carry.tail["reason"] == 0).all()
    assert len(np.unique(carry.floor.serial)) == len(carry.floor.serial)
    older = records[(records["uploaded_at"] < cuts[-1]) & (records["reason"] == 0)
                    & (records["gateway_time"] < keep_from) & (records["uploaded_at"] < keep_from)]
    for serial in np.unique(older["serial"]).tolist():
        mine = older[older["serial"] == serial]
        at = int(np.searchsorted(carry.floor.serial, serial))
        assert carry.floor.counter[at] == mine["counter"].max()
        assert carry.floor.time[at] == mine["gateway_time"].max()


def test_tables_round_trip() -> None:
    records = np.zeros(3, dtype=RECORD_DTYPE)
    records["record"] = [1, 2, 3]
    records["serial"] = [7, 7, 8]
    records["counter"] = [1, 2, 1]
    records["gateway_time"] = [100, 200, 300]
    records["uploaded_at"] = [400, 400, 400]
    gateways = np.array(["a", "b", "a"], dtype=object)
    settled = settle_period(Carry.empty(), records, gateways, SLACK)
    carry = carry_forward(Carry.empty(), settled, 250)
    again = Carry.from_tables(carry.to_tables())
    assert again.tail.tobytes() == carry.tail.tobytes()
    assert again.tail_gateway.tolist() == carry.tail_gateway.tolist() == ["a", "b", "a"]
    assert again.floor.serial.tolist() == carry.floor.serial.tolist()
    assert again.charges.tobytes() == carry.charges.tobytes()


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(-(2**15), 2**15),
                          st.integers(0, 3)), max_size=3000),
       st.sampled_from(["<u8", "<i8", "<u4", "<i2", "<u1"]))
@settings(max_examples=60, deadline=None)
def test_packed_tables_come_back_as_they_were(rows: list[tuple[int, int, int]],
                                              kind: str) -> None:
    # Columns long enough to be compressed and not, compressible (small
    # values, repeats) and not (random 64-bit), narrowed and not: every one
    # comes back with its values and dtype, widened or not.
    n = len(rows)
    wide = np.array([r[0] for r in rows], dtype=np.uint64)
    small = np.array([r[1] for r in rows], dtype=np.int64)
    repeat = np.repeat(np.array([r[2] for r in rows], dtype=np.dtype(kind)), 5)
    tables = {"t": {"wide": wide, "small": small, "flag": small > 0,
                    "names": np.array([f"g{r[2]}" for r in rows], dtype=object).reshape(n)},
              "u": {"repeat": repeat, "scale": np.arange(n * 3, dtype=np.float64) / 7}}
    data = pack_tables(tables)
    for widen in (True, False):
        back = unpack_tables(data, widen=widen)
        for table, columns in tables.items():
            for name, column in columns.items():
                got = back[table][name]
                assert got.tolist() == column.tolist(), (table, name)
                if widen or column.dtype == object:
                    assert got.dtype == column.dtype
    entries = msgpack.unpackb(data)
    if n >= 1000:   # the random column stays raw, the repeats are compressed
        assert entries["t"]["wide"][-1] != "zs" and entries["u"]["repeat"][-1] == "zs"


def test_tables_packed_before_compression_still_read() -> None:
    # A carry row a store wrote before columns were compressed.
    old = pack({"t": {"n": ["<u8", np.arange(5000, dtype="<u4").tobytes(), "<u4"],
                      "x": ["<i8", np.arange(3, dtype="<i8").tobytes()]}})
    back = unpack_tables(old)
    assert back["t"]["n"].tolist() == list(range(5000)) and back["t"]["n"].dtype == np.uint64
    assert back["t"]["x"].tolist() == [0, 1, 2]


def test_packing_compresses_what_shrinks_and_keeps_the_rest_raw() -> None:
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 2**63, 20_000).astype(np.uint64)           # random: stays raw
    slow = (1_800_000_000 + np.arange(20_000) // 3).astype(np.int64)   # narrowed, compressed
    entries = msgpack.unpackb(pack_tables({"t": {"wide": wide, "slow": slow}}))["t"]
    assert entries["wide"][-1] != "zs" and entries["slow"][-1] == "zs"
    assert len(entries["slow"][1]) < 0.5 * 4 * len(slow)
    back = unpack_tables(pack_tables({"t": {"wide": wide, "slow": slow}}))["t"]
    assert back["wide"].tolist() == wide.tolist() and back["slow"].tolist() == slow.tolist()
