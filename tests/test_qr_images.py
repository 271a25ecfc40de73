"""QR images: tokens rendered with segno, decoded with zxing-cpp, byte-exact,
and verified; payloads that cover every byte value 0-255 survive too."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from qrpay import (Credential, DeviceKey, IssuerKey, Scene, TokenGenerator, TrustStore, qrimage,
                   verify)
from qrpay.format import TOKEN_LEN


@pytest.mark.parametrize("text", [True, False], ids=["text-form", "raw-bytes"])
def test_tokens_survive_png_round_trip(text: bool, generator: TokenGenerator,
                                       trust: TrustStore, now: int) -> None:
    for _ in range(8):
        token = generator.make(Scene.BUS, now)
        png = qrimage.render(token, "png", text=text)
        assert isinstance(png, bytes) and png.startswith(b"\x89PNG")
        assert qrimage.decode_image(png) == [token]
        assert verify(qrimage.decode_image(png)[0], trust, now).counter == generator.counter
        assert qrimage.qr_version(token, text=text) == 10  # version 10 at ECC M, both forms


def test_every_byte_value_survives() -> None:
    # Two 204-byte payloads and a tail hold each of 0..255 at least once, in a
    # shuffled order so that every value also appears next to unusual neighbours.
    values = np.random.default_rng(1).permutation(np.tile(np.arange(256, dtype=np.uint8), 3))
    payloads = [values[i:i + TOKEN_LEN].tobytes() for i in range(0, 3 * 256 - TOKEN_LEN, 180)]
    assert set(b"".join(payloads)) == set(range(256))
    for payload in payloads:
        for text in (True, False):
            assert qrimage.decode_image(qrimage.render(payload, "png", text=text)) == [payload]


def test_svg_and_terminal_rendering(generator: TokenGenerator, now: int) -> None:
    token = generator.make(Scene.BUS, now)
    svg = qrimage.render(token, "svg")
    assert isinstance(svg, bytes) and b"<svg" in svg
    drawing = qrimage.render(token, "terminal")
    assert isinstance(drawing, str) and len(drawing.splitlines()) > 20


def test_bad_render_and_decode_inputs(generator: TokenGenerator, now: int) -> None:
    from qrpay import errors
    with pytest.raises(errors.InvalidArgument):
        qrimage.render(generator.make(Scene.BUS, now), "gif")
    with pytest.raises(errors.InvalidArgument):
        qrimage.render("not bytes", "png")  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        qrimage.decode_image(b"not an image")
    assert qrimage.decode_image(qrimage.render(b"hello", "png", text=False)) == [b"hello"]


def test_credentials_of_other_devices_do_not_verify_after_decode(
        credential: Credential, trust: TrustStore, now: int) -> None:
    from qrpay._impl import core
    from qrpay import errors
    forged = core.make_token(credential.raw, DeviceKey.generate()._secret, now, 1, Scene.BUS)
    [decoded] = qrimage.decode_image(qrimage.render(forged, "png"))
    with pytest.raises(errors.BadDeviceSignature):
        verify(decoded, trust, now)


def test_a_qr_code_that_also_looks_like_a_1d_barcode_decodes_once() -> None:
    # This token's QR code holds modules that zxing also reads as an ITF
    # barcode (found by trying keys): decode_image reads QR codes only.
    from qrpay._impl import core
    issuer = IssuerKey(bytes(range(32)))
    cred = issuer.issue(account=1001, device_public=DeviceKey(b"\x05" * 32).public,
                        limit=1000, scenes=[Scene.BUS], not_before=1_799_000_000,
                        not_after=1_801_000_000, serial=77)
    token = core.make_token(cred.raw, DeviceKey(hashlib.sha256(b"itf-315").digest())._secret,
                            1_800_000_000, 1, Scene.BUS)
    assert qrimage.decode_image(qrimage.render(token, "png")) == [token]
