"""`qrpay inspect FILE|TEXT`: decode any qrpay artefact and print its fields;
with `--trust KEY` also verify it offline and print the verdict with its
reason (docs/INSPECT.md).

Decoding never needs a key, and so never vouches for anything: the fields of
a signed document are shown as it states them. The verdict is what `--trust`
adds. Decoding goes through the library's own readers (qrpay.qr, Credential,
the keys' text forms, qrpay.wire and each module's field table); verifying
goes through the same calls a gateway, settlement or an operator make.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qrpay import clearing, cli, denylist, settlement, trustbundle
from qrpay.cli_output import emit, iso
from qrpay.credential import Credential, Scene
from qrpay.denylist import DenyDelta, DenyList
from qrpay.errors import (
    CredentialExpired, CredentialNotValid, CredentialNotYetValid, InvalidKey, MalformedMessage,
    MalformedToken, QrPayError, Reason, TokenNotFresh, UnknownGateway, UnknownKeyId, WrongLength,
    raise_for,
)
from qrpay.format import (
    CRED_LEN, KID_LEN, TAG_BATCH, TOKEN_DTYPE, TOKEN_FIELDS_STRUCT, TOKEN_LEN, U32_MAX,
    U64_MAX, VERSION,
)
from qrpay.keys import (
    DevicePublicKey, GatewayPublicKey, IssuerPublicKey, PublicKey, RootPublicKey,
    SettlementPublicKey, SigningKey,
)
from qrpay.qr import PREFIX as TOKEN_PREFIX
from qrpay.qr import decode_text
from qrpay.scoring import CARD_FORMAT, SIGNED_CARD_FIELDS, Scorecard
from qrpay.token import DEFAULT_MAX_AGE, DEFAULT_SKEW, verify, verify_batch
from qrpay.trust import Role, TrustStore
from qrpay.wire import MAX_DOCUMENT, body_map, split_document, unpack_strict, verify_document

KINDS: dict[str, str] = {
    "token": "a token: its QP: text, its 204 bytes or a QR image (PNG, JPEG)",
    "credential": "a credential: its qrpay:credential: text or its 131 bytes",
    "key": "a public or secret key's text (of a secret key, only its public key is shown)",
    "batch": "an upload batch (`qrpay export`)",
    "deny-list": "a signed deny list (`qrpay deny-list publish`)",
    "deny-delta": "a signed deny-list delta (from the service, docs/SERVICE.md)",
    "trust-bundle": "a signed trust bundle (`qrpay trust-bundle sign`)",
    "scorecard": "a scorecard: its JSON (`qrpay score fit`) or the signed msgpack card",
    "statement": "an operator's signed statement (`qrpay statement write`)",
}
"""The kinds `--kind` names and detection finds, each with what it reads."""

TIME_FIELDS = frozenset({"issued_at", "not_before", "not_after", "created_at", "from_time",
                         "until", "time", "now"})
"""Fields shown as ISO 8601 in human output (Unix seconds in JSON)."""

_ROLE_PUBLIC: dict[str, type[PublicKey]] = {
    "issuer": IssuerPublicKey, "device": DevicePublicKey, "gateway": GatewayPublicKey,
    "settlement": SettlementPublicKey, "root": RootPublicKey}
_KEY_TEXT = re.compile(r"qrpay:(issuer|device|gateway|settlement|root)-(public|secret):")
# A signed document's kind, by the field names of its body (each module's table).
_DOCUMENTS: tuple[tuple[str, frozenset[str]], ...] = (
    ("batch", frozenset(settlement._BATCH_FIELDS)),
    ("deny-list", frozenset(denylist._FIELDS)),
    ("deny-delta", frozenset(denylist._DELTA_FIELDS)),
    ("trust-bundle", frozenset(trustbundle._FIELDS)),
    ("scorecard", frozenset(SIGNED_CARD_FIELDS)),
    ("statement", frozenset(clearing._STATEMENT_FIELDS)),
)
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_SHOWN_SERIALS = 20   # human output lists this many serials of a deny list, then a count


@dataclass
class _Keys:
    """The --trust keys, by role."""

    keys: list[PublicKey] = field(default_factory=list)

    def of(self, cls: type[PublicKey]) -> list[Any]:
        return [k for k in self.keys if type(k) is cls]

    def issuers(self) -> TrustStore:
        store = TrustStore()
        for key in self.of(IssuerPublicKey):
            # Every role: what inspect asks is whether the key signed it.
            store.add(key, roles=Role.CREDENTIALS | Role.DENY_LIST | Role.SCORECARD)
        return store


@dataclass
class _Verdict:
    """What a check looks at, set before it runs (a refusal still says it)."""

    checked: str = ""
    now: int | None = None
    used: list[PublicKey] = field(default_factory=list)

    def will(self, checked: str, now: int | None, used: Sequence[PublicKey]) -> None:
        self.checked, self.now, self.used = checked, now, list(used)


Check = Callable[[_Keys, int | None, _Verdict], None]


@dataclass
class _Found:
    """A decoded artefact: its fields, and how to verify it."""

    kind: str
    fields: dict[str, Any]
    check: Check | None   # None: nothing in it is signed
    unsigned: str = ""    # why not, for --trust


# -- reading ----------------------------------------------------------------------------------

def _read_input(value: str) -> tuple[bytes, str]:
    """The input's bytes and how to name it in messages: `-` is stdin, a
    value starting with QP: or qrpay: is the artefact's text itself, anything
    else a file."""
    if value == "-":
        return sys.stdin.buffer.read(MAX_DOCUMENT + 1), "stdin"
    if value.strip().startswith((TOKEN_PREFIX, "qrpay:")):
        # surrogateescape: an argument that is not UTF-8 comes back as its bytes.
        return value.strip().encode("utf-8", "surrogateescape"), "the text given"
    path = Path(value)
    try:
        if path.is_dir():
            raise cli.CliError(f"{value} is a directory, not a file")
        with path.open("rb") as handle:
            return handle.read(MAX_DOCUMENT + 1), value
    except FileNotFoundError:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise cli.CliError(f"no such file: {shown} (give a file, - for stdin, or an "
                           "artefact's text starting with QP: or qrpay:)") from None
    except OSError as exc:
        raise cli.CliError(f"cannot read {value}: {exc.strerror or exc}") from None


def _as_text(data: bytes) -> str | None:
    """The input as text (stripped), or None if it is binary."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


