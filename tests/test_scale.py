"""qrpay.scale on a real Dask LocalCluster of worker processes: the result
of each job equals the same job in one process, also when a worker is
killed in the middle of it (Dask runs its tasks again elsewhere)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from collections import Counter

import distributed
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qrpay import GatewayKey, IssuerKey, Reason, Scene, TrustStore, archive, credit, errors, scale
from qrpay.ledger import RECORD_DTYPE
from qrpay.periods import Carry, period_charges, settle_period
from qrpay.reports import build_report
from qrpay.settlement import DEFAULT_HORIZON
from qrpay.token import DEFAULT_MAX_AGE, DEFAULT_SKEW
from qrpay.format import TOKEN_DEVICE_SIG
from qrpay.keys import SettlementKey
from test_settlement import NOW, make_rider
from test_settlement_periods import Uploads, store

DAY = 86_400
KEY = SettlementKey(b"\x07" * 32)
ISSUER = IssuerKey(bytes(range(32)))


@pytest.fixture(scope="module")
def archive_of_three_days(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Three closed days of 3 gateways x 4 batches x 60 scans, with forged
    tokens (a flipped byte in the device signature) planted in each day's
    uploads; the archive folder and how many were forged."""
    base = tmp_path_factory.mktemp("scale")
    trust = TrustStore()
    trust.add(ISSUER)
    keys = [GatewayKey(bytes([90 + i]) * 32) for i in range(3)]
    s = store(base / "settle", trust, keys)
    up = Uploads(keys)
    riders = [make_rider(ISSUER, 30 + i) for i in range(60)]
    forged = 0
    for day in range(3):
        for hour in range(4):
            for gw in range(3):
                t = NOW + day * DAY + hour * 3_600 + gw
                counter = day * 20 + hour * 3 + gw + 1   # room for the copy's (day * 20 + 15)
                scans = []
                for i, rider in enumerate(riders):
                    token = bytearray(rider.token(t + i, counter))
                    if (i + hour + gw) % 29 == 0:
                        token[TOKEN_DEVICE_SIG + 5] ^= 1
                        forged += 1
                    scans.append((bytes(token), 100 + i, Scene.BUS, t + i))
                s.ingest(up.batch(gw, scans, t + 600))
            up.record[2] += 2 if hour == 1 and day == 1 else 0   # a gap: 2 records lost
        # A copy of one token at another gateway (a double spend), and
        # repayments that this day's close folds into its archive.
        copy = riders[day].token(NOW + day * DAY + 5 * 3_600, day * 20 + 15)
        s.ingest(up.batch(0, [(copy, 80, Scene.BUS, NOW + day * DAY + 5 * 3_600)],
                          NOW + day * DAY + 5 * 3_600 + 60))
        s.ingest(up.batch(1, [(copy, 80, Scene.BUS, NOW + day * DAY + 5 * 3_600 + 1)],
                          NOW + day * DAY + 5 * 3_600 + 60))
        s.record_repayments([r.account for r in riders[:10]], [50 + day] * 10,
                            [NOW + day * DAY + 3_600] * 10,
                            [f"d{day}-{i}" for i in range(10)])
        s.close_period(NOW + (day + 1) * DAY, KEY, now=NOW + (day + 1) * DAY)
    s.close()
    return base / "settle" / "archive", forged


def _trust() -> TrustStore:
    trust = TrustStore()
    trust.add(ISSUER)
    return trust


@pytest.fixture(scope="module")
def client() -> Any:
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as dask:
        yield dask


