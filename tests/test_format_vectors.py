"""qrpay's own known-answer vectors, and docs/FORMAT.md checked against the code.

tests/data/token_vectors.json fixes seeds, fields and times and records the
bytes they produce (tests/data/make_token_vectors.py writes it). Here every
vector is rebuilt through the library, byte for byte, and verified; and the
layout tables, tags, reason codes and scene numbers are read out of
docs/FORMAT.md itself, so a change to the code that the doc does not follow (or
the other way round) fails here rather than in another implementation.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from nacl.bindings import crypto_sign_open

import qrpay
from qrpay import (
    DeviceKey, DevicePublicKey, IssuerKey, IssuerPublicKey, Reason, Scene, TokenGenerator,
    TrustStore, key_id,
)
from qrpay import format as fmt
from qrpay._impl import core
from qrpay.errors import TokenFromFuture, TokenStale

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
DOC = (ROOT / "docs" / "FORMAT.md").read_text(encoding="utf-8")
VECTORS_FILE = json.loads((DATA / "token_vectors.json").read_text(encoding="utf-8"))
VECTORS: list[dict[str, Any]] = VECTORS_FILE["vectors"]
MAX_AGE = VECTORS_FILE["max_age"]
SKEW = VECTORS_FILE["skew"]


def _ids() -> list[str]:
    return [v["name"] for v in VECTORS]


# --- The layout as docs/FORMAT.md writes it ------------------------------------------

_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*`(\w+)`\s*\|", re.M)
_TYPES = {"u8": ("B", 1), "u16": ("H", 2), "u32": ("I", 4), "u64": ("Q", 8)}


def _section(heading: str) -> str:
    """The text under a markdown heading, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#)", DOC + "\n#", re.S | re.M)
    assert match, f"docs/FORMAT.md has no section {heading!r}"
    return match.group(1)


def _doc_table(heading: str) -> list[tuple[int, int, str, str]]:
    rows = [(int(o), int(s), t, f) for o, s, t, f in _ROW.findall(_section(heading))]
    assert rows, f"no layout rows under {heading!r}"
    return rows


CRED_TABLE = _doc_table("Credential layout")
TOKEN_TABLE = _doc_table("Token layout")


def _struct_of(table: list[tuple[int, int, str, str]]) -> tuple[struct.Struct, list[str]]:
    """A little-endian struct built from a doc table, checking that its rows
    are contiguous from offset 0 and that each type has the size it claims."""
    fmt_chars, names, at = "<", [], 0
    for offset, size, typ, name in table:
        assert offset == at, f"{name}: doc says offset {offset}, previous rows end at {at}"
        if typ == "bytes":
            fmt_chars += f"{size}s"
        else:
            code, width = _TYPES[typ]
            assert size == width, f"{name}: {typ} is {width} bytes, doc says {size}"
            fmt_chars += code
        names.append(name)
        at += size
    layout = struct.Struct(fmt_chars)
    assert layout.size == at
    return layout, names


def parse_per_doc(token: bytes) -> dict[str, Any]:
    """Every field of a token, decoded with the doc's tables only."""
    token_struct, token_names = _struct_of(TOKEN_TABLE)
    cred_struct, cred_names = _struct_of(CRED_TABLE)
    fields = dict(zip(token_names, token_struct.unpack(token)))
    fields.update(zip(cred_names, cred_struct.unpack(fields.pop("credential"))))
    return fields


def test_doc_tables_have_the_documented_sizes() -> None:
    assert _struct_of(CRED_TABLE)[0].size == 131 == fmt.CRED_LEN
    assert _struct_of(TOKEN_TABLE)[0].size == 204 == fmt.TOKEN_LEN
    assert TOKEN_TABLE[0] == (0, 131, "bytes", "credential")


def test_doc_offsets_match_format_constants() -> None:
    for prefix, table in (("CRED_", CRED_TABLE), ("TOKEN_", TOKEN_TABLE[1:])):
        for offset, _size, _type, name in table:
            constant = prefix + name.upper()
            assert getattr(fmt, constant) == offset, constant
    # The signatures cover everything before them.
    assert fmt.CRED_BODY_LEN == fmt.CRED_ISSUER_SIG == dict(
        (f, o) for o, _s, _t, f in CRED_TABLE)["issuer_sig"]
    assert fmt.TOKEN_BODY_LEN == fmt.TOKEN_DEVICE_SIG


