"""Property tests of credentials and tokens, run on whichever backend is active
(the suite runs twice: plain, and with QRPAY_NO_EXTENSIONS=1).

- round trip: any valid credential and token survives issue/parse/make/verify
  and the text form, with every field intact;
- Base45: round trip, canonical decoding, only MalformedText on bad input;
- tampering: every single-bit flip, random corruption, truncation and
  extension is rejected with a typed TokenRejected, single and batch alike;
- agreement: the compiled core and the pure-Python twin (both imported
  directly) return the same reason codes, arrays and signed bytes, and both
  match a small independent model of the check order;
- cache: a cached honest credential never lets a forged twin through, and
  the hit/miss counters and a minimum-size cache behave.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st
from nacl import bindings as sodium
from nacl.exceptions import BadSignatureError

import qrpay
from qrpay import (
    Credential, DeviceKey, IssuerKey, Reason, Role, Scene, TokenGenerator, TrustStore,
    VerifiedToken, decode_text, encode_text, errors, generate_batch, verify, verify_batch,
)
from qrpay import _ref
from qrpay._impl import core
from qrpay.errors import MalformedText, TokenRejected, WrongLength
from qrpay.format import (
    CRED_ACCOUNT, CRED_BODY_LEN, CRED_DEVICE_KEY, CRED_KID, CRED_LEN, CRED_LIMIT,
    CRED_NOT_AFTER, CRED_NOT_BEFORE, CRED_SCENES, CRED_SERIAL, CRED_STRUCT, PUBLIC_KEY_LEN,
    SCENE_COUNT, SECRET_KEY_LEN, TAG_CRED, TAG_TOKEN, TOKEN_BODY_LEN, TOKEN_DEVICE_SIG,
    TOKEN_ISSUED_AT, TOKEN_LEN, TOKEN_SCENE, U32_MAX, U64_MAX, VERSION, kid_to_int,
)
from qrpay.qr import ALPHABET, b45decode, b45encode

try:
    from qrpay import _core as CORE
    CORE_IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # noqa: BLE001 - any failure to load the extension counts
    CORE = None  # type: ignore[assignment]
    CORE_IMPORT_ERROR = exc

NOW = 1_800_000_000  # the same fixed clock as conftest.NOW
QR_V10_M_ALPHANUMERIC = 311  # characters a version-10 QR code holds at ECC M

# Deterministic keys at module level (hypothesis tests can not take the
# function-scoped fixtures). ISSUER/DEVICE use conftest's seeds.
ISSUER = IssuerKey(bytes(range(32)))
DEVICE = DeviceKey(bytes(range(32, 64)))
TRUST = TrustStore()
TRUST.add(ISSUER)
CREDENTIAL = ISSUER.issue(account=1001, device_public=DEVICE.public, limit=5000,
                          scenes=[Scene.BUS, Scene.METRO, Scene.CLINIC],
                          not_before=NOW - 86_400, not_after=NOW + 30 * 86_400, serial=77)

u32 = st.integers(0, U32_MAX)
u64 = st.integers(0, U64_MAX)
scene_sets = st.frozensets(st.sampled_from(list(Scene)), min_size=1)


def expected_single_flip_reason(pos: int) -> Reason:
    """What a token fails on when its bytes change first at `pos` (one trusted key)."""
    if pos == 0:
        return Reason.UNSUPPORTED_VERSION
    if pos < CRED_KID + 4:
        return Reason.UNKNOWN_KID
    if pos < CRED_LEN:
        return Reason.BAD_ISSUER_SIGNATURE
    return Reason.BAD_DEVICE_SIGNATURE


def single_outcome(token: bytes | str, trust: TrustStore, now: int, **policy: int) -> Any:
    """Reason.OK, the rejecting exception, or any other exception (a failure)."""
    try:
        verify(token, trust, now, **policy)
    except Exception as exc:  # noqa: BLE001 - the caller checks the type
        return exc
    return Reason.OK


def rejection_reason(token: bytes | str, trust: TrustStore, now: int, **policy: int) -> Reason:
    """The `.reason` of the typed TokenRejected that `verify` raises; fails the
    test if it accepts or raises anything else."""
    outcome = single_outcome(token, trust, now, **policy)
    assert outcome is not Reason.OK, f"accepted: {token[:12]!r}..."
    assert isinstance(outcome, TokenRejected), f"untyped error {outcome!r}"
    assert type(outcome) is errors.error_class(outcome.reason)
    assert outcome.reason != Reason.OK
    return outcome.reason


def check_batch(tokens: Sequence[bytes], trust: TrustStore, now: int,
                expected: Sequence[int], threads: int = 1, **policy: int) -> None:
    result = verify_batch(tokens, trust, now, threads=threads, **policy)
    assert result.reasons.dtype == np.uint8
    assert result.reasons.tolist() == [int(r) for r in expected]
    rejected = ~result.ok
    for column in (result.account, result.serial, result.counter, result.issued_at,
                   result.scene, result.limit):
        assert not column[rejected].any()


# ============================================================================
# Round trip
# ============================================================================

@st.composite
def valid_cases(draw: Any) -> dict[str, Any]:
    """Everything needed for one valid credential and one token that verifies."""
    not_before, not_after = sorted(draw(st.tuples(u32, u32)))
    now = draw(st.integers(not_before, not_after))
    max_age = draw(st.one_of(st.integers(0, 120), st.integers(0, U32_MAX)))
    skew = draw(st.one_of(st.integers(0, 60), st.integers(0, U32_MAX)))
    scenes = draw(scene_sets)
    return {
        "account": draw(u64), "serial": draw(u64), "limit": draw(u32), "scenes": scenes,
        "scene": draw(st.sampled_from(sorted(scenes))),
        "not_before": not_before, "not_after": not_after, "now": now,
        "max_age": max_age, "skew": skew,
        "issued_at": draw(st.integers(max(0, now - max_age - skew), min(U32_MAX, now + skew))),
        "counter": draw(st.integers(0, U32_MAX - 1)),
        "device": DeviceKey(draw(st.binary(min_size=32, max_size=32))),
    }


@given(valid_cases())
def test_credential_and_token_round_trip(case: dict[str, Any]) -> None:
    device: DeviceKey = case["device"]
    cred = ISSUER.issue(case["account"], device.public, case["limit"], case["scenes"],
                        case["not_before"], case["not_after"], serial=case["serial"])
    parsed = Credential.from_bytes(cred.raw)
    assert parsed == cred
    assert (parsed.kid, parsed.account, parsed.serial, parsed.device_key, parsed.not_before,
            parsed.not_after, parsed.limit, parsed.scenes) == (
        ISSUER.kid, case["account"], case["serial"], device.public.to_bytes(),
        case["not_before"], case["not_after"], case["limit"], case["scenes"])
    assert len(parsed.raw) == CRED_LEN and parsed.to_bytes() == cred.raw
    assert parsed.raw[CRED_BODY_LEN:] == parsed.signature
    assert TRUST.verify_credential(parsed, case["now"]).kid == ISSUER.kid

    gen = TokenGenerator(parsed, device, counter=case["counter"])
    token = gen.make(case["scene"], case["issued_at"])
    assert gen.counter == case["counter"] + 1
    assert isinstance(token, bytes) and len(token) == TOKEN_LEN == 204
    assert token[:CRED_LEN] == cred.raw

    policy = {"max_age": case["max_age"], "skew": case["skew"]}
    verified = verify(token, TRUST, case["now"], **policy)
    assert verified == VerifiedToken(
        account=case["account"], serial=case["serial"], counter=case["counter"] + 1,
        issued_at=case["issued_at"], scene=case["scene"], limit=case["limit"],
        scenes=case["scenes"], not_before=case["not_before"], not_after=case["not_after"],
        kid=ISSUER.kid, device_key=device.public.to_bytes(), raw=token)
    assert type(verified.scene) is Scene

    text = encode_text(token)
    assert text.startswith("QP:") and len(text) <= QR_V10_M_ALPHANUMERIC
    assert set(text) <= set(ALPHABET)  # QR alphanumeric mode
    assert decode_text(text) == token
    assert verify(text, TRUST, case["now"], **policy) == verified

    result = verify_batch([token], TRUST, case["now"], **policy)
    assert result.reasons.tolist() == [Reason.OK]
    assert (int(result.account[0]), int(result.serial[0]), int(result.counter[0]),
            int(result.issued_at[0]), int(result.scene[0]), int(result.limit[0])) == (
        case["account"], case["serial"], case["counter"] + 1, case["issued_at"],
        case["scene"], case["limit"])


@given(st.binary(min_size=CRED_LEN, max_size=CRED_LEN), st.binary(max_size=CRED_LEN + 8))
def test_credential_parsing_is_total(exact: bytes, any_length: bytes) -> None:
    for data in (exact, any_length, bytes([VERSION]) + exact[1:]):
        try:
            cred = Credential.from_bytes(data)
        except errors.MalformedCredential as exc:
            assert exc.reason == Reason.MALFORMED_CREDENTIAL
            continue
        assert cred.raw == data and cred.scenes and len(data) == CRED_LEN
        assert Credential.from_bytes(cred.to_bytes()) == cred


# ============================================================================
# Base45
# ============================================================================

RFC_9285_EXAMPLES = [(b"AB", "BB8"), (b"Hello!!", "%69 VD92EX0"),
                     (b"base-45", "UJCLQE7W581"), (b"ietf!", "QED8WEX0")]


@pytest.mark.parametrize("data,text", RFC_9285_EXAMPLES)
def test_base45_rfc9285_examples(data: bytes, text: str) -> None:
    assert b45encode(data) == text
    assert b45decode(text) == data


def test_base45_range_edges() -> None:
    assert b45encode(b"") == "" and b45decode("") == b""
    assert b45encode(b"\xff") == "U5" and b45decode("U5") == b"\xff"
    assert b45encode(b"\xff\xff") == "FGW" and b45decode("FGW") == b"\xff\xff"
    for bad in ["V5", "GGW", "ZZZ", ":::", "A", "ABCD", "bb8", "BB8\n", "é00"]:
        with pytest.raises(MalformedText):
            b45decode(bad)


@given(st.binary(max_size=600))
def test_base45_round_trip(data: bytes) -> None:
    text = b45encode(data)
    assert len(text) == 3 * (len(data) // 2) + 2 * (len(data) % 2)
    assert set(text) <= set(ALPHABET)
    assert b45decode(text) == data


base45ish_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=ALPHABET, max_size=40),
    st.text(alphabet=ALPHABET + "abc\x00é", max_size=40),
)


@given(base45ish_text)
@example("GGW")
@example("V5")
def test_base45_decode_arbitrary_text(text: str) -> None:
    try:
        data = b45decode(text)
    except MalformedText:
        return
    # Only what the encoder produces decodes (no second spelling of any bytes).
    assert isinstance(data, bytes)
    assert b45encode(data) == text


@given(st.one_of(
    base45ish_text,
    base45ish_text.map(lambda s: "QP:" + s),
    st.binary(max_size=300).map(encode_text),
    st.binary(min_size=TOKEN_LEN, max_size=TOKEN_LEN).map(encode_text),
))
def test_text_that_is_not_a_token_is_rejected_typed(text: str) -> None:
    try:
        raw = decode_text(text)
    except MalformedText:
        raw = None
    reason = rejection_reason(text, TRUST, NOW)
    if raw is None:
        assert reason == Reason.MALFORMED_TEXT
    elif len(raw) != TOKEN_LEN:
        assert reason == Reason.WRONG_LENGTH


# ============================================================================
# Tampering
# ============================================================================

def _flip(token: bytes, bit: int) -> bytes:
    out = bytearray(token)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize("warm", [True, False], ids=["cached", "cold"])
def test_every_single_bit_flip_is_rejected(warm: bool, credential: Credential,
                                           device: DeviceKey, issuer: IssuerKey,
                                           now: int) -> None:
    trust = TrustStore()
    trust.add(issuer)
    token = TokenGenerator(credential, device).make(Scene.BUS, now)
    if warm:  # the honest credential is in the cache before the forgeries arrive
        assert verify(token, trust, now).raw == token
    flipped = [_flip(token, bit) for bit in range(TOKEN_LEN * 8)]
    problems = []
    singles = []
    for bit, bad in enumerate(flipped):
        outcome = single_outcome(bad, trust, now)
        expected = expected_single_flip_reason(bit // 8)
        if not isinstance(outcome, TokenRejected) or outcome.reason != expected \
                or type(outcome) is not errors.error_class(expected):
            problems.append((bit, expected.name, outcome))
        singles.append(outcome.reason if isinstance(outcome, TokenRejected) else -1)
    assert not problems, problems[:10]
    for threads in (1, 2):
        check_batch(flipped, trust, now, singles, threads=threads)
    # The honest token is still fine after all of that.
    assert verify(token, trust, now).raw == token
    check_batch([token, *flipped[::97], token], trust, now, [0, *singles[::97], 0])


@given(st.dictionaries(st.integers(0, TOKEN_LEN - 1), st.integers(1, 255),
                       min_size=1, max_size=32),
       st.booleans())
def test_random_corruption_is_rejected(xors: dict[int, int], warm: bool) -> None:
    gen = TokenGenerator(CREDENTIAL, DEVICE, counter=5)
    token = gen.make(Scene.METRO, NOW)
    trust = TrustStore(cache_size=16)
    trust.add(ISSUER)
    if warm:
        verify(token, trust, NOW)
    bad = bytearray(token)
    for pos, x in xors.items():
        bad[pos] ^= x
    reason = rejection_reason(bytes(bad), trust, NOW)
    assert reason == expected_single_flip_reason(min(xors))
    check_batch([bytes(bad)], trust, NOW, [reason])
    check_batch([token, bytes(bad)], trust, NOW, [Reason.OK, reason], threads=2)


@given(st.binary(min_size=TOKEN_LEN, max_size=TOKEN_LEN), st.binary(max_size=TOKEN_LEN + 8))
def test_random_bytes_are_rejected(exact: bytes, any_length: bytes) -> None:
    headed = bytes([VERSION]) + ISSUER.kid + exact[5:]  # passes the header checks
    tokens = [exact, any_length, headed]
    reasons = [rejection_reason(t, TRUST, NOW) for t in tokens]
    assert reasons[2] == Reason.BAD_ISSUER_SIGNATURE
    if len(any_length) != TOKEN_LEN:
        assert reasons[1] == Reason.WRONG_LENGTH
    check_batch(tokens, TRUST, NOW, reasons)


def test_every_truncation_is_wrong_length(generator: TokenGenerator, trust: TrustStore,
                                          now: int) -> None:
    token = generator.make(Scene.BUS, now)
    cut = [token[:n] for n in range(TOKEN_LEN)]
    for short in cut:
        with pytest.raises(WrongLength) as info:
            verify(short, trust, now)
        assert info.value.reason == Reason.WRONG_LENGTH
        with pytest.raises(WrongLength):
            verify(encode_text(short), trust, now)
    check_batch(cut, trust, now, [Reason.WRONG_LENGTH] * len(cut))
    check_batch([*cut, token], trust, now, [Reason.WRONG_LENGTH] * len(cut) + [0], threads=2)


@given(st.binary(min_size=1, max_size=400))
def test_any_extension_is_wrong_length(tail: bytes) -> None:
    token = TokenGenerator(CREDENTIAL, DEVICE).make(Scene.BUS, NOW)
    longer = token + tail
    with pytest.raises(WrongLength):
        verify(longer, TRUST, NOW)
    with pytest.raises(WrongLength):
        verify(bytearray(longer), TRUST, NOW)
    # Its text form is longer than any token's (309 characters): refused
    # before it is decoded, as malformed text.
    with pytest.raises(MalformedText):
        verify(encode_text(longer), TRUST, NOW)
    check_batch([longer, token], TRUST, NOW, [Reason.WRONG_LENGTH, Reason.OK])


@given(st.integers(0, len(encode_text(bytes(TOKEN_LEN))) - 1),
       st.characters(codec="utf-8"))
def test_text_form_character_substitution(pos: int, char: str) -> None:
    text = TokenGenerator(CREDENTIAL, DEVICE).make_text(Scene.BUS, NOW)
    bad = text[:pos] + char + text[pos + 1:]
    if bad == text:
        assert verify(bad, TRUST, NOW).raw == decode_text(text)
        return
    rejection_reason(bad, TRUST, NOW)


# ============================================================================
# Agreement: compiled core vs pure-Python twin vs a model of the check order
# ============================================================================

def both_cores() -> tuple[Any, Any]:
    if CORE is None:
        if os.environ.get("QRPAY_NO_EXTENSIONS", "") not in ("", "0"):
            pytest.skip(f"qrpay._core not importable and QRPAY_NO_EXTENSIONS is set "
                        f"({CORE_IMPORT_ERROR!r})")
        pytest.fail(f"qrpay._core cannot be imported: {CORE_IMPORT_ERROR!r}")
    return CORE, _ref


def test_core_extension_is_available() -> None:
    compiled, reference = both_cores()
    assert compiled is not reference and compiled.__name__ == "qrpay._core"
    if qrpay.backend == "cython":
        assert core is compiled
    else:
        assert core is reference


AG_ISSUERS = tuple(IssuerKey(bytes([0x10 + i]) * 32) for i in range(4))  # [3]: never trusted
AG_DEVICES = tuple(DeviceKey(bytes([0x50 + i]) * 32) for i in range(3))


def _near(center: int, spread: int) -> st.SearchStrategy[int]:
    return st.integers(max(0, center - spread), min(U32_MAX, center + spread))


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Draw from one of the strategies, picked with the given weights."""
    expanded = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(expanded).flatmap(lambda strategy: strategy)


