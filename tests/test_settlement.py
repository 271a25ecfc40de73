"""Settlement: idempotent ingest (applied / exists / conflict), every way a batch
is rejected whole, re-verification of what a compromised gateway signed, the
fraud findings, repayments and deny-list publishing. (Random sequences against
a model: test_settlement_stateful.py; kill during ingest: test_settlement_crash.py.)"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, strategies as st

from qrpay import (
    DEFAULT_MAX_AGE, DEFAULT_SKEW, Credential, DeviceKey, GatewayKey, IssuerKey, Role, Scene,
    TrustStore, errors,
)
from qrpay._impl import core
from qrpay.denylist import DenyList
from qrpay.format import CRED_KID, TAG_BATCH, TAG_DENY, TOKEN_DEVICE_SIG
from qrpay.gateway import Gateway, GatewayPolicy
from qrpay.settlement import (
    MAX_RECORDS_PER_BATCH, IngestStatus, Settlement,
)
from qrpay.storedb import StoreDatabase
from qrpay.wire import pack, sign_document, split_document, unpack_strict
from stores import open_settlement

pytestmark = pytest.mark.usefixtures("each_store")

NOW = 1_800_000_000
PERMISSIVE = GatewayPolicy(deny_list_max_age=None, max_offline_uses=10_000)


# -- fixtures and helpers ---------------------------------------------------------------

@pytest.fixture
def gw_keys() -> list[GatewayKey]:
    return [GatewayKey(bytes([100 + i]) * 32) for i in range(3)]


@pytest.fixture
def settlement(tmp_path: Path, deny_trust: TrustStore, gw_keys: list[GatewayKey]
               ) -> Iterator[Settlement]:
    s = open_settlement(tmp_path / "settle", deny_trust, [k.public for k in gw_keys])
    yield s
    s.close()


@pytest.fixture
def gateways(tmp_path: Path, deny_trust: TrustStore, gw_keys: list[GatewayKey]
             ) -> Iterator[list[Gateway]]:
    gws = [Gateway(tmp_path / f"gw{i}", k, deny_trust, PERMISSIVE) for i, k in enumerate(gw_keys)]
    yield gws
    for gw in gws:
        gw.close()


@dataclass
class Rider:
    credential: Credential
    device: DeviceKey

    @property
    def serial(self) -> int:
        return self.credential.serial

    @property
    def account(self) -> int:
        return self.credential.account

    def token(self, issued_at: int, counter: int, scene: Scene = Scene.BUS) -> bytes:
        return core.make_token(self.credential.raw, self.device._secret, issued_at, counter,
                               int(scene))


def make_rider(issuer: IssuerKey, n: int, limit: int = 100_000) -> Rider:
    device = DeviceKey(bytes([n]) * 32)
    cred = issuer.issue(account=5000 + n, device_public=device.public, limit=limit,
                        scenes=[Scene.BUS, Scene.METRO, Scene.CLINIC],
                        not_before=NOW - 86_400, not_after=NOW + 30 * 86_400, serial=n)
    return Rider(cred, device)


@pytest.fixture
def riders(issuer: IssuerKey) -> list[Rider]:
    return [make_rider(issuer, 11 + i) for i in range(4)]


def batch_body(key: GatewayKey, seq: int, first: int,
               records: Sequence[tuple[bytes, int, int, int]], /, **overrides: Any
               ) -> dict[str, Any]:
    """A batch body; `records` are (token, amount, scene, gateway_time), numbered from `first`."""
    body: dict[str, Any] = {
        "v": 1, "gateway": key.public.to_bytes(), "seq": seq, "first": first,
        "last": first + len(records) - 1, "created_at": NOW,
        "records": [[first + i, t, a, int(sc), at] for i, (t, a, sc, at) in enumerate(records)],
    }
    body.update(overrides)
    return body


def craft(key: GatewayKey, seq: int, first: int,
          records: Sequence[tuple[bytes, int, int, int]], /, **overrides: Any) -> bytes:
    return sign_document(key, TAG_BATCH, batch_body(key, seq, first, records, **overrides))


def signed_raw(key: GatewayKey, body: bytes) -> bytes:
    """A document around hand-packed body bytes, correctly signed."""
    return pack([body, key._sign(TAG_BATCH, body)])


def snapshot(s: Settlement) -> tuple[Any, ...]:
    r = s.report()
    return (r.accounts.tolist(), r.amounts.tolist(), r.counts.tolist(), list(r.findings),
            r.records, r.charged_total, r.rejected_total, s.batch_count())


def export(gw: Gateway) -> bytes:
    # A minute after the gateway's last scan: until then its payments were
    # outstanding offline (the overspend rule measures that exposure).
    data = gw.export_batch(now=max(NOW, gw.time_floor) + 60)
    assert data is not None
    return data


def seq_of(data: bytes) -> int:
    return int(unpack_strict(split_document(data)[0])["seq"])


def upload(s: Settlement, gw: Gateway) -> None:
    data = export(gw)
    assert s.ingest(data).status == IngestStatus.APPLIED
    gw.ack(seq_of(data))


# -- applied / exists / conflict ------------------------------------------------------------

def test_gateway_batch_is_applied_once_then_exists(settlement: Settlement,
                                                   gateways: list[Gateway],
                                                   riders: list[Rider]) -> None:
    gw = gateways[0]
    gw.scan(riders[0].token(NOW, 1), 120, Scene.BUS, NOW)
    gw.scan(riders[1].token(NOW, 1), 80, Scene.BUS, NOW + 1)
    gw.scan(riders[0].token(NOW + 2, 2, Scene.METRO), 300, Scene.METRO, NOW + 2)
    data = export(gw)
    result = settlement.ingest(data)
    assert result.status == IngestStatus.APPLIED
    assert (result.gateway, result.seq, result.records, result.invalid) == (gw.id, 1, 3, 0)
    before = snapshot(settlement)
    report = settlement.report()
    assert report.accounts.tolist() == [riders[0].account, riders[1].account]
    assert report.amounts.tolist() == [420, 80] and report.counts.tolist() == [2, 1]
    assert report.findings == [] and report.records == 3
    assert (report.charged_total, report.rejected_total) == (500, 0)
    assert report.charge_of(riders[0].account) == 420 and report.charge_of(12345) == 0

    for _ in range(3):  # retries: nothing changes
        again = settlement.ingest(data)
        assert again.status == IngestStatus.EXISTS
        assert (again.gateway, again.seq, again.records, again.invalid) == (gw.id, 1, 3, 0)
    assert snapshot(settlement) == before


def test_the_store_survives_reopening(tmp_path: Path, settlement: Settlement,
                                      deny_trust: TrustStore, gw_keys: list[GatewayKey],
                                      gateways: list[Gateway], riders: list[Rider]) -> None:
    gateways[0].scan(riders[0].token(NOW, 1), 120, Scene.BUS, NOW)
    data = export(gateways[0])
    settlement.ingest(data)
    before = snapshot(settlement)
    settlement.close()
    reopened = open_settlement(tmp_path / "settle", deny_trust)  # keys persisted
    try:
        assert snapshot(reopened) == before
        assert reopened.ingest(data).status == IngestStatus.EXISTS
    finally:
        reopened.close()


def test_same_seq_other_content_is_a_conflict(settlement: Settlement, gw_keys: list[GatewayKey],
                                              riders: list[Rider]) -> None:
    key = gw_keys[0]
    records = [(riders[0].token(NOW, 1), 100, Scene.BUS, NOW),
               (riders[1].token(NOW, 1), 200, Scene.BUS, NOW)]
    assert settlement.ingest(craft(key, 1, 1, records)).status == IngestStatus.APPLIED
    before = snapshot(settlement)
    tampered = [records[0], (records[1][0], 999, Scene.BUS, NOW)]
    for data in (craft(key, 1, 1, tampered),                         # another amount
                 craft(key, 1, 1, records, created_at=NOW + 1),      # only created_at differs
                 craft(key, 1, 1, records[:1]),                      # fewer records
                 craft(key, 1, 5, [(riders[2].token(NOW, 1), 5, Scene.BUS, NOW)])):
        result = settlement.ingest(data)
        assert result.status == IngestStatus.CONFLICT and result.seq == 1
        assert snapshot(settlement) == before
    # The original is still the one stored.
    assert settlement.ingest(craft(key, 1, 1, records)).status == IngestStatus.EXISTS


def test_overlapping_records_under_another_seq_are_a_conflict(
        settlement: Settlement, gw_keys: list[GatewayKey], riders: list[Rider]) -> None:
    key = gw_keys[0]
    first = [(riders[0].token(NOW, c), 100, Scene.BUS, NOW) for c in (1, 2, 3)]
    assert settlement.ingest(craft(key, 1, 1, first)).status == IngestStatus.APPLIED
    before = snapshot(settlement)
    fresh = (riders[1].token(NOW, 1), 50, Scene.BUS, NOW)
    for seq, start, records in ((2, 1, first),            # the same records again
                                (2, 3, [first[2], fresh]),  # one record number shared
                                (7, 2, [fresh]),            # inside the range
                                (9, 1, first[:1])):
        result = settlement.ingest(craft(key, seq, start, records))
        assert result.status == IngestStatus.CONFLICT, (seq, start)
        assert snapshot(settlement) == before
    # Adjacent numbers are fine, and another gateway may reuse seq and record numbers.
    assert settlement.ingest(craft(key, 2, 4, [fresh])).status == IngestStatus.APPLIED
    assert settlement.ingest(craft(gw_keys[1], 1, 1, first)).status == IngestStatus.APPLIED


# -- batches rejected whole ---------------------------------------------------------------------

@dataclass
class Ctx:
    key: GatewayKey
    token: bytes
    good: bytes

    def body(self, **overrides: Any) -> dict[str, Any]:
        return batch_body(self.key, 1, 1, [(self.token, 100, Scene.BUS, NOW)], **overrides)

    def sign(self, **overrides: Any) -> bytes:
        return sign_document(self.key, TAG_BATCH, self.body(**overrides))

    def with_record(self, record: list[Any]) -> bytes:
        return self.sign(records=[record])

    def hand_packed(self, pairs: list[tuple[Any, Any]]) -> bytes:
        """A map body packed pair by pair, so keys may repeat."""
        out = bytearray(b"\xde" + len(pairs).to_bytes(2, "big"))  # map16
        for k, v in pairs:
            out += pack(k) + pack(v)
        return signed_raw(self.key, bytes(out))


def _trunc(at: float) -> Callable[[Ctx], bytes]:
    return lambda c: c.good[:int(len(c.good) * at)]


MALFORMED: dict[str, Callable[[Ctx], bytes]] = {
    # Not a signed document at all.
    "empty": lambda c: b"",
    "truncated_1_byte": lambda c: c.good[:1],
    "truncated_10pct": _trunc(0.1),
    "truncated_half": _trunc(0.5),
    "truncated_last_byte": lambda c: c.good[:-1],
    "trailing_bytes": lambda c: c.good + b"\x00",
    "invalid_msgpack": lambda c: b"\xc1" * 16,
    "outer_is_a_map": lambda c: pack({"body": split_document(c.good)[0]}),
    "outer_three_items": lambda c: pack([*split_document(c.good), b""]),
    "outer_body_is_str": lambda c: pack(["body", split_document(c.good)[1]]),
    "signature_63_bytes": lambda c: pack([split_document(c.good)[0],
                                          split_document(c.good)[1][:63]]),
    "not_bytes": lambda c: "a string",  # type: ignore[return-value, arg-type]
    # Signed, but the body is not a batch.
    "truncated_body": lambda c: signed_raw(c.key, split_document(c.good)[0][:-7]),
    "body_trailing_bytes": lambda c: signed_raw(c.key, split_document(c.good)[0] + b"\x01"),
    "body_is_a_list": lambda c: signed_raw(c.key, pack([1, 2, 3])),
    "body_is_nil": lambda c: signed_raw(c.key, pack(None)),
    "deeply_nested": lambda c: signed_raw(c.key, b"\x91" * 5000 + b"\x01"),
    "ext_type": lambda c: c.sign(created_at=msgpack.ExtType(1, b"\x00" * 8)),
    "timestamp_ext": lambda c: signed_raw(
        c.key, msgpack.packb({**c.body(), "created_at": msgpack.Timestamp(NOW)})),
    "duplicate_key": lambda c: c.hand_packed([*c.body().items(), ("seq", 2)]),
    "duplicate_key_same_value": lambda c: c.hand_packed([*c.body().items(), ("v", 1)]),
    "integer_key": lambda c: c.hand_packed([*c.body().items(), (7, 1)]),
    "bytes_keys": lambda c: signed_raw(c.key, msgpack.packb(
        {k.encode(): v for k, v in c.body().items()}, use_bin_type=True)),
    # Oversized fields.
    "token_just_over_twice": lambda c: c.with_record([1, c.token * 2 + b"x", 100, 0, NOW]),
    "token_5000_bytes": lambda c: c.with_record([1, b"\x01" * 5000, 100, 0, NOW]),
    "too_many_records": lambda c: c.sign(
        last=MAX_RECORDS_PER_BATCH + 1,
        records=[[i + 1, b"", 1, 0, NOW] for i in range(MAX_RECORDS_PER_BATCH + 1)]),
    "huge_string_key": lambda c: c.sign(**{"k" * 300: 1}),
    "huge_string_value": lambda c: c.sign(gateway="x" * 1000),
    "too_many_keys": lambda c: c.sign(**{f"k{i}": i for i in range(80)}),
    "gateway_key_too_long": lambda c: c.sign(gateway=c.key.public.to_bytes() + b"\x00"),
    "gateway_key_too_short": lambda c: c.sign(gateway=c.key.public.to_bytes()[:31]),
    # Wrong types.
    "seq_is_str": lambda c: c.sign(seq="1"),
    "seq_is_bool": lambda c: c.sign(seq=True),
    "seq_is_float": lambda c: c.sign(seq=1.0),
    "seq_is_nil": lambda c: c.sign(seq=None),
    "v_is_bool": lambda c: c.sign(v=True),
    "first_is_str": lambda c: c.sign(first="1"),
    "last_is_bool": lambda c: c.sign(last=True),
    "created_at_is_str": lambda c: c.sign(created_at=str(NOW)),
    "gateway_is_str": lambda c: c.sign(gateway=c.key.public.to_bytes().hex()),
    "records_is_a_map": lambda c: c.sign(records={"1": 1}),
    "records_is_bytes": lambda c: c.sign(records=b"records"),
    "missing_field": lambda c: sign_document(
        c.key, TAG_BATCH, {k: v for k, v in c.body().items() if k != "created_at"}),
    "extra_field": lambda c: c.sign(note="hello"),
    "record_4_elements": lambda c: c.with_record([1, c.token, 100, 0]),
    "record_6_elements": lambda c: c.with_record([1, c.token, 100, 0, NOW, 0]),
    "record_is_a_map": lambda c: c.with_record({"seq": 1}),  # type: ignore[arg-type]
    "record_is_an_int": lambda c: c.with_record(1),  # type: ignore[arg-type]
    "record_token_is_str": lambda c: c.with_record([1, "QP:token", 100, 0, NOW]),
    "record_seq_is_str": lambda c: c.with_record(["1", c.token, 100, 0, NOW]),
    "record_amount_is_bool": lambda c: c.with_record([1, c.token, True, 0, NOW]),
    "record_amount_is_float": lambda c: c.with_record([1, c.token, 100.0, 0, NOW]),
    "record_scene_is_bool": lambda c: c.with_record([1, c.token, 100, False, NOW]),
    "record_time_is_nil": lambda c: c.with_record([1, c.token, 100, 0, None]),
    # Wrong values.
    "format_version_2": lambda c: c.sign(v=2),
    "format_version_0": lambda c: c.sign(v=0),
    "seq_0": lambda c: c.sign(seq=0),
    "seq_negative": lambda c: c.sign(seq=-1),
    "first_0": lambda c: c.sign(first=0, last=0, records=[[0, c.token, 100, 0, NOW]]),
    "no_records": lambda c: c.sign(records=[], last=0),
    "last_does_not_match": lambda c: c.sign(last=5),
    "record_seq_does_not_match": lambda c: c.with_record([2, c.token, 100, 0, NOW]),
    "amount_0": lambda c: c.with_record([1, c.token, 0, 0, NOW]),
    "amount_negative": lambda c: c.with_record([1, c.token, -100, 0, NOW]),
    "amount_2_32": lambda c: c.with_record([1, c.token, 2**32, 0, NOW]),
    "time_negative": lambda c: c.with_record([1, c.token, 100, 0, -1]),
    "time_2_32": lambda c: c.with_record([1, c.token, 100, 0, 2**32]),
    "scene_unknown": lambda c: c.with_record([1, c.token, 100, 7, NOW]),
    "scene_negative": lambda c: c.with_record([1, c.token, 100, -1, NOW]),
    # Integers msgpack can carry but the store cannot hold (must still be a typed error).
    "seq_2_63": lambda c: c.sign(seq=2**63),
    "seq_u64_max": lambda c: c.sign(seq=2**64 - 1),
    "first_last_2_63": lambda c: c.sign(first=2**63, last=2**63,
                                        records=[[2**63, c.token, 100, 0, NOW]]),
    "created_at_2_63": lambda c: c.sign(created_at=2**63),
    "created_at_u64_max": lambda c: c.sign(created_at=2**64 - 1),
    "created_at_negative": lambda c: c.sign(created_at=-1),
}


@pytest.fixture
def ctx(gw_keys: list[GatewayKey], riders: list[Rider]) -> Ctx:
    token = riders[0].token(NOW, 1)
    return Ctx(gw_keys[0], token, craft(gw_keys[0], 1, 1, [(token, 100, Scene.BUS, NOW)]))


def assert_rejected(s: Settlement, data: bytes, kind: type[errors.QrPayError]) -> None:
    before = snapshot(s)
    with pytest.raises(kind) as info:
        s.ingest(data)
    assert info.value.reason == kind.reason
    assert snapshot(s) == before


def assert_rejected_whole(s: Settlement, data: bytes, kind: type[errors.QrPayError],
                          ctx: Ctx) -> None:
    assert_rejected(s, data, kind)
    # Nothing was half-stored: the genuine batch still goes in as new.
    assert s.ingest(ctx.good).status == IngestStatus.APPLIED


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_batches_are_rejected_whole(settlement: Settlement, ctx: Ctx,
                                              case: str) -> None:
    assert_rejected_whole(settlement, MALFORMED[case](ctx), errors.MalformedMessage, ctx)


def test_bad_signatures_are_rejected_whole(settlement: Settlement, ctx: Ctx,
                                           gw_keys: list[GatewayKey]) -> None:
    body, signature = split_document(ctx.good)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    other_body = pack(ctx.body(created_at=NOW + 1))
    cases = [
        pack([body, flipped]),
        pack([body, bytes(64)]),
        pack([other_body, signature]),                           # the body changed
        pack([body, gw_keys[1]._sign(TAG_BATCH, body)]),          # another gateway's key
        pack([body, ctx.key._sign(TAG_DENY, body)]),             # another document kind
        pack([body, ctx.key._sign(b"", body)]),                  # no domain tag
    ]
    for data in cases:
        assert_rejected(settlement, data, errors.BadSignature)
    assert settlement.ingest(ctx.good).status == IngestStatus.APPLIED


def test_unknown_gateway_is_rejected_whole(settlement: Settlement, ctx: Ctx) -> None:
    stranger = GatewayKey(b"\x55" * 32)
    data = sign_document(stranger, TAG_BATCH, {**ctx.body(),
                                               "gateway": stranger.public.to_bytes()})
    assert_rejected_whole(settlement, data, errors.UnknownGateway, ctx)
    # An unknown key never gets as far as its (bad) signature.
    body = pack({**ctx.body(), "gateway": stranger.public.to_bytes()})
    with pytest.raises(errors.UnknownGateway):
        settlement.ingest(pack([body, bytes(64)]))
    # Registering the key is what lets its batches in.
    settlement.register_gateway(stranger.public)
    assert settlement.ingest(data).status == IngestStatus.APPLIED


_ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, 2, 2**32, 2**63]))
_values = st.one_of(_ints, st.booleans(), st.none(), st.binary(max_size=40),
                    st.text(max_size=10), st.floats(allow_nan=False))


@given(field=st.sampled_from(["v", "gateway", "seq", "first", "last", "created_at",
                              "records", "r.seq", "r.token", "r.amount", "r.scene",
                              "r.time"]),
       value=_values)
def test_any_single_field_value_gives_a_result_or_a_typed_error(
        tmp_path_factory: pytest.TempPathFactory, field: str, value: Any) -> None:
    issuer = IssuerKey(bytes(range(32)))
    trust = TrustStore()
    trust.add(issuer)
    key = GatewayKey(b"\x64" * 32)
    token = make_rider(issuer, 11).token(NOW, 1)
    body = batch_body(key, 1, 1, [(token, 100, Scene.BUS, NOW)])
    if field.startswith("r."):
        position = ["r.seq", "r.token", "r.amount", "r.scene", "r.time"].index(field)
        body["records"][0][position] = value
    else:
        body[field] = value
    s = open_settlement(tmp_path_factory.mktemp("fuzz"), trust, [key.public])
    try:
        before = snapshot(s)
        try:
            result = s.ingest(sign_document(key, TAG_BATCH, body))
        except (errors.MalformedMessage, errors.UnknownGateway):
            assert snapshot(s) == before
        else:
            assert result.status == IngestStatus.APPLIED and s.batch_count() == 1
    finally:
        s.close()


# -- re-verification: a compromised gateway ------------------------------------------------------

def test_invalid_tokens_from_a_compromised_gateway_are_stored_not_charged(
        settlement: Settlement, gw_keys: list[GatewayKey], riders: list[Rider],
        issuer: IssuerKey) -> None:
    key = gw_keys[2]
    rider = riders[0]
    good = rider.token(NOW, 1)
    forged = bytearray(rider.token(NOW, 2))
    forged[TOKEN_DEVICE_SIG + 5] ^= 0x40
    rogue_issuer = IssuerKey(b"\x77" * 32)
    rogue = Rider(rogue_issuer.issue(9, rider.device.public, 10**6, [Scene.BUS], 0, 2**32 - 1,
                                     serial=rider.serial), rider.device)
    records = [
        (good, 100, Scene.BUS, NOW),
        (bytes(forged), 200, Scene.BUS, NOW),                      # forged device signature
        (rider.token(NOW, 3, Scene.METRO), 300, Scene.BUS, NOW),   # made for another scene
        (rider.token(NOW - 1_000, 4), 400, Scene.BUS, NOW),        # stale at its gateway_time
        (rider.token(NOW, 5), 500, Scene.BUS, NOW + 10_000),       # the same, by the gateway time
        (rider.token(NOW + 1_000, 6), 600, Scene.BUS, NOW),        # from the future
        (good[:-1], 700, Scene.BUS, NOW),                          # not a token
    ]
    # A token of an issuer settlement does not trust: the whole batch is
    # refused, not stored with that record invalid (settlement may lack a key
    # the gateway has; stored, the record could never be charged).
    unknown = (rogue.token(NOW, 7), 800, Scene.BUS, NOW)
    with pytest.raises(errors.UnknownKeyId, match=rogue_issuer.kid.hex()):
        settlement.ingest(craft(key, 1, 1, [*records, unknown]))
    assert settlement.batch_count() == 0 and settlement.report().records == 0
    result = settlement.ingest(craft(key, 1, 1, records))
    assert result.status == IngestStatus.APPLIED and (result.records, result.invalid) == (7, 6)
    report = settlement.report()
    assert report.records == 7 and settlement.batch_count() == 1
    assert report.accounts.tolist() == [rider.account] and report.amounts.tolist() == [100]
    assert report.charged_total == 100 and report.rejected_total == sum(range(200, 800, 100))
    invalid = report.of_kind("invalid_token")
    gid = key.public.gateway_id  # the id findings use
    assert [(f.records, f.amount, f.gateways) for f in invalid] == [
        (((gid, n),), 100 * n, (gid,)) for n in range(2, 8)]
    assert [f.detail for f in invalid[:5]] == [
        "BAD_DEVICE_SIGNATURE", "SCENE_MISMATCH", "TOKEN_STALE", "TOKEN_STALE",
        "TOKEN_FROM_FUTURE"]
    assert invalid[-1].detail != "OK"
    assert {f.kind for f in report.findings} == {"invalid_token"}
    assert report.flagged_serials() == set()  # the rider did nothing wrong
    # Retrying changes nothing.
    assert settlement.ingest(craft(key, 1, 1, records)).status == IngestStatus.EXISTS


def test_an_invalid_copy_never_blocks_or_outranks_the_real_token(
        settlement: Settlement, gw_keys: list[GatewayKey], riders: list[Rider]) -> None:
    rider = riders[0]
    real = rider.token(NOW, 1)
    forged = bytearray(real)
    forged[TOKEN_DEVICE_SIG] ^= 1
    settlement.ingest(craft(gw_keys[2], 1, 1, [(bytes(forged), 900, Scene.BUS, NOW)]))
    settlement.ingest(craft(gw_keys[0], 1, 1, [(real, 100, Scene.BUS, NOW)]))
    report = settlement.report()
    assert report.charge_of(rider.account) == 100
    assert [f.kind for f in report.findings] == ["invalid_token"]


def test_invalid_records_do_not_change_whom_an_overspend_names(
        settlement: Settlement, gw_keys: list[GatewayKey], riders: list[Rider],
        issuer: IssuerKey) -> None:
    # A compromised gateway adds a forged token claiming the victim's serial
    # under another account. It is rejected; the overspend finding must still
    # name the account that was charged.
    victim = make_rider(issuer, 40, limit=100)
    rogue_issuer = IssuerKey(b"\x78" * 32)
    fake = Rider(rogue_issuer.issue(999, victim.device.public, 100, [Scene.BUS], 0, 2**32 - 1,
                                    serial=victim.serial), victim.device)
    # Both gateways were offline for ten minutes: 160 outstanding against 100.
    later = {"created_at": NOW + 600}
    settlement.ingest(craft(gw_keys[0], 1, 1, [(victim.token(NOW, 1), 80, Scene.BUS, NOW)],
                            **later))
    settlement.ingest(craft(gw_keys[1], 1, 1, [(victim.token(NOW, 2), 80, Scene.BUS, NOW)],
                            **later))
    # Under the trusted issuer's kid (a kid nobody trusts refuses the batch).
    forged = bytearray(fake.token(NOW, 3))
    forged[CRED_KID:CRED_KID + 4] = issuer.public.kid
    assert settlement.ingest(craft(gw_keys[2], 1, 1, [(bytes(forged), 80, Scene.BUS, NOW)],
                                   **later)).invalid == 1
    report = settlement.report()
    assert report.of_kind("invalid_token")[0].detail == "BAD_ISSUER_SIGNATURE"
    assert report.accounts.tolist() == [victim.account]
    [over] = report.of_kind("overspend")
    assert (over.serial, over.amount) == (victim.serial, 60)
    assert over.account == victim.account


# -- fraud findings ---------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_double_spend_names_both_gateways(settlement: Settlement, gateways: list[Gateway],
                                          riders: list[Rider], order: str) -> None:
    a, b = gateways[0], gateways[1]
    rider = riders[0]
    token = rider.token(NOW, 1)
    ra = a.scan(token, 200, Scene.BUS, NOW)
    rb = b.scan(token, 150, Scene.BUS, NOW + 5)
    uploads = [(a, ra, 200), (b, rb, 150)]
    if order == "b_first":
        uploads.reverse()
    for gw, _r, _amount in uploads:
        upload(settlement, gw)
    (g1, r1, amount1), (g2, r2, amount2) = uploads
    report = settlement.report()
    [found] = report.findings
    assert found.kind == "double_spend"
    assert (found.serial, found.account, found.counter) == (rider.serial, rider.account, 1)
    assert found.gateways == (g1.id, g2.id)
    assert found.records == ((g1.id, r1.record), (g2.id, r2.record))
    assert found.amount == amount2
    # Charged once: the copy that arrived first.
    assert report.charge_of(rider.account) == amount1 and report.counts.tolist() == [1]
    assert (report.charged_total, report.rejected_total) == (amount1, amount2)
    assert report.flagged_serials() == {rider.serial}


def test_the_same_token_twice_from_one_gateway_is_a_duplicate_record(
        settlement: Settlement, gw_keys: list[GatewayKey], riders: list[Rider]) -> None:
    token = riders[0].token(NOW, 1)
    settlement.ingest(craft(gw_keys[0], 1, 1, [(token, 100, Scene.BUS, NOW),
                                               (token, 100, Scene.BUS, NOW + 1)]))
    report = settlement.report()
    [dup] = report.findings
    gid = gw_keys[0].public.gateway_id
    assert dup.kind == "duplicate_record" and dup.records == ((gid, 1), (gid, 2))
    assert report.charged_total == 100


def test_clone_same_serial_and_counter_other_bytes(settlement: Settlement,
                                                  gateways: list[Gateway],
                                                  riders: list[Rider]) -> None:
    a, b = gateways[0], gateways[2]
    rider = riders[1]
    original = rider.token(NOW, 7)
    clone = rider.token(NOW + 1, 7)   # a second phone with a copy of the credential
    assert original != clone
    ra = a.scan(original, 100, Scene.BUS, NOW)
    rb = b.scan(clone, 300, Scene.BUS, NOW + 1)
    upload(settlement, a)
    upload(settlement, b)
    report = settlement.report()
    [found] = report.findings
    assert found.kind == "clone" and found.detail == ""
    assert (found.serial, found.counter, found.account) == (rider.serial, 7, rider.account)
    assert found.gateways == (a.id, b.id)
    assert found.records == ((a.id, ra.record), (b.id, rb.record))
    assert found.amount == 300
    assert report.charge_of(rider.account) == 100 and report.rejected_total == 300
    assert report.flagged_serials() == {rider.serial}


def test_counter_going_backwards_is_a_clone(settlement: Settlement, gateways: list[Gateway],
                                           riders: list[Rider]) -> None:
    a, b = gateways[0], gateways[1]
    rider = riders[2]
    a.scan(rider.token(NOW, 5), 100, Scene.BUS, NOW)
    a.scan(rider.token(NOW + 5, 6), 100, Scene.BUS, NOW + 5)
    # A copy, behind: issued later, and scanned later than an honest phone's
    # token could still be in flight (max_age + 2 * skew).
    late = NOW + 5 + DEFAULT_MAX_AGE + 2 * DEFAULT_SKEW + 1
    rb = b.scan(rider.token(late, 3), 70, Scene.BUS, late)
    upload(settlement, b)
    upload(settlement, a)
    report = settlement.report()
    [found] = report.findings
    assert found.kind == "clone" and "backwards" in found.detail
    assert (found.serial, found.counter, found.amount) == (rider.serial, 3, 70)
    assert found.gateways == (b.id,) and found.records == ((b.id, rb.record),)
    # Every (serial, counter) is distinct, so all three are charged.
    assert report.charge_of(rider.account) == 270
    assert report.flagged_serials() == {rider.serial}


def test_overspend_across_gateways_while_offline(settlement: Settlement,
                                                 gateways: list[Gateway],
                                                 issuer: IssuerKey) -> None:
    rider = make_rider(issuer, 30, limit=500)
    a, b, c = gateways
    start = NOW
    # Each gateway alone stays within the limit; outstanding together they do not.
    a.scan(rider.token(start + 10, 1), 300, Scene.BUS, start + 10)
    b.scan(rider.token(start + 20, 2), 300, Scene.BUS, start + 20)
    c.scan(rider.token(start + 30, 3), 150, Scene.BUS, start + 30)
    # An hour later a and b have long uploaded: 150 + 200 outstanding is fine.
    nxt = start + 3601
    c.scan(rider.token(nxt, 4), 200, Scene.BUS, nxt)
    for gw in gateways:
        upload(settlement, gw)
    report = settlement.report()
    [over] = report.findings
    assert over.kind == "overspend"
    assert (over.serial, over.account, over.amount) == (rider.serial, rider.account, 250)
    assert "750 outstanding" in over.detail and "limit of 500" in over.detail
    assert f"at {start + 30}" in over.detail
    # Overspending is caught, not refused: everything is charged.
    assert report.charge_of(rider.account) == 950
    assert report.flagged_serials() == {rider.serial}


def test_a_rider_whose_gateway_uploads_between_rides_is_not_an_overspender(
        settlement: Settlement, gateways: list[Gateway], issuer: IssuerKey) -> None:
    rider = make_rider(issuer, 31, limit=1000)
    gw = gateways[0]
    for k in range(3):  # 2,700 in the day against a limit of 1,000, synced after each ride
        at = NOW + k * 600
        gw.scan(rider.token(at, k + 1), 900, Scene.BUS, at)
        upload(settlement, gw)
    report = settlement.report()
    assert report.charge_of(rider.account) == 2700 and report.of_kind("overspend") == []


def test_sequence_gaps_in_records_and_batches(settlement: Settlement,
                                             gw_keys: list[GatewayKey],
                                             riders: list[Rider]) -> None:
    key, other = gw_keys[0], gw_keys[1]
    gid = key.public.gateway_id
    t = [(riders[0].token(NOW, c), 10, Scene.BUS, NOW) for c in range(1, 8)]
    settlement.ingest(craft(key, 1, 1, t[0:2]))
    settlement.ingest(craft(key, 3, 6, t[5:7]))
    settlement.ingest(craft(other, 1, 1, t[0:1], created_at=NOW + 1))
    gaps = settlement.report().of_kind("sequence_gap")
    assert {(f.gateways, f.detail) for f in gaps} == {
        ((gid,), "records 3..5 missing"), ((gid,), "batches 2..2 missing")}
    # The missing batch arrives late (a reorder): the gaps close.
    assert settlement.ingest(craft(key, 2, 3, t[2:5])).status == IngestStatus.APPLIED
    assert settlement.report().of_kind("sequence_gap") == []
    # A first batch that is not number 1 leaves a gap from the start.
    settlement.ingest(craft(gw_keys[2], 2, 4, t[3:4]))
    g2 = gw_keys[2].public.gateway_id
    assert {f.detail for f in settlement.report().of_kind("sequence_gap")
            if f.gateways == (g2,)} == {"records 1..3 missing", "batches 1..1 missing"}


def test_gaps_follow_batches_another_replica_applies(settlement: Settlement, tmp_path: Path,
                                                    deny_trust: TrustStore,
                                                    gw_keys: list[GatewayKey],
                                                    riders: list[Rider]) -> None:
    # A report keeps the holes it found while the batches stay the same; a
    # batch another process applies (here: another Settlement on the same
    # store) opens or closes one, and the next report sees it.
    key = gw_keys[0]
    other = open_settlement(tmp_path / "settle", deny_trust, [k.public for k in gw_keys])
    try:
        t = [(riders[0].token(NOW, c), 10, Scene.BUS, NOW) for c in range(1, 8)]
        settlement.ingest(craft(key, 1, 1, t[0:2]))
        assert settlement.report().of_kind("sequence_gap") == []
        other.ingest(craft(key, 3, 6, t[5:7]))
        assert {f.detail for f in settlement.report().of_kind("sequence_gap")} == {
            "records 3..5 missing", "batches 2..2 missing"}
        assert len(settlement.report().of_kind("sequence_gap")) == 2   # kept, not lost
        other.ingest(craft(key, 2, 3, t[2:5]))
        assert settlement.report().of_kind("sequence_gap") == []
    finally:
        other.close()


@given(ranges=st.lists(st.tuples(st.integers(1, 60), st.integers(0, 8)), max_size=25),
       order=st.randoms(use_true_random=False))
def test_holes_folded_one_batch_at_a_time_are_the_holes_of_all(
        ranges: list[tuple[int, int]], order: Any) -> None:
    """reports.add_to_holes: batches folded in, in any arrival order (late
    ones fill holes), leave the holes reports._holes finds over all of them."""
    from qrpay.reports import _holes, add_to_holes
    spans = [(first, first + width) for first, width in ranges]
    order.shuffle(spans)
    holes: list[tuple[int, int]] = []
    top = 0
    for i, (first, last) in enumerate(spans):
        top = add_to_holes(holes, top, first, last)
        assert holes == _holes(spans[:i + 1])
    assert top == max((b for _a, b in spans), default=0)


def test_gaps_are_folded_in_from_new_batches_and_found_again_when_rows_go(
        settlement: Settlement, gw_keys: list[GatewayKey], riders: list[Rider],
        tmp_path: Path, deny_trust: TrustStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first report, the batches that came are folded into the
    holes kept (no SQL over every batch); a batch row that went (not a
    thing settlement does, but a store another tool touched) makes the
    holes found again from scratch. Either way they equal a fresh store's."""
    key = gw_keys[0]
    t = [(riders[0].token(NOW, c), 10, Scene.BUS, NOW) for c in range(1, 12)]
    settlement.ingest(craft(key, 1, 1, t[0:2]))
    settlement.report()
    found_again: list[int] = []
    real = Settlement._all_holes
    monkeypatch.setattr(Settlement, "_all_holes",
                        lambda self: found_again.append(1) or real(self))

    def fresh() -> set[tuple[Any, ...]]:
        other = open_settlement(tmp_path / "settle", deny_trust, [k.public for k in gw_keys])
        try:
            return {(f.gateways, f.detail) for f in other.report().of_kind("sequence_gap")}
        finally:
            other.close()

    settlement.ingest(craft(key, 4, 8, t[7:9]))        # batches 2, 3 and records 3..7 missing
    settlement.ingest(craft(gw_keys[1], 2, 3, t[2:3]))
    gaps = {(f.gateways, f.detail) for f in settlement.report().of_kind("sequence_gap")}
    assert len(gaps) == 4 and found_again == []
    settlement.ingest(craft(key, 2, 3, t[2:4]))        # a late batch fills part of the hole
    gaps = {(f.gateways, f.detail) for f in settlement.report().of_kind("sequence_gap")}
    assert ((key.public.gateway_id,), "records 5..7 missing") in gaps and found_again == []
    assert gaps == fresh() and found_again == [1]   # the fresh store's own SQL
    found_again.clear()
    [(arrival,)] = settlement._query("SELECT MAX(arrival) FROM batches")
    with settlement._write("test") as db:
        db.execute("DELETE FROM batches WHERE arrival = ?", (arrival,))
    gaps = {(f.gateways, f.detail) for f in settlement.report().of_kind("sequence_gap")}
    assert found_again == [1] and ((key.public.gateway_id,), "records 3..7 missing") in gaps
    assert gaps == fresh()


