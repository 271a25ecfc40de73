"""Deny lists: credential serials a gateway must refuse, signed by an issuer
key with the DENY_LIST role and versioned so that only a newer list replaces
an older one."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from qrpay import _args
from qrpay._impl import core
from qrpay.errors import (
    BadSignature, InvalidArgument, InvalidKey, IssuerKeyNotValid, IssuerKeyRole,
    JournalUnavailable, MalformedMessage, UnknownKeyId,
)
from qrpay.format import KID_LEN, TAG_DENY, U32_MAX, U64_MAX
from qrpay.keys import IssuerKey
from qrpay.trust import Role, TrustStore
from qrpay.wire import body_map, sign_document, split_document, verify_document

FORMAT_VERSION = 1
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int, "kid": bytes, "version": int, "issued_at": int, "serials": bytes,
}


@dataclass(frozen=True)
class DenyList:
    """A verified deny list. `serials` is sorted, unique, uint64."""

    version: int
    issued_at: int
    kid: bytes
    serials: npt.NDArray[np.uint64] = field(repr=False)
    raw: bytes = field(repr=False)

    def __len__(self) -> int:
        return len(self.serials)

    def contains(self, serials: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """For each serial (unsigned 64-bit integers, one or a 1-D array),
        whether it is denied (lookups in the core)."""
        return core.sorted_contains(self.serials, _serial_array(serials))

    def __contains__(self, serial: object) -> bool:
        if not isinstance(serial, int) or not 0 <= serial <= U64_MAX:
            return False
        return bool(self.contains(np.array([serial], dtype=np.uint64))[0])

    @classmethod
    def empty(cls) -> DenyList:
        """No list yet: version 0, which any signed list replaces."""
        return cls(0, 0, b"", np.zeros(0, dtype=np.uint64), b"")

    @classmethod
    def load(cls, data: bytes, trust: TrustStore, now: int | None = None) -> DenyList:
        """Parse and verify a signed deny list; raises BadSignature,
        MalformedMessage, UnknownKeyId, IssuerKeyRole or IssuerKeyNotValid.
        The signing key must be valid at `now` (default: the list's issued_at)."""
        if not isinstance(trust, TrustStore):
            raise InvalidArgument("a deny list is verified against a TrustStore")
        if now is not None and not _args.is_time(now):
            raise InvalidArgument(f"now must be Unix seconds in [0, 2**40], not {now!r:.80}")
        body, signature = split_document(data)
        doc = body_map(body, _FIELDS)  # a document is at most 64 MiB: ~8.3M serials
        if doc["v"] != FORMAT_VERSION:
            raise MalformedMessage(f"unsupported deny list format {doc['v']}")
        if len(doc["kid"]) != KID_LEN:
            raise MalformedMessage("deny list kid is 4 bytes")
        trusted = trust.get(doc["kid"])
        if not trusted.roles & Role.DENY_LIST:
            raise IssuerKeyRole("this issuer key may not sign deny lists")
        if not trusted.valid_at(doc["issued_at"] if now is None else now):
            raise IssuerKeyNotValid()
        verify_document(trusted.key, TAG_DENY, body, signature)
        packed = doc["serials"]
        if len(packed) % 8:
            raise MalformedMessage("deny list serials are 8 bytes each")
        serials = np.frombuffer(packed, dtype="<u8").astype(np.uint64)
        if len(serials) > 1 and not np.all(serials[1:] > serials[:-1]):
            raise MalformedMessage("deny list serials must be sorted and unique")
        if not 0 < doc["version"] <= U64_MAX or not 0 <= doc["issued_at"] <= U32_MAX:
            raise MalformedMessage("deny list version or time out of range")
        return cls(doc["version"], doc["issued_at"], doc["kid"], serials, bytes(data))


    @classmethod
    def reload(cls, data: bytes, trust: TrustStore) -> DenyList:
        """A list this gateway verified when it applied it, read back from its
        journal. If today's trust store no longer vouches for the key (rotated
        out, role removed), the list still denies what it denied: denying more
        is the safe side. A tampered or unreadable list is JournalUnavailable."""
        try:
            return cls.load(data, trust)
        except (UnknownKeyId, IssuerKeyRole, IssuerKeyNotValid):
            body, _signature = split_document(data)
            doc = body_map(body, _FIELDS)
            serials = np.frombuffer(doc["serials"], dtype="<u8").astype(np.uint64)
            return cls(doc["version"], doc["issued_at"], doc["kid"], np.unique(serials),
                       bytes(data))
        except (BadSignature, MalformedMessage) as exc:
            raise JournalUnavailable(f"the stored deny list does not verify: {exc}") from exc


def deny_list_etag(raw: bytes, version: int) -> str:
    """The HTTP entity tag of a signed deny list: its version and a hash of
    its bytes, so that a gateway holding it is answered 304 (docs/SERVICE.md)."""
    return f'"v{version}-{hashlib.blake2b(raw, digest_size=8).hexdigest()}"'


def sign_deny_list(key: IssuerKey, version: int, serials: Iterable[int], issued_at: int) -> bytes:
    """A signed deny list document (the key needs the DENY_LIST role where it
    is trusted)."""
    if not isinstance(key, IssuerKey):
        raise InvalidKey("a deny list is signed with an IssuerKey")
    version = _args.integer("version", version, 1, U64_MAX)
    issued_at = _args.integer("issued_at", issued_at, 0, U32_MAX)
    packed = np.unique(_serial_array(_args.items("serials", serials))).astype("<u8").tobytes()
    return sign_document(key, TAG_DENY, {"v": FORMAT_VERSION, "kid": key.kid,
                                         "version": version, "issued_at": issued_at,
                                         "serials": packed})


def _serial_array(serials: object) -> npt.NDArray[np.uint64]:
    """Serials (an integer, an iterable of them or a 1-D integer array) as a
    contiguous uint64 array, checked before the cast: -1, 2**64, 1.5 or None
    are InvalidArgument, never a wrapped, clipped or truncated serial."""
    if not isinstance(serials, np.ndarray):
        values: list[Any] = ([serials] if _args.is_int(serials)
                             else _args.items("serials", serials))
        if not all(map(_args.is_int, values)) or (
                values and not (0 <= min(values) and max(values) <= U64_MAX)):
            raise InvalidArgument("serials are unsigned 64-bit integers")
        return np.array([int(v) for v in values], dtype=np.uint64)
    if serials.ndim > 1 or (serials.size and serials.dtype.kind not in "iu"):
        raise InvalidArgument("serials are unsigned 64-bit integers, one or a 1-D array")
    if serials.size and serials.dtype.kind == "i" and serials.min() < 0:
        raise InvalidArgument("serials are unsigned 64-bit integers")
    return np.ascontiguousarray(serials.reshape(-1), dtype=np.uint64)
