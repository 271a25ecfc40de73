"""The settlement kernel: who is charged and what is fraud, over numpy arrays.

No Python loop per transaction: everything is sort, group and compare over
whole columns, so the same function can run per account partition on a
distributed engine. Inputs are the records of every ingested batch in arrival
order; the output is derived state, recomputed from the records alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qrpay import _segments as seg

# One row per journaled scan as settlement stores it (little-endian, packed).
RECORD_DTYPE = np.dtype([
    ("record", "<u8"),        # the gateway's record number
    ("serial", "<u8"),
    ("counter", "<u4"),
    ("account", "<u8"),
    ("amount", "<u4"),
    ("scene", "u1"),
    ("reason", "u1"),         # re-verification result, 0 = valid
    ("gateway_time", "<u4"),
    ("issued_at", "<u4"),
    ("limit", "<u4"),
    ("token_id", "<u8"),      # first 8 bytes of the device signature
    ("uploaded_at", "<u4"),   # created_at of the batch that carried it: the end of its offline exposure
])

Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class LedgerResult:
    """Per-record verdicts (masks over the input rows) and per-window spend."""

    charged: Mask          # the first valid occurrence of each (serial, counter)
    double_spend: Mask     # the same token again, at another gateway
    duplicate: Mask        # the same token again, at the same gateway
    clone: Mask            # another token with a (serial, counter) already used
    backwards: Mask        # a counter lower than an earlier-issued token's
    invalid: Mask          # failed re-verification: the gateway should not have accepted it
    first_row: npt.NDArray[np.int64]      # for a repeat: the charged row it repeats; else -1
    over_account: npt.NDArray[np.uint64]  # overspend: the account charged,
    over_serial: npt.NDArray[np.uint64]   # the credential serial,
    over_at: npt.NDArray[np.int64]        # when its offline exposure peaked,
    over_spent: npt.NDArray[np.int64]     # that peak (outstanding offline spend),
    over_limit: npt.NDArray[np.int64]     # and the credential's limit


def settle(records: npt.NDArray[np.void], gateway: npt.NDArray[np.int64],
           slack: int = 0) -> LedgerResult:
    """Classify every record. `records` is RECORD_DTYPE in arrival order,
    `gateway` the index of the gateway each came from, and `slack` how far
    apart in gateway time two honest scans of one phone can appear out of
    counter order (see below)."""
    n = len(records)
    serial = records["serial"]
    counter = records["counter"]
    token_id = records["token_id"]
    invalid = records["reason"] != 0
    valid = ~invalid

    # Group valid records by (serial, counter); arrival order breaks ties, so
    # the first occurrence to arrive is the one charged, whatever came later.
    arrival = np.arange(n)
    order = np.lexsort((arrival, counter, serial))
    order = order[valid[order]]
    s, c = serial[order], counter[order]
    starts = np.ones(len(order), dtype=np.bool_)
    starts[1:] = (s[1:] != s[:-1]) | (c[1:] != c[:-1])
    group = np.cumsum(starts) - 1
    first = order[starts][group]             # for each row: the charged row of its group
    repeat = order[~starts]
    first_of_repeat = first[~starts]
    same_token = token_id[repeat] == token_id[first_of_repeat]
    same_gateway = gateway[repeat] == gateway[first_of_repeat]

    charged = np.zeros(n, dtype=np.bool_)
    charged[order[starts]] = True
    double_spend = np.zeros(n, dtype=np.bool_)
    double_spend[repeat[same_token & ~same_gateway]] = True
    duplicate = np.zeros(n, dtype=np.bool_)
    duplicate[repeat[same_token & same_gateway]] = True
    clone = np.zeros(n, dtype=np.bool_)
    clone[repeat[~same_token]] = True

    # One phone's counter rises with time. An honest token is scanned within
    # its freshness window, so a lower counter may be scanned after a higher
    # one by at most `slack` seconds (max_age + 2 * skew); later than that, a
    # second device is running a copy of the credential. Gateway time is used,
    # not the phone's issued_at, so a phone clock stepping back is not fraud.
    backwards = np.zeros(n, dtype=np.bool_)
    charged_rows = np.flatnonzero(charged)
    backwards[_behind(charged_rows, serial, counter, records["gateway_time"], slack)] = True
    first_row = np.full(n, -1, dtype=np.int64)
    first_row[repeat] = first_of_repeat

    over = _overspend(records[charged_rows])
    return LedgerResult(charged, double_spend, duplicate, clone, backwards, invalid, first_row,
                        *over)


def _behind(rows: npt.NDArray[np.int64], serial: npt.NDArray[np.uint64],
            counter: npt.NDArray[np.uint32], when: npt.NDArray[np.uint32],
            slack: int) -> npt.NDArray[np.int64]:
    """The rows whose counter is below the largest counter of the same serial
    scanned more than `slack` seconds earlier."""
    if len(rows) == 0:
        return rows
    rows = rows[np.lexsort((when[rows], serial[rows]))]
    s, t = serial[rows], when[rows].astype(np.int64)
    c = counter[rows].astype(np.int64)
    new_serial = np.r_[True, s[1:] != s[:-1]]
    rank = np.cumsum(new_serial) - 1                       # dense serial number, sorted
    # Running max of the counter within each serial (lift each serial above the last).
    lift = rank * (int(c.max()) + 1)
    running = np.maximum.accumulate(c + lift) - lift
    # For each row: how many rows of its serial were scanned before t - slack.
    key = rank * (1 << 34) + t                              # sortable (serial, time)
    before = np.searchsorted(key, rank * (1 << 34) + t - slack, side="left")
    start = np.flatnonzero(new_serial)[rank]
    earlier = np.where(before > start, running[np.maximum(before - 1, 0)], -1)
    return rows[c < earlier]


def _overspend(charged: npt.NDArray[np.void]
               ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64],
                          npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Credentials whose offline exposure went over their limit.

    A charged payment is outstanding offline from its scan until the batch
    that carried it was exported (its gateway stops counting it once
    settlement has it). Each gateway keeps its own outstanding spend within
    the limit; summed across gateways at any moment, it must be too. A rider
    whose gateways upload between rides is never flagged, however much the
    day adds up to.
    """
    if len(charged) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64), empty, empty, empty
    start = charged["gateway_time"].astype(np.int64)
    end = np.maximum(charged["uploaded_at"].astype(np.int64), start)
    amount = charged["amount"].astype(np.int64)
    uniq, rank = np.unique(charged["serial"], return_inverse=True)
    rank = np.r_[rank, rank].astype(np.int64)
    when = np.r_[start, end]
    delta = np.r_[amount, -amount]
    # One int64 key, (serial rank, time, release before payment): at equal times
    # an upload and the next scan in the same second do not overlap.
    order = np.argsort((rank << 34 | when) << 1 | (delta > 0), kind="stable")
    rank, when, delta = rank[order], when[order], delta[order]
    running = seg.running_total(rank, delta)
    # rank is dense (np.unique's inverse): group r is serial uniq[r].
    peak = seg.reduce_by_group(np.maximum, rank, running, len(uniq))
    # The earliest moment of each serial's peak (events are in time order).
    hit = np.flatnonzero(running == peak[rank])
    at_peak = when[hit[seg.starts(rank[hit])]]
    # The credential's limit and account, from its charged (valid) records.
    by_serial = np.argsort(charged["serial"], kind="stable")
    first = np.flatnonzero(np.r_[True, np.diff(charged["serial"][by_serial]) != 0])
    limit = np.maximum.reduceat(charged["limit"][by_serial].astype(np.int64), first)
    account = charged["account"][by_serial][first]
    over = peak > limit
    return account[over], uniq[over], at_peak[over], peak[over], limit[over]


def sequence_gaps(record_numbers: npt.NDArray[np.uint64]) -> list[tuple[int, int]]:
    """Missing record numbers of one gateway as inclusive (from, to) ranges,
    counting from 1."""
    seen = np.unique(record_numbers.astype(np.int64))
    expected_next = np.r_[1, seen[:-1] + 1] if len(seen) else np.zeros(0, dtype=np.int64)
    gap = seen > expected_next
    return [(int(a), int(b)) for a, b in zip(expected_next[gap], seen[gap] - 1)]


def totals_by_account(records: npt.NDArray[np.void], mask: Mask
                      ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64],
                                 npt.NDArray[np.int64]]:
    """(account, amount, count) of the masked records, accounts ascending;
    exact integer sums."""
    account = records["account"][mask]
    order = np.argsort(account, kind="stable")
    account = account[order]
    amount = records["amount"][mask][order].astype(np.int64)
    if len(account) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return account, empty, empty
    at = np.flatnonzero(np.r_[True, account[1:] != account[:-1]])
    return account[at], np.add.reduceat(amount, at), np.diff(np.r_[at, len(account)])
