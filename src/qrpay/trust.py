"""The issuer keys a verifier trusts, by kid, each with a window and roles."""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qrpay import _args
from qrpay._impl import core
from qrpay.credential import Credential
from qrpay.errors import (
    BadIssuerSignature, InvalidArgument, IssuerKeyNotValid, IssuerKeyRole, UnknownKeyId,
)
from qrpay.format import CRED_BODY_LEN, MAX_TIME, TAG_CRED, U32_MAX, kid_to_int
from qrpay.keys import IssuerKey, IssuerPublicKey


class Role(enum.IntFlag):
    """What a trusted issuer key may sign."""

    CREDENTIALS = 1
    DENY_LIST = 2
    SCORECARD = 4


_ALL_ROLES = int(Role.CREDENTIALS | Role.DENY_LIST | Role.SCORECARD)


@dataclass(frozen=True, slots=True)
class TrustedKey:
    key: IssuerPublicKey
    not_before: int
    not_after: int
    roles: Role

    @property
    def kid(self) -> bytes:
        return self.key.kid

    def valid_at(self, now: int) -> bool:
        return self.not_before <= now <= self.not_after


class TrustStore:
    """Issuer public keys by kid. Verification through a store shares one
    bounded cache of credentials whose issuer signature already verified;
    changing the store empties the cache. `cache_size` is 4 to 2**22
    credentials (InvalidArgument otherwise, here, on either backend)."""

    def __init__(self, cache_size: int = 65536) -> None:
        self._keys: dict[bytes, TrustedKey] = {}
        self._cache_size = _args.cache_size(cache_size)
        self._verifier: Any = None
        self._lock = threading.Lock()

    def add(
        self,
        key: IssuerPublicKey | IssuerKey,
        not_before: int = 0,
        not_after: int = U32_MAX,
        roles: Role = Role.CREDENTIALS,
    ) -> TrustedKey:
        """Trust `key` from `not_before` to `not_after` (Unix seconds in
        [0, 2**40], inclusive) for `roles` (Role flags, at least one). A key whose kid
        names another trusted key is refused (InvalidArgument); adding the
        same key again replaces its window and roles."""
        public = key.public if isinstance(key, IssuerKey) else key
        if not isinstance(public, IssuerPublicKey):
            raise InvalidArgument("a trust store holds issuer public keys")
        not_before = _args.integer("not_before", not_before, 0, MAX_TIME)
        not_after = _args.integer("not_after", not_after, 0, MAX_TIME)
        if not_after < not_before:
            raise InvalidArgument("not_after is before not_before")
        # Role(0) would be a key trusted for nothing: a mistake, refused.
        entry = TrustedKey(public, not_before, not_after,
                           Role(_args.integer("roles", roles, 1, _ALL_ROLES)))
        with self._lock:   # checked and stored in one turn: two adds cannot both pass
            existing = self._keys.get(public.kid)
            if existing is not None and existing.key != public:
                raise InvalidArgument(f"kid {public.kid.hex()} already names another key")
            self._keys[public.kid] = entry
            self._verifier = None
        return entry

    def remove(self, kid: bytes) -> None:
        kid = _kid(kid)
        with self._lock:
            if self._keys.pop(kid, None) is None:
                raise UnknownKeyId(f"no trusted key with kid {kid.hex()}")
            self._verifier = None

    def get(self, kid: bytes) -> TrustedKey:
        kid = _kid(kid)
        try:
            return self._keys[kid]
        except KeyError:
            raise UnknownKeyId(f"no trusted key with kid {kid.hex()}") from None

    def __contains__(self, kid: object) -> bool:
        return isinstance(kid, bytes) and kid in self._keys

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(list(self._keys.values()))

    def __len__(self) -> int:
        return len(self._keys)

    def verifier(self) -> Any:
        """The core verifier for the current keys (built on first use)."""
        verifier = self._verifier     # every verify asks: no lock once it exists
        if verifier is not None:
            return verifier
        with self._lock:
            if self._verifier is None:
                rows = [(kid_to_int(t.kid), t.key.to_bytes(), t.not_before, t.not_after,
                         int(t.roles)) for t in self._keys.values()]
                self._verifier = core.Verifier(rows, self._cache_size)
            return self._verifier

    def cache_stats(self) -> tuple[int, int]:
        """(hits, misses) of the credential cache since the store last changed."""
        v = self.verifier()
        return int(v.hits), int(v.misses)

    def verify_credential(self, credential: Credential, now: int,
                          role: Role = Role.CREDENTIALS) -> TrustedKey:
        """Check a credential's issuer: known kid, role, window, signature."""
        if not isinstance(credential, Credential):
            raise InvalidArgument("verify_credential checks a Credential")
        if not _args.is_time(now):
            raise InvalidArgument(f"now must be Unix seconds in [0, 2**40], not {now!r:.80}")
        role = Role(_args.integer("role", role, 0, _ALL_ROLES))
        trusted = self.get(credential.kid)
        if not trusted.roles & role:
            raise IssuerKeyRole()
        if not trusted.valid_at(now):
            raise IssuerKeyNotValid()
        if not core.verify_detached(trusted.key.to_bytes(),
                                    TAG_CRED + credential.raw[:CRED_BODY_LEN],
                                    credential.signature):
            raise BadIssuerSignature()
        return trusted


def _kid(kid: object) -> bytes:
    """A kid to look up: bytes-like (never bytes(n) of an int n)."""
    if not isinstance(kid, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"a kid is 4 bytes, not {type(kid).__name__}")
    return bytes(kid)