# -- repayments --------------------------------------------------------------------------------

def test_repayments_are_recorded_and_read_back(tmp_path: Path, settlement: Settlement,
                                               deny_trust: TrustStore) -> None:
    assert settlement.repayments() == [] and settlement.repayments(5011) == []
    assert settlement.record_repayment(5011, 500, NOW, "a1") is True
    settlement.record_repayment(5012, 1, NOW + 1, "a2")
    settlement.record_repayment(5011, 200, NOW + 2, "a3")
    settlement.record_repayment(2**63 - 1, 2**61, 2**32 - 1, "x" * 128)
    assert settlement.repayments(5011) == [(5011, 500, NOW), (5011, 200, NOW + 2)]
    assert settlement.repayments(5012) == [(5012, 1, NOW + 1)]
    every = settlement.repayments()
    assert every == [(5011, 500, NOW), (5012, 1, NOW + 1), (5011, 200, NOW + 2),
                     (2**63 - 1, 2**61, 2**32 - 1)]
    # What credit_history could not add up is refused when stored, not when read.
    with pytest.raises(errors.InvalidArgument):
        settlement.record_repayment(7, 2**61, NOW, "b1")
    with pytest.raises(errors.InvalidArgument):
        settlement.record_repayments(np.array([7, 8]), np.array([2**60, 2**61]),
                                     np.array([NOW, NOW]), ["b1", "b2"])
    assert settlement.credit_history(2**32 - 1)["repaid"].sum() == 2**61 + 701
    for bad in ((-1, 1, NOW), (1, -1, NOW), (1, 1, -1), (True, 1, NOW), (1, 1.5, NOW),
                (1, 1, 2**32), (2**63, 1, NOW), (1, 2**62 + 1, NOW), ("1", 1, NOW),
                (1, 0, NOW)):                                # a repayment of nothing
        with pytest.raises(errors.InvalidArgument):
            settlement.record_repayment(*bad, "b1")  # type: ignore[arg-type]
    for reference in ("", "x" * 129, "tab\there", "line\n", b"b1", None, 7):
        with pytest.raises(errors.InvalidArgument):
            settlement.record_repayment(1, 1, NOW, reference)  # type: ignore[arg-type]
    assert settlement.repayments() == every
    # A bank's file in one call: all stored, or (one bad row) none.
    assert settlement.record_repayments(np.array([7, 8]), np.array([10, 20]),
                                        np.array([NOW, NOW + 5]), np.array(["c1", "c2"])) == 2
    every += [(7, 10, NOW), (8, 20, NOW + 5)]
    for bad in (([7], [10, -1], [NOW, NOW]), ([7, 8], [10, 1], [NOW, 2**32]),
                ([7, 8], [1.5, 1.0], [NOW, NOW]), ([[7]], [[1]], [[NOW]]),
                ([2**63, 1], [1, 1], [NOW, NOW]), ([7, 8], [10, 0], [NOW, NOW])):
        with pytest.raises(errors.InvalidArgument):
            settlement.record_repayments(*(np.array(c) for c in bad), ["d1", "d2"])
    for refs in (["d1"], ["d1", "d2", "d3"], "d1d2", ["d1", ""]):
        with pytest.raises(errors.InvalidArgument):
            settlement.record_repayments([7, 8], [1, 1], [NOW, NOW], refs)
    assert settlement.record_repayments([], [], [], []) == 0
    assert settlement.repayments() == every
    settlement.close()
    again = open_settlement(tmp_path / "settle", deny_trust)
    try:
        assert again.repayments() == every
    finally:
        again.close()