def _trust_keys(values: Sequence[str]) -> _Keys:
    keys = _Keys()
    for value in values:
        inline = value.strip().startswith("qrpay:")
        text = cli._text_or_file(value, "trusted public key")
        match = _KEY_TEXT.match(text)
        where = "a --trust value given inline" if inline else f"--trust {value}"
        if match is None:
            raise cli.CliError(f"{where} is not a qrpay public key (qrpay:ROLE-public:...)")
        role, part = match.groups()
        if part == "secret":   # never echoed: it is a secret
            raise cli.CliError(f"{where} holds a {role} SECRET key; --trust takes public keys "
                               "(print one with `qrpay keys public FILE`)")
        keys.keys.append(_ROLE_PUBLIC[role].from_text(text))
    return keys


# -- detecting --------------------------------------------------------------------------------

def _detect(data: bytes) -> str:
    """The kind of artefact `data` looks like; CliError naming what was tried."""
    text = _as_text(data)
    if text is not None:
        if text.startswith(TOKEN_PREFIX):
            return "token"
        if text.startswith("qrpay:credential:"):
            return "credential"
        if _KEY_TEXT.match(text):
            return "key"
        if text.startswith("{"):
            return "scorecard"
    if len(data) == TOKEN_LEN and data[0] == VERSION:
        return "token"
    if len(data) == CRED_LEN and data[0] == VERSION:
        return "credential"
    if data.startswith(_IMAGE_MAGIC):
        return "token"
    seen = ""
    try:
        body, _signature = split_document(data)
        doc = unpack_strict(body, max_array=settlement.MAX_RECORDS_PER_BATCH)
        if isinstance(doc, dict):
            names = frozenset(doc)
            for kind, fields in _DOCUMENTS:
                if names == fields:
                    return kind
            seen = f"; it is a signed document with fields {', '.join(sorted(map(str, doc)))}"
    except MalformedMessage:
        pass
    what = (f"{len(data)} bytes of text" if text is not None else f"{len(data)} bytes")
    if not data:
        what = "empty"
    elif len(data) > MAX_DOCUMENT:
        what = f"over {MAX_DOCUMENT} bytes"
    raise cli.CliError(
        f"not a qrpay artefact ({what}{seen}). Tried: a token (QP: text, {TOKEN_LEN} bytes or "
        f"a QR image), a credential (qrpay:credential: text or {CRED_LEN} bytes), a key "
        "(qrpay:ROLE-public: or qrpay:ROLE-secret: text), a scorecard (JSON) and the signed "
        "msgpack documents (upload batch, deny list, deny-list delta, trust bundle, signed "
        "scorecard, operator statement). Name one with --kind to see why it is not that")


