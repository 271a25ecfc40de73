"""What settlement reports: charges per account and findings, for the open
period (Settlement.report) or a closed one (Settlement.period_report), and
their form as archive tables, which pandas or DuckDB read without qrpay."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from qrpay.errors import ArchiveUnavailable, Reason
from qrpay.ledger import totals_by_account
from qrpay.periods import Settled

Table = dict[str, npt.NDArray[np.generic]]
KINDS = ("double_spend", "clone", "overspend", "invalid_token", "duplicate_record",
         "sequence_gap", "late_upload")


@dataclass(frozen=True)
class Finding:
    """One fraud or integrity finding. `kind` is one of KINDS: double_spend,
    clone, overspend, invalid_token, duplicate_record, sequence_gap,
    late_upload."""

    kind: str
    serial: int = 0
    account: int = 0
    counter: int = 0
    gateways: tuple[str, ...] = ()
    records: tuple[tuple[str, int], ...] = ()
    amount: int = 0          # the amount involved, or for overspend the amount over
    detail: str = ""


@dataclass(frozen=True)
class Report:
    """Charges per account (for the bank debit) and every finding, of one
    period: `period` 0 is the open one."""

    accounts: npt.NDArray[np.uint64]
    amounts: npt.NDArray[np.int64]
    counts: npt.NDArray[np.int64]
    findings: list[Finding] = field(default_factory=list)
    records: int = 0
    charged_total: int = 0
    rejected_total: int = 0    # not charged: invalid, repeated or flagged
    period: int = 0
    from_time: int = 0         # the period holds scans in [from_time, until)
    until: int = 0             # 0 for the open period

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def flagged_serials(self) -> set[int]:
        """Credentials to deny: caught in a double spend, a clone or an overspend."""
        return {f.serial for f in self.findings
                if f.kind in ("double_spend", "clone", "overspend")}

    def charge_of(self, account: int) -> int:
        at = np.searchsorted(self.accounts, np.uint64(account))
        hit = at < len(self.accounts) and self.accounts[at] == account
        return int(self.amounts[at]) if hit else 0

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (`qrpay report`, the service's
        period reports): plain ints and strings, findings as their fields."""
        return {"period": self.period, "from": self.from_time, "until": self.until,
                "records": self.records, "charged_total": self.charged_total,
                "not_charged_total": self.rejected_total,
                "charges": [{"account": int(a), "amount": int(m), "count": int(c)}
                            for a, m, c in zip(self.accounts.tolist(), self.amounts.tolist(),
                                               self.counts.tolist())],
                "findings": [{**vars(f), "gateways": list(f.gateways),
                              "records": [list(r) for r in f.records]}
                             for f in self.findings]}


def build_report(settled: Settled, batches: list[tuple[str, int, int, int]],
                 horizon: int, *, period: int = 0, from_time: int = 0,
                 until: int = 0, gaps: list[Finding] | None = None) -> Report:
    """The Report of a settled period. `batches` are (gateway, seq, first,
    last) of every batch ever applied, for the sequence gaps as they stand;
    or `gaps` are those findings, worked out already (gap_findings)."""
    records, result = settled.records, settled.result
    new = np.zeros(len(records), dtype=np.bool_)
    new[settled.new] = True
    charged = result.charged & new
    accounts, amounts, counts = totals_by_account(records, charged)
    findings = findings_of(settled, horizon) + (gap_findings(batches) if gaps is None else gaps)
    rejected = int(records["amount"][new & ~charged].astype(np.int64).sum())
    return Report(accounts, amounts, counts, findings, len(records) - settled.prior,
                  int(amounts.sum()), rejected, period, from_time, until)


def findings_of(settled: Settled, horizon: int) -> list[Finding]:
    """Turn the kernel's masks into findings: a loop over flagged rows only."""
    keyed, late = keyed_findings(settled)
    return [f for _group, _key, f in keyed] + late_findings(late, horizon)


# The order of the kinds in a report (a finding's group in keyed_findings).
DOUBLE_SPEND, CLONE, DUPLICATE, BACKWARDS, FOUND_BEHIND, INVALID, OVERSPEND = range(7)
LateRows = list[tuple[str, int, int, int]]   # (gateway, row, record, amount)