def test_doc_tags_match_the_code() -> None:
    tags = dict(re.findall(r"^\| `(TAG_\w+)` \| `[^`]+` \| `([0-9a-f]{32})` \|", DOC, re.M))
    assert tags == {"TAG_CRED": fmt.TAG_CRED.hex(), "TAG_TOKEN": fmt.TAG_TOKEN.hex()}
    assert VECTORS_FILE["tag_cred"] == fmt.TAG_CRED.hex()
    assert VECTORS_FILE["tag_token"] == fmt.TAG_TOKEN.hex()


def test_doc_reason_codes_match_the_enum() -> None:
    named = re.findall(r"`([A-Z][A-Z_]+)` = (\d+)", DOC)
    assert len(named) >= 20
    for name, value in named:
        assert Reason[name] == int(value), name
    # The verification table lists reasons 1..12 as steps 1..12, in order.
    steps = re.findall(r"^\| (\d+) \| .*? \| `([A-Z_]+)` = (\d+) \|$",
                       _section("Verification"), re.M)
    in_order = [(int(s), Reason[n]) for s, n, _v in steps if s != "0"]
    assert in_order == [(i, Reason(i)) for i in range(1, 13)]


def test_doc_scenes_match_the_enum() -> None:
    rows = re.findall(r"^\| (\d+) \| `0x([0-9a-f]{4})` \| `([A-Z]+)` \|$", DOC, re.M)
    assert [(int(v), int(bit, 16), name) for v, bit, name in rows] == [
        (int(s), 1 << int(s), s.name) for s in Scene]
    assert VECTORS_FILE["scenes"] == {s.name: int(s) for s in Scene}


def test_doc_defaults_match_the_code() -> None:
    assert (MAX_AGE, SKEW) == (qrpay.DEFAULT_MAX_AGE, qrpay.DEFAULT_SKEW) == (60, 30)
    assert "defaults 60 and 30" in DOC


# --- Every vector, byte for byte ------------------------------------------------------


def _keys(v: dict[str, Any]) -> tuple[IssuerKey, DeviceKey]:
    return IssuerKey(bytes.fromhex(v["issuer_seed"])), DeviceKey(bytes.fromhex(v["device_seed"]))


def _issue(v: dict[str, Any]) -> tuple[IssuerKey, DeviceKey, qrpay.Credential]:
    issuer, device = _keys(v)
    credential = issuer.issue(
        account=int(v["account"]), device_public=device.public, limit=v["limit"],
        scenes=[Scene[s] for s in v["scenes"]], not_before=v["not_before"],
        not_after=v["not_after"], serial=int(v["serial"]))
    return issuer, device, credential


@pytest.mark.parametrize("v", VECTORS, ids=_ids())
def test_keys_and_kid(v: dict[str, Any]) -> None:
    issuer, device = _keys(v)
    assert issuer.public.to_bytes().hex() == v["issuer_public_key"]
    assert device.public.to_bytes().hex() == v["device_public_key"]
    assert issuer.kid.hex() == key_id(bytes.fromhex(v["issuer_public_key"])).hex() == v["kid"]
    # The text forms round-trip to the same keys.
    assert IssuerPublicKey.from_text(issuer.public.to_text()) == issuer.public
    assert DevicePublicKey.from_text(device.public.to_text()) == device.public
    assert IssuerKey.from_secret_text(issuer.secret_text()).secret_bytes().hex() == v["issuer_seed"]


@pytest.mark.parametrize("v", VECTORS, ids=_ids())
def test_credential_bytes(v: dict[str, Any]) -> None:
    _issuer, _device, credential = _issue(v)
    assert credential.to_bytes().hex() == v["credential"]
    assert len(credential.to_bytes()) == 131


@pytest.mark.parametrize("v", VECTORS, ids=_ids())
def test_token_bytes_from_the_generator(v: dict[str, Any]) -> None:
    _issuer, device, credential = _issue(v)
    generator = TokenGenerator(credential, device, counter=v["counter"] - 1)
    token = generator.make(Scene[v["scene"]], now=v["issued_at"])
    assert token.hex() == v["token"]
    assert generator.counter == v["counter"]