times = weighted((6, _near(NOW, 200)), (1, _near(NOW, 200_000)), (1, u32))
windows = weighted(
    (3, st.just((0, U32_MAX))),
    (3, st.just((NOW - 86_400, NOW + 86_400))),
    (2, st.tuples(times, times).map(lambda t: (min(t), max(t)))),
    (1, st.tuples(times, times).map(lambda t: (max(t), min(t)))),  # inverted
)
roles_values = weighted((8, st.just(int(Role.CREDENTIALS))), (2, st.sampled_from([3, 5, 7])),
                        (1, st.sampled_from([0, 2, 4, 6])))


@st.composite
def trust_rows(draw: Any) -> list[tuple[int, bytes, int, int, int]]:
    """Rows as TrustStore.verifier() builds them: (kid as int, public key,
    not_before, not_after, roles). Usually one per trusted issuer (AG_ISSUERS[3]
    never is), plus odd ones: duplicate kids (the first row wins) and rows
    whose kid names one key but hold another key's bytes."""
    rows = []
    for issuer in AG_ISSUERS[:3]:
        if draw(weighted((5, st.just(True)), (1, st.just(False)))):
            rows.append((kid_to_int(issuer.kid), issuer.public.to_bytes(), *draw(windows),
                         draw(roles_values)))
    for issuer in draw(st.lists(st.sampled_from(AG_ISSUERS[:3]), max_size=2)):
        pk = draw(st.sampled_from(AG_ISSUERS)).public.to_bytes()
        rows.append((kid_to_int(issuer.kid), pk, *draw(windows), draw(roles_values)))
    shuffled: list[tuple[int, bytes, int, int, int]] = draw(st.permutations(rows))
    return shuffled


