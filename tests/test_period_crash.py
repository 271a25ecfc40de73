"""SIGKILL during close_period: the period is closed whole (its row, its
archive folder with every token, the carry, the live store emptied, the
folded repayments moved to the archive, the token parts it linked gone from
the spool) or not at all (the live store as it was), and closing again gives
the same period, on SQLite and on PostgreSQL. SIGKILL while a token part is
written: the part is registered whole or not at all, and the close that
follows archives every token once. Rounds: QRPAY_PERIOD_CRASH_ROUNDS
(default 16 per backend and store)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrpay import GatewayKey, IssuerKey, Scene, TrustStore, archive, tokenspool
from qrpay.settlement import Settlement
import stores
from stores import copy_store, open_settlement
from test_settlement import NOW, make_rider
from test_settlement_periods import SETTLEMENT_KEY, Uploads, store

ROUNDS = int(os.environ.get("QRPAY_PERIOD_CRASH_ROUNDS", "16"))
WORKER = Path(__file__).with_name("period_crash_worker.py")
UNTIL = NOW + 86_400


# Repayments of the riders' accounts: the first 20 paid before the close's
# cut (until less the horizon: they fold and move to the archive), 5 after.
REPAID = [(5100 + i, 40 + i, NOW + 7_200 if i < 20 else UNTIL - 3_600, f"bank-{i}")
          for i in range(25)]


pytestmark = pytest.mark.usefixtures("each_store")


TOKENS = 3_005   # every record's, the 5 scanned after the cut included


@pytest.fixture(params=[700, 1_000_000], ids=["parts", "no-parts"])
def template(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, int]:
    """A store with 3,000 records of one day over 3 gateways (and a few scanned
    after the cut) and REPAID, and its total charge; its tokens written to
    the spool as they came, a part every 700 rows, or none."""
    base = tmp_path / "period-crash"
    issuer = IssuerKey(bytes(range(32)))
    trust = TrustStore()
    trust.add(issuer)
    keys = [GatewayKey(bytes([70 + i]) * 32) for i in range(3)]
    s = store(base / "template", trust, keys, token_part_rows=request.param)
    s.trust_issuer(issuer.public)
    up = Uploads(keys)
    riders = [make_rider(issuer, 100 + i) for i in range(100)]
    for hour in range(10):
        for gw in range(3):
            t = NOW + hour * 3_600 + gw
            scans = [(r.token(t + i, hour * 3 + gw + 1), 50 + i, Scene.BUS, t + i)
                     for i, r in enumerate(riders)]
            s.ingest(up.batch(gw, scans, t + 1_000))
    late = [(r.token(UNTIL + 10, 99), 7, Scene.BUS, UNTIL + 10) for r in riders[:5]]
    s.ingest(up.batch(0, late, UNTIL + 20))
    s.record_repayments(*zip(*REPAID))
    total = s.report().charged_total
    s.close()
    return base / "template", total


def _worker(directory: Path, *mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), stores.location(directory),
                             str(UNTIL), str(directory / "archive"), *mode],
                            stdout=subprocess.PIPE, text=True)


def archived_tokens(s: Settlement, number: int) -> int:
    """How many tokens period `number` holds, each (gateway, record) once."""
    names = [n for n in archive.table_names(s.archive, number) if tokenspool.is_part(n)]
    tables = archive.read_period(s.archive, number, names)[0].values()
    keys = {(g, r) for t in tables for g, r in zip(t["gateway"].tolist(), t["record"].tolist())}
    assert len(keys) == sum(len(t["record"]) for t in tables)
    return len(keys)


def _seconds(source: Path, tmp_path: Path, *mode: str) -> float:
    """How long the worker's job takes here now (the machine may be
    loaded): kills are spread over one and a half times that."""
    copy_store(source, tmp_path / "calibrate")
    child = _worker(tmp_path / "calibrate", *mode)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    start = time.perf_counter()
    assert child.stdout.readline().startswith(("closed", "spooled"))
    seconds = time.perf_counter() - start
    child.wait(timeout=60)
    return seconds


def _killed(directory: Path, seconds: float, rng: random.Random, *mode: str) -> str:
    """Run the worker on `directory` and SIGKILL it at a random moment of
    its job; what it said."""
    child = _worker(directory, *mode)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0, seconds * 1.5))
    child.send_signal(signal.SIGKILL)
    said = child.stdout.read()
    child.wait(timeout=30)
    return said


def _rounds(outcomes: dict[str, int], both: tuple[str, str]) -> Iterator[int]:
    """ROUNDS rounds, and more until both outcomes were seen (at most twice
    as many)."""
    round_ = 0
    while round_ < ROUNDS or (round_ < 2 * ROUNDS and not all(outcomes[o] for o in both)):
        round_ += 1
        yield round_


def test_kill_during_close_closes_whole_or_not_at_all(
        template: tuple[Path, int], tmp_path: Path) -> None:
    source, total = template
    rng = random.Random(int(os.environ.get("QRPAY_CRASH_SEED", "0")) or None)
    outcomes = {"closed": 0, "open": 0, "finished": 0, "orphan folder": 0}
    seconds = _seconds(source, tmp_path)
    for round_ in _rounds(outcomes, ("closed", "open")):
        directory = tmp_path / f"r{round_}"
        copy_store(source, directory)
        said = _killed(directory, seconds, rng)
        s = open_settlement(directory)
        closed = s.periods()
        # Every repayment is there once, moved or not; none is stored again.
        assert sorted(s.repayments()) == sorted(r[:3] for r in REPAID)
        assert s.record_repayments(*zip(*REPAID)) == 0
        live = len(s._query("SELECT id FROM repayments"))
        if said.startswith("closed"):
            outcomes["finished"] += 1
            assert [p.number for p in closed] == [1]     # acknowledged: it stays closed
        if closed:
            outcomes["closed"] += 1
            archive.verify_period(s.archive, 1)
            assert archived_tokens(s, 1) == TOKENS and s._token_parts() == []
            assert s.period_report(1).charged_total + s.report().charged_total == total
            assert s.report().records == 5                # scanned after the cut: still live
            assert live == 5                              # the 20 folded are archived
        else:
            outcomes["open"] += 1
            outcomes["orphan folder"] += archive.period_dir(s.archive, 1).exists()
            assert s.report().charged_total == total      # nothing moved
            assert live == 25
            again = s.close_period(UNTIL, SETTLEMENT_KEY, now=UNTIL)
            assert again.number == 1 and again.charged_total + s.report().charged_total == total
            assert archive.list_periods(s.archive) == [1] and archived_tokens(s, 1) == TOKENS
        s.close()
    # The rounds must kill inside the close, not only before or after it.
    assert outcomes["closed"] and outcomes["open"], outcomes
    print(outcomes)


def test_kill_while_a_token_part_is_written_loses_no_token(
        template: tuple[Path, int], tmp_path: Path) -> None:
    source, total = template
    rng = random.Random(int(os.environ.get("QRPAY_CRASH_SEED", "0")) or None)
    seconds = _seconds(source, tmp_path, "spool")
    outcomes = {"written": 0, "not written": 0}
    for round_ in _rounds(outcomes, ("written", "not written")):
        directory = tmp_path / f"r{round_}"
        copy_store(source, directory)
        s = open_settlement(directory)
        parts_before = len(s._token_parts())
        s.close()
        _killed(directory, seconds, rng, "spool")
        s = open_settlement(directory)
        parts = s._token_parts()
        outcomes["written" if len(parts) > parts_before else "not written"] += 1
        for part in parts:   # a registered part is whole
            archive.read_written(tokenspool.spool_dir(s.archive) / part.name, part.written)
        closed = s.close_period(UNTIL, SETTLEMENT_KEY, now=UNTIL)
        assert closed.charged_total + s.report().charged_total == total
        assert archived_tokens(s, 1) == TOKENS
        spool = tokenspool.spool_dir(s.archive)   # the close leaves nothing there
        assert not spool.exists() or os.listdir(spool) == []
        s.close()
    assert outcomes["written"] and outcomes["not written"], outcomes
    print(outcomes)
