"""Tokens archived as they arrive (tokenspool.py): parts written to the
archive's spool every `token_part_rows` rows and dropped from the store,
linked into the period that closes next; what is not spooled is written by
the close. A period's tokens tables hold every batch that arrived while it
was open; records and tokens join on gateway and record number."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from qrpay import GatewayKey, IssuerKey, Scene, TrustStore, archive, errors, scale, tokenspool
from qrpay.settlement import IngestStatus, Settlement
from test_settlement import NOW, make_rider
from test_settlement_periods import DAY, SETTLEMENT_KEY, Uploads, store

pytestmark = pytest.mark.usefixtures("each_store")


@pytest.fixture
def keys() -> list[GatewayKey]:
    return [GatewayKey(bytes([90 + i]) * 32) for i in range(3)]


def period_tokens(root: Path, number: int) -> dict[tuple[str, int], bytes]:
    """(gateway, record) -> token over a period's tokens tables."""
    names = [n for n in archive.table_names(root, number) if tokenspool.is_part(n)]
    tables, _ = archive.read_period(root, number, names)
    out: dict[tuple[str, int], bytes] = {}
    for name in sorted(names):
        t = tables[name]
        for g, r, token in zip(t["gateway"].tolist(), t["record"].tolist(), t["token"]):
            assert (g, r) not in out   # each token is archived once
            out[(g, r)] = token.tobytes()
    return out


def period_records(root: Path, number: int) -> list[tuple[str, int, int]]:
    records = archive.read_period(root, number, ["records"])[0]["records"]
    return list(zip(records["gateway"].tolist(), records["record"].tolist(),
                    records["gateway_time"].tolist()))


def day(issuer: IssuerKey, keys: list[GatewayKey], up: Uploads, s: Settlement, start: int,
        batches: int, scans: int = 2, late: int = 0) -> dict[tuple[str, int], bytes]:
    """`batches` batches of `scans` rides each, scanned from `start` on; the
    last `late` scans of the last batch are after start + DAY. Returns what
    was uploaded, by (gateway, record)."""
    sent: dict[tuple[str, int], bytes] = {}
    for b in range(batches):
        gw = b % len(keys)
        rows = []
        for i in range(scans):
            at = start + 60 * (b * scans + i) + 1
            if b == batches - 1 and i >= scans - late:
                at = start + DAY + 30 * i
            rider = make_rider(issuer, 100 + (b * scans + i) % 150)
            token = rider.token(at, (at - NOW) // 30 + 1)   # counters rise with time
            rows.append((token, 100 + i, Scene.BUS, at))
        first = up.record[gw] + 1
        assert s.ingest(up.batch(gw, rows, max(r[3] for r in rows) + 10)).status is \
            IngestStatus.APPLIED
        for n, row in enumerate(rows):
            sent[(keys[gw].public.gateway_id, first + n)] = row[0]
    return sent


def raising(error: BaseException) -> Any:
    """A stand-in for a function or method that raises `error`."""
    def call(*args: Any) -> None:
        raise error
    return call


def live_token_bytes(s: Settlement) -> int:
    return int(s._query("SELECT COALESCE(SUM(length(tokens)), 0) FROM batches")[0][0])


def test_tokens_are_archived_as_they_arrive_and_linked_into_the_period(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]
        ) -> None:
    s = store(tmp_path / "s", deny_trust, keys, token_part_rows=5)
    up = Uploads(keys)
    sent = day(issuer, keys, up, s, NOW, batches=7, scans=2, late=1)
    parts = s._token_parts()
    # 14 rows, a part once 5 came since the last: after batches 3 and 6.
    assert [p.written.rows for p in parts] == [6, 6]
    spool = tokenspool.spool_dir(s.archive)
    assert sorted(os.listdir(spool)) == [p.name for p in parts]
    assert live_token_bytes(s) == 2 * 204   # the last batch's, not spooled yet
    inodes = {f: os.stat(spool / p.name / f).st_ino for p in parts for f in p.written.files}

    closed = s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY + 100)
    assert closed.records == 13
    folder = archive.period_dir(s.archive, 1)
    # The spooled parts are the period's files (linked, not written again);
    # the last batch's tokens were written by the close.
    assert all(os.stat(folder / f).st_ino == ino for f, ino in inodes.items())
    tables = sorted(n for n in archive.table_names(s.archive, 1) if tokenspool.is_part(n))
    assert tables == [*(p.name for p in parts), tokenspool.part_name(7)]
    # Every token that arrived, the one scanned after the cut included.
    assert period_tokens(s.archive, 1) == sent
    records = period_records(s.archive, 1)
    assert len(records) == 13 and all((g, r) in sent for g, r, _t in records)
    assert os.listdir(spool) == [] and s._token_parts() == [] and live_token_bytes(s) == 0

    # The next day: the late record settles in period 2; its token stays period 1's.
    more = day(issuer, keys, up, s, NOW + DAY + 600, batches=2)
    s.close_period(NOW + 2 * DAY, SETTLEMENT_KEY, now=NOW + 2 * DAY + 100)
    late = [(g, r) for g, r, t in period_records(s.archive, 2) if t < NOW + DAY + 600]
    assert len(late) == 1 and late[0] in period_tokens(s.archive, 1)
    assert period_tokens(s.archive, 2) == more
    # Re-verified from the archive: every token once.
    checked = scale.reverify_local(s.archive, deny_trust, max_age=2 * DAY)
    assert checked.tokens == len(sent) + len(more) and not len(checked.failed)
    s.close()