def test_a_repayment_reference_is_stored_once(tmp_path: Path, settlement: Settlement,
                                             deny_trust: TrustStore) -> None:
    """A retry (the answer was lost, or the commit failed) stores nothing again;
    the same reference with other content is a Conflict that stores nothing."""
    assert settlement.record_repayment(42, 500, NOW, "TX-1") is True
    assert settlement.record_repayment(42, 500, NOW, "TX-1") is False     # already stored
    for other in ((43, 500, NOW), (42, 501, NOW), (42, 500, NOW + 1)):
        with pytest.raises(errors.Conflict) as info:
            settlement.record_repayment(*other, "TX-1")
        assert info.value.reason == errors.Reason.CONFLICT and "TX-1" in str(info.value)
    assert settlement.repayments() == [(42, 500, NOW)]
    # A file replayed whole, or with new rows: only the new rows are stored, in file order.
    assert settlement.record_repayments([42, 7], [500, 70], [NOW, NOW + 1], ["TX-1", "TX-2"]) == 1
    assert settlement.record_repayments([42, 7], [500, 70], [NOW, NOW + 1], ["TX-1", "TX-2"]) == 0
    # One row in the file twice (same content) counts once.
    assert settlement.record_repayments([8, 8], [80, 80], [NOW, NOW], ["TX-3", "TX-3"]) == 1
    before = settlement.repayments()
    assert before == [(42, 500, NOW), (7, 70, NOW + 1), (8, 80, NOW)]
    # A file with one conflicting row stores none of its rows.
    for refs in (["TX-4", "TX-2"], ["TX-4", "TX-4"]):
        with pytest.raises(errors.Conflict):
            settlement.record_repayments([9, 9], [90, 91], [NOW, NOW], refs)
    assert settlement.repayments() == before
    # The reference is what is unique, not the content: two payments of one
    # amount by one account at one second are two rows.
    assert settlement.record_repayment(42, 500, NOW, "TX-5") is True
    settlement.close()
    again = open_settlement(tmp_path / "settle", deny_trust)
    try:
        assert again.record_repayment(42, 500, NOW, "TX-5") is False
        assert again.repayments(42) == [(42, 500, NOW), (42, 500, NOW)]
    finally:
        again.close()