def sign_credential(issuer: IssuerKey, body: bytes) -> bytes:
    return body + _ref.sign_detached(issuer._secret, TAG_CRED + body)


@st.composite
def signed_credentials(draw: Any) -> tuple[bytes, DeviceKey]:
    """A credential signed by one of the issuers, with arbitrary (even
    unusual: empty or unknown scene bits) fields, and its device key."""
    issuer = draw(st.sampled_from(AG_ISSUERS))
    device = draw(st.sampled_from(AG_DEVICES))
    not_before, not_after = draw(windows)
    mask = draw(weighted((4, st.integers(1, 127)), (1, st.integers(0, 0xFFFF))))
    body = CRED_STRUCT.pack(VERSION, issuer.kid, draw(u64), draw(u64),
                            device.public.to_bytes(), not_before, not_after, draw(u32),
                            mask, b"")[:CRED_BODY_LEN]
    return sign_credential(issuer, body), device


MUTATIONS = ["none"] * 8 + ["flip", "overwrite", "truncate", "extend", "random",
             "random_header", "forge", "other_device"]


@st.composite
def agreement_tokens(draw: Any, creds: list[tuple[bytes, DeviceKey]],
                     around: int = NOW) -> bytes:
    cred, device = draw(st.sampled_from(creds))
    issued_at = draw(weighted((2, _near(min(max(around, 0), U32_MAX) - 30, 90)), (1, times)))
    counter = draw(u32)
    mask = int.from_bytes(cred[CRED_SCENES:CRED_SCENES + 2], "little")
    allowed = [b for b in range(16) if mask >> b & 1] or [0]
    scene = draw(weighted((4, st.sampled_from(allowed)), (2, st.integers(0, 6)),
                          (1, st.integers(0, 255))))
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "forge":  # change the credential, sign the token part honestly
        pos = draw(st.integers(CRED_KID + 4, CRED_LEN - 1))
        forged = bytearray(cred)
        forged[pos] ^= draw(st.integers(1, 255))
        cred = bytes(forged)
    signer = draw(st.sampled_from(AG_DEVICES)) if kind == "other_device" else device
    token = _ref.make_token(cred, signer._secret, issued_at, counter, scene)
    if kind == "flip":
        token = _flip(token, draw(st.integers(0, TOKEN_LEN * 8 - 1)))
    elif kind == "overwrite":
        out = bytearray(token)
        for pos, value in draw(st.dictionaries(st.integers(0, TOKEN_LEN - 1),
                                               st.integers(0, 255), min_size=1,
                                               max_size=8)).items():
            out[pos] = value
        token = bytes(out)
    elif kind == "truncate":
        token = token[:draw(st.integers(0, TOKEN_LEN - 1))]
    elif kind == "extend":
        token += draw(st.binary(min_size=1, max_size=8))
    elif kind == "random":
        token = draw(st.binary(min_size=TOKEN_LEN, max_size=TOKEN_LEN))
    elif kind == "random_header":
        issuer = draw(st.sampled_from(AG_ISSUERS))
        token = bytes([VERSION]) + issuer.kid + draw(st.binary(min_size=TOKEN_LEN - 5,
                                                               max_size=TOKEN_LEN - 5))
    return token


