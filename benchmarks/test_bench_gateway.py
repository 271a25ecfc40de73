"""Gateway: scan_batch with the journal against verify_batch alone, and the
latency of a single Gateway.scan.

All three benchmarks draw from one token pool: slice k holds 256 tokens, four
per rider (the session's 64 riders), scene BUS, issued at env.now, with
counters 4k+1 .. 4k+4. Slices are signed with qrpay.generate_batch on first
use (in the untimed setup of a round) and kept, so the verify_batch and
scan_batch benchmarks time round r on the very same 256 tokens, and a short
run signs only the few slices it uses.

A gateway refuses a (serial, counter) it has accepted before, so every timed
scan_batch / scan call gets tokens its gateway has never seen: round r takes
slice r (benchmark.pedantic with a setup function). pedantic runs a fixed
number of rounds, so the round count is planned here the way pytest-benchmark
plans it for benchmark(): max(--benchmark-min-rounds, max_time / one call),
with one untimed call (slice 0) as the estimate and the warm-up. The single
scan benchmark warms its journal until SQLite's WAL file has wrapped once
(see _warm_journal), times at least 200 calls (fewer only if that would
take over a second) and reports their median and p99.

The journal lives under pytest's tmp_path, or under $QRPAY_BENCH_JOURNAL_DIR
if set (point it at the storage a real gateway would use: every commit is an
fsync, synchronous=FULL, and its cost is a property of that storage).
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import qrpay
from qrpay import GatewayKey, Reason, Scene, TrustStore
from qrpay.format import U32_MAX
from qrpay.gateway import JOURNAL_FILE, Gateway, GatewayPolicy, Receipt

AMOUNT = 1  # minor units per token; riders' credentials allow 5000 offline
ROUNDS_CAP = 1_000  # scan_batch rounds: 4 tokens per rider per round stays under 5000
LATENCY_MIN_SAMPLES = 200  # single scans timed, unless that would take over ~1 s
LATENCY_CAP = 20_000
WAL_STEADY = 20  # warm-up ends after this many scans left the WAL file's size alone
WARMUP_CAP = 5_000


class TokenPool:
    """Fresh tokens by slice, signed on first use and kept for the module."""

    def __init__(self, env: Any) -> None:
        self.batch = env.batch
        self.per_rider = env.batch // env.n_riders
        self.now = env.now
        order = [(j, r) for j in range(self.per_rider) for r in env.riders]
        self._credentials = [r.credential for _, r in order]
        self._devices = [r.device for _, r in order]
        self._offsets = np.array([j + 1 for j, _ in order], dtype=np.uint32)
        self.accounts = np.array([r.account for _, r in order], dtype=np.uint64)
        self._slices: list[list[bytes]] = []
        self.signed = 0  # tokens signed so far (what the run actually used)

    def counters(self, k: int) -> np.ndarray:
        return self._offsets + np.uint32(self.per_rider * k)

    def slice(self, k: int) -> list[bytes]:
        while len(self._slices) <= k:
            n = len(self._slices)
            rows = qrpay.generate_batch(self._credentials, self._devices, int(Scene.BUS),
                                        self.counters(n), self.now)
            self._slices.append([row.tobytes() for row in rows])
            self.signed += self.batch
        return self._slices[k]

    def token(self, i: int) -> tuple[bytes, int, int]:
        """Token i of the pool read flat, with its account and counter."""
        k, j = divmod(i, self.batch)
        return self.slice(k)[j], int(self.accounts[j]), int(self.counters(k)[j])


@pytest.fixture(scope="module")
def pool(env) -> TokenPool:
    assert env.batch % env.n_riders == 0 and Scene.BUS in env.rider_scenes
    return TokenPool(env)


def _policy() -> GatewayPolicy:
    """Generous: nothing but the replay check and the credential's offline
    limit can refuse a token, and the limit is far away (AMOUNT per token)."""
    return GatewayPolicy(transaction_caps={s: U32_MAX for s in Scene},
                         max_offline_uses=10**9, deny_list_max_age=None)


@pytest.fixture
def journal_dir(tmp_path: Path):
    base = os.environ.get("QRPAY_BENCH_JOURNAL_DIR")
    if not base:
        yield tmp_path / "gateway"
        return
    with tempfile.TemporaryDirectory(prefix="qrpay-bench-", dir=base) as d:
        yield Path(d) / "gateway"


def _filesystem(path: Path) -> str:
    """The filesystem type holding `path` (Linux /proc/mounts), for the record."""
    try:
        target = str(path.resolve())
        best, kind = "", "unknown"
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                point = fields[1]
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best):
                    best, kind = point, fields[2]
        return kind
    except OSError:
        return "unknown"


def _plan_rounds(config: pytest.Config, seconds_per_call: float, cap: int,
                 at_least: int = 1) -> int:
    """Rounds as pytest-benchmark chooses them for benchmark(): enough to
    fill --benchmark-max-time, never fewer than --benchmark-min-rounds."""
    min_rounds = int(config.getoption("benchmark_min_rounds"))
    max_time = float(config.getoption("benchmark_max_time"))
    rounds = math.ceil(max_time / max(seconds_per_call, 1e-9))
    return max(1, min(max(rounds, min_rounds, at_least), cap))


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _warm_journal(directory: Path, scan_one: Callable[[], object]) -> list[float]:
    """Untimed scans until SQLite's WAL file stops growing, and their times.

    On a new journal every commit appends to the WAL file, and growing a file
    costs more at fsync than rewriting its pages; once the first automatic
    checkpoint has run, SQLite writes the WAL again from its start and the
    file keeps its size. A gateway that has been in service a while is in
    that second state, so single-scan latency is measured there."""
    wal = directory / (JOURNAL_FILE + "-wal")
    times: list[float] = []
    size, same = -1, 0
    while same < WAL_STEADY and len(times) < WARMUP_CAP:
        times.append(_timed(scan_one))
        now_size = wal.stat().st_size if wal.exists() else 0
        same = same + 1 if now_size == size else 0
        size = now_size
    return times


def _open_gateway(directory: Path, trust: TrustStore) -> Gateway:
    key = GatewayKey(hashlib.sha256(b"qrpay-bench/gateway").digest())
    return Gateway(directory, key, trust, _policy())


def _journal_rows(directory: Path) -> tuple[int, int]:
    """(rows, distinct (serial, counter)) committed, read through a second,
    read-only connection: what a crash would leave behind."""
    uri = (directory / JOURNAL_FILE).resolve().as_uri() + "?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        rows, distinct = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT serial || ':' || counter) FROM records").fetchone()
    return int(rows), int(distinct)


# ---------------------------------------------------------------- batch of 256

def _bench_slices(benchmark, request, pool: TokenPool, call: Callable[[list[bytes]], Any]
                  ) -> tuple[int, Any, int]:
    """Benchmark `call` on token slice r in round r (never the same tokens
    twice), every call's reasons checked all-OK. One untimed call on slice 0
    first: the warm-up (fills the credential cache) and the estimate the round
    count is planned from. Returns the last slice index, its result and the
    number of calls."""
    calls = wrong = 0
    next_slice = 0

    def setup() -> tuple[tuple[list[bytes], int], dict[str, Any]]:
        nonlocal next_slice
        next_slice += 1
        return (pool.slice(next_slice - 1), next_slice - 1), {}

    def run(tokens: list[bytes], k: int) -> tuple[int, Any]:
        nonlocal calls, wrong
        calls += 1
        result = call(tokens)
        if result.reasons.any():
            wrong += 1
        return k, result

    first, _ = setup()
    rounds = _plan_rounds(request.config, _timed(lambda: run(*first)), ROUNDS_CAP)
    k, result = benchmark.pedantic(run, setup=setup, rounds=rounds)
    assert wrong == 0
    return k, result, calls


@pytest.mark.benchmark(group="gateway-batch")
def test_gateway_verify_batch(benchmark, request, env, pool: TokenPool,
                              make_trust: Callable[..., TrustStore]) -> None:
    """qrpay.verify_batch alone, threads=1, warm cache: round r verifies
    slice r, the tokens scan_batch journals in its round r."""
    benchmark.extra_info["batch"] = env.batch
    trust = make_trust()
    verify_batch, now = qrpay.verify_batch, env.now
    k, result, calls = _bench_slices(
        benchmark, request, pool, lambda tokens: verify_batch(tokens, trust, now, threads=1))
    assert result.counts() == {Reason.OK: env.batch}
    assert np.array_equal(result.account, pool.accounts)
    assert np.array_equal(result.counter, pool.counters(k))
    assert trust.cache_stats() == (calls * env.batch - env.n_riders, env.n_riders), \
        "verify_batch missed the credential cache after its first call"


@pytest.mark.benchmark(group="gateway-batch")
def test_scan_batch(benchmark, request, env, pool: TokenPool, journal_dir: Path,
                    make_trust: Callable[..., TrustStore]) -> None:
    """Gateway.scan_batch on 256 never-scanned tokens (round r: slice r):
    verify_batch (threads=1, warm cache), the gateway checks, 256 receipts and
    one durable journal commit."""
    benchmark.extra_info["batch"] = env.batch
    trust = make_trust()
    gateway = _open_gateway(journal_dir, trust)
    request.addfinalizer(gateway.close)
    benchmark.extra_info["journal_fs"] = _filesystem(journal_dir)
    scan_batch, now, bus = gateway.scan_batch, env.now, Scene.BUS
    amounts = [AMOUNT] * env.batch
    k, result, calls = _bench_slices(benchmark, request, pool,
                                     lambda tokens: scan_batch(tokens, amounts, bus, now))

    # Every call accepted every token as new: journaled once each, none a double tap.
    assert not any(r is None or r.duplicate for r in result.receipts)
    assert [r.counter for r in result.receipts if r] == pool.counters(k).tolist()
    assert _journal_rows(journal_dir) == (calls * env.batch, calls * env.batch)
    per_rider = calls * pool.per_rider
    for account in pool.accounts[:env.n_riders].tolist():
        assert gateway.offline_spend(account) == (per_rider * AMOUNT, per_rider)
    assert trust.cache_stats() == (calls * env.batch - env.n_riders, env.n_riders), \
        "scan_batch missed the credential cache after its first call"


# ---------------------------------------------------------------- one scan

@pytest.mark.benchmark(group="gateway-scan")
def test_scan(benchmark, request, env, pool: TokenPool, journal_dir: Path,
              make_trust: Callable[..., TrustStore]) -> None:
    """Gateway.scan of one never-scanned token, credential cached: one
    verify, the checks and one durable journal commit per call. pytest-benchmark
    has no percentiles, so the median and p99 of the per-call times (each
    round is one call) go into extra_info["latency_us"]."""
    trust = make_trust()
    gateway = _open_gateway(journal_dir, trust)
    request.addfinalizer(gateway.close)
    fs = _filesystem(journal_dir)
    # Warm the credential cache without scanning anything: this gateway has
    # seen none of the pool's tokens, so all of them stay fresh for it.
    assert not qrpay.verify_batch(pool.slice(0), trust, env.now).reasons.any()
    scan, now, bus = gateway.scan, env.now, Scene.BUS
    calls = wrong = 0
    next_token = 0

    def setup() -> tuple[tuple[bytes, int], dict[str, Any]]:
        nonlocal next_token
        next_token += 1
        return (pool.token(next_token - 1)[0], next_token - 1), {}

    def run(token: bytes, i: int) -> tuple[int, Receipt]:
        nonlocal calls, wrong
        calls += 1
        receipt = scan(token, AMOUNT, bus, now)
        if receipt.duplicate:
            wrong += 1
        return i, receipt

    def untimed_scan() -> None:
        args, _ = setup()
        run(*args)

    warmup = _warm_journal(journal_dir, untimed_scan)
    estimate = float(np.median(warmup[-WAL_STEADY:]))
    rounds = _plan_rounds(request.config, estimate, LATENCY_CAP,
                          at_least=min(LATENCY_MIN_SAMPLES, math.ceil(1.0 / estimate)))
    i, receipt = benchmark.pedantic(run, setup=setup, rounds=rounds)

    assert wrong == 0 and calls == next_token
    _token, account, counter = pool.token(i)
    assert (receipt.account, receipt.counter, receipt.amount) == (account, counter, AMOUNT)
    assert receipt.record == i + 1  # the journal's seq: one record per scan, in order
    assert _journal_rows(journal_dir) == (calls, calls)
    if benchmark.stats is not None:  # None under --benchmark-disable
        samples = np.asarray(benchmark.stats.stats.data)
        median, p99 = np.percentile(samples, [50, 99])
        benchmark.extra_info["latency_us"] = {
            "median": round(float(median) * 1e6, 2), "p99": round(float(p99) * 1e6, 2),
            "max": round(float(samples.max()) * 1e6, 2), "samples": int(samples.size)}
        benchmark.extra_info["journal_fs"] = fs
        benchmark.extra_info["warmup_scans"] = len(warmup)
