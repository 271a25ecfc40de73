"""Trust bundles: the issuer keys gateways trust, with their validity
windows and roles, signed by a root key (RootKey) that every gateway is
provisioned with once. Settlement serves the latest bundle (GET /v1/trust,
docs/SERVICE.md) and a gateway applies it like a deny list: it verifies
against the root, takes only a newer version, never one from the future,
and keeps it in its journal. So an issuer key is rotated in (a new key
listed) and out (its window ended in a later bundle) without touching each
scanner by hand.

A bundle adds or replaces the keys it lists in the gateway's TrustStore;
it never removes a key it does not list (a key the gateway was provisioned
with stays until a bundle ends its window).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from qrpay import _args
from qrpay.errors import InvalidArgument, InvalidKey, MalformedMessage
from qrpay.format import KID_LEN, PUBLIC_KEY_LEN, TAG_TRUST, U32_MAX, U64_MAX
from qrpay.keys import IssuerPublicKey, RootKey, RootPublicKey
from qrpay.trust import Role, TrustedKey, TrustStore
from qrpay.wire import body_map, sign_document, split_document, verify_document

FORMAT_VERSION = 1
MAX_KEYS = 1024
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int, "root": bytes, "version": int, "issued_at": int, "keys": list,
}
_ALL_ROLES = int(Role.CREDENTIALS | Role.DENY_LIST | Role.SCORECARD)


@dataclass(frozen=True)
class TrustBundle:
    """A verified trust bundle."""

    version: int
    issued_at: int
    keys: tuple[TrustedKey, ...]
    raw: bytes = field(repr=False)

    @classmethod
    def load(cls, data: bytes, root: RootPublicKey) -> TrustBundle:
        """Parse and verify a signed bundle against the root public key;
        BadSignature, MalformedMessage or InvalidKey otherwise."""
        if not isinstance(root, RootPublicKey):
            raise InvalidKey("a trust bundle is verified with a RootPublicKey")
        if not isinstance(data, (bytes, bytearray)):
            raise MalformedMessage(f"a trust bundle is bytes, not {type(data).__name__}")
        body, signature = split_document(bytes(data))
        doc = body_map(body, _FIELDS, max_array=MAX_KEYS)
        if doc["v"] != FORMAT_VERSION:
            raise MalformedMessage(f"unsupported trust bundle format {doc['v']}")
        if doc["root"] != root.kid or len(doc["root"]) != KID_LEN:
            raise MalformedMessage("this trust bundle names another root key")
        verify_document(root, TAG_TRUST, body, signature)
        if not 0 < doc["version"] <= U64_MAX or not 0 <= doc["issued_at"] <= U32_MAX:
            raise MalformedMessage("trust bundle version or time out of range")
        keys = []
        for item in doc["keys"]:
            if (not isinstance(item, list) or len(item) != 4 or not isinstance(item[0], bytes)
                    or len(item[0]) != PUBLIC_KEY_LEN
                    or not all(isinstance(v, int) and not isinstance(v, bool)
                               for v in item[1:])):
                raise MalformedMessage("a bundle key is [public, not_before, not_after, roles]")
            public, not_before, not_after, roles = item
            if not (0 <= not_before <= not_after <= U32_MAX and 0 < roles <= _ALL_ROLES):
                raise MalformedMessage("a bundle key's window or roles are out of range")
            keys.append(TrustedKey(IssuerPublicKey(public), not_before, not_after, Role(roles)))
        if len({k.kid for k in keys}) != len(keys):
            raise MalformedMessage("a trust bundle lists one kid twice")
        return cls(doc["version"], doc["issued_at"], tuple(keys), bytes(data))

    def apply_to(self, trust: TrustStore) -> None:
        """Add or replace every key of the bundle in `trust` (a key with the
        same kid and other bytes is replaced: the bundle is signed by the
        root, the store's key is not)."""
        for entry in self.keys:
            if entry.kid in trust:
                current = trust.get(entry.kid)
                if current == entry:
                    continue
                trust.remove(entry.kid)
            trust.add(entry.key, entry.not_before, entry.not_after, entry.roles)


def bundle_etag(raw: bytes) -> str:
    """The HTTP entity tag of a signed bundle (a hash of its bytes): the
    service answers 304 to a gateway that holds it."""
    return f'"{hashlib.blake2b(raw, digest_size=12).hexdigest()}"'


def sign_trust_bundle(root: RootKey, version: int, keys: list[TrustedKey],
                      issued_at: int) -> bytes:
    """A signed trust bundle listing `keys` (TrustedKey: key, window, roles)."""
    if not isinstance(root, RootKey):
        raise InvalidKey("a trust bundle is signed with a RootKey")
    version = _args.integer("version", version, 1, U64_MAX)
    issued_at = _args.integer("issued_at", issued_at, 0, U32_MAX)
    entries = _args.items("keys", keys)
    if not all(isinstance(k, TrustedKey) for k in entries) or len(entries) > MAX_KEYS:
        raise InvalidArgument(f"keys are up to {MAX_KEYS} TrustedKey entries")
    if len({k.kid for k in entries}) != len(entries):
        raise InvalidArgument("a trust bundle lists each kid once")
    return sign_document(root, TAG_TRUST, {
        "v": FORMAT_VERSION, "root": root.kid, "version": version, "issued_at": issued_at,
        "keys": [[k.key.to_bytes(), k.not_before, k.not_after, int(k.roles)]
                 for k in sorted(entries, key=lambda k: k.kid)]})
