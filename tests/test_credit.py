"""qrpay.credit: repayment behaviour per account, against a plain per-account
reference written here (one loop per charge, repayments applied oldest
charge first), by hand, on hypothesis-generated histories, and through
Settlement.credit_history."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qrpay import DeviceKey, GatewayKey, IssuerKey, Scene, TokenGenerator, TrustStore
from qrpay.credit import CREDIT_DTYPE, DAY, history
from qrpay.errors import InvalidArgument
from qrpay.gateway import Gateway, GatewayPolicy
from stores import open_settlement

NOW = 1_800_000_000


def reference(charges: list[tuple[int, int, int]], payments: list[tuple[int, int, int]],
              now: int, due_after: int) -> dict[int, dict[str, Any]]:
    """(account, time, amount) lists in, one dict per account out."""
    out: dict[int, dict[str, Any]] = {}
    accounts = {a for a, t, _ in charges if t <= now} | {a for a, t, _ in payments if t <= now}
    for account in sorted(accounts):
        mine = sorted(((t, m) for a, t, m in charges if a == account and t <= now),
                      key=lambda x: x[0])
        paid = sorted(((t, m) for a, t, m in payments if a == account and t <= now),
                      key=lambda x: x[0])
        repaid = sum(m for _, m in paid)
        row = {"charged": sum(m for _, m in mine), "repaid": repaid, "overdue": 0,
               "days_past_due": 0, "max_days_late": 0, "charges": len(mine),
               "late_charges": 0}
        row["balance"] = row["charged"] - repaid
        running, due_amount, on_time = 0, 0, 0
        for t, m in mine:
            running += m
            due = t + due_after
            # When the repayments, oldest charge first, first cover this one.
            total, paid_at = 0, None
            for pt, pm in paid:
                total += pm
                if total >= running:
                    paid_at = pt
                    break
            if due >= now:
                continue                       # not fallen due yet
            due_amount += m
            unpaid = running > repaid
            if unpaid:
                row["overdue"] += min(running - repaid, m)
                row["days_past_due"] = max(row["days_past_due"], (now - due) // DAY)
            late = unpaid or (paid_at is not None and paid_at > due)
            if late:
                row["late_charges"] += 1
                end = now if unpaid else paid_at
                assert end is not None
                row["max_days_late"] = max(row["max_days_late"], (end - due) // DAY)
            else:
                on_time += m
        row["on_time_share"] = on_time / due_amount if due_amount else math.nan
        out[account] = row
    return out


def as_dicts(rows: np.ndarray) -> dict[int, dict[str, Any]]:
    return {int(r["account"]): {name: (float(r[name]) if name == "on_time_share"
                                       else int(r[name]))
                                for name in CREDIT_DTYPE.names if name != "account"}
            for r in rows}


def run(charges: list[tuple[int, int, int]], payments: list[tuple[int, int, int]], now: int,
        due_after: int = 7 * DAY) -> np.ndarray:
    def cols(rows: list[tuple[int, int, int]]) -> list[np.ndarray]:
        return [np.array([r[i] for r in rows], dtype=np.int64) for i in range(3)]
    return history(*cols(charges), *cols(payments), now, due_after)


def same(got: dict[int, dict[str, Any]], want: dict[int, dict[str, Any]]) -> bool:
    if got.keys() != want.keys():
        return False
    for account, row in want.items():
        for name, value in row.items():
            other = got[account][name]
            if isinstance(value, float) and math.isnan(value):
                if not math.isnan(other):
                    return False
            elif (abs(other - value) > 1e-12 if isinstance(value, float) else other != value):
                return False
    return True


def test_by_hand() -> None:
    day = DAY
    charges = [(7, NOW, 300), (7, NOW + day, 200), (7, NOW + 2 * day, 100),
               (8, NOW, 50), (9, NOW + 30 * day, 10)]
    payments = [(7, NOW + 5 * day, 300),      # the first charge, on time
                (7, NOW + 10 * day, 150),     # part of the second, late
                (8, NOW + 1 * day, 80)]       # more than owed: a credit
    rows = run(charges, payments, NOW + 20 * day)
    assert rows["account"].tolist() == [7, 8]   # account 9's charge is after `now`
    r7, r8 = rows
    assert (r7["charged"], r7["repaid"], r7["balance"]) == (600, 450, 150)
    # The second charge (due day 8) is 50 short, the third (due day 9) unpaid.
    assert r7["overdue"] == 150 and r7["days_past_due"] == 20 - 8
    assert r7["max_days_late"] == 20 - 8 and r7["late_charges"] == 2
    assert r7["on_time_share"] == pytest.approx(300 / 600)
    assert (r8["balance"], r8["overdue"], r8["late_charges"]) == (-30, 0, 0)
    assert r8["on_time_share"] == 1.0
    # Before anything fell due: nothing late, the on-time share unknown.
    early = run(charges, payments, NOW + 3 * day)
    assert early["overdue"].tolist() == [0, 0] and np.isnan(early["on_time_share"][0])
    # Repaid late but in full: not overdue now, and the lateness is remembered.
    paid_up = run(charges, payments + [(7, NOW + 40 * day, 150)], NOW + 50 * day)
    assert (paid_up["overdue"][0], paid_up["days_past_due"][0]) == (0, 0)
    assert paid_up["max_days_late"][0] == 40 - 8 and paid_up["late_charges"][0] == 2
    assert same(as_dicts(rows), reference(charges, payments, NOW + 20 * day, 7 * day))


def test_an_exact_repayment_pays_the_charge_at_that_moment() -> None:
    rows = run([(1, NOW, 100)], [(1, NOW + 7 * DAY, 100)], NOW + 9 * DAY)
    assert rows["late_charges"][0] == 0 and rows["on_time_share"][0] == 1.0
    rows = run([(1, NOW, 100)], [(1, NOW + 7 * DAY + 1, 100)], NOW + 9 * DAY)
    assert rows["late_charges"][0] == 1 and rows["max_days_late"][0] == 0


def test_empty_and_bad_input() -> None:
    assert len(run([], [], NOW)) == 0 and run([], [], NOW).dtype == CREDIT_DTYPE
    z = np.zeros(1, dtype=np.int64)
    with pytest.raises(InvalidArgument):
        history(z, z, z[:0], z, z, z, NOW)                       # lengths differ
    with pytest.raises(InvalidArgument):
        history(z, z, -np.ones(1, dtype=np.int64), z, z, z, NOW)  # negative amount
    with pytest.raises(InvalidArgument):
        history(z, z, np.ones(1), z, z, z, NOW)                  # floats
    with pytest.raises(InvalidArgument):
        history(z, z, np.full(3, 2**61), np.zeros(3, dtype=np.int64),
                np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64), NOW)  # sum overflows
    for now, due_after in ((-1, 0), (NOW, -1), (True, 0), (NOW, 2**40)):
        with pytest.raises(InvalidArgument):
            history(z, z, z, z, z, z, now, due_after)


events = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 60), st.integers(0, 500)),
                  max_size=30)


@given(events, events, st.integers(0, 70), st.integers(0, 20))
@settings(max_examples=300)
def test_matches_the_reference(charges: list[tuple[int, int, int]],
                               payments: list[tuple[int, int, int]], now_day: int,
                               due_days: int) -> None:
    # Times in days plus a few seconds, so equal times and exact due moments occur.
    def timed(rows: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        return [(a, NOW + t * DAY + (t % 3), m) for a, t, m in rows]
    charges, payments = timed(charges), timed(payments)
    now, due_after = NOW + now_day * DAY, due_days * DAY
    got = as_dicts(run(charges, payments, now, due_after))
    assert same(got, reference(charges, payments, now, due_after))


def test_amounts_near_the_limit_match_the_reference() -> None:
    # Charges and repayments each adding up to just under 2**62, over a few
    # accounts: the FIFO search lifts every account's totals above the last
    # one's, and must not wrap.
    big = (2**62 - 1) // 7
    charges = [(a, NOW + (i + a) * DAY, big - i) for a in range(3) for i in range(2)] + [
        (3, NOW, big)]
    payments = [(0, NOW + 2 * DAY, big), (0, NOW + 9 * DAY, big - 1), (1, NOW + DAY, 2 * big),
                (2, NOW + 20 * DAY, big - 5), (4, NOW, big)]
    assert sum(m for *_, m in charges) < 2**62 and sum(m for *_, m in payments) < 2**62
    now = NOW + 30 * DAY
    assert same(as_dicts(run(charges, payments, now, 3 * DAY)),
                reference(charges, payments, now, 3 * DAY))


def test_a_million_charges_agree_with_the_reference_on_a_sample() -> None:
    rng = np.random.default_rng(5)
    n, m = 1_000_000, 200_000
    c = [rng.integers(0, 50_000, n), NOW + rng.integers(0, 60 * DAY, n),
         rng.integers(100, 500, n)]
    p = [rng.integers(0, 50_000, m), NOW + rng.integers(0, 70 * DAY, m),
         rng.integers(100, 3_000, m)]
    rows = history(*c, *p, NOW + 65 * DAY)
    assert len(rows) == len(np.unique(np.r_[c[0], p[0]]))
    assert rows["charged"].sum() == c[2].sum()
    for account in (0, 17, 4242, 49_999):
        pick_c, pick_p = c[0] == account, p[0] == account
        want = reference(list(zip(*(x[pick_c].tolist() for x in c))),
                         list(zip(*(x[pick_p].tolist() for x in p))), NOW + 65 * DAY, 7 * DAY)
        got = as_dicts(rows[rows["account"] == account])
        assert same(got, want)


@pytest.mark.usefixtures("each_store")
def test_settlement_credit_history(tmp_path: Path) -> None:
    issuer = IssuerKey(bytes(range(32)))
    trust = TrustStore()
    trust.add(issuer.public)
    device = DeviceKey(bytes(range(32, 64)))
    phone = TokenGenerator(issuer.issue(account=42, device_public=device.public, limit=5_000,
                                        scenes=[Scene.BUS], not_before=NOW - 60,
                                        not_after=NOW + 30 * DAY), device)
    key = GatewayKey(bytes(range(64, 96)))
    settlement = open_settlement(tmp_path / "s", trust, [key.public])
    with Gateway(tmp_path / "g", key, trust, GatewayPolicy(deny_list_max_age=None)) as bus:
        token = phone.make(Scene.BUS, NOW)
        bus.scan(token, 200, Scene.BUS, NOW)
        bus.scan(phone.make(Scene.BUS, NOW + DAY), 300, Scene.BUS, NOW + DAY)
        batch = bus.export_batch(now=NOW + DAY)
        assert batch is not None
        settlement.ingest(batch)
    settlement.record_repayment(42, 200, NOW + 2 * DAY, "r1")
    settlement.record_repayment(7, 50, NOW + 2 * DAY, "r2")    # no charges: a credit
    [r42] = settlement.credit_history(NOW + 20 * DAY)[1:]
    assert (r42["account"], r42["charged"], r42["repaid"], r42["overdue"]) == (42, 500, 200, 300)
    assert r42["days_past_due"] == 20 - 8 and r42["on_time_share"] == pytest.approx(0.4)
    r7 = settlement.credit_history(NOW + 20 * DAY)[0]
    assert (r7["account"], r7["balance"], r7["charges"]) == (7, -50, 0)
    # Due later: nothing overdue yet.
    assert settlement.credit_history(NOW + 20 * DAY, due_after=30 * DAY)["overdue"].sum() == 0
