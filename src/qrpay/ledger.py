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
class Floor:
    """What settlement still knows of the valid records it no longer holds
    (settled in closed periods and dropped from the carried tail), per
    serial: the highest counter among them and the latest gateway time.
    Serials ascending."""

    serial: npt.NDArray[np.uint64]
    counter: npt.NDArray[np.int64]
    time: npt.NDArray[np.int64]

    @staticmethod
    def empty() -> Floor:
        return Floor(np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64),
                     np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class LedgerResult:
    """Per-record verdicts (masks over the input rows) and per-window spend."""

    charged: Mask          # the first valid, unflagged occurrence of each (serial, counter)
    double_spend: Mask     # the same token again, at another gateway
    duplicate: Mask        # the same token again, at the same gateway
    clone: Mask            # another token with a (serial, counter) already used
    backwards: Mask        # a counter not above one that arrived before and was scanned
                           # more than `slack` earlier: flagged, not charged (new rows only)
    found_behind: Mask     # charged, and then a record arrived that was scanned more
                           # than `slack` earlier with a counter at least as high
    invalid: Mask          # failed re-verification: the gateway should not have accepted it
    late: Mask             # scanned so long ago that the floor could not be used (see settle)
    first_row: npt.NDArray[np.int64]      # for a repeat: the charged row it repeats; else -1
    over_account: npt.NDArray[np.uint64]  # overspend: the account charged,
    over_serial: npt.NDArray[np.uint64]   # the credential serial,
    over_at: npt.NDArray[np.int64]        # when its offline exposure peaked,
    over_spent: npt.NDArray[np.int64]     # that peak (outstanding offline spend),
    over_limit: npt.NDArray[np.int64]     # and the credential's limit

def settle(records: npt.NDArray[np.void], gateway: npt.NDArray[np.int64],
           slack: int = 0, *, prior: int = 0, prior_charged: Mask | None = None,
           prior_flagged: Mask | None = None, prior_found: Mask | None = None,
           floor: Floor | None = None, serial_order: npt.NDArray[np.intp] | None = None
           ) -> LedgerResult:
    """Classify every record. `records` is RECORD_DTYPE in arrival order,
    `gateway` the index of the gateway each came from, and `slack` how far
    apart in gateway time two honest scans of one phone can appear out of
    counter order (max_age + 2 * skew: see below).

    Every verdict on a record depends only on the records that arrived
    before it, so settling a stream in one piece or period by period gives
    the same verdicts. For the second, the first `prior` rows are records
    settled before (the carried tail: `prior_charged`, `prior_flagged`
    (backwards) and `prior_found` (found_behind) are their verdicts, which
    are returned unchanged) and `floor`
    summarises the older valid records no longer held. A record scanned
    within `slack` of the floor's latest time is `late`: the floor can not
    say which older records came before it in time, so only the held ones
    are compared (see docs/SETTLEMENT.md, Periods).

    Every step groups the rows by serial: they are sorted by it once
    (stable: arrival order within a serial), and each step orders a serial's
    rows by what it needs from there, a nearly sorted pass. `serial_order`
    is that sort if the caller has it (checked: ValueError if it is not).
    """
    n = len(records)
    # Fields of a structured array are strided views: a column is copied
    # once (2 ms a million rows) before it is gathered in sort order, which
    # is 8 times slower from the view.
    serial = np.ascontiguousarray(records["serial"])
    by_serial = _serial_order(serial, serial_order)
    grouped = serial[by_serial]
    new_serial = np.r_[True, grouped[1:] != grouped[:-1]] if n else np.zeros(0, dtype=np.bool_)
    rank = np.empty(n, dtype=np.int64)    # dense serial number of each row
    rank[by_serial] = np.cumsum(new_serial) - 1
    counter = records["counter"].astype(np.int64)
    when = records["gateway_time"].astype(np.int64)
    token_id = records["token_id"]
    invalid = records["reason"] != 0
    valid = ~invalid
    new = np.arange(n) >= prior

    # A phone's counter rises with time, and an honest token is scanned
    # within its freshness window, so of two honest scans of one credential
    # more than `slack` apart in gateway time the later has the higher
    # counter. A record that breaks this against one that arrived before it
    # comes from a copied phone: flagged, and not charged. One that arrived
    # first was charged; it is found behind when the other arrives.
    backwards, behind_later = _conflicts(valid, by_serial, rank, counter, when, slack, new)
    late = np.zeros(n, dtype=np.bool_)
    if floor is not None and len(floor.serial):
        # Looked up once per serial (the rows' serials are grouped[new_serial]
        # in rank order), not once per row.
        at = np.searchsorted(floor.serial, grouped[new_serial]).clip(
            max=len(floor.serial) - 1)[rank]
        known = valid & new & (floor.serial[at] == serial)
        late = known & (when - slack <= floor.time[at])
        # Every record in the floor arrived earlier and, for a record that
        # is not late, was scanned more than `slack` before it.
        backwards |= known & ~late & (counter <= floor.counter[at])
    none = np.zeros(prior, dtype=np.bool_)
    prior_charged = none if prior_charged is None else prior_charged
    prior_flagged = none if prior_flagged is None else prior_flagged
    prior_found = none if prior_found is None else prior_found
    if prior:
        backwards[:prior] = prior_flagged[:prior]
    flagged = backwards

    # Group the other valid records by (serial, counter); arrival order breaks
    # ties, so the first occurrence to arrive is the one charged.
    order = _within(by_serial, rank, counter)
    order = order[(valid & ~backwards)[order]]
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
    first_row = np.full(n, -1, dtype=np.int64)
    first_row[repeat] = first_of_repeat
    if prior:
        # The carried rows keep the verdicts they were settled with.
        charged[:prior] = prior_charged[:prior]
        for mask in (double_spend, duplicate, clone):
            mask[:prior] = False
        first_row[:prior] = -1
    found_behind = behind_later & charged
    if prior:
        found_behind[:prior] &= ~prior_found[:prior]   # found once
        backwards[:prior] = False                      # flagged when they arrived

    over = _overspend(records, serial, charged, new, by_serial)
    return LedgerResult(charged, double_spend, duplicate, clone, backwards, found_behind,
                        invalid, late, first_row, *over)