@pytest.mark.parametrize("v", VECTORS, ids=_ids())
def test_token_bytes_from_the_core(v: dict[str, Any]) -> None:
    _issuer, device, credential = _issue(v)
    token = core.make_token(credential.to_bytes(), device._secret, v["issued_at"],
                            v["counter"], int(Scene[v["scene"]]))
    assert token.hex() == v["token"]


@pytest.mark.parametrize("v", VECTORS, ids=_ids())
def test_signed_messages(v: dict[str, Any]) -> None:
    token = bytes.fromhex(v["token"])
    issuer_message = bytes.fromhex(v["issuer_signed_message"])
    device_message = bytes.fromhex(v["device_signed_message"])
    assert issuer_message == fmt.TAG_CRED + token[:67] and len(issuer_message) == 83
    assert device_message == fmt.TAG_TOKEN + token[:140] and len(device_message) == 156
    # Plain Ed25519 over exactly those messages, nothing qrpay-specific.
    assert crypto_sign_open(token[67:131] + issuer_message,
                            bytes.fromhex(v["issuer_public_key"])) == issuer_message
    assert crypto_sign_open(token[140:204] + device_message,
                            bytes.fromhex(v["device_public_key"])) == device_message


@pytest.mark.parametrize("v", VECTORS, ids=_ids())
def test_text_form(v: dict[str, Any]) -> None:
    token = bytes.fromhex(v["token"])
    assert qrpay.encode_text(token) == v["text"]
    assert qrpay.decode_text(v["text"]) == token
    assert v["text"].startswith("QP:") and len(v["text"]) == 309 <= 311


@pytest.mark.parametrize("v", VECTORS, ids=_ids())
def test_fields_parsed_with_the_documented_layout(v: dict[str, Any]) -> None:
    fields = parse_per_doc(bytes.fromhex(v["token"]))
    assert fields == {
        "version": 1,
        "kid": bytes.fromhex(v["kid"]),
        "account": int(v["account"]),
        "serial": int(v["serial"]),
        "device_key": bytes.fromhex(v["device_public_key"]),
        "not_before": v["not_before"],
        "not_after": v["not_after"],
        "limit": v["limit"],
        "scenes": v["scene_mask"],
        "issuer_sig": bytes.fromhex(v["credential"])[67:],
        "issued_at": v["issued_at"],
        "counter": v["counter"],
        "scene": int(Scene[v["scene"]]),
        "device_sig": bytes.fromhex(v["token"])[140:],
    }
    assert v["scene_mask"] == sum(1 << Scene[s] for s in v["scenes"])


@pytest.mark.parametrize("v", VECTORS, ids=_ids())
def test_vector_verifies(v: dict[str, Any]) -> None:
    issuer, _device = _keys(v)
    trust = TrustStore()
    trust.add(issuer.public)
    for form in (bytes.fromhex(v["token"]), v["text"]):
        checked = qrpay.verify(form, trust, v["verify_at"], max_age=MAX_AGE, skew=SKEW)
        assert (checked.account, checked.serial, checked.limit) == (
            int(v["account"]), int(v["serial"]), v["limit"])
        assert (checked.issued_at, checked.counter, checked.scene) == (
            v["issued_at"], v["counter"], Scene[v["scene"]])
        assert (checked.not_before, checked.not_after) == (v["not_before"], v["not_after"])
        assert checked.scenes == frozenset(Scene[s] for s in v["scenes"])
        assert checked.kid.hex() == v["kid"]
        assert checked.device_key.hex() == v["device_public_key"]
    batch = qrpay.verify_batch([bytes.fromhex(v["token"])], trust, v["verify_at"],
                               max_age=MAX_AGE, skew=SKEW)
    assert batch.reasons.tolist() == [Reason.OK]
    assert int(batch.counter[0]) == v["counter"] and int(batch.account[0]) == int(v["account"])


# --- The freshness and window rules, exactly as FORMAT.md states them ----------------


