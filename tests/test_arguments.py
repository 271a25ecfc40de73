"""Bad arguments get a typed error (issue 11, F1-F8): every public entry point
raises only QrPayError subclasses for a value of the wrong type or range, and
the compiled core and its twin refuse the same values at the same call.

The first part pins each defect of the issue's repro; the last test feeds
every public entry point wrong types and values with hypothesis.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NOW, compiled_core

import qrpay
from qrpay import (
    Credential, DeviceKey, IssuerKey, Reason, Role, Scene, TokenGenerator, TrustStore, errors,
    verify, verify_batch,
)
from qrpay import _ref, qr
from qrpay._impl import core
from qrpay.format import CRED_LIMIT, MAX_TIME, TOKEN_COUNTER, TOKEN_LEN, U32_MAX, kid_to_int
from qrpay.qr import encode_text

FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"

# Values that are not Unix seconds: NaN, infinities, bools, strings, None
# where a time is required, containers, out of range.
NOT_TIMES = [float("nan"), float("inf"), float("-inf"), "abc", "1800000000", True, False,
             [NOW], (NOW,), {"now": NOW}, b"\x00", complex(NOW, 0), object(), -1, -0.5,
             MAX_TIME + 1, float(2**41), 2**64, -(2**70), np.float64("nan"), np.bool_(True)]
# Values that are not a policy window (max_age, skew): ints in [0, 2**32] only.
NOT_WINDOWS = [None, 1.5, 60.0, True, "60", -1, 2**32 + 1, 2**70, float("nan"), [60],
               np.float64(60)]
# Values that are neither bytes-like nor text.
NOT_TOKENS = [None, 204, 2**40, -1, 1.5, True, object(), [1, 2, 3], (204,), {"t": 1},
              np.array([None] * 204, dtype=object)]
NOT_THREADS = [0, -1, 257, 2**31, 2**64, 1.5, True, None, "2", float("nan"), [2]]


@pytest.fixture
def token(generator: TokenGenerator, now: int) -> bytes:
    return generator.make(Scene.BUS, now)


def both_cores() -> list[Any]:
    return [compiled_core(), _ref]


def rows_of(issuer: IssuerKey, roles: int = int(Role.CREDENTIALS)) -> list[Any]:
    return [(kid_to_int(issuer.kid), issuer.public.to_bytes(), 0, U32_MAX, roles)]


# -- F1: now, clocks and windows ------------------------------------------------------------

@pytest.mark.parametrize("bad", NOT_TIMES, ids=repr)
def test_now_that_is_not_a_time_is_invalid_argument(bad: object, token: bytes,
                                                     trust: TrustStore,
                                                     generator: TokenGenerator,
                                                     credential: Credential,
                                                     device: DeviceKey) -> None:
    made = generator.counter
    with pytest.raises(errors.InvalidArgument):
        verify(token, trust, bad)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        verify_batch([token], trust, bad)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        generator.make(Scene.BUS, bad)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        qrpay.generate_batch([credential], [device], [Scene.BUS], [1], bad)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        trust.verify_credential(credential, bad)  # type: ignore[arg-type]
    assert generator.counter == made     # nothing was made


def test_times_as_numbers_still_work(token: bytes, trust: TrustStore, now: int) -> None:
    # A float or numpy time is truncated to whole seconds, as documented.
    for t in (now, float(now) + 0.9, np.int64(now), np.float64(now), np.uint32(now)):
        assert verify(token, trust, t).counter == 1  # type: ignore[arg-type]
        assert verify_batch([token], trust, t).ok.all()  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", NOT_WINDOWS, ids=repr)
def test_window_that_is_not_an_int_is_invalid_argument(bad: object, token: bytes,
                                                       trust: TrustStore, now: int) -> None:
    for kwargs in ({"max_age": bad}, {"skew": bad}):
        with pytest.raises(errors.InvalidArgument):
            verify(token, trust, now, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument):
            verify_batch([token], trust, now, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("module", ["compiled", "twin"])
def test_core_policy_arguments_are_plain_ints(module: str, token: bytes,
                                              issuer: IssuerKey) -> None:
    """The core's own verify_one: the same InvalidArgument on both cores for
    a bool, a float, None, a numpy scalar or an int out of range."""
    m = compiled_core() if module == "compiled" else _ref
    v = m.Verifier(rows_of(issuer), 16)
    assert v.verify_one(token, NOW, 60, 30) == Reason.OK
    for args in ((True, 60, 30), (float(NOW), 60, 30), (None, 60, 30), (np.int64(NOW), 60, 30),
                 (NOW, 60.0, 30), (NOW, 60, None), (NOW, 2**32 + 1, 30), (2**63, 60, 30),
                 (NOW, 60, -1), (NOW, 60, 2**64)):
        with pytest.raises(errors.InvalidArgument):
            v.verify_one(token, *args)


# -- F2: what a token is ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", NOT_TOKENS, ids=lambda v: type(v).__name__ + repr(v)[:20])
def test_verify_takes_bytes_like_or_text_only(bad: object, trust: TrustStore, now: int) -> None:
    # verify(204) was 204 zero bytes (UNSUPPORTED_VERSION); verify(2**40) a MemoryError.
    with pytest.raises(errors.InvalidArgument):
        verify(bad, trust, now)  # type: ignore[arg-type]


def test_verify_measures_buffers_in_bytes(token: bytes, trust: TrustStore, now: int) -> None:
    as_u8 = np.frombuffer(token, dtype=np.uint8)
    assert verify(as_u8, trust, now).raw == token  # type: ignore[arg-type]
    assert verify(memoryview(token), trust, now).raw == token
    assert verify(bytearray(token), trust, now).raw == token
    # 102 uint16 values are 204 bytes: the token's own bytes.
    assert verify(np.frombuffer(token, dtype=np.uint16), trust, now).raw == token  # type: ignore[arg-type]
    # len() is 204 for these, but they hold 0 and 408 bytes.
    for wrong in (np.zeros((TOKEN_LEN, 0), np.uint8),
                  np.frombuffer(token + token, np.uint8).reshape(TOKEN_LEN, 2),
                  np.zeros(TOKEN_LEN, np.uint16)):
        with pytest.raises(errors.WrongLength):
            verify(wrong, trust, now)  # type: ignore[arg-type]


def test_text_longer_than_a_token_text_is_refused_unread(token: bytes, trust: TrustStore,
                                                          now: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    text = encode_text(token)
    assert len(text) == qr.MAX_TEXT_LEN == 309
    assert verify(text, trust, now).raw == token

    def must_not_decode(_text: str) -> bytes:
        raise AssertionError("an over-long text was decoded")

    monkeypatch.setattr(qr, "b45decode", must_not_decode)
    # 312 Base45 characters decode to 208 bytes: WRONG_LENGTH before; now refused unread,
    # as is a 100 MB text (7 s and 1.15 GB before).
    for long_text in ("QP:" + "0" * 312, text + "00", "QP:" + "0" * 100_000_000):
        with pytest.raises(errors.MalformedText):
            verify(long_text, trust, now)
        with pytest.raises(errors.MalformedText):
            qrpay.decode_text(long_text)
        assert verify_batch([long_text], trust, now).reasons.tolist() == [Reason.MALFORMED_TEXT]


def test_trust_store_kid_lookups_take_bytes(trust: TrustStore, issuer: IssuerKey) -> None:
    for bad in (2**40, 4, None, "abcd", 1.5):
        with pytest.raises(errors.InvalidArgument):
            trust.get(bad)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument):
            trust.remove(bad)  # type: ignore[arg-type]
    assert trust.get(bytearray(issuer.kid)).key == issuer.public
    with pytest.raises(errors.UnknownKeyId):
        trust.get(b"\x00" * 4)


def test_format_md_says_no_text_ends_with_a_space() -> None:
    """FORMAT.md said a token's text may end with a space. It never does: the
    last character closes a 3-character group, n // 2025 <= 65535 // 2025 = 32
    ('W'), and a space is 36."""
    doc = " ".join(FORMAT_MD.read_text(encoding="utf-8").split())
    assert "and end with, a space" not in doc
    assert "never ends with a space" in doc
    assert qr.ALPHABET.index(" ") == 36 > 0xFFFF // 45**2 == 32
    tokens = np.random.default_rng(11).integers(0, 256, (2000, TOKEN_LEN), dtype=np.uint8)
    for row in tokens:
        assert not encode_text(row.tobytes()).endswith(" ")
    assert encode_text(b"\xff" * TOKEN_LEN)[-1] == "W"


# -- F3: batch items --------------------------------------------------------------------------

def test_verify_batch_measures_items_in_bytes(token: bytes, trust: TrustStore,
                                              now: int) -> None:
    empty = np.zeros((TOKEN_LEN, 0), np.uint8)
    doubled = np.frombuffer(token + token, np.uint8).reshape(TOKEN_LEN, 2)
    # Before: len() of both is 204 and their 408 bytes joined made two OK rows.
    result = verify_batch([empty, doubled], trust, now)
    assert result.reasons.tolist() == [Reason.WRONG_LENGTH] * 2
    assert not result.account.any()
    assert verify_batch([np.zeros(TOKEN_LEN, np.uint16), b"x"], trust,
                        now).reasons.tolist() == [Reason.WRONG_LENGTH] * 2
    as_u8 = np.frombuffer(token, np.uint8)
    assert verify_batch([as_u8, memoryview(token), bytearray(token)], trust,
                        now).reasons.tolist() == [Reason.OK] * 3


def test_verify_batch_decodes_text_items(generator: TokenGenerator, trust: TrustStore,
                                         now: int) -> None:
    """Text items are decoded, as Gateway.scan_batch does; a text that is not
    a token's text form is MALFORMED_TEXT, one that decodes to another length
    WRONG_LENGTH."""
    raw = generator.make(Scene.BUS, now)
    text = generator.make_text(Scene.METRO, now)
    short = encode_text(raw[:-2])
    result = verify_batch([text, raw, "A" * 204, "QP:abc", short, "QP:" + "0" * 400], trust, now)
    assert result.reasons.tolist() == [
        Reason.OK, Reason.OK, Reason.MALFORMED_TEXT, Reason.MALFORMED_TEXT,
        Reason.WRONG_LENGTH, Reason.MALFORMED_TEXT]
    assert result.counter[:2].tolist() == [2, 1]
    assert result.scene[:2].tolist() == [Scene.METRO, Scene.BUS]
    array, lengths = qrpay.token.as_token_array([text, "QP:abc"])
    assert lengths.tolist() == [TOKEN_LEN, qrpay.token.MALFORMED_TEXT_LENGTH]
    assert verify_batch(array, trust, now, lengths=lengths).reasons.tolist() == [
        Reason.OK, Reason.MALFORMED_TEXT]


@pytest.mark.parametrize("bad_item", NOT_TOKENS, ids=lambda v: type(v).__name__ + repr(v)[:20])
def test_verify_batch_refuses_items_that_are_not_tokens(bad_item: object, token: bytes,
                                                        trust: TrustStore, now: int) -> None:
    with pytest.raises(errors.InvalidArgument):
        verify_batch([token, bad_item], trust, now)  # type: ignore[list-item]


def test_verify_batch_refuses_one_token_as_the_batch(token: bytes, trust: TrustStore,
                                                     now: int) -> None:
    for whole in (encode_text(token), "A" * 204, token, bytearray(token), memoryview(token),
                  None, 5, iter([token]), {token}):
        with pytest.raises(errors.InvalidArgument):
            verify_batch(whole, trust, now)  # type: ignore[arg-type]
    array = np.frombuffer(token, np.uint8).reshape(1, TOKEN_LEN)
    with pytest.raises(errors.InvalidArgument):     # lengths go with an array only
        verify_batch([token], trust, now, lengths=np.array([TOKEN_LEN]))
    for lengths in ([TOKEN_LEN], np.array([204.0]), np.array([TOKEN_LEN, TOKEN_LEN]),
                    np.array([-2]), np.array([2**64 - 1], dtype=np.uint64)):
        with pytest.raises(errors.InvalidArgument):
            verify_batch(array, trust, now, lengths=lengths)  # type: ignore[arg-type]
    assert verify_batch(array, trust, now, lengths=np.array([TOKEN_LEN])).ok.all()


def test_trust_must_be_a_trust_store(token: bytes, issuer: IssuerKey, now: int) -> None:
    for bad in (None, issuer, issuer.public, [issuer.public], "trust"):
        with pytest.raises(errors.InvalidArgument):
            verify(token, bad, now)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument):
            verify_batch([token], bad, now)  # type: ignore[arg-type]


# -- F4: threads, roles, cache_size: the same error at the same call on both cores --------------

@pytest.mark.parametrize("bad", NOT_THREADS, ids=repr)
def test_threads_out_of_range_is_invalid_argument(bad: object, token: bytes,
                                                  trust: TrustStore, issuer: IssuerKey,
                                                  credential: Credential,
                                                  device: DeviceKey, now: int) -> None:
    with pytest.raises(errors.InvalidArgument):
        verify_batch([token], trust, now, threads=bad)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        qrpay.generate_batch([credential], [device], [Scene.BUS], [1], now,
                             threads=bad)  # type: ignore[arg-type]
    array = np.frombuffer(token, np.uint8).reshape(1, TOKEN_LEN)
    lengths = np.array([TOKEN_LEN])
    for m in both_cores():
        with pytest.raises(errors.InvalidArgument):
            m.Verifier(rows_of(issuer), 16).verify_many(array, lengths, now, 60, 30, bad)


def test_no_thread_is_started_for_a_token_or_two(generator: TokenGenerator, trust: TrustStore,
                                                 credential: Credential, device: DeviceKey,
                                                 now: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    real = threading.Thread

    class Counting(real):  # type: ignore[valid-type, misc]
        def start(self) -> None:
            started.append(1)
            super().start()

    monkeypatch.setattr(threading, "Thread", Counting)
    tokens = [generator.make(Scene.BUS, now) for _ in range(16)]
    assert verify_batch(tokens, trust, now, threads=64).ok.all()
    assert len(started) == 1        # 16 tokens: two shares of 8 (was 15 threads)
    started.clear()
    assert verify_batch(tokens[:7], trust, now, threads=256).ok.all()
    assert started == []
    out = qrpay.generate_batch([credential] * 20, [device] * 20, [Scene.BUS] * 20,
                               np.arange(100, 120), now, threads=256)
    assert len(started) == 2 and out.shape == (20, TOKEN_LEN)


def test_cache_size_and_roles_are_checked_when_given(issuer: IssuerKey, token: bytes) -> None:
    # Before: the compiled core failed at the first verify (MemoryError,
    # OverflowError), the twin accepted them.
    for bad in (3, 0, -1, 2**22 + 1, 2**40, 1.5, None, True, "65536"):
        with pytest.raises(errors.InvalidArgument):
            TrustStore(cache_size=bad)  # type: ignore[arg-type]
        for m in both_cores():
            with pytest.raises(errors.InvalidArgument):
                m.Verifier(rows_of(issuer), bad)
    assert TrustStore(cache_size=2**22)._cache_size == 2**22
    store = TrustStore()
    for bad in (2**32 + 1, 8, -1, 1.5, None, True, "1"):
        with pytest.raises(errors.InvalidArgument):
            store.add(issuer, roles=bad)  # type: ignore[arg-type]
    for bad_row in ((2**32, issuer.public.to_bytes(), 0, 1, 1),
                    (1, issuer.public.to_bytes(), -1, 1, 1),
                    (1, issuer.public.to_bytes(), 0, 2**41, 1),
                    (1, issuer.public.to_bytes(), 0, 1, 2**32 + 1),
                    (1, issuer.public.to_bytes(), 0, 1.5, 1),
                    (1, issuer.public.to_bytes(), 0, 1),
                    None):
        for m in both_cores():
            with pytest.raises(errors.InvalidArgument):
                m.Verifier([bad_row], 16)
    for m in both_cores():
        with pytest.raises(errors.InvalidKey):
            m.Verifier([(1, b"\x00" * 31, 0, 1, 1)], 16)
    store.add(issuer, roles=Role.CREDENTIALS | Role.DENY_LIST | Role.SCORECARD)
    assert verify(token, store, NOW).counter == 1


# -- F6: a batch rewritten by another thread during the call -----------------------------------

def test_verify_batch_reports_only_what_it_verified(token: bytes, trust: TrustStore,
                                                    now: int) -> None:
    """Another thread flips the counter of every row while verify_batch runs.
    Before, the fields came from the caller's array after verification: rows
    were reported OK with a counter the device never signed (27,196 of 100,000
    in the repro). Now the batch is copied first and read from the copy."""
    array = np.frombuffer(token * 3000, np.uint8).reshape(-1, TOKEN_LEN).copy()
    top_counter_byte = TOKEN_COUNTER + 3
    for _ in range(3):
        array[:] = np.frombuffer(token, np.uint8)
        stop = threading.Event()

        def flip() -> None:
            while not stop.is_set():
                array[:, top_counter_byte] ^= 0x80

        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            result = verify_batch(array, trust, now, threads=2)
        finally:
            stop.set()
            flipper.join()
        ok = result.ok
        assert (result.counter[ok] == 1).all()
        assert (result.reasons[~ok] == Reason.BAD_DEVICE_SIGNATURE).all()


@pytest.mark.parametrize("module", ["compiled", "twin"])
def test_core_never_caches_a_credential_rewritten_during_the_call(
        module: str, issuer: IssuerKey, credential: Credential, device: DeviceKey,
        now: int) -> None:
    """The core's verify_many put a leader row's credential in the cache after
    the call as it was then, not as it was verified: a thread rewriting the
    array could get a forged credential cached, and every later token on it
    would skip the issuer signature. The core copies its inputs first."""
    m = compiled_core() if module == "compiled" else _ref
    honest = m.make_token(credential.raw, device._secret, now, 1, Scene.BUS)
    forged_cred = bytearray(credential.raw)
    forged_cred[CRED_LIMIT] ^= 0x40
    forged = m.make_token(bytes(forged_cred), device._secret, now, 2, Scene.BUS)
    assert m.Verifier(rows_of(issuer), 4).verify_one(forged, now, 60, 30) == (
        Reason.BAD_ISSUER_SIGNATURE)
    array = np.frombuffer(honest * 16, np.uint8).reshape(-1, TOKEN_LEN).copy()
    lengths = np.full(16, TOKEN_LEN)
    for _ in range(40):
        verifier = m.Verifier(rows_of(issuer), 4)
        array[:] = np.frombuffer(honest, np.uint8)
        stop = threading.Event()

        def flip() -> None:
            while not stop.is_set():
                array[0, CRED_LIMIT] ^= 0x40

        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            verifier.verify_many(array, lengths, now, 60, 30, 1)
        finally:
            stop.set()
            flipper.join()
        assert verifier.verify_one(forged, now, 60, 30) == Reason.BAD_ISSUER_SIGNATURE


# -- F7: the core never reads an object as bytes -----------------------------------------------

def test_verify_one_takes_bytes_only(issuer: IssuerKey, token: bytes) -> None:
    for m in both_cores():
        v = m.Verifier(rows_of(issuer), 16)
        for bad in (None, bytearray(token), memoryview(token), encode_text(token), 204,
                    np.frombuffer(token, np.uint8)):
            with pytest.raises(errors.InvalidArgument):
                v.verify_one(bad, NOW, 60, 30)
        for fn, args in ((m.is_valid_point, (None,)), (m.sign_detached, (None, b"")),
                         (m.verify_detached, (None, b"", b"")),
                         (m.verify_detached, (bytes(32), None, b"")),
                         (m.make_token, (None, bytes(64), 0, 0, 0))):
            with pytest.raises(TypeError):     # the core's `bytes x not None`: never read
                fn(*args)


# -- F8: TrustStore.add checks kid collisions under its lock ------------------------------------

class _MeetingDict(dict):  # type: ignore[type-arg]
    """A dict whose get() looks the key up, then waits (briefly) for a second
    caller before it answers: two add() calls that look a kid up outside the
    store's lock both find it free."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=0.5)

    def get(self, key: Any, default: Any = None) -> Any:
        found = super().get(key, default)
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:   # the other caller waits on the lock
            pass
        return found


def test_trust_store_add_checks_kid_collisions_under_its_lock() -> None:
    a, b = IssuerKey.generate(), IssuerKey.generate()
    pa, pb = a.public, b.public
    pb._kid = pa.kid                     # a kid collision (4 bytes: they happen)
    store = TrustStore()
    store._keys = _MeetingDict()
    errors_seen: list[BaseException] = []

    def add(key: Any) -> None:
        try:
            store.add(key)
        except errors.InvalidArgument as exc:
            errors_seen.append(exc)

    adders = [threading.Thread(target=add, args=(k,)) for k in (pa, pb)]
    for t in adders:
        t.start()
    for t in adders:
        t.join()
    assert len(errors_seen) == 1, "both keys were added under one kid"
    assert len(store) == 1