@pytest.mark.sqlite_only
def test_a_store_from_before_references_opens(tmp_path: Path, deny_trust: TrustStore) -> None:
    """A store made by code without repayment references (the table without
    its column) opens, keeps its rows, and takes referenced repayments."""
    (tmp_path / "old").mkdir()
    db = sqlite3.connect(tmp_path / "old" / "settlement.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE repayments (id INTEGER PRIMARY KEY, account INTEGER NOT NULL, "
               "amount INTEGER NOT NULL, paid_at INTEGER NOT NULL)")   # as it was made then
    db.executemany("INSERT INTO repayments(account, amount, paid_at) VALUES (?, ?, ?)",
                   [(42, 100, NOW), (42, 100, NOW)])    # stored twice back then
    db.close()
    for _ in range(2):   # the second open finds the column already there
        with Settlement(tmp_path / "old", deny_trust) as s:
            s.record_repayment(42, 200, NOW + 1, "TX-1")
            assert s.repayments() == [(42, 100, NOW), (42, 100, NOW), (42, 200, NOW + 1)]


class _Rollback(Exception):
    pass


class _FailingCommit:
    """Stands in for the store's database: the next write transaction is
    committed (or rolled back) and then reported failed, the two outcomes a
    commit can have when its fdatasync fails or the connection to the server
    drops before the answer comes back."""

    def __init__(self, db: StoreDatabase, durable: bool) -> None:
        self.db, self.durable, self.armed = db, durable, True

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        if not self.armed:
            with self.db.transaction() as tx:
                yield tx
            return
        self.armed = False
        try:
            with self.db.transaction() as tx:
                yield tx
                if not self.durable:
                    raise _Rollback
        except _Rollback:
            pass
        raise errors.StoreUnavailable("disk I/O error")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@pytest.mark.parametrize("durable", [True, False], ids=["stored", "lost"])