# -- decoding, kind by kind -------------------------------------------------------------------

def _scene_name(value: int) -> str:
    try:
        return Scene(value).name.lower()
    except ValueError:
        return f"unknown({value})"


def _scenes(scenes: frozenset[Scene]) -> list[str]:
    return [s.name.lower() for s in sorted(scenes)]


def _public_text(cls: type[PublicKey], raw: bytes) -> str:
    """A public key's text form; hex when the bytes are no valid key (a
    document not yet verified can say anything)."""
    try:
        return cls(raw).to_text()
    except InvalidKey:
        return f"invalid:{bytes(raw).hex()}"


def _credential_fields(credential: Credential) -> dict[str, Any]:
    return {"kid": credential.kid.hex(), "account": credential.account,
            "serial": credential.serial, "limit": credential.limit,
            "scenes": _scenes(credential.scenes), "not_before": credential.not_before,
            "not_after": credential.not_after,
            "device_key": _public_text(DevicePublicKey, credential.device_key)}


def _token_bytes(data: bytes) -> tuple[bytes, str]:
    text = _as_text(data)
    if text is not None and text.startswith(TOKEN_PREFIX):
        return decode_text(text), "text"
    if data.startswith(_IMAGE_MAGIC):
        from qrpay import qrimage   # the qr extra; loaded only for an image
        found = qrimage.decode_image(data)
        if not found:
            raise MalformedToken("no QR code found in the image")
        return found[0], "qr-image"
    return data, "bytes"


def _when(reason: Reason, credential: Credential, issued_at: int, at: int) -> str:
    """A time check's refusal with the times it compared."""
    said = {
        Reason.CREDENTIAL_NOT_YET_VALID: f"the credential is valid from "
                                         f"{iso(credential.not_before)}",
        Reason.CREDENTIAL_EXPIRED: f"the credential expired at {iso(credential.not_after)}",
        Reason.TOKEN_STALE: f"the token was made at {iso(issued_at)}, over {DEFAULT_MAX_AGE} s "
                            f"(+{DEFAULT_SKEW} s skew) before the check",
        Reason.TOKEN_FROM_FUTURE: f"the token was made at {iso(issued_at)}, over "
                                  f"{DEFAULT_SKEW} s after the check",
    }[reason]
    return f"{said}; checked at {iso(at)} (--now sets the time)"


def _decode_token(data: bytes) -> _Found:
    raw, form = _token_bytes(data)
    if len(raw) != TOKEN_LEN:
        raise WrongLength(f"a token is {TOKEN_LEN} bytes, not {len(raw)}")
    try:
        credential = Credential.from_bytes(raw[:CRED_LEN])
    except QrPayError as exc:
        raise MalformedToken(f"its credential: {exc}") from None
    issued_at, counter, scene = TOKEN_FIELDS_STRUCT.unpack_from(raw, CRED_LEN)
    fields = {"form": form, "version": VERSION, **_credential_fields(credential),
              "issued_at": issued_at, "counter": counter, "scene": _scene_name(scene)}

    def check(keys: _Keys, now: int | None, verdict: _Verdict) -> None:
        trust, at = _need(keys, IssuerPublicKey, "token", "issuer"), cli._at(now)
        verdict.will("issuer key and signature, device signature, credential window, "
                     f"freshness ({DEFAULT_MAX_AGE} s, {DEFAULT_SKEW} s skew), scene", at,
                     keys.of(IssuerPublicKey))
        try:
            verify(raw, trust, at)
        except (CredentialNotValid, TokenNotFresh) as exc:
            raise type(exc)(_when(exc.reason, credential, issued_at, at)) from None
    return _Found("token", fields, check)


