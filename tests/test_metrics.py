"""Prometheus metrics: a gateway's counters, histograms and gauges moving
with its scans, refusals and commits (qrpay.metrics.GatewayMetrics); the
service's GET /metrics after uploads, served by `qrpay serve` as a real
process; qrpay without prometheus_client."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qrpay import GatewayKey, Reason, Scene, encode_text
from qrpay.denylist import sign_deny_list
from qrpay.errors import ClockUntrusted, Revoked, SceneMismatch
from qrpay.format import TAG_BATCH
from qrpay.gateway import Gateway, GatewayPolicy
from qrpay.metrics import TOKEN_REFUSALS, GatewayMetrics, watch_gateway
from qrpay.settlement import Settlement
from qrpay.wire import sign_document
from service_proc import OPERATOR_TOKEN, ServiceProcess

from test_service import ISSUER, NOW, _phone, _trust   # one issuer and phones for all
GATEWAY_KEY = GatewayKey(b"\x46" * 32)
POLICY = GatewayPolicy(deny_list_max_age=None, max_offline_uses=10**6)


class Samples:
    def __init__(self, metrics: GatewayMetrics, gateway: str) -> None:
        self.registry, self.gateway = metrics.registry, gateway

    def __call__(self, name: str, **labels: str) -> float | None:
        value = self.registry.get_sample_value(name, {"gateway": self.gateway, **labels})
        return None if value is None else float(value)

    def refused(self, reason: str) -> float | None:
        return self("qrpay_gateway_refused_tokens_total", reason=reason)


def test_counters_and_histograms_move_with_scans_refusals_and_commits(tmp_path: Path) -> None:
    phones = [_phone(n) for n in (1, 2, 3)]
    with Gateway(tmp_path / "gw", GATEWAY_KEY, _trust(), POLICY) as gateway:
        metrics = watch_gateway(gateway)
        got = Samples(metrics, gateway.id)
        # Every per-token reason is there from the start, at 0.
        assert all(got.refused(r.name.lower()) == 0 for r in TOKEN_REFUSALS)
        assert got("qrpay_gateway_scanned_tokens_total") == 0
        gateway.update_deny_list(sign_deny_list(ISSUER, 1, [902], NOW), now=NOW)   # commit 1

        token = phones[0].make(Scene.BUS, NOW)
        gateway.scan(token, 100, Scene.BUS, NOW)                        # accepted: commit 2
        gateway.scan(token, 100, Scene.BUS, NOW)                        # a double tap: accepted
        with pytest.raises(Revoked):
            gateway.scan(phones[1].make(Scene.BUS, NOW), 100, Scene.BUS, NOW)
        with pytest.raises(SceneMismatch):
            gateway.scan(phones[2].make(Scene.CLINIC, NOW), 100, Scene.BUS, NOW)
        batch = [phones[2].make(Scene.BUS, NOW + 1), phones[0].make(Scene.BUS, NOW + 1),
                 phones[1].make(Scene.BUS, NOW + 1), "QP:not base45!", b"\x00" * 7,
                 phones[2].make(Scene.BUS, NOW + 1)]
        result = gateway.scan_batch(batch, [50, 10**5, 60, 1, 1, 70], Scene.BUS, NOW + 1)
        assert result.reasons.tolist() == [                            # commit 3
            Reason.OK, Reason.OVER_TRANSACTION_CAP, Reason.REVOKED, Reason.MALFORMED_TEXT,
            Reason.WRONG_LENGTH, Reason.OK]
        with pytest.raises(ClockUntrusted):
            gateway.scan(phones[0].make(Scene.BUS, NOW), 1, Scene.BUS, NOW - 3600)
        assert gateway.export_batch(now=NOW + 2) is not None             # commit 4
        gateway.ack(1)                                                   # commits 5, 6 (prune)

        assert got("qrpay_gateway_scanned_tokens_total") == 4 + 6
        assert got.refused("revoked") == 2
        assert got.refused("scene_mismatch") == 1
        assert got.refused("over_transaction_cap") == 1
        assert got.refused("malformed_text") == 1
        assert got.refused("wrong_length") == 1
        assert got.refused("already_accepted") == 0
        total = sum(got.refused(r.name.lower()) or 0 for r in Reason)
        assert total == 6   # refused = scanned - accepted (3 + the double tap)
        assert got("qrpay_gateway_scan_failures_total", reason="clock_untrusted") == 1
        # One observation per call that returned, and one per commit.
        assert got("qrpay_gateway_scan_seconds_count") == 5
        assert got("qrpay_gateway_journal_commit_seconds_count") == 6
        assert 0 < (got("qrpay_gateway_journal_commit_seconds_sum") or 0) <= (
            got("qrpay_gateway_scan_seconds_sum") or 0) + 10
        slow = got("qrpay_gateway_scan_seconds_bucket", le="+Inf")
        assert slow == 5
        # The same figures in the text format Prometheus scrapes.
        families = {f.name: f for f in text_string_to_metric_families(
            metrics.exposition().decode())}
        assert families["qrpay_gateway_scanned_tokens"].type == "counter"
        assert families["qrpay_gateway_scan_seconds"].type == "histogram"
        assert families["qrpay_gateway_journal_commit_seconds"].type == "histogram"
        assert families["qrpay_gateway_unacked_records"].type == "gauge"


def test_gauges_are_read_at_scrape_time(tmp_path: Path) -> None:
    clock = [float(NOW + 500)]
    gateway = Gateway(tmp_path / "gw", GATEWAY_KEY, _trust(), POLICY)
    metrics = GatewayMetrics(clock=lambda: clock[0])
    metrics.watch(gateway)
    got = Samples(metrics, gateway.id)
    # No deny list: as old as 1970, which the gateway treats as stale.
    assert got("qrpay_gateway_deny_list_version") == 0
    assert got("qrpay_gateway_deny_list_age_seconds") == NOW + 500
    phone = _phone(1)
    for i in range(3):
        gateway.scan(phone.make(Scene.BUS, NOW + i), 10, Scene.BUS, NOW + i)
    assert got("qrpay_gateway_unacked_records") == gateway.unacked_records() == 3
    gateway.update_deny_list(sign_deny_list(ISSUER, 4, [1], NOW + 100), now=NOW + 100)
    assert got("qrpay_gateway_deny_list_version") == 4
    assert got("qrpay_gateway_deny_list_age_seconds") == 400
    clock[0] += 60
    assert got("qrpay_gateway_deny_list_age_seconds") == 460
    gateway.export_batch(now=NOW + 200)
    gateway.ack(1)
    assert got("qrpay_gateway_unacked_records") == 0
    gateway.close()
    # A closed gateway does not fail the scrape: its count reads NaN.
    value = got("qrpay_gateway_unacked_records")
    assert value is not None and math.isnan(value)
    metrics.forget(gateway)
    assert gateway.observer is None
    text = metrics.exposition().decode()
    assert gateway.id not in text


def test_two_gateways_share_a_registry(tmp_path: Path) -> None:
    metrics = GatewayMetrics()
    other_key = GatewayKey(b"\x47" * 32)
    with Gateway(tmp_path / "a", GATEWAY_KEY, _trust(), POLICY) as a, \
            Gateway(tmp_path / "b", other_key, _trust(), POLICY) as b:
        metrics.watch(a)
        metrics.watch(b)
        a.scan(_phone(1).make(Scene.BUS, NOW), 10, Scene.BUS, NOW)
        b.scan_batch([_phone(2).make(Scene.BUS, NOW) for _ in range(4)], [1] * 4, Scene.BUS,
                     NOW)
        assert Samples(metrics, a.id)("qrpay_gateway_scanned_tokens_total") == 1
        assert Samples(metrics, b.id)("qrpay_gateway_scanned_tokens_total") == 4


class Broken:
    def scanned(self, reasons: np.ndarray, seconds: float) -> None:
        raise RuntimeError("monitoring is down")

    def scan_failed(self, reason: Reason) -> None:
        raise RuntimeError("monitoring is down")

    def committed(self, seconds: float) -> None:
        raise RuntimeError("monitoring is down")


def test_an_observer_that_fails_never_costs_a_receipt(tmp_path: Path) -> None:
    with Gateway(tmp_path / "gw", GATEWAY_KEY, _trust(), POLICY) as gateway:
        gateway.observer = Broken()
        receipt = gateway.scan(_phone(1).make(Scene.BUS, NOW), 10, Scene.BUS, NOW)
        with pytest.raises(ClockUntrusted):   # its own error, not the observer's
            gateway.scan(_phone(1).make(Scene.BUS, NOW), 10, Scene.BUS, NOW - 3600)
        assert [r.seq for r in gateway.records()] == [receipt.record]
    with Gateway(tmp_path / "gw", GATEWAY_KEY, _trust(), POLICY) as gateway:
        assert len(gateway.records()) == 1 and gateway.offline_spend(7001) == (10, 1)


# -- the service ----------------------------------------------------------------------------

def _batch(key: GatewayKey, seq: int, scans: list[tuple[bytes, int]]) -> bytes:
    return sign_document(key, TAG_BATCH, {
        "v": 1, "gateway": key.public.to_bytes(), "seq": seq, "first": 1,
        "last": len(scans), "created_at": NOW + 600,
        "records": [[1 + i, token, amount, int(Scene.BUS), NOW + i]
                    for i, (token, amount) in enumerate(scans)]})


def test_service_metrics_count_uploads_by_status(tmp_path: Path) -> None:
    with Settlement(tmp_path / "settle") as settlement:
        settlement.trust_issuer(ISSUER)
        settlement.register_gateway(GATEWAY_KEY.public, "bus-co")
    service = ServiceProcess(str(tmp_path / "settle"), tmp_path / "service.log").start()
    phone = _phone(1)
    token = phone.make(Scene.BUS, NOW)
    try:
        with httpx.Client(base_url=service.url) as http:
            empty = http.get("/metrics")   # no token needed, like /healthz
            assert empty.status_code == 200
            assert empty.headers["content-type"].startswith("text/plain; version=0.0.4")
            batch = _batch(GATEWAY_KEY, 1, [(token, 150)])
            statuses = [http.post("/v1/batches", content=body).status_code for body in (
                batch, batch,                                                  # 201, 200
                _batch(GATEWAY_KEY, 1, [(phone.make(Scene.BUS, NOW + 5), 9)]),  # 409
                _batch(GatewayKey(b"\x99" * 32), 1, [(token, 1)]),              # 403
                b"\x93not a batch")]                                           # 400
            assert statuses == [201, 200, 409, 403, 400]
            http.get("/healthz")
            page = http.get("/metrics")
            # OpenMetrics, for a scraper that asks for it.
            open_metrics = http.get("/metrics", headers={
                "Accept": "application/openmetrics-text; version=1.0.0"})
    finally:
        service.stop()
    assert page.status_code == 200
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")
    assert "qrpay_service_uploads_total{status=\"409\"} 1.0" in open_metrics.text
    families = {f.name: f for f in text_string_to_metric_families(page.text)}
    uploads = {s.labels["status"]: s.value for s in families["qrpay_service_uploads"].samples
               if s.name == "qrpay_service_uploads_total"}
    assert uploads == {"201": 1, "200": 1, "409": 1, "403": 1, "400": 1}
    assert families["qrpay_service_uploads"].type == "counter"
    seconds = {s.name: s.value for s in families["qrpay_service_upload_seconds"].samples
               if not s.labels}
    assert seconds["qrpay_service_upload_seconds_count"] == 5
    assert "process_cpu_seconds" in families and "python_info" in families
    # Counts only: no operator token, no token (bytes or text), no key.
    assert OPERATOR_TOKEN not in page.text
    assert encode_text(token) not in page.text and token.hex() not in page.text
    assert GATEWAY_KEY.public.to_text() not in page.text


# -- without prometheus_client --------------------------------------------------------------

WITHOUT = textwrap.dedent("""
    import sys

    class NoPrometheus:
        def find_spec(self, name, path=None, target=None):
            if name == "prometheus_client" or name.startswith("prometheus_client."):
                raise ImportError("prometheus_client is not installed (test)")
            return None

    sys.meta_path.insert(0, NoPrometheus())

    import qrpay, qrpay.gateway, qrpay.service, qrpay.cli_status
    from qrpay import metrics
    assert not metrics.available()
    try:
        metrics.GatewayMetrics()
    except ImportError as exc:
        assert "pip install 'qrpay[metrics]'" in str(exc), exc
    else:
        raise AssertionError("GatewayMetrics without prometheus_client")

    from starlette.testclient import TestClient
    from qrpay.service import ServiceConfig, create_app
    from qrpay.settlement import Settlement
    with Settlement(sys.argv[1]) as settlement:
        app = create_app(settlement, ServiceConfig(operator_token="t" * 20))
        with TestClient(app) as http:
            answer = http.get("/metrics")
            assert answer.status_code == 501, answer.status_code
            assert answer.json()["error"] == "no_metrics"
            assert http.get("/healthz").status_code == 200

    from qrpay import cli
    assert cli.main(["gateway", "status", "--gateway-dir", sys.argv[2]]) == 0
    assert cli.main(["gateway", "status", "--gateway-dir", sys.argv[2], "--metrics", "-"]) == 2
    print("ok")
""")


def test_qrpay_runs_without_prometheus_client(tmp_path: Path) -> None:
    with Gateway(tmp_path / "gw", GATEWAY_KEY, _trust(), POLICY) as gateway:
        gateway.scan(_phone(1).make(Scene.BUS, NOW), 10, Scene.BUS, NOW)
    run = subprocess.run([sys.executable, "-c", WITHOUT, str(tmp_path / "settle"),
                          str(tmp_path / "gw")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "ok"
    assert "--metrics needs prometheus_client: pip install 'qrpay[metrics]'" in run.stderr
