"""`qrpay simulate`: a city's day, end to end, on embedded defaults.

Citizens with synthetic credit histories (12 numeric and 6 categorical
features: employment type, housing, ...) are scored by a card fitted on last
year's accounts and get offline limits; the issuer issues credentials; phones
make tokens offline; gateways on buses, the metro, a ferry, clinics, canteens
and a library scan them all day into their journals and upload every hour;
settlement ingests the uploads (some twice), charges accounts and publishes a
deny list. Planted fraud must each be caught, and the money must add up:
every accepted payment is either charged once or flagged. Then the month
after: citizens repay (most on time, the riskier ones late or not at all),
settlement's credit history shows who is behind, and those 14 days past due
are denied.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from qrpay import _args, archive, clearing
from qrpay._impl import backend, core
from qrpay.credential import Credential, Scene
from qrpay.errors import InvalidArgument, Reason
from qrpay.format import CRED_LIMIT, CRED_SERIAL
from qrpay.gateway import Gateway, GatewayPolicy
from qrpay.keys import DeviceKey, GatewayKey, IssuerKey, SettlementKey
from qrpay.scoring import CategoryBins, LimitBand, LimitPolicy, Scorecard, auc
from qrpay.reports import Report as SettlementReport
from qrpay.settlement import IngestStatus, PeriodSummary, Settlement
from qrpay.synthetic_categories import CategoricalHistories, categorical_histories
from qrpay.token import generate_batch
from qrpay.trust import Role, TrustStore

DAY_START = 1_800_000_000  # fixed, so a seed reproduces the same bytes
HOUR = 3600
DAY = 24 * HOUR
WINDOW = 60  # a gateway commits what it scanned in each minute as one batch

# name, scene, fare in minor units (a clinic co-payment, a canteen meal, ...)
GATEWAYS: tuple[tuple[str, Scene, int], ...] = (
    ("bus-1", Scene.BUS, 200), ("bus-2", Scene.BUS, 200), ("bus-3", Scene.BUS, 200),
    ("metro-1", Scene.METRO, 400), ("ferry-1", Scene.FERRY, 800),
    ("clinic-1", Scene.CLINIC, 1500), ("clinic-2", Scene.CLINIC, 1500),
    ("canteen-1", Scene.CANTEEN, 1200), ("library-1", Scene.LIBRARY, 100),
)
# Who runs each gateway, and the city's fee per scene in basis points.
OPERATOR_OF = {"bus-1": "bus-co", "bus-2": "bus-co", "bus-3": "bus-co", "metro-1": "metro",
               "ferry-1": "ferry-line", "clinic-1": "health", "clinic-2": "health",
               "canteen-1": "canteen", "library-1": "library"}
FEES = clearing.FeeSchedule(version=1, effective_from=0, bps={
    Scene.BUS: 150, Scene.FERRY: 200, Scene.METRO: 150, Scene.CLINIC: 0, Scene.CANTEEN: 250,
    Scene.LIBRARY: 0, Scene.RETAIL: 250})
MAX_DAYS = 20   # the day's credentials are valid for 30 days, the month after included


@dataclass
class Planted:
    """One planted attack: what should catch it and whether it did."""

    name: str
    expected: str
    caught: bool = False
    observed: str = ""


@dataclass
class Report:
    citizens: int
    seed: int
    backend: str
    threads: int
    credit: dict[str, Any] = field(default_factory=dict)
    repayment: dict[str, Any] = field(default_factory=dict)
    scans: int = 0
    accepted: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    money: dict[str, int] = field(default_factory=dict)
    settlement: dict[str, Any] = field(default_factory=dict)
    planted: list[Planted] = field(default_factory=list)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    periods: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": not self.failures}


StageProgress = Callable[[int, int, str], None]


def stage_count(days: int) -> int:
    """How many stages a run of `days` days times: the first day nine
    (fit, score, issue, tokens, scans, settle, close, repay, history), each
    day after it three (tokens, scans, close)."""
    return 9 + 3 * (days - 1)


class _Stages:
    """Times each stage and prints progress lines as the day goes;
    `on_stage(done, total, name)` hears of each stage as it starts and ends."""

    def __init__(self, report: Report, progress: TextIO, total: int,
                 on_stage: StageProgress | None = None) -> None:
        self.report = report
        self.progress = progress
        self.total, self.done = total, 0
        self.on_stage = on_stage

    @contextmanager
    def stage(self, name: str, count: int) -> Iterator[None]:
        self.progress.write(f"  {name} ({count:,}) ...")
        self.progress.flush()
        if self.on_stage is not None:
            self.on_stage(self.done, self.total, name)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.done += 1
        if self.on_stage is not None:
            self.on_stage(self.done, self.total, name)
        rate = count / seconds if seconds > 0 else 0.0
        self.report.stages[name] = {"count": count, "seconds": round(seconds, 3),
                                    "per_second": round(rate, 1)}
        self.progress.write(f" {seconds:.2f} s ({rate:,.0f}/s)\n")
        self.progress.flush()

    def say(self, text: str) -> None:
        self.progress.write(f"  {text}\n")
        self.progress.flush()


@dataclass
class _Citizen:
    account: int
    device: DeviceKey
    credential: Credential
    counter: int = 0


@dataclass
class _City:
    issuer: IssuerKey
    trust: TrustStore
    citizens: list[_Citizen]
    gateways: dict[str, Gateway]
    scene_of: dict[str, Scene]
    fare_of: dict[str, int]
    settlement: Settlement
    settlement_key: SettlementKey
    uploads: list[bytes] = field(default_factory=list)
    citizens_by_account: dict[int, _Citizen] = field(default_factory=dict)


MIN_CITIZENS = 100   # enough riders for every planted attack to have its actors


def run(citizens: int = 20_000, trips: int = 4, seed: int = 1, threads: int = 2,
        workdir: str | Path | None = None, progress: TextIO | None = None,
        days: int = 1, on_stage: StageProgress | None = None) -> Report:
    """Run `days` days (the first with planted fraud) in `workdir` (a fresh
    temporary directory by default; one given must be new or empty), closing
    a settlement period at the end of each. Every argument is checked before
    any work starts: InvalidArgument. Stage lines go to `progress` (stderr);
    `on_stage(done, total, name)` is called as each stage starts and ends."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise InvalidArgument(f"days is 1 to {MAX_DAYS}")
    if isinstance(citizens, bool) or not isinstance(citizens, int) or citizens < MIN_CITIZENS:
        raise InvalidArgument(f"simulate needs at least {MIN_CITIZENS} citizens")
    if isinstance(trips, bool) or not isinstance(trips, int) or trips < 1:
        raise InvalidArgument("trips must be at least 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgument("seed must be a whole number, 0 or more")
    _args.threads(threads)
    if workdir is not None:
        _check_workdir(Path(workdir))
    out = progress if progress is not None else sys.stderr
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="qrpay-simulate-") as tmp:
            return _run(citizens, trips, seed, threads, Path(tmp), out, days, on_stage)
    return _run(citizens, trips, seed, threads, Path(workdir), out, days, on_stage)


