"""Settlement against a model: real gateways scan tokens of a few riders, with
planted double spends, clones, counters going backwards and overspending;
their batches reach settlement duplicated, reordered, retried, with lost acks
and with conflicting re-signed copies. The model predicts every ingest status,
the charges per account and the exact list of findings."""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import event, settings, strategies as st
from hypothesis.stateful import (
    Bundle, RuleBasedStateMachine, invariant, multiple, precondition, rule,
    run_state_machine_as_test,
)

from qrpay import (
    DEFAULT_MAX_AGE, DEFAULT_SKEW, Credential, DeviceKey, GatewayKey, IssuerKey, Scene, TrustStore,
)
from qrpay._impl import core
from qrpay.format import (
    CRED_ACCOUNT, CRED_LIMIT, CRED_SERIAL, TAG_BATCH, TOKEN_COUNTER, TOKEN_ISSUED_AT,
)
from qrpay.gateway import Gateway, GatewayPolicy
from qrpay.settlement import Finding, IngestStatus, Settlement
from qrpay.wire import sign_document
import stores
from stores import open_settlement

NOW = 1_800_000_000
# How far apart in gateway time an honest phone's tokens can be scanned out of
# counter order (each is scanned within its freshness window).
SLACK = DEFAULT_MAX_AGE + 2 * DEFAULT_SKEW
ISSUER = IssuerKey(bytes(range(32)))
TRUST = TrustStore()
TRUST.add(ISSUER)
GATEWAY_KEYS = [GatewayKey(bytes([120 + i]) * 32) for i in range(3)]
KEY_BY_PUBLIC = {k.public.to_bytes(): k for k in GATEWAY_KEYS}
POLICY = GatewayPolicy(transaction_caps={s: 10**6 for s in Scene}, max_offline_uses=10**4,
                       deny_list_max_age=None)
# Two riders with room to spare, two whose limits are small next to what they
# can spend across gateways within one period.
LIMITS = [10**7, 10**7, 400, 250]


def _rider(i: int, limit: int) -> tuple[Credential, DeviceKey]:
    device = DeviceKey(bytes([60 + i]) * 32)
    cred = ISSUER.issue(account=7000 + i, device_public=device.public, limit=limit,
                        scenes=[Scene.BUS], not_before=NOW - 86_400,
                        not_after=NOW + 86_400, serial=900 + i)
    return cred, device


RIDERS = [_rider(i, limit) for i, limit in enumerate(LIMITS)]

riders = st.integers(0, len(RIDERS) - 1)
gateway_ix = st.integers(0, len(GATEWAY_KEYS) - 1)
amounts = st.integers(1, 300)
steps = st.integers(2, 45)   # seconds between scans


def _token_field(fmt: str, offset: int) -> Any:
    """A read-only property: one little-endian field of self.token."""
    return property(lambda self: int(struct.unpack_from(fmt, self.token, offset)[0]))


@dataclass(frozen=True)
class Arrived:
    gateway: str
    record: int
    token: bytes
    amount: int
    gateway_time: int
    uploaded_at: int   # created_at of its batch: when its offline exposure ended

    # Fields read from the token's own bytes (struct, not the library's dtype,
    # so the model stays independent of the code under test).
    serial = _token_field("<Q", CRED_SERIAL)
    account = _token_field("<Q", CRED_ACCOUNT)
    limit = _token_field("<I", CRED_LIMIT)
    issued_at = _token_field("<I", TOKEN_ISSUED_AT)
    counter = _token_field("<I", TOKEN_COUNTER)

    @property
    def where(self) -> tuple[str, int]:
        return (self.gateway, self.record)


@dataclass(frozen=True)
class Planted:
    kind: str                           # double_spend, clone, backwards
    serial: int
    counter: int
    places: tuple[tuple[str, int], ...]  # (gateway, record) of every token involved
    flagged: tuple[tuple[str, int], ...]  # the records the finding names


def _ranges(present: list[int]) -> list[tuple[int, int]]:
    """Missing numbers below the largest present one, counting from 1."""
    seen = sorted(set(present))
    gaps, expected = [], 1
    for n in seen:
        if n > expected:
            gaps.append((expected, n - 1))
        expected = n + 1
    return gaps


