"""The compiled core's contract with the Python side.

_core.pxd declares the token layout and the reason codes again as C enums (the
hot path cannot read Python constants). These tests check, from both sides,
that the two copies agree: `qrpay._core.LAYOUT` (the numbers the C code was
compiled with) against `qrpay.format`, and the `R_*` / `ROLE_*` lines of
_core.pxd (read as text, so this runs on every backend) against
`qrpay.errors.Reason` and `qrpay.trust.Role`.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from conftest import NO_EXTENSIONS, compiled_core

from qrpay import _ref
from qrpay import format as fmt
from qrpay.errors import Reason
from qrpay.trust import Role

PXD = Path(__file__).resolve().parent.parent / "src" / "qrpay" / "_core.pxd"

# Layout names the core must publish in LAYOUT, all also defined in qrpay.format.
REQUIRED_LAYOUT = {
    "VERSION", "CRED_KID", "CRED_ACCOUNT", "CRED_SERIAL", "CRED_DEVICE_KEY",
    "CRED_NOT_BEFORE", "CRED_NOT_AFTER", "CRED_LIMIT", "CRED_SCENES", "CRED_BODY_LEN",
    "CRED_ISSUER_SIG", "CRED_LEN", "TOKEN_ISSUED_AT", "TOKEN_COUNTER", "TOKEN_SCENE",
    "TOKEN_BODY_LEN", "TOKEN_DEVICE_SIG", "TOKEN_LEN",
}
# _core.pxd spells a few lengths differently from format.py.
PXD_ALIASES = {"PK_LEN": "PUBLIC_KEY_LEN", "SK_LEN": "SECRET_KEY_LEN", "SIG_LEN": "SIGNATURE_LEN"}


def _pxd_enum_lines() -> dict[str, int]:
    text = PXD.read_text(encoding="utf-8")
    found: dict[str, int] = {}
    for name, value in re.findall(r"^\s+([A-Z][A-Z0-9_]*)\s*=\s*(\d+)\s*$", text, re.M):
        assert name not in found, f"{name} declared twice in _core.pxd"
        found[name] = int(value)
    return found


def test_compiled_core_imports() -> None:
    if NO_EXTENSIONS:
        pytest.skip("QRPAY_NO_EXTENSIONS is set: the pure-Python twin is under test")
    core = importlib.import_module("qrpay._core")  # ImportError fails the test
    assert hasattr(core, "Verifier") and hasattr(core, "LAYOUT")


def test_layout_matches_format() -> None:
    layout = compiled_core().LAYOUT
    assert REQUIRED_LAYOUT <= set(layout), REQUIRED_LAYOUT - set(layout)
    mismatched = {name: (value, getattr(fmt, name, "missing"))
                  for name, value in layout.items() if getattr(fmt, name, None) != value}
    assert not mismatched, f"_core.LAYOUT vs qrpay.format: {mismatched}"


def test_pxd_layout_lines_match_format() -> None:
    # Every layout constant _core.pxd declares (not only those LAYOUT exports).
    declared = {n: v for n, v in _pxd_enum_lines().items()
                if not n.startswith(("R_", "ROLE_"))}
    assert REQUIRED_LAYOUT <= set(declared)
    for name, value in declared.items():
        python_name = PXD_ALIASES.get(name, name)
        if name == "MAX_SIGNED":
            assert value == fmt.TAG_LEN + fmt.TOKEN_BODY_LEN
        elif name == "CACHE_WAYS":
            assert value == _ref.CACHE_WAYS
        else:
            assert getattr(fmt, python_name) == value, name


def test_pxd_reason_codes_match_reason() -> None:
    codes = {n[2:]: v for n, v in _pxd_enum_lines().items() if n.startswith("R_")}
    assert codes, "no R_NAME = N lines found in _core.pxd"
    for name, value in codes.items():
        assert name in Reason.__members__, f"R_{name} is not a qrpay.errors.Reason"
        assert Reason[name] == value, f"R_{name} = {value}, Reason.{name} = {Reason[name]}"
    # The core can return every token-verification reason, and nothing else.
    assert set(codes.values()) == set(range(0, 13))


def test_pxd_roles_match_trust_role() -> None:
    roles = {n[5:]: v for n, v in _pxd_enum_lines().items() if n.startswith("ROLE_")}
    assert roles == {"CREDENTIALS": 1}
    for name, value in roles.items():
        assert Role[name] == value
        assert getattr(_ref, f"ROLE_{name}") == value


def test_compiled_reasons_reach_python_unchanged() -> None:
    # A too-short token through the compiled Verifier: R_WRONG_LENGTH as a Reason.
    core = compiled_core()
    assert core.Verifier([], 16).verify_one(b"", 0, 60, 30) == Reason.WRONG_LENGTH
    assert core.Verifier([], 16).verify_one(bytes(fmt.TOKEN_LEN), 0, 60, 30) == (
        Reason.UNSUPPORTED_VERSION)