def _check_workdir(workdir: Path) -> None:
    """A new or empty directory: the day makes new journals and a new store in
    it, and old ones would conflict with them (or be mistaken for the day's)."""
    try:
        if workdir.exists() and not workdir.is_dir():
            raise InvalidArgument(f"workdir {workdir} is not a directory")
        if workdir.is_dir() and any(workdir.iterdir()):
            raise InvalidArgument(f"workdir {workdir} is not empty: give a new or empty "
                                  "directory (the day makes new journals and a new "
                                  "settlement store in it)")
    except OSError as exc:
        raise InvalidArgument(f"workdir {workdir}: {exc.strerror or exc}") from None


def _run(n_citizens: int, trips: int, seed: int, threads: int, workdir: Path,
         progress: TextIO, days: int = 1, on_stage: StageProgress | None = None) -> Report:
    rng = random.Random(seed)
    report = Report(n_citizens, seed, backend, threads)
    st = _Stages(report, progress, stage_count(days), on_stage)
    progress.write(f"qrpay simulate: {n_citizens:,} citizens, {len(GATEWAYS)} gateways, "
                   f"seed {seed}, backend {backend}, work dir {workdir}\n")

    card, limits = _score(report, st, n_citizens, seed, threads)
    city = _issue(report, st, rng, workdir, card, limits, threads)
    plants = _Plants(city, rng)
    plants.before_day()
    _ride(report, st, city, plants, trips, seed, threads)
    plants.after_scans()
    final = _settle(report, st, city, plants)
    plants.after_settlement(final)
    closes = [_close_day(report, st, city, 0, final)]
    for day in range(1, days):
        _morning(city, day)
        _ride(report, st, city, None, trips, seed + day, threads, day)
        closes.append(_close_day(report, st, city, day, city.settlement.report()))
    _statements_still_verify(report, city, closes)
    charged = _charges(city.settlement, len(closes))
    behind, history = _pay_later(report, st, city, charged, limits, rng,
                                 plants.pick_defaulter(final))
    plants.after_a_month(behind, history)
    report.planted = plants.planted
    for p in plants.planted:
        if not p.caught:
            report.failures.append(f"planted attack not caught: {p.name} ({p.observed})")
    for g in city.gateways.values():
        g.close()
    city.settlement.close()
    return report


# -- credit -----------------------------------------------------------------------------

