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
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from qrpay._segments import reduce_by_group, running_total
from qrpay.errors import InvalidArgument

DAY: Final = 86_400
DEFAULT_DUE_AFTER: Final = 7 * DAY

CREDIT_DTYPE: Final = np.dtype([
    ("account", "<u8"), ("charged", "<i8"), ("repaid", "<i8"), ("balance", "<i8"),
    ("overdue", "<i8"), ("days_past_due", "<i8"), ("max_days_late", "<i8"),
    ("on_time_share", "<f8"), ("charges", "<i8"), ("late_charges", "<i8"),
])

TOTAL_LIMIT: Final = 2**62   # amounts of one kind must add up to less: every sum stays int64

Ints = npt.NDArray[np.int64]


def history(charge_account: npt.ArrayLike, charge_time: npt.ArrayLike,
            charge_amount: npt.ArrayLike, pay_account: npt.ArrayLike,
            pay_time: npt.ArrayLike, pay_amount: npt.ArrayLike, now: int,
            due_after: int = DEFAULT_DUE_AFTER) -> npt.NDArray[np.void]:
    """One CREDIT_DTYPE row per account that has a charge or a repayment at or
    before `now`, sorted by account. Amounts and times are non-negative integers."""
    if (isinstance(now, bool) or not isinstance(now, (int, np.integer))
            or not 0 <= now <= 2**40):
        raise InvalidArgument("now must be an integer number of seconds in [0, 2**40]")
    if (isinstance(due_after, bool) or not isinstance(due_after, (int, np.integer))
            or not 0 <= due_after < 2**40):
        raise InvalidArgument("due_after must be a non-negative number of seconds")
    c_acct, c_time, c_amount = _columns("charge", charge_account, charge_time, charge_amount)
    p_acct, p_time, p_amount = _columns("repayment", pay_account, pay_time, pay_amount)
    now, due_after = int(now), int(due_after)
    keep = c_time <= now
    c_acct, c_time, c_amount = c_acct[keep], c_time[keep], c_amount[keep]
    keep = p_time <= now
    p_acct, p_time, p_amount = p_acct[keep], p_time[keep], p_amount[keep]

    accounts = np.unique(np.concatenate([c_acct, p_acct]))
    out = np.zeros(len(accounts), dtype=CREDIT_DTYPE)
    out["account"] = accounts
    out["on_time_share"] = np.nan
    if not len(accounts):
        return out
    cg = np.searchsorted(accounts, c_acct)   # dense account index of each row
    pg = np.searchsorted(accounts, p_acct)

    # Charges oldest first per account, and their running total C within it.
    order = np.lexsort((c_time, cg))
    cg, c_time, c_amount = cg[order], c_time[order], c_amount[order]
    C = running_total(cg, c_amount)
    order = np.lexsort((p_time, pg))
    pg, p_time, p_amount = pg[order], p_time[order], p_amount[order]
    P = running_total(pg, p_amount)

    charged = _group_sum(cg, c_amount, len(accounts))
    repaid = _group_sum(pg, p_amount, len(accounts))
    out["charged"], out["repaid"], out["balance"] = charged, repaid, charged - repaid
    out["charges"] = np.bincount(cg, minlength=len(accounts))

    # A charge is paid in full at the first repayment whose running total
    # reaches the charge's: merge both running totals per account (charges
    # first on a tie, so an exactly equal repayment counts) and look ahead.
    paid_at = _paid_in_full_at(cg, C, pg, P, p_time)
    due = c_time + due_after
    fell_due = due < now
    unpaid = C > repaid[cg]
    owed = np.minimum(C - repaid[cg], c_amount).clip(min=0)
    late = fell_due & (unpaid | (paid_at > due))
    late_seconds = np.where(unpaid, now, paid_at) - due
    days_late = np.where(late, late_seconds // DAY, 0)

    out["overdue"] = _group_sum(cg, np.where(fell_due, owed, 0), len(accounts))
    out["days_past_due"] = _group_max(cg, np.where(fell_due & unpaid, days_late, 0),
                                      len(accounts))
    out["max_days_late"] = _group_max(cg, days_late, len(accounts))
    out["late_charges"] = np.bincount(cg, weights=late, minlength=len(accounts)).astype(np.int64)
    due_total = _group_sum(cg, np.where(fell_due, c_amount, 0), len(accounts))
    on_time = _group_sum(cg, np.where(fell_due & ~late, c_amount, 0), len(accounts))
    with np.errstate(invalid="ignore", divide="ignore"):
        out["on_time_share"] = np.where(due_total > 0, on_time / np.maximum(due_total, 1),
                                        np.nan)
    return out


def _columns(what: str, account: npt.ArrayLike, time: npt.ArrayLike, amount: npt.ArrayLike
             ) -> tuple[npt.NDArray[np.uint64], Ints, Ints]:
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
    running total is >= the charge's running total; -1 where none is."""
    n_c = len(C)
    group = np.concatenate([cg, pg])
    value = np.concatenate([C, P])
    is_payment = np.r_[np.zeros(n_c, dtype=np.int8), np.ones(len(P), dtype=np.int8)]
    order = np.lexsort((is_payment, value, group))
    # Position in the merged order of the next repayment at or after each row.
    pos = np.where(is_payment[order] == 1, np.arange(len(order)), len(order))
    next_payment = np.minimum.accumulate(pos[::-1])[::-1]
    at = np.full(n_c, -1, dtype=np.int64)
    charge_rows = np.flatnonzero(is_payment[order] == 0)
    found = next_payment[charge_rows]
    ok = found < len(order)
    source = order[found[ok]] - n_c                 # index into the repayments
    charge = order[charge_rows[ok]]
    same = pg[source] == cg[charge]
    at[charge[same]] = p_time[source[same]]
    return at
