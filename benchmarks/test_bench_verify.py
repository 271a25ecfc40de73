"""Verification: raw libsodium baseline, qrpay.verify cold and cached, verify_batch.

Every benchmark checks what it measured: raw opens return the signed message,
verify returns the right account for every call, batches come back all OK with
the right fields, and the cache hit/miss counters show the path we meant to time.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import nacl.bindings as sodium
import numpy as np
import pytest

import qrpay
from qrpay import Reason, Scene, TokenGenerator, TrustStore


def _record_throughput(benchmark, per_call: int) -> None:
    # benchmark.stats is None when benchmarking is disabled (--benchmark-disable).
    if benchmark.stats is not None and benchmark.stats.stats.median > 0:
        benchmark.extra_info["tokens_per_s"] = per_call / benchmark.stats.stats.median


# ---------------------------------------------------------------- raw baseline

@pytest.mark.benchmark(group="verify-single")
def test_raw_open_x1(benchmark, env) -> None:
    """One crypto_sign_open of a token-sized message (64 + 16 + 140 bytes)."""
    open_ = sodium.crypto_sign_open
    # Cycled over the same 64 riders as the cold verify, so both pay for next().
    pool = itertools.cycle([(r.token_signed, r.device.public.to_bytes(), r.token_message)
                            for r in env.riders])
    wrong = 0

    def run() -> bytes:
        nonlocal wrong
        signed, pk, message = next(pool)
        opened = open_(signed, pk)  # raises BadSignatureError on a bad signature
        if len(opened) != 156:
            wrong += 1
        return opened

    opened = benchmark(run)
    assert wrong == 0
    assert opened in {r.token_message for r in env.riders}


@pytest.mark.benchmark(group="verify-single")
def test_raw_open_x2(benchmark, env) -> None:
    """Two crypto_sign_open: the credential's issuer signature (16 + 67 bytes
    signed) and the token's device signature (16 + 140 bytes signed)."""
    open_ = sodium.crypto_sign_open
    issuer_pk = env.issuer.public.to_bytes()
    pool = itertools.cycle([(r.cred_signed, r.token_signed, r.device.public.to_bytes())
                            for r in env.riders])
    wrong = 0

    def run() -> tuple[bytes, bytes]:
        nonlocal wrong
        cred_signed, token_signed, device_pk = next(pool)
        body = open_(cred_signed, issuer_pk)
        message = open_(token_signed, device_pk)
        if len(body) != 83 or len(message) != 156:
            wrong += 1
        return body, message

    body, message = benchmark(run)
    assert wrong == 0
    assert message[16:16 + 67] == body[16:]  # the token embeds the credential it opened


# ---------------------------------------------------------------- qrpay.verify

def _verify_cycling(benchmark, env, trust: TrustStore) -> tuple[qrpay.VerifiedToken, int]:
    """Benchmark qrpay.verify over the 64 riders' tokens in a fixed cycle, each
    answer checked against its rider; returns the last result and the call count."""
    verify, now = qrpay.verify, env.now
    pool = itertools.cycle([(r.token, r.account) for r in env.riders])
    calls = wrong = 0

    def run() -> qrpay.VerifiedToken:
        nonlocal calls, wrong
        token, account = next(pool)
        calls += 1
        result = verify(token, trust, now)
        if result.account != account:
            wrong += 1
        return result

    result = benchmark(run)
    assert wrong == 0 and calls >= 1
    return result, calls


@pytest.mark.benchmark(group="verify-single")
def test_verify_cold(benchmark, env, make_trust: Callable[..., TrustStore]) -> None:
    """qrpay.verify where the credential's issuer signature is NOT cached, so
    the call does both Ed25519 verifies.

    How every call misses: the store's cache has room for 4 credentials
    (cache_size=4: one set of 4 ways, oldest replaced first), and the calls
    cycle in a fixed order through 64 distinct credentials (64 riders, each
    with its own device key and serial). By the time a credential comes round
    again, 60 others have been inserted since, so it was evicted long ago. The
    cache counters after the run must read 0 hits and one miss per call
    (calibration calls included), or the test fails.
    """
    trust = make_trust(cache_size=4)
    assert trust.verifier().cache_capacity == 4 < env.n_riders
    result, calls = _verify_cycling(benchmark, env, trust)
    assert result.counter == 1 and result.scene is Scene.BUS and result.issued_at == env.now
    hits, misses = trust.cache_stats()
    assert (hits, misses) == (0, calls), "some cold verifies hit the cache"
    benchmark.extra_info["cache"] = {"hits": hits, "misses": misses}