def _score(report: Report, st: _Stages, n: int, seed: int, threads: int
           ) -> tuple[Scorecard, dict[str, npt.NDArray[Any]]]:
    history_rows = max(20_000, n)
    with st.stage("card fitted on last year's accounts", history_rows):
        last_year = categorical_histories(history_rows, seed=seed + 100)
        names = [*last_year.numeric_features, *last_year.categorical_features]
        card = Scorecard.fit(_columns(last_year), last_year.y.astype(np.int8), names)
    with st.stage("citizens scored", n):
        citizens = categorical_histories(n, seed=seed)
        bad = citizens.y
        scores, reasons = card.explain(_columns(citizens), k=3, threads=threads)
    cut, mid, top = (int(v) for v in np.percentile(scores, [10, 40, 75]))
    everyday = {Scene.BUS: 1, Scene.METRO: 1, Scene.FERRY: 1, Scene.LIBRARY: 1,
                Scene.CANTEEN: 1}
    policy = LimitPolicy((
        LimitBand(cut, {s: 3_000 for s in everyday}),
        LimitBand(mid, {**{s: 8_000 for s in everyday}, Scene.CLINIC: 8_000}),
        LimitBand(top, {**{s: 20_000 for s in Scene}}),
    ))
    per_scene = policy.limits(scores)
    limit = np.max(np.stack([per_scene[s] for s in Scene]), axis=0)
    report.credit = {
        "card_id": card.card_id,
        # AUC needs goods and bads: a handful of citizens may hold no bads.
        "auc": round(auc(scores, bad), 4) if 0 < bad.sum() < len(bad) else None,
        "score_p10_p50_p90": [int(v) for v in np.percentile(scores, [10, 50, 90])],
        "no_credit": int(np.count_nonzero(limit == 0)),
        "categorical_features": [f.name for f in card.features if isinstance(f, CategoryBins)],
        "top_reason": card.feature_names[int(np.bincount(
            reasons[:, 0][reasons[:, 0] >= 0]).argmax())] if np.any(reasons[:, 0] >= 0) else "",
    }
    st.say(f"card {card.card_id}: AUC {report.credit['auc']}, "
           f"{report.credit['no_credit']:,} citizens below the cut-off get no offline credit")
    scenes = np.stack([per_scene[s] > 0 for s in Scene], axis=1)
    # The hidden truth (`bad`) decides, later, who pays late or not at all.
    return card, {"limit": limit, "scenes": scenes, "score": scores, "bad": bad}


def _columns(people: CategoricalHistories) -> dict[str, npt.NDArray[Any]]:
    """The 12 numeric and 6 categorical features by name, as fit and score
    take them (no pandas needed)."""
    numeric = {name: people.X[:, i] for i, name in enumerate(people.numeric_features)}
    return {**numeric, **people.categorical}


def _issue(report: Report, st: _Stages, rng: random.Random, workdir: Path, card: Scorecard,
           limits: dict[str, npt.NDArray[Any]], threads: int) -> _City:
    issuer = IssuerKey(rng.randbytes(32))
    trust = TrustStore(cache_size=max(1024, 2 * len(limits["limit"])))
    trust.add(issuer, not_before=DAY_START - 365 * DAY, not_after=DAY_START + 365 * DAY,
              roles=Role.CREDENTIALS | Role.DENY_LIST | Role.SCORECARD)
    eligible = np.flatnonzero(limits["limit"] > 0)
    citizens: list[_Citizen] = []
    with st.stage("credentials issued", len(eligible)):
        for i in eligible:
            device = DeviceKey(rng.randbytes(32))
            scenes = [s for s in Scene if limits["scenes"][i, s]]
            cred = issuer.issue(100_000 + int(i), device.public, int(limits["limit"][i]), scenes,
                                DAY_START - 7 * DAY, DAY_START + 30 * DAY, serial=1_000_000 + int(i))
            citizens.append(_Citizen(100_000 + int(i), device, cred))
    policy = GatewayPolicy()
    gateways = {name: Gateway(workdir / "gateways" / name, GatewayKey(rng.randbytes(32)), trust,
                              policy)
                for name, _scene, _fare in GATEWAYS}
    settlement = Settlement(workdir / "settlement", trust, threads=threads)
    for name, gateway in gateways.items():
        settlement.register_gateway(gateway.key.public, OPERATOR_OF[name])
    settlement.set_fee_schedule(FEES)
    return _City(issuer, trust, citizens, gateways, {n: s for n, s, _ in GATEWAYS},
                 {n: f for n, _, f in GATEWAYS}, settlement, SettlementKey(rng.randbytes(32)),
                 citizens_by_account={c.account: c for c in citizens})


# -- the day ----------------------------------------------------------------------------------

@dataclass
class _Scan:
    at: int
    gateway: str
    token: bytes
    amount: int
    tag: str = ""          # set for planted scans, to find their outcome