# The compiled core takes now, max_age and skew as int64_t: its whole domain.
# Values outside the policy bounds the cores enforce must be refused alike.
int64 = st.integers(-2**63, 2**63 - 1)
policy_int64 = st.integers(0, 2**63 - 1)
nows = weighted((12, _near(NOW, 150)), (2, _near(NOW, 100_000)), (1, st.integers(0, 2**34)),
                (1, st.integers(2**40 - 2, 2**40 + 2)), (1, int64))
max_ages = weighted((12, st.integers(0, 120)), (2, st.integers(0, 2**33)),
                    (1, st.integers(2**32 - 2, 2**32 + 2)), (1, policy_int64))
skews = weighted((12, st.integers(0, 60)), (2, st.integers(0, 2**33)),
                 (1, st.integers(2**32 - 2, 2**32 + 2)), (1, policy_int64))


def clearly_valid_policy(now: int, max_age: int, skew: int) -> bool:
    """Times any deployment uses: no core may refuse these as arguments."""
    return 0 <= now <= U32_MAX and 0 <= max_age <= 2**31 and 0 <= skew <= 2**31


@st.composite
def agreement_worlds(draw: Any) -> dict[str, Any]:
    now = draw(nows)
    creds = draw(st.lists(signed_credentials(), min_size=1, max_size=3))
    tokens = draw(st.lists(agreement_tokens(creds, now), min_size=1, max_size=10))
    return {
        "rows": draw(trust_rows()),
        "tokens": tokens,
        "now": now,
        # One time per token for verify_many (settlement re-verifies at scan time).
        "nows": [draw(weighted((3, st.just(now)), (1, _near(NOW, 300)))) for _ in tokens],
        "max_age": draw(max_ages),
        "skew": draw(skews),
        "cache_size": draw(st.sampled_from([4, 5, 8, 65536])),
        "threads": draw(st.integers(1, 3)),
    }


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """A core call's result (ints, arrays as lists) or the type it raised."""
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - compared across cores by type
        return type(exc)
    if isinstance(result, np.ndarray):
        assert result.dtype == np.uint8
        return result.tolist()
    return result


