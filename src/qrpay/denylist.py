"""Deny lists: credential serials a gateway must refuse, signed by an issuer
key with the DENY_LIST role and versioned so that only a newer list replaces
an older one. A delta (DenyDelta) carries the serials added and removed from
one version to a later one, signed with a digest of the list it makes, so a
gateway that holds the older version gets the newer one without downloading
it whole (docs/SERVICE.md)."""

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
    JournalUnavailable, MalformedMessage, StaleUpdate, UnknownKeyId,
)
from qrpay.format import KID_LEN, TAG_DENY, TAG_DENY_DELTA, U32_MAX, U64_MAX
from qrpay.keys import IssuerKey
from qrpay.trust import Role, TrustStore
from qrpay.wire import (
    body_map, pack, sign_document, split_document, verify_document,
)

FORMAT_VERSION = 1
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int, "kid": bytes, "version": int, "issued_at": int, "serials": bytes,
}
_DELTA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int, "kid": bytes, "from": int, "version": int, "issued_at": int, "added": bytes,
    "removed": bytes, "digest": bytes,
}
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {"delta": bytes, "serials": bytes}


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
        is the safe side. A tampered or unreadable list is JournalUnavailable.
        `data` is a signed list, or the state a delta made (DenyDelta.apply)."""
        if _is_state(data):
            return _reload_state(data, trust)
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


@dataclass(frozen=True)
class DenyDelta:
    """A verified delta: from version `base` to `version`, the serials
    `added` and `removed` (sorted, unique, uint64), and `digest`, the
    BLAKE2b-256 of the list they make (serials_digest)."""

    base: int
    version: int
    issued_at: int
    kid: bytes
    added: npt.NDArray[np.uint64] = field(repr=False)
    removed: npt.NDArray[np.uint64] = field(repr=False)
    digest: bytes = field(repr=False)
    raw: bytes = field(repr=False)

    @classmethod
    def load(cls, data: bytes, trust: TrustStore, *, strict: bool = True) -> DenyDelta:
        """Parse and verify a signed delta, as DenyList.load does a list.
        With strict=False a key the trust store no longer vouches for is
        accepted (a delta this gateway verified when it applied it)."""
        if not isinstance(trust, TrustStore):
            raise InvalidArgument("a deny-list delta is verified against a TrustStore")
        body, signature = split_document(data)
        doc = body_map(body, _DELTA_FIELDS)
        if doc["v"] != FORMAT_VERSION or len(doc["kid"]) != KID_LEN or len(doc["digest"]) != 32:
            raise MalformedMessage("not a deny-list delta of format 1")
        try:
            trusted = trust.get(doc["kid"])
            if not trusted.roles & Role.DENY_LIST:
                raise IssuerKeyRole("this issuer key may not sign deny lists")
            if not trusted.valid_at(doc["issued_at"]):
                raise IssuerKeyNotValid()
            verify_document(trusted.key, TAG_DENY_DELTA, body, signature)
        except (UnknownKeyId, IssuerKeyRole, IssuerKeyNotValid):
            if strict:
                raise
        if not 0 <= doc["from"] < doc["version"] <= U64_MAX or not 0 <= doc["issued_at"] <= U32_MAX:
            raise MalformedMessage("deny-list delta versions or time out of range")
        added, removed = _sorted_serials(doc["added"]), _sorted_serials(doc["removed"])
        return cls(doc["from"], doc["version"], doc["issued_at"], doc["kid"], added, removed,
                   doc["digest"], bytes(data))

    def apply(self, held: DenyList) -> DenyList:
        """The list this delta makes from `held`, which must be its base
        version (StaleUpdate otherwise: fetch the whole list). The result is
        checked against the signed digest, and its `raw` is the state a
        gateway stores (DenyList.reload reads it back)."""
        if held.version != self.base:
            raise StaleUpdate(f"this delta goes from deny list version {self.base}, and "
                              f"version {held.version} is held")
        if self.issued_at < held.issued_at:
            raise StaleUpdate(f"delta to version {self.version} was issued before version "
                              f"{held.version}")
        serials = np.union1d(np.setdiff1d(held.serials, self.removed, assume_unique=True),
                             self.added).astype(np.uint64)
        if serials_digest(serials) != self.digest:
            raise MalformedMessage(f"the delta from version {self.base} does not make the list "
                                   f"version {self.version} was signed for")
        state = pack({"delta": self.raw, "serials": serials.astype("<u8").tobytes()})
        return DenyList(self.version, self.issued_at, self.kid, serials, state)


def serials_digest(serials: npt.NDArray[np.uint64]) -> bytes:
    """BLAKE2b-256 of a list's serials, sorted, as little-endian u64."""
    return hashlib.blake2b(np.ascontiguousarray(serials, dtype="<u8").tobytes(),
                           digest_size=32).digest()


def deny_list_etag(deny: DenyList) -> str:
    """The HTTP entity tag of a deny list: its version and the digest of its
    serials. A gateway computes it from the list it holds, whether it came
    whole or through deltas, and is answered 304 when it is the latest."""
    return f'"v{deny.version}-{serials_digest(deny.serials)[:8].hex()}"'


def sign_deny_delta(key: IssuerKey, base: DenyList, new: DenyList) -> bytes:
    """The signed delta from list `base` to the later list `new`."""
    if not isinstance(key, IssuerKey):
        raise InvalidKey("a deny-list delta is signed with an IssuerKey")
    if not base.version < new.version:
        raise InvalidArgument("a delta goes from an older version to a newer one")
    added = np.setdiff1d(new.serials, base.serials, assume_unique=True).astype("<u8")
    removed = np.setdiff1d(base.serials, new.serials, assume_unique=True).astype("<u8")
    return sign_document(key, TAG_DENY_DELTA, {
        "v": FORMAT_VERSION, "kid": key.kid, "from": base.version, "version": new.version,
        "issued_at": new.issued_at, "added": added.tobytes(), "removed": removed.tobytes(),
        "digest": serials_digest(new.serials)})


def _sorted_serials(packed: bytes) -> npt.NDArray[np.uint64]:
    if len(packed) % 8:
        raise MalformedMessage("deny list serials are 8 bytes each")
    serials = np.frombuffer(packed, dtype="<u8").astype(np.uint64)
    if len(serials) > 1 and not np.all(serials[1:] > serials[:-1]):
        raise MalformedMessage("deny list serials must be sorted and unique")
    return serials


def _is_state(data: bytes) -> bool:
    """A delta-made state is a msgpack map; a signed document is an array."""
    return isinstance(data, (bytes, bytearray)) and len(data) > 0 and (
        0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF))


def _reload_state(data: bytes, trust: TrustStore) -> DenyList:
    """A list a delta made, read back from a gateway's journal: the delta
    still verifies (a rotated-out key is accepted, as in reload) and the
    serials stored are the ones its digest names."""
    try:
        doc = body_map(bytes(data), _STATE_FIELDS)
        delta = DenyDelta.load(doc["delta"], trust, strict=False)
        serials = _sorted_serials(doc["serials"])
        if serials_digest(serials) != delta.digest:
            raise MalformedMessage("the stored serials are not the list the delta names")
    except (BadSignature, MalformedMessage) as exc:
        raise JournalUnavailable(f"the stored deny list does not verify: {exc}") from exc
    return DenyList(delta.version, delta.issued_at, delta.kid, serials, bytes(data))


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
