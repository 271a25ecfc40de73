"""Per-group arithmetic on arrays sorted by group: where each group starts,
running totals within a group, and reductions per group. Shared by the
settlement kernel (ledger.py) and the repayment history (credit.py)."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt

Ints = npt.NDArray[np.int64]
G = TypeVar("G", bound=np.generic)


def starts(keys: npt.NDArray[np.generic]) -> Ints:
    """Index of the first row of each run of equal keys (keys already grouped)."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])


def distinct(values: npt.NDArray[G]) -> npt.NDArray[G]:
    """np.unique(values) by sorting: numpy 2.3+ finds the distinct values of
    a plain np.unique with a hash table, ten times slower here on a million
    account numbers (0.26 s against 0.02 s)."""
    ordered = np.sort(values)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]] if len(ordered) else ordered


def running_total(groups: Ints, values: Ints) -> Ints:
    """Cumulative sum of `values` restarting at each group (rows sorted by group)."""
    total = np.cumsum(values)
    if not len(total):
        return total
    first = starts(groups)
    before = total[first] - values[first]
    return total - np.repeat(before, np.diff(np.r_[first, len(groups)]))


def reduce_by_group(ufunc: np.ufunc, groups: Ints, values: Ints, n: int) -> Ints:
    """ufunc-reduce of `values` per group index in [0, n) (rows sorted by group),
    exact in int64; 0 for a group with no rows."""
    out = np.zeros(n, dtype=np.int64)
    if len(groups):
        first = starts(groups)
        out[groups[first]] = ufunc.reduceat(values.astype(np.int64), first)
    return out


def stable_order(keys: npt.NDArray[np.generic]) -> Ints:
    """np.argsort(keys, kind="stable") of integer keys, from numpy's
    unstable sort, which is vectorised (on a million random serials 20 ms
    against 90 ms for the stable one): the keys sorted, then each run of
    equal keys put back in index order by sorting (run << 32 | index),
    which is unique, so any sort gives the one answer."""
    n = len(keys)
    if n >= 1 << 31:
        return np.argsort(keys, kind="stable").astype(np.int64)
    order = np.argsort(keys)
    grouped = keys[order]
    run = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(grouped[1:] != grouped[:-1], out=run[1:])
    out: Ints = np.sort((run << 32) | order) & 0xFFFFFFFF
    return out


def lexsorted(primary: npt.NDArray[np.generic], secondary: npt.NDArray[np.generic]) -> Ints:
    """np.lexsort((secondary, primary)) of integer keys: by primary, then
    secondary, then index, from two stable_order sorts (a million charges
    by account and time: 45 ms against 100 ms)."""
    first = stable_order(secondary)
    return first[stable_order(primary[first])]
