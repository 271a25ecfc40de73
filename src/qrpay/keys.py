"""Ed25519 keys by role: issuer, device (the phone) and gateway (the scanner).

A key's role is part of its type and of its text form, so a device key can not
be loaded where an issuer key is expected. Public keys are checked when they
are loaded: wrong length, small-order or non-canonical points raise InvalidKey.
Secret keys never appear in repr or str.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import ClassVar, Iterable, TypeVar

from nacl import bindings as sodium

from qrpay import _args
from qrpay._impl import core
from qrpay.credential import Credential, Scene, as_scene, scenes_to_mask
from qrpay.errors import BadSignature, InvalidArgument, InvalidKey
from qrpay.format import (
    CRED_BODY_LEN, CRED_STRUCT, KID_LEN, PUBLIC_KEY_LEN, SEED_LEN, TAG_CRED, U32_MAX,
    U64_MAX, VERSION,
)

_KID_PERSON = b"qrpay-kid-v1"
_BYTES = (bytes, bytearray, memoryview)

P = TypeVar("P", bound="PublicKey")
S = TypeVar("S", bound="SigningKey")


def key_id(public_key: bytes) -> bytes:
    """The 4-byte key id (kid) of a public key: a personalised BLAKE2b digest."""
    if not isinstance(public_key, _BYTES):
        raise InvalidKey(f"a public key is bytes, not {type(public_key).__name__}")
    return hashlib.blake2b(public_key, digest_size=KID_LEN, person=_KID_PERSON).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    # Strict: the unpadded URL-safe alphabet only, and only the one text that
    # encodes these bytes (no padding, no stray characters, no spare bits).
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except ValueError as exc:          # binascii.Error is a ValueError
        raise InvalidKey("key text is not base64url") from exc
    if _b64(data) != text:             # also refuses "+", "/" and "=", never emitted
        raise InvalidKey("key text is not canonical base64url")
    return data


def _parse_text(text: str, expected: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidKey("key text must be a str")
    prefix, sep, body = text.strip().rpartition(":")
    if not sep or prefix != expected:
        found = prefix or "no prefix"
        raise InvalidKey(f"expected a key starting with {expected!r}, found {found!r}")
    return _unb64(body)


class PublicKey:
    """An Ed25519 public key with a role. Construct from its 32 bytes."""

    role: ClassVar[str] = "public"
    __slots__ = ("_raw", "_kid")

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, _BYTES):
            raise InvalidKey("a public key is bytes")
        raw = bytes(data)
        if len(raw) != PUBLIC_KEY_LEN:
            raise InvalidKey(f"a public key is {PUBLIC_KEY_LEN} bytes, got {len(raw)}")
        if not core.is_valid_point(raw):
            raise InvalidKey("public key is not a valid prime-order point "
                             "(small order or non-canonical)")
        self._raw = raw
        self._kid = key_id(raw)

    @classmethod
    def from_bytes(cls: type[P], data: bytes) -> P:
        return cls(data)

    @classmethod
    def from_text(cls: type[P], text: str) -> P:
        return cls(_parse_text(text, cls._text_prefix()))

    @classmethod
    def _text_prefix(cls) -> str:
        return f"qrpay:{cls.role}-public"

    def to_bytes(self) -> bytes:
        return self._raw

    def to_text(self) -> str:
        return f"{self._text_prefix()}:{_b64(self._raw)}"

    @property
    def kid(self) -> bytes:
        return self._kid

    def verify(self, message: bytes, signature: bytes) -> None:
        """Check an Ed25519 signature over exactly `message`; raise BadSignature."""
        if not isinstance(message, _BYTES) or not isinstance(signature, _BYTES):
            # bytes(3) would be three zero bytes: never convert anything else.
            raise InvalidArgument("message and signature are bytes")
        if not core.verify_detached(self._raw, bytes(message), bytes(signature)):
            raise BadSignature()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and type(other) is type(self) and (
            hmac.compare_digest(self._raw, other._raw))

    def __hash__(self) -> int:
        return hash((type(self), self._raw))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kid={self._kid.hex()})"


class IssuerPublicKey(PublicKey):
    role = "issuer"
    __slots__ = ()


class DevicePublicKey(PublicKey):
    role = "device"
    __slots__ = ()


class GatewayPublicKey(PublicKey):
    role = "gateway"
    __slots__ = ()

    @property
    def gateway_id(self) -> str:
        """The gateway's name in receipts and settlement: 8 bytes of a
        personalised BLAKE2b of the key, as hex (longer than a kid: a city
        runs many thousands of gateways)."""
        return hashlib.blake2b(self._raw, digest_size=8, person=b"qrpay-gw-v1").hexdigest()


class SettlementPublicKey(PublicKey):
    role = "settlement"
    __slots__ = ()


class RootPublicKey(PublicKey):
    role = "root"
    __slots__ = ()


class SigningKey:
    """An Ed25519 signing key. Export with `secret_bytes()` / `secret_text()`;
    the names say what they hand out."""

    public_class: ClassVar[type[PublicKey]] = PublicKey
    __slots__ = ("_secret", "_public")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, _BYTES) or len(seed) != SEED_LEN:
            raise InvalidKey(f"a secret key seed is {SEED_LEN} bytes")
        public, secret = sodium.crypto_sign_seed_keypair(bytes(seed))
        self._secret = secret  # libsodium layout: seed || public key
        self._public = self.public_class(public)

    @classmethod
    def generate(cls: type[S]) -> S:
        _public, secret = sodium.crypto_sign_keypair()
        return cls(secret[:SEED_LEN])

    @classmethod
    def from_secret_bytes(cls: type[S], seed: bytes) -> S:
        return cls(seed)

    @classmethod
    def from_secret_text(cls: type[S], text: str) -> S:
        return cls(_parse_text(text, cls._text_prefix()))

    @classmethod
    def _text_prefix(cls) -> str:
        return f"qrpay:{cls.public_class.role}-secret"

    def secret_bytes(self) -> bytes:
        """The 32-byte seed. Whoever holds it can sign as this key."""
        return self._secret[:SEED_LEN]

    def secret_text(self) -> str:
        return f"{self._text_prefix()}:{_b64(self.secret_bytes())}"

    @property
    def kid(self) -> bytes:
        return self._public.kid

    def _sign(self, tag: bytes, message: bytes) -> bytes:
        # Every signature this library makes is over tag || message.
        return core.sign_detached(self._secret, tag + message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kid={self.kid.hex()})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError(f"{type(self).__name__} is not pickled; export it with secret_text()")


class DeviceKey(SigningKey):
    """The phone's key: signs tokens (see TokenGenerator)."""

    public_class = DevicePublicKey
    __slots__ = ()

    @property
    def public(self) -> DevicePublicKey:
        return self._public  # type: ignore[return-value]


