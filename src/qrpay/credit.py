"""Repayment behaviour per account, from charges and repayments: the "pay
later" half of ride first, pay later, as numpy arrays.

Every charge falls due `due_after` seconds after its scan. Repayments pay off
an account's charges oldest first (a repayment larger than what is owed
leaves a credit that pays the next charges as they come). At a moment `now`,
counting only charges scanned and repayments made at or before `now`, each
account gets one row of CREDIT_DTYPE:

- charged, repaid, balance (charged - repaid; negative is a credit);
- overdue: the unpaid part of the charges that fell due before `now`;
- days_past_due: whole days since the oldest unpaid charge fell due (0 if none);
- max_days_late: the most whole days any charge that fell due was paid late,
  or has been unpaid so far;
- on_time_share: of the amount that fell due, the share paid in full by its
  due time (NaN when nothing has fallen due yet);
- charges, late_charges: how many charges, and how many of those that fell
  due were paid late or are unpaid.

All of it is sorts, cumulative sums and reductions: no per-account loop.
docs/SETTLEMENT.md (Repayments) shows how it feeds a scorecard.

Closed periods: `freeze` folds what no later row can change into one
CREDIT_STATE_DTYPE row per account, and says which rows must still be kept.
`history(..., state=state)` on the kept rows plus any rows at or after the
cut equals `history` on every row, for every `now` at or after the cut, so the
live state grows with the accounts and their open charges, not with the days.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from qrpay import _args
from qrpay._segments import distinct, reduce_by_group, running_total, starts
from qrpay.errors import InvalidArgument

DAY: Final = 86_400
DEFAULT_DUE_AFTER: Final = 7 * DAY

CREDIT_DTYPE: Final = np.dtype([
    ("account", "<u8"), ("charged", "<i8"), ("repaid", "<i8"), ("balance", "<i8"),
    ("overdue", "<i8"), ("days_past_due", "<i8"), ("max_days_late", "<i8"),
    ("on_time_share", "<f8"), ("charges", "<i8"), ("late_charges", "<i8"),
])

TOTAL_LIMIT: Final = 2**62   # amounts of one kind must add up to less: every sum stays int64

# What freeze folded, per account: all of it before `cut`, every charge in it
# fallen due and paid in full, so only sums, counts and a maximum remain.
CREDIT_STATE_DTYPE: Final = np.dtype([
    ("account", "<u8"),
    ("due_after", "<i8"),        # the due_after it was frozen with (history must match)
    ("cut", "<i8"),              # valid for now >= cut; the same in every row
    ("charged", "<i8"),          # amount of the folded charges (all fell due, all paid)
    ("charges", "<i8"),          # how many
    ("on_time", "<i8"),          # amount of those paid in full by their due time
    ("late_charges", "<i8"),     # how many were paid late
    ("max_days_late", "<i8"),    # most whole days one of them was paid late
    ("repaid", "<i8"),           # every repayment before the cut, added up
    ("repayments", "<i8"),       # how many (a repayment of 0 still pays a charge of 0)
])

_STATE_NUMBERS: Final = tuple(name for name in CREDIT_STATE_DTYPE.fields or ()
                              if name != "account")

Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Rows = npt.NDArray[np.void]
Columns = tuple[npt.NDArray[np.uint64], Ints, Ints]


def history(charge_account: npt.ArrayLike, charge_time: npt.ArrayLike,
            charge_amount: npt.ArrayLike, pay_account: npt.ArrayLike,
            pay_time: npt.ArrayLike, pay_amount: npt.ArrayLike, now: int,
            due_after: int = DEFAULT_DUE_AFTER, *, state: Rows | None = None) -> Rows:
    """One CREDIT_DTYPE row per account that has a charge or a repayment at or
    before `now`, sorted by account. Amounts and times are non-negative integers.

    With `state` from freeze: its accounts' frozen history counts too. Pass
    the rows freeze kept plus rows at or after its cut, the same due_after,
    and a `now` at or after the cut (InvalidArgument otherwise)."""
    if (isinstance(now, bool) or not isinstance(now, (int, np.integer))
            or not 0 <= now <= 2**40):
        raise InvalidArgument("now must be an integer number of seconds in [0, 2**40]")
    if (isinstance(due_after, bool) or not isinstance(due_after, (int, np.integer))
            or not 0 <= due_after < 2**40):
        raise InvalidArgument("due_after must be a non-negative number of seconds")
    now, due_after = int(now), int(due_after)
    c, p, frozen = _inputs(charge_account, charge_time, charge_amount, pay_account, pay_time,
                           pay_amount, due_after, state)
    if len(frozen) and now < frozen["cut"][0]:
        raise InvalidArgument(f"the state holds history up to {int(frozen['cut'][0])}: "
                              f"now must not be earlier, not {now}")
    f = _fifo(c, p, now, frozen)
    n = len(f.accounts)
    out = np.zeros(n, dtype=CREDIT_DTYPE)
    out["account"] = f.accounts
    out["on_time_share"] = np.nan
    if not n:
        return out
    s = _aligned(frozen, f.accounts)        # zeros where nothing is frozen
    cg, c_amount = f.cg, f.amount

    charged = _group_sum(cg, c_amount, n) + s["charged"]
    out["charged"], out["repaid"], out["balance"] = charged, f.repaid, charged - f.repaid
    out["charges"] = np.bincount(cg, minlength=n) + s["charges"]

    due = f.time + due_after
    fell_due = due < now
    unpaid = f.total > f.repaid[cg]
    owed = np.minimum(f.total - f.repaid[cg], c_amount).clip(min=0)
    late = fell_due & (unpaid | (f.paid_at > due))
    late_seconds = np.where(unpaid, now, f.paid_at) - due
    days_late = np.where(late, late_seconds // DAY, 0)

    # Frozen charges fell due and are paid: nothing overdue, no days past due.
    out["overdue"] = _group_sum(cg, np.where(fell_due, owed, 0), n)
    out["days_past_due"] = _group_max(cg, np.where(fell_due & unpaid, days_late, 0), n)
    out["max_days_late"] = np.maximum(_group_max(cg, days_late, n), s["max_days_late"])
    out["late_charges"] = (np.bincount(cg, weights=late, minlength=n).astype(np.int64)
                           + s["late_charges"])
    due_total = _group_sum(cg, np.where(fell_due, c_amount, 0), n) + s["charged"]
    on_time = _group_sum(cg, np.where(fell_due & ~late, c_amount, 0), n) + s["on_time"]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["on_time_share"] = np.where(due_total > 0, on_time / np.maximum(due_total, 1),
                                        np.nan)
    return out


def freeze(charge_account: npt.ArrayLike, charge_time: npt.ArrayLike,
           charge_amount: npt.ArrayLike, pay_account: npt.ArrayLike,
           pay_time: npt.ArrayLike, pay_amount: npt.ArrayLike, cut: int,
           due_after: int = DEFAULT_DUE_AFTER, state: Rows | None = None
           ) -> tuple[Rows, Bools, Bools]:
    """Fold what can never change again into per-account state. Returns
    (new_state, keep_charges, keep_repayments): boolean masks over the given
    charges and repayments of the rows that must be kept as rows.

    A charge is folded when it is paid in full by repayments before `cut` and
    fell due before `cut` (time + due_after < cut): rows added later are at or
    after the cut, so they cannot change when it was paid, whether that was
    late, or that every `now >= cut` sees it fallen due. Every repayment
    before `cut` is folded into its account's sum: a kept charge it pays in
    full is paid before the cut but falls due at or after it, so only "paid
    on time" follows, whatever the exact moment. With `state`, the rows given
    are the ones the last freeze kept plus rows at or after its cut, and `cut`
    is not earlier than its cut. (An empty state holds nothing to check.)"""
    cut = _args.integer("cut", cut, 0, 2**40)
    due_after = _args.integer("due_after", due_after, 0, 2**40 - 1)
    c, p, frozen = _inputs(charge_account, charge_time, charge_amount, pay_account, pay_time,
                           pay_amount, due_after, state)
    if len(frozen) and cut < frozen["cut"][0]:
        raise InvalidArgument(f"cut {cut} is before the state's cut {int(frozen['cut'][0])}")
    # History as of just before the cut: rows at the cut or later change nothing folded.
    f = _fifo(c, p, cut - 1, frozen)
    n = len(f.accounts)
    due = f.time + due_after
    fold = (f.paid_at >= 0) & (due < cut)     # a prefix of each account's charges
    late = f.paid_at > due
    days_late = np.where(late, (f.paid_at - due) // DAY, 0)
    cg, amount = f.cg[fold], f.amount[fold]
    keep_c = np.ones(len(c[0]), dtype=np.bool_)
    keep_c[f.row[fold]] = False
    keep_p = p[1] >= cut

    new = _aligned(frozen, f.accounts)
    new["account"] = f.accounts
    new["due_after"], new["cut"] = due_after, cut
    new["charged"] += _group_sum(cg, amount, n)
    new["charges"] += np.bincount(cg, minlength=n)
    new["on_time"] += _group_sum(cg, np.where(late[fold], 0, amount), n)
    new["late_charges"] += np.bincount(cg, weights=late[fold], minlength=n).astype(np.int64)
    new["max_days_late"] = np.maximum(new["max_days_late"], _group_max(cg, days_late[fold], n))
    pg = np.searchsorted(f.accounts, p[0][~keep_p])
    order = np.argsort(pg, kind="stable")
    new["repaid"] += _group_sum(pg[order], p[2][~keep_p][order], n)
    new["repayments"] += np.bincount(pg, minlength=n)
    known = np.zeros(n, dtype=np.bool_)
    known[np.searchsorted(f.accounts, frozen["account"])] = True
    return new[known | (new["charges"] > 0) | (new["repayments"] > 0)], keep_c, keep_p


class _Fifo(NamedTuple):
    """Charges at or before `now` in FIFO order (by account, then time), with
    what the frozen state adds."""

    accounts: npt.NDArray[np.uint64]   # every account with a row or frozen history
    row: Ints          # each charge's index among the given charges
    cg: Ints           # its dense account index
    time: Ints
    amount: Ints
    total: Ints        # running total of the account's charges, frozen ones first
    paid_at: Ints      # when repayments first covered `total`; -1 if not yet
    repaid: Ints       # per account: repayments at or before `now`, frozen ones included


def _fifo(c: Columns, p: Columns, now: int, frozen: Rows) -> _Fifo:
    row = np.flatnonzero(c[1] <= now)
    c_acct, c_time, c_amount = c[0][row], c[1][row], c[2][row]
    keep = p[1] <= now
    # The frozen repayments act as one repayment at time 0, first among
    # equals: they all came before the cut, and whatever of a kept charge
    # they paid was paid before it fell due (else it would be frozen).
    early = frozen[frozen["repayments"] > 0]
    p_acct = np.concatenate([early["account"], p[0][keep]])
    p_time = np.concatenate([np.zeros(len(early), dtype=np.int64), p[1][keep]])
    p_amount = np.concatenate([early["repaid"], p[2][keep]])

    accounts = distinct(np.concatenate([c_acct, p_acct, frozen["account"]]))
    n = len(accounts)
    # Charges oldest first per account, and their running total within it,
    # which starts after the frozen charges.
    cg = np.searchsorted(accounts, c_acct)   # dense account index of each row
    order = _by_group_then_time(cg, c_time)
    row, cg, c_time, c_amount = row[order], cg[order], c_time[order], c_amount[order]
    pg = np.searchsorted(accounts, p_acct)
    total = running_total(cg, c_amount) + _aligned(frozen, accounts)["charged"][cg]
    order = np.lexsort((p_time, pg))
    pg, p_time, p_amount = pg[order], p_time[order], p_amount[order]
    P = running_total(pg, p_amount)
    # A charge is paid in full at the first repayment whose running total
    # reaches the charge's: merge both running totals per account (charges
    # first on a tie, so an exactly equal repayment counts) and look ahead.
    paid_at = _paid_in_full_at(cg, total, pg, P, p_time)
    return _Fifo(accounts, row, cg, c_time, c_amount, total, paid_at,
                 _group_sum(pg, p_amount, n))


def _by_group_then_time(group: Ints, time: Ints) -> Ints:
    """np.lexsort((time, group)): as one stable sort of a single key where it
    fits in int64. The stable sort takes runs already in order (charges a
    close stored by account and time) as they are, where lexsort sorts all
    over again."""
    if not len(group):
        return np.zeros(0, dtype=np.int64)
    low, span = int(time.min()), int(time.max()) - int(time.min()) + 1
    if (int(group.max()) + 1) * span >= 2**63:
        return np.lexsort((time, group))
    return np.argsort(group * span + (time - low), kind="stable")


def _inputs(charge_account: npt.ArrayLike, charge_time: npt.ArrayLike,
            charge_amount: npt.ArrayLike, pay_account: npt.ArrayLike,
            pay_time: npt.ArrayLike, pay_amount: npt.ArrayLike, due_after: int,
            state: Rows | None) -> tuple[Columns, Columns, Rows]:
    """The checked columns and state (empty for None), with the 2**62 limit on
    the totals the state and the rows make together."""
    c = _columns("charge", charge_account, charge_time, charge_amount)
    p = _columns("repayment", pay_account, pay_time, pay_amount)
    frozen = _state(state, due_after)
    if not len(frozen):
        return c, p, frozen
    for what, name, amount in (("charge", "charged", c[2]), ("repayment", "repaid", p[2])):
        if (float(frozen[name].astype(np.float64).sum())
                + float(amount.astype(np.float64).sum())) >= TOTAL_LIMIT:
            raise InvalidArgument(f"{what} amounts and the state's must add up to less "
                                  "than 2**62")
    if p[1].size and p[1].min() < frozen["cut"][0]:
        # They are in the state already: counting them again would pay twice.
        raise InvalidArgument("repayments before the state's cut are folded into it already")
    return c, p, frozen


def _state(state: object, due_after: int) -> Rows:
    if state is None:
        return np.zeros(0, dtype=CREDIT_STATE_DTYPE)
    if (not isinstance(state, np.ndarray) or state.dtype != CREDIT_STATE_DTYPE
            or state.ndim != 1):
        raise InvalidArgument("state must be a 1-D CREDIT_STATE_DTYPE array, as freeze returns")
    if not len(state):
        return state
    if any(state[name].min() < 0 for name in _STATE_NUMBERS):
        raise InvalidArgument("state fields must be non-negative")
    if np.any(state["account"][1:] <= state["account"][:-1]):
        raise InvalidArgument("state must have one row per account, sorted by account")
    if np.any(state["cut"] != state["cut"][0]) or state["cut"][0] > 2**40:
        raise InvalidArgument("state rows must share one cut in [0, 2**40]")
    if np.any(state["due_after"] != due_after):
        raise InvalidArgument(f"the state was frozen with due_after={int(state['due_after'][0])}"
                              f", not {due_after}")
    if np.any(state["on_time"] > state["charged"]) or np.any(
            state["late_charges"] > state["charges"]):
        raise InvalidArgument("state rows are inconsistent (on_time > charged or "
                              "late_charges > charges)")
    return state


def _aligned(frozen: Rows, accounts: npt.NDArray[np.uint64]) -> Rows:
    """The state's rows at their accounts' places among `accounts` (which hold
    them all), zeros elsewhere."""
    out = np.zeros(len(accounts), dtype=CREDIT_STATE_DTYPE)
    out[np.searchsorted(accounts, frozen["account"])] = frozen
    return out


def _columns(what: str, account: npt.ArrayLike, time: npt.ArrayLike, amount: npt.ArrayLike
             ) -> Columns:
    try:
        arrays = [np.asarray(a) for a in (account, time, amount)]
    except (TypeError, ValueError):     # ragged lists and the like
        raise InvalidArgument(f"{what} account, time and amount: three 1-D integer arrays") from None
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise InvalidArgument(f"{what} account, time and amount: three 1-D arrays of one length")
    for name, a in zip(("account", "time", "amount"), arrays):
        if a.size and (a.dtype.kind not in "iu" or a.min() < 0):
            raise InvalidArgument(f"{what} {name}s must be non-negative integers")
    acct, time_, amt = arrays
    if time_.size and time_.max() >= 2**40:
        raise InvalidArgument(f"{what} times must be below 2**40")
    # The sum in floating point decides before an int64 sum could wrap.
    if amt.size and float(amt.astype(np.float64).sum()) >= TOTAL_LIMIT:
        raise InvalidArgument(f"{what} amounts must add up to less than 2**62")
    return acct.astype(np.uint64), time_.astype(np.int64), amt.astype(np.int64)


def _group_sum(group: Ints, values: Ints, n: int) -> Ints:
    """Per group (rows sorted by group) the exact int64 sum; 0 for absent groups."""
    return reduce_by_group(np.add, group, values, n)


def _group_max(group: Ints, values: Ints, n: int) -> Ints:
    """Per group the largest value, or 0 (every value here is >= 0)."""
    return reduce_by_group(np.maximum, group, values, n)


def _paid_in_full_at(cg: Ints, C: Ints, pg: Ints, P: Ints, p_time: Ints) -> Ints:
    """For each charge, the time of the first repayment of its account whose
    running total is >= the charge's running total; -1 where none is.

    Both sides come sorted by account and, within it, by running total. Each
    account's values are lifted above every earlier account's (by its last
    repayment total plus two; a charge total above that, which no repayment
    reaches, is clipped to it), so one searchsorted over all the repayments
    finds each charge's first repayment at or above it. The lifted values
    stay below 2**63: the repayments add up to less than 2**62."""
    at = np.full(len(C), -1, dtype=np.int64)
    if not len(C) or not len(P):
        return at
    top = np.zeros(int(max(cg[-1], pg[-1])) + 1, dtype=np.int64)   # 0: no repayment
    last = np.r_[starts(pg)[1:], len(pg)] - 1
    top[pg[last]] = P[last] + 1
    base = np.r_[0, np.cumsum(top + 1)[:-1]]
    found = np.searchsorted(P + base[pg], np.minimum(C, top[cg]) + base[cg], side="left")
    ok = found < len(P)
    ok[ok] = pg[found[ok]] == cg[ok]
    at[ok] = p_time[found[ok]]
    return at