class SettlementMachine(RuleBasedStateMachine):
    batches = Bundle("batches")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="qrpay-settlement-sm-"))
        self.gateways = [Gateway(self.dir / f"gw{i}", key, TRUST, POLICY)
                         for i, key in enumerate(GATEWAY_KEYS)]
        self.ids = [gw.id for gw in self.gateways]
        self.settlement = open_settlement(self.dir / "settlement", TRUST,
                                     [k.public for k in GATEWAY_KEYS])
        self.id_by_public = {k.public.to_bytes(): k.public.gateway_id
                             for k in GATEWAY_KEYS}
        assert list(self.id_by_public.values()) == self.ids
        self.clock = NOW
        self.counters = [0] * len(RIDERS)
        # The model.
        self.genuine: dict[bytes, tuple[int, int]] = {}   # batch -> (gateway index, seq)
        self.stored: dict[tuple[str, int], tuple[bytes, int, int]] = {}  # -> body, first, last
        self.arrived: list[Arrived] = []
        self.planted: list[Planted] = []

    def teardown(self) -> None:
        for gw in self.gateways:
            gw.close()
        self.settlement.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- riders and gateways ----------------------------------------------------------

    def _tick(self, dt: int) -> int:
        self.clock += dt
        return self.clock

    def _next_counter(self, rider: int, skip: int = 0) -> int:
        self.counters[rider] += 1 + skip
        return self.counters[rider]

    def _token(self, rider: int, issued_at: int, counter: int) -> bytes:
        cred, device = RIDERS[rider]
        return core.make_token(cred.raw, device._secret, issued_at, counter, int(Scene.BUS))

    def _scan(self, gw: int, token: bytes, amount: int, at: int) -> tuple[str, int] | None:
        receipt = self.gateways[gw].scan_batch([token], [amount], Scene.BUS, at).receipts[0]
        if receipt is None:
            return None
        assert not receipt.duplicate
        return (self.ids[gw], receipt.record)

    @rule(scans=st.lists(st.tuples(riders, gateway_ix, amounts, st.integers(0, 20)),
                         min_size=1, max_size=6))
    def ride(self, scans: list[tuple[int, int, int, int]]) -> None:
        for rider, gw, amount, dt in scans:
            t = self._tick(dt)
            self._scan(gw, self._token(rider, t, self._next_counter(rider)), amount, t)

    @rule(rider=riders, gws=st.permutations(range(len(GATEWAY_KEYS))), a1=amounts,
          a2=amounts, dt=steps)
    def double_spend(self, rider: int, gws: list[int], a1: int, a2: int, dt: int) -> None:
        """The same token bytes shown at two gateways that cannot know of each other."""
        t = self._tick(dt)
        counter = self._next_counter(rider)
        token = self._token(rider, t, counter)
        first = self._scan(gws[0], token, a1, t)
        second = self._scan(gws[1], token, a2, t)
        if first and second:
            self.planted.append(Planted("double_spend", RIDERS[rider][0].serial, counter,
                                        (first, second), (first, second)))

    @rule(rider=riders, gws=st.permutations(range(len(GATEWAY_KEYS))), a1=amounts,
          a2=amounts, dt=steps)
    def clone(self, rider: int, gws: list[int], a1: int, a2: int, dt: int) -> None:
        """A second phone with a copy of the credential makes its own token
        with the same counter a second later."""
        t = self._tick(dt)
        counter = self._next_counter(rider)
        first = self._scan(gws[0], self._token(rider, t, counter), a1, t)
        second = self._scan(gws[1], self._token(rider, t + 1, counter), a2, t + 1)
        self._tick(1)
        if first and second:
            self.planted.append(Planted("clone", RIDERS[rider][0].serial, counter,
                                        (first, second), (first, second)))

    @rule(rider=riders, gws=st.permutations(range(len(GATEWAY_KEYS))), a1=amounts,
          a2=amounts, dt=steps)
    def backwards(self, rider: int, gws: list[int], a1: int, a2: int, dt: int) -> None:
        """A copy whose counter lags: after the phone used counter c + 1, the
        copy shows counter c (never used), issued and scanned later than any
        honest token with that counter could still be scanned."""
        t = self._tick(dt)
        ahead = self._next_counter(rider, skip=1)
        first = self._scan(gws[0], self._token(rider, t, ahead), a1, t)
        late = self._tick(SLACK + 1)
        second = self._scan(gws[1], self._token(rider, late, ahead - 1), a2, late)
        if first and second:
            self.planted.append(Planted("backwards", RIDERS[rider][0].serial, ahead - 1,
                                        (first, second), (second,)))

    # -- uploads ----------------------------------------------------------------------

    @rule(target=batches, gw=gateway_ix, size=st.integers(1, 6))
    def export(self, gw: int, size: int) -> Any:
        data = self.gateways[gw].export_batch(max_records=size, now=self.clock)
        if data is None:
            return multiple()
        self.genuine[data] = (gw, self._doc(data)["seq"])
        return data

    @rule(target=batches, gw=gateway_ix, size=st.integers(1, 8), ack=st.booleans())
    def upload(self, gw: int, size: int, ack: bool) -> Any:
        """The usual round trip: export, deliver, (usually) ack."""
        data = self.export(gw, size)
        if not isinstance(data, bytes):
            return data
        self.deliver(data, ack)
        return data

    @rule(target=batches, gw=gateway_ix)
    def ack_without_delivery(self, gw: int) -> Any:
        """The gateway hears 'stored' for a batch before settlement has it (so
        the next one may overtake it), or is unstuck after a conflict."""
        data = self.gateways[gw].export_batch(now=self.clock)
        if data is None:
            return multiple()
        self.genuine[data] = (gw, self._doc(data)["seq"])
        self.gateways[gw].ack(self._doc(data)["seq"])
        return data

    @rule(target=batches, data=batches,
          how=st.sampled_from(["amount", "created_at", "drop_last", "other_seq"]))
    def tamper(self, data: bytes, how: str) -> Any:
        """A conflicting copy, validly signed by the same gateway key."""
        doc = self._doc(data)
        if how == "amount":
            doc["records"][0][2] += 1
        elif how == "created_at":
            doc["created_at"] += 1
        elif how == "drop_last":
            if len(doc["records"]) < 2:
                return multiple()
            doc["records"].pop()
            doc["last"] -= 1
        else:
            doc["seq"] += 100
        return sign_document(KEY_BY_PUBLIC[doc["gateway"]], TAG_BATCH, doc)

    @rule(data=batches, ack=st.booleans())
    def deliver(self, data: bytes, ack: bool) -> None:
        doc = self._doc(data)
        gid = self.id_by_public[doc["gateway"]]
        expected = self._expected_status(gid, self._body(data), doc)
        result = self.settlement.ingest(data)
        event(f"ingest: {expected.value}")
        assert result.status == expected
        assert (result.gateway, result.seq, result.records) == (gid, doc["seq"],
                                                                len(doc["records"]))
        if expected == IngestStatus.APPLIED:
            assert result.invalid == 0
            self.stored[(gid, doc["seq"])] = (self._body(data), doc["first"], doc["last"])
            self.arrived += [Arrived(gid, r[0], r[1], r[2], r[4], doc["created_at"])
                             for r in doc["records"]]
        if ack and data in self.genuine and expected != IngestStatus.CONFLICT:
            gw, seq = self.genuine[data]
            self.gateways[gw].ack(seq)

    # -- the model ----------------------------------------------------------------------

    @staticmethod
    def _body(data: bytes) -> bytes:
        return msgpack.unpackb(data)[0]  # type: ignore[no-any-return]

    def _doc(self, data: bytes) -> dict[str, Any]:
        return msgpack.unpackb(self._body(data))  # type: ignore[no-any-return]

    def _expected_status(self, gid: str, body: bytes, doc: dict[str, Any]) -> IngestStatus:
        if (gid, doc["seq"]) in self.stored:
            same = self.stored[(gid, doc["seq"])][0] == body
            return IngestStatus.EXISTS if same else IngestStatus.CONFLICT
        for (g, _seq), (_b, first, last) in self.stored.items():
            if g == gid and first <= doc["last"] and last >= doc["first"]:
                return IngestStatus.CONFLICT
        return IngestStatus.APPLIED

    def _expected(self) -> tuple[dict[int, tuple[int, int]], Counter[Finding], list[Arrived]]:
        first: dict[tuple[int, int], Arrived] = {}
        findings: list[Finding] = []
        charged: list[Arrived] = []
        found: set[tuple[str, int]] = set()
        for i, r in enumerate(self.arrived):
            # Against the records that arrived before it (every verdict is):
            # a counter not above one scanned more than SLACK earlier is a
            # copy's, flagged and not charged; a charged record scanned more
            # than SLACK later with a counter not above this one's is found
            # behind now. (The rides here make every token at its scan time,
            # so reading "earlier" by issued_at would flag the same rows.)
            earlier = [o for o in self.arrived[:i] if o.serial == r.serial]
            behind = [o for o in earlier if o.gateway_time < r.gateway_time - SLACK
                      and o.counter >= r.counter]
            assert bool(behind) == any(o.issued_at < r.issued_at - SLACK for o in behind)
            if behind:
                findings.append(Finding("clone", r.serial, r.account, r.counter, (r.gateway,),
                                        (r.where,), r.amount, "counter went backwards"))
                continue
            for o in earlier:
                if (o.gateway_time > r.gateway_time + SLACK and o.counter <= r.counter
                        and o in charged and o.where not in found):
                    found.add(o.where)
                    findings.append(Finding(
                        "clone", o.serial, o.account, o.counter, (o.gateway,), (o.where,),
                        o.amount, "counter went backwards (charged: it arrived first)"))
            key = (r.serial, r.counter)
            if key not in first:
                first[key] = r
                charged.append(r)
                continue
            f = first[key]
            kind = ("clone" if r.token != f.token else
                    "duplicate_record" if r.gateway == f.gateway else "double_spend")
            findings.append(Finding(kind, r.serial, r.account, r.counter,
                                    (f.gateway, r.gateway), (f.where, r.where), r.amount))
        # Overspend: outstanding offline spend (from scan to its batch's export)
        # summed over gateways, at its peak, above the credential's limit.
        by_serial: dict[int, list[Arrived]] = {}
        for r in charged:
            by_serial.setdefault(r.serial, []).append(r)
        for serial, rows in by_serial.items():
            events = sorted([(r.gateway_time, r.amount) for r in rows]
                            + [(max(r.uploaded_at, r.gateway_time), -r.amount) for r in rows])
            outstanding, peak, peak_at = 0, 0, 0
            for at, delta in events:
                outstanding += delta
                if outstanding > peak:
                    peak, peak_at = outstanding, at
            limit = rows[0].limit
            if peak > limit:
                findings.append(Finding(
                    "overspend", serial, rows[0].account, 0, (), (), peak - limit,
                    f"{peak} outstanding offline against a limit of {limit} at {peak_at}"))
        for gid in {g for g, _ in self.stored}:
            for a, b in _ranges([r.record for r in self.arrived if r.gateway == gid]):
                findings.append(Finding("sequence_gap", gateways=(gid,),
                                        detail=f"records {a}..{b} missing"))
            for a, b in _ranges([s for g, s in self.stored if g == gid]):
                findings.append(Finding("sequence_gap", gateways=(gid,),
                                        detail=f"batches {a}..{b} missing"))
        charges: dict[int, tuple[int, int]] = {}
        for r in charged:
            amount, count = charges.get(r.account, (0, 0))
            charges[r.account] = (amount + r.amount, count + 1)
        return charges, Counter(findings), charged

    @invariant()
    def report_matches_the_model(self) -> None:
        report = self.settlement.report()
        charges, findings, charged = self._expected()
        got = {int(a): (int(m), int(c)) for a, m, c in zip(report.accounts, report.amounts,
                                                           report.counts)}
        assert got == charges
        # Nothing charged twice: the first arrival of each (serial, counter), once.
        assert report.charged_total == sum(r.amount for r in charged)
        assert report.charged_total + report.rejected_total == sum(
            r.amount for r in self.arrived)   # rejected: invalid, repeated or flagged
        assert report.records == len(self.arrived)
        assert Counter(report.findings) == findings
        for kind in {(f.kind, f.detail[:7]) for f in report.findings}:
            event(f"finding: {kind}")
        assert self.settlement.batch_count() == len(self.stored)

    @invariant()
    def every_planted_fraud_is_found(self) -> None:
        report = self.settlement.report()
        arrived = {r.where for r in self.arrived}
        for p in self.planted:
            if not all(place in arrived for place in p.places):
                continue
            if p.kind == "backwards":
                hits = [f for f in report.of_kind("clone")
                        if "backwards" in f.detail and f.records == p.flagged]
            else:
                hits = [f for f in report.of_kind(p.kind)
                        if set(f.records) == set(p.flagged)
                        and set(f.gateways) == {g for g, _ in p.places}]
            assert [(f.serial, f.counter) for f in hits] == [(p.serial, p.counter)], p

    @precondition(lambda self: len(self.arrived) > 0)
    @invariant()
    def reopened_store_reports_the_same(self) -> None:
        if len(self.arrived) % 7:  # now and then: reopening costs a little
            return
        again = open_settlement(self.dir / "settlement", TRUST)
        try:
            a, b = again.report(), self.settlement.report()
            assert a.findings == b.findings and a.amounts.tolist() == b.amounts.tolist()
        finally:
            again.close()


@pytest.mark.usefixtures("each_store")
def test_settlement_model() -> None:
    # On PostgreSQL the same machine checks the store, not the kernel again:
    # a third of the runs (each opens a store of its own).
    examples = settings.default.max_examples
    if stores.kind() == "postgresql":
        examples = max(10, examples // 3)
    run_state_machine_as_test(SettlementMachine, settings=settings(
        max_examples=examples, stateful_step_count=60, deadline=None))


def test_model_helpers() -> None:
    assert _ranges([]) == [] and _ranges([1, 2, 3]) == []
    assert _ranges([2, 5, 6, 9]) == [(1, 1), (3, 4), (7, 8)]