def keyed_findings(settled: Settled) -> tuple[list[tuple[int, int, Finding]], LateRows]:
    """The findings of findings_of but late uploads, each with its order
    in a report: (group, key, finding), sorted, where the key is the row of
    the record it is about (the serial for an overspend); and the late rows,
    which late_findings groups by gateway. Rows are settled.records' own: a
    caller settling a subset of a stream (one shard of its accounts) maps
    them to the stream's rows and merges shards by (group, key)."""
    records, gateway, names, result = (settled.records, settled.gateway, settled.names,
                                       settled.result)
    found: list[tuple[int, int, Finding]] = []

    def where(i: int) -> tuple[str, int]:
        return names[gateway[i]], int(records["record"][i])

    for group, kind, mask in ((DOUBLE_SPEND, "double_spend", result.double_spend),
                              (CLONE, "clone", result.clone),
                              (DUPLICATE, "duplicate_record", result.duplicate)):
        for i in np.flatnonzero(mask).tolist():
            r, first = records[i], int(result.first_row[i])
            found.append((group, i, Finding(
                kind, int(r["serial"]), int(r["account"]), int(r["counter"]),
                (names[gateway[first]], names[gateway[i]]), (where(first), where(i)),
                int(r["amount"]))))
    for group, mask, detail in (
            (BACKWARDS, result.backwards, "counter went backwards"),
            (FOUND_BEHIND, result.found_behind,
             "counter went backwards (charged: it arrived first)")):
        for i in np.flatnonzero(mask).tolist():
            r = records[i]
            found.append((group, i, Finding("clone", int(r["serial"]), int(r["account"]),
                                            int(r["counter"]), (names[gateway[i]],),
                                            (where(i),), int(r["amount"]), detail)))
    for i in np.flatnonzero(result.invalid[settled.new]).tolist():
        i += settled.prior
        r = records[i]
        found.append((INVALID, i, Finding("invalid_token", int(r["serial"]), int(r["account"]),
                                          int(r["counter"]), (names[gateway[i]],), (where(i),),
                                          int(r["amount"]), Reason(int(r["reason"])).name)))
    for account, serial, at, spent, limit in zip(
            result.over_account.tolist(), result.over_serial.tolist(),
            result.over_at.tolist(), result.over_spent.tolist(), result.over_limit.tolist()):
        found.append((OVERSPEND, serial, Finding(
            "overspend", serial, account, 0, (), (), spent - limit,
            f"{spent} outstanding offline against a limit of {limit} at {at}")))
    late = [(names[gateway[i]], i, int(records["record"][i]), int(records["amount"][i]))
            for i in np.flatnonzero(result.late).tolist()]
    return found, late


def late_findings(late: LateRows, horizon: int) -> list[Finding]:
    """One late_upload finding per gateway (by name), its records in row order."""
    by_gateway: dict[str, list[tuple[int, int, int]]] = {}
    for name, row, record, amount in late:
        by_gateway.setdefault(name, []).append((row, record, amount))
    found = []
    for name in sorted(by_gateway):
        rows = sorted(by_gateway[name])
        found.append(Finding(
            "late_upload", gateways=(name,), records=tuple((name, rec) for _r, rec, _a in rows),
            amount=sum(a for _r, _rec, a in rows),
            detail=f"{len(rows)} records scanned more than the horizon ({horizon} s) before "
                   "the last close: checked for copies against that horizon only"))
    return found


def gap_findings(batches: list[tuple[str, int, int, int]]) -> list[Finding]:
    """Missing record and batch numbers per gateway, from the record ranges
    of the batches applied (a batch holds records first..last, one each):
    work per batch, not per record, as the batches of every closed period
    are in the list."""
    by_gateway: dict[str, list[tuple[str, int, int, int]]] = {}
    for b in batches:   # one pass: the list grows with every closed period
        by_gateway.setdefault(b[0], []).append(b)
    return holes_as_findings({
        name: (_holes([(first, last) for _g, _s, first, last in mine]),
               _holes([(seq, seq) for _g, seq, _f, _l in mine]))
        for name, mine in by_gateway.items()})


