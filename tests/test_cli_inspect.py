"""`qrpay inspect`: every artefact decoded in human and JSON form (the JSON
checked against a schema written here), `-` for stdin, verdicts with
--trust (OK, and tampered inputs refused with the right reason), garbage
refused with exit 2, and a secret key never printed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qrpay import cli, clearing, qrimage
from qrpay.credential import Credential, Scene
from qrpay.denylist import DenyList, sign_deny_delta, sign_deny_list
from qrpay.format import TAG_BATCH, U32_MAX
from qrpay.gateway import Gateway
from qrpay.keys import (
    DeviceKey, GatewayKey, IssuerKey, RootKey, SettlementKey, SigningKey,
)
from qrpay.qr import encode_text
from qrpay.scoring import FeatureBins, Scorecard
from qrpay.token import TokenGenerator
from qrpay.trust import Role, TrustedKey, TrustStore
from qrpay.trustbundle import sign_trust_bundle
from qrpay.wire import sign_document

NOW = 1_800_000_000          # 2027-01-15T08:00:00Z
NOW_ISO = "2027-01-15T08:00:00Z"
DAY = 86_400


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["inspect", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run(capsys, *args, "--json")
    assert out, err
    return code, json.loads(out)


# -- the schema of `qrpay inspect --json` ------------------------------------------------------
# JSON Schema (a subset: type, properties, required, additionalProperties,
# items, enum, pattern, minimum, maximum), checked by _validate below:
# jsonschema is not among the test dependencies.

INT = {"type": "integer", "minimum": 0}
U32 = {"type": "integer", "minimum": 0, "maximum": U32_MAX}
HEX4 = {"type": "string", "pattern": r"^[0-9a-f]{8}$"}
SCENE = {"enum": [s.name.lower() for s in Scene]}
SCENES = {"type": "array", "items": SCENE}
STR = {"type": "string"}


def obj(**properties: Any) -> dict[str, Any]:
    """An object with exactly these keys (stable keys: none missing, none extra)."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def public(role: str) -> dict[str, Any]:
    return {"type": "string", "pattern": rf"^qrpay:{role}-public:[A-Za-z0-9_-]{{43}}$"}


CREDENTIAL_FIELDS = dict(kid=HEX4, account=INT, serial=INT, limit=U32, scenes=SCENES,
                         not_before=U32, not_after=U32, device_key=public("device"))