def _sig_ok(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        sodium.crypto_sign_open(signature + message, public_key)
    except BadSignatureError:
        return False
    return True


def model_reason(tok: bytes, rows: list[tuple[int, bytes, int, int, int]], now: int,
                 max_age: int, skew: int) -> int:
    """The check order of errors.Reason, written out independently of both cores."""
    if len(tok) != TOKEN_LEN:
        return Reason.WRONG_LENGTH
    if tok[0] != VERSION:
        return Reason.UNSUPPORTED_VERSION
    kid = int.from_bytes(tok[CRED_KID:CRED_KID + 4], "little")
    row = next((r for r in rows if r[0] == kid), None)
    if row is None:
        return Reason.UNKNOWN_KID
    _kid, pk, key_from, key_until, roles = row
    if not roles & Role.CREDENTIALS:
        return Reason.ISSUER_KEY_ROLE
    if not key_from <= now <= key_until:
        return Reason.ISSUER_KEY_NOT_VALID
    if not _sig_ok(pk, TAG_CRED + tok[:CRED_BODY_LEN], tok[CRED_BODY_LEN:CRED_LEN]):
        return Reason.BAD_ISSUER_SIGNATURE
    device_pk = tok[CRED_DEVICE_KEY:CRED_DEVICE_KEY + PUBLIC_KEY_LEN]
    if not _sig_ok(device_pk, TAG_TOKEN + tok[:TOKEN_BODY_LEN], tok[TOKEN_DEVICE_SIG:]):
        return Reason.BAD_DEVICE_SIGNATURE
    (_v, _k, _a, _s, _d, cred_from, cred_until, _l, mask, _sig) = CRED_STRUCT.unpack(tok[:CRED_LEN])
    issued_at = int.from_bytes(tok[TOKEN_ISSUED_AT:TOKEN_ISSUED_AT + 4], "little")
    scene = tok[TOKEN_SCENE]
    if now < cred_from:
        return Reason.CREDENTIAL_NOT_YET_VALID
    if now > cred_until:
        return Reason.CREDENTIAL_EXPIRED
    if issued_at > now + skew:
        return Reason.TOKEN_FROM_FUTURE
    if issued_at < now - max_age - skew:
        return Reason.TOKEN_STALE
    if scene >= SCENE_COUNT or not mask >> scene & 1:
        return Reason.SCENE_NOT_ALLOWED
    return Reason.OK


def as_rows(tokens: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    array = np.zeros((len(tokens), TOKEN_LEN), dtype=np.uint8)
    for i, tok in enumerate(tokens):
        row = tok[:TOKEN_LEN]
        array[i, :len(row)] = np.frombuffer(row, dtype=np.uint8)
    return array, np.array([len(t) for t in tokens], dtype=np.int64)


@given(agreement_worlds())
def test_core_and_reference_verifiers_agree(world: dict[str, Any]) -> None:
    compiled, reference = both_cores()
    rows, tokens, threads = world["rows"], world["tokens"], world["threads"]
    policy = (world["now"], world["max_age"], world["skew"])
    v_core = compiled.Verifier(rows, world["cache_size"])
    v_ref = reference.Verifier(rows, world["cache_size"])
    assert v_core.cache_capacity == v_ref.cache_capacity >= world["cache_size"]

    # Single tokens, twice: the second pass runs against a warm cache.
    singles = [call(v_core.verify_one, t, *policy) for t in tokens]
    assert [call(v_ref.verify_one, t, *policy) for t in tokens] == singles
    assert [call(v_core.verify_one, t, *policy) for t in tokens] == singles
    assert [call(v_ref.verify_one, t, *policy) for t in tokens] == singles
    refused = singles[0] is errors.InvalidArgument
    if refused:
        event("policy refused")
        assert not clearly_valid_policy(*policy)
        assert all(r is errors.InvalidArgument for r in singles)
    else:
        expected = [int(model_reason(t, rows, *policy)) for t in tokens]
        for r in expected:
            event(f"reason {Reason(r).name}")
        assert singles == expected

    array, lengths = as_rows(tokens)
    batch = call(v_core.verify_many, array, lengths, *policy, threads)
    assert batch == (errors.InvalidArgument if refused else expected)
    assert call(v_ref.verify_many, array, lengths, *policy, threads) == batch
    assert call(compiled.Verifier(rows, world["cache_size"]).verify_many,
                array, lengths, *policy, threads) == batch
    assert call(reference.Verifier(rows, world["cache_size"]).verify_many,
                array, lengths, *policy, 1) == batch
    if not refused:
        if world["cache_size"] >= 1024:  # no evictions: the counters must agree too
            assert (v_core.hits, v_core.misses) == (v_ref.hits, v_ref.misses)
        header_ok = sum(r not in (1, 2, 3, 4, 5) for r in expected)
        for v in (v_core, v_ref):
            assert v.hits + v.misses == 3 * header_ok

    # One `now` per token: each row as if verified alone at its own time.
    per_token = np.array(world["nows"], dtype=np.int64)
    many = call(compiled.Verifier(rows, 4).verify_many, array, lengths, per_token,
                world["max_age"], world["skew"], threads)
    assert call(reference.Verifier(rows, 4).verify_many, array, lengths, per_token,
                world["max_age"], world["skew"], threads) == many
    alone = [call(compiled.Verifier(rows, 4).verify_one, t, n, world["max_age"], world["skew"])
             for t, n in zip(tokens, world["nows"])]
    if errors.InvalidArgument in alone:
        assert many == errors.InvalidArgument
    else:
        assert many == alone == [int(model_reason(t, rows, n, world["max_age"], world["skew"]))
                                 for t, n in zip(tokens, world["nows"])]


TRUST_ROWS = [(kid_to_int(ISSUER.kid), ISSUER.public.to_bytes(), 0, U32_MAX, int(Role.CREDENTIALS))]


@given(st.integers(0, U32_MAX), st.integers(-3600, 3600), max_ages, skews)
@example(NOW, 0, 0, 2**63 - 1)            # now + skew past the top of int64
@example(NOW, 0, 2**63 - 1, 2**62)        # now - max_age - skew below int64
@example(NOW, 0, 2**32, 2**32)
@example(0, 0, 2**32, 2**32)
@example(U32_MAX, 0, 0, 2**32)
def test_core_and_reference_agree_at_policy_extremes(issued_at: int, drift: int,
                                                     max_age: int, skew: int) -> None:
    """Freshness windows up to the edge of the cores' int64 arguments: both
    cores give the model's answer, or both refuse the arguments with
    InvalidArgument - never a wrapped-around now + skew or now - max_age - skew."""
    compiled, reference = both_cores()
    cred = ISSUER.issue(1, DEVICE.public, 1, [Scene.BUS], 0, U32_MAX, serial=1)
    token = compiled.make_token(cred.raw, DEVICE._secret, issued_at, 1, Scene.BUS)
    now = min(U32_MAX, max(0, issued_at + drift))
    got = [call(m.Verifier(TRUST_ROWS, 4).verify_one, token, now, max_age, skew)
           for m in (compiled, reference)]
    array, lengths = as_rows([token])
    got += [call(m.Verifier(TRUST_ROWS, 4).verify_many, array, lengths, now, max_age, skew)
            for m in (compiled, reference)]
    if got[0] is errors.InvalidArgument:
        assert not clearly_valid_policy(now, max_age, skew)
        assert got == [errors.InvalidArgument] * 4
        return
    want = int(model_reason(token, TRUST_ROWS, now, max_age, skew))
    assert got == [want, want, [want], [want]], (
        f"now={now} issued_at={issued_at} max_age={max_age} skew={skew}: "
        f"core/ref/core batch/ref batch={got}, model={Reason(want).name}")


@given(st.integers(-2**70, 2**70), st.integers(0, 2**70), st.integers(0, 2**70))
@example(NOW, 0, 2**63 - 1)   # int64 wrap-around in now + skew
@example(NOW, 0, 2**63)       # does not fit int64_t
@example(NOW, 2**64, 0)
@example(2**63, 60, 30)       # now does not fit int64_t
@example(-1, 60, 30)
def test_verify_public_policy_values_any_size(now: int, max_age: int, skew: int) -> None:
    """`verify`/`verify_batch` take an int `now` and non-negative max_age and
    skew. Either the answer is the model's (so the same on both backends) or
    the arguments are refused with InvalidArgument, by both paths alike -
    never OverflowError or a wrapped-around rejection."""
    token = TokenGenerator(CREDENTIAL, DEVICE).make(Scene.BUS, min(U32_MAX, max(0, now)))
    want = model_reason(token, TRUST_ROWS, now, max_age, skew)
    single = single_outcome(token, TRUST, now, max_age=max_age, skew=skew)
    try:
        batch: Any = verify_batch([token], TRUST, now, max_age=max_age,
                                  skew=skew).reasons.tolist()
    except Exception as exc:  # noqa: BLE001 - checked below
        batch = exc
    if isinstance(single, errors.InvalidArgument):
        assert not clearly_valid_policy(now, max_age, skew)
        assert isinstance(batch, errors.InvalidArgument), f"batch: {batch!r}"
        return
    assert single is Reason.OK or isinstance(single, TokenRejected), (
        f"{qrpay.backend}: verify raised {single!r}, model says {Reason(want).name}")
    assert getattr(single, "reason", single) == want
    assert batch == [want], f"{qrpay.backend}: verify_batch gave {batch!r}"


@given(st.lists(signed_credentials(), min_size=1, max_size=3), st.data())
def test_batch_with_repeated_credentials_agrees(creds: list[tuple[bytes, DeviceKey]],
                                                data: st.DataObject) -> None:
    """Many tokens per credential in one batch (the leader/follower path),
    with forged twins mixed in, against one trusted issuer per credential."""
    compiled, reference = both_cores()
    rows = [(kid_to_int(i.kid), i.public.to_bytes(), 0, U32_MAX, int(Role.CREDENTIALS))
            for i in AG_ISSUERS[:3]]
    tokens = data.draw(st.lists(agreement_tokens(creds), min_size=2, max_size=24))
    now = data.draw(_near(NOW, 150))
    threads = data.draw(st.integers(1, 3))
    array, lengths = as_rows(tokens)
    expected = [int(model_reason(t, rows, now, 60, 30)) for t in tokens]
    for module in (compiled, reference):
        v = module.Verifier(rows, 4)
        assert v.verify_many(array, lengths, now, 60, 30, threads).tolist() == expected
        assert v.verify_many(array, lengths, now, 60, 30, threads).tolist() == expected
        assert [v.verify_one(t, now, 60, 30) for t in tokens] == expected


@given(signed_credentials(), st.sampled_from(AG_DEVICES), u32, u32, st.integers(0, 255))
def test_make_token_is_byte_identical(cred_device: tuple[bytes, DeviceKey], signer: DeviceKey,
                                      issued_at: int, counter: int, scene: int) -> None:
    compiled, reference = both_cores()
    cred, _device = cred_device
    a = compiled.make_token(cred, signer._secret, issued_at, counter, scene)
    b = reference.make_token(cred, signer._secret, issued_at, counter, scene)
    assert isinstance(a, bytes) and isinstance(b, bytes)
    assert a == b and len(a) == TOKEN_LEN
    assert a[:CRED_LEN] == cred


@given(st.integers(-2, U32_MAX + 2), st.integers(-2, U32_MAX + 2), st.integers(-2, 258),
       st.sampled_from([CRED_LEN, CRED_LEN - 1, CRED_LEN + 1, 0]),
       st.sampled_from([SECRET_KEY_LEN, SECRET_KEY_LEN - 1, 32]))
def test_make_token_rejects_the_same_inputs(issued_at: int, counter: int, scene: int,
                                            cred_len: int, key_len: int) -> None:
    compiled, reference = both_cores()
    cred = CREDENTIAL.raw.ljust(cred_len, b"\x01")[:cred_len]
    key = DEVICE._secret.ljust(key_len, b"\x01")[:key_len]

    def outcome(module: Any) -> Any:
        try:
            return module.make_token(cred, key, issued_at, counter, scene)
        except (OverflowError, errors.QrPayError) as exc:
            return type(exc)

    assert outcome(compiled) == outcome(reference)


@given(st.lists(st.tuples(signed_credentials(), st.sampled_from(AG_DEVICES), u32, u32,
                          st.integers(0, 255)), max_size=7))
def test_make_tokens_threads_equal_a_loop(rows: list[Any]) -> None:
    compiled, reference = both_cores()
    n = len(rows)
    creds = np.frombuffer(b"".join(r[0][0] for r in rows), dtype=np.uint8).reshape(n, CRED_LEN)
    keys = np.frombuffer(b"".join(r[1]._secret for r in rows),
                         dtype=np.uint8).reshape(n, SECRET_KEY_LEN)
    issued = np.array([r[2] for r in rows], dtype=np.uint32)
    counters = np.array([r[3] for r in rows], dtype=np.uint32)
    scenes = np.array([r[4] for r in rows], dtype=np.uint8)
    loop = [compiled.make_token(r[0][0], r[1]._secret, r[2], r[3], r[4]) for r in rows]
    assert loop == [reference.make_token(r[0][0], r[1]._secret, r[2], r[3], r[4]) for r in rows]
    for module in (compiled, reference):
        for threads in (1, 2):
            out = module.make_tokens(creds, keys, issued, counters, scenes, threads)
            assert out.dtype == np.uint8 and out.shape == (n, TOKEN_LEN)
            assert [bytes(row) for row in out] == loop


def test_generate_batch_with_threads_equals_make_token(credential: Credential,
                                                       device: DeviceKey, now: int) -> None:
    scenes = [Scene.BUS, Scene.METRO, Scene.CLINIC, Scene.BUS, Scene.METRO]
    counters = list(range(10, 15))
    out = generate_batch([credential] * 5, [device] * 5, scenes, counters, now, threads=2)
    assert [bytes(r) for r in out] == [core.make_token(credential.raw, device._secret, now, c,
                                                       int(s)) for s, c in zip(scenes, counters)]


# ============================================================================
# Credential cache
# ============================================================================

ATTACKER = DeviceKey(b"\xee" * 32)


def _patch(raw: bytes, offset: int, value: bytes) -> bytes:
    out = bytearray(raw)
    out[offset:offset + len(value)] = value
    assert bytes(out) != raw
    return bytes(out)


FORGERIES: dict[str, Callable[[Credential], tuple[bytes, DeviceKey]]] = {
    "limit": lambda c: (_patch(c.raw, CRED_LIMIT, (c.limit + 1).to_bytes(4, "little")), DEVICE),
    "account": lambda c: (_patch(c.raw, CRED_ACCOUNT, (c.account ^ 1).to_bytes(8, "little")),
                          DEVICE),
    "serial": lambda c: (_patch(c.raw, CRED_SERIAL, (c.serial + 1).to_bytes(8, "little")), DEVICE),
    "not_after": lambda c: (_patch(c.raw, CRED_NOT_AFTER, U32_MAX.to_bytes(4, "little")), DEVICE),
    "not_before": lambda c: (_patch(c.raw, CRED_NOT_BEFORE, bytes(4)), DEVICE),
    "scenes": lambda c: (_patch(c.raw, CRED_SCENES, (0x7F).to_bytes(2, "little")), DEVICE),
    "signature": lambda c: (_patch(c.raw, CRED_LEN - 1, bytes([c.raw[-1] ^ 0x80])), DEVICE),
    # The thief swaps in his own device key and signs with it.
    "device_key": lambda c: (_patch(c.raw, CRED_DEVICE_KEY, ATTACKER.public.to_bytes()),
                             ATTACKER),
}


def forged_token(cred: Credential, how: str, issued_at: int, counter: int = 1,
                 scene: Scene = Scene.BUS) -> bytes:
    forged_cred, signer = FORGERIES[how](cred)
    return core.make_token(forged_cred, signer._secret, issued_at, counter, int(scene))


@pytest.mark.parametrize("how", sorted(FORGERIES))
def test_forged_twin_of_a_cached_credential_is_rejected(how: str, credential: Credential,
                                                         device: DeviceKey, issuer: IssuerKey,
                                                         now: int) -> None:
    trust = TrustStore()
    trust.add(issuer)
    gen = TokenGenerator(credential, device)
    honest = gen.make(Scene.BUS, now)
    assert verify(honest, trust, now).raw == honest
    assert trust.cache_stats() == (0, 1)
    assert verify(gen.make(Scene.METRO, now), trust, now).counter == 2
    assert trust.cache_stats() == (1, 1)  # the returning credential is a hit

    forged = forged_token(credential, how, now, counter=3)
    forged2 = forged_token(credential, how, now, counter=4, scene=Scene.METRO)
    for _ in range(2):  # a failed forgery is not cached either
        with pytest.raises(errors.BadIssuerSignature) as info:
            verify(forged, trust, now)
        assert info.value.reason == Reason.BAD_ISSUER_SIGNATURE
    with pytest.raises(errors.BadIssuerSignature):
        verify(encode_text(forged), trust, now)
    bad = Reason.BAD_ISSUER_SIGNATURE
    check_batch([forged], trust, now, [bad])
    check_batch([honest, forged, forged2, honest], trust, now, [0, bad, bad, 0])
    check_batch([forged, honest, forged2], trust, now, [bad, 0, bad], threads=2)
    assert verify(honest, trust, now).raw == honest

    # Forgery first, honest credential not yet cached: same answers.
    fresh = TrustStore(cache_size=4)
    fresh.add(issuer)
    check_batch([forged, forged2, honest, forged], fresh, now, [bad, bad, 0, bad])
    with pytest.raises(errors.BadIssuerSignature):
        verify(forged, fresh, now)


def test_cache_stats_count_returning_credentials(credential: Credential, device: DeviceKey,
                                                 issuer: IssuerKey, now: int) -> None:
    trust = TrustStore()
    trust.add(issuer)
    assert trust.cache_stats() == (0, 0)
    gen = TokenGenerator(credential, device)
    verify(gen.make(Scene.BUS, now), trust, now)
    verify(gen.make(Scene.BUS, now), trust, now)
    verify(gen.make(Scene.BUS, now), trust, now)
    assert trust.cache_stats() == (2, 1)
    check_batch([gen.make(Scene.BUS, now) for _ in range(3)], trust, now, [0, 0, 0])
    assert trust.cache_stats() == (5, 1)
    other = issuer.issue(account=2, device_public=device.public, limit=1, scenes=[Scene.BUS],
                         not_before=0, not_after=U32_MAX, serial=1)
    gen2 = TokenGenerator(other, device)
    check_batch([gen2.make(Scene.BUS, now), gen2.make(Scene.BUS, now)], trust, now, [0, 0])
    assert trust.cache_stats() == (6, 2)  # one signature check for the pair
    # Rejected before the cache (wrong length, unknown kid): not counted.
    check_batch([b"short", bytes([VERSION]) + b"\0\0\0\0" + bytes(199)], trust, now, [1, 3])
    assert trust.cache_stats() == (6, 2)
    trust.add(IssuerKey(b"\x01" * 32))  # changing the store empties the cache
    assert trust.cache_stats() == (0, 0)


POOL_SIZE = 10
POOL_CREDS = [ISSUER.issue(account=5000 + i, device_public=DEVICE.public, limit=100 * i,
                           scenes=[Scene.BUS], not_before=0, not_after=U32_MAX, serial=i)
              for i in range(POOL_SIZE)]
POOL = [(core.make_token(c.raw, DEVICE._secret, NOW, i + 1, Scene.BUS),
         forged_token(c, "limit" if i % 2 else "account", NOW, i + 1))
        for i, c in enumerate(POOL_CREDS)]

ops = st.lists(
    st.tuples(st.sampled_from(["one", "batch"]), st.integers(1, 2),
              st.lists(st.tuples(st.integers(0, POOL_SIZE - 1), st.booleans()),
                       min_size=1, max_size=8)),
    min_size=1, max_size=12)


@given(ops)
def test_minimum_size_cache_under_many_credentials(operations: list[Any]) -> None:
    trust = TrustStore(cache_size=4)
    trust.add(ISSUER)
    assert trust.verifier().cache_capacity == 4
    lookups = 0
    for kind, threads, picks in operations:
        tokens = [POOL[i][forged] for i, forged in picks]
        expected = [Reason.BAD_ISSUER_SIGNATURE if forged else Reason.OK for _, forged in picks]
        if kind == "batch":
            check_batch(tokens, trust, NOW, expected, threads=threads)
            lookups += len(tokens)
            continue
        for token, want in zip(tokens, expected):
            if want == Reason.OK:
                assert verify(token, trust, NOW).raw == token
                hits, misses = trust.cache_stats()
                assert verify(token, trust, NOW).raw == token
                assert trust.cache_stats() == (hits + 1, misses)  # just cached: a hit
                lookups += 2
            else:
                assert rejection_reason(token, trust, NOW) == want
                lookups += 1
    hits, misses = trust.cache_stats()
    assert hits + misses == lookups
    # Whatever the cache holds now, every pool token still gets the right answer.
    every = [t for pair in POOL for t in pair]
    check_batch(every, trust, NOW, [Reason.OK, Reason.BAD_ISSUER_SIGNATURE] * POOL_SIZE)


def test_cache_capacity_is_bounded_and_results_stay_right() -> None:
    trust = TrustStore(cache_size=4)
    trust.add(ISSUER)
    order = list(range(POOL_SIZE)) * 3
    random.Random(7).shuffle(order)
    for i in order:
        honest, forged = POOL[i]
        assert verify(honest, trust, NOW).account == 5000 + i
        assert rejection_reason(forged, trust, NOW) == Reason.BAD_ISSUER_SIGNATURE
    hits, misses = trust.cache_stats()
    assert hits + misses == 2 * len(order)
    assert misses >= POOL_SIZE + len(order)  # forgeries always miss; 4 slots can't hold 10
