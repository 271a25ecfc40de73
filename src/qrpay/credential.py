"""Credentials: what an issuer signs for one device of one account."""

from __future__ import annotations

import base64
import enum
import functools
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from qrpay.errors import InvalidArgument, MalformedCredential
from qrpay.format import CRED_LEN, CRED_STRUCT, SCENE_COUNT, VERSION


class Scene(enum.IntEnum):
    """Where a token is used. The value is the bit in a credential's scene set."""

    BUS = 0
    FERRY = 1
    METRO = 2
    CLINIC = 3
    CANTEEN = 4
    LIBRARY = 5
    RETAIL = 6


ALL_SCENES = frozenset(Scene)
_SCENE_BY_VALUE = {int(s): s for s in Scene}


def as_scene(value: object) -> Scene:
    """A Scene, or the int value of one (a numpy integer too); not a bool, a
    name or a float: InvalidArgument."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or int(value) not in _SCENE_BY_VALUE):
        raise InvalidArgument(f"unknown scene {value!r:.80}")
    return _SCENE_BY_VALUE[int(value)]


def scenes_to_mask(scenes: Iterable[Scene]) -> int:
    mask = 0
    for scene in scenes:
        mask |= 1 << Scene(scene)
    return mask


@functools.lru_cache(maxsize=1024)
def mask_to_scenes(mask: int) -> frozenset[Scene]:
    # Cached: every verified token decodes its credential's scene set.
    return frozenset(s for s in Scene if mask >> s & 1)


TEXT_PREFIX = "qrpay:credential:"
_KNOWN_MASK = scenes_to_mask(Scene)
assert len(Scene) == SCENE_COUNT


@dataclass(frozen=True, slots=True)
class Credential:
    """A parsed credential. Parsing does not check the issuer signature:
    `TrustStore.verify_credential` or token verification does."""

    kid: bytes
    account: int
    serial: int
    device_key: bytes
    not_before: int
    not_after: int
    limit: int
    scenes: frozenset[Scene]
    signature: bytes
    raw: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> Credential:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            # bytes(131) would be 131 zero bytes, bytes(2**40) a MemoryError.
            raise MalformedCredential(f"a credential is bytes, not {type(data).__name__}")
        raw = bytes(data)
        if len(raw) != CRED_LEN:
            raise MalformedCredential(f"a credential is {CRED_LEN} bytes, got {len(raw)}")
        (version, kid, account, serial, device_key, not_before, not_after, limit, mask,
         signature) = CRED_STRUCT.unpack(raw)
        if version != VERSION:
            raise MalformedCredential(f"unsupported credential version {version}")
        if mask & ~_KNOWN_MASK or not mask:
            raise MalformedCredential(f"credential scene set {mask:#x} is empty or unknown")
        return cls(kid, account, serial, device_key, not_before, not_after, limit,
                   mask_to_scenes(mask), signature, raw)

    def to_bytes(self) -> bytes:
        return self.raw

    def to_text(self) -> str:
        """'qrpay:credential:' + unpadded base64url, for files and provisioning."""
        return TEXT_PREFIX + base64.urlsafe_b64encode(self.raw).rstrip(b"=").decode("ascii")

    @classmethod
    def from_text(cls, text: str) -> Credential:
        if not isinstance(text, str) or not text.strip().startswith(TEXT_PREFIX):
            raise MalformedCredential(f"a credential text starts with {TEXT_PREFIX!r}")
        body = text.strip()[len(TEXT_PREFIX):]
        try:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
        except ValueError:             # binascii.Error is a ValueError
            raise MalformedCredential("credential text is not base64url") from None
        return cls.from_bytes(raw)

    def allows(self, scene: Scene) -> bool:
        return as_scene(scene) in self.scenes
