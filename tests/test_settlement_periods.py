"""Settlement periods through the store: close_period archives a day,
clears it to operators with signed statements, carries forward what the
next day needs; late batches settle in the next period; a store closed
every few hours reports what a store never closed reports."""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qrpay import GatewayKey, IssuerKey, Scene, TrustStore, archive, credit, errors
from qrpay.clearing import FeeSchedule, statement_csv, verify_statement, verify_statement_csv
from qrpay.keys import SettlementKey
from qrpay.periods import (
    Carry, charges_from_table, charges_table, pack_tables, settle_period, unpack_tables,
)
from qrpay.reports import build_report, report_from_tables
from qrpay.settlement import IngestStatus, Settlement
from test_settlement import NOW, Rider, craft, make_rider

DAY = 86_400
SETTLEMENT_KEY = SettlementKey(b"\x07" * 32)
FEES = FeeSchedule(version=1, bps={scene: 150 if scene is Scene.BUS else 0 for scene in Scene},
                   effective_from=0)
OPERATORS = ("bus-co", "bus-co", "clinic")
from stores import open_settlement

pytestmark = pytest.mark.usefixtures("each_store")


@pytest.fixture
def keys() -> list[GatewayKey]:
    return [GatewayKey(bytes([60 + i]) * 32) for i in range(3)]


def store(path: Path, trust: TrustStore, keys: list[GatewayKey], **options: Any) -> Settlement:
    s = open_settlement(path, trust, **options)
    for key, operator in zip(keys, OPERATORS):
        s.register_gateway(key.public, operator)
    s.set_fee_schedule(FEES)
    return s


class Uploads:
    """Signed batches per gateway, numbered as a gateway numbers them."""

    def __init__(self, keys: list[GatewayKey]) -> None:
        self.keys, self.seq, self.record = keys, [0] * len(keys), [0] * len(keys)

    def batch(self, gw: int, scans: list[tuple[bytes, int, Scene, int]], created_at: int
              ) -> bytes:
        self.seq[gw] += 1
        first = self.record[gw] + 1
        self.record[gw] += len(scans)
        return craft(self.keys[gw], self.seq[gw], first,
                     [(t, a, int(sc), at) for t, a, sc, at in scans], created_at=created_at)


def test_close_archives_the_day_and_clears_it_to_operators(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]) -> None:
    s = store(tmp_path / "s", deny_trust, keys)
    up = Uploads(keys)
    a, b, c = (make_rider(issuer, 21 + i) for i in range(3))
    screenshot = a.token(NOW + 100, 1)
    day1 = [(0, [(screenshot, 300, Scene.BUS, NOW + 100), (b.token(NOW + 200, 1), 250,
                                                          Scene.BUS, NOW + 200)]),
            (1, [(screenshot, 300, Scene.BUS, NOW + 130)]),        # shown twice: not charged
            (2, [(c.token(NOW + 300, 1, Scene.CLINIC), 1_000, Scene.CLINIC, NOW + 300)])]
    for gw, scans in day1:
        assert s.ingest(up.batch(gw, scans, NOW + 3_600)).status is IngestStatus.APPLIED
    # Day 2 arrives before the close: it stays in the open period.
    s.ingest(up.batch(0, [(a.token(NOW + DAY + 50, 2), 400, Scene.BUS, NOW + DAY + 50)],
                      NOW + DAY + 60))
    before = s.report()
    assert before.charged_total == 300 + 250 + 1_000 + 400

    closed = s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY + 120)
    assert (closed.number, closed.from_time, closed.until) == (1, 0, NOW + DAY)
    assert (closed.records, closed.charged_total, closed.rejected_total) == (4, 1_550, 300)
    # What riders are charged is what operators are owed before fees;
    # fees and net payables add up to it; the screenshot is listed apart.
    by_operator = {c.operator: c for c in closed.clearing}
    assert sum(c.gross for c in closed.clearing) == closed.charged_total
    assert all(c.fee + c.net == c.gross for c in closed.clearing)
    assert by_operator["bus-co"].gross == 550 and by_operator["bus-co"].fee == 550 * 150 // 10_000
    assert by_operator["bus-co"].flagged_amount == 300
    assert by_operator["clinic"].gross == 1_000 and by_operator["clinic"].fee == 0

    period = s.period_report(1)
    assert period.charged_total == 1_550 and period.records == 4 and period.until == NOW + DAY
    assert {f.kind for f in period.findings} == {"double_spend"}
    assert period.flagged_serials() == {a.serial}
    now_open = s.report()
    assert (now_open.period, now_open.from_time, now_open.records) == (2, NOW + DAY, 1)
    assert now_open.charged_total == 400 and not now_open.findings
    assert period.charged_total + now_open.charged_total == before.charged_total

    # Each operator verifies its statement offline with the settlement key.
    for operator in ("bus-co", "clinic"):
        signed = s.statement(1, operator)
        statement = verify_statement(signed, SETTLEMENT_KEY.public)
        assert statement.gross == by_operator[operator].gross and statement.period == 1
        verify_statement_csv(statement_csv(statement), signed, SETTLEMENT_KEY.public)
    with pytest.raises(errors.BadSignature):
        verify_statement(s.statement(1, "bus-co"), SettlementKey(b"\x08" * 32).public)

    # The archive: one folder, readable without qrpay; the live store holds day 2 only.
    assert archive.list_periods(s.archive) == [1]
    tables, summary = archive.read_period(s.archive, 1, ("records",))
    assert sorted(tables["records"]["amount"].tolist()) == [250, 300, 300, 1_000]
    assert summary == s.period_summary(1)
    live = s._query("SELECT COUNT(*) FROM batches WHERE length(records) > 0")[0][0]
    assert live == 1 and s.batch_count() == 4
    # A flagged credential stays on the next deny list after its period closed.
    _doc, added = s.publish_deny_list(issuer, issued_at=NOW + DAY + 200)
    assert added == [a.serial]
    s.close()