def _bus() -> tuple[bytes, TrustStore, dict[str, Any]]:
    v = next(x for x in VECTORS if x["name"] == "bus")
    trust = TrustStore()
    trust.add(_keys(v)[0].public)
    return bytes.fromhex(v["token"]), trust, v


@pytest.mark.parametrize("max_age,skew", [(60, 30), (0, 0), (5, 0), (0, 7)])
def test_freshness_is_inclusive_at_both_ends(max_age: int, skew: int) -> None:
    token, trust, v = _bus()
    issued = v["issued_at"]
    # Fresh exactly when now - max_age - skew <= issued_at <= now + skew.
    oldest_now = issued + max_age + skew
    earliest_now = issued - skew
    for now in (earliest_now, issued, oldest_now):
        qrpay.verify(token, trust, now, max_age=max_age, skew=skew)
    with pytest.raises(TokenStale):
        qrpay.verify(token, trust, oldest_now + 1, max_age=max_age, skew=skew)
    with pytest.raises(TokenFromFuture):
        qrpay.verify(token, trust, earliest_now - 1, max_age=max_age, skew=skew)


def test_credential_window_is_inclusive() -> None:
    # A token issued at each end of its credential's window, checked there.
    v = next(x for x in VECTORS if x["name"] == "bus")
    _issuer, device, credential = _issue(v)
    trust = TrustStore()
    trust.add(_keys(v)[0].public)
    generator = TokenGenerator(credential, device)
    for edge, outside, reason in ((v["not_before"], v["not_before"] - 1,
                                   Reason.CREDENTIAL_NOT_YET_VALID),
                                  (v["not_after"], v["not_after"] + 1,
                                   Reason.CREDENTIAL_EXPIRED)):
        token = generator.make(Scene.BUS, now=edge)
        qrpay.verify(token, trust, edge)
        result = qrpay.verify_batch([token], trust, outside)
        assert result.reasons.tolist() == [reason]


def test_check_order_from_the_doc() -> None:
    """Tokens broken in two ways at once report the earlier step of the table."""
    token, trust, v = _bus()
    now = v["verify_at"]
    bad_device_sig = token[:140] + bytes(64)
    cases = [
        (b"\x02" + bad_device_sig[1:], Reason.UNSUPPORTED_VERSION),
        (token[:1] + b"\0\0\0\0" + token[5:], Reason.UNKNOWN_KID),
        # Corrupt the issuer signature and the device signature: step 6 wins.
        (token[:67] + bytes(64) + token[131:140] + bytes(64), Reason.BAD_ISSUER_SIGNATURE),
        (bad_device_sig, Reason.BAD_DEVICE_SIGNATURE),
        (token[:-1], Reason.WRONG_LENGTH),
    ]
    tokens = [t for t, _ in cases]
    # Expired credential and stale token at once: the credential window comes first.
    late = v["not_after"] + 1000
    assert qrpay.verify_batch(tokens + [token], trust, now).reasons.tolist() == [
        r for _, r in cases] + [Reason.OK]
    assert qrpay.verify_batch([token], trust, late).reasons.tolist() == [
        Reason.CREDENTIAL_EXPIRED]
    # Issuer key outside its trusted window, signatures and all else fine.
    narrow = TrustStore()
    narrow.add(_keys(v)[0].public, not_before=0, not_after=now - 1)
    assert qrpay.verify_batch([token], narrow, now).reasons.tolist() == [
        Reason.ISSUER_KEY_NOT_VALID]
    with pytest.raises(qrpay.MalformedText):
        qrpay.verify("qp:" + v["text"][3:], trust, now)


# --- The file is what the generator writes -------------------------------------------


def test_vector_file_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("make_token_vectors",
                                                  DATA / "make_token_vectors.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (DATA / "token_vectors.json").read_text(encoding="utf-8")


def test_vectors_cover_the_required_cases() -> None:
    by_name = {v["name"]: v for v in VECTORS}
    assert by_name["bus"]["scene"] == "BUS"
    top = by_name["maximum-fields"]
    assert (int(top["account"]), top["limit"], top["scene_mask"]) == (2**64 - 1, 2**32 - 1, 0x7F)
    assert by_name["large-counter"]["counter"] > 2**31
