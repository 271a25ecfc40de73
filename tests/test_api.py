"""The public API: every rejection reason, keys, trust store, generator, batch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import qrpay
from qrpay import (
    DEFAULT_MAX_AGE, DEFAULT_SKEW, Credential, DeviceKey, DevicePublicKey, GatewayKey,
    IssuerKey, IssuerPublicKey, Reason, Role, Scene, TokenGenerator, TrustStore, errors,
    verify, verify_batch,
)
from qrpay._impl import core
from qrpay.format import (
    CRED_BODY_LEN, CRED_LEN, CRED_LIMIT, CRED_STRUCT, TAG_CRED, TOKEN_ISSUED_AT, TOKEN_LEN,
    VERSION,
)

SMALL_ORDER_POINT = bytes(32)  # the encoding 0: y = 0, a point of order 4
NON_CANONICAL = b"\xed" + b"\xff" * 30 + b"\x7f"  # y = p: not reduced mod p


def reason_of(token: bytes | str, trust: TrustStore, now: int) -> Reason:
    with pytest.raises(errors.QrPayError) as info:
        verify(token, trust, now)
    assert isinstance(info.value, errors.error_class(info.value.reason))
    return info.value.reason


def raw_token(cred: Credential, device: DeviceKey, issued_at: int, counter: int = 1,
              scene: int = Scene.BUS) -> bytes:
    return core.make_token(cred.raw, device._secret, issued_at, counter, scene)


# -- accepted --------------------------------------------------------------------------

def test_verified_token_carries_every_field(generator: TokenGenerator, trust: TrustStore,
                                           credential: Credential, now: int) -> None:
    token = generator.make(Scene.METRO, now)
    v = verify(token, trust, now)
    assert (v.account, v.serial, v.counter, v.issued_at, v.scene, v.limit) == (
        1001, 77, 1, now, Scene.METRO, 5000)
    assert v.scenes == credential.scenes
    assert (v.not_before, v.not_after) == (credential.not_before, credential.not_after)
    assert v.kid == credential.kid and v.device_key == credential.device_key
    assert v.raw == token and len(token) == TOKEN_LEN == 204


def test_text_form_verifies_and_fits_version_10_qr(generator: TokenGenerator,
                                                   trust: TrustStore, now: int) -> None:
    text = generator.make_text(Scene.BUS, now)
    assert text.startswith("QP:") and len(text) <= 311
    assert verify(text, trust, now).counter == 1


def test_freshness_edges_are_inclusive(credential: Credential, device: DeviceKey,
                                       trust: TrustStore, now: int) -> None:
    oldest = now - DEFAULT_MAX_AGE - DEFAULT_SKEW
    newest = now + DEFAULT_SKEW
    assert verify(raw_token(credential, device, oldest), trust, now).issued_at == oldest
    assert verify(raw_token(credential, device, newest), trust, now).issued_at == newest
    assert reason_of(raw_token(credential, device, oldest - 1), trust, now) == Reason.TOKEN_STALE
    assert reason_of(raw_token(credential, device, newest + 1), trust,
                     now) == Reason.TOKEN_FROM_FUTURE


# -- every rejection reason ---------------------------------------------------------------

def test_wrong_length(generator: TokenGenerator, trust: TrustStore, now: int) -> None:
    token = generator.make(Scene.BUS, now)
    assert reason_of(token[:-1], trust, now) == Reason.WRONG_LENGTH
    assert reason_of(token + b"\x00", trust, now) == Reason.WRONG_LENGTH
    assert reason_of(b"", trust, now) == Reason.WRONG_LENGTH


def test_unsupported_version(generator: TokenGenerator, trust: TrustStore, now: int) -> None:
    token = bytearray(generator.make(Scene.BUS, now))
    token[0] = 2
    with pytest.raises(errors.UnsupportedVersion):
        verify(bytes(token), trust, now)


def test_unknown_kid(generator: TokenGenerator, now: int) -> None:
    other = TrustStore()
    other.add(IssuerKey.generate())
    assert reason_of(generator.make(Scene.BUS, now), other, now) == Reason.UNKNOWN_KID


def test_issuer_key_without_credential_role(issuer: IssuerKey, generator: TokenGenerator,
                                            now: int) -> None:
    store = TrustStore()
    store.add(issuer, roles=Role.DENY_LIST)
    with pytest.raises(errors.IssuerKeyRole):
        verify(generator.make(Scene.BUS, now), store, now)


def test_a_key_trusted_for_nothing_is_refused(issuer: IssuerKey) -> None:
    # Role(0) was stored silently: a key every verify then refused (issue 11).
    store = TrustStore()
    for nothing in (Role(0), 0):
        with pytest.raises(qrpay.InvalidArgument, match="roles"):
            store.add(issuer, roles=nothing)
    assert len(store) == 0
    assert store.add(issuer, roles=Role.DENY_LIST).roles == Role.DENY_LIST


def test_issuer_key_outside_its_window(issuer: IssuerKey, generator: TokenGenerator,
                                       now: int) -> None:
    token = generator.make(Scene.BUS, now)
    retired = TrustStore()
    retired.add(issuer, not_before=0, not_after=now - 1)
    assert reason_of(token, retired, now) == Reason.ISSUER_KEY_NOT_VALID
    future = TrustStore()
    future.add(issuer, not_before=now + 1)
    assert reason_of(token, future, now) == Reason.ISSUER_KEY_NOT_VALID


def test_forged_credential_is_a_bad_issuer_signature(credential: Credential, device: DeviceKey,
                                                     trust: TrustStore, now: int) -> None:
    forged = bytearray(credential.raw)
    forged[CRED_LIMIT:CRED_LIMIT + 4] = (10**9).to_bytes(4, "little")
    token = core.make_token(bytes(forged), device._secret, now, 1, Scene.BUS)
    with pytest.raises(errors.BadIssuerSignature) as info:
        verify(token, trust, now)
    assert isinstance(info.value, errors.BadSignature)


def test_tampered_token_fields_are_a_bad_device_signature(generator: TokenGenerator,
                                                          trust: TrustStore, now: int) -> None:
    token = bytearray(generator.make(Scene.BUS, now))
    token[TOKEN_ISSUED_AT] ^= 1
    assert reason_of(bytes(token), trust, now) == Reason.BAD_DEVICE_SIGNATURE


def test_token_signed_by_another_device(credential: Credential, trust: TrustStore,
                                        now: int) -> None:
    thief = DeviceKey.generate()
    assert reason_of(raw_token(credential, thief, now), trust, now) == Reason.BAD_DEVICE_SIGNATURE


def test_credential_windows(credential: Credential, device: DeviceKey, trust: TrustStore) -> None:
    early = credential.not_before - 1
    late = credential.not_after + 1
    assert reason_of(raw_token(credential, device, early), trust,
                     early) == Reason.CREDENTIAL_NOT_YET_VALID
    assert reason_of(raw_token(credential, device, late), trust, late) == Reason.CREDENTIAL_EXPIRED
    edge = credential.not_after
    assert verify(raw_token(credential, device, edge), trust, edge).issued_at == edge


def test_scene_outside_the_credential(credential: Credential, device: DeviceKey,
                                      trust: TrustStore, now: int) -> None:
    assert reason_of(raw_token(credential, device, now, scene=Scene.FERRY), trust,
                     now) == Reason.SCENE_NOT_ALLOWED
    assert reason_of(raw_token(credential, device, now, scene=200), trust,
                     now) == Reason.SCENE_NOT_ALLOWED


def test_malformed_text(trust: TrustStore, now: int) -> None:
    for text in ["", "QP", "XX:BB8", "QP:abc", "QP:B", "QP:GGW", "QP:!!!"]:
        with pytest.raises(errors.MalformedText):
            verify(text, trust, now)


def test_every_reason_has_one_error_class() -> None:
    for reason in Reason:
        if reason == Reason.OK:
            continue
        cls = errors.error_class(reason)
        assert issubclass(cls, errors.QrPayError)
        # ...and from the builtin a caller would catch without knowing qrpay.
        assert issubclass(cls, (ValueError, RuntimeError, OSError))
        assert cls.reason == reason
        assert cls().reason == reason


def test_policy_arguments_are_checked(generator: TokenGenerator, trust: TrustStore,
                                      now: int) -> None:
    token = generator.make(Scene.BUS, now)
    with pytest.raises(errors.InvalidArgument):
        verify(token, trust, now, max_age=-1)
    with pytest.raises(errors.InvalidArgument):
        verify_batch([token], trust, now, skew=-1)
    with pytest.raises(errors.InvalidArgument):
        verify_batch([token], trust, now, threads=0)


# -- keys -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [IssuerKey, DeviceKey, GatewayKey])
def test_key_text_and_bytes_round_trip(cls: type[IssuerKey]) -> None:
    key = cls.generate()
    again = cls.from_secret_text(key.secret_text())
    assert again.public == key.public and again.kid == key.kid
    assert cls.from_secret_bytes(key.secret_bytes()).public == key.public
    public_cls = type(key.public)
    assert public_cls.from_text(key.public.to_text()) == key.public
    assert public_cls.from_bytes(key.public.to_bytes()) == key.public
    assert len(key.kid) == 4 and key.kid == qrpay.key_id(key.public.to_bytes())


def test_secret_never_in_repr_str_or_pickle() -> None:
    key = IssuerKey.generate()
    secret = key.secret_bytes()
    for shown in (repr(key), str(key), f"{key}", repr([key])):
        assert secret.hex() not in shown and key.secret_text() not in shown
        assert key.kid.hex() in shown
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_key_roles_do_not_mix() -> None:
    device = DeviceKey.generate()
    with pytest.raises(errors.InvalidKey):
        IssuerKey.from_secret_text(device.secret_text())
    with pytest.raises(errors.InvalidKey):
        IssuerPublicKey.from_text(device.public.to_text())
    assert DevicePublicKey(device.public.to_bytes()) != IssuerPublicKey(device.public.to_bytes())


@pytest.mark.parametrize("bad", [SMALL_ORDER_POINT, NON_CANONICAL, b"\x01" * 31, b"", b"\x00" * 33])
def test_unsafe_public_keys_are_rejected(bad: bytes) -> None:
    with pytest.raises(errors.InvalidKey):
        DevicePublicKey(bad)


@pytest.mark.parametrize("text", ["", "qrpay:issuer-secret:", "qrpay:issuer-secret:***",
                                  "issuer:AAAA", "qrpay:issuer-secret:AAAA"])
def test_corrupt_key_text(text: str) -> None:
    with pytest.raises(errors.InvalidKey):
        IssuerKey.from_secret_text(text)


def test_key_text_has_exactly_one_spelling() -> None:
    # A seed whose text starts "----____": the base64url-only characters occur.
    key = IssuerKey(bytes([0xFB, 0xEF, 0xBE, 0xFF, 0xFF, 0xFF]) + bytes(range(26)))
    text = key.secret_text()
    head, _, body = text.rpartition(":")
    assert "-" in body and "_" in body
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 32 bytes are 43 characters: the last one's two low bits are unused.
    spare_bits = body[:-1] + alphabet[alphabet.index(body[-1]) ^ 1]
    for variant in [text + "=", text[:-2] + "!!" + text[-2:],
                    head + ":" + body.replace("-", "+"), head + ":" + body.replace("_", "/"),
                    head + ":" + spare_bits]:
        with pytest.raises(errors.InvalidKey):
            IssuerKey.from_secret_text(variant)
    assert IssuerKey.from_secret_text(text).public == key.public


def test_unknown_scene_bits_never_admit_a_token(issuer: IssuerKey, device: DeviceKey,
                                                trust: TrustStore, now: int) -> None:
    # A credential signed with a scene bit this version does not know (bit 7).
    body = CRED_STRUCT.pack(VERSION, issuer.kid, 1, 2, device.public.to_bytes(), 0,
                            2**32 - 1, 100, 0x81, b"")[:CRED_BODY_LEN]
    cred = body + issuer._sign(TAG_CRED, body)
    token = core.make_token(cred, device._secret, now, 1, 7)
    assert reason_of(token, trust, now) == Reason.SCENE_NOT_ALLOWED
    assert verify_batch([token], trust, now).reasons[0] == Reason.SCENE_NOT_ALLOWED
    assert verify(core.make_token(cred, device._secret, now, 2, 0), trust, now).scene == Scene.BUS


def test_public_key_verify_raises_bad_signature(issuer: IssuerKey) -> None:
    signature = core.sign_detached(issuer._secret, b"message")
    issuer.public.verify(b"message", signature)
    with pytest.raises(errors.BadSignature):
        issuer.public.verify(b"messagE", signature)
    with pytest.raises(errors.BadSignature):
        issuer.public.verify(b"message", signature[:63])
    with pytest.raises(errors.InvalidArgument):
        issuer.public.verify(3, signature)  # type: ignore[arg-type]


# -- issuing --------------------------------------------------------------------------------

def test_issue_validates_inputs(issuer: IssuerKey, device: DeviceKey, now: int) -> None:
    ok = dict(account=1, device_public=device.public, limit=100, scenes=[Scene.BUS],
              not_before=now, not_after=now + 10)
    for change in [dict(limit=-1), dict(limit=2**32), dict(account=2**64), dict(scenes=[]),
                   dict(not_after=now - 1), dict(account=True), dict(serial=-5)]:
        with pytest.raises(errors.InvalidArgument):
            issuer.issue(**{**ok, **change})  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidKey):
        issuer.issue(**{**ok, "device_public": SMALL_ORDER_POINT})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        issuer.issue(**{**ok, "scenes": [99]})  # type: ignore[arg-type]


def test_credential_parse(credential: Credential) -> None:
    again = Credential.from_bytes(credential.raw)
    assert again == credential
    with pytest.raises(errors.MalformedCredential):
        Credential.from_bytes(credential.raw[:-1])
    wrong_version = b"\x09" + credential.raw[1:]
    with pytest.raises(errors.MalformedCredential):
        Credential.from_bytes(wrong_version)


def test_trust_store_verifies_credentials(trust: TrustStore, credential: Credential,
                                          now: int) -> None:
    assert trust.verify_credential(credential, now).kid == credential.kid
    forged = Credential.from_bytes(credential.raw[:CRED_LIMIT] + b"\xff\xff\xff\x00"
                                   + credential.raw[CRED_LIMIT + 4:])
    with pytest.raises(errors.BadIssuerSignature):
        trust.verify_credential(forged, now)


# -- generator ------------------------------------------------------------------------------

def test_counter_only_goes_up_and_resumes(credential: Credential, device: DeviceKey,
                                         trust: TrustStore, now: int) -> None:
    gen = TokenGenerator(credential, device)
    counters = [verify(gen.make(Scene.BUS, now), trust, now).counter for _ in range(3)]
    assert counters == [1, 2, 3] and gen.counter == 3
    resumed = TokenGenerator(credential, device, counter=gen.counter)
    assert verify(resumed.make(Scene.BUS, now), trust, now).counter == 4


def test_generator_refuses_mismatched_key_and_scene(credential: Credential, now: int) -> None:
    with pytest.raises(errors.InvalidKey):
        TokenGenerator(credential, DeviceKey.generate())
    with pytest.raises(errors.InvalidKey):
        TokenGenerator(credential, IssuerKey.generate())  # type: ignore[arg-type]


def test_generator_refuses_scene_outside_credential(generator: TokenGenerator, now: int) -> None:
    with pytest.raises(errors.InvalidArgument):
        generator.make(Scene.RETAIL, now)
    assert generator.counter == 0


# -- trust store ------------------------------------------------------------------------------

def test_trust_store_lookup_and_changes(issuer: IssuerKey, generator: TokenGenerator,
                                        now: int) -> None:
    store = TrustStore()
    entry = store.add(issuer, not_before=10, not_after=20)
    assert store.get(issuer.kid) == entry and issuer.kid in store and len(store) == 1
    assert entry.valid_at(15) and not entry.valid_at(21)
    with pytest.raises(errors.UnknownKeyId):
        store.get(b"\x00\x00\x00\x00")
    with pytest.raises(errors.InvalidArgument):
        store.add(DeviceKey.generate().public)  # type: ignore[arg-type]
    store.add(issuer)  # widen the window: same key, same kid
    verify(generator.make(Scene.BUS, now), store, now)
    store.remove(issuer.kid)
    with pytest.raises(errors.UnknownKeyId):
        verify(generator.make(Scene.BUS, now), store, now)
    with pytest.raises(errors.UnknownKeyId):
        store.remove(issuer.kid)


def test_credential_cache_makes_returning_riders_cheap(generator: TokenGenerator,
                                                      trust: TrustStore, now: int) -> None:
    for _ in range(5):
        verify(generator.make(Scene.BUS, now), trust, now)
    assert trust.cache_stats() == (4, 1)


# -- batch --------------------------------------------------------------------------------------

def test_batch_reasons_match_single_verify(credential: Credential, device: DeviceKey,
                                           generator: TokenGenerator, trust: TrustStore,
                                           now: int) -> None:
    good = [generator.make(Scene.BUS, now) for _ in range(6)]
    forged = bytearray(good[0])
    forged[CRED_LIMIT] ^= 1
    tokens = good + [
        good[0][:-1], b"", bytes(forged), raw_token(credential, device, now + 999),
        raw_token(credential, device, now, scene=Scene.RETAIL), good[1] + b"x",
    ]
    expected = []
    for t in tokens:
        try:
            verify(t, trust, now)
            expected.append(Reason.OK)
        except errors.TokenRejected as exc:
            expected.append(exc.reason)
    for threads in (1, 2, 3):
        result = verify_batch(tokens, trust, now, threads=threads)
        assert [Reason(r) for r in result.reasons] == expected
        assert list(result.counter[:6]) == [1, 2, 3, 4, 5, 6]
        assert np.all(result.account[6:] == 0) and np.all(result.account[:6] == 1001)
        assert result.ok.sum() == 6 and len(result) == len(tokens)


def test_batch_from_array_and_generate_batch(credential: Credential, device: DeviceKey,
                                             trust: TrustStore, now: int) -> None:
    tokens = qrpay.generate_batch([credential] * 8, [device] * 8, [Scene.CLINIC] * 8,
                                  np.arange(1, 9), now, threads=2)
    assert tokens.shape == (8, TOKEN_LEN)
    for i, row in enumerate(tokens):
        assert row.tobytes() == core.make_token(credential.raw, device._secret, now, i + 1,
                                                Scene.CLINIC)
    result = verify_batch(tokens, trust, now, threads=2)
    assert result.counts() == {Reason.OK: 8}
    assert list(result.scene) == [Scene.CLINIC] * 8


def test_generate_batch_rejects_bad_rows(credential: Credential, device: DeviceKey,
                                         now: int) -> None:
    with pytest.raises(errors.InvalidArgument):
        qrpay.generate_batch([credential], [device], [Scene.RETAIL], [1], now)
    with pytest.raises(errors.InvalidArgument):
        qrpay.generate_batch([credential], [device], [256], [1], now)
    with pytest.raises(errors.InvalidArgument):
        qrpay.generate_batch([credential], [device], [Scene.BUS], [-1], now)
    with pytest.raises(errors.InvalidKey):
        qrpay.generate_batch([credential], [DeviceKey.generate()], [Scene.BUS], [1], now)
    with pytest.raises(errors.InvalidArgument):
        qrpay.generate_batch([credential], [device, device], [Scene.BUS], [1], now)


def test_wrong_token_array_shape(trust: TrustStore, now: int) -> None:
    with pytest.raises(errors.InvalidArgument):
        verify_batch(np.zeros((2, CRED_LEN), dtype=np.uint8), trust, now)
