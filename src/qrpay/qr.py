"""The text form of a token for the QR code: a short prefix and Base45.

Base45 (RFC 9285) uses only the QR alphanumeric set, so a 204-byte token is
309 characters with the prefix and fits a version-10 QR code at error
correction M (311 alphanumeric characters) in alphanumeric mode.
"""

from __future__ import annotations

from qrpay.errors import InvalidArgument, MalformedText
from qrpay.format import TOKEN_LEN

PREFIX = "QP:"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
MAX_TEXT_LEN = len(PREFIX) + TOKEN_LEN // 2 * 3 + TOKEN_LEN % 2 * 2
"""309: the length of every token's text form. Longer text is refused before
it is decoded (a QR code at version 10, ECC M holds 311 characters)."""


def b45encode(data: bytes) -> str:
    """Base45-encode bytes (RFC 9285)."""
    out: list[str] = []
    for i in range(0, len(data) - 1, 2):
        n = data[i] * 256 + data[i + 1]
        n, c = divmod(n, 45)
        e, d = divmod(n, 45)
        out += (ALPHABET[c], ALPHABET[d], ALPHABET[e])
    if len(data) % 2:
        d, c = divmod(data[-1], 45)
        out += (ALPHABET[c], ALPHABET[d])
    return "".join(out)


def b45decode(text: str) -> bytes:
    """Decode Base45; raise MalformedText for any character, length or value
    that no encoder produces."""
    if len(text) % 3 == 1:
        raise MalformedText("Base45 text length leaves a single character")
    try:
        values = [_VALUE[c] for c in text]
    except KeyError as exc:
        raise MalformedText(f"{exc.args[0]!r} is not a Base45 character") from None
    out = bytearray()
    full = len(values) - len(values) % 3
    for i in range(0, full, 3):
        n = values[i] + values[i + 1] * 45 + values[i + 2] * 2025
        if n > 0xFFFF:
            raise MalformedText("Base45 group out of range")
        out += n.to_bytes(2, "big")
    if full < len(values):
        n = values[full] + values[full + 1] * 45
        if n > 0xFF:
            raise MalformedText("Base45 group out of range")
        out.append(n)
    return bytes(out)


def encode_text(token: bytes) -> str:
    """The QR text form of a token: 'QP:' + Base45(token). `token` is
    bytes-like (its bytes are encoded, whatever its item type)."""
    if not isinstance(token, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"a token is bytes, not {type(token).__name__}")
    return PREFIX + b45encode(bytes(token))


def decode_text(text: str) -> bytes:
    """Token bytes from the text form; MalformedText if it is not one. Text
    longer than a token's text form (MAX_TEXT_LEN) is refused unread."""
    if not isinstance(text, str):
        raise MalformedText("the text form is a str")
    if len(text) > MAX_TEXT_LEN:
        raise MalformedText(f"a token's text form is {MAX_TEXT_LEN} characters, not {len(text)}")
    if not text.startswith(PREFIX):
        raise MalformedText(f"text form must start with {PREFIX!r}")
    return b45decode(text[len(PREFIX):])