def test_a_failed_commit_says_the_outcome_is_unknown_and_the_retry_is_safe(
        tmp_path: Path, deny_trust: TrustStore, gw_keys: list[GatewayKey], riders: list[Rider],
        issuer: IssuerKey, durable: bool) -> None:
    """Every write: a failed COMMIT raises StoreUnavailable saying the outcome
    is unknown and what to retry; doing so ends with the write stored once."""
    s = open_settlement(tmp_path / "settle", deny_trust)
    real = s._db
    batch = craft(gw_keys[0], 1, 1, [(riders[0].token(NOW, 1), 100, Scene.BUS, NOW)])

    def failing(call: Callable[[], Any], says: str) -> None:
        s._db = _FailingCommit(real, durable)  # type: ignore[assignment]
        with pytest.raises(errors.StoreUnavailable) as info:
            call()
        assert "unknown" in str(info.value) and says in str(info.value)
        s._db = real

    failing(lambda: s.register_gateway(gw_keys[0].public), "same key")
    assert s.register_gateway(gw_keys[0].public) == gw_keys[0].public.gateway_id
    failing(lambda: s.ingest(batch), "same batch")
    assert s.ingest(batch).status == (IngestStatus.EXISTS if durable else IngestStatus.APPLIED)
    failing(lambda: s.record_repayment(42, 500, NOW, "TX-1"), "same reference")
    assert s.record_repayment(42, 500, NOW, "TX-1") is not durable
    failing(lambda: s.record_repayments([7, 8], [1, 2], [NOW, NOW], ["F-1", "F-2"]),
            "same reference")
    assert s.record_repayments([7, 8], [1, 2], [NOW, NOW], ["F-1", "F-2"]) == (0 if durable else 2)
    failing(lambda: s.publish_deny_list(issuer, NOW), "publish again")
    document, _ = s.publish_deny_list(issuer, NOW + 1)
    assert DenyList.load(document, deny_trust).version == (2 if durable else 1)
    assert s.repayments() == [(42, 500, NOW), (7, 1, NOW), (8, 2, NOW)]
    assert s.batch_count() == 1
    s.close()