def test_pandas_reads_a_closed_period(tmp_path: Path, deny_trust: TrustStore,
                                      issuer: IssuerKey, keys: list[GatewayKey]) -> None:
    pandas = pytest.importorskip("pandas")   # in the test extra: never skipped in CI
    s = store(tmp_path / "s", deny_trust, keys, archive_format="parquet")
    up = Uploads(keys)
    rider = make_rider(issuer, 30)
    s.ingest(up.batch(0, [(rider.token(NOW + 10, 1), 123, Scene.BUS, NOW + 10)], NOW + 20))
    s.close_period(NOW + 100, SETTLEMENT_KEY, now=NOW + 100)
    folder = archive.period_dir(s.archive, 1)
    frame = pandas.read_parquet(folder / "records.parquet")
    verdicts = pandas.read_parquet(folder / "verdicts.parquet")   # row for row
    assert frame["amount"].tolist() == [123] and verdicts["charged"].tolist() == [True]
    assert frame["gateway"].tolist() == [keys[0].public.gateway_id]
    # The tokens, by gateway and record number (the files tokens_*.parquet).
    tokens = pandas.concat([pandas.read_parquet(f) for f in sorted(folder.glob("tokens_*"))])
    joined = frame.merge(tokens, on=["gateway", "record"])
    assert bytes(joined["token"].iloc[0]) == rider.token(NOW + 10, 1)
    assert joined["gateway_time_x"].tolist() == joined["gateway_time_y"].tolist() == [NOW + 10]
    s.close()


def test_a_late_batch_settles_in_the_next_period(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]) -> None:
    s = store(tmp_path / "s", deny_trust, keys)
    up = Uploads(keys)
    rider, other = make_rider(issuer, 40), make_rider(issuer, 41)
    screenshot = rider.token(NOW + DAY - 300, 7)
    s.ingest(up.batch(0, [(screenshot, 200, Scene.BUS, NOW + DAY - 300)], NOW + DAY - 200))
    s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY + 10)
    # A bus that was offline uploads the evening's scans the next morning:
    # the same screenshot, and an honest ride.
    late = up.batch(1, [(screenshot, 200, Scene.BUS, NOW + DAY - 280),
                        (other.token(NOW + DAY - 100, 1), 90, Scene.BUS, NOW + DAY - 100)],
                    NOW + DAY + 4 * 3_600)
    assert s.ingest(late).status is IngestStatus.APPLIED
    report = s.report()
    # Charged in the open period, at their scan times (the credit history's due dates).
    assert report.period == 2 and report.charged_total == 90 and report.rejected_total == 200
    [found] = report.findings
    assert found.kind == "double_spend" and found.records[0][0] == keys[0].public.gateway_id
    history = s.credit_history(NOW + 2 * DAY)
    assert dict(zip(history["account"].tolist(), history["charged"].tolist())) == {
        rider.account: 200, other.account: 90}
    s.close()