def _decode_credential(data: bytes) -> _Found:
    text = _as_text(data)
    if text is not None and text.startswith("qrpay:"):
        credential, form = Credential.from_text(text), "text"
    else:
        credential, form = Credential.from_bytes(data), "bytes"
    fields = {"form": form, "version": VERSION, **_credential_fields(credential)}

    def check(keys: _Keys, now: int | None, verdict: _Verdict) -> None:
        trust, at = _need(keys, IssuerPublicKey, "credential", "issuer"), cli._at(now)
        verdict.will("issuer key and signature, credential window", at,
                     keys.of(IssuerPublicKey))
        trust.verify_credential(credential, at)
        if at < credential.not_before:
            raise CredentialNotYetValid(_when(Reason.CREDENTIAL_NOT_YET_VALID, credential, 0, at))
        if at > credential.not_after:
            raise CredentialExpired(_when(Reason.CREDENTIAL_EXPIRED, credential, 0, at))
    return _Found("credential", fields, check)


def _decode_key(data: bytes) -> _Found:
    text = _as_text(data) or ""
    match = _KEY_TEXT.match(text)
    if match is None:
        raise InvalidKey("a key's text is qrpay:ROLE-public:... or qrpay:ROLE-secret:..., "
                         "ROLE one of " + ", ".join(_ROLE_PUBLIC))
    role, part = match.groups()
    public: PublicKey
    if part == "secret":
        secret: SigningKey = cli.ROLES[role].from_secret_text(text)
        public = secret._public   # the secret itself is never shown
    else:
        public = _ROLE_PUBLIC[role].from_text(text)
    fields = {"role": role, "secret": part == "secret", "public_key": public.to_text(),
              "kid": public.kid.hex(),
              "gateway_id": public.gateway_id if isinstance(public, GatewayPublicKey) else None}
    return _Found("key", fields, None, "a key is not signed: there is nothing in it to verify")


def _document(data: bytes, fields: dict[str, type | tuple[type, ...]], what: str,
              **limits: int) -> tuple[bytes, bytes, dict[str, Any]]:
    body, signature = split_document(data)
    doc = body_map(body, fields, **limits)
    if doc["v"] != 1:
        raise MalformedMessage(f"unsupported {what} format {doc['v']}")
    return body, signature, doc


