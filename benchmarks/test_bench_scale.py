"""qrpay.scale on a Dask LocalCluster of worker processes (issue 14):

    QRPAY_BENCH_FULL=1 python -m pytest benchmarks/test_bench_scale.py -s

- An archive larger than a worker: 2 workers limited to 2 GiB each settle
  PERIODS x RECORDS records (full: 20 x 1,000,000) sharded by account, and
  finish with neither worker restarted by its nanny; the single-process
  settle_local of the same records runs in a subprocess whose peak RSS is
  reported next to the workers' limit, and its result must equal the
  cluster's.
- 2 workers against 1 on the same job: re-verification (real tokens) and
  scoring (targets: at least 1.7x), settlement (reported). Both clusters
  stay open and the jobs run in alternating rounds (3 in full) so a noisy
  neighbour slows both alike; medians are compared, with the CPU seconds
  the workers spent beside them.
- Per-record cost of the Dask settle on 1 worker against settle_local in
  this process on the same records (target: at most 1.5x).

The archive is synthetic and written with archive.write_period: records as
settlement stores them (riders across days, counters rising, record numbers
per gateway, a few double spends), gateway names, and each day's
repayments; the re-verify archive holds real tokens (generate_batch), the
large one none (settle and score never read them). Short mode (the CI run):
3 periods of 20,000 records, 2 of 4,000 tokens.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qrpay import DeviceKey, IssuerKey, Scene, TrustStore, archive, generate_batch, scale
from qrpay.format import TOKEN_DTYPE
from qrpay.ledger import RECORD_DTYPE
from qrpay.scoring import FeatureBins, LimitBand, LimitPolicy, Scorecard

FULL = os.environ.get("QRPAY_BENCH_FULL", "") not in ("", "0")
PERIODS = 20 if FULL else 3
RECORDS = 1_000_000 if FULL else 20_000
SERIALS = 400_000 if FULL else 8_000
GATEWAYS = 400 if FULL else 40
TOKEN_PERIODS, TOKENS = (4, 100_000) if FULL else (2, 4_000)
SHARDS = 16 if FULL else 4
DAY = 86_400
T0 = (1_800_000_000 // DAY) * DAY
NOW = T0 + (PERIODS + 30) * DAY
ROUNDS = 3 if FULL else 1
FIGURES: dict[str, Any] = {}
TIMES: dict[str, list[float]] = {}
CPU: dict[str, list[float]] = {}
CARD = Scorecard((FeatureBins("overdue", (1.0, 3_000.0, 10_000.0), (60, 40, 10, -20), -5),
                  FeatureBins("charges", (5.0, 40.0), (-5, 10, 25), 0),
                  FeatureBins("repaid", (1.0, 5_000.0), (-10, 10, 30), 0)), base_points=540)
POLICY = LimitPolicy((LimitBand(560, {Scene.BUS: 3_000}),
                      LimitBand(600, {Scene.BUS: 8_000, Scene.METRO: 8_000})))


def _records_archive(root: Path, seed: int = 14) -> None:
    """PERIODS days of RECORDS settlement records each, without tokens."""
    rng = np.random.default_rng(seed)
    serial = rng.permutation(np.arange(1, SERIALS + 1, dtype=np.uint64) * 7_919)
    accounts = SERIALS * 9 // 10    # a tenth of the accounts hold a second credential
    account = (np.r_[np.arange(accounts), rng.integers(0, accounts, SERIALS - accounts)]
               + 10_000_000).astype(np.uint64)
    counter = np.zeros(SERIALS, dtype=np.int64)
    record = np.zeros(GATEWAYS, dtype=np.int64)
    weight = rng.gamma(2.0, 1.0, SERIALS)
    weight /= weight.sum()
    names = np.array([f"gw{g:04d}" for g in range(GATEWAYS)], dtype=object)
    for day in range(PERIODS):
        n = RECORDS
        cred = rng.choice(SERIALS, n, p=weight)
        when = T0 + day * DAY + np.sort(rng.integers(0, DAY - 7_200, n))
        cred = cred[np.argsort(when, kind="stable")]
        # Counters rise per credential in scan order.
        order = np.argsort(cred, kind="stable")
        rank = np.empty(n, dtype=np.int64)
        grouped = cred[order]
        first = np.r_[0, np.flatnonzero(np.diff(grouped)) + 1]
        rank[order] = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))
        rows = np.zeros(n, dtype=RECORD_DTYPE)
        rows["serial"], rows["account"] = serial[cred], account[cred]
        rows["counter"] = counter[cred] + rank + 1
        np.add.at(counter, cred, 1)
        rows["amount"] = rng.integers(100, 600, n)
        rows["scene"] = int(Scene.BUS)
        rows["gateway_time"] = when
        rows["issued_at"] = when - rng.integers(0, 20, n)
        rows["limit"] = 50_000
        rows["token_id"] = rng.integers(0, 2**63, n, dtype=np.uint64)
        rows["uploaded_at"] = when + rng.integers(60, 3_600, n)
        gateway = rng.integers(0, GATEWAYS, n)
        # A few copies shown at a second gateway (double spends).
        copies = rng.choice(n, max(1, n // 3_000), replace=False)
        gateway[copies[:-1]] = gateway[copies[1:]]
        for g in range(GATEWAYS):
            mine = np.flatnonzero(gateway == g)
            rows["record"][mine] = record[g] + 1 + np.arange(len(mine))
            record[g] += len(mine)
        payers = np.unique(rng.choice(account, n // 20))
        repayments = {"id": np.arange(len(payers), dtype=np.int64) + day * n,
                      "account": payers, "amount": rng.integers(100, 5_000, len(payers)),
                      "paid_at": np.full(len(payers), T0 + day * DAY + 40_000, dtype=np.int64),
                      "reference": np.array([f"d{day}-{i}" for i in range(len(payers))],
                                            dtype=object)}
        archive.write_period(root, day + 1, {
            "records": {**{f: rows[f] for f in RECORD_DTYPE.names or ()},
                        "gateway": names[gateway]},
            "repayments": repayments}, b"synthetic", format="npy")


def _token_archive(root: Path) -> TrustStore:
    """TOKEN_PERIODS days of TOKENS real tokens (64 riders)."""
    issuer = IssuerKey(bytes(range(32)))
    devices = [DeviceKey(bytes([i + 1]) * 32) for i in range(64)]
    creds = [issuer.issue(9_000 + i, d.public, 10**6, [Scene.BUS], T0 - DAY,
                          T0 + 60 * DAY, serial=500 + i) for i, d in enumerate(devices)]
    for day in range(TOKEN_PERIODS):
        k = np.arange(TOKENS)
        rider = k % 64
        issued = (T0 + day * DAY + k // 4).astype(np.uint32)
        tokens = generate_batch([creds[r] for r in rider], [devices[r] for r in rider],
                                np.zeros(TOKENS, dtype=np.uint8),
                                (day * TOKENS + k) // 64 + 1, issued, threads=2)
        fields = tokens.view(TOKEN_DTYPE).reshape(-1)
        rows = np.zeros(TOKENS, dtype=RECORD_DTYPE)
        for name in ("serial", "counter", "account", "issued_at", "limit"):
            rows[name] = fields[name]
        rows["record"] = day * TOKENS + k + 1
        rows["amount"], rows["scene"], rows["gateway_time"] = 200, int(Scene.BUS), issued
        archive.write_period(root, day + 1, {
            "records": {**{f: rows[f] for f in RECORD_DTYPE.names or ()},
                        "gateway": np.full(TOKENS, "gw0", dtype=object), "token": tokens},
            "repayments": {"id": np.zeros(0, np.int64), "account": np.zeros(0, np.uint64),
                           "amount": np.zeros(0, np.int64), "paid_at": np.zeros(0, np.int64),
                           "reference": np.zeros(0, dtype=object)}}, b"synthetic", format="npy")
    trust = TrustStore()
    trust.add(issuer.public)
    return trust


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TrustStore]:
    base = tmp_path_factory.mktemp("scale")
    _records_archive(base / "records")
    return base / "records", base / "tokens", _token_archive(base / "tokens")


def _cluster(workers: int, memory: str | None = None) -> Any:
    return scale.local_cluster(workers, memory)


def _warm() -> None:
    import qrpay.scale  # noqa: F401


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _job(name: str, client: Any, call: Any) -> Any:
    """call(client), its wall time appended to TIMES[name] and the CPU
    seconds its workers spent to CPU[name]."""
    before = sum(client.run(_cpu_seconds).values())
    result, seconds = _timed(lambda: call(client))
    TIMES.setdefault(name, []).append(seconds)
    CPU.setdefault(name, []).append(sum(client.run(_cpu_seconds).values()) - before)
    return result


def _median(name: str) -> float:
    return float(np.median(TIMES[name]))


def _timed(call: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


_ALONE = """
import json, resource, sys, time
from qrpay import scale
start = time.perf_counter()
result = scale.settle_local(sys.argv[1], now=int(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - start, "records": result.records,
                  "charged_total": result.charged_total, "findings": len(result.findings),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# The machine's own ceiling for two processes: the same tokens verified by
# bare processes (verify_batch, no Dask), one doing every period against
# two at once doing half each. Two busy cores on a shared VM do less than
# twice one: this is the most any 2-worker cluster here could reach.
_BARE = """
import sys, time, numpy as np
from qrpay import IssuerKey, TrustStore, archive, verify_batch
trust = TrustStore()
trust.add(IssuerKey(bytes(range(32))).public)
start = time.perf_counter()
for period in map(int, sys.argv[2:]):
    table = archive.read_columns(sys.argv[1], period, "records", ["token", "gateway_time"])
    checked = verify_batch(np.ascontiguousarray(table["token"]), trust,
                           table["gateway_time"].astype(np.int64), threads=1)
    assert checked.ok.all()
print(time.perf_counter() - start)
"""


def _bare(root: Path, *shares: list[int]) -> float:
    """Seconds from the start of the work to its end (imports left out)
    for one bare process per share, all started at once."""
    running = [subprocess.Popen([sys.executable, "-c", _BARE, str(root), *map(str, share)],
                                stdout=subprocess.PIPE, text=True) for share in shares]
    seconds = [float(p.communicate(timeout=3_600)[0]) for p in running]
    assert all(p.returncode == 0 for p in running)
    return max(seconds)


def summary_lines() -> list[str]:
    f = FIGURES
    n = f["records"]
    lines = ["", f"---- qrpay.scale on a LocalCluster: {PERIODS} periods x {RECORDS:,} records "
                 f"({n:,}), {SHARDS} shards; {TOKEN_PERIODS} x {TOKENS:,} real tokens; "
                 f"{'full' if FULL else 'short (QRPAY_BENCH_FULL=1 for 20 x 1M)'}",
             f"  settle, 2 workers x 2 GiB:   {f['settle_2gib']:7.2f} s, workers restarted: "
             f"{f['restarted']}",
             f"  settle_local, one process:   {f['alone_s']:7.2f} s, peak RSS "
             f"{f['alone_peak_mb']:,.0f} MB (a worker's limit: 2,048 MB)"]
    for name in ("verify", "score", "settle"):
        one, two = _median(f"{name}_1"), _median(f"{name}_2")
        lines.append(f"  {name:<7} 1 worker {one:7.2f} s ({np.median(CPU[name + '_1']):6.1f} "
                     f"worker CPU s), 2 workers {two:7.2f} s ({np.median(CPU[name + '_2']):6.1f}"
                     f" worker CPU s); medians of {len(TIMES[name + '_1'])}")
    ceiling = _median("bare_1") / _median("bare_2")
    lines.append(f"  info   bare verify_batch processes, 2 at once / 1 (the machine's ceiling): "
                 f"{ceiling:.2f}x ({_median('bare_1'):.2f} s vs {_median('bare_2'):.2f} s); "
                 f"re-verify reaches {_median('verify_1') / _median('verify_2') / ceiling:.0%}"
                 f" of it")
    targets = [
        ("re-verify, 2 workers / 1", _median("verify_1") / _median("verify_2"), 1.7, False),
        ("score, 2 workers / 1", _median("score_1") / _median("score_2"), 1.7, False),
        ("settle on 1 worker / settle_local, per record", _median("settle_1") / f["local_s"],
         1.5, True),
    ]
    lines.append(f"  info   settle, 2 workers / 1: "
                 f"{_median('settle_1') / _median('settle_2'):.2f}x")
    for name, ratio, limit, at_most in targets:
        ok = ratio <= limit if at_most else ratio >= limit
        lines.append(f"  {'PASS' if ok else 'MISS'}   {name:<46} {ratio:5.2f} "
                     f"(target {'<=' if at_most else '>='} {limit:.2f})")
    lines.append("  (a MISS does not fail the run: timings on a shared machine are noisy)")
    return lines


@pytest.fixture(scope="module", autouse=True)
def closing_lines(request: pytest.FixtureRequest, write_at_end: Any) -> Iterator[None]:
    FIGURES.clear()
    TIMES.clear()
    CPU.clear()
    yield
    write_at_end(request, summary_lines() if "local_s" in FIGURES else [])


def test_scale_jobs_on_a_local_cluster(benchmark: Any, archives: tuple[Path, Path, TrustStore],
                                       tmp_path: Path) -> None:
    records, tokens, trust = archives
    FIGURES["records"] = PERIODS * RECORDS
    # The archive larger than a worker: 2 workers of 2 GiB, none restarted.
    with _cluster(2, "2GiB") as client:
        pids = sorted(client.run(os.getpid).values())
        big, FIGURES["settle_2gib"] = _timed(lambda: scale.settle(
            records, now=NOW, client=client, shards=SHARDS))
        FIGURES["restarted"] = sorted(client.run(os.getpid).values()) != pids
    done = subprocess.run([sys.executable, "-c", _ALONE, str(records), str(NOW)],
                          capture_output=True, text=True, timeout=3_600, check=True)
    alone = json.loads(done.stdout)
    FIGURES["alone_s"], FIGURES["alone_peak_mb"] = alone["seconds"], alone["peak_mb"]
    assert (alone["records"], alone["charged_total"], alone["findings"]) == (
        big.records, big.charged_total, len(big.findings))
    assert not FIGURES["restarted"]
    # 1 worker against 2 on the same jobs: both clusters open, the jobs run
    # in alternating rounds so that a noisy neighbour hits both alike, and
    # the medians compared.
    with _cluster(1) as one, _cluster(2) as two:
        for client in (one, two):
            # Warm: qrpay imported and its core loaded in every worker before
            # the clock starts, as in a cluster that has run a job before.
            client.run(_warm)
        halves = list(range(1, TOKEN_PERIODS + 1, 2)), list(range(2, TOKEN_PERIODS + 1, 2))
        for _ in range(ROUNDS):
            TIMES.setdefault("bare_1", []).append(_bare(tokens, halves[0] + halves[1]))
            TIMES.setdefault("bare_2", []).append(_bare(tokens, *halves))
            for workers, client in ((1, one), (2, two)):
                checked = _job(f"verify_{workers}", client, lambda c: scale.reverify(
                    tokens, trust, client=c, rows_per_task=TOKENS // 4))
                assert checked.by_reason() == {"OK": TOKEN_PERIODS * TOKENS}
                scored = _job(f"score_{workers}", client, lambda c, w=workers: scale.score(
                    records, CARD, POLICY, tmp_path / f"scores{w}", now=NOW, client=c,
                    shards=SHARDS))
                assert scored.accounts == len(big.history)
        for workers, client in ((1, one), (2, two)):
            settled = _job(f"settle_{workers}", client, lambda c: scale.settle(
                records, now=NOW, client=c, shards=SHARDS))
            assert settled.charged_total == big.charged_total
    # The baseline of the per-record target, timed by pytest-benchmark too.
    local, FIGURES["local_s"] = benchmark.pedantic(
        lambda: _timed(lambda: scale.settle_local(records, now=NOW)), rounds=1, iterations=1)
    assert local.same_as(big)