def test_closes_refuse_what_they_must(tmp_path: Path, deny_trust: TrustStore,
                                      keys: list[GatewayKey]) -> None:
    bare = open_settlement(tmp_path / "bare", deny_trust)
    with pytest.raises(errors.InvalidArgument, match="fee schedule"):
        bare.close_period(NOW, SETTLEMENT_KEY, now=NOW)
    bare.close()
    s = store(tmp_path / "s", deny_trust, keys)
    with pytest.raises(errors.InvalidKey):
        s.close_period(NOW, IssuerKey(b"\x01" * 32), now=NOW)    # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        s.close_period(NOW, SETTLEMENT_KEY, now=NOW - 1)        # closed before its end
    s.close_period(NOW, SETTLEMENT_KEY, now=NOW)
    for until in (NOW, NOW - 5):
        with pytest.raises(errors.PeriodClosed):
            s.close_period(until, SETTLEMENT_KEY, now=NOW + 10)
    with pytest.raises(errors.Conflict):
        s.set_fee_schedule(FeeSchedule(1, {scene: 1 for scene in Scene}, 0))
    assert not s.set_fee_schedule(FEES)
    with pytest.raises(errors.InvalidArgument, match="horizon"):
        open_settlement(tmp_path / "s", deny_trust, horizon=60).close()
    with pytest.raises(errors.InvalidArgument):
        s.period_report(2)
    with pytest.raises(errors.InvalidArgument):
        s.register_gateway(keys[0].public, "=HYPERLINK(1)")
    s.close()


def test_a_close_that_failed_to_commit_closes_again(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey],
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(tmp_path / "s", deny_trust, keys)
    up = Uploads(keys)
    rider = make_rider(issuer, 50)
    s.ingest(up.batch(0, [(rider.token(NOW + 10, 1), 70, Scene.BUS, NOW + 10)], NOW + 20))

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise errors.StoreUnavailable("disk I/O error")

    monkeypatch.setattr(Settlement, "_keep_deferred", broken)
    with pytest.raises(errors.StoreUnavailable):
        s.close_period(NOW + 100, SETTLEMENT_KEY, now=NOW + 100)
    monkeypatch.undo()
    assert s.periods() == [] and s.report().charged_total == 70   # rolled back whole
    # The archive folder the failed close wrote is replaced, not trusted.
    s.ingest(up.batch(0, [(rider.token(NOW + 50, 2), 30, Scene.BUS, NOW + 50)], NOW + 60))
    closed = s.close_period(NOW + 100, SETTLEMENT_KEY, now=NOW + 100)
    assert closed.charged_total == 100 and archive.list_periods(s.archive) == [1]
    assert s.period_report(1).charged_total == 100
    s.close()


def test_a_closed_period_settles_again_from_its_archive(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]) -> None:
    s = store(tmp_path / "s", deny_trust, keys)
    up = Uploads(keys)
    riders = [make_rider(issuer, 60 + i) for i in range(3)]
    for day in range(3):
        for gw in range(3):
            t = NOW + day * DAY + 1_000 * (gw + 1)
            scans = [(r.token(t + i, 10 * day + gw + 1), 100 + i, Scene.BUS, t + i)
                     for i, r in enumerate(riders)]
            s.ingest(up.batch(gw, scans, t + 500))
        s.close_period(NOW + (day + 1) * DAY, SETTLEMENT_KEY, now=NOW + (day + 1) * DAY)
    for number in (1, 2, 3):
        tables, _summary = archive.read_period(s.archive, number)
        carry_in = Carry.from_tables(tables)
        rows = tables["records"]
        from qrpay.ledger import RECORD_DTYPE
        records = np.zeros(len(rows["record"]), dtype=RECORD_DTYPE)
        for name in RECORD_DTYPE.names or ():
            records[name] = rows[name]
        settled = settle_period(carry_in, records, rows["gateway"], s._slack)
        for name, verdict in tables["verdicts"].items():
            assert np.array_equal(getattr(settled.result, name)[settled.new], verdict), name
        again = build_report(settled, [], s.horizon, period=number)
        stored = s.period_report(number)
        assert again.accounts.tolist() == stored.accounts.tolist()
        assert again.amounts.tolist() == stored.amounts.tolist()
        assert again.findings == [f for f in stored.findings if f.kind != "sequence_gap"]
        assert report_from_tables(tables, records=stored.records, rejected_total=0,
                                  period=number, from_time=0, until=0).charged_total == \
            stored.charged_total
    s.close()


# -- one store closed often against one never closed --------------------------------------

@st.composite
def days(draw: Any) -> dict[str, Any]:
    return {
        "seed": draw(st.integers(0, 2**32 - 1)),
        "scans": draw(st.integers(5, 40)),
        "cuts": sorted(set(draw(st.lists(st.integers(1, 47), min_size=1, max_size=5)))),
    }


