"""Write tests/data/token_vectors.json: qrpay's own known-answer vectors.

Run from anywhere:  python tests/data/make_token_vectors.py

Each vector fixes everything that goes into a token (issuer and device seeds,
credential fields, issued_at, counter, scene) and records the bytes that come
out. Ed25519 signatures are deterministic (RFC 8032), so the output never
changes unless the format does: rerunning the script must leave the file
byte-identical (`--check` says whether it would).

The bytes are built twice: once by hand from docs/FORMAT.md with PyNaCl and
hashlib only (offsets written out below, not imported from qrpay.format), and
once through qrpay's public API. The script refuses to write anything if the two
disagree, so a vector file can only come from a library that matches the doc.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from nacl.bindings import crypto_sign, crypto_sign_seed_keypair

OUT = Path(__file__).with_name("token_vectors.json")

# --- The format as docs/FORMAT.md states it -------------------------------------------

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
TAG_CRED = b"qrpay/cred/v1".ljust(16, b"\x00")
TAG_TOKEN = b"qrpay/token/v1".ljust(16, b"\x00")
SCENES = ["BUS", "FERRY", "METRO", "CLINIC", "CANTEEN", "LIBRARY", "RETAIL"]  # bit = index
B45 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"


def kid(public_key: bytes) -> bytes:
    return hashlib.blake2b(public_key, digest_size=4, person=b"qrpay-kid-v1").digest()


def keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(public key, 64-byte libsodium secret key) from a 32-byte seed."""
    public, secret = crypto_sign_seed_keypair(seed)
    return public, secret


def sign(secret: bytes, message: bytes) -> bytes:
    return crypto_sign(message, secret)[:64]  # combined mode: signature || message


def credential_body(issuer_pk: bytes, v: dict[str, Any], device_pk: bytes) -> bytes:
    body = bytearray(67)
    body[0] = 1                                                    # version
    body[1:5] = kid(issuer_pk)                                     # kid
    body[5:13] = int(v["account"]).to_bytes(8, "little")           # account
    body[13:21] = int(v["serial"]).to_bytes(8, "little")           # serial
    body[21:53] = device_pk                                        # device public key
    body[53:57] = v["not_before"].to_bytes(4, "little")            # not_before
    body[57:61] = v["not_after"].to_bytes(4, "little")             # not_after
    body[61:65] = v["limit"].to_bytes(4, "little")                 # limit
    body[65:67] = scene_mask(v["scenes"]).to_bytes(2, "little")    # scenes
    return bytes(body)


def scene_mask(names: list[str]) -> int:
    return sum(1 << SCENES.index(name) for name in set(names))


def token_body(credential: bytes, v: dict[str, Any]) -> bytes:
    issued_at, counter = int(v["issued_at"]), int(v["counter"])
    return (credential + issued_at.to_bytes(4, "little") + counter.to_bytes(4, "little")
            + bytes([SCENES.index(v["scene"])]))