@pytest.mark.benchmark(group="verify-single")
def test_verify_cached(benchmark, env, make_trust: Callable[..., TrustStore]) -> None:
    """qrpay.verify where the credential is already cached: one Ed25519 verify
    (the device signature). Same 64-token cycle as the cold case, but with the
    default cache (65536 entries) warmed by one pass over the pool first."""
    trust = make_trust()
    for r in env.riders:
        assert qrpay.verify(r.token, trust, env.now).account == r.account
    assert trust.cache_stats() == (0, env.n_riders)
    result, calls = _verify_cycling(benchmark, env, trust)
    assert result.counter == 1 and result.scene is Scene.BUS
    hits, misses = trust.cache_stats()
    assert (hits, misses) == (calls, env.n_riders), "some cached verifies missed the cache"
    benchmark.extra_info["cache"] = {"hits": hits, "misses": misses}


# ---------------------------------------------------------------- verify_batch

@pytest.fixture(scope="module")
def batch(env) -> tuple[list[bytes], dict[str, np.ndarray]]:
    """256 tokens from the 64 riders (4 each, counters 1..4, scenes mixed),
    issued in the last minute, shuffled so one rider's tokens are spread out."""
    rows = []
    for rider in env.riders:
        gen = TokenGenerator(rider.credential, rider.device)
        for k in range(env.batch // env.n_riders):
            scene = env.rider_scenes[(rider.account + k) % len(env.rider_scenes)]
            issued_at = env.now - (rider.account * 7 + k) % 50
            rows.append((gen.make(scene, issued_at), rider.account, gen.counter, int(scene),
                         issued_at))
    random.Random(20270115).shuffle(rows)
    assert len(rows) == env.batch
    tokens = [row[0] for row in rows]
    expected = {
        "account": np.array([row[1] for row in rows], dtype=np.uint64),
        "counter": np.array([row[2] for row in rows], dtype=np.uint32),
        "scene": np.array([row[3] for row in rows], dtype=np.uint8),
        "issued_at": np.array([row[4] for row in rows], dtype=np.uint32),
    }
    return tokens, expected


def _batch_ok(result: qrpay.BatchResult, expected: dict[str, np.ndarray]) -> bool:
    return (len(result) == len(expected["account"]) and not result.reasons.any()
            and all(np.array_equal(getattr(result, name), want) for name, want in expected.items()))


@pytest.mark.benchmark(group="verify-batch")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"threads={t}")
def test_verify_batch(benchmark, env, batch, make_trust: Callable[..., TrustStore],
                      threads: int) -> None:
    """qrpay.verify_batch on 256 tokens with every credential cached (warm):
    256 device-signature verifies per call, split over `threads`."""
    benchmark.extra_info["batch"] = env.batch
    tokens, expected = batch
    trust = make_trust()
    # Warm the cache: the first token of each rider misses, its others hit.
    assert _batch_ok(qrpay.verify_batch(tokens, trust, env.now), expected)
    hits0, misses0 = trust.cache_stats()
    assert (hits0, misses0) == (env.batch - env.n_riders, env.n_riders)
    verify_batch, now = qrpay.verify_batch, env.now
    calls = wrong = 0

    def run() -> qrpay.BatchResult:
        nonlocal calls, wrong
        calls += 1
        result = verify_batch(tokens, trust, now, threads=threads)
        if result.reasons.any():
            wrong += 1
        return result

    result = benchmark(run)
    assert wrong == 0 and calls >= 1
    assert _batch_ok(result, expected)
    assert result.counts() == {Reason.OK: env.batch}
    assert trust.cache_stats() == (hits0 + calls * env.batch, misses0), "the warm batch missed the cache"
    _record_throughput(benchmark, env.batch)