def _ride(report: Report, st: _Stages, city: _City, plants: _Plants | None, trips: int,
          seed: int, threads: int, day: int = 0) -> None:
    """One day of rides (`day` days after the first), with the planted
    attacks when `plants` is given."""
    gen = np.random.default_rng(seed)
    start = DAY_START + day * DAY
    riders = [c for c in city.citizens if plants is None or not plants.is_special(c)]
    n = len(riders) * trips
    names = [name for name, _s, _f in GATEWAYS]
    # Each ride: a time in the day and a gateway whose scene the credential allows.
    times = gen.integers(start + 6 * HOUR, start + 23 * HOUR, size=n)
    who = np.repeat(np.arange(len(riders)), trips)
    order = np.lexsort((times, who))
    times, who = times[order], who[order]
    allowed = [[g for g in names if city.scene_of[g] in r.credential.scenes] for r in riders]
    picks = gen.random(n)
    where = [allowed[w][int(p * len(allowed[w]))] for w, p in zip(who, picks)]
    # Honest riders stay within their limit for the day: only planted
    # overspenders should be flagged by settlement.
    fares = np.array([city.fare_of[g] for g in where], dtype=np.int64)
    spent = np.cumsum(fares)
    first = np.r_[0, np.flatnonzero(np.diff(who)) + 1]
    starts = np.repeat(first, np.diff(np.r_[first, n]))
    spent_today = spent - spent[starts] + fares[starts]
    limit = np.array([riders[w].credential.limit for w in who], dtype=np.int64)
    keep = np.flatnonzero(spent_today <= limit)
    times, who = times[keep], who[keep]
    where = [where[i] for i in keep]
    n = len(keep)
    counters = np.zeros(n, dtype=np.uint32)
    for i, w in enumerate(who):
        riders[w].counter += 1
        counters[i] = riders[w].counter
    suffix = f", day {day + 1}" if day else ""
    with st.stage("tokens made on phones" + suffix, n):
        tokens = generate_batch([riders[w].credential for w in who],
                                [riders[w].device for w in who],
                                np.array([city.scene_of[g] for g in where], dtype=np.uint8),
                                counters, times.astype(np.uint32), threads=threads)
    scans = [_Scan(int(t), g, tokens[i].tobytes(), city.fare_of[g])
             for i, (t, g) in enumerate(zip(times, where))]
    if plants is not None:
        scans += plants.during_day(scans)
    scans.sort(key=lambda s: s.at)
    outcomes: dict[str, list[tuple[Reason, bool]]] = defaultdict(list)
    by_reason: dict[str, int] = defaultdict(int)
    with st.stage("scans at gateways, journaled, hourly uploads" + suffix, len(scans)):
        hour_end = start + 7 * HOUR
        pending: dict[str, list[_Scan]] = defaultdict(list)
        window_end = scans[0].at - scans[0].at % WINDOW + WINDOW if scans else 0
        for scan in scans + [_Scan(start + DAY, "", b"", 0)]:
            if scan.at >= window_end:
                for name, batch in pending.items():
                    _scan_batch(city.gateways[name], city.scene_of[name], batch, outcomes,
                                by_reason)
                pending.clear()
                while scan.at >= hour_end:  # every gateway uploads once an hour
                    _upload_all(city, hour_end)
                    hour_end += HOUR
                window_end = scan.at - scan.at % WINDOW + WINDOW
            if scan.gateway:
                pending[scan.gateway].append(scan)
        _upload_all(city, max(hour_end, max(g.time_floor for g in city.gateways.values())))
    report.scans += len(scans)
    for name, count in by_reason.items():
        report.by_reason[name] = report.by_reason.get(name, 0) + count
    report.by_reason = dict(sorted(report.by_reason.items()))
    report.accepted = report.by_reason.get("OK", 0)
    if plants is not None:
        plants.outcomes = outcomes


def _scan_batch(gateway: Gateway, scene: Scene, batch: list[_Scan],
                outcomes: dict[str, list[tuple[Reason, bool]]],
                by_reason: dict[str, int]) -> None:
    result = gateway.scan_batch([s.token for s in batch], [s.amount for s in batch], scene,
                                now=max(s.at for s in batch))
    for s, reason, receipt in zip(batch, result.reasons, result.receipts):
        code = Reason(int(reason))
        duplicate = receipt is not None and receipt.duplicate
        by_reason["OK (double tap)" if duplicate else code.name] += 1
        if s.tag:
            outcomes[s.tag].append((code, duplicate))


def _upload_all(city: _City, at: int) -> None:
    """Every gateway uploads at `at`: a payment is outstanding offline until then."""
    for gateway in city.gateways.values():
        while (batch := gateway.export_batch(max_records=5_000, now=at)) is not None:
            result = city.settlement.ingest(batch)
            city.uploads.append(batch)
            if result.status in (IngestStatus.APPLIED, IngestStatus.EXISTS):
                gateway.ack(result.seq)


# -- settlement -------------------------------------------------------------------------------

def _settle(report: Report, st: _Stages, city: _City, plants: _Plants) -> SettlementReport:
    s = city.settlement
    with st.stage("settlement report (re-ingest of every upload first)", len(city.uploads)):
        before = s.report()
        # Networks retry: every batch arrives a second time and must change nothing.
        statuses = [s.ingest(b).status for b in city.uploads]
        final = s.report()
    if any(x != IngestStatus.EXISTS for x in statuses):
        report.failures.append("a re-delivered batch was not answered 'exists'")
    if not (np.array_equal(before.amounts, final.amounts)
            and len(before.findings) == len(final.findings)):
        report.failures.append("re-delivered batches changed the settlement")
    journaled = sum(r.amount for g in city.gateways.values() for r in g.records())
    flagged = final.rejected_total
    report.money = {"accepted_at_gateways": journaled, "charged": final.charged_total,
                    "not_charged_flagged": flagged,
                    "unaccounted": journaled - final.charged_total - flagged}
    if report.money["unaccounted"] != 0:
        report.failures.append(f"money does not add up: {report.money}")
    kinds: dict[str, int] = defaultdict(int)
    for f in final.findings:
        kinds[f.kind] += 1
    report.settlement = {"batches": s.batch_count(), "records": final.records,
                         "accounts_charged": len(final.accounts), "findings": dict(kinds)}
    if final.of_kind("sequence_gap"):
        report.failures.append("settlement saw a sequence gap: an upload was lost")
    return final