# -- deny list --------------------------------------------------------------------------------

def test_publish_deny_list_adds_flagged_credentials(tmp_path: Path, settlement: Settlement,
                                                   gateways: list[Gateway],
                                                   riders: list[Rider], issuer: IssuerKey,
                                                   deny_trust: TrustStore) -> None:
    a, b, _c = gateways
    cheat, cloned, honest, later = riders
    token = cheat.token(NOW, 1)
    a.scan(token, 100, Scene.BUS, NOW)
    b.scan(token, 100, Scene.BUS, NOW)
    a.scan(cloned.token(NOW, 3), 100, Scene.BUS, NOW)
    b.scan(cloned.token(NOW + 1, 3), 100, Scene.BUS, NOW + 1)
    a.scan(honest.token(NOW, 1), 100, Scene.BUS, NOW)
    upload(settlement, a)
    upload(settlement, b)
    assert settlement.deny_list() is None

    document, delta = settlement.publish_deny_list(issuer, NOW + 60)
    assert delta == sorted([cheat.serial, cloned.serial])
    loaded = DenyList.load(document, deny_trust)
    assert loaded.version == 1 and loaded.issued_at == NOW + 60
    assert loaded.serials.tolist() == delta
    stored = settlement.deny_list()
    assert stored is not None and stored.version == 1 and stored.raw == document
    credentials_only = TrustStore()
    credentials_only.add(issuer)
    with pytest.raises(errors.IssuerKeyRole):
        DenyList.load(document, credentials_only)

    # More fraud: the next list is the old one plus the delta.
    token = later.token(NOW + 100, 1)
    a.scan(token, 100, Scene.BUS, NOW + 100)
    b.scan(token, 100, Scene.BUS, NOW + 100)
    upload(settlement, a)
    upload(settlement, b)
    document2, delta2 = settlement.publish_deny_list(issuer, NOW + 120)
    assert delta2 == [later.serial]
    loaded2 = DenyList.load(document2, deny_trust)
    assert loaded2.version == 2
    assert loaded2.serials.tolist() == sorted([cheat.serial, cloned.serial, later.serial])
    document3, delta3 = settlement.publish_deny_list(issuer, NOW + 180)
    assert delta3 == [] and DenyList.load(document3, deny_trust).version == 3

    # A gateway that applies it refuses the flagged credentials only.
    gw = Gateway(tmp_path / "fresh", GatewayKey(b"\x66" * 32), deny_trust)
    try:
        gw.update_deny_list(document2, NOW + 200)
        for rider, counter in ((cheat, 10), (cloned, 10), (later, 10)):
            with pytest.raises(errors.Revoked):
                gw.scan(rider.token(NOW + 200, counter), 100, Scene.BUS, NOW + 200)
        assert gw.scan(honest.token(NOW + 200, 10), 100, Scene.BUS, NOW + 200).amount == 100
        with pytest.raises(errors.StaleUpdate):
            gw.update_deny_list(document, NOW + 200)
    finally:
        gw.close()