def _city(issuer: IssuerKey, seed: int, scans: int, keys: list[GatewayKey]
          ) -> list[tuple[int, bytes]]:
    """(arrival time, batch) of two days of scans: honest rides, screenshots
    shown at another gateway, a copied phone with a stale counter, uploads
    up to three hours late."""
    rng = random.Random(seed)
    riders = [make_rider(issuer, 80 + i, limit=2_000) for i in range(4)]
    counter = [0] * len(riders)
    up = Uploads(keys)
    pending: list[list[tuple[bytes, int, Scene, int]]] = [[] for _ in keys]
    out: list[tuple[int, bytes]] = []
    t = NOW

    def upload(g: int) -> None:
        # Within the horizon (6 h): a batch spans at most 1.5 h and arrives
        # a minute or three hours after its last scan.
        arrival = pending[g][-1][3] + 60 + rng.choice([0, 0, 0, 3 * 3_600])
        out.append((arrival, up.batch(g, pending[g], arrival)))
        pending[g] = []

    for _ in range(scans):
        t += rng.randint(60, 4 * 3_600)
        for g in range(len(keys)):
            if pending[g] and pending[g][0][3] < t - 5_400:
                upload(g)
        who = rng.randrange(len(riders))
        rider: Rider = riders[who]
        kind = rng.choice(["ride"] * 6 + ["screenshot", "copy"])
        counter[who] += 1
        token = rider.token(t, counter[who])
        if kind == "copy" and counter[who] > 2:
            token = rider.token(t, rng.randint(1, counter[who] - 1))
        gw = rng.randrange(len(keys))
        pending[gw].append((token, rng.randint(50, 900), Scene.BUS, t))
        if kind == "screenshot":
            pending[(gw + 1) % len(keys)].append((token, 300, Scene.BUS, t + 20))
        for g in range(len(keys)):
            if pending[g] and rng.random() < 0.4:
                upload(g)
    for g in range(len(keys)):
        if pending[g]:
            upload(g)
    out.sort(key=lambda item: item[0])
    return out


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(days())
def test_closing_every_few_hours_changes_nothing(
        tmp_path_factory: pytest.TempPathFactory, deny_trust: TrustStore, issuer: IssuerKey,
        keys: list[GatewayKey], day: dict[str, Any]) -> None:
    batches = _city(issuer, day["seed"], day["scans"], keys)
    base = tmp_path_factory.mktemp("periods")
    # Charges fall due an hour after their scan: the closes fold the ones repaid.
    once = store(base / "once", deny_trust, keys, due_after=3_600)
    often = store(base / "often", deny_trust, keys, due_after=3_600)
    for s in (once, often):
        _repay(s, issuer, day["seed"])
    cuts = [NOW + 3_600 * h for h in day["cuts"]]
    closed: list[Any] = []
    for arrival, data in batches:
        while cuts and cuts[0] <= arrival:
            cut = cuts.pop(0)
            if len(closed) % 2:
                often.report()   # the close then settles with the tail index report kept
            close_checking_chunks(often, cut)
            closed.append(often.period_report(len(closed) + 1))
        for s in (once, often):
            assert s.ingest(data).status is IngestStatus.APPLIED
    closed.append(often.report())
    whole = once.report()
    charges: Counter[int] = Counter()
    for report in closed:
        for account, amount in zip(report.accounts.tolist(), report.amounts.tolist()):
            charges[account] += amount
    assert charges == Counter(dict(zip(whole.accounts.tolist(), whole.amounts.tolist())))
    assert sum(r.rejected_total for r in closed) == whole.rejected_total

    def findings(reports: list[Any]) -> Counter[Any]:
        return Counter(f for r in reports for f in r.findings
                       if f.kind not in ("overspend", "sequence_gap"))

    assert findings(closed) == findings([whole])
    assert not any(r.of_kind("late_upload") for r in closed)
    over_once = {f.serial: f for f in whole.of_kind("overspend")}
    over_often: dict[int, Any] = {}
    for f in (f for r in closed for f in r.of_kind("overspend")):
        if f.serial not in over_often or f.amount > over_often[f.serial].amount:
            over_often[f.serial] = f
    assert {k: v.amount for k, v in over_often.items()} == {
        k: v.amount for k, v in over_once.items()}
    assert closed[-1].of_kind("sequence_gap") == whole.of_kind("sequence_gap")
    assert_same_history(often, once, NOW + 3 * DAY)
    once.close()
    often.close()


def _repay(s: Settlement, issuer: IssuerKey, seed: int) -> None:
    """Repayments by _city's riders over its days, all recorded up front (a
    repayment recorded after its time was folded would count from the cut)."""
    rng = random.Random(seed ^ 0x5EED)
    accounts = [make_rider(issuer, 80 + i).account for i in range(4)]
    rows = [(rng.choice(accounts), rng.randint(100, 3_000), NOW + rng.randint(0, 2 * DAY))
            for _ in range(8)]
    s.record_repayments(*zip(*rows), [f"r{i}" for i in range(len(rows))])