# -- periods and clearing ---------------------------------------------------------------------

def _morning(city: _City, day: int) -> None:
    """Each morning the gateways load the day's deny list (an older one makes
    them refuse all but small amounts)."""
    at = DAY_START + day * DAY
    document, _added = city.settlement.publish_deny_list(city.issuer, at)
    for gateway in city.gateways.values():
        gateway.update_deny_list(document, now=at)


def _close_day(report: Report, st: _Stages, city: _City, day: int,
               open_report: SettlementReport) -> PeriodSummary:
    """Close the day as a settlement period and check its clearing: riders
    charged = operators owed before fees = fees + net payables; flagged money
    listed apart; and every payment the gateways accepted that day accounted
    for."""
    s = city.settlement
    until = DAY_START + (day + 1) * DAY
    with st.stage(f"period {day + 1} closed, archived and cleared", open_report.records):
        closed = s.close_period(until, city.settlement_key, now=until + HOUR)
    gross = sum(c.gross for c in closed.clearing)
    fee, net = sum(c.fee for c in closed.clearing), sum(c.net for c in closed.clearing)
    flagged = sum(c.flagged_amount for c in closed.clearing)
    accepted = sum(r.amount for g in city.gateways.values() for r in g.records()
                   if until - DAY <= r.gateway_time < until)
    entry = {"period": closed.number, "records": closed.records,
             "charged": closed.charged_total, "owed_before_fees": gross, "fees": fee,
             "net_payable": net, "flagged_not_charged": flagged,
             "accepted_at_gateways": accepted,
             "operators": {c.operator: c.net for c in closed.clearing if c.gross}}
    report.periods.append(entry)
    if not (closed.charged_total == gross == fee + net and flagged == closed.rejected_total
            and closed.charged_total + closed.rejected_total == accepted
            and open_report.charged_total == closed.charged_total):
        report.failures.append(f"period {closed.number} does not add up: {entry}")
    st.say(f"period {closed.number}: charged {closed.charged_total:,} = fees {fee:,} + "
           f"payable to {sum(1 for c in closed.clearing if c.gross)} operators {net:,}; "
           f"flagged {flagged:,} listed apart")
    return closed


def _statements_still_verify(report: Report, city: _City, closes: list[PeriodSummary]) -> None:
    """After the last day, the first day's statements read back from the
    archive and verify offline with the settlement key's public half."""
    s = city.settlement
    first = closes[0]
    verified = 0
    for c in first.clearing:
        statement = clearing.verify_statement(s.statement(first.number, c.operator),
                                              city.settlement_key.public)
        verified += statement.net == c.net and statement.gross == c.gross
    for closed in closes:
        archive.verify_period(s.archive, closed.number)
    if verified != len(first.clearing) or archive.list_periods(s.archive) != [
            closed.number for closed in closes]:
        report.failures.append("day 1's statements or the archive do not verify after "
                               f"day {len(closes)}")
    report.settlement["periods_closed"] = len(closes)
    report.settlement["day_1_statements_verified"] = verified


def _charges(s: Settlement, periods: int) -> SettlementReport:
    """Every account's charges over the closed periods (for the bank debit)."""
    totals: dict[int, int] = defaultdict(int)
    for n in range(1, periods + 1):
        period = s.period_report(n)
        for account, amount in zip(period.accounts.tolist(), period.amounts.tolist()):
            totals[int(account)] += int(amount)
    accounts = np.array(sorted(totals), dtype=np.uint64)
    amounts = np.array([totals[int(a)] for a in accounts.tolist()], dtype=np.int64)
    return SettlementReport(accounts, amounts, np.zeros(len(accounts), dtype=np.int64),
                            charged_total=int(amounts.sum()))


# -- the month after ---------------------------------------------------------------------------

LOOK_AT = DAY_START + 29 * DAY     # a month on (the day's credentials are still valid)
DENY_DAYS_PAST_DUE = 14