def test_an_honest_phone_scanned_out_of_order_is_not_a_clone(
        settlement: Settlement, gateways: list[Gateway], riders: list[Rider]) -> None:
    # Counter 2 reaches a gateway before counter 1 does, both within freshness.
    a, b = gateways[0], gateways[1]
    rider = riders[3]
    one, two = rider.token(NOW, 1), rider.token(NOW + 1, 2)
    a.scan(two, 100, Scene.BUS, NOW + 1)
    b.scan(one, 100, Scene.BUS, NOW + DEFAULT_MAX_AGE)
    upload(settlement, a)
    upload(settlement, b)
    report = settlement.report()
    assert report.findings == [] and report.charge_of(rider.account) == 200


# -- the issuer keys settlement trusts (issue 11, item 1) ------------------------------------

def test_a_batch_settlement_lacks_the_key_for_is_refused_until_the_key_is_trusted(
        tmp_path: Path, issuer: IssuerKey, gw_keys: list[GatewayKey]) -> None:
    rider = make_rider(issuer, 21)
    batch = craft(gw_keys[0], 1, 1, [(rider.token(NOW, 1), 100, Scene.BUS, NOW),
                                     (rider.token(NOW, 2), 150, Scene.BUS, NOW)])
    wrong = TrustStore()
    wrong.add(IssuerKey(b"\x31" * 32))           # say, a mistyped --issuer-public
    s = open_settlement(tmp_path / "s", wrong, [gw_keys[0].public])
    try:
        with pytest.raises(errors.UnknownKeyId, match=f"2 of 2 records.*{issuer.kid.hex()}"):
            s.ingest(batch)
        assert s.batch_count() == 0 and s.trusted_issuers() == []   # the caller's: not stored
        # Another process trusts the key meanwhile: this store sees it at the next try.
        other = open_settlement(tmp_path / "s")
        assert other.trust_issuer(issuer.public).roles == Role.CREDENTIALS | Role.DENY_LIST
        other.close()
        result = s.ingest(batch)
        assert (result.status, result.invalid) == (IngestStatus.APPLIED, 0)
        assert s.report().charge_of(rider.account) == 250     # charged, not lost as invalid
    finally:
        s.close()
    # Remembered: a store opened with no keys of its own trusts it.
    s = open_settlement(tmp_path / "s")
    try:
        assert [t.key for t in s.trusted_issuers()] == [issuer.public]
        assert s.trust.get(issuer.kid).roles == Role.CREDENTIALS | Role.DENY_LIST
        assert s.ingest(batch).status == IngestStatus.EXISTS
        s.publish_deny_list(issuer, NOW)                       # DENY_LIST, as stored
    finally:
        s.close()