def assert_same_history(s: Settlement, reference: Settlement, at: int) -> None:
    a, b = s.credit_history(at), reference.credit_history(at)
    assert a.tobytes() == b.tobytes() or np.array_equal(a, b, equal_nan=True)


# -- the carried charges, one chunk per close ---------------------------------------------

class ChunkRow(NamedTuple):
    first_time: int
    amount: int
    data: bytes


def chunk_rows(s: Settlement) -> dict[str, ChunkRow]:
    """The carry rows of the charges chunks, by name."""
    return {str(name): ChunkRow(int(first), int(amount), bytes(data))
            for name, first, amount, data in s._query(
                "SELECT name, first_time, amount, data FROM carry "
                "WHERE name LIKE 'charges:%'")}


@contextmanager
def chunks_read(s: Settlement) -> Iterator[list[str]]:
    """The names of the chunks `s` reads from the store meanwhile."""
    names: list[str] = []
    read = s._read_chunks

    def spy(before: int | None) -> Any:
        chunks = read(before)
        names.extend(chunk.name for chunk in chunks)
        return chunks

    setattr(s, "_read_chunks", spy)
    try:
        yield names
    finally:
        delattr(s, "_read_chunks")


def close_checking_chunks(s: Settlement, until: int) -> None:
    """Close `s` at `until`, checking what it does to the charges chunks:
    it reads only those whose earliest charge fell due before its cut, the
    others keep their row and bytes (not written again), it adds no chunk
    but the period's, and every chunk's earliest time and amount are its
    charges'."""
    number = s._open_period()[0]
    before = chunk_rows(s)
    due = {name for name, row in before.items()
           if row.first_time < until - s.horizon - s.due_after}
    with chunks_read(s) as read:
        s.close_period(until, SETTLEMENT_KEY, now=until)
    after = chunk_rows(s)
    assert sorted(read) == sorted(due)
    assert {name: after.get(name) for name in set(before) - due} == {
        name: before[name] for name in set(before) - due}
    assert set(after) - set(before) <= {f"charges:{number:010d}"}
    # The period's archive holds every charge it made (its `charged` table,
    # by account and time); its chunk keeps no rows in the store but points
    # there, unless some folded already (it holds the others) or a store
    # from before the chunks moved its one-row charges in.
    tables, _ = archive.read_period(s.archive, number, ["charged", "records", "verdicts"])
    records, charged = tables["records"], tables["verdicts"]["charged"]
    archived = sorted(zip(*(tables["charged"][c].tolist() for c in ("account", "time",
                                                                     "amount"))))
    assert archived == sorted(zip(*(records[f][charged].tolist() for f in (
        "account", "gateway_time", "amount"))))
    keys = list(zip(tables["charged"]["account"].tolist(), tables["charged"]["time"].tolist()))
    assert keys == sorted(keys)        # by account, then scan time
    own = after.get(f"charges:{number:010d}")
    if own is not None:
        kept = s._chunk_charges(f"charges:{number:010d}", own.data)
        assert own.data == b"" or len(kept) != int(charged.sum())
    for name, row in after.items():
        charges = s._chunk_charges(name, row.data)
        assert len(charges) and row.first_time == charges["time"].min()
        assert row.amount == charges["amount"].sum()


def _daily_rides(issuer: IssuerKey, keys: list[GatewayKey], days: int) -> list[bytes]:
    """A batch a day: riders 70 and 71 ride twice a day (100 and 30 each)."""
    riders = [make_rider(issuer, 70 + i) for i in range(2)]
    up = Uploads(keys)
    batches = []
    for d in range(days):
        at = NOW + d * DAY + 1_000
        batches.append(up.batch(0, [(r.token(at + k, 2 * d + k + 1), (100, 30)[i], Scene.BUS,
                                     at + k) for i, r in enumerate(riders) for k in (0, 1)],
                                at + 60))
    return batches


def test_a_close_rewrites_only_the_chunks_fallen_due(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]) -> None:
    # Rider 70 repays every ride the same day; rider 71 only its first day's.
    # Each day's charges are one chunk; two days (and the horizon) after,
    # rider 70's fold and rider 71's stay, so the chunk is read and written
    # again with rider 71's rows; the first day's is emptied and deleted.
    days = 6
    often = store(tmp_path / "often", deny_trust, keys, due_after=2 * DAY)
    once = store(tmp_path / "once", deny_trust, keys, due_after=2 * DAY)
    repaid = [(5070, 200, NOW + d * DAY + 7_200, f"a{d}") for d in range(days)]
    for s in (often, once):
        s.record_repayments(*zip(*repaid + [(5071, 60, NOW + 7_200, "b0")]))
    for d, batch in enumerate(_daily_rides(issuer, keys, days)):
        for s in (often, once):
            assert s.ingest(batch).status is IngestStatus.APPLIED
        close_checking_chunks(often, NOW + (d + 1) * DAY)
        assert_same_history(often, once, NOW + (d + 1) * DAY)
    rows = chunk_rows(often)
    # Day 1 (period 2) onwards keep rider 71's rides; the last two days' are untouched.
    assert sorted(rows) == [f"charges:{n:010d}" for n in range(2, days + 1)]
    assert [rows[name].amount for name in sorted(rows)] == [60] * (days - 3) + [260, 260]
    assert len(often.credit_history(NOW + days * DAY)) == 2
    often.close()
    once.close()


