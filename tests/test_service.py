"""The settlement service as gateways and operators use it: `qrpay serve`
running as a real process on loopback (uvicorn), on SQLite and on
PostgreSQL, driven over HTTP with httpx; and a gateway's online sync
against it, online and offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgpack
import pytest

import stores
from qrpay import (
    DeviceKey, Gateway, GatewayKey, IssuerKey, Role, Scene, TokenGenerator, TrustStore,
)
from qrpay.clearing import FeeSchedule, verify_statement
from qrpay.errors import InvalidArgument
from qrpay.format import TAG_BATCH
from qrpay.gateway import GatewayPolicy
from qrpay.keys import RootKey, SettlementKey
from qrpay.trust import TrustedKey
from qrpay.trustbundle import sign_trust_bundle
from qrpay.service import ServiceConfig, create_app
from qrpay.sync import SettlementClient
from qrpay.wire import sign_document
from service_proc import OPERATOR_TOKEN, ServiceProcess, operator_headers
from stores import open_settlement

pytestmark = pytest.mark.usefixtures("each_store")

NOW = 1_800_000_000
ISSUER = IssuerKey(bytes(range(32)))
SETTLEMENT_KEY = SettlementKey(b"\x07" * 32)
ROOT = RootKey(b"\x21" * 32)
GATEWAY_KEYS = [GatewayKey(bytes([70 + i]) * 32) for i in range(2)]
POLICY = GatewayPolicy(deny_list_max_age=None, max_offline_uses=10_000)


def _trust() -> TrustStore:
    trust = TrustStore()
    trust.add(ISSUER, roles=Role.CREDENTIALS | Role.DENY_LIST)
    return trust


def _phone(n: int) -> TokenGenerator:
    device = DeviceKey(bytes([n]) * 32)
    credential = ISSUER.issue(account=7000 + n, device_public=device.public, limit=10**6,
                              scenes=[Scene.BUS, Scene.CLINIC], not_before=NOW - 3600,
                              not_after=NOW + 30 * 86_400, serial=900 + n)
    return TokenGenerator(credential, device)


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, Path]:
    """A store every gateway key is registered in (bus-co, clinic) with
    the issuer trusted and a fee schedule: the location and its archive."""
    with open_settlement(tmp_path / "settle", archive=tmp_path / "archive") as s:
        s.trust_issuer(ISSUER)
        for key, operator in zip(GATEWAY_KEYS, ("bus-co", "clinic")):
            s.register_gateway(key.public, operator)
        s.set_fee_schedule(FeeSchedule(1, {scene: 100 for scene in Scene}, 0))
    return stores.location(tmp_path / "settle"), tmp_path / "archive"


@pytest.fixture
def service(tmp_path: Path, store: tuple[str, Path]) -> Any:
    location, archive = store
    proc = ServiceProcess(location, tmp_path / "service.log", archive=str(archive),
                          extra=["--deny-list-key", str(_secret_file(tmp_path, ISSUER)),
                                 "--settlement-public", SETTLEMENT_KEY.public.to_text(),
                                 "--root-public", ROOT.public.to_text()])
    proc.start()
    yield proc
    proc.stop()


def _secret_file(tmp_path: Path, key: IssuerKey) -> Path:
    path = tmp_path / "issuer.key"
    path.write_text(key.secret_text())
    path.chmod(0o600)
    return path


def _batch(key: GatewayKey, seq: int, first: int, scans: list[tuple[bytes, int]]) -> bytes:
    return sign_document(key, TAG_BATCH, {
        "v": 1, "gateway": key.public.to_bytes(), "seq": seq, "first": first,
        "last": first + len(scans) - 1, "created_at": NOW + 600,
        "records": [[first + i, token, amount, int(Scene.BUS), NOW + i]
                    for i, (token, amount) in enumerate(scans)]})


def test_uploads_answer_applied_exists_conflict_and_typed_refusals(service: Any) -> None:
    phone = _phone(1)
    batch = _batch(GATEWAY_KEYS[0], 1, 1, [(phone.make(Scene.BUS, NOW), 150)])
    with httpx.Client(base_url=service.url) as http:
        first = http.post("/v1/batches", content=batch)
        assert first.status_code == 201 and first.json() == {
            "status": "applied", "ack": True, "gateway": GATEWAY_KEYS[0].public.gateway_id,
            "seq": 1, "records": 1, "invalid": 0}
        again = http.post("/v1/batches", content=batch)
        assert again.status_code == 200 and again.json()["status"] == "exists"
        other = _batch(GATEWAY_KEYS[0], 1, 1, [(phone.make(Scene.BUS, NOW + 5), 99)])
        conflict = http.post("/v1/batches", content=other)
        assert conflict.status_code == 409 and conflict.json()["ack"] is False
        # Refused whole, each with its reason.
        stranger = _batch(GatewayKey(b"\x99" * 32), 1, 1, [(phone.make(Scene.BUS, NOW), 1)])
        assert http.post("/v1/batches", content=stranger).json()["error"] == "UNKNOWN_GATEWAY"
        forged = bytearray(_batch(GATEWAY_KEYS[1], 1, 1, [(phone.make(Scene.BUS, NOW), 1)]))
        forged[-3] ^= 1   # in the signature
        answer = http.post("/v1/batches", content=bytes(forged))
        assert answer.status_code == 403 and answer.json()["error"] == "BAD_SIGNATURE"
        answer = http.post("/v1/batches", content=b"\x93not a batch")
        assert answer.status_code == 400 and answer.json()["error"] == "MALFORMED_MESSAGE"
        # Too large: by its Content-Length, and streamed without one.
        answer = http.post("/v1/batches", content=b"\0" * (17 << 20))
        assert answer.status_code == 413 and answer.json()["error"] == "too_large"

        def chunks() -> Any:
            for _ in range(40):
                yield b"\0" * (1 << 20)
        answer = http.post("/v1/batches", content=chunks())
        assert answer.status_code == 413
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").status_code == 200
        report = http.get("/v1/periods", headers=operator_headers())
        assert report.status_code == 200 and report.json() == []
    with open_settlement(Path(service.log).parent / "settle",
                         archive=Path(service.log).parent / "archive") as s:
        assert s.batch_count() == 1 and s.report().charged_total == 150


def test_operator_endpoints_need_the_token_and_serve_periods(
        service: Any, tmp_path: Path) -> None:
    phone = _phone(2)
    extra = GatewayKey(b"\x55" * 32)
    with httpx.Client(base_url=service.url) as http:
        body = {"public": extra.public.to_text(), "operator": "ferry-co"}
        assert http.post("/v1/gateways", json=body).status_code == 401
        wrong = {"Authorization": "Bearer " + "x" * len(OPERATOR_TOKEN)}
        assert http.post("/v1/gateways", json=body, headers=wrong).status_code == 401
        made = http.post("/v1/gateways", json=body, headers=operator_headers())
        assert made.status_code == 201 and made.json()["operator"] == "ferry-co"
        assert http.post("/v1/gateways", json=body, headers=operator_headers()).status_code == 200
        bad = http.post("/v1/gateways", json={"public": "nonsense"}, headers=operator_headers())
        assert bad.status_code == 400 and bad.json()["error"] == "INVALID_KEY"
        token = phone.make(Scene.BUS, NOW)   # shown at two gateways: a double spend
        for key in (GATEWAY_KEYS[0], extra):
            assert http.post("/v1/batches", content=_batch(key, 1, 1, [(token, 200)])
                             ).status_code == 201
        # A close (by an operator's job, on the same store), then its report
        # and statements through the service.
        with open_settlement(tmp_path / "settle", archive=tmp_path / "archive") as s:
            s.close_period(NOW + 3600, SETTLEMENT_KEY, now=NOW + 3600)
        listed = http.get("/v1/periods", headers=operator_headers()).json()
        assert [p["period"] for p in listed] == [1] and listed[0]["charged_total"] == 200
        report = http.get("/v1/periods/1/report", headers=operator_headers()).json()
        assert report["charged_total"] == 200 and report["until"] == NOW + 3600
        gross = 0
        for operator in ("bus-co", "ferry-co"):
            signed = http.get(f"/v1/periods/1/statements/{operator}", headers=operator_headers())
            statement = verify_statement(signed.content, SETTLEMENT_KEY.public)
            assert statement.operator == operator
            gross += statement.gross
        assert gross == 200   # charged once, owed to the operator of one gateway
        assert [f["kind"] for f in report["findings"]] == ["double_spend"]
        csv = http.get("/v1/periods/1/statements/bus-co?format=csv", headers=operator_headers())
        assert csv.status_code == 200 and "bus-co" in csv.text
        missing = http.get("/v1/periods/2/report", headers=operator_headers())
        assert missing.status_code == 400 and missing.json()["error"] == "INVALID_ARGUMENT"
        assert http.get("/v1/periods/1/report").status_code == 401
    log = service.log.read_text()
    assert OPERATOR_TOKEN not in log and "Bearer" not in log
    lines = [line for line in map(json.loads, filter(None, log.splitlines()))
             if "method" in line]   # the access log's lines (every line is JSON)
    assert {(line["path"], line["status"]) for line in lines} >= {
        ("/v1/gateways", 401), ("/v1/gateways", 201), ("/v1/periods/1/report", 200)}


def test_a_gateway_syncs_online_queues_offline_and_keeps_a_conflict(
        service: Any, tmp_path: Path, store: tuple[str, Path]) -> None:
    phone = _phone(3)
    trust = _trust()
    with Gateway(tmp_path / "gw", GATEWAY_KEYS[1], trust, POLICY) as gateway, \
            SettlementClient(service.url, retries=1, backoff=0.01) as client:
        for i in range(5):
            gateway.scan(phone.make(Scene.CLINIC, NOW + i), 40, Scene.CLINIC, NOW + i)
        report = gateway.sync(client, now=NOW + 60, max_records=2)
        assert report.online and report.acked == 3 and report.waiting == 0
        assert [u.status for u in report.uploads] == ["applied"] * 3
        # The operator publishes a deny list; the next sync fetches it once.
        published = httpx.post(f"{service.url}/v1/deny-list", headers=operator_headers(),
                               json={"issued_at": NOW + 100, "revoke": [424242]})
        assert published.status_code == 201 and published.json()["version"] == 1
        synced = gateway.sync(client, now=NOW + 200)
        assert synced.deny_list_updated and gateway.deny_list.version == 1
        assert 424242 in gateway.deny_list
        assert not gateway.sync(client, now=NOW + 200).deny_list_updated   # 304: held
        # Offline: nothing acked, everything stays queued, then goes.
        service.stop()
        gateway.scan(phone.make(Scene.CLINIC, NOW + 300), 40, Scene.CLINIC, NOW + 300)
        offline = gateway.sync(client, now=NOW + 400)
        assert not offline.online and offline.acked == 0 and offline.waiting == 1
        service.start()
        back = gateway.sync(client, now=NOW + 500)
        assert back.online and back.acked == 1 and back.waiting == 0
        # A conflict is kept, said, and not acked.
        gateway.scan(phone.make(Scene.CLINIC, NOW + 600), 40, Scene.CLINIC, NOW + 600)
        waiting = gateway.export_batch(now=NOW + 700)
        assert waiting is not None
        seq = int(msgpack.unpackb(msgpack.unpackb(waiting)[0])["seq"])
        rival = _batch(GATEWAY_KEYS[1], seq, 7, [(phone.make(Scene.BUS, NOW + 650), 1)])
        assert httpx.post(f"{service.url}/v1/batches", content=rival).status_code == 201
        kept = gateway.sync(client, now=NOW + 800)
        assert kept.acked == 0 and kept.uploads[0].status == "conflict"
        assert gateway.unacked_records() == 1 and "conflict" in kept.problems[0]
    with open_settlement(tmp_path / "settle", archive=tmp_path / "archive") as s:
        assert s.report().records == 7   # 6 from the gateway, 1 rival; none twice


def test_readiness_says_when_the_store_is_gone(tmp_path: Path) -> None:
    settlement = open_settlement(tmp_path / "s", archive=tmp_path / "a")
    app = create_app(settlement, ServiceConfig(operator_token=OPERATOR_TOKEN))

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://service") as http:
            assert (await http.get("/readyz")).status_code == 200
            assert (await http.get("/v1/deny-list")).status_code == 404
            settlement.close()
            answer = await http.get("/readyz")
            assert answer.status_code == 503 and answer.json()["error"] == "STORE_UNAVAILABLE"
    anyio.run(run)
    assert "operator_token=***" in repr(ServiceConfig(operator_token=OPERATOR_TOKEN))
    assert OPERATOR_TOKEN not in repr(ServiceConfig(operator_token=OPERATOR_TOKEN))
    with pytest.raises(InvalidArgument):
        ServiceConfig(operator_token="short")


def test_the_sync_command_exits_by_what_happened(service: Any, tmp_path: Path) -> None:
    from qrpay.cli import main
    key_file = tmp_path / "gw.key"
    key_file.write_text(GATEWAY_KEYS[0].secret_text())
    phone = _phone(4)
    with Gateway(tmp_path / "gw", GATEWAY_KEYS[0], _trust(), POLICY) as gateway:
        gateway.scan(phone.make(Scene.BUS, NOW), 70, Scene.BUS, NOW)
    common = ["--gateway-dir", str(tmp_path / "gw"), "--gateway-key", str(key_file),
              "--issuer-public", ISSUER.public.to_text(), "--now", str(NOW + 60),
              "--retries", "0"]
    assert main(["gateway", "sync", "--server", service.url, *common]) == 0
    service.stop()
    with Gateway(tmp_path / "gw", GATEWAY_KEYS[0], _trust(), POLICY) as gateway:
        gateway.scan(phone.make(Scene.BUS, NOW + 1), 70, Scene.BUS, NOW + 1)
    assert main(["gateway", "sync", "--server", service.url, *common]) == 75
    with Gateway(tmp_path / "gw", GATEWAY_KEYS[0], _trust(), POLICY) as gateway:
        assert gateway.unacked_records() == 1


def test_a_gateway_behind_by_a_few_versions_gets_a_delta(service: Any, tmp_path: Path) -> None:
    trust = _trust()

    def publish(revoke: list[int], at: int) -> int:
        answer = httpx.post(f"{service.url}/v1/deny-list", headers=operator_headers(),
                            json={"issued_at": at, "revoke": revoke})
        assert answer.status_code == 201
        return int(answer.json()["version"])

    with Gateway(tmp_path / "gw", GATEWAY_KEYS[0], trust, POLICY) as gateway, \
            SettlementClient(service.url, retries=1, backoff=0.01) as client:
        publish([1, 2], NOW + 10)
        first = gateway.sync(client, now=NOW + 20)
        assert first.deny_list_updated and not first.deny_list_delta   # none held: whole
        publish([3], NOW + 30)
        assert publish([4], NOW + 40) == 3
        second = gateway.sync(client, now=NOW + 50)
        assert second.deny_list_updated and second.deny_list_delta
        assert gateway.deny_list.version == 3 and gateway.deny_list.serials.tolist() == [1, 2, 3, 4]
        whole = httpx.get(f"{service.url}/v1/deny-list")
        assert whole.headers["x-qrpay-deny-list-kind"] == "full"
        held = httpx.get(f"{service.url}/v1/deny-list",
                         headers={"If-None-Match": whole.headers["etag"]})
        assert held.status_code == 304
        delta = httpx.get(f"{service.url}/v1/deny-list", params={"since": "1"})
        assert delta.headers["x-qrpay-deny-list-kind"] == "delta"
        assert len(delta.content) < len(whole.content) + 200
        assert httpx.get(f"{service.url}/v1/deny-list", params={"since": "x"}).status_code == 400


def test_operators_store_trust_bundles_and_gateways_apply_them(
        service: Any, tmp_path: Path) -> None:
    rotated = IssuerKey(b"\x2b" * 32)
    roles = Role.CREDENTIALS | Role.DENY_LIST
    first = sign_trust_bundle(ROOT, 1, [TrustedKey(ISSUER.public, 0, NOW + 86_400, roles),
                                        TrustedKey(rotated.public, 0, NOW + 86_400, roles)], NOW)
    with httpx.Client(base_url=service.url) as http:
        assert http.get("/v1/trust").status_code == 404
        assert http.post("/v1/trust", content=first).status_code == 401
        assert http.post("/v1/trust", content=first, headers=operator_headers()).status_code == 201
        assert http.post("/v1/trust", content=first, headers=operator_headers()).status_code == 200
        forged = bytearray(first)
        forged[-4] ^= 1
        answer = http.post("/v1/trust", content=bytes(forged), headers=operator_headers())
        assert answer.status_code == 403 and answer.json()["error"] == "BAD_SIGNATURE"
        older = sign_trust_bundle(ROOT, 1, [], NOW - 10)
        answer = http.post("/v1/trust", content=older, headers=operator_headers())
        assert answer.status_code == 409 and answer.json()["error"] == "STALE_UPDATE"
        served = http.get("/v1/trust")
        assert served.content == first
        assert http.get("/v1/trust", headers={"If-None-Match": served.headers["etag"]}
                        ).status_code == 304
    provisioned = TrustStore()
    provisioned.add(ISSUER, roles=roles)
    device = DeviceKey(b"\x2c" * 32)
    phone = TokenGenerator(rotated.issue(account=77, device_public=device.public, limit=10_000,
                                         scenes=[Scene.BUS], not_before=NOW - 60,
                                         not_after=NOW + 86_400), device)
    with Gateway(tmp_path / "gw", GATEWAY_KEYS[1], provisioned, POLICY,
                 root=ROOT.public) as gateway, SettlementClient(service.url) as client:
        report = gateway.sync(client, now=NOW + 5)
        assert report.trust_updated and report.trust_version == 1
        assert gateway.scan(phone.make(Scene.BUS, NOW + 6), 30, Scene.BUS, now=NOW + 6).amount == 30
        assert not gateway.sync(client, now=NOW + 7).trust_updated   # 304: held


def test_settlement_commands_take_a_store_url(store: tuple[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from qrpay.cli import main
    location, archive = store
    batch = tmp_path / "batch"
    batch.write_bytes(_batch(GATEWAY_KEYS[0], 1, 1, [(_phone(5).make(Scene.BUS, NOW), 120)]))
    key = tmp_path / "settlement.key"
    key.write_text(SETTLEMENT_KEY.secret_text())
    where = ["--settlement-dir", location, "--archive", str(archive)]
    assert main(["ingest", *where, str(batch)]) == 0
    capsys.readouterr()
    assert main(["report", *where]) == 0
    assert json.loads(capsys.readouterr().out)["charged_total"] == 120
    assert main(["close", *where, "--until", str(NOW + 3600), "--settlement-key", str(key),
                 "--now", str(NOW + 3600)]) == 0
    assert json.loads(capsys.readouterr().out)["charged_total"] == 120
    if stores.kind() == "postgresql":   # its archive is not implied by the URL
        assert main(["report", "--settlement-dir", location]) == 2