FIELDS: dict[str, dict[str, Any]] = {
    "token": obj(form={"enum": ["text", "bytes", "qr-image"]}, version={"enum": [1]},
                 **CREDENTIAL_FIELDS, issued_at=U32, counter=U32, scene=SCENE),
    "credential": obj(form={"enum": ["text", "bytes"]}, version={"enum": [1]},
                      **CREDENTIAL_FIELDS),
    "key": obj(role={"enum": ["issuer", "device", "gateway", "settlement", "root"]},
               secret={"type": "boolean"},
               public_key={"type": "string", "pattern": r"^qrpay:[a-z]+-public:"},
               kid=HEX4, gateway_id={"type": ["string", "null"]}),
    "batch": obj(gateway=public("gateway"), gateway_id={"type": "string"}, seq=INT, first=INT,
                 last=INT, created_at=U32, count=INT, amount_total=INT,
                 records={"type": "array", "items": obj(
                     record=INT, amount=U32, scene=SCENE, time=U32, token_length=INT,
                     token={"type": ["object", "null"], "properties": dict(
                         kid=HEX4, account=INT, serial=INT, counter=U32, issued_at=U32,
                         scene=STR), "additionalProperties": False,
                         "required": ["kid", "account", "serial", "counter", "issued_at",
                                      "scene"]},
                     reason={"type": ["string", "null"]})}),
    "deny-list": obj(version=INT, issued_at=U32, kid=HEX4, count=INT,
                     serials={"type": "array", "items": INT}),
    "deny-delta": obj(version=INT, issued_at=U32, kid=HEX4, digest={"type": "string"},
                      added={"type": "array", "items": INT},
                      removed={"type": "array", "items": INT}, **{"from": INT}),
    "trust-bundle": obj(version=INT, issued_at=U32, root_kid=HEX4, keys={
        "type": "array", "items": obj(key=public("issuer"), kid=HEX4, not_before=U32,
                                      not_after=U32, roles={"type": "array", "items": {
                                          "enum": ["credentials", "deny-list", "scorecard"]}})}),
    "scorecard": obj(signed={"type": "boolean"}, kid={"type": ["string", "null"]},
                     card_id={"type": "string"}, version=INT, base_points={"type": "integer"},
                     scaling={"type": "object"}, feature_names={"type": "array", "items": STR},
                     features={"type": "array", "items": obj(
                         name=STR, bins=INT, edges={"type": "array"}, points={"type": "array"},
                         missing_points={"type": "integer"}, specials={"type": "array"},
                         iv={"type": "number"}, trend=STR)}),
    "statement": obj(period=INT, operator=STR, from_time=U32, until=U32, schedule_version=INT,
                     issued_at=U32, kid=HEX4, gross=INT, fee=INT, net=INT, flagged_count=INT,
                     flagged_amount=INT, count=INT, lines={"type": "array", "items": obj(
                         scene=SCENE, count=INT, gross=INT, fee_bps=INT, fee=INT, net=INT,
                         flagged_count=INT, flagged_amount=INT)}),
}
VERDICT = obj(ok={"type": "boolean"}, reason={"type": "string", "pattern": r"^[A-Z_]+$"},
              message=STR, checked=STR, now={"type": ["integer", "null"]},
              keys={"type": "array", "items": {"type": "string",
                                               "pattern": r"^[a-z]+ [0-9a-f]{8}$"}})


def schema(kind: str, verdict: bool) -> dict[str, Any]:
    properties = {"kind": {"enum": [kind]}, "fields": FIELDS[kind]}
    if verdict:
        properties["verdict"] = VERDICT
    return obj(**properties)


def _is(kind: str, value: Any) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    classes: dict[str, type] = {"object": dict, "array": list, "string": str,
                                "null": type(None)}
    return isinstance(value, classes[kind])


def _validate(value: Any, rule: dict[str, Any], where: str = "$") -> None:
    if "type" in rule:
        kinds = rule["type"] if isinstance(rule["type"], list) else [rule["type"]]
        assert any(_is(k, value) for k in kinds), f"{where}: {value!r:.60} is not {kinds}"
    if "enum" in rule:
        assert value in rule["enum"], f"{where}: {value!r} not in {rule['enum']}"
    if isinstance(value, str) and "pattern" in rule:
        assert re.search(rule["pattern"], value), f"{where}: {value!r} !~ {rule['pattern']}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert value >= rule.get("minimum", value), f"{where}: {value} below minimum"
        assert value <= rule.get("maximum", value), f"{where}: {value} above maximum"
    if isinstance(value, dict):
        for name in rule.get("required", []):
            assert name in value, f"{where}: missing {name!r}"
        properties = rule.get("properties", {})
        if rule.get("additionalProperties") is False:
            extra = set(value) - set(properties)
            assert not extra, f"{where}: unexpected {sorted(extra)}"
        for name, item in value.items():
            if name in properties:
                _validate(item, properties[name], f"{where}.{name}")
    if isinstance(value, list) and "items" in rule:
        for i, item in enumerate(value):
            _validate(item, rule["items"], f"{where}[{i}]")


def test_the_schema_check_can_fail() -> None:
    # The checker itself: each of these must be caught.
    for bad, rule in [({"a": 1}, obj(a=STR)), ({}, obj(a=INT)), ({"a": 1, "b": 2}, obj(a=INT)),
                      ({"a": True}, obj(a=INT)), ({"a": "bus"}, obj(a={"enum": ["metro"]})),
                      ([1, "x"], {"type": "array", "items": INT}), (-1, INT)]:
        with pytest.raises(AssertionError):
            _validate(bad, rule)
    _validate({"a": 1, "b": None}, obj(a=INT, b={"type": ["string", "null"]}))