def test_spooling_changes_no_charge_finding_or_record(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]
        ) -> None:
    stores = {rows: store(tmp_path / f"s{rows}", deny_trust, keys, token_part_rows=rows)
              for rows in (1, 4, 10_000)}
    for s in stores.values():
        up = Uploads(keys)
        day(issuer, keys, up, s, NOW, batches=5, scans=3, late=2)
        s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY + 50)
        day(issuer, keys, up, s, NOW + DAY + 600, batches=3, scans=2)
    reports = [(s.period_report(1).as_dict(), s.report().as_dict()) for s in stores.values()]
    assert all(r == reports[0] for r in reports[1:])
    records = [period_records(s.archive, 1) for s in stores.values()]
    tokens = [period_tokens(s.archive, 1) for s in stores.values()]
    assert all(r == records[0] for r in records) and all(t == tokens[0] for t in tokens)
    assert len(stores[1]._token_parts()) == 3 and len(stores[10_000]._token_parts()) == 0
    for s in stores.values():
        s.close()


def test_a_part_left_by_a_crash_is_swept_and_a_busy_lock_is_not_waited_for(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]
        ) -> None:
    s = store(tmp_path / "s", deny_trust, keys, token_part_rows=1_000)
    up = Uploads(keys)
    sent = day(issuer, keys, up, s, NOW, batches=2)
    spool = tokenspool.spool_dir(s.archive)
    # A part written and never registered (killed before its commit), and
    # a half-written one.
    (spool / tokenspool.part_name(1)).mkdir(parents=True)
    (spool / tokenspool.part_name(1) / "junk").write_bytes(b"x")
    (spool / ".tmp-0123456789abcdef").mkdir()
    # Another process closing: a part is not waited for (ingest goes on).
    other = Settlement(s._db.location if s.directory is None else s.directory,
                       archive=s.archive)
    with other._closing():
        assert s.archive_tokens(wait=False) == 0
    other.close()
    assert sorted(os.listdir(spool)) == [".tmp-0123456789abcdef", tokenspool.part_name(1)]
    assert s.archive_tokens() == 4
    [part] = s._token_parts()
    assert os.listdir(spool) == [part.name] == [tokenspool.part_name(1)]
    assert archive.read_written(spool / part.name, part.written)["record"].tolist() == [1, 2, 1, 2]
    assert s.archive_tokens() == 0   # nothing left to write
    s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)
    assert period_tokens(s.archive, 1) == sent
    s.close()


def test_a_close_that_failed_at_its_commit_links_the_parts_again(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey],
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(tmp_path / "s", deny_trust, keys, token_part_rows=3)
    sent = day(issuer, keys, Uploads(keys), s, NOW, batches=4)
    with monkeypatch.context() as patch:
        patch.setattr(Settlement, "_move_repayments",
                      raising(errors.StoreUnavailable("injected: the close's transaction fails")))
        with pytest.raises(errors.StoreUnavailable, match="injected"):
            s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)
    # Nothing closed: the parts are still the store's and the spool's.
    assert s.periods() == [] and len(s._token_parts()) == 2
    s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)
    assert period_tokens(s.archive, 1) == sent and s._token_parts() == []
    archive.verify_period(s.archive, 1)
    s.close()


def test_parts_of_another_format_are_read_and_written_again(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]
        ) -> None:
    pytest.importorskip("pyarrow")   # in the test extra: never skipped in CI
    s = store(tmp_path / "s", deny_trust, keys, token_part_rows=2, archive_format="npy")
    sent = day(issuer, keys, Uploads(keys), s, NOW, batches=3)
    assert {p.written.format for p in s._token_parts()} == {"npy"}
    s.close()
    s = store(tmp_path / "s", deny_trust, keys, archive_format="parquet")
    s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)
    assert period_tokens(s.archive, 1) == sent
    assert all(f.suffix == ".parquet" for f in archive.period_dir(s.archive, 1).glob("tokens_*"))
    s.close()