def test_reverify_on_the_cluster_equals_one_process(
        archive_of_three_days: tuple[Path, int], client: Any) -> None:
    root, forged = archive_of_three_days
    alone = scale.reverify_local(root, _trust(), rows_per_task=100)
    assert alone.periods == (1, 2, 3) and alone.tokens == 3 * 4 * 3 * 60 + 6
    assert alone.by_reason() == {"OK": alone.tokens - forged, "BAD_DEVICE_SIGNATURE": forged}
    assert np.all(alone.failed["reason"] == Reason.BAD_DEVICE_SIGNATURE)
    seen: list[tuple[int, int]] = []
    spread = scale.reverify(root, _trust(), client=client, rows_per_task=100,
                            progress=lambda done, total: seen.append((done, total)))
    assert spread.same_as(alone)
    assert seen[-1] == (len(seen), len(seen)) and len(seen) > 2   # several partitions
    # Partition size changes nothing; neither do chosen periods.
    assert scale.reverify(root, _trust(), client=client).same_as(alone)
    two = scale.reverify(root, _trust(), [3, 2], client=client, rows_per_task=333)
    assert two.periods == (2, 3) and two.same_as(scale.reverify_local(root, _trust(), [2, 3]))
    # Without the issuer key every token fails, each with its reason.
    assert scale.reverify(root, TrustStore(), [1], client=client).by_reason() == {
        "UNKNOWN_KID": 722}
    with pytest.raises(errors.ArchiveUnavailable, match="period 4"):
        scale.reverify(root, _trust(), [4], client=client)    # not closed


def test_a_worker_killed_mid_job_changes_nothing(
        archive_of_three_days: tuple[Path, int], client: Any) -> None:
    root, _forged = archive_of_three_days
    alone = scale.reverify_local(root, _trust(), rows_per_task=40)
    pids = list(client.run(os.getpid).values())
    killed: list[int] = []

    def kill_once(done: int, total: int) -> None:
        if not killed and done == 2:
            os.kill(pids[0], signal.SIGKILL)   # a worker dies with tasks still to run
            killed.append(pids[0])

    spread = scale.reverify(root, _trust(), client=client, rows_per_task=40,
                            progress=kill_once)
    assert killed and spread.same_as(alone)
    client.wait_for_workers(2, timeout=60)     # the nanny started a new one
    assert pids[0] not in client.run(os.getpid).values()