def _decode_batch(data: bytes) -> _Found:
    # As settlement reads one (Settlement.ingest), without a registered gateway.
    body, signature, doc = _document(data, settlement._BATCH_FIELDS, "batch",
                                     max_array=settlement.MAX_RECORDS_PER_BATCH, max_bin=4096)
    for name in ("seq", "first", "last", "created_at"):
        if not 0 <= doc[name] < 2**53:
            raise MalformedMessage(f"batch {name} out of range")
    records, tokens, lengths = settlement._parse_records(doc["records"], doc["first"],
                                                         doc["last"])
    decoded = tokens.view(TOKEN_DTYPE).reshape(-1)
    rows: list[dict[str, Any]] = []
    for i in range(len(records)):
        token = None
        if lengths[i] == TOKEN_LEN:
            t = decoded[i]
            token = {"kid": int(t["kid"]).to_bytes(KID_LEN, "little").hex(),
                     "account": int(t["account"]), "serial": int(t["serial"]),
                     "counter": int(t["counter"]), "issued_at": int(t["issued_at"]),
                     "scene": _scene_name(int(t["scene"]))}
        rows.append({"record": int(records[i]["record"]), "amount": int(records[i]["amount"]),
                     "scene": _scene_name(int(records[i]["scene"])),
                     "time": int(records[i]["gateway_time"]),
                     "token_length": int(lengths[i]), "token": token, "reason": None})
    gateway = bytes(doc["gateway"])
    try:
        gateway_id: str | None = GatewayPublicKey(gateway).gateway_id
    except InvalidKey:
        gateway_id = None
    fields = {"gateway": _public_text(GatewayPublicKey, gateway), "gateway_id": gateway_id,
              "seq": doc["seq"], "first": doc["first"], "last": doc["last"],
              "created_at": doc["created_at"], "count": len(rows),
              "amount_total": int(records["amount"].sum(dtype=np.int64)), "records": rows}

    def check(keys: _Keys, now: int | None, verdict: _Verdict) -> None:
        given = _need(keys, GatewayPublicKey, "batch", "gateway")
        issuers = keys.of(IssuerPublicKey)
        verdict.will("gateway signature; each token at its scan time (issuer and device "
                     "signatures, windows, freshness, scene)" if issuers else
                     "gateway signature (give issuer keys too to verify each token)",
                     None, [*given, *issuers])
        signer = next((k for k in given if k.to_bytes() == gateway), None)
        if signer is None:
            raise UnknownGateway(f"the batch is signed by gateway {gateway_id}, not by a "
                                 "--trust gateway key")
        verdict.used = [signer, *issuers]
        verify_document(signer, TAG_BATCH, body, signature)
        if not issuers:
            return
        # Every token again, at the time the gateway scanned it, as settlement does.
        checked = verify_batch(tokens, keys.issuers(), records["gateway_time"].astype(np.int64),
                               lengths=lengths)
        reasons = checked.reasons.copy()
        reasons[(reasons == Reason.OK) & (decoded["scene"] != records["scene"])] = \
            Reason.SCENE_MISMATCH
        for row, code in zip(rows, reasons.tolist()):
            row["reason"] = Reason(code).name
        bad = np.flatnonzero(reasons != Reason.OK)
        if len(bad):
            first = rows[int(bad[0])]
            raise_for(int(reasons[bad[0]]),
                      f"{len(bad)} of {len(rows)} records refused; the first is record "
                      f"{first['record']} ({first['reason']})")
    return _Found("batch", fields, check)


def _decode_deny_list(data: bytes) -> _Found:
    _body, _signature, doc = _document(data, denylist._FIELDS, "deny list")
    if len(doc["kid"]) != KID_LEN:
        raise MalformedMessage("deny list kid is 4 bytes")
    if not 0 < doc["version"] <= U64_MAX or not 0 <= doc["issued_at"] <= U32_MAX:
        raise MalformedMessage("deny list version or time out of range")
    serials = denylist._sorted_serials(doc["serials"])
    fields = {"version": doc["version"], "issued_at": doc["issued_at"], "kid": doc["kid"].hex(),
              "count": len(serials), "serials": serials.tolist()}

    def check(keys: _Keys, now: int | None, verdict: _Verdict) -> None:
        trust = _need(keys, IssuerPublicKey, "deny list", "issuer")
        verdict.will("issuer key (deny-list role, window) and signature",
                     doc["issued_at"] if now is None else now, keys.of(IssuerPublicKey))
        DenyList.load(data, trust, now)
    return _Found("deny-list", fields, check)


def _decode_deny_delta(data: bytes) -> _Found:
    # strict=False with no key trusted: read, not verified (the library's own reader).
    delta = DenyDelta.load(data, TrustStore(), strict=False)
    fields = {"from": delta.base, "version": delta.version, "issued_at": delta.issued_at,
              "kid": delta.kid.hex(), "added": delta.added.tolist(),
              "removed": delta.removed.tolist(), "digest": delta.digest.hex()}

    def check(keys: _Keys, now: int | None, verdict: _Verdict) -> None:
        trust = _need(keys, IssuerPublicKey, "deny-list delta", "issuer")
        verdict.will("issuer key (deny-list role, window at issue) and signature",
                     delta.issued_at, keys.of(IssuerPublicKey))
        DenyDelta.load(data, trust)
    return _Found("deny-delta", fields, check)