Holes = list[tuple[int, int]]


def holes_as_findings(holes: dict[str, tuple[Holes, Holes]]) -> list[Finding]:
    """sequence_gap findings from each gateway's missing (record ranges,
    batch numbers), inclusive and ascending: by gateway, records first."""
    found = []
    for name in sorted(holes):
        records, batches = holes[name]
        for start, end in records:
            found.append(Finding("sequence_gap", gateways=(name,),
                                 detail=f"records {start}..{end} missing"))
        for start, end in batches:
            found.append(Finding("sequence_gap", gateways=(name,),
                                 detail=f"batches {start}..{end} missing"))
    return found


def add_to_holes(holes: Holes, top: int, first: int, last: int) -> int:
    """Fold one more (first, last) range into `holes` (in place: inclusive,
    ascending, below `top`, the highest number covered so far) and return
    the new top: the holes of every range so far, as _holes gives them, one
    range at a time and in any order (a late batch fills a hole)."""
    at = 0
    while at < len(holes):
        start, end = holes[at]
        if end < first or start > last:
            at += 1
            continue
        rest = [(a, b) for a, b in ((start, first - 1), (last + 1, end)) if a <= b]
        holes[at:at + 1] = rest
        at += len(rest)
    if first > top + 1:
        holes.append((top + 1, first - 1))
    return max(top, last)


def _holes(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The numbers from 1 up to the highest covered that no (first, last)
    range covers, as inclusive ranges."""
    holes, covered = [], 0          # everything up to `covered` is accounted for
    for first, last in sorted(ranges):
        if first > covered + 1:
            holes.append((covered + 1, first - 1))
        covered = max(covered, last)
    return holes


# -- as archive tables -----------------------------------------------------------------

def report_tables(report: Report) -> dict[str, Table]:
    """The charges and findings as two tables. A finding's gateways and
    records are text ("gw1,gw2" and "gw1:4;gw2:9") so any reader takes them."""
    f = report.findings
    return {
        "charges": {"account": report.accounts, "amount": report.amounts,
                    "count": report.counts},
        "findings": {
            "kind": np.array([x.kind for x in f], dtype=object),
            "serial": np.array([x.serial for x in f], dtype=np.uint64),
            "account": np.array([x.account for x in f], dtype=np.uint64),
            "counter": np.array([x.counter for x in f], dtype=np.int64),
            "gateways": np.array([",".join(x.gateways) for x in f], dtype=object),
            "records": np.array([";".join(f"{g}:{r}" for g, r in x.records) for x in f],
                                dtype=object),
            "amount": np.array([x.amount for x in f], dtype=np.int64),
            "detail": np.array([x.detail for x in f], dtype=object),
        },
    }


def report_from_tables(tables: dict[str, Table], *, records: int, rejected_total: int,
                       period: int, from_time: int, until: int) -> Report:
    try:
        charges, f = tables["charges"], tables["findings"]
        findings = [
            Finding(str(kind), int(serial), int(account), int(counter),
                    tuple(str(gateways).split(",")) if gateways else (),
                    tuple((g, int(r)) for g, r in (item.rsplit(":", 1)
                                                   for item in str(where).split(";")))
                    if where else (),
                    int(amount), str(detail))
            for kind, serial, account, counter, gateways, where, amount, detail in zip(
                f["kind"].tolist(), f["serial"].tolist(), f["account"].tolist(),
                f["counter"].tolist(), f["gateways"].tolist(), f["records"].tolist(),
                f["amount"].tolist(), f["detail"].tolist())]
        amounts = np.asarray(charges["amount"], dtype=np.int64)
        return Report(np.asarray(charges["account"], dtype=np.uint64), amounts,
                      np.asarray(charges["count"], dtype=np.int64), findings, records,
                      int(amounts.sum()), rejected_total, period, from_time, until)
    except (KeyError, ValueError, TypeError) as exc:
        raise ArchiveUnavailable(f"period {period}: the archived report does not read back "
                                 f"({exc!r})") from exc