def test_stored_issuer_keys_and_the_callers_combine(tmp_path: Path, issuer: IssuerKey) -> None:
    other = IssuerKey(b"\x32" * 32)
    s = open_settlement(tmp_path / "s")
    s.trust_issuer(issuer, roles=Role.CREDENTIALS, not_before=NOW - 10, not_after=NOW + 10)
    # The same key again replaces its window and roles; bad arguments are typed.
    s.trust_issuer(issuer, roles=Role.CREDENTIALS, not_before=NOW - 100, not_after=NOW + 100)
    assert [(t.not_before, t.not_after) for t in s.trusted_issuers()] == [(NOW - 100, NOW + 100)]
    for bad in ({"roles": Role(0)}, {"roles": 8}, {"not_before": -1},
                {"not_before": NOW, "not_after": NOW - 1}):
        with pytest.raises(errors.InvalidArgument):
            s.trust_issuer(issuer, **bad)  # type: ignore[arg-type]
    for key in (other.public.to_bytes(), "qrpay:issuer-public:x", None, GatewayKey(b"\x33" * 32)):
        with pytest.raises(errors.InvalidArgument):
            s.trust_issuer(key)  # type: ignore[arg-type]
    s.close()
    mine = TrustStore()
    mine.add(issuer, roles=Role.CREDENTIALS | Role.DENY_LIST)    # wider than stored
    mine.add(other, roles=Role.CREDENTIALS | Role.DENY_LIST)
    s = open_settlement(tmp_path / "s", mine)
    try:
        # Both keys; the stored one as stored; the caller's store is not changed.
        assert s.trust.get(issuer.kid).roles == Role.CREDENTIALS
        assert s.trust.get(issuer.kid).not_after == NOW + 100
        assert s.trust.get(other.kid).roles == Role.CREDENTIALS | Role.DENY_LIST
        assert [t.key for t in s.trusted_issuers()] == [issuer.public]
        assert s.trust is not mine and mine.get(issuer.kid).roles == Role.CREDENTIALS | Role.DENY_LIST
        with pytest.raises(errors.IssuerKeyRole):
            s.publish_deny_list(issuer, NOW)
        s.publish_deny_list(other, NOW)
        s.trust_issuer(issuer.public, roles=Role.DENY_LIST)   # now, in this object too
        s.publish_deny_list(issuer, NOW + 1)
    finally:
        s.close()
    with pytest.raises(errors.InvalidArgument):
        open_settlement(tmp_path / "s", "qrpay:issuer-public:x")  # type: ignore[arg-type]


def test_a_deny_list_issued_before_the_latest_is_not_published(tmp_path: Path,
                                                                deny_trust: TrustStore,
                                                                issuer: IssuerKey) -> None:
    # Gateways refuse it: its version would be used up for nothing (issue 11).
    s = open_settlement(tmp_path / "s", deny_trust)
    try:
        s.publish_deny_list(issuer, NOW)
        with pytest.raises(errors.StaleUpdate, match="before the latest deny list"):
            s.publish_deny_list(issuer, NOW - 1, revoke=[5])
        latest = s.deny_list()
        assert latest is not None and latest.version == 1 and 5 not in latest
        document, added = s.publish_deny_list(issuer, NOW, revoke=[5])
        assert DenyList.load(document, deny_trust).version == 2 and added == [5]
    finally:
        s.close()


def test_publishing_continues_after_the_deny_list_key_is_rotated(tmp_path: Path,
                                                                 issuer: IssuerKey) -> None:
    old_trust = TrustStore()
    old_trust.add(issuer, roles=Role.CREDENTIALS | Role.DENY_LIST)
    s = open_settlement(tmp_path / "s", old_trust)
    s.publish_deny_list(issuer, NOW, revoke=[11])
    s.close()
    successor = IssuerKey(b"\x55" * 32)
    new_trust = TrustStore()
    new_trust.add(successor, roles=Role.CREDENTIALS | Role.DENY_LIST)
    s = open_settlement(tmp_path / "s", new_trust)
    document, added = s.publish_deny_list(successor, NOW + 60, revoke=[12])
    assert added == [12]
    published = DenyList.load(document, new_trust)
    assert published.version == 2 and list(published.serials) == [11, 12]


@pytest.mark.parametrize("kwargs", [{"max_age": -1}, {"skew": -1}, {"max_age": 2**32 + 1},
                                    {"skew": 2**40}, {"threads": 0}])
def test_bad_settings_are_refused_when_the_store_opens(tmp_path: Path, deny_trust: TrustStore,
                                                       kwargs: dict[str, int]) -> None:
    with pytest.raises(errors.InvalidArgument):
        open_settlement(tmp_path / "s", deny_trust, **kwargs)