# -- the artefacts ------------------------------------------------------------------------------

@dataclass
class World:
    dir: Path
    issuer: IssuerKey
    device: DeviceKey
    gateway: GatewayKey
    settlement: SettlementKey
    root: RootKey
    credential: Credential
    token: bytes
    files: dict[str, Path]

    def pub(self, key: SigningKey) -> str:
        return key._public.to_text()

    def key_file(self, key: SigningKey) -> Path:
        """A file holding the public key (as `qrpay keys new` prints it)."""
        path = self.dir / f"{key._public.role}.pub"
        path.write_text(self.pub(key) + "\n")
        return path


def _card() -> Scorecard:
    return Scorecard((FeatureBins("income", (1.0, 2.0), (10, 20, 30), 5, ((-1.0, 0),)),
                      FeatureBins("tenure", (12.0,), (0, 15), 3)), 500, 2,
                     {"base_score": 600.0, "base_odds": 50.0, "pdo": 20.0})


def _statement(key: SettlementKey) -> bytes:
    schedule = clearing.FeeSchedule(1, {s: 150 for s in Scene}, 0)
    [cleared] = clearing.clear(np.array([200, 300, 120]), np.array([0, 0, 2]),
                               np.array([0, 0, 0]), ["bus-co"], schedule)
    statement = clearing.Statement.from_clearing(cleared, period=3, from_time=NOW - DAY,
                                                 until=NOW, schedule=schedule,
                                                 issued_at=NOW + 60)
    return clearing.sign_statement(key, statement)


@pytest.fixture
def world(tmp_path: Path) -> World:
    issuer, device, gateway = IssuerKey.generate(), DeviceKey.generate(), GatewayKey.generate()
    settlement, root = SettlementKey.generate(), RootKey.generate()
    credential = issuer.issue(42, device.public, 5000, [Scene.BUS, Scene.METRO], NOW - 100,
                              NOW + 30 * DAY, serial=777)
    token = TokenGenerator(credential, device).make(Scene.BUS, NOW)
    trust = TrustStore()
    trust.add(issuer.public, roles=Role.CREDENTIALS | Role.DENY_LIST | Role.SCORECARD)
    with Gateway(tmp_path / "gw", gateway, trust) as gw:
        gw.scan(token, 200, Scene.BUS, NOW + 5)
        batch = gw.export_batch(now=NOW + 10)
    assert batch is not None
    deny_1 = sign_deny_list(issuer, 1, [7, 777], NOW + 20)
    deny_2 = sign_deny_list(issuer, 2, [7, 9, 11], NOW + 30)
    delta = sign_deny_delta(issuer, DenyList.load(deny_1, trust), DenyList.load(deny_2, trust))
    bundle = sign_trust_bundle(root, 4, [TrustedKey(issuer.public, NOW - DAY, NOW + 99 * DAY,
                                                    Role.CREDENTIALS | Role.DENY_LIST)], NOW)
    content: dict[str, bytes | str] = {
        "token.txt": encode_text(token) + "\n", "token.bin": token,
        "token.png": qrimage.render(token, "png"),
        "cred.txt": credential.to_text() + "\n", "cred.bin": credential.raw,
        "issuer.key": issuer.secret_text() + "\n", "gateway.pub": gateway.public.to_text(),
        "batch.msgpack": batch, "deny.msgpack": deny_1, "delta.msgpack": delta,
        "bundle.msgpack": bundle, "card.json": _card().to_json(),
        "card.signed": _card().sign(issuer), "statement.msgpack": _statement(settlement)}
    files = {}
    for name, data in content.items():
        files[name] = tmp_path / name
        if isinstance(data, str):
            files[name].write_text(data)
        else:
            files[name].write_bytes(data)
    return World(tmp_path, issuer, device, gateway, settlement, root, credential, token, files)