def _pay_later(report: Report, st: _Stages, city: _City, final: SettlementReport,
               people: dict[str, npt.NDArray[Any]], rng: random.Random,
               defaulter: int) -> tuple[list[int], npt.NDArray[np.void]]:
    """Every charged account repays (or not) by how reliable it really is, and
    the planted `defaulter` never does; returns the serials of accounts
    DENY_DAYS_PAST_DUE or more days behind, and the credit history at LOOK_AT."""
    gen = np.random.default_rng(rng.randrange(2**32))
    accounts, amounts = final.accounts.astype(np.int64), final.amounts
    index = accounts - 100_000                    # citizen i holds account 100_000 + i
    bad = people["bad"][index]
    # Charges fall due a week after the ride. Reliable riders mostly pay within
    # days; riders who default in truth pay weeks late, or never.
    late = np.where(bad, gen.random(len(accounts)) < 0.6, gen.random(len(accounts)) < 0.03)
    never = (bad & (gen.random(len(accounts)) < 0.4)) | (accounts == defaulter)
    days = np.where(late, gen.integers(9, 24, len(accounts)), gen.integers(1, 6, len(accounts)))
    payers = ~never
    with st.stage("repayments recorded (one bank file)", int(payers.sum())):
        city.settlement.record_repayments(accounts[payers], amounts[payers],
                                          DAY_START + days[payers] * DAY + gen.integers(
                                              0, DAY, int(payers.sum())),
                                          [f"bank-{a}" for a in accounts[payers].tolist()])
    with st.stage("credit history a month on", len(accounts)):
        history = city.settlement.credit_history(LOOK_AT)
    rows = history[np.isin(history["account"], accounts)]
    if not np.array_equal(rows["charged"], amounts):
        report.failures.append("credit history and the settlement report disagree on charges")
    paid_late = (rows["late_charges"] > 0)
    behind = rows["account"][rows["days_past_due"] >= DENY_DAYS_PAST_DUE].astype(np.int64)
    scores = people["score"][index]
    report.repayment = {
        "accounts_charged": len(rows),
        "paid_on_time": int(np.count_nonzero(rows["on_time_share"] == 1.0)),
        "paid_late_or_not_yet": int(np.count_nonzero(paid_late)),
        "overdue_accounts": int(np.count_nonzero(rows["overdue"] > 0)),
        "overdue_amount": int(rows["overdue"].sum()),
        "repaid": int(rows["repaid"].sum()),
        f"denied_{DENY_DAYS_PAST_DUE}_days_past_due": len(behind),
        # How well the morning's scores ranked who would pay late.
        "auc_scores_vs_paying_late": (round(auc(scores, paid_late), 4)
                                      if 0 < paid_late.sum() < len(paid_late) else None),
    }
    st.say(f"a month on: {report.repayment['overdue_accounts']:,} accounts overdue "
           f"({report.repayment['overdue_amount']:,}), {len(behind):,} of them "
           f"{DENY_DAYS_PAST_DUE}+ days past due")
    return [city.citizens_by_account[int(a)].credential.serial for a in behind], history


# -- planted fraud ----------------------------------------------------------------------------