def _decode_trust_bundle(data: bytes) -> _Found:
    _body, _signature, doc = _document(data, trustbundle._FIELDS, "trust bundle",
                                       max_array=trustbundle.MAX_KEYS)
    keys_shown = []
    for item in doc["keys"]:
        if (not isinstance(item, list) or len(item) != 4 or not isinstance(item[0], bytes)
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item[1:])):
            raise MalformedMessage("a bundle key is [public, not_before, not_after, roles]")
        public, not_before, not_after, roles = item
        keys_shown.append({"key": _public_text(IssuerPublicKey, public),
                           "kid": _kid_of(public), "roles": cli._role_names(Role(roles & 7)),
                           "not_before": not_before, "not_after": not_after})
    fields = {"version": doc["version"], "issued_at": doc["issued_at"],
              "root_kid": bytes(doc["root"]).hex(), "keys": keys_shown}

    def check(keys: _Keys, now: int | None, verdict: _Verdict) -> None:
        roots = _need(keys, RootPublicKey, "trust bundle", "root")
        verdict.will("root key and signature, every key's window and roles", None, roots)
        root = _signer(roots, doc["root"], "trust bundle", "root")
        verdict.used = [root]
        trustbundle.TrustBundle.load(data, root)
    return _Found("trust-bundle", fields, check)


def _kid_of(public: bytes) -> str | None:
    try:
        return IssuerPublicKey(public).kid.hex()
    except InvalidKey:
        return None


def _card_fields(card: Scorecard, signed: bool, kid: str | None) -> dict[str, Any]:
    return {"signed": signed, "kid": kid, "card_id": card.card_id, "version": card.version,
            "base_points": card.base_points, "scaling": dict(card.scaling),
            "feature_names": list(card.feature_names),
            "features": [{"name": f.name, "bins": len(f.points), "edges": list(f.edges),
                          "points": list(f.points), "missing_points": f.missing_points,
                          "specials": [[c, p] for c, p in f.specials], "iv": f.iv,
                          "trend": f.trend} for f in card.features]}


def _decode_scorecard(data: bytes) -> _Found:
    text = _as_text(data)
    if text is not None and text.startswith("{"):
        card = Scorecard.from_json(text)
        return _Found("scorecard", _card_fields(card, False, None), None,
                      "a scorecard's JSON is not signed; its signed form (Scorecard.sign) is")
    _body, _signature, doc = _document(data, SIGNED_CARD_FIELDS, "signed card",
                                       max_bin=16 * 1024 * 1024)
    if doc["v"] != CARD_FORMAT:
        raise MalformedMessage(f"unsupported signed card format {doc['v']}")
    try:
        card = Scorecard.from_json(doc["card"].decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedMessage("the signed card is not UTF-8 JSON") from None

    def check(keys: _Keys, now: int | None, verdict: _Verdict) -> None:
        trust = _need(keys, IssuerPublicKey, "signed scorecard", "issuer")
        verdict.will("issuer key (scorecard role) and signature", None,
                     keys.of(IssuerPublicKey))
        Scorecard.load_signed(data, trust)
    return _Found("scorecard", _card_fields(card, True, bytes(doc["kid"]).hex()), check)


def _decode_statement(data: bytes) -> _Found:
    _body, _signature, doc = _document(
        data, clearing._STATEMENT_FIELDS, "statement", max_array=max(len(Scene), 8),
        max_map=len(clearing._STATEMENT_FIELDS), max_str=64, max_bin=KID_LEN)
    lines = []
    for raw in doc["lines"]:
        if (not isinstance(raw, list) or len(raw) != 8
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)):
            raise MalformedMessage("a statement line is 8 integers")
        lines.append(dict(zip(("scene", *clearing.CSV_COLUMNS[1:]),
                              (_scene_name(raw[0]), *raw[1:]))))
    names = ("period", "operator", "from_time", "until", "schedule_version", "issued_at")
    fields = {**{name: doc[name] for name in names}, "kid": bytes(doc["kid"]).hex(),
              **{name: doc[name] for name in ("gross", "fee", "net", "flagged_count",
                                              "flagged_amount")},
              "count": sum(line["count"] for line in lines), "lines": lines}

    def check(keys: _Keys, now: int | None, verdict: _Verdict) -> None:
        given = _need(keys, SettlementPublicKey, "statement", "settlement")
        verdict.will("settlement signature, every field's range, the sums", None, given)
        public = _signer(given, doc["kid"], "statement", "settlement")
        verdict.used = [public]
        clearing.verify_statement(data, public)
    return _Found("statement", fields, check)