def test_a_batch_across_the_cut_is_split(tmp_path: Path, deny_trust: TrustStore,
                                         issuer: IssuerKey, keys: list[GatewayKey]) -> None:
    """Records scanned at or after `until` stay live, even in a batch whose
    other records close; the batch itself stays applied (EXISTS again)."""
    s = store(tmp_path / "s", deny_trust, keys)
    up = Uploads(keys)
    rider = make_rider(issuer, 90)
    cut = NOW + DAY
    batch = up.batch(0, [(rider.token(cut - 30, 1), 100, Scene.BUS, cut - 30),
                         (rider.token(cut + 30, 2), 40, Scene.BUS, cut + 30)], cut + 60)
    s.ingest(batch)
    closed = s.close_period(cut, SETTLEMENT_KEY, now=cut + 120)
    assert (closed.records, closed.charged_total) == (1, 100)
    open_period = s.report()
    assert (open_period.records, open_period.charged_total) == (1, 40)
    assert s.ingest(batch).status is IngestStatus.EXISTS
    closed = s.close_period(cut + DAY, SETTLEMENT_KEY, now=cut + DAY)
    assert (closed.records, closed.charged_total) == (1, 40)
    rows, _ = archive.read_period(s.archive, 2, ("records",))
    assert rows["records"]["record"].tolist() == [2]
    assert s.report().records == 0 and not s.report().findings
    s.close()


def test_a_batch_whose_tokens_do_not_match_its_records_is_not_closed(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey,
        keys: list[GatewayKey]) -> None:
    """A damaged store (a live batch's tokens cut short) is a typed error at
    the close, with nothing archived or changed, not rows read out of step."""
    s = store(tmp_path / "s", deny_trust, keys)
    up = Uploads(keys)
    rider = make_rider(issuer, 91)
    s.ingest(up.batch(0, [(rider.token(NOW + 10 * i, i + 1), 50, Scene.BUS, NOW + 10 * i)
                          for i in range(3)], NOW + 60))
    [(arrival, tokens)] = s._query("SELECT arrival, tokens FROM batches")
    with s._write("test") as db:   # the first token's last byte goes missing
        db.execute("UPDATE batches SET tokens = ? WHERE arrival = ?",
                   (bytes(tokens)[:-1], arrival))
    with pytest.raises(errors.StoreUnavailable, match="do not match"):
        s.close_period(NOW + 100, SETTLEMENT_KEY, now=NOW + 100)
    assert s.periods() == [] and archive.list_periods(s.archive) == []
    assert s.report().charged_total == 150
    s.close()


def test_two_closes_at_once_close_once(tmp_path: Path, deny_trust: TrustStore,
                                       issuer: IssuerKey, keys: list[GatewayKey]) -> None:
    """Two replicas (two connections) closing the same period: one closes
    it, the other is told PeriodClosed; the archive holds the one that won."""
    import threading

    s = store(tmp_path / "s", deny_trust, keys)
    up = Uploads(keys)
    riders = [make_rider(issuer, 110 + i) for i in range(20)]
    for gw in range(3):
        s.ingest(up.batch(gw, [(r.token(NOW + gw * 100 + i, gw + 1), 10 + i, Scene.BUS,
                                NOW + gw * 100 + i) for i, r in enumerate(riders)], NOW + 500))
    total = s.report().charged_total
    replicas = [s, open_settlement(tmp_path / "s", deny_trust)]
    start = threading.Barrier(2)
    outcomes: list[object] = []

    def close(replica: Settlement) -> None:
        start.wait()
        try:
            outcomes.append(replica.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY))
        except errors.PeriodClosed as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=close, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(o).__name__ for o in outcomes) == ["PeriodClosed", "PeriodSummary"]
    archive.verify_period(s.archive, 1)
    assert s.period_report(1).charged_total == total and [p.number for p in s.periods()] == [1]
    for replica in replicas:
        replica.close()


