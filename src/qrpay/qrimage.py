"""QR images of tokens: render with segno, decode with zxing-cpp.

Both live behind the `qr` extra (`pip install 'qrpay[qr]'`) so the core
install stays light; without them these functions raise QrSupportMissing.
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from types import ModuleType
from typing import Any

from qrpay.errors import InvalidArgument, MalformedText, QrPayError, Reason
from qrpay.qr import PREFIX, decode_text, encode_text



def _optional(name: str) -> ModuleType | None:
    # The `qr` extra: absent modules become None and the functions say so.
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


segno = _optional("segno")
zxingcpp = _optional("zxingcpp")
_pil = _optional("PIL.Image")


class QrSupportMissing(QrPayError, RuntimeError):
    """segno / zxing-cpp / Pillow are not installed: pip install 'qrpay[qr]'."""

    reason = Reason.INVALID_ARGUMENT


def _qr(token: bytes, text: bool) -> Any:
    if segno is None:
        raise QrSupportMissing("rendering QR codes needs segno: pip install 'qrpay[qr]'")
    if not isinstance(token, (bytes, bytearray)):
        raise InvalidArgument("a token is bytes")
    # The text form is alphanumeric; raw bytes go in byte mode. Both fit version
    # 10 at error correction M; boost_error=False keeps the level we asked for.
    content = encode_text(bytes(token)) if text else bytes(token)
    return segno.make(content, error="m", boost_error=False,
                      mode="alphanumeric" if text else "byte")


def qr_version(token: bytes, text: bool = True) -> int:
    return int(_qr(token, text).version)


def render(token: bytes, kind: str = "png", *, text: bool = True, scale: int = 4) -> bytes | str:
    """The token as a QR image: 'png' or 'svg' bytes, or 'terminal' text."""
    qr = _qr(token, text)
    if kind == "terminal":
        out = io.StringIO()
        qr.terminal(out=out, compact=True)
        return out.getvalue()
    if kind not in ("png", "svg"):
        raise InvalidArgument("kind is png, svg or terminal")
    buf = io.BytesIO()
    qr.save(buf, kind=kind, scale=scale, border=4)
    return buf.getvalue()


def decode_image(image: bytes | str | Path) -> list[bytes]:
    """Every qrpay token found in an image (PNG/JPEG/... bytes or a path), as
    token bytes; text-form codes are decoded from Base45."""
    if zxingcpp is None or _pil is None:
        raise QrSupportMissing("decoding QR images needs zxing-cpp and Pillow: "
                               "pip install 'qrpay[qr]'")
    try:
        source = io.BytesIO(image) if isinstance(image, bytes) else Path(image).open("rb")
        with source, _pil.open(source) as img:
            # QR codes only: zxing also reads 1-D symbologies, and now and
            # then finds an "ITF" barcode inside a QR code's modules.
            found = zxingcpp.read_barcodes(img.convert("L"),
                                           formats=zxingcpp.BarcodeFormat.QRCode)
    except FileNotFoundError:
        raise InvalidArgument(f"cannot read the image: no such file: {image!s:.200}") from None
    except _pil.UnidentifiedImageError:   # its message shows a Python file object
        raise InvalidArgument("cannot read the image: not an image file Pillow reads (PNG, "
                              "JPEG, ...)") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read the image: {exc.strerror or exc}") from None
    tokens = []
    for code in found:
        raw = bytes(code.bytes)
        if raw.startswith(PREFIX.encode("ascii")):
            try:
                tokens.append(decode_text(raw.decode("ascii")))
                continue
            except (UnicodeDecodeError, MalformedText):
                pass
        tokens.append(raw)
    return tokens