def _serial_order(serial: npt.NDArray[np.uint64], given: npt.NDArray[np.intp] | None
                  ) -> npt.NDArray[np.intp]:
    """The rows sorted by serial, arrival order within one: `given`, after
    checking it is that (a wrong one would change verdicts), or worked out."""
    if given is None:
        return seg.stable_order(serial)
    order = np.asarray(given)
    if order.shape != serial.shape or order.dtype.kind not in "iu":
        raise ValueError("serial_order must be one integer index per row")
    if len(order):
        seen = np.zeros(len(order), dtype=np.bool_)
        seen[order.clip(0, len(order) - 1)] = True
        grouped = serial[order.clip(0, len(order) - 1)]
        tie = grouped[1:] == grouped[:-1]
        if (order.min() < 0 or order.max() >= len(order) or not seen.all()
                or np.any(grouped[1:] < grouped[:-1]) or np.any(order[1:][tie] <= order[:-1][tie])):
            raise ValueError("serial_order must sort the rows by serial, stably")
    return order.astype(np.intp, copy=False)


def _within(by_serial: npt.NDArray[np.intp], rank: npt.NDArray[np.int64],
            key: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
    """The rows sorted by (serial, key, arrival), from `by_serial` (rows by
    serial, arrival within) and each row's dense serial `rank`: np.lexsort's
    answer, from a stable sort of an almost sorted column (a serial's
    counters and scan times rise as its records arrive). `key` is below 2**32."""
    combined = (rank[by_serial] << 32) | key[by_serial]
    return by_serial[np.argsort(combined, kind="stable")]


def _conflicts(valid: Mask, by_serial: npt.NDArray[np.intp], rank: npt.NDArray[np.int64],
               counter: npt.NDArray[np.int64], when: npt.NDArray[np.int64], slack: int,
               judge: Mask) -> tuple[Mask, Mask]:
    """For each row to judge: is there a valid row of the same serial that
    arrived before it (a lower index) and was scanned more than `slack`
    earlier with a counter at least as high (backwards)? And which rows
    that arrived before a judged row were scanned more than `slack` after
    it with a counter at most as high (behind_later: behind a row that
    arrived after them)?

    Honest credentials have no such pair at all, which one order-free pass
    finds; only the serials that do are compared pair by pair in arrival
    order.
    """
    n = len(valid)
    backwards = np.zeros(n, dtype=np.bool_)
    behind_later = np.zeros(n, dtype=np.bool_)
    if np.count_nonzero(valid) < 2:
        return backwards, behind_later
    rows = _within(by_serial, rank, when)                  # by (serial, scan time)
    rows = rows[valid[rows]]
    t, c = when[rows], counter[rows]
    new_serial = np.r_[True, rank[rows][1:] != rank[rows][:-1]]
    rank = np.cumsum(new_serial) - 1                       # dense among the valid rows
    # Running max of the counter within each serial (lift each serial above the last).
    lift = rank * (int(c.max()) + 1)
    running = np.maximum.accumulate(c + lift) - lift
    # For each row: how many rows of its serial were scanned before t - slack.
    key = rank * (1 << 34) + t                              # sortable (serial, time)
    before = np.searchsorted(key, key - slack, side="left")
    start = np.flatnonzero(new_serial)[rank]
    earlier = np.where(before > start, running[np.maximum(before - 1, 0)], -1)
    suspects = seg.distinct(rank[c <= earlier])
    if not len(suspects):
        return backwards, behind_later
    bounds = np.r_[np.flatnonzero(new_serial), len(rows)]
    for r in suspects.tolist():
        members = np.sort(rows[bounds[r]:bounds[r + 1]])     # arrival order
        _judge_pairs(members, when, counter, slack, judge, backwards, behind_later)
    return backwards, behind_later


def _judge_pairs(members: npt.NDArray[np.int64], when: npt.NDArray[np.int64],
                 counter: npt.NDArray[np.int64], slack: int, judge: Mask,
                 backwards: Mask, behind_later: Mask, block: int = 1024) -> None:
    """The rows of one conflicted serial, in arrival order: each judged row
    against every row before it, a block of rows at a time."""
    t, c = when[members], counter[members]
    for lo in range(0, len(members), block):
        hi = min(lo + block, len(members))
        mine = judge[members[lo:hi]]
        if not mine.any():
            continue
        tj, cj = t[lo:hi, None], c[lo:hi, None]
        earlier = np.arange(hi)[None, :] < np.arange(lo, hi)[:, None]
        behind = earlier & (t[None, :hi] < tj - slack) & (c[None, :hi] >= cj)
        before = earlier & (t[None, :hi] > tj + slack) & (c[None, :hi] <= cj)
        backwards[members[lo:hi]] |= mine & behind.any(axis=1)
        behind_later[members[:hi]] |= (mine[:, None] & before).any(axis=0)


def _overspend(records: npt.NDArray[np.void], serial: npt.NDArray[np.uint64], charged: Mask,
               new: Mask, by_serial_all: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64],
                          npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Credentials whose offline exposure went over their limit.

    A charged payment is outstanding offline from its scan until the batch
    that carried it was exported (its gateway stops counting it once
    settlement has it). Each gateway keeps its own outstanding spend within
    the limit; summed across gateways at any moment, it must be too. A rider
    whose gateways upload between rides is never flagged, however much the
    day adds up to.

    Only moments that a `new` record's exposure covers are judged: the
    others were judged when the last record covering them was settled.
    """
    rows = np.flatnonzero(charged)
    if len(rows) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64), empty, empty, empty
    # The charged rows' columns, contiguous (`serial` is records' serial column).
    start = records["gateway_time"][rows].astype(np.int64)
    end = np.maximum(records["uploaded_at"][rows].astype(np.int64), start)
    amount = records["amount"][rows].astype(np.int64)
    # Each row's dense serial rank, from the rows by serial (`by_serial_all`,
    # which the limits and accounts below need too): the charged ones, as
    # indices among them.
    position = np.cumsum(charged) - 1
    by_serial = position[by_serial_all[charged[by_serial_all]]]
    serials = serial[rows][by_serial]
    first = seg.starts(serials)
    uniq = serials[first]
    grouped = np.cumsum(np.r_[True, serials[1:] != serials[:-1]]) - 1
    # Each row's payment (at its scan) and release (at its upload), the rows
    # by serial (arrival order within one): each half is then almost in key
    # order, which the stable sort merges fast, and rows of one serial keep
    # their arrival order among equal keys, as in any layout.
    rank = np.r_[grouped, grouped]
    when = np.r_[start[by_serial], end[by_serial]]
    delta = np.r_[amount[by_serial], -amount[by_serial]]
    fresh = np.r_[new[rows][by_serial], new[rows][by_serial]]
    # One int64 key, (serial rank, time, release before payment): at equal times
    # an upload and the next scan in the same second do not overlap.
    order = np.argsort((rank << 34 | when) << 1 | (delta > 0), kind="stable")
    rank, when, delta, fresh = rank[order], when[order], delta[order], fresh[order]
    running = seg.running_total(rank, delta)
    covered = seg.running_total(rank, np.where(fresh, delta, 0)) > 0
    judged = np.where(covered, running, 0)
    # rank is dense: group r is serial uniq[r].
    peak = seg.reduce_by_group(np.maximum, rank, judged, len(uniq))
    # The earliest moment of each serial's peak (events are in time order).
    hit = np.flatnonzero(covered & (running == peak[rank]))
    at_peak = np.zeros(len(uniq), dtype=np.int64)
    at_peak[rank[hit[seg.starts(rank[hit])]]] = when[hit[seg.starts(rank[hit])]]
    # The credential's limit and account, from its charged (valid) records.
    limit = np.maximum.reduceat(records["limit"][rows].astype(np.int64)[by_serial], first)
    account = np.ascontiguousarray(records["account"][rows])[by_serial[first]]
    over = peak > limit
    return account[over], uniq[over], at_peak[over], peak[over], limit[over]


def sequence_gaps(record_numbers: npt.NDArray[np.uint64]) -> list[tuple[int, int]]:
    """Missing record numbers of one gateway as inclusive (from, to) ranges,
    counting from 1."""
    seen = seg.distinct(record_numbers.astype(np.int64))
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
