"""Bad arguments get a typed error (issue 11, F1-F8): every public entry point
raises only QrPayError subclasses for a value of the wrong type or range, and
the compiled core and its twin refuse the same values at the same call.

The first part pins each defect of the issue's repro; the last test feeds
every public entry point wrong types and values with hypothesis.
"""

from __future__ import annotations

import re

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NOW, compiled_core
from hypothesis import given
from hypothesis import strategies as st

import qrpay
from qrpay import (
    Credential, DeviceKey, IssuerKey, Reason, Role, Scene, TokenGenerator, TrustStore, credit,
    errors, verify, verify_batch,
)
from qrpay import _ref, qr
from qrpay._impl import core
from qrpay.format import CRED_LIMIT, MAX_TIME, TOKEN_COUNTER, TOKEN_LEN, U32_MAX, kid_to_int
from qrpay.qr import encode_text
from qrpay.scoring import FeatureBins, LimitBand, LimitPolicy, Scorecard, auc, feature_psi, psi
from qrpay import archive, clearing
from qrpay.clearing import FeeSchedule
from qrpay.keys import SettlementKey
from qrpay.settlement import Settlement

FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def _stable_id(value: object) -> str:
    """A test id without memory addresses (pytest-xdist's workers must
    collect the same ids)."""
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))

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

@pytest.mark.parametrize("bad", NOT_TIMES, ids=_stable_id)
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


@pytest.mark.parametrize("bad", NOT_WINDOWS, ids=_stable_id)
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

@pytest.mark.parametrize("bad", NOT_THREADS, ids=_stable_id)
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


# -- every public entry point, fed wrong types and values ------------------------------------
#
# Each entry point is called with valid arguments except one (sometimes two),
# replaced by a wrong type or value. It may return, or raise a QrPayError
# subclass; anything else (TypeError, ValueError, OverflowError, MemoryError,
# AttributeError, ...) fails. A fixed sweep tries every argument of every
# entry point with every value of JUNK; hypothesis adds generated values.

