"""qrpay.credit.freeze: history carried across closed periods. For any rows,
any cut and any later rows at or after it, history on everything equals
history on the kept rows plus the later ones with the frozen state, to the
bit (every field, NaN where NaN), at every `now` at or after the cut; and
freezing again and again composes. Checked with hypothesis on histories full
of equal times, exact due moments, credits and large amounts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qrpay.credit import CREDIT_DTYPE, CREDIT_STATE_DTYPE, DAY, freeze, history
from qrpay.errors import InvalidArgument

NOW = 1_800_000_000

Row = tuple[int, int, int]          # (account, time, amount)


def cols(rows: list[Row]) -> list[np.ndarray]:
    return [np.array([r[i] for r in rows], dtype=np.int64) for i in range(3)]


def hist(charges: list[Row], payments: list[Row], now: int, due_after: int,
         state: np.ndarray | None = None) -> np.ndarray:
    return history(*cols(charges), *cols(payments), now, due_after, state=state)


def fold(charges: list[Row], payments: list[Row], cut: int, due_after: int,
         state: np.ndarray | None = None) -> tuple[np.ndarray, list[Row], list[Row]]:
    """freeze, with the kept rows as lists in their order."""
    new, keep_c, keep_p = freeze(*cols(charges), *cols(payments), cut, due_after, state)
    assert new.dtype == CREDIT_STATE_DTYPE
    assert keep_c.dtype == keep_p.dtype == np.bool_
    assert len(keep_c) == len(charges) and len(keep_p) == len(payments)
    return (new, [r for r, k in zip(charges, keep_c) if k],
            [r for r, k in zip(payments, keep_p) if k])


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype == CREDIT_DTYPE
    assert got["account"].tolist() == want["account"].tolist()
    for name in CREDIT_DTYPE.names or ():
        assert np.array_equal(got[name], want[name], equal_nan=True), name
    assert got.tobytes() == want.tobytes()      # to the bit, NaN included


# Times in days plus 0-2 seconds after NOW: equal times, and due moments that
# fall exactly on a cut or on `now`, come up often.
accounts = st.integers(0, 4)
seconds = st.integers(0, 2)
amounts = st.one_of(st.integers(0, 500), st.integers(0, 2**56))   # 40 rows < 2**62
due_afters = st.sampled_from([0, 1, DAY, 3 * DAY, 7 * DAY, 7 * DAY + 1])


def rows(days: int, max_size: int, amount: st.SearchStrategy[int] = amounts
         ) -> st.SearchStrategy[list[Row]]:
    return st.lists(st.builds(lambda a, d, s, m: (a, NOW + d * DAY + s, m),
                              accounts, st.integers(0, days), seconds, amount),
                    max_size=max_size)


def later(cut: int, rows_: list[tuple[int, int, int, int]]) -> list[Row]:
    """(account, days, seconds, amount) after the cut: times >= cut."""
    return [(a, cut + d * DAY + s, m) for a, d, s, m in rows_]


offsets = st.lists(st.tuples(accounts, st.integers(0, 10), seconds, amounts), max_size=12)


@given(rows(20, 25), rows(20, 25), st.integers(0, 22), seconds, offsets, offsets,
       st.lists(st.tuples(st.integers(0, 25), seconds), min_size=1, max_size=3), due_afters)
@settings(max_examples=300)
def test_one_cut(charges: list[Row], payments: list[Row], cut_day: int, cut_second: int,
                 new_c: list[Any], new_p: list[Any], nows: list[tuple[int, int]],
                 due_after: int) -> None:
    cut = NOW + cut_day * DAY + cut_second
    c2, p2 = later(cut, new_c), later(cut, new_p)
    state, keep_c, keep_p = fold(charges, payments, cut, due_after)
    assert all(t >= cut for _, t, _ in keep_p)
    assert len(state) <= len({a for a, _, _ in charges + payments})
    for d, s in nows:
        now = cut + d * DAY + s
        assert_same(hist(keep_c + c2, keep_p + p2, now, due_after, state),
                    hist(charges + c2, payments + p2, now, due_after))


@given(st.lists(st.tuples(accounts, st.integers(0, 40), seconds, amounts, st.integers(0, 99)),
                max_size=30),
       st.lists(st.tuples(accounts, st.integers(0, 40), seconds, amounts, st.integers(0, 99)),
                max_size=30),
       st.integers(0, 5), st.lists(st.tuples(st.integers(0, 8), seconds), min_size=1,
                                   max_size=6),
       st.integers(0, 10), due_afters)
@settings(max_examples=200)
def test_repeated_cuts_compose(charge_rows: list[Any], pay_rows: list[Any], first_day: int,
                               steps: list[tuple[int, int]], now_days: int,
                               due_after: int) -> None:
    cuts = [NOW + first_day * DAY]
    for d, s in steps:
        cuts.append(cuts[-1] + d * DAY + s)        # non-decreasing, equal cuts too

    def arrivals(raw: list[Any]) -> list[list[Row]]:
        """Rows by the step that first passes them: a row passed after the
        k-th freeze has a time at or after the k-th cut."""
        out: list[list[Row]] = [[] for _ in range(len(cuts) + 1)]
        for a, d, s, m, pick in raw:
            t = NOW + d * DAY + s
            allowed = sum(c <= t for c in cuts)
            out[pick % (allowed + 1)].append((a, t, m))
        return out

    c_steps, p_steps = arrivals(charge_rows), arrivals(pay_rows)
    state: np.ndarray | None = None
    kept_c: list[Row] = []
    kept_p: list[Row] = []
    seen_c: list[Row] = []
    seen_p: list[Row] = []
    for k, cut in enumerate(cuts):
        kept_c, kept_p = kept_c + c_steps[k], kept_p + p_steps[k]
        seen_c, seen_p = seen_c + c_steps[k], seen_p + p_steps[k]
        state, kept_c, kept_p = fold(kept_c, kept_p, cut, due_after, state)
        assert_same(hist(kept_c, kept_p, cut, due_after, state),
                    hist(seen_c, seen_p, cut, due_after))
    now = cuts[-1] + now_days * DAY
    assert_same(hist(kept_c + c_steps[-1], kept_p + p_steps[-1], now, due_after, state),
                hist(seen_c + c_steps[-1], seen_p + p_steps[-1], now, due_after))


@given(rows(15, 15), rows(15, 15, st.integers(0, 2_000)), offsets, due_afters)
@settings(max_examples=150)
def test_credit_balances_carry(charges: list[Row], payments: list[Row], new_c: list[Any],
                               due_after: int) -> None:
    # Repayments up to 4x the charges: credits that pay charges made after the cut.
    cut = NOW + 16 * DAY
    state, keep_c, keep_p = fold(charges, payments, cut, due_after)
    assert keep_p == []                              # every repayment was before the cut
    c2 = later(cut, new_c)
    for now in (cut, cut + 5 * DAY, cut + 30 * DAY):
        assert_same(hist(keep_c + c2, [], now, due_after, state),
                    hist(charges + c2, payments, now, due_after))


def test_accounts_only_in_the_state_keep_their_row() -> None:
    t = NOW
    charges = [(1, t, 100), (2, t + 3 * DAY, 40)]
    payments = [(1, t + DAY, 100), (2, t + 12 * DAY, 40), (3, t + 2 * DAY, 70)]
    cut = t + 20 * DAY
    state, keep_c, keep_p = fold(charges, payments, cut, 7 * DAY)
    assert keep_c == [] and keep_p == []             # everything is folded
    assert state["account"].tolist() == [1, 2, 3]
    rows_ = hist([], [], cut, 7 * DAY, state)
    assert_same(rows_, hist(charges, payments, cut, 7 * DAY))
    r1, r2, r3 = rows_
    assert (r1["charges"], r1["late_charges"], r1["on_time_share"]) == (1, 0, 1.0)
    assert (r2["late_charges"], r2["max_days_late"], r2["on_time_share"]) == (1, 2, 0.0)
    assert (r3["charged"], r3["balance"], r3["charges"]) == (0, -70, 0)
    assert np.isnan(r3["on_time_share"])
    # Frozen with nothing new: the same state, a later cut.
    again, keep_c2, keep_p2 = freeze(*cols([]), *cols([]), cut + DAY, 7 * DAY, state)
    assert not len(keep_c2) and not len(keep_p2)
    assert again[["charged", "repaid", "late_charges"]].tolist() == \
        state[["charged", "repaid", "late_charges"]].tolist()
    assert set(again["cut"].tolist()) == {cut + DAY}


def test_what_is_frozen_and_what_is_kept() -> None:
    t = NOW
    due = 7 * DAY
    charges = [(1, t, 100),                # paid at t + 1 s, due t + 7 d: folded once due < cut
               (1, t + DAY, 50),           # paid only at the cut itself: kept
               (2, t, 0)]                  # nothing repaid before the cut: kept (a later
    payments = [(1, t + 1, 100), (1, t + 8 * DAY, 50)]   # repayment decides when it is paid)
    cut = t + 8 * DAY
    # The first charge's due moment is t + 7 d < cut, and it is paid: folded.
    state, keep_c, keep_p = fold(charges, payments, cut, due)
    assert keep_c == charges[1:] and keep_p == payments[1:]
    assert state[["account", "charged", "charges", "repaid", "repayments"]].tolist() == \
        [(1, 100, 1, 100, 1)]
    # A cut exactly at the due moment folds nothing: a `now` at the cut does
    # not yet see the charge fallen due (due < now is strict).
    state, keep_c, _ = fold(charges, payments, t + due, due)
    assert keep_c == charges and state["charges"].tolist() == [0]
    state, keep_c, _ = fold(charges, payments, t + due + 1, due)
    assert keep_c == charges[1:]
    # The zero charge becomes late once a repayment comes after its due moment.
    p2 = [(2, t + 9 * DAY, 5)]
    for cut in (t + 8 * DAY, t + 9 * DAY):
        state, keep_c, keep_p = fold(charges, payments, cut, due)
        assert (2, t, 0) in keep_c
        assert_same(hist(keep_c, keep_p + p2, t + 20 * DAY, due, state),
                    hist(charges, payments + p2, t + 20 * DAY, due))
    # A repayment of 0 before the cut pays a charge of 0 then, on time: the
    # state remembers that one came, though it adds nothing.
    charges, payments = [(2, t + 5 * DAY, 0)], [(2, t, 0)]
    state, keep_c, keep_p = fold(charges, payments, t + 6 * DAY, due)
    assert keep_c == charges and keep_p == []
    assert state[["repaid", "repayments"]].tolist() == [(0, 1)]
    p3 = [(2, t + 15 * DAY, 5)]                      # after the charge's due moment
    got = hist(keep_c, p3, t + 20 * DAY, due, state)
    assert_same(got, hist(charges, payments + p3, t + 20 * DAY, due))
    assert (got["late_charges"][0], got["max_days_late"][0]) == (0, 0)


def test_ties_keep_the_given_order() -> None:
    # Two charges at one moment: which one the first repayment covers (and so
    # which is on time) follows the order given, with and without a freeze.
    t = NOW
    payments = [(1, t + DAY, 100), (1, t + 9 * DAY, 50)]
    for charges, share in (([(1, t, 100), (1, t, 50)], 100 / 150),
                           ([(1, t, 50), (1, t, 100)], 50 / 150)):
        state, keep_c, keep_p = fold(charges, payments, t + 10 * DAY, 7 * DAY)
        assert keep_c == [] and keep_p == []
        got = hist([(1, t + 10 * DAY, 7)], [], t + 30 * DAY, 7 * DAY, state)
        assert_same(got, hist(charges + [(1, t + 10 * DAY, 7)], payments, t + 30 * DAY,
                              7 * DAY))
        assert got["on_time_share"][0] == pytest.approx(share * 150 / 157)
    # One charge folded and its twin at the same moment kept (not yet paid).
    charges = [(1, t, 100), (1, t, 50)]
    state, keep_c, keep_p = fold(charges, payments[:1], t + 8 * DAY, 7 * DAY)
    assert keep_c == [(1, t, 50)] and keep_p == []
    assert_same(hist(keep_c, payments[1:], t + 30 * DAY, 7 * DAY, state),
                hist(charges, payments, t + 30 * DAY, 7 * DAY))


def test_large_amounts_and_the_limit_with_the_state() -> None:
    t = NOW
    big = 2**60
    charges = [(1, t, big), (2, t, big), (1, t + DAY, big - 1)]
    payments = [(1, t + DAY, 2 * big), (2, t + 2 * DAY, big)]
    state, keep_c, keep_p = fold(charges, payments, t + 20 * DAY, 7 * DAY)
    assert keep_c == [] and int(state["charged"].sum()) == 3 * big - 1
    assert_same(hist(keep_c, keep_p, t + 20 * DAY, 7 * DAY, state),
                hist(charges, payments, t + 20 * DAY, 7 * DAY))
    # With one more charge of 2**60 the charges add up to 2**62: refused
    # whether the first three are rows or frozen.
    more = [(2, t + 21 * DAY, big + 1)]
    with pytest.raises(InvalidArgument):
        hist(charges + more, payments, t + 30 * DAY, 7 * DAY)
    with pytest.raises(InvalidArgument):
        hist(more, [], t + 30 * DAY, 7 * DAY, state)
    with pytest.raises(InvalidArgument):
        fold(more, [], t + 30 * DAY, 7 * DAY, state)
    with pytest.raises(InvalidArgument):
        hist([], [(3, t + 21 * DAY, 2 * big)], t + 30 * DAY, 7 * DAY, state)


def test_bad_state_and_arguments() -> None:
    t = NOW
    state, _, _ = fold([(1, t, 10)], [(1, t, 10)], t + 10 * DAY, 7 * DAY)
    assert len(state) == 1
    z = cols([])
    for bad in (np.zeros(1, dtype=CREDIT_DTYPE), state.tolist(), state.reshape(1, 1),
                np.zeros(1, dtype=[("account", "<u8")])):
        with pytest.raises(InvalidArgument):
            history(*z, *z, t + 10 * DAY, 7 * DAY, state=bad)
        with pytest.raises(InvalidArgument):
            freeze(*z, *z, t + 10 * DAY, 7 * DAY, bad)
    # Frozen with one due_after, asked with another.
    with pytest.raises(InvalidArgument):
        history(*z, *z, t + 10 * DAY, 3 * DAY, state=state)
    with pytest.raises(InvalidArgument):
        freeze(*z, *z, t + 11 * DAY, 3 * DAY, state)
    # The frozen part cannot answer for a moment before its cut.
    with pytest.raises(InvalidArgument):
        history(*z, *z, t + 10 * DAY - 1, 7 * DAY, state=state)
    with pytest.raises(InvalidArgument):
        freeze(*z, *z, t + 10 * DAY - 1, 7 * DAY, state)
    # A repayment before the cut is in the state already: not again.
    with pytest.raises(InvalidArgument):
        hist([], [(1, t, 10)], t + 10 * DAY, 7 * DAY, state)
    two = np.concatenate([state, state])
    two["account"] = [5, 2]
    negative = state.copy()
    negative["repaid"] = -1
    cuts = two.copy()
    cuts["account"], cuts["cut"][1] = [2, 5], t
    for bad in (two, negative, cuts):
        with pytest.raises(InvalidArgument):
            history(*z, *z, t + 10 * DAY, 7 * DAY, state=bad)
    for cut in (-1, True, 1.5, 2**40 + 1):
        with pytest.raises(InvalidArgument):
            freeze(*z, *z, cut, 7 * DAY)
    # None and an empty state are the same as no state.
    empty, keep_c, keep_p = freeze(*z, *z, t, 7 * DAY)
    assert empty.dtype == CREDIT_STATE_DTYPE and not len(empty)
    assert not len(keep_c) and not len(keep_p)
    assert_same(hist([(1, t, 5)], [], t, 7 * DAY, empty), hist([(1, t, 5)], [], t, 7 * DAY))


def test_daily_freezes_keep_the_live_rows_bounded() -> None:
    # 300 accounts, a charge a day each for 60 days, each account repaying
    # everything it owes once a week (on its own weekday). Closing every day:
    # what stays live is the last week or so of charges, not the 60 days.
    rng = np.random.default_rng(7)
    n, days, due = 300, 60, 7 * DAY
    account = np.arange(n, dtype=np.int64)
    weekday = rng.integers(0, 7, n)
    amount = rng.integers(100, 800, (days, n))
    owed_by = np.cumsum(amount, axis=0)          # charged up to and including each day
    state: np.ndarray | None = None
    kept_c = [np.zeros(0, dtype=np.int64)] * 3
    kept_p = [np.zeros(0, dtype=np.int64)] * 3
    every_c: list[list[np.ndarray]] = []
    every_p: list[list[np.ndarray]] = []
    live = []
    for day in range(days):
        c = [account, NOW + day * DAY + rng.integers(0, 6 * 3600, n), amount[day]]
        payers = weekday == day % 7
        paid_before = np.where(day >= 7, owed_by[max(day - 7, 0)], 0)
        p = [account[payers], NOW + day * DAY + 20 * 3600 + np.zeros(payers.sum(), np.int64),
             (owed_by[day] - paid_before)[payers]]
        every_c.append(c)
        every_p.append(p)
        kept_c = [np.r_[k, x] for k, x in zip(kept_c, c)]
        kept_p = [np.r_[k, x] for k, x in zip(kept_p, p)]
        state, keep_c, keep_p = freeze(*kept_c, *kept_p, NOW + (day + 1) * DAY, due, state)
        kept_c = [x[keep_c] for x in kept_c]
        kept_p = [x[keep_p] for x in kept_p]
        live.append(len(kept_c[0]) + len(kept_p[0]))
    assert state is not None and len(state) == n
    # A charge is paid within 6 days and folded once it fell due before the
    # cut: what stays live is each account's last 7 charges, from day 7 on.
    assert live[:7] == [n * (day + 1) for day in range(7)]
    assert live[7:] == [7 * n] * (days - 7)
    assert int(state["charges"].sum()) + len(kept_c[0]) == n * days
    everything = [np.concatenate(x) for x in zip(*every_c)], \
        [np.concatenate(x) for x in zip(*every_p)]
    for now in (NOW + days * DAY, NOW + (days + 9) * DAY):
        assert_same(history(*kept_c, *kept_p, now, due, state=state),
                    history(*everything[0], *everything[1], now, due))