# (file, kind it is detected as, the --trust keys that verify it, and --now)
ARTEFACTS = [
    ("token.txt", "token", ["issuer"], NOW + 1),
    ("token.bin", "token", ["issuer"], NOW + 1),
    ("token.png", "token", ["issuer"], NOW + 1),
    ("cred.txt", "credential", ["issuer"], NOW),
    ("cred.bin", "credential", ["issuer"], NOW),
    ("issuer.key", "key", [], None),
    ("gateway.pub", "key", [], None),
    ("batch.msgpack", "batch", ["gateway", "issuer"], None),
    ("deny.msgpack", "deny-list", ["issuer"], None),
    ("delta.msgpack", "deny-delta", ["issuer"], None),
    ("bundle.msgpack", "trust-bundle", ["root"], None),
    ("card.json", "scorecard", [], None),
    ("card.signed", "scorecard", ["issuer"], None),
    ("statement.msgpack", "statement", ["settlement"], None),
]


def trust_args(world: World, roles: list[str]) -> list[str]:
    keys = {"issuer": world.issuer, "gateway": world.gateway, "root": world.root,
            "settlement": world.settlement}
    out = []
    for role in roles:
        out += ["--trust", str(world.key_file(keys[role]))]
    return out


@pytest.mark.parametrize("name,kind,_roles,_now", ARTEFACTS)
def test_json_of_every_artefact_matches_its_schema(world: World, name: str, kind: str,
                                                   _roles: list[str], _now: int | None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, document = run_json(capsys, str(world.files[name]))
    assert code == 0
    assert document["kind"] == kind
    _validate(document, schema(kind, verdict=False))


@pytest.mark.parametrize("name,kind,roles,now", [a for a in ARTEFACTS if a[2]])
def test_trust_verifies_every_signed_artefact(world: World, name: str, kind: str,
                                              roles: list[str], now: int | None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--now", str(now)] if now is not None else []
    code, document = run_json(capsys, str(world.files[name]), *trust_args(world, roles), *extra)
    _validate(document, schema(kind, verdict=True))
    verdict = document["verdict"]
    assert (code, verdict["ok"], verdict["reason"]) == (0, True, "OK"), verdict
    assert verdict["keys"], "the verdict names the keys it used"
    # Human form: the same verdict, aligned.
    code, out, _ = run(capsys, str(world.files[name]), *trust_args(world, roles), *extra)
    assert code == 0
    assert re.search(r"^verdict: +OK$", out, re.M) and re.search(r"^reason: +OK$", out, re.M)


@pytest.mark.parametrize("name,kind,_roles,_now", ARTEFACTS)
def test_human_output_is_aligned_field_lines(world: World, name: str, kind: str,
                                             _roles: list[str], _now: int | None,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, str(world.files[name]))
    assert code == 0 and err == ""
    head = out.split("\n\n")[0].splitlines()
    block = [line for line in head if not line.startswith("  - ")
             and not re.match(r"^[a-z_]+ \(\d+\):$", line)]
    assert block[0].split() == ["kind:", kind]
    columns = set()
    for line in block:
        match = re.match(r"^([a-z_]+):( +)(\S.*)$", line)
        assert match, f"not a 'field: value' line: {line!r}"
        columns.add(len(match.group(1)) + 1 + len(match.group(2)))
    assert len(columns) == 1, f"values start in columns {columns}:\n{out}"
    # The JSON form's top-level fields all appear (lists of items in their block).
    _, document = run_json(capsys, str(world.files[name]))
    for field, value in document["fields"].items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            assert f"\n{field} ({len(value)}):\n" in out
        else:
            assert re.search(rf"^{field}: ", out, re.M), field


def test_token_fields_and_forms(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    documents = {}
    for name in ("token.txt", "token.bin", "token.png"):
        _, documents[name] = run_json(capsys, str(world.files[name]))
    _, documents["inline"] = run_json(capsys, encode_text(world.token))
    forms = {name: d["fields"].pop("form") for name, d in documents.items()}
    assert forms == {"token.txt": "text", "token.bin": "bytes", "token.png": "qr-image",
                     "inline": "text"}
    fields = documents["token.txt"]["fields"]
    assert all(d["fields"] == fields for d in documents.values())
    assert fields == {"version": 1, "kid": world.issuer.kid.hex(), "account": 42,
                      "serial": 777, "limit": 5000, "scenes": ["bus", "metro"],
                      "not_before": NOW - 100, "not_after": NOW + 30 * DAY,
                      "device_key": world.device.public.to_text(), "issued_at": NOW,
                      "counter": 1, "scene": "bus"}
    # Human form: times as ISO 8601, scenes by name, amounts in minor units.
    _, out, _ = run(capsys, str(world.files["token.txt"]))
    assert re.search(rf"^issued_at: +{NOW_ISO}$", out, re.M)
    assert re.search(r"^scenes: +bus, metro$", out, re.M)
    assert re.search(r"^limit: +5000$", out, re.M)


def test_batch_fields(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    _, document = run_json(capsys, str(world.files["batch.msgpack"]))
    fields = document["fields"]
    assert fields["gateway"] == world.gateway.public.to_text()
    assert fields["gateway_id"] == world.gateway.public.gateway_id
    assert (fields["seq"], fields["first"], fields["last"], fields["count"]) == (1, 1, 1, 1)
    assert (fields["created_at"], fields["amount_total"]) == (NOW + 10, 200)
    assert fields["records"] == [{
        "record": 1, "amount": 200, "scene": "bus", "time": NOW + 5, "token_length": 204,
        "token": {"kid": world.issuer.kid.hex(), "account": 42, "serial": 777, "counter": 1,
                  "issued_at": NOW, "scene": "bus"}, "reason": None}]
    _, out, _ = run(capsys, str(world.files["batch.msgpack"]))
    assert "records (1):\n  - record=1 amount=200 scene=bus time=2027-01-15T08:00:05Z" in out
    assert "token.account=42" in out


def test_other_documents_fields(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    _, deny = run_json(capsys, str(world.files["deny.msgpack"]))
    assert deny["fields"] == {"version": 1, "issued_at": NOW + 20, "kid": world.issuer.kid.hex(),
                              "count": 2, "serials": [7, 777]}
    _, delta = run_json(capsys, str(world.files["delta.msgpack"]))
    assert (delta["fields"]["from"], delta["fields"]["version"]) == (1, 2)
    assert (delta["fields"]["added"], delta["fields"]["removed"]) == ([9, 11], [777])
    _, bundle = run_json(capsys, str(world.files["bundle.msgpack"]))
    assert bundle["fields"]["root_kid"] == world.root.kid.hex()
    assert bundle["fields"]["keys"] == [{
        "key": world.issuer.public.to_text(), "kid": world.issuer.kid.hex(),
        "roles": ["credentials", "deny-list"], "not_before": NOW - DAY,
        "not_after": NOW + 99 * DAY}]
    _, statement = run_json(capsys, str(world.files["statement.msgpack"]))
    fields = statement["fields"]
    assert (fields["operator"], fields["period"], fields["count"]) == ("bus-co", 3, 3)
    assert (fields["gross"], fields["fee"], fields["net"]) == (620, 8, 612)
    assert [line["scene"] for line in fields["lines"]] == ["bus", "metro"]
    assert fields["kid"] == world.settlement.kid.hex()
    for name, signed in (("card.json", False), ("card.signed", True)):
        _, card = run_json(capsys, str(world.files[name]))
        assert card["fields"]["signed"] is signed
        assert card["fields"]["card_id"] == _card().card_id
        assert card["fields"]["feature_names"] == ["income", "tenure"]
        assert card["fields"]["kid"] == (world.issuer.kid.hex() if signed else None)


# -- stdin --------------------------------------------------------------------------------------

def _qrpay(*args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "qrpay", "inspect", *args], input=data,
                          capture_output=True, timeout=60)


@pytest.mark.parametrize("name", ["token.txt", "token.bin", "batch.msgpack",
                                  "statement.msgpack", "card.json"])
def test_dash_reads_stdin(world: World, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, from_file = run_json(capsys, str(world.files[name]))
    done = _qrpay("-", "--json", data=world.files[name].read_bytes())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == from_file


def test_dash_with_trust_and_a_refusal(world: World) -> None:
    issuer_pub = str(world.key_file(world.issuer))
    done = _qrpay("-", "--trust", issuer_pub, "--now", str(NOW + 1),
                  data=world.files["token.txt"].read_bytes())
    assert done.returncode == 0, done.stderr
    assert re.search(rb"^verdict: +OK$", done.stdout, re.M)
    late = _qrpay("-", "--trust", issuer_pub, "--now", str(NOW + 3600),
                  data=world.files["token.txt"].read_bytes())
    assert late.returncode == 1
    assert b"stdin" in late.stderr and b"TOKEN_STALE" in late.stderr
    garbage = _qrpay("-", data=b"\x00\x01not an artefact")
    assert garbage.returncode == 2 and b"not a qrpay artefact" in garbage.stderr
    assert b"Traceback" not in garbage.stderr


# -- verdicts that fail -------------------------------------------------------------------------

def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _refused(capsys: pytest.CaptureFixture[str], target: str, *args: str) -> dict[str, Any]:
    code, document = run_json(capsys, target, *args)
    assert code == 1, document
    verdict = document["verdict"]
    assert verdict["ok"] is False
    return dict(verdict)


def test_tampered_tokens_fail_with_their_reason(world: World,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    trust = ["--trust", world.pub(world.issuer), "--now", str(NOW + 1)]
    cases = {
        "BAD_DEVICE_SIGNATURE": _flip(world.token, 203),     # the device signature
        "BAD_ISSUER_SIGNATURE": _flip(world.token, 100),     # the issuer signature
    }
    for reason, token in cases.items():
        verdict = _refused(capsys, encode_text(token), *trust)
        assert verdict["reason"] == reason
        # Decoded all the same, and the human form says it too, exit 1.
        code, out, err = run(capsys, encode_text(token), *trust)
        assert code == 1
        assert re.search(rf"^verdict: +REFUSED$", out, re.M)
        assert re.search(rf"^reason: +{reason}$", out, re.M)
        assert f"({reason})" in err
    stale = _refused(capsys, str(world.files["token.txt"]), "--trust", world.pub(world.issuer),
                     "--now", "2027-01-15T09:00:00Z")
    assert stale["reason"] == "TOKEN_STALE" and stale["now"] == NOW + 3600
    assert NOW_ISO in stale["message"]
    other = IssuerKey.generate()
    unknown = _refused(capsys, str(world.files["token.txt"]), "--trust", other.public.to_text(),
                       "--now", str(NOW))
    assert unknown["reason"] == "UNKNOWN_KID"


def test_credential_windows(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    trust = ["--trust", world.pub(world.issuer)]
    expired = _refused(capsys, str(world.files["cred.txt"]), *trust,
                       "--now", str(NOW + 31 * DAY))
    assert expired["reason"] == "CREDENTIAL_EXPIRED"
    early = _refused(capsys, str(world.files["cred.bin"]), *trust, "--now", str(NOW - DAY))
    assert early["reason"] == "CREDENTIAL_NOT_YET_VALID"
    forged = _refused(capsys, _write(world, "forged.bin", _flip(world.credential.raw, 70)),
                      *trust, "--now", str(NOW))
    assert forged["reason"] == "BAD_ISSUER_SIGNATURE"


def _write(world: World, name: str, data: bytes) -> str:
    path = world.dir / name
    path.write_bytes(data)
    return str(path)


def test_tampered_documents_fail(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [("batch.msgpack", ["gateway"], "BAD_SIGNATURE"),
             ("deny.msgpack", ["issuer"], "BAD_SIGNATURE"),
             ("delta.msgpack", ["issuer"], "BAD_SIGNATURE"),
             ("bundle.msgpack", ["root"], "BAD_SIGNATURE"),
             ("card.signed", ["issuer"], "BAD_SIGNATURE"),
             ("statement.msgpack", ["settlement"], "BAD_SIGNATURE")]
    for name, roles, reason in cases:
        data = world.files[name].read_bytes()
        tampered = _write(world, f"tampered-{name}", _flip(data, len(data) - 1))   # signature
        code, document = run_json(capsys, tampered)     # still decodes: 0 without --trust
        assert code == 0, name
        verdict = _refused(capsys, tampered, *trust_args(world, roles))
        assert verdict["reason"] == reason, (name, verdict)


def test_documents_checked_with_the_wrong_key(world: World,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    stranger = GatewayKey.generate().public.to_text()
    verdict = _refused(capsys, str(world.files["batch.msgpack"]), "--trust", stranger)
    assert verdict["reason"] == "UNKNOWN_GATEWAY"
    other = SettlementKey.generate().public.to_text()
    verdict = _refused(capsys, str(world.files["statement.msgpack"]), "--trust", other)
    assert verdict["reason"] == "UNKNOWN_KID" and world.settlement.kid.hex() in verdict["message"]
    verdict = _refused(capsys, str(world.files["bundle.msgpack"]),
                       "--trust", RootKey.generate().public.to_text())
    assert verdict["reason"] == "UNKNOWN_KID" and world.root.kid.hex() in verdict["message"]
    # With the right key among others, the right one is used.
    code, document = run_json(capsys, str(world.files["statement.msgpack"]), "--trust", other,
                              "--trust", world.pub(world.settlement))
    assert code == 0
    assert document["verdict"]["keys"] == [f"settlement {world.settlement.kid.hex()}"]
    other_issuer = IssuerKey.generate().public.to_text()
    assert _refused(capsys, str(world.files["deny.msgpack"]),
                    "--trust", other_issuer)["reason"] == "UNKNOWN_KID"


def test_batch_records_are_verified_with_issuer_keys(world: World,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Signed by the gateway given, but its token's issuer is not trusted here.
    gateway = ["--trust", world.pub(world.gateway)]
    code, document = run_json(capsys, str(world.files["batch.msgpack"]), *gateway)
    assert code == 0 and "issuer keys too" in document["verdict"]["checked"]
    verdict = _refused(capsys, str(world.files["batch.msgpack"]), *gateway,
                       "--trust", IssuerKey.generate().public.to_text())
    assert verdict["reason"] == "UNKNOWN_KID" and "1 of 1 records" in verdict["message"]
    code, document = run_json(capsys, str(world.files["batch.msgpack"]), *gateway,
                              "--trust", IssuerKey.generate().public.to_text())
    assert document["fields"]["records"][0]["reason"] == "UNKNOWN_KID"
    # A batch re-signed by the gateway with a forged token inside: the
    # gateway's signature is good, the token's is not.
    record = [1, _flip(world.token, 203), 200, 0, NOW + 5]
    forged = sign_document(world.gateway, TAG_BATCH, {
        "v": 1, "gateway": world.gateway.public.to_bytes(), "seq": 2, "first": 1, "last": 1,
        "created_at": NOW + 10, "records": [record]})
    verdict = _refused(capsys, _write(world, "forged.msgpack", forged), *gateway,
                       "--trust", world.pub(world.issuer))
    assert verdict["reason"] == "BAD_DEVICE_SIGNATURE"


# -- bad input: exit 2, never a traceback -------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"", b"hello\n", b"\x00" * 57, bytes(range(256)), b'{"not": "a card"}',
    b"QP:not base45!", b"qrpay:credential:AAAA", b"qrpay:issuer-public:short",
    b"qrpay:gateway-secret:not!base64", b"\x92\xc4\x01x\xc4\x01y",
])
def test_garbage_exits_2_with_a_clear_message(world: World, data: bytes,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(world, "garbage", data)
    code, out, err = run(capsys, path)
    assert code == 2 and out == ""
    assert err.startswith("qrpay: error: ") and "Traceback" not in err
    assert re.search(r"not a (qrpay artefact|valid [a-z -]+):", err) or "not a qrpay" in err


def test_the_message_names_what_it_tried(world: World,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, _write(world, "garbage", b"hello"))
    assert code == 2
    for tried in ("token", "credential", "key", "scorecard", "batch", "deny list",
                  "trust bundle", "statement"):
        assert tried in err
    # An unknown signed document says which fields it has.
    unknown = sign_document(world.issuer, b"x" * 16, {"v": 1, "what": 2})
    code, _, err = run(capsys, _write(world, "unknown", unknown))
    assert code == 2 and "fields v, what" in err


def test_kind_forces_the_reading(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, str(world.files["token.txt"]), "--kind", "credential")
    assert code == 2 and "not a valid credential" in err and out == ""
    code, out, err = run(capsys, str(world.files["deny.msgpack"]), "--kind", "batch")
    assert code == 2 and "not a valid batch" in err
    code, document = run_json(capsys, str(world.files["deny.msgpack"]), "--kind", "deny-list")
    assert code == 0 and document["kind"] == "deny-list"
    truncated = _write(world, "short", world.files["batch.msgpack"].read_bytes()[:-10])
    code, _, err = run(capsys, truncated, "--kind", "batch")
    assert code == 2 and "not a valid batch" in err and "MALFORMED_MESSAGE" in err


def test_trust_misuse_exits_2(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing to verify in a key or a card's JSON.
    for name in ("gateway.pub", "card.json"):
        code, out, err = run(capsys, str(world.files[name]), "--trust", world.pub(world.issuer))
        assert code == 2 and "not signed" in err and out == ""
    # A key of a role the kind is not verified with.
    code, _, err = run(capsys, str(world.files["statement.msgpack"]),
                       "--trust", world.pub(world.issuer))
    assert code == 2 and "settlement public key" in err
    for bad in ("no-such-file.pub", "qrpay:issuer-public:bad", str(world.files["card.json"])):
        code, _, err = run(capsys, str(world.files["token.txt"]), "--trust", bad)
        assert code == 2 and "Traceback" not in err, bad


def test_missing_file_and_directory_exit_2(world: World,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, str(world.dir / "nope.msgpack"))
    assert code == 2 and "no such file" in err
    code, _, err = run(capsys, str(world.dir))
    assert code == 2 and "directory" in err


# -- secrets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["issuer", "device", "gateway", "settlement", "root"])
def test_a_secret_key_is_never_printed(tmp_path: Path, role: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"{role}.key"
    assert cli.main(["keys", "new", role, "--out", str(path)]) == 0
    public_text = capsys.readouterr().out.strip()
    secret_text = path.read_text().strip()
    secret_body = secret_text.rpartition(":")[2]
    outputs = []
    for extra in ([], ["--json"], ["--kind", "key"]):
        code, out, err = run(capsys, str(path), *extra)
        assert code == 0
        outputs.append(out + err)
    code, document = run_json(capsys, str(path))
    assert document["fields"]["secret"] is True
    assert document["fields"]["public_key"] == public_text
    # The secret given where a public key belongs: refused, not echoed.
    for value in (str(path), secret_text):
        code, out, err = run(capsys, str(tmp_path / "none"), "--trust", value)
        assert code == 2 and "SECRET" in err
        outputs.append(out + err)
    done = _qrpay("-", data=secret_text.encode())
    assert done.returncode == 0
    outputs.append((done.stdout + done.stderr).decode())
    # A damaged secret key: an error that does not show what it read.
    damaged = secret_text[:-3] + "!!!"
    code, out, err = run(capsys, damaged)
    assert code == 2
    outputs.append(out + err)
    for text in outputs:
        assert secret_body not in text and secret_body[:12] not in text
        assert damaged.rpartition(":")[2] not in text


def test_help_lists_the_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["inspect", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for kind in ("token", "credential", "key", "batch", "deny-list", "deny-delta",
                 "trust-bundle", "scorecard", "statement"):
        assert re.search(rf"^  {kind} +\S", out, re.M), kind
    assert "--trust" in out and "--now" in out and "--kind" in out
