"""Signed msgpack documents between services (upload batches, deny lists).

A document on the wire is msgpack [body, signature]: `body` is the exact packed
bytes of a map, and the signature covers tag || body, so what is verified is
byte for byte what is read. Unpacking is strict: size limits, string keys,
no duplicate keys, no trailing bytes, and a typed error for anything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack  # type: ignore[import-untyped]

from qrpay.errors import BadSignature, MalformedMessage
from qrpay.format import SIGNATURE_LEN
from qrpay.keys import PublicKey, SigningKey

MAX_DOCUMENT = 64 * 1024 * 1024


def _no_duplicate_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedMessage("duplicate key in a msgpack map")
    return result


def unpack_strict(data: bytes, *, max_bin: int = MAX_DOCUMENT, max_array: int = 1_000_000,
                  max_map: int = 64, max_str: int = 256) -> Any:
    """Unpack one msgpack object with limits; MalformedMessage on anything odd."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage("a document is bytes")
    if len(data) > MAX_DOCUMENT:
        raise MalformedMessage("document too large")
    try:
        return msgpack.unpackb(
            bytes(data), raw=False, strict_map_key=True, use_list=True,
            object_pairs_hook=_no_duplicate_keys, max_bin_len=max_bin,
            max_array_len=max_array, max_map_len=max_map, max_str_len=max_str,
            max_ext_len=0,
        )
    except MalformedMessage:
        raise
    except msgpack.ExtraData:
        raise MalformedMessage("not a valid document: extra bytes after it") from None
    except msgpack.FormatError:
        raise MalformedMessage("not a valid document: not msgpack (a reserved byte)") from None
    except (msgpack.StackError, RecursionError):
        raise MalformedMessage("not a valid document: nested too deep") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # In words, never an exception's class name: msgpack's own message (a
        # size over a limit, a key that is not a string), or a truncation.
        said = str(exc)
        raise MalformedMessage("not a valid document: " + (
            "it ends too early" if not said or "incomplete" in said else said)) from None


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def sign_document(key: SigningKey, tag: bytes, body: Mapping[str, Any]) -> bytes:
    packed = pack(dict(body))
    return pack([packed, key._sign(tag, packed)])


def split_document(data: bytes) -> tuple[bytes, bytes]:
    """The (body bytes, signature) of a signed document, shape-checked only."""
    outer = unpack_strict(data, max_array=2)
    if (not isinstance(outer, list) or len(outer) != 2 or not isinstance(outer[0], bytes)
            or not isinstance(outer[1], bytes) or len(outer[1]) != SIGNATURE_LEN):
        raise MalformedMessage("a signed document is [body bytes, 64-byte signature]")
    return outer[0], outer[1]


def verify_document(public: PublicKey, tag: bytes, body: bytes, signature: bytes) -> None:
    try:
        public.verify(tag + body, signature)
    except BadSignature:
        raise BadSignature("document signature does not verify") from None


def body_map(body: bytes, fields: Mapping[str, type | tuple[type, ...]], **limits: int
             ) -> dict[str, Any]:
    """Unpack a body and check it is a map with exactly `fields`, each of its type."""
    doc = unpack_strict(body, **limits)
    if not isinstance(doc, dict):
        raise MalformedMessage("a document body is a map")
    if set(doc) != set(fields):
        missing = sorted(set(fields) - set(doc))
        extra = sorted(set(doc) - set(fields))
        raise MalformedMessage(f"document fields: missing {missing}, unexpected {extra}")
    for name, kind in fields.items():
        value = doc[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MalformedMessage(f"field {name!r} has the wrong type")
    return doc