def test_unfolded_charges_are_read_from_their_periods_archive(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]) -> None:
    # A period's charges stay in its archive until they fall due: the store
    # keeps only a pointer. With that archive folder gone the credit history
    # and the next close fail with a typed error, not a wrong answer; put
    # back, both answer as a store that never closed.
    often = store(tmp_path / "often", deny_trust, keys, due_after=3 * DAY)
    once = store(tmp_path / "once", deny_trust, keys, due_after=3 * DAY)
    batches = _daily_rides(issuer, keys, 3)
    for d, batch in enumerate(batches[:2]):
        for s in (often, once):
            s.ingest(batch)
        often.close_period(NOW + (d + 1) * DAY, SETTLEMENT_KEY, now=NOW + (d + 1) * DAY)
    assert {name: row.data for name, row in chunk_rows(often).items()} == {
        "charges:0000000001": b"", "charges:0000000002": b""}
    folder = archive.period_dir(often.archive, 1)
    folder.rename(tmp_path / "moved")
    with pytest.raises(errors.ArchiveUnavailable, match="period 1"):
        often.credit_history(NOW + 2 * DAY)
    for s in (often, once):
        s.ingest(batches[2])
    with pytest.raises(errors.ArchiveUnavailable, match="period 1"):
        often.close_period(NOW + 6 * DAY, SETTLEMENT_KEY, now=NOW + 6 * DAY)
    assert often._open_period()[0] == 3          # nothing closed
    (tmp_path / "moved").rename(folder)
    assert_same_history(often, once, NOW + 2 * DAY)
    often.close_period(NOW + 6 * DAY, SETTLEMENT_KEY, now=NOW + 6 * DAY)
    assert_same_history(often, once, NOW + 6 * DAY)
    often.close()
    once.close()


def test_folded_repayments_move_to_the_archive_and_stay_stored_once(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A close moves the repayments it folds into the credit state to its
    # period's archive: the live table keeps the others, repayments() still
    # lists them all, the credit history is a never-closing store's, and a
    # reference stays stored once: the same repayment again is not stored,
    # other content under it is a Conflict, and the 2**62 limit counts them.
    often = store(tmp_path / "often", deny_trust, keys, due_after=DAY)
    once = store(tmp_path / "once", deny_trust, keys, due_after=DAY)
    paid = [(5070, 100 + d, NOW + d * DAY + 72_000, f"r{d}") for d in range(4)]
    for d, batch in enumerate(_daily_rides(issuer, keys, 4)):
        for s in (often, once):
            s.ingest(batch)
            s.record_repayments(*zip(paid[d]))
        often.close_period(NOW + (d + 1) * DAY, SETTLEMENT_KEY, now=NOW + (d + 1) * DAY)
    assert [r[:3] for r in paid] == once.repayments() == often.repayments()
    assert often.repayments(5070) == once.repayments(5070) and often.repayments(5071) == []
    live = often._query("SELECT reference FROM repayments")
    assert live == [("r3",)]               # paid after the last cut: not folded yet
    # Each folds at the first close whose cut (until less the horizon) it precedes.
    assert sorted(often._query("SELECT period FROM repayment_refs")) == [(2,), (3,), (4,)]
    assert_same_history(often, once, NOW + 5 * DAY)
    assert often.record_repayments(*zip(*paid)) == 0
    with pytest.raises(errors.Conflict, match="'r1' is stored already"):
        often.record_repayment(5070, 999, NOW + DAY + 72_000, "r1")
    monkeypatch.setattr(credit, "TOTAL_LIMIT", sum(r[1] for r in paid) + 10)
    with pytest.raises(errors.InvalidArgument, match="2\\*\\*62"):
        often.record_repayment(5070, 10, NOW + 4 * DAY, "r-over")
    monkeypatch.undo()
    # Two references with one hash: the one stored is found, the other stored.
    monkeypatch.setattr("qrpay.settlement._reference_hash", lambda reference: 7)
    with often._write("a test") as db:
        db.execute("UPDATE repayment_refs SET hash = 7")
    assert often.record_repayment(5071, 5, NOW + 4 * DAY, "r-new")
    assert not often.record_repayment(5070, 102, NOW + 2 * DAY + 72_000, "r2")
    # Without the archive that holds it, a reference is not guessed at.
    archive.period_dir(often.archive, 3).rename(tmp_path / "moved")
    with pytest.raises(errors.ArchiveUnavailable, match="period 3"):
        often.record_repayment(5070, 1, NOW + 4 * DAY, "r-other")
    often.close()

    once.close()


def test_a_close_that_finds_other_repayments_to_move_closes_nothing(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The close deletes the repayments it archives with one statement, after
    # counting that it names exactly the rows read: a store changed under
    # it (here: one of them missing from what it read) closes nothing.
    s = store(tmp_path / "s", deny_trust, keys)
    s.ingest(_daily_rides(issuer, keys, 1)[0])
    s.record_repayments([5070, 5071], [10, 20], [NOW + 60, NOW + 120], ["a", "b"])
    real = Settlement._live_repayments

    def one_short(self: Settlement, cut: int) -> Any:
        paid, moved = real(self, cut)
        return paid, {name: column[1:] for name, column in moved.items()}
    monkeypatch.setattr(Settlement, "_live_repayments", one_short)
    with pytest.raises(errors.StoreUnavailable, match="2 repayments to move, not the 1"):
        s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)
    monkeypatch.undo()
    assert s.periods() == [] and len(s._query("SELECT id FROM repayments")) == 2
    s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)
    assert s._query("SELECT id FROM repayments") == [] and len(s.repayments()) == 2
    s.close()