class World:
    """Valid objects for the entry points' default arguments, built once."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.issuer = IssuerKey(bytes(range(32)))
        self.device = DeviceKey(bytes(range(32, 64)))
        self.gateway_key = qrpay.GatewayKey(bytes(range(64, 96)))
        self.trust = TrustStore()
        self.trust.add(self.issuer, roles=Role.CREDENTIALS | Role.DENY_LIST | Role.SCORECARD)
        self.credential = self.issuer.issue(
            account=1001, device_public=self.device.public, limit=2**31,
            scenes=[Scene.BUS, Scene.METRO], not_before=NOW - 86_400,
            not_after=NOW + 86_400, serial=77)
        self.generator = TokenGenerator(self.credential, self.device)
        self.token = self.generator.make(Scene.BUS, NOW)
        self.text = encode_text(self.token)
        self.signature = core.sign_detached(self.issuer._secret, b"message")
        self.deny_doc = qrpay.sign_deny_list(self.issuer, 1, [5, 6], NOW - 10)
        self.deny_list = qrpay.DenyList.load(self.deny_doc, self.trust)
        self.dirs = 0
        policy = qrpay.GatewayPolicy(max_offline_uses=2**20)
        self.gateway = qrpay.Gateway(self.fresh_dir(), self.gateway_key, self.trust, policy,
                                     clock=lambda: NOW)
        self.gateway.scan(self.token, 100, Scene.BUS, NOW)
        self.batch_doc = self.gateway.export_batch(now=NOW)
        self.settlement = Settlement(self.fresh_dir(), self.trust, [self.gateway_key.public])
        self.settlement.ingest(self.batch_doc)
        # A closed period (the first batch's), for the calls that read one.
        self.settlement_key = SettlementKey(bytes(range(96, 128)))
        self.fees = FeeSchedule(1, {scene: 100 for scene in Scene}, 0)
        self.settlement.set_fee_schedule(self.fees)
        self.settlement.register_gateway(self.gateway_key.public, "bus-co")
        self.cut = NOW + 1_000
        closed = self.settlement.close_period(self.cut, self.settlement_key, now=NOW + 1_000)
        self.statement_doc = self.settlement.statement(closed.number, "bus-co")
        self.references = 0
        rng = np.random.default_rng(11)
        self.X = rng.normal(size=(300, 2))
        self.y = (rng.random(300) < 1 / (1 + np.exp(-self.X[:, 0]))).astype(np.int64)
        self.card = Scorecard.fit(self.X, self.y, ["a", "b"])
        self.card_doc = self.card.sign(self.issuer)
        self.feature = self.card.features[0]
        self.policy = LimitPolicy((LimitBand(500, {Scene.BUS: 1000}),
                                   LimitBand(600, {Scene.BUS: 3000, Scene.METRO: 3000})))

    def fresh_dir(self) -> Path:
        self.dirs += 1
        return self.base / f"d{self.dirs}"

    def reference(self) -> str:
        self.references += 1
        return f"ref-{self.references}"

    def until(self) -> int:
        """A cut after every one before: each close_period closes a new period."""
        self.cut += 1
        return self.cut

    def close(self) -> None:
        self.gateway.close()
        self.settlement.close()


def _open_gateway(w: World, **kwargs: Any) -> None:
    gateway = qrpay.Gateway(**kwargs)
    try:
        gateway.scan(w.token, 1, Scene.BUS)     # reads the clock
    finally:
        gateway.close()


def _open_settlement(**kwargs: Any) -> None:
    Settlement(**kwargs).close()


def _add(w: World, **kwargs: Any) -> Any:
    return TrustStore().add(**kwargs)


def _remove(w: World, kid: Any) -> None:
    store = TrustStore()
    store.add(w.issuer)
    store.remove(kid)


# (area, name, call(world, **arguments), valid arguments(world))
ENTRIES: list[tuple[str, str, Any, Any]] = [
    # keys
    ("keys", "IssuerKey", lambda w, **a: IssuerKey(**a), lambda w: {"seed": bytes(32)}),
    ("keys", "DeviceKey.from_secret_bytes", lambda w, **a: DeviceKey.from_secret_bytes(**a),
     lambda w: {"seed": bytes(32)}),
    ("keys", "GatewayKey.from_secret_text", lambda w, **a: qrpay.GatewayKey.from_secret_text(**a),
     lambda w: {"text": w.gateway_key.secret_text()}),
    ("keys", "IssuerPublicKey", lambda w, **a: qrpay.IssuerPublicKey(**a),
     lambda w: {"data": w.issuer.public.to_bytes()}),
    ("keys", "DevicePublicKey.from_text", lambda w, **a: qrpay.DevicePublicKey.from_text(**a),
     lambda w: {"text": w.device.public.to_text()}),
    ("keys", "key_id", lambda w, **a: qrpay.key_id(**a),
     lambda w: {"public_key": w.issuer.public.to_bytes()}),
    ("keys", "PublicKey.verify", lambda w, **a: w.issuer.public.verify(**a),
     lambda w: {"message": b"message", "signature": w.signature}),
    ("keys", "IssuerKey.issue", lambda w, **a: w.issuer.issue(**a),
     lambda w: {"account": 1, "device_public": w.device.public, "limit": 10,
                "scenes": [Scene.BUS], "not_before": NOW, "not_after": NOW + 1, "serial": 3}),
    # credentials
    ("credentials", "Credential.from_bytes", lambda w, **a: Credential.from_bytes(**a),
     lambda w: {"data": w.credential.raw}),
    ("credentials", "Credential.from_text", lambda w, **a: Credential.from_text(**a),
     lambda w: {"text": w.credential.to_text()}),
    ("credentials", "Credential.allows", lambda w, **a: w.credential.allows(**a),
     lambda w: {"scene": Scene.BUS}),
    # tokens
    ("tokens", "verify", lambda w, **a: verify(**a),
     lambda w: {"token": w.token, "trust": w.trust, "now": NOW, "max_age": 60, "skew": 30}),
    ("tokens", "verify_batch", lambda w, **a: verify_batch(**a),
     lambda w: {"tokens": [w.token, w.text], "trust": w.trust, "now": NOW, "max_age": 60,
                "skew": 30, "threads": 2, "lengths": None}),
    ("tokens", "TokenGenerator", lambda w, **a: TokenGenerator(**a),
     lambda w: {"credential": w.credential, "device_key": w.device, "counter": 5}),
    ("tokens", "TokenGenerator.make", lambda w, **a: w.generator.make(**a),
     lambda w: {"scene": Scene.BUS, "now": NOW}),
    ("tokens", "TokenGenerator.make_text", lambda w, **a: w.generator.make_text(**a),
     lambda w: {"scene": Scene.METRO, "now": NOW}),
    ("tokens", "generate_batch", lambda w, **a: qrpay.generate_batch(**a),
     lambda w: {"credentials": [w.credential] * 2, "device_keys": [w.device] * 2,
                "scenes": [Scene.BUS, Scene.METRO], "counters": [7, 8], "now": NOW,
                "threads": 1}),
    ("tokens", "encode_text", lambda w, **a: qrpay.encode_text(**a), lambda w: {"token": w.token}),
    ("tokens", "decode_text", lambda w, **a: qrpay.decode_text(**a), lambda w: {"text": w.text}),
    ("tokens", "as_token_array", lambda w, **a: qrpay.token.as_token_array(**a),
     lambda w: {"tokens": [w.token]}),
    # trust and deny lists
    ("trust", "TrustStore", lambda w, **a: TrustStore(**a), lambda w: {"cache_size": 16}),
    ("trust", "TrustStore.add", _add,
     lambda w: {"key": w.issuer.public, "not_before": 0, "not_after": NOW, "roles": Role(3)}),
    ("trust", "TrustStore.get", lambda w, **a: w.trust.get(**a), lambda w: {"kid": w.issuer.kid}),
    ("trust", "TrustStore.remove", _remove, lambda w: {"kid": w.issuer.kid}),
    ("trust", "TrustStore.verify_credential", lambda w, **a: w.trust.verify_credential(**a),
     lambda w: {"credential": w.credential, "now": NOW, "role": Role.CREDENTIALS}),
    ("trust", "sign_deny_list", lambda w, **a: qrpay.sign_deny_list(**a),
     lambda w: {"key": w.issuer, "version": 3, "serials": [1, 2], "issued_at": NOW}),
    ("trust", "DenyList.load", lambda w, **a: qrpay.DenyList.load(**a),
     lambda w: {"data": w.deny_doc, "trust": w.trust, "now": NOW}),
    ("trust", "DenyList.contains", lambda w, **a: w.deny_list.contains(**a),
     lambda w: {"serials": [5, 7]}),
    # gateway
    ("gateway", "GatewayPolicy", lambda w, **a: qrpay.GatewayPolicy(**a),
     lambda w: {"max_age": 60, "skew": 30, "transaction_caps": dict(qrpay.gateway.DEFAULT_TRANSACTION_CAPS),
                "max_offline_uses": 3, "clock_tolerance": 5, "deny_list_max_age": None,
                "stale_transaction_cap": 300, "retention": 86_400}),
    ("gateway", "Gateway", _open_gateway,
     lambda w: {"directory": w.fresh_dir(), "key": w.gateway_key, "trust": w.trust,
                "policy": qrpay.GatewayPolicy(), "clock": lambda: NOW}),
    ("gateway", "Gateway.scan", lambda w, **a: w.gateway.scan(**a),
     lambda w: {"token": w.generator.make(Scene.BUS, NOW), "amount": 1, "scene": Scene.BUS,
                "now": NOW}),
    ("gateway", "Gateway.scan_batch", lambda w, **a: w.gateway.scan_batch(**a),
     lambda w: {"tokens": [w.generator.make(Scene.BUS, NOW), w.generator.make_text(Scene.BUS, NOW)],
                "amounts": [1, 2], "scene": Scene.BUS, "now": NOW}),
    ("gateway", "Gateway.update_deny_list", lambda w, **a: w.gateway.update_deny_list(**a),
     lambda w: {"data": w.deny_doc, "now": NOW}),
    ("gateway", "Gateway.export_batch", lambda w, **a: w.gateway.export_batch(**a),
     lambda w: {"max_records": 10, "now": NOW}),
    ("gateway", "Gateway.ack", lambda w, **a: w.gateway.ack(**a), lambda w: {"batch_seq": 1}),
    ("gateway", "Gateway.offline_spend", lambda w, **a: w.gateway.offline_spend(**a),
     lambda w: {"account": 1001}),
    ("gateway", "Gateway.deny_list_stale", lambda w, **a: w.gateway.deny_list_stale(**a),
     lambda w: {"now": NOW}),
    # credit history (settlement's kernel)
    ("credit", "credit.history", lambda w, **a: credit.history(**a),
     lambda w: {"charge_account": [1, 2], "charge_time": [NOW - 10, NOW], "charge_amount": [5, 6],
                "pay_account": [1], "pay_time": [NOW], "pay_amount": [5], "now": NOW,
                "due_after": 86_400}),
    # scoring
    ("scoring", "Scorecard.fit", lambda w, **a: Scorecard.fit(**a),
     lambda w: {"X": w.X, "y": w.y, "feature_names": ["a", "b"], "trend": "auto",
                "special_codes": (-1.0,), "max_bins": 4, "min_bin_share": 0.05, "l2": 1.0,
                "base_score": 600.0, "base_odds": 50.0, "pdo": 20.0, "version": 2}),
    ("scoring", "Scorecard.score", lambda w, **a: w.card.score(**a),
     lambda w: {"X": w.X[:20], "threads": 2}),
    ("scoring", "Scorecard.explain", lambda w, **a: w.card.explain(**a),
     lambda w: {"X": w.X[:20], "k": 2, "threads": 1}),
    ("scoring", "Scorecard.reason_names", lambda w, **a: w.card.reason_names(**a),
     lambda w: {"reasons": np.array([[0, -1]], dtype=np.int16)}),
    ("scoring", "Scorecard.from_dict", lambda w, **a: Scorecard.from_dict(**a),
     lambda w: {"d": w.card.as_dict()}),
    ("scoring", "Scorecard.from_json", lambda w, **a: Scorecard.from_json(**a),
     lambda w: {"text": w.card.to_json()}),
    ("scoring", "Scorecard.from_msgpack", lambda w, **a: Scorecard.from_msgpack(**a),
     lambda w: {"data": w.card.to_msgpack()}),
    ("scoring", "Scorecard.load_signed", lambda w, **a: Scorecard.load_signed(**a),
     lambda w: {"data": w.card_doc, "trust": w.trust}),
    ("scoring", "Scorecard.sign", lambda w, **a: w.card.sign(**a), lambda w: {"key": w.issuer}),
    ("scoring", "Scorecard", lambda w, **a: Scorecard(**a),
     lambda w: {"features": w.card.features, "base_points": 10, "version": 1,
                "scaling": {"pdo": 20.0}, "metadata": {}}),
    ("scoring", "FeatureBins", lambda w, **a: FeatureBins(**a),
     lambda w: {"name": "f", "edges": (1.0, 2.0), "points": (1, 2, 3), "missing_points": 0,
                "specials": ((-1.0, 5),), "woe": (0.1,), "iv": 0.2, "trend": "increasing"}),
    ("scoring", "LimitBand+LimitPolicy",
     lambda w, **a: LimitPolicy((LimitBand(**a),)),
     lambda w: {"min_score": 500, "limits": {Scene.BUS: 10}}),
    ("scoring", "LimitPolicy", lambda w, **a: LimitPolicy(**a),
     lambda w: {"bands": w.policy.bands}),
    ("scoring", "LimitPolicy.from_dict", lambda w, **a: LimitPolicy.from_dict(**a),
     lambda w: {"d": w.policy.as_dict()}),
    ("scoring", "LimitPolicy.limits", lambda w, **a: w.policy.limits(**a),
     lambda w: {"scores": [400, 550, 700]}),
    ("scoring", "LimitPolicy.terms", lambda w, **a: w.policy.terms(**a),
     lambda w: {"score": 650}),
    ("scoring", "LimitPolicy.issue", lambda w, **a: w.policy.issue(**a),
     lambda w: {"issuer": w.issuer, "account": 5, "device_public": w.device.public,
                "score": 650, "not_before": NOW, "not_after": NOW + 10}),
    ("scoring", "psi", lambda w, **a: psi(**a),
     lambda w: {"expected": w.X[:, 0], "actual": w.X[:50, 1], "bins": 5, "epsilon": 1e-4}),
    ("scoring", "feature_psi", lambda w, **a: feature_psi(**a),
     lambda w: {"card": w.card, "expected": w.X, "actual": w.X[:50]}),
    ("scoring", "auc", lambda w, **a: auc(**a),
     lambda w: {"scores": w.X[:, 0], "bad": w.y}),
    # settlement
    ("settlement", "Settlement.trust_issuer", lambda w, **a: w.settlement.trust_issuer(**a),
     lambda w: {"key": w.issuer.public, "not_before": 0, "not_after": U32_MAX,
                "roles": Role.CREDENTIALS | Role.DENY_LIST}),
    ("settlement", "Settlement", lambda w, **a: _open_settlement(**a),
     lambda w: {"store": w.fresh_dir(), "trust": w.trust,
                "gateways": [w.gateway_key.public], "max_age": 60, "skew": 30, "threads": 1}),
    ("settlement", "Settlement.register_gateway",
     lambda w, **a: w.settlement.register_gateway(**a), lambda w: {"key": w.gateway_key.public}),
    ("settlement", "Settlement.ingest", lambda w, **a: w.settlement.ingest(**a),
     lambda w: {"data": w.batch_doc}),
    ("settlement", "Settlement.publish_deny_list",
     lambda w, **a: w.settlement.publish_deny_list(**a),
     lambda w: {"key": w.issuer, "issued_at": NOW, "revoke": [9]}),
    ("settlement", "Settlement.record_repayment",
     lambda w, **a: w.settlement.record_repayment(**a),
     lambda w: {"account": 1001, "amount": 1, "paid_at": NOW, "reference": w.reference()}),
    ("settlement", "Settlement.record_repayments",
     lambda w, **a: w.settlement.record_repayments(**a),
     lambda w: {"accounts": [1001], "amounts": [1], "paid_at": [NOW],
                "references": [w.reference()]}),
    ("settlement", "Settlement.repayments", lambda w, **a: w.settlement.repayments(**a),
     lambda w: {"account": 1001}),
    ("settlement", "Settlement.credit_history", lambda w, **a: w.settlement.credit_history(**a),
     lambda w: {"now": w.cut, "due_after": 7 * 86_400}),
    # periods and clearing
    ("periods", "Settlement(horizon, archive)", lambda w, **a: _open_settlement(**a),
     lambda w: {"store": w.fresh_dir(), "horizon": 3_600, "due_after": 86_400,
                "archive": w.fresh_dir(), "archive_format": "npy"}),
    ("periods", "Settlement.register_gateway(operator)",
     lambda w, **a: w.settlement.register_gateway(**a),
     lambda w: {"key": w.gateway_key.public, "operator": "bus-co"}),
    ("periods", "Settlement.close_period", lambda w, **a: w.settlement.close_period(**a),
     lambda w: {"until": w.until(), "key": w.settlement_key, "now": U32_MAX}),
    ("periods", "Settlement.period_report", lambda w, **a: w.settlement.period_report(**a),
     lambda w: {"number": 1}),
    ("periods", "Settlement.statement", lambda w, **a: w.settlement.statement(**a),
     lambda w: {"number": 1, "operator": "bus-co"}),
    ("periods", "Settlement.set_fee_schedule", lambda w, **a: w.settlement.set_fee_schedule(**a),
     lambda w: {"schedule": w.fees}),
    ("periods", "Settlement.fee_schedule", lambda w, **a: w.settlement.fee_schedule(**a),
     lambda w: {"at": NOW}),
    ("periods", "FeeSchedule", lambda w, **a: FeeSchedule(**a),
     lambda w: {"version": 2, "bps": {scene: 10 for scene in Scene}, "effective_from": NOW}),
    ("periods", "clearing.clear", lambda w, **a: clearing.clear(**a),
     lambda w: {"amount": [100, 200], "scene": [0, 2], "operator": [0, 1],
                "operators": ["a", "b"], "schedule": w.fees}),
    ("periods", "clearing.verify_statement", lambda w, **a: clearing.verify_statement(**a),
     lambda w: {"data": w.statement_doc, "public": w.settlement_key.public}),
    ("periods", "archive.read_period", lambda w, **a: archive.read_period(**a),
     lambda w: {"root": w.settlement.archive, "number": 1, "tables": ["charges"]}),
    ("periods", "archive.PeriodWriter", lambda w, **a: _period_writer(**a),
     lambda w: {"root": w.fresh_dir(), "number": 1, "format": "npy", "name": "t",
                "table": {"a": np.arange(3)}, "summary": b"s"}),
    ("periods", "archive.write_period", lambda w, **a: archive.write_period(**a),
     lambda w: {"root": w.fresh_dir(), "number": 1, "tables": {"t": {"a": np.arange(3)}},
                "summary": b"s", "format": "npy"}),
]
AREAS = sorted({area for area, *_ in ENTRIES})


def _period_writer(root: Any, number: Any, format: Any, name: Any, table: Any,
                   summary: Any) -> Path:
    """archive.PeriodWriter through its three calls: open, add, commit."""
    with archive.PeriodWriter(root, number, format=format) as writer:
        writer.add(name, table)
        return writer.commit(summary)


def junk_values(w: World) -> list[Any]:
    """Wrong types and values for any argument, and right types of the
    wrong kind (a key of another role, a token where a credential goes)."""
    return [
        None, True, False, 0, -1, 1, 7, 2**31, 2**32, 2**40 + 1, 2**63, 2**64, -(2**70),
        1.5, -0.0, float("nan"), float("inf"), float("-inf"), 1e300, complex(1, 1),
        "", "x", "QP:", "qrpay:issuer-public:", "1800000000", "bus", "a" * 400,
        b"", b"\x00" * 32, bytes(131), bytes(204), bytearray(3), memoryview(b"ab"),
        [], [None], [1, 2], [-1], [2**64], [1.5], ["a"], [[1, 2], [3]], (1,), {}, {"a": 1},
        {1: 2}, set(), frozenset({1}), object(), iter([1, 2]), len,
        np.int64(3), np.int64(-5), np.uint64(2**64 - 1), np.float64("nan"), np.float32(2.5),
        np.bool_(True), np.zeros(0), np.zeros((2, 3)), np.zeros((3, 2, 1)),
        np.array([None, 1]), np.array(["a", "b"]), np.arange(5), np.array([1.5, np.nan]),
        np.array([np.inf]), np.array([1 + 2j]), np.array(2**63, dtype=np.uint64),
        Path("/nonexistent/qrpay"), Scene.RETAIL, Role.SCORECARD,
        w.issuer, w.issuer.public, w.device, w.device.public, w.gateway_key,
        w.gateway_key.public, w.credential, w.trust, w.token, w.text, w.deny_doc,
        w.deny_list, w.batch_doc, w.card, w.policy, w.feature,
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    w = World(tmp_path_factory.mktemp("world"))
    yield w
    w.close()


def _outcome(w: World, entry: tuple[str, str, Any, Any], bad: dict[str, Any]) -> str | None:
    """None when the call returned or raised a QrPayError; else what it raised."""
    _area, name, call, defaults = entry
    arguments = {**defaults(w), **bad}
    try:
        call(w, **arguments)
    except errors.QrPayError:
        return None
    except Exception as exc:  # noqa: BLE001 - the point of the test
        shown = {k: (repr(v)[:60]) for k, v in bad.items()}
        return f"{name}({shown}): {type(exc).__name__}: {str(exc)[:120]}"
    return None


@contextlib.contextmanager
def _inside(directory: Path) -> Iterator[None]:
    """Run with `directory` as the working directory: a junk `directory`
    argument ("x", "") must not make gateway or store files in the checkout."""
    before = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def test_every_entry_point_accepts_its_valid_arguments(world: World) -> None:
    for _area, _name, call, defaults in ENTRIES:
        call(world, **defaults(world))


@pytest.mark.parametrize("area", AREAS)
def test_every_argument_of_every_entry_point_with_every_junk_value(world: World,
                                                                     area: str) -> None:
    """The sweep: each argument of each entry point in `area`, one at a time,
    replaced by each value of junk_values()."""
    untyped = []
    with _inside(world.base):
        for entry in ENTRIES:
            if entry[0] != area:
                continue
            for param in entry[3](world):
                for value in junk_values(world):
                    found = _outcome(world, entry, {param: value})
                    if found is not None:
                        untyped.append(found)
    assert not untyped, f"{len(untyped)} untyped errors:\n" + "\n".join(untyped)


def junk(w: World) -> st.SearchStrategy[Any]:
    """The sweep's values, and generated ones of every shape."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                        st.text(max_size=8), st.binary(max_size=8))
    return st.one_of(
        st.sampled_from(junk_values(w)), st.integers(), st.floats(), st.complex_numbers(),
        st.text(max_size=400), st.binary(max_size=400), st.lists(scalars, max_size=6),
        st.tuples(scalars, scalars), st.dictionaries(st.text(max_size=4), scalars, max_size=3),
        st.lists(st.floats(), max_size=6).map(np.array),
        st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6).map(np.array),
        st.lists(st.lists(st.integers(0, 255), min_size=2, max_size=2), max_size=4).map(np.array),
    )


@pytest.mark.parametrize("area", AREAS)
@given(data=st.data())
def test_wrong_arguments_raise_only_qrpay_errors(world: World, area: str,
                                                 data: st.DataObject) -> None:
    """Hypothesis: one entry point of `area`, one or two of its arguments
    replaced by wrong types or values; only a QrPayError may come out."""
    entry = data.draw(st.sampled_from([e for e in ENTRIES if e[0] == area]), label="entry")
    params = sorted(entry[3](world))
    chosen = data.draw(st.lists(st.sampled_from(params), min_size=1, max_size=2, unique=True),
                       label="arguments")
    bad = {name: data.draw(junk(world), label=name) for name in chosen}
    with _inside(world.base):
        found = _outcome(world, entry, bad)
    assert found is None, found