class _Plants:
    """Each attack is planted, then checked where it must be caught."""

    def __init__(self, city: _City, rng: random.Random) -> None:
        self.city = city
        self.rng = rng
        self.planted: list[Planted] = []
        self.outcomes: dict[str, list[tuple[Reason, bool]]] = {}
        pool = list(city.citizens)
        rng.shuffle(pool)
        everywhere = [c for c in pool if Scene.CLINIC in c.credential.scenes]
        self.revoked, self.cloned, self.overspender, self.skewed = everywhere[:4]
        self.special = {id(c) for c in (self.revoked, self.cloned, self.overspender,
                                        self.skewed)}
        self.flag_expected: set[int] = set()

    def is_special(self, citizen: _Citizen) -> bool:
        return id(citizen) in self.special

    def _plant(self, name: str, expected: str) -> Planted:
        p = Planted(name, expected)
        self.planted.append(p)
        return p

    def before_day(self) -> None:
        # The issuer revokes one account before the day: deny list version 1.
        deny, _added = self.city.settlement.publish_deny_list(
            self.city.issuer, DAY_START, revoke=[self.revoked.credential.serial])
        for g in self.city.gateways.values():
            g.update_deny_list(deny, now=DAY_START)

    def during_day(self, honest: list[_Scan]) -> list[_Scan]:
        c = self.city
        extra: list[_Scan] = []
        noon = DAY_START + 12 * HOUR

        def scan(tag: str, at: int, gateway: str, token: bytes, amount: int) -> None:
            extra.append(_Scan(at, gateway, token, amount, tag))

        def token_of(citizen: _Citizen, at: int, scene: Scene) -> bytes:
            citizen.counter += 1
            return core.make_token(citizen.credential.raw, citizen.device._secret, at,
                                   citizen.counter, scene)

        # A screenshot of a token shown again at the same bus, then at another bus.
        victim = next(s for s in honest if s.gateway == "bus-1" and 8 * HOUR < s.at - DAY_START)
        scan("screenshot-same", victim.at + 10, "bus-1", victim.token, victim.amount)
        scan("screenshot-other", victim.at + 20, "bus-2", victim.token, victim.amount)
        # A revoked account tries to ride.
        scan("revoked", noon, "bus-3", token_of(self.revoked, noon, Scene.BUS), 200)
        # A forged credential: the limit raised in the bytes, re-signed by the device.
        forged = bytearray(self.skewed.credential.raw)
        forged[CRED_LIMIT:CRED_LIMIT + 4] = (10_000_000).to_bytes(4, "little")
        scan("forged", noon + 5, "metro-1",
             core.make_token(bytes(forged), self.skewed.device._secret, noon + 5, 900,
                             Scene.METRO), 400)
        # A stolen credential shown from the thief's phone.
        thief = DeviceKey(self.rng.randbytes(32))
        scan("stolen", noon + 6, "metro-1",
             core.make_token(self.skewed.credential.raw, thief._secret, noon + 6, 901,
                             Scene.METRO), 400)
        # An expired credential.
        old = c.issuer.issue(999_001, self.skewed.device.public, 5_000, [Scene.BUS],
                             DAY_START - 60 * DAY, DAY_START - DAY, serial=990_001)
        scan("expired", noon + 7, "bus-1",
             core.make_token(old.raw, self.skewed.device._secret, noon + 7, 1, Scene.BUS), 200)
        # A phone whose clock runs ten minutes fast.
        scan("skewed-clock", noon + 8, "bus-2",
             core.make_token(self.skewed.credential.raw, self.skewed.device._secret,
                             noon + 8 + 600, 902, Scene.BUS), 200)
        # An over-limit spender: two clinics offline, each within its own cap,
        # together over the credential's limit; a third try at the first is refused.
        limit = self.overspender.credential.limit
        part = limit * 7 // 10
        for tag, at, gw in (("overspend-a", noon + 60, "clinic-1"),
                            ("overspend-b", noon + 120, "clinic-2"),
                            ("overspend-c", noon + 180, "clinic-1")):
            scan(tag, at, gw, token_of(self.overspender, at, Scene.CLINIC), part)
        self.flag_expected.add(self.overspender.credential.serial)
        # A cloned phone: the same device key and credential on a second phone
        # whose counter starts where the original's did.
        start = self.cloned.counter
        for k, (at, gw) in enumerate(((noon + 300, "bus-1"), (noon + 900, "metro-1"))):
            self.cloned.counter = start + k
            scan("clone-original", at, gw, token_of(self.cloned, at, Scene.BUS if gw == "bus-1"
                                                    else Scene.METRO), c.fare_of[gw])
        self.cloned.counter = start
        for k, (at, gw) in enumerate(((noon + 600, "bus-3"), (noon + 1200, "ferry-1"))):
            self.cloned.counter = start + k
            scan("clone-copy", at, gw, token_of(self.cloned, at, Scene.BUS if gw == "bus-3"
                                                else Scene.FERRY), c.fare_of[gw])
        self.flag_expected.add(self.cloned.credential.serial)
        self.screenshot_serial = int.from_bytes(
            victim.token[CRED_SERIAL:CRED_SERIAL + 8], "little")
        self.flag_expected.add(self.screenshot_serial)
        return extra

    def after_scans(self) -> None:
        def seen(tag: str) -> list[tuple[Reason, bool]]:
            return self.outcomes.get(tag, [])

        def check(name: str, expected: str, tag: str, ok: Callable[[list[tuple[Reason, bool]]],
                                                                   bool]) -> None:
            p = self._plant(name, expected)
            got = seen(tag)
            p.observed = ", ".join(("OK (double tap)" if d else r.name) for r, d in got) or "-"
            p.caught = bool(got) and ok(got)

        check("screenshot shown again at the same bus", "double tap: first receipt, no charge",
              "screenshot-same", lambda g: all(d for _r, d in g))
        check("revoked account", "REVOKED at the gateway", "revoked",
              lambda g: all(r == Reason.REVOKED for r, _d in g))
        check("forged credential (limit raised)", "BAD_ISSUER_SIGNATURE", "forged",
              lambda g: all(r == Reason.BAD_ISSUER_SIGNATURE for r, _d in g))
        check("stolen credential on a thief's phone", "BAD_DEVICE_SIGNATURE", "stolen",
              lambda g: all(r == Reason.BAD_DEVICE_SIGNATURE for r, _d in g))
        check("expired credential", "CREDENTIAL_EXPIRED", "expired",
              lambda g: all(r == Reason.CREDENTIAL_EXPIRED for r, _d in g))
        check("phone clock ten minutes fast", "TOKEN_FROM_FUTURE", "skewed-clock",
              lambda g: all(r == Reason.TOKEN_FROM_FUTURE for r, _d in g))
        check("over-limit spender, third scan at one clinic", "OVER_OFFLINE_LIMIT",
              "overspend-c", lambda g: all(r == Reason.OVER_OFFLINE_LIMIT for r, _d in g))

    def after_settlement(self, final: SettlementReport) -> None:
        def findings(kind: str, serial: int) -> list[Any]:
            return [f for f in final.of_kind(kind) if f.serial == serial]

        shot = self.screenshot_serial
        p = self._plant("screenshot shown at another bus", "double_spend naming both gateways")
        hits = findings("double_spend", shot)
        p.caught = any({self.city.gateways["bus-1"].id, self.city.gateways["bus-2"].id}
                       == set(f.gateways) for f in hits)
        p.observed = f"{len(hits)} double_spend finding(s)"
        p = self._plant("over-limit spender across two clinics", "overspend")
        hits = findings("overspend", self.overspender.credential.serial)
        p.caught = bool(hits)
        p.observed = hits[0].detail if hits else "no finding"
        p = self._plant("cloned phone", "clone")
        hits = findings("clone", self.cloned.credential.serial)
        p.caught = bool(hits)
        p.observed = f"{len(hits)} clone finding(s)"

        # The new deny list carries every flagged credential, and gateways refuse them.
        document, added = self.city.settlement.publish_deny_list(self.city.issuer,
                                                                 DAY_START + DAY)
        p = self._plant("flagged credentials denied everywhere", "REVOKED after deny list v2")
        missing = self.flag_expected - set(added)
        gateway = self.city.gateways["bus-1"]
        gateway.update_deny_list(document, now=DAY_START + DAY)
        at = DAY_START + DAY + 60
        probe = core.make_token(self.cloned.credential.raw, self.cloned.device._secret, at,
                                self.cloned.counter + 100, Scene.BUS)
        refused = gateway.scan_batch([probe], [200], Scene.BUS, now=at).reasons[0]
        p.caught = bool(not missing and refused == Reason.REVOKED)
        p.observed = (f"deny list v{gateway.deny_list.version} adds {len(added)}; "
                      f"clone's next scan: {Reason(int(refused)).name}")


    def pick_defaulter(self, final: SettlementReport) -> int:
        """A rider charged yesterday, not part of any other plant, who will never pay."""
        charged = {int(a) for a in final.accounts}
        pool = [c for c in self.city.citizens
                if c.account in charged and not self.is_special(c)
                and c.credential.serial not in self.flag_expected]
        self.defaulter = self.rng.choice(pool)
        self.special.add(id(self.defaulter))
        return self.defaulter.account

    def after_a_month(self, behind: list[int], history: npt.NDArray[np.void]) -> None:
        c = self.city
        p = self._plant("rider who stopped paying",
                        f"REVOKED once {DENY_DAYS_PAST_DUE} days past due, on-time payers not")
        document, added = c.settlement.publish_deny_list(c.issuer, LOOK_AT, revoke=behind)
        gateway = c.gateways["bus-1"]
        gateway.update_deny_list(document, now=LOOK_AT)
        # (publishing the deny list changed nothing the history reads)
        on_time = {int(a) for a in history["account"][history["on_time_share"] == 1.0]}
        denied = {int(x) for x in gateway.deny_list.serials}   # fraud flags count too
        punctual = next((x for x in c.citizens if x.account in on_time
                         and x.credential.serial not in denied and not self.is_special(x)),
                        None)
        if punctual is None:
            p.observed = "no on-time payer to check the rule against"
            return
        at = LOOK_AT + 60
        probes = [core.make_token(x.credential.raw, x.device._secret, at, x.counter + 1000,
                                  Scene.BUS) for x in (self.defaulter, punctual)]
        reasons = [Reason(int(r)) for r in
                   gateway.scan_batch(probes, [200, 200], Scene.BUS, now=at).reasons]
        p.caught = (self.defaulter.credential.serial in added
                    and reasons == [Reason.REVOKED, Reason.OK])
        p.observed = (f"deny list v{gateway.deny_list.version} adds {len(added)}; defaulter's "
                      f"next scan: {reasons[0].name}, an on-time payer's: {reasons[1].name}")


