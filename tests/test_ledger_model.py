"""The settlement kernel (ledger.settle) against a model of its rules
written as plainly as possible: a loop over the records in arrival order,
each judged against those that arrived before it. Hypothesis draws small
streams of few serials, so that repeats, copies, counters going backwards,
the floor, carried (prior) rows and overspend all occur."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qrpay.ledger import RECORD_DTYPE, Floor, settle

SLACK = 50


def model(rows: list[dict[str, int]], gateway: list[int], prior: int,
          prior_charged: list[bool], prior_flagged: list[bool], prior_found: list[bool],
          floor: dict[int, tuple[int, int]]) -> dict[str, Any]:
    n = len(rows)
    valid = [r["reason"] == 0 for r in rows]
    new = [i >= prior for i in range(n)]
    backwards = [False] * n
    behind_later = [False] * n
    late = [False] * n
    for i in range(n):
        if not (valid[i] and new[i]):
            continue
        r = rows[i]
        for j in range(i):
            q = rows[j]
            if not valid[j] or q["serial"] != r["serial"]:
                continue
            if q["time"] < r["time"] - SLACK and q["counter"] >= r["counter"]:
                backwards[i] = True
            if q["time"] > r["time"] + SLACK and q["counter"] <= r["counter"]:
                behind_later[j] = True
        if r["serial"] in floor:
            counter, latest = floor[r["serial"]]
            late[i] = r["time"] - SLACK <= latest
            if not late[i] and r["counter"] <= counter:
                backwards[i] = True
    for i in range(prior):
        backwards[i] = prior_flagged[i]
    charged = [False] * n
    kind = [""] * n
    first_row = [-1] * n
    first_of: dict[tuple[int, int], int] = {}
    for i in range(n):
        if not valid[i] or backwards[i]:
            continue
        key = (rows[i]["serial"], rows[i]["counter"])
        if key not in first_of:
            first_of[key] = i
            charged[i] = True
            continue
        f = first_of[key]
        first_row[i] = f
        if rows[i]["token"] != rows[f]["token"]:
            kind[i] = "clone"
        elif gateway[i] == gateway[f]:
            kind[i] = "duplicate"
        else:
            kind[i] = "double_spend"
    for i in range(prior):
        charged[i], kind[i], first_row[i] = prior_charged[i], "", -1
    found = [behind_later[i] and charged[i] and not (i < prior and prior_found[i])
             for i in range(n)]
    # Overspend: per serial, outstanding offline spend over time (a charged
    # row from its scan until its upload; releases before payments at one
    # moment), judged where a new row's exposure covers it.
    over = {}
    for serial in sorted({r["serial"] for r, c in zip(rows, charged) if c}):
        mine = [i for i in range(n) if charged[i] and rows[i]["serial"] == serial]
        events = ([(rows[i]["time"], 1, rows[i]["amount"], new[i]) for i in mine]
                  + [(max(rows[i]["uploaded"], rows[i]["time"]), 0, -rows[i]["amount"], new[i])
                     for i in mine])
        events.sort(key=lambda e: (e[0], e[1]))     # stable: starts before ends among equals
        running = fresh = 0
        peak, at = 0, 0
        for when, _, delta, is_new in events:
            running += delta
            fresh += delta if is_new else 0
            judged = running if fresh > 0 else 0
            if judged > peak:
                peak, at = judged, when
        limit = max(rows[i]["limit"] for i in mine)
        if peak > limit:
            over[serial] = (rows[mine[0]]["account"], at, peak, limit)
    # A carried row's flag stays the one it was given (it kept it from
    # being charged); it is reported when it arrived, not again.
    return {"charged": charged, "backwards": [b and new[i] for i, b in enumerate(backwards)],
            "kind": kind, "first_row": first_row, "found": found, "late": late,
            "invalid": [not v for v in valid], "over": over}


row = st.fixed_dictionaries({
    "serial": st.integers(1, 4), "counter": st.integers(0, 6), "time": st.integers(0, 300),
    "token": st.integers(0, 2), "reason": st.sampled_from([0, 0, 0, 0, 3]),
    "amount": st.integers(1, 40), "limit": st.sampled_from([30, 60, 1000]),
    "upload_after": st.integers(0, 200), "gateway": st.integers(0, 2)})


@given(st.lists(row, max_size=24), st.integers(0, 6), st.data())
@settings(max_examples=600, deadline=None)
def test_settle_follows_the_model(rows: list[dict[str, int]], prior_rows: int,
                                  data: st.DataObject) -> None:
    n = len(rows)
    prior = min(prior_rows, n)
    for r in rows:
        r["uploaded"] = r["time"] + r["upload_after"]
        r["account"] = 1000 + r["serial"]
    flags = st.lists(st.booleans(), min_size=prior, max_size=prior)
    prior_charged, prior_flagged, prior_found = (data.draw(flags) for _ in range(3))
    floor_serials = data.draw(st.lists(st.integers(1, 4), unique=True, max_size=3))
    floor = {s: (data.draw(st.integers(0, 6)), data.draw(st.integers(0, 300)))
             for s in sorted(floor_serials)}
    records = np.zeros(n, dtype=RECORD_DTYPE)
    for i, r in enumerate(rows):
        records[i] = (i + 1, r["serial"], r["counter"], r["account"], r["amount"], 1,
                      r["reason"], r["time"], 0, r["limit"], r["token"], r["uploaded"])
    gateway = np.array([r["gateway"] for r in rows], dtype=np.int64)
    got = settle(records, gateway, SLACK, prior=prior,
                 prior_charged=np.array(prior_charged, dtype=np.bool_),
                 prior_flagged=np.array(prior_flagged, dtype=np.bool_),
                 prior_found=np.array(prior_found, dtype=np.bool_),
                 floor=Floor(np.array(list(floor), dtype=np.uint64),
                             np.array([c for c, _ in floor.values()], dtype=np.int64),
                             np.array([t for _, t in floor.values()], dtype=np.int64)))
    want = model(rows, gateway.tolist(), prior, prior_charged, prior_flagged, prior_found, floor)
    assert got.charged.tolist() == want["charged"]
    assert got.backwards.tolist() == want["backwards"]
    for name in ("clone", "duplicate", "double_spend"):
        assert getattr(got, name).tolist() == [k == name for k in want["kind"]], name
    assert got.first_row.tolist() == want["first_row"]
    assert got.found_behind.tolist() == want["found"]
    assert got.late.tolist() == want["late"]
    assert got.invalid.tolist() == want["invalid"]
    assert {int(s): (int(a), int(t), int(p), int(m)) for s, a, t, p, m in zip(
        got.over_serial, got.over_account, got.over_at, got.over_spent, got.over_limit)
            } == want["over"]


def test_a_serial_order_that_does_not_sort_the_rows_is_refused() -> None:
    records = np.zeros(4, dtype=RECORD_DTYPE)
    records["serial"] = [2, 1, 2, 1]
    gateway = np.zeros(4, dtype=np.int64)
    good = settle(records, gateway, serial_order=np.array([1, 3, 0, 2]))
    assert good.charged.tolist() == settle(records, gateway).charged.tolist()
    for bad in ([0, 1, 2, 3], [3, 1, 2, 0], [1, 3, 0, 0], [1, 3, 0, 4], [1, 3, 0]):
        with pytest.raises(ValueError, match="serial_order"):
            settle(records, gateway, serial_order=np.array(bad))