def test_the_command_line_verifies_on_a_local_cluster(
        archive_of_three_days: tuple[Path, int], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import csv
    import json

    from qrpay.cli import main
    root, forged = archive_of_three_days
    code = main(["scale", "verify", "--archive", str(root), "--workers", "2", "--periods", "1,3",
                 "--issuer-public", ISSUER.public.to_text(), "--rows-per-task", "500",
                 "--failed-out", str(tmp_path / "failed.csv")])
    out = json.loads(capsys.readouterr().out)
    alone = scale.reverify_local(root, _trust(), [1, 3])
    assert code == 1 and out["periods"] == [1, 3] and out["by_reason"] == alone.by_reason()
    with open(tmp_path / "failed.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == out["failed"] == len(alone.failed) > 0
    assert {r["reason"] for r in rows} == {"BAD_DEVICE_SIGNATURE"}



def test_settling_the_archive_on_the_cluster_equals_one_process_and_the_kernel(
        archive_of_three_days: tuple[Path, int], client: Any) -> None:
    root, forged = archive_of_three_days
    at = NOW + 40 * DAY
    alone = scale.settle_local(root, now=at)
    # The independent reference: every archived record through the kernel
    # at once, as a fresh store's report() would settle them.
    parts = [archive.read_period(root, p, ["records"])[0]["records"] for p in (1, 2, 3)]
    records = np.zeros(sum(len(p["record"]) for p in parts), dtype=RECORD_DTYPE)
    for name in RECORD_DTYPE.names or ():
        records[name] = np.concatenate([p[name] for p in parts])
    gateway = np.concatenate([p["gateway"] for p in parts])
    settled = settle_period(Carry.empty(), records, gateway, DEFAULT_MAX_AGE + 2 * DEFAULT_SKEW)
    kernel = build_report(settled, [], DEFAULT_HORIZON, gaps=[])
    assert alone.accounts.tolist() == kernel.accounts.tolist()
    assert alone.amounts.tolist() == kernel.amounts.tolist()
    assert alone.counts.tolist() == kernel.counts.tolist()
    assert [f for f in alone.findings if f.kind != "sequence_gap"] == kernel.findings
    kinds = Counter(f.kind for f in alone.findings)
    assert kinds == {"invalid_token": forged, "double_spend": 3, "sequence_gap": 1}
    charges = period_charges(settled)
    repaid = [archive.read_period(root, p, ["repayments"])[0]["repayments"] for p in (1, 2, 3)]
    paid = {c: np.concatenate([r[c] for r in repaid]).astype(np.int64)
            for c in ("account", "amount", "paid_at")}
    expected = credit.history(charges["account"], charges["time"], charges["amount"],
                              paid["account"].astype(np.uint64), paid["paid_at"],
                              paid["amount"], at)
    assert alone.history.tobytes() == expected.tobytes() and len(paid["amount"]) == 30
    # Sharded on the cluster, and in one process with the same shards.
    spread = scale.settle(root, now=at, client=client, shards=5)
    assert spread.same_as(alone)
    assert scale.settle_local(root, now=at, shards=3).same_as(alone)
    two = scale.settle(root, [2, 3], now=at, client=client, shards=2)
    assert two.same_as(scale.settle_local(root, [2, 3], now=at))
    assert two.records < alone.records


def test_a_worker_killed_mid_settle_changes_nothing(
        archive_of_three_days: tuple[Path, int], client: Any) -> None:
    root, _forged = archive_of_three_days
    at = NOW + 40 * DAY
    alone = scale.settle_local(root, now=at)
    client.wait_for_workers(2, timeout=60)
    pids = list(client.run(os.getpid).values())
    killed: list[int] = []

    def kill_once(done: int, total: int) -> None:
        if not killed and done == 1:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    spread = scale.settle(root, now=at, client=client, shards=12, progress=kill_once)
    assert killed and spread.same_as(alone)


def test_the_command_line_settles_on_a_local_cluster(
        archive_of_three_days: tuple[Path, int], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from qrpay.cli import main
    root, forged = archive_of_three_days
    at = NOW + 40 * DAY
    assert main(["scale", "settle", "--archive", str(root), "--workers", "2", "--now", str(at),
                 "--shards", "4", "--history-out", str(tmp_path / "history.csv")]) == 0
    out = json.loads(capsys.readouterr().out)
    alone = scale.settle_local(root, now=at)
    assert out["charged_total"] == alone.charged_total and out["records"] == alone.records
    assert out["findings"] == {"double_spend": 3, "invalid_token": forged, "sequence_gap": 1}
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert len(lines) == len(alone.history) + 1 and lines[0].startswith("account,charged")


def test_the_command_line_draws_a_progress_bar_on_a_terminal_and_none_in_a_pipe(
        archive_of_three_days: tuple[Path, int]) -> None:
    import json
    import re
    import subprocess
    import sys

    from terminal import run_in_terminal
    root, _forged = archive_of_three_days
    argv = [sys.executable, "-m", "qrpay", "scale", "settle", "--archive", str(root),
            "--workers", "1", "--now", str(NOW + 40 * DAY), "--shards", "4"]
    periods = len(archive.list_periods(root))
    tasks = periods + 4 * periods + 4 + periods   # splits, slices, shards, record runs
    screen = run_in_terminal(argv, timeout=180)
    assert screen.exit_code == 0, screen.text
    # tqdm's last frame: the count of every task, the rate and the time taken.
    assert re.search(rf"settling: 100%\|.+\| {tasks}/{tasks} \[\d\d:\d\d<00:00, +[\d.]+ ?"
                     rf"(task/s|s/task)\]", screen.text), screen.text
    assert '"charged_total"' in screen.text
    piped = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert piped.returncode == 0, piped.stderr
    assert "settling" not in piped.stderr and "%|" not in piped.stderr
    assert json.loads(piped.stdout)["charged_total"] == scale.settle_local(
        root, now=NOW + 40 * DAY).charged_total


def test_scoring_everyone_on_the_cluster_equals_one_process(
        archive_of_three_days: tuple[Path, int], client: Any, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from qrpay.scoring import FeatureBins, LimitBand, LimitPolicy, Scorecard
    root, _forged = archive_of_three_days
    card = Scorecard((FeatureBins("overdue", (1.0, 3_000.0, 6_000.0), (60, 40, 10, -20), -5),
                      FeatureBins("repaid", (1.0, 100.0), (-10, 10, 30), 0)), base_points=540)
    policy = LimitPolicy((LimitBand(560, {Scene.BUS: 3_000}),
                          LimitBand(600, {Scene.BUS: 8_000, Scene.METRO: 8_000})))
    first = scale.score(root, card, policy, tmp_path / "spread", now=NOW + 4 * DAY,
                        client=client, shards=4)
    alone = scale.score_local(root, card, policy, tmp_path / "alone", now=NOW + 4 * DAY)
    assert first.accounts == alone.accounts == 60 and first.bins == alone.bins
    assert first.psi == {} and sum(first.bins["overdue"]) == 60
    spread = pq.read_table(tmp_path / "spread").to_pandas().sort_values("account")
    single = pq.read_table(tmp_path / "alone").to_pandas().sort_values("account")
    assert spread.reset_index(drop=True).equals(single.reset_index(drop=True))
    # Exactly what the card and the policy give each account's history.
    history = scale.settle_local(root, now=NOW + 4 * DAY).history
    X = np.column_stack([history[n].astype(float) for n in card.feature_names])
    assert spread["score"].tolist() == card.score(X).tolist()
    assert spread["limit_bus"].tolist() == policy.limits(card.score(X))[Scene.BUS].tolist()
    # The next run is compared with this one: the same day, no drift; two
    # months on, everything unpaid has fallen due and "overdue" drifts.
    again = scale.score(root, card, policy, tmp_path / "spread", now=NOW + 4 * DAY,
                        client=client, shards=3)
    assert again.psi == {"overdue": 0.0, "repaid": 0.0}
    later = scale.score(root, card, policy, tmp_path / "spread", now=NOW + 60 * DAY,
                        client=client, shards=4)
    assert later.psi["repaid"] == 0.0 and later.psi["overdue"] > 0.1
    assert len(list((tmp_path / "spread").glob("part-*.parquet"))) == 4
    with pytest.raises(errors.InvalidArgument, match="credit-history columns"):
        scale.score(root, Scorecard((FeatureBins("age", (30.0,), (0, 5), 0),), 500), policy,
                    tmp_path / "x", now=NOW, client=client)


def test_the_command_line_scores_on_a_local_cluster(
        archive_of_three_days: tuple[Path, int], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from qrpay.cli import main
    from qrpay.scoring import FeatureBins, LimitBand, LimitPolicy, Scorecard
    root, _forged = archive_of_three_days
    card = Scorecard((FeatureBins("overdue", (1.0,), (40, 0), 0),), base_points=550)
    (tmp_path / "card.json").write_text(card.to_json())
    (tmp_path / "policy.json").write_text(json.dumps(
        LimitPolicy((LimitBand(560, {Scene.BUS: 2_000}),)).as_dict()))
    args = ["scale", "score", "--archive", str(root), "--workers", "2", "--card",
            str(tmp_path / "card.json"), "--policy", str(tmp_path / "policy.json"),
            "--out", str(tmp_path / "scores"), "--now", str(NOW + 4 * DAY), "--shards", "2"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["accounts"] == 60 and first["psi"] == {}
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["psi"] == {"overdue": 0.0}


@st.composite
def small_streams(draw: Any) -> list[np.ndarray]:
    """1-3 periods of up to 60 records from a few credentials of a few
    accounts: repeats, copies at other gateways, counters out of order."""
    periods = []
    for day in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, 60))
        cred = np.array(draw(st.lists(st.integers(0, 7), min_size=n, max_size=n)), dtype=np.int64)
        rows = np.zeros(n, dtype=RECORD_DTYPE)
        rows["serial"] = 1_000 + cred
        rows["account"] = 50 + cred % 4                     # 8 credentials, 4 accounts
        rows["counter"] = np.array(draw(st.lists(st.integers(1, 12), min_size=n, max_size=n)))
        rows["amount"] = np.array(draw(st.lists(st.integers(1, 900), min_size=n, max_size=n)))
        rows["gateway_time"] = NOW + day * DAY + np.arange(n) * 7
        rows["uploaded_at"] = rows["gateway_time"] + 60
        rows["limit"] = draw(st.sampled_from([500, 5_000]))
        rows["token_id"] = rows["serial"] * 100 + rows["counter"]   # the same token again
        rows["reason"] = np.array(draw(st.lists(st.sampled_from([0, 0, 0, 7]), min_size=n,
                                                max_size=n)))
        gateway = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
        periods.append((rows, gateway))
    return periods


@settings(max_examples=40, deadline=None)
@given(stream=small_streams(), shards=st.integers(1, 5))
def test_sharded_settling_equals_the_kernel_on_random_streams(
        tmp_path_factory: pytest.TempPathFactory, stream: list[Any], shards: int) -> None:
    root = tmp_path_factory.mktemp("stream")
    numbers = [0, 0, 0]
    for day, (rows, gateway) in enumerate(stream):
        for g in range(3):
            mine = np.flatnonzero(gateway == g)
            rows["record"][mine] = numbers[g] + 1 + np.arange(len(mine))
            numbers[g] += len(mine)
        archive.write_period(root, day + 1, {
            "records": {**{f: rows[f] for f in RECORD_DTYPE.names or ()},
                        "gateway": np.array([f"g{g}" for g in gateway], dtype=object)},
            "repayments": {"id": np.arange(2, dtype=np.int64), "account": np.array(
                [50, 51], dtype=np.uint64), "amount": np.array([300, 40], dtype=np.int64),
                "paid_at": np.full(2, NOW + day * DAY + 100, dtype=np.int64),
                "reference": np.array([f"{day}a", f"{day}b"], dtype=object)}}, b"s")
    at = NOW + 30 * DAY
    one = scale.settle_local(root, now=at)
    assert scale.settle_local(root, now=at, shards=shards).same_as(one)
    records = np.concatenate([rows for rows, _g in stream])
    gateway = np.concatenate([np.array([f"g{g}" for g in gw], dtype=object)
                              for _rows, gw in stream])
    kernel = build_report(settle_period(Carry.empty(), records, gateway,
                                        DEFAULT_MAX_AGE + 2 * DEFAULT_SKEW),
                          [], DEFAULT_HORIZON, gaps=[])
    assert one.amounts.tolist() == kernel.amounts.tolist()
    assert one.accounts.tolist() == kernel.accounts.tolist()
    assert [f for f in one.findings if f.kind != "sequence_gap"] == kernel.findings


def test_a_worker_killed_mid_score_changes_nothing(
        archive_of_three_days: tuple[Path, int], client: Any, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from qrpay.scoring import FeatureBins, LimitBand, LimitPolicy, Scorecard
    root, _forged = archive_of_three_days
    card = Scorecard((FeatureBins("overdue", (1.0,), (40, 0), 0),), base_points=550)
    policy = LimitPolicy((LimitBand(560, {Scene.BUS: 2_000}),))
    alone = scale.score_local(root, card, policy, tmp_path / "alone", now=NOW + 9 * DAY)
    client.wait_for_workers(2, timeout=60)
    pids = list(client.run(os.getpid).values())
    killed: list[int] = []

    def kill_once(done: int, total: int) -> None:
        if not killed and done == 1:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    spread = scale.score(root, card, policy, tmp_path / "spread", now=NOW + 9 * DAY,
                         client=client, shards=10, progress=kill_once)
    assert killed and spread.bins == alone.bins and spread.accounts == alone.accounts
    read = pq.read_table(tmp_path / "spread").to_pandas().sort_values("account")
    assert read["score"].tolist() == pq.read_table(tmp_path / "alone").to_pandas(
        ).sort_values("account")["score"].tolist()
    assert not list((tmp_path / "spread").glob("*.partial"))   # no half-written part left