_DECODERS: dict[str, Callable[[bytes], _Found]] = {
    "token": _decode_token, "credential": _decode_credential, "key": _decode_key,
    "batch": _decode_batch, "deny-list": _decode_deny_list, "deny-delta": _decode_deny_delta,
    "trust-bundle": _decode_trust_bundle, "scorecard": _decode_scorecard,
    "statement": _decode_statement,
}
assert list(_DECODERS) == list(KINDS)


def _need(keys: _Keys, cls: type[PublicKey], what: str, role: str) -> Any:
    """The --trust keys of the role `what` is verified with; CliError when
    none was given (a store for issuer keys, a list for the others)."""
    found = keys.of(cls)
    if not found:
        given = sorted({type(k).role for k in keys.keys})
        raise cli.CliError(f"a {what} is verified with {'an' if role[0] in 'aeiou' else 'a'} "
                           f"{role} public key: give --trust qrpay:{role}-public:... (text or "
                           f"a file); --trust gave {', '.join(given)} keys only")
    return keys.issuers() if cls is IssuerPublicKey else found


def _signer(given: list[Any], kid: bytes, what: str, role: str) -> Any:
    """The --trust key whose kid the document names; UnknownKeyId (as a
    token or deny list of an issuer not trusted) when none has it."""
    found = next((k for k in given if k.kid == kid), None)
    if found is None:
        raise UnknownKeyId(f"the {what} names {role} key {bytes(kid).hex()}; --trust gave "
                           f"{', '.join(k.kid.hex() for k in given)}")
    return found


def decode(data: bytes, kind: str | None = None) -> _Found:
    """The artefact in `data` (of `kind`, or detected); CliError if it is
    none, or not a valid one of the kind it looks like."""
    if len(data) > MAX_DOCUMENT:
        raise cli.CliError(f"over {MAX_DOCUMENT} bytes: larger than any qrpay artefact")
    kind = kind or _detect(data)
    try:
        return _DECODERS[kind](data)
    except QrPayError as exc:
        raise cli.CliError(f"not a valid {kind.replace('-', ' ')}: {exc} "
                           f"({exc.reason.name})") from None


# -- output -----------------------------------------------------------------------------------

def _shown(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and name.rpartition(".")[2] in TIME_FIELDS and (
            0 <= value <= U32_MAX):
        return iso(value)
    if isinstance(value, dict):
        return " ".join(f"{k}={_shown(k, v)}" for k, v in _flat(value).items())
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value) and len(value) > _SHOWN_SERIALS:
            head = ", ".join(map(str, value[:_SHOWN_SERIALS]))
            return f"{head}, ... ({len(value)} in all)"
        return ", ".join(_shown(name, v) for v in value) if value else "(none)"
    return str(value)