def test_a_live_batch_whose_tokens_no_part_holds_is_not_closed(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]
        ) -> None:
    s = store(tmp_path / "s", deny_trust, keys, token_part_rows=2)
    day(issuer, keys, Uploads(keys), s, NOW, batches=2)
    with s._write("test") as db:   # the part's row lost: its tokens are nowhere the store knows
        db.execute("DELETE FROM token_parts")
    with pytest.raises(errors.StoreUnavailable, match="no token part holds them"):
        s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)
    assert s.periods() == [] and archive.list_periods(s.archive) == []
    s.close()


def test_token_part_rows_is_checked(tmp_path: Path) -> None:
    for bad in (0, -1, 1.5, "8", True):
        with pytest.raises(errors.InvalidArgument, match="token_part_rows"):
            Settlement(tmp_path / "s", token_part_rows=bad)  # type: ignore[arg-type]


def test_a_part_that_fails_in_any_way_leaves_the_batch_applied(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey],
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not only the archive's own errors: whatever a part raises, the batch
    # is stored and answered APPLIED.
    s = store(tmp_path / "s", deny_trust, keys, token_part_rows=1)
    monkeypatch.setattr(tokenspool, "write_part",
                        raising(RuntimeError("injected: the part writer breaks")))
    with caplog.at_level("WARNING", logger="qrpay.settlement"):
        sent = day(issuer, keys, Uploads(keys), s, NOW, batches=2)
    assert "RuntimeError: injected" in caplog.text and s._token_parts() == []
    monkeypatch.undo()
    s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)
    assert period_tokens(s.archive, 1) == sent
    s.close()


def test_a_part_that_cannot_be_written_leaves_the_batch_applied(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey],
        caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path / "s", deny_trust, keys, token_part_rows=2)
    spool = tokenspool.spool_dir(s.archive)
    spool.parent.mkdir(parents=True, exist_ok=True)
    spool.write_bytes(b"not a folder")   # the spool cannot be made
    with caplog.at_level("WARNING", logger="qrpay.settlement"):
        sent = day(issuer, keys, Uploads(keys), s, NOW, batches=3)   # each one APPLIED
    assert "token part not written" in caplog.text
    assert s._token_parts() == [] and live_token_bytes(s) == 6 * 204   # kept in the store
    with pytest.raises(errors.ArchiveUnavailable):
        s.archive_tokens()
    s.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)   # the close writes them
    assert period_tokens(s.archive, 1) == sent and live_token_bytes(s) == 0
    s.close()


def test_replicas_writing_parts_while_another_closes_archive_each_token_once(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey, keys: list[GatewayKey]
        ) -> None:
    """Two store objects (as two replicas would be) ingest from threads with
    small parts while a third closes: no token is lost or archived twice."""
    import threading
    first = store(tmp_path / "s", deny_trust, keys, token_part_rows=3)
    location = first._db.location if first.directory is None else first.directory
    second = Settlement(location, deny_trust, archive=first.archive, token_part_rows=2)
    closer = Settlement(location, deny_trust, archive=first.archive)
    sent: dict[tuple[str, int], bytes] = {}
    errors_seen: list[BaseException] = []

    def upload(s: Settlement, gw: int, start: int) -> None:
        up = Uploads([keys[gw]])
        try:
            for b in range(12):
                at = start + 60 * b
                riders = [make_rider(issuer, 10 + gw * 40 + (b * 3 + i) % 40) for i in range(3)]
                rows = [(r.token(at + i, (at - NOW) // 30 + i + 1), 50, Scene.BUS, at + i)
                        for i, r in enumerate(riders)]
                recorded = up.record[0] + 1
                assert s.ingest(up.batch(0, rows, at + 10)).status is IngestStatus.APPLIED
                for n, row in enumerate(rows):
                    sent[(keys[gw].public.gateway_id, recorded + n)] = row[0]
        except BaseException as exc:   # surfaced below
            errors_seen.append(exc)

    threads = [threading.Thread(target=upload, args=(s, gw, NOW + 1_000 * gw))
               for gw, s in enumerate((first, second, first))]
    for t in threads:
        t.start()
    closed = closer.close_period(NOW + 500, SETTLEMENT_KEY, now=NOW + DAY)
    for t in threads:
        t.join()
    assert not errors_seen, errors_seen
    closer.close_period(NOW + DAY, SETTLEMENT_KEY, now=NOW + DAY)
    archived = [period_tokens(first.archive, n) for n in (closed.number, closed.number + 1)]
    assert not set(archived[0]) & set(archived[1])   # each token once
    assert {**archived[0], **archived[1]} == sent
    for s in (first, second, closer):
        s.close()