def base45(data: bytes) -> str:
    out = []
    for i in range(0, len(data) - 1, 2):
        n = data[i] * 256 + data[i + 1]
        out += [B45[n % 45], B45[n // 45 % 45], B45[n // 2025]]
    if len(data) % 2:
        out += [B45[data[-1] % 45], B45[data[-1] // 45]]
    return "".join(out)


# --- The cases ------------------------------------------------------------------------

NOW = 1_800_000_000  # 2027-01-15T08:00:00Z, the test suite's fixed clock

CASES: list[dict[str, Any]] = [
    {
        "name": "bus",
        "comment": "A plain bus token, issued at the moment it is verified.",
        "issuer_seed": bytes(range(32)).hex(),
        "device_seed": bytes(range(32, 64)).hex(),
        "account": "1001", "serial": "77", "limit": 5000,
        "scenes": ["BUS", "METRO", "CLINIC"],
        "not_before": NOW - 86400, "not_after": NOW + 30 * 86400,
        "issued_at": NOW, "counter": 1, "scene": "BUS",
        "verify_at": NOW,
    },
    {
        "name": "maximum-fields",
        "comment": "Every integer field at its largest value and every scene allowed; "
                   "verified at the last second the credential is valid.",
        "issuer_seed": "ff" * 32,
        "device_seed": "fe" * 32,
        "account": str(U64_MAX), "serial": str(U64_MAX), "limit": U32_MAX,
        "scenes": list(SCENES),
        "not_before": 0, "not_after": U32_MAX,
        "issued_at": U32_MAX, "counter": U32_MAX, "scene": "RETAIL",
        "verify_at": U32_MAX,
    },
    {
        "name": "minimum-fields",
        "comment": "Zero account, serial and limit, a one-second credential window at "
                   "the epoch, counter 1.",
        "issuer_seed": "00" * 32,
        "device_seed": "01" * 32,
        "account": "0", "serial": "0", "limit": 0,
        "scenes": ["BUS"],
        "not_before": 0, "not_after": 1,
        "issued_at": 0, "counter": 1, "scene": "BUS",
        "verify_at": 1,
    },
    {
        "name": "large-counter",
        "comment": "A long-lived phone: the counter is past 2^31 (it is unsigned), "
                   "token made 50 s before it is verified, ferry scene.",
        "issuer_seed": hashlib.sha256(b"qrpay vector issuer 3").hexdigest(),
        "device_seed": hashlib.sha256(b"qrpay vector device 3").hexdigest(),
        "account": "6221558812340009", "serial": "4611686018427387904", "limit": 20000,
        "scenes": ["FERRY", "CANTEEN", "LIBRARY"],
        "not_before": NOW - 365 * 86400, "not_after": NOW + 365 * 86400,
        "issued_at": NOW - 50, "counter": 3_000_000_001, "scene": "FERRY",
        "verify_at": NOW,
    },
    {
        "name": "byte-order",
        "comment": "Distinct bytes in every integer, so a byte-order mistake shows.",
        "issuer_seed": hashlib.sha256(b"qrpay vector issuer 4").hexdigest(),
        "device_seed": hashlib.sha256(b"qrpay vector device 4").hexdigest(),
        "account": str(0x0102030405060708), "serial": str(0x1112131415161718),
        "limit": 0x21222324,
        "scenes": ["METRO", "RETAIL"],
        "not_before": 0x61626364, "not_after": 0x71727374,
        "issued_at": 0x6A6B6C6D, "counter": 0x41424344, "scene": "METRO",
        "verify_at": 0x6A6B6C6D + 5,
    },
]


def by_hand(v: dict[str, Any]) -> dict[str, Any]:
    issuer_pk, issuer_sk = keypair(bytes.fromhex(v["issuer_seed"]))
    device_pk, device_sk = keypair(bytes.fromhex(v["device_seed"]))
    body = credential_body(issuer_pk, v, device_pk)
    issuer_message = TAG_CRED + body
    credential = body + sign(issuer_sk, issuer_message)
    tbody = token_body(credential, v)
    device_message = TAG_TOKEN + tbody
    token = tbody + sign(device_sk, device_message)
    assert len(credential) == 131 and len(token) == 204
    return {
        "issuer_public_key": issuer_pk.hex(),
        "kid": kid(issuer_pk).hex(),
        "device_public_key": device_pk.hex(),
        "scene_mask": scene_mask(v["scenes"]),
        "issuer_signed_message": issuer_message.hex(),
        "credential": credential.hex(),
        "device_signed_message": device_message.hex(),
        "token": token.hex(),
        "text": "QP:" + base45(token),
    }


def through_qrpay(v: dict[str, Any]) -> dict[str, str]:
    import qrpay
    from qrpay import DeviceKey, IssuerKey, Scene, TokenGenerator

    issuer = IssuerKey(bytes.fromhex(v["issuer_seed"]))
    device = DeviceKey(bytes.fromhex(v["device_seed"]))
    credential = issuer.issue(
        account=int(v["account"]), device_public=device.public, limit=v["limit"],
        scenes=[Scene[s] for s in v["scenes"]], not_before=v["not_before"],
        not_after=v["not_after"], serial=int(v["serial"]))
    generator = TokenGenerator(credential, device, counter=v["counter"] - 1)
    token = generator.make(Scene[v["scene"]], now=v["issued_at"])
    return {
        "issuer_public_key": issuer.public.to_bytes().hex(),
        "kid": issuer.kid.hex(),
        "device_public_key": device.public.to_bytes().hex(),
        "credential": credential.to_bytes().hex(),
        "token": token.hex(),
        "text": qrpay.encode_text(token),
    }


def build() -> dict[str, Any]:
    vectors = []
    for case in CASES:
        expected = by_hand(case)
        library = through_qrpay(case)
        for field, value in library.items():
            if expected[field] != value:
                sys.exit(f"{case['name']}: qrpay's {field} differs from the "
                         f"FORMAT.md construction:\n  doc:   {expected[field]}\n  qrpay: {value}")
        vectors.append({**case, **expected})
    return {
        "description": "qrpay token format v1 known-answer vectors (docs/FORMAT.md). "
                       "Seeds are Ed25519 seeds (RFC 8032 secret keys); account and "
                       "serial are decimal strings because they are u64; every other "
                       "integer is a JSON number. verify_at is a time (Unix seconds) "
                       "at which the token verifies with max_age=60, skew=30 against a "
                       "trust store holding the issuer key with its default window "
                       "[0, 2^32-1].",
        "generator": "tests/data/make_token_vectors.py",
        "format_version": 1,
        "tag_cred": TAG_CRED.hex(),
        "tag_token": TAG_TOKEN.hex(),
        "scenes": {name: bit for bit, name in enumerate(SCENES)},
        "max_age": 60,
        "skew": 30,
        "vectors": vectors,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the file on disk differs from what would be written")
    args = parser.parse_args()
    text = render()
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT}: {'up to date' if same else 'DIFFERS'}")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(CASES)} vectors to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