def format_report(report: Report) -> str:
    m = report.money
    lines = [
        f"qrpay simulate: {report.citizens:,} citizens, seed {report.seed}, "
        f"backend {report.backend}, {report.threads} threads",
        f"credit: card {report.credit.get('card_id')}, AUC {report.credit.get('auc')}, "
        f"scores p10/p50/p90 {report.credit.get('score_p10_p50_p90')}, "
        f"{report.credit.get('no_credit', 0):,} without offline credit",
        f"scans: {report.scans:,}, accepted {report.accepted:,}",
        "by outcome:",
        *(f"  {name:<30}{count:>10,}" for name, count in report.by_reason.items()),
        "money (minor units):",
        f"  accepted at gateways {m.get('accepted_at_gateways', 0):>14,}",
        f"  charged              {m.get('charged', 0):>14,}",
        f"  flagged, not charged {m.get('not_charged_flagged', 0):>14,}",
        f"  unaccounted          {m.get('unaccounted', 0):>14,}",
        f"settlement: {report.settlement}",
        "periods (charged = fees + net payable; flagged apart):",
        *(f"  {p['period']:>3}: charged {p['charged']:>12,} fees {p['fees']:>10,} net "
          f"{p['net_payable']:>12,} flagged {p['flagged_not_charged']:>9,}"
          for p in report.periods),
        f"a month later: {report.repayment}",
        "planted attacks:",
        *(f"  [{'caught' if p.caught else 'MISSED'}] {p.name}: expected {p.expected}; "
          f"saw {p.observed}" for p in report.planted),
        "throughput:",
        *(f"  {name:<52}{s['per_second']:>11,.0f}/s ({s['seconds']:.2f} s)"
          for name, s in report.stages.items()),
        "result: " + ("OK" if not report.failures else "FAILED: " + "; ".join(report.failures)),
    ]
    return "\n".join(lines)
