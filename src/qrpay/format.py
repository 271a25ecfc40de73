"""Byte layout of credentials and tokens (format version 1), in one place.

docs/FORMAT.md describes the same layout for other implementations; the compiled
core declares it again as C constants in _core.pxd and a test checks that both agree.
All integers are little-endian and unsigned; times are Unix seconds.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np

VERSION: Final = 1

KID_LEN: Final = 4
PUBLIC_KEY_LEN: Final = 32
SECRET_KEY_LEN: Final = 64  # libsodium layout: seed || public key
SEED_LEN: Final = 32
SIGNATURE_LEN: Final = 64
TAG_LEN: Final = 16

# Credential: issued by the issuer, carried by the phone, embedded in every token.
CRED_VERSION: Final = 0  # u8 format version
CRED_KID: Final = 1  # 4 bytes, issuer key id
CRED_ACCOUNT: Final = 5  # u64
CRED_SERIAL: Final = 13  # u64
CRED_DEVICE_KEY: Final = 21  # 32 bytes, device Ed25519 public key
CRED_NOT_BEFORE: Final = 53  # u32
CRED_NOT_AFTER: Final = 57  # u32
CRED_LIMIT: Final = 61  # u32, offline credit limit in minor units
CRED_SCENES: Final = 65  # u16 bit set of Scene values
CRED_BODY_LEN: Final = 67  # what the issuer signs, after TAG_CRED
CRED_ISSUER_SIG: Final = 67  # 64 bytes
CRED_LEN: Final = 131

# Token: credential || issued_at || counter || scene || device signature.
TOKEN_ISSUED_AT: Final = 131  # u32
TOKEN_COUNTER: Final = 135  # u32
TOKEN_SCENE: Final = 139  # u8
TOKEN_BODY_LEN: Final = 140  # what the device signs, after TAG_TOKEN
TOKEN_DEVICE_SIG: Final = 140  # 64 bytes
TOKEN_LEN: Final = 204

SCENE_COUNT: Final = 7  # Scene values are 0..6 (credential.Scene)

U32_MAX: Final = 0xFFFF_FFFF
# Bounds on verification times, shared by the core, its twin and the API:
# `now` up to 2**40 and max_age / skew up to 2**32 keep every sum in int64.
MAX_TIME: Final = 2**40
MAX_WINDOW: Final = 2**32
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF


def _tag(name: bytes) -> bytes:
    assert len(name) <= TAG_LEN
    return name.ljust(TAG_LEN, b"\x00")


# Domain separation: every signature covers tag || message, so a signature made
# in one role can never be replayed as another's.
TAG_CRED: Final = _tag(b"qrpay/cred/v1")
TAG_TOKEN: Final = _tag(b"qrpay/token/v1")
TAG_BATCH: Final = _tag(b"qrpay/batch/v1")
TAG_DENY: Final = _tag(b"qrpay/deny/v1")
TAG_DENY_DELTA: Final = _tag(b"qrpay/denyd/v1")
TAG_TRUST: Final = _tag(b"qrpay/trust/v1")
TAG_CARD: Final = _tag(b"qrpay/card/v1")
TAG_PERIOD: Final = _tag(b"qrpay/period/v1")
TAG_STATEMENT: Final = _tag(b"qrpay/stmt/v1")

CRED_STRUCT: Final = struct.Struct("<B4sQQ32sIIIH64s")
TOKEN_FIELDS_STRUCT: Final = struct.Struct("<IIB")
assert CRED_STRUCT.size == CRED_LEN
assert CRED_STRUCT.size + TOKEN_FIELDS_STRUCT.size + SIGNATURE_LEN == TOKEN_LEN

# The same token layout as a numpy record, for decoding whole batches at once.
TOKEN_DTYPE: Final = np.dtype(
    {
        "names": [
            "version", "kid", "account", "serial", "not_before", "not_after",
            "limit", "scenes", "issued_at", "counter", "scene",
        ],
        "formats": ["u1", "<u4", "<u8", "<u8", "<u4", "<u4", "<u4", "<u2", "<u4", "<u4", "u1"],
        "offsets": [
            CRED_VERSION, CRED_KID, CRED_ACCOUNT, CRED_SERIAL, CRED_NOT_BEFORE,
            CRED_NOT_AFTER, CRED_LIMIT, CRED_SCENES, TOKEN_ISSUED_AT, TOKEN_COUNTER,
            TOKEN_SCENE,
        ],
        "itemsize": TOKEN_LEN,
    }
)


def kid_to_int(kid: bytes) -> int:
    """The kid as the core compares it: its 4 bytes read little-endian."""
    return int.from_bytes(kid, "little")