class GatewayKey(SigningKey):
    """The scanner's key: signs upload batches."""

    public_class = GatewayPublicKey
    __slots__ = ()

    @property
    def public(self) -> GatewayPublicKey:
        return self._public  # type: ignore[return-value]


class IssuerKey(SigningKey):
    """The backend's key: issues credentials (and, later, deny lists)."""

    public_class = IssuerPublicKey
    __slots__ = ()

    @property
    def public(self) -> IssuerPublicKey:
        return self._public  # type: ignore[return-value]

    def issue(
        self,
        account: int,
        device_public: DevicePublicKey | bytes,
        limit: int,
        scenes: Iterable[Scene],
        not_before: int,
        not_after: int,
        serial: int | None = None,
    ) -> Credential:
        """Sign a credential for one device of `account`.

        `limit` is the offline credit limit in minor units (fen, cents);
        `not_before`/`not_after` are Unix seconds, inclusive; `serial` is drawn
        at random (63 bits) unless given. The device key is checked here, so
        gateways can trust the point once the issuer signature verifies.
        """
        device = (device_public if isinstance(device_public, DevicePublicKey)
                  else DevicePublicKey(device_public))
        scene_set = frozenset(as_scene(s) for s in _args.items("scenes", scenes))
        if serial is None:
            serial = int.from_bytes(os.urandom(8), "little") >> 1
        _check_range("account", account, U64_MAX)
        _check_range("serial", serial, U64_MAX)
        _check_range("limit", limit, U32_MAX)
        _check_range("not_before", not_before, U32_MAX)
        _check_range("not_after", not_after, U32_MAX)
        if not_after < not_before:
            raise InvalidArgument("not_after is before not_before")
        if not scene_set:
            raise InvalidArgument("a credential needs at least one scene")
        body = CRED_STRUCT.pack(VERSION, self.kid, account, serial, device.to_bytes(),
                                not_before, not_after, limit, scenes_to_mask(scene_set),
                                b"")[:CRED_BODY_LEN]
        return Credential.from_bytes(body + self._sign(TAG_CRED, body))


class SettlementKey(SigningKey):
    """The backend's settlement key: signs period summaries and operators'
    statements, which anyone holding its public key verifies offline."""

    public_class = SettlementPublicKey
    __slots__ = ()

    @property
    def public(self) -> SettlementPublicKey:
        return self._public  # type: ignore[return-value]


class RootKey(SigningKey):
    """The trust root: signs trust bundles (the issuer keys gateways trust,
    with their windows and roles). Kept offline; gateways are provisioned
    with its public key once (qrpay.trustbundle)."""

    public_class = RootPublicKey
    __slots__ = ()

    @property
    def public(self) -> RootPublicKey:
        return self._public  # type: ignore[return-value]


def _check_range(name: str, value: int, top: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise InvalidArgument(f"{name} must be an integer in [0, {top}], got {value!r}")
