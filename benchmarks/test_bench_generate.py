"""Token generation: raw crypto_sign baseline, TokenGenerator.make, generate_batch.

Ed25519 signatures are deterministic, so correctness is checked byte for byte:
the raw signature equals the one in qrpay's token, and generate_batch returns
exactly the tokens TokenGenerator makes for the same rows. A generated token
must also verify.
"""

from __future__ import annotations

import nacl.bindings as sodium
import numpy as np
import pytest

import qrpay
from qrpay import Scene, TokenGenerator
from qrpay.format import TOKEN_DEVICE_SIG


@pytest.mark.benchmark(group="sign")
def test_raw_sign(benchmark, env) -> None:
    """One crypto_sign of a token-sized message (16-byte tag + 140 bytes)."""
    rider = env.riders[0]
    public, secret = sodium.crypto_sign_seed_keypair(rider.device.secret_bytes())
    sign, message = sodium.crypto_sign, rider.token_message
    assert len(message) == 16 + 140

    def run() -> bytes:
        return sign(message, secret)

    signed = benchmark(run)
    assert signed[64:] == message
    assert sodium.crypto_sign_open(signed, public) == message
    assert signed[:64] == rider.token[TOKEN_DEVICE_SIG:]  # the very signature qrpay made


@pytest.mark.benchmark(group="sign")
def test_make(benchmark, env, make_trust) -> None:
    """TokenGenerator.make: one token, one Ed25519 signature."""
    rider = env.riders[0]
    gen = TokenGenerator(rider.credential, rider.device)
    make, bus, now = gen.make, Scene.BUS, env.now
    calls = 0

    def run() -> bytes:
        nonlocal calls
        calls += 1
        return make(bus, now)

    token = benchmark(run)
    assert calls >= 1 and gen.counter == calls  # every call made a new token
    checked = qrpay.verify(token, make_trust(), now)
    assert (checked.account, checked.counter, checked.scene, checked.issued_at) == (
        rider.account, calls, Scene.BUS, now)
    assert token == TokenGenerator(rider.credential, rider.device, counter=calls - 1).make(bus, now)


@pytest.fixture(scope="module")
def sign_rows(env):
    """256 rows over the 64 riders (4 each, scenes mixed, counters 101..104)
    and the tokens TokenGenerator makes for them, byte for byte."""
    credentials, devices, scenes, counters, expected = [], [], [], [], []
    for i in range(env.batch):
        rider = env.riders[i % env.n_riders]
        scene = env.rider_scenes[i % len(env.rider_scenes)]
        counter = 101 + i // env.n_riders
        credentials.append(rider.credential)
        devices.append(rider.device)
        scenes.append(int(scene))
        counters.append(counter)
        expected.append(TokenGenerator(rider.credential, rider.device, counter=counter - 1)
                        .make(scene, env.now))
    want = np.frombuffer(b"".join(expected), dtype=np.uint8).reshape(env.batch, -1)
    return (credentials, devices, np.array(scenes, dtype=np.uint8),
            np.array(counters, dtype=np.uint32), want)


@pytest.mark.benchmark(group="sign-batch")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"threads={t}")
def test_generate_batch(benchmark, env, sign_rows, make_trust, threads: int) -> None:
    """qrpay.generate_batch: 256 tokens signed in the core across `threads`."""
    benchmark.extra_info["batch"] = env.batch
    credentials, devices, scenes, counters, want = sign_rows
    generate_batch, now = qrpay.generate_batch, env.now
    wrong = 0

    def run() -> np.ndarray:
        nonlocal wrong
        out = generate_batch(credentials, devices, scenes, counters, now, threads=threads)
        if not np.array_equal(out, want):
            wrong += 1
        return out

    out = benchmark(run)
    assert wrong == 0
    assert out.shape == want.shape and np.array_equal(out, want)
    result = qrpay.verify_batch(out, make_trust(), now)
    assert not result.reasons.any()
    assert np.array_equal(result.counter, counters)
    if benchmark.stats is not None and benchmark.stats.stats.median > 0:
        benchmark.extra_info["tokens_per_s"] = env.batch / benchmark.stats.stats.median