def _flat(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A record's token and other nested fields as token.account=..."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(_flat(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def _human(document: dict[str, Any]) -> str:
    """Aligned `field: value` lines; a list of records, keys or lines is one
    indented line per item."""
    rows: list[tuple[str, str]] = [("kind", document["kind"])]
    items: dict[str, list[dict[str, Any]]] = {}
    for name, value in document["fields"].items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items[name] = value
        else:
            rows.append((name, _shown(name, value)))
    verdict = document.get("verdict")
    if verdict is not None:
        rows += [("verdict", "OK" if verdict["ok"] else "REFUSED"),
                 ("reason", verdict["reason"]), ("message", verdict["message"]),
                 ("checked", verdict["checked"]), ("now", _shown("now", verdict["now"])),
                 ("trusted", ", ".join(verdict["keys"]))]
    width = max(len(name) for name, _ in rows) + 1
    lines = [f"{name + ':':<{width}} {value}" for name, value in rows]
    for name, values in items.items():
        lines.append(f"{name} ({len(values)}):")
        lines += [f"  - {_shown(name, item)}" for item in values]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    keys = _trust_keys(args.trust or [])   # bad keys first: before any output
    data, source = _read_input(args.input)
    found = decode(data, args.kind)
    document: dict[str, Any] = {"kind": found.kind, "fields": found.fields}
    refused: QrPayError | None = None
    if keys.keys:
        if found.check is None:
            raise cli.CliError(f"--trust: {found.unsigned}")
        verdict = _Verdict()
        try:
            found.check(keys, args.now, verdict)
        except QrPayError as exc:
            refused = exc
        document["verdict"] = {
            "ok": refused is None,
            "reason": Reason.OK.name if refused is None else refused.reason.name,
            "message": "verified" if refused is None else str(refused),
            "checked": verdict.checked, "now": verdict.now,
            "keys": [f"{type(k).role} {k.kid.hex()}" for k in verdict.used]}
    emit(args, document, lambda: print(_human(document)))
    if refused is not None:
        print(f"qrpay: refused: {source}: {refused} ({refused.reason.name})", file=sys.stderr)
        return cli.EXIT_REFUSED
    return cli.EXIT_OK


def add_parsers(commands: argparse._SubParsersAction) -> None:   # type: ignore[type-arg]
    kinds = "\n".join(f"  {name:<13} {what}" for name, what in KINDS.items())
    p = commands.add_parser(
        "inspect", help="decode any qrpay artefact and print its fields; verify it with --trust",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Decode a token, credential, key, upload batch, deny list, deny-list "
                    "delta, trust bundle, scorecard or operator statement and print its "
                    "fields (docs/INSPECT.md). The kind is detected, or named with --kind. "
                    "Decoding checks no signature: with --trust the artefact is also verified "
                    "offline and the verdict printed with its reason (OK, "
                    "BAD_DEVICE_SIGNATURE, CREDENTIAL_EXPIRED, ...). A secret key shows only "
                    "its role and its public key.",
        # Starts with "example": kept as written (cli._Help), so the kinds stay a table.
        epilog="examples:\n"
               "  qrpay inspect token.txt\n"
               "  qrpay inspect 'QP:...' --trust issuer.pub --now 2027-01-15T08:00:05Z\n"
               "  qrpay inspect batch-1.qrb --trust gateway.pub --trust issuer.pub --json\n"
               "  qrpay keys new issuer --out issuer.key | qrpay inspect -\n\n"
               f"kinds (--kind):\n{kinds}\n\n"
               "exit codes: 0 decoded (and verified, with --trust); 1 the verification\n"
               "failed (the verdict says why); 2 not a qrpay artefact, or not a valid one\n"
               "of the kind it looks like")
    p.add_argument("input", metavar="FILE|TEXT",
                   help="a file, - for stdin, or the artefact's text itself (QP:..., "
                        "qrpay:...)")
    p.add_argument("--kind", choices=list(KINDS), metavar="KIND",
                   help="read the input as this kind instead of detecting it (kinds: below); "
                        "its error says why it is not one")
    p.add_argument("--trust", action="append", metavar="KEY",
                   help="a public key to verify with (text, or a file holding it); "
                        "repeatable: issuer keys for tokens, credentials, deny lists and "
                        "signed scorecards; the gateway key (and issuer keys, to check each "
                        "token) for a batch; the root key for a trust bundle; the settlement "
                        "key for a statement")
    p.add_argument("--now", type=cli._TIME,
                   help="the time to verify at (default: the clock; for a deny list, its "
                        "issue time)")
    p.set_defaults(run=cmd_inspect)