@pytest.mark.sqlite_only
def test_a_close_leaves_no_wal_behind_unless_someone_reads(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]) -> None:
    # A close writes its carry through the WAL; the file is cut back after
    # it, except while another connection reads (then nothing waits for it).
    s = store(tmp_path / "s", deny_trust, keys)
    wal = tmp_path / "s" / "settlement.sqlite3-wal"
    batches = _daily_rides(issuer, keys, 2)
    s.ingest(batches[0])
    s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)
    assert wal.stat().st_size == 0
    reader = sqlite3.connect(tmp_path / "s" / "settlement.sqlite3", isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM batches").fetchall()   # holds a read snapshot
        s.ingest(batches[1])
        s.close_period(NOW + 2 * DAY, SETTLEMENT_KEY, now=NOW + 2 * DAY)
        assert wal.stat().st_size > 0                 # kept for the reader
    finally:
        reader.close()
    s.close()


def test_a_store_with_its_charges_in_one_row_reads_and_moves_them(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]) -> None:
    # A store written before the chunks kept every carried charge in the
    # credit row: it reads the same, and its next close moves them to a chunk.
    often = store(tmp_path / "often", deny_trust, keys, due_after=2 * DAY)
    once = store(tmp_path / "once", deny_trust, keys, due_after=2 * DAY)
    for s in (often, once):
        s.record_repayments([5070, 5071], [600, 60], [NOW + 3 * DAY, NOW + 7_200], ["a", "b"])
    batches = _daily_rides(issuer, keys, 5)
    for d, batch in enumerate(batches):
        for s in (often, once):
            s.ingest(batch)
        if d < 2:
            often.close_period(NOW + (d + 1) * DAY, SETTLEMENT_KEY, now=NOW + (d + 1) * DAY)
    carried = often._carry()
    tables = carried.to_tables()
    with often._write("a test") as db:
        db.execute("DELETE FROM carry WHERE name LIKE 'charges:%'")
        db.execute("UPDATE carry SET data = ? WHERE name = 'credit'", (pack_tables({
            name: tables[name] for name in ("carry_charges", "carry_credit")}),))
    assert often._carry().charges.tobytes() == carried.charges.tobytes() and len(carried.charges)
    assert_same_history(often, once, NOW + 2 * DAY)
    for d in range(2, len(batches)):
        close_checking_chunks(often, NOW + (d + 1) * DAY)
        assert_same_history(often, once, NOW + (d + 1) * DAY)
    [(credit_row,)] = often._query("SELECT data FROM carry WHERE name = 'credit'")
    assert set(unpack_tables(credit_row)) == {"carry_credit"}
    assert sorted(chunk_rows(often)) == [f"charges:{n:010d}" for n in range(3, 6)]
    often.close()
    once.close()


def test_charges_near_the_total_limit_are_all_read_and_refused(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Freeze refuses charges whose amounts add up to TOTAL_LIMIT: every
    # chunk is passed to it then, none fallen due or not, as before the chunks.
    s = store(tmp_path / "s", deny_trust, keys, due_after=2 * DAY)
    for d, batch in enumerate(_daily_rides(issuer, keys, 3)):
        s.ingest(batch)
        if d < 2:
            s.close_period(NOW + (d + 1) * DAY, SETTLEMENT_KEY, now=NOW + (d + 1) * DAY)
    monkeypatch.setattr(credit, "TOTAL_LIMIT", 2 * 260 + 1)
    with chunks_read(s) as read, pytest.raises(errors.InvalidArgument):
        s.close_period(NOW + 3 * DAY, SETTLEMENT_KEY, now=NOW + 3 * DAY)
    assert sorted(read) == sorted(chunk_rows(s)) == ["charges:0000000001", "charges:0000000002"]
    monkeypatch.undo()
    assert s.close_period(NOW + 3 * DAY, SETTLEMENT_KEY, now=NOW + 3 * DAY).number == 3
    s.close()
