"""Prometheus metrics for gateways and the settlement service, through
prometheus_client (an extra: `pip install 'qrpay[metrics]'`). This module
imports without it; what needs it raises ImportError saying what to
install, and `available()` tells beforehand.

- `GatewayMetrics`: counters and histograms a running gateway updates once
  per scan call and once per journal commit (never per token), and gauges
  read when Prometheus scrapes. Serve its `registry` the way your process
  serves metrics (prometheus_client.start_http_server, or a route).
- `ServiceMetrics`: what `qrpay serve` counts and serves on GET /metrics.
- `status_exposition` and `write_textfile`: the figures of `qrpay gateway
  status` in the text format, written whole for the node exporter's
  textfile collector.

Labels carry gateway ids (public), reason names and HTTP statuses: never a
token, a key, an account number or an operator token. docs/OPERATIONS.md
lists every metric.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from qrpay.errors import QrPayError, Reason

if TYPE_CHECKING:
    from qrpay.gateway import Gateway

INSTALL_HINT = "pip install 'qrpay[metrics]'"

# Seconds. A single scan commits in about a millisecond on an SSD (an
# fsync); a batch of a few hundred tokens takes tens of milliseconds.
SCAN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5)
UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Per-token reasons a scan can refuse with: counted from zero, so a rate
# over a reason not seen yet is 0 rather than absent.
TOKEN_REFUSALS = tuple(r for r in Reason if Reason.OK < r < Reason.CLOCK_UNTRUSTED) + (
    Reason.MALFORMED_TEXT,)

# `qrpay gateway status --metrics`: every gauge it writes, with its help
# text; each has the label `gateway` (the gateway id).
STATUS_GAUGES: dict[str, str] = {
    "qrpay_gateway_unacked_records":
        "Records settlement does not hold yet as far as the gateway knows (as "
        "Gateway.unacked_records).",
    "qrpay_gateway_records_since_ack":
        "Records journaled after the last acknowledged batch (they count against "
        "offline limits).",
    "qrpay_gateway_records_not_exported":
        "Records not yet in any upload batch.",
    "qrpay_gateway_unacked_batches":
        "Upload batches exported and not acknowledged.",
    "qrpay_gateway_last_record":
        "Number of the latest record journaled (records are numbered from 1, never reused).",
    "qrpay_gateway_offline_accounts":
        "Accounts with offline spend since the last ack.",
    "qrpay_gateway_offline_spend":
        "Offline spend since the last ack, all accounts, in minor units.",
    "qrpay_gateway_offline_spend_max":
        "The largest offline spend of one account since the last ack, in minor units.",
    "qrpay_gateway_deny_list_version":
        "Version of the deny list in force (0: none yet).",
    "qrpay_gateway_deny_list_serials":
        "Credential serials in the deny list in force.",
    "qrpay_gateway_deny_list_age_seconds":
        "Seconds since the deny list in force was issued, when the status was read "
        "(since 1970 when there is none: the gateway treats that as stale).",
    "qrpay_gateway_deny_list_issued_timestamp_seconds":
        "Unix time the deny list in force was issued (0: none).",
    "qrpay_gateway_time_floor_timestamp_seconds":
        "The gateway's trusted time floor, Unix seconds.",
    "qrpay_gateway_journal_bytes":
        "Size of the journal on disk: the database file and its write-ahead log.",
    "qrpay_gateway_last_sync_timestamp_seconds":
        "Unix time of the last sync with the settlement service that had no problem "
        "(0: never).",
    "qrpay_gateway_status_timestamp_seconds":
        "Unix time the status was read.",
}


def available() -> bool:
    """Whether prometheus_client can be imported."""
    try:
        _prometheus()
    except ImportError:
        return False
    return True


def _prometheus() -> Any:
    # Imported when used, as Any: qrpay runs without it, and mypy passes
    # whether or not it is installed.
    try:
        return importlib.import_module("prometheus_client")
    except ImportError as exc:
        raise ImportError(f"Prometheus metrics need prometheus_client: {INSTALL_HINT}") from exc


def _reason_label(value: int) -> str:
    try:
        return Reason(value).name.lower()
    except ValueError:
        return str(value)


# -- gateways ---------------------------------------------------------------------------------

class GatewayMetrics:
    """The metrics of the gateways a process runs, in one registry (a new
    one unless `registry` is given, e.g. prometheus_client.REGISTRY). Call
    `watch(gateway)` for each open gateway; series carry its id in the
    `gateway` label. `clock` is what the deny-list age is measured against."""

    def __init__(self, registry: Any = None, clock: Callable[[], float] = time.time) -> None:
        prom = _prometheus()
        self.registry: Any = prom.CollectorRegistry() if registry is None else registry
        self._clock = clock
        into = {"registry": self.registry}
        self.scanned = prom.Counter(
            "qrpay_gateway_scanned_tokens_total",
            "Tokens a gateway scanned (scan and scan_batch), accepted or not.",
            ["gateway"], **into)
        self.refused = prom.Counter(
            "qrpay_gateway_refused_tokens_total",
            "Tokens a gateway refused, by reason (a qrpay Reason name in lower case).",
            ["gateway", "reason"], **into)
        self.failures = prom.Counter(
            "qrpay_gateway_scan_failures_total",
            "Scan calls that raised for the whole batch (clock_untrusted, "
            "journal_unavailable, invalid_argument, ...): nothing in them was accepted.",
            ["gateway", "reason"], **into)
        self.scan_seconds = prom.Histogram(
            "qrpay_gateway_scan_seconds",
            "Duration of a scan or scan_batch call (verification, checks and the journal "
            "commit).", ["gateway"], buckets=SCAN_BUCKETS, **into)
        self.commit_seconds = prom.Histogram(
            "qrpay_gateway_journal_commit_seconds",
            "Duration of a journal transaction (scans, exports, acks, deny-list updates), "
            "fsync included.", ["gateway"], buckets=COMMIT_BUCKETS, **into)
        self.unacked = prom.Gauge(
            "qrpay_gateway_unacked_records",
            "Records settlement does not hold yet as far as the gateway knows.",
            ["gateway"], **into)
        self.deny_age = prom.Gauge(
            "qrpay_gateway_deny_list_age_seconds",
            "Seconds since the deny list in force was issued (since 1970 when there is none: "
            "the gateway treats that as stale).", ["gateway"], **into)
        self.deny_version = prom.Gauge(
            "qrpay_gateway_deny_list_version",
            "Version of the deny list in force (0: none yet).", ["gateway"], **into)

    def watch(self, gateway: Gateway) -> None:
        """Count what `gateway` does from now on and report its gauges."""
        gid = gateway.id
        self.scanned.labels(gid)
        for reason in TOKEN_REFUSALS:
            self.refused.labels(gid, _reason_label(reason))
        gateway.observer = _GatewayObserver(self, gid)
        self.unacked.labels(gid).set_function(_reading(gateway.unacked_records))
        self.deny_age.labels(gid).set_function(
            _reading(lambda: self._clock() - gateway.deny_list.issued_at))
        self.deny_version.labels(gid).set_function(lambda: gateway.deny_list.version)

    def forget(self, gateway: Gateway) -> None:
        """Stop watching `gateway` and drop its series (after closing it)."""
        if isinstance(gateway.observer, _GatewayObserver):
            gateway.observer = None
        gid = gateway.id
        for metric in (self.scanned, self.scan_seconds, self.commit_seconds, self.unacked,
                       self.deny_age, self.deny_version):
            _remove(metric, gid)
        for metric in (self.refused, self.failures):
            for reason in Reason:
                _remove(metric, gid, _reason_label(reason))

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return bytes(_prometheus().generate_latest(self.registry))


def watch_gateway(gateway: Gateway, registry: Any = None) -> GatewayMetrics:
    """Metrics for one gateway: `watch_gateway(gw).registry` is what to serve."""
    found = GatewayMetrics(registry)
    found.watch(gateway)
    return found


class _GatewayObserver:
    """The gateway's observer (gateway.GatewayObserver): the label children
    are looked up once, so a scan call costs a few counter increments and
    one histogram observation, whatever its size."""

    __slots__ = ("_metrics", "_gateway", "_scanned", "_refused", "_scan", "_commit")

    def __init__(self, metrics: GatewayMetrics, gateway: str) -> None:
        self._metrics, self._gateway = metrics, gateway
        self._scanned = metrics.scanned.labels(gateway)
        self._refused: dict[int, Any] = {}
        self._scan = metrics.scan_seconds.labels(gateway)
        self._commit = metrics.commit_seconds.labels(gateway)

    def _refusal(self, reason: int) -> Any:
        child = self._refused.get(reason)
        if child is None:
            child = self._refused[reason] = self._metrics.refused.labels(
                self._gateway, _reason_label(reason))
        return child

    def scanned(self, reasons: npt.NDArray[np.uint8], seconds: float) -> None:
        n = len(reasons)
        if n == 1:   # Gateway.scan: no array work for one token
            self._scanned.inc()
            if reasons[0]:
                self._refusal(int(reasons[0])).inc()
        elif n:
            self._scanned.inc(n)
            counts = np.bincount(reasons)
            for reason in np.flatnonzero(counts[1:]).tolist():
                self._refusal(reason + 1).inc(int(counts[reason + 1]))
        self._scan.observe(seconds)

    def scan_failed(self, reason: Reason) -> None:
        self._metrics.failures.labels(self._gateway, _reason_label(reason)).inc()

    def committed(self, seconds: float) -> None:
        self._commit.observe(seconds)


def _reading(read: Callable[[], float]) -> Callable[[], float]:
    """A gauge's callback that reads NaN when the gateway cannot answer
    (closed, its journal unavailable) instead of failing the scrape."""
    def value() -> float:
        try:
            return float(read())
        except QrPayError:
            return math.nan
    return value


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


# -- the service ------------------------------------------------------------------------------

class ServiceMetrics:
    """What `qrpay serve` counts (one registry per app): batch uploads by
    HTTP status and their duration, and the process's own figures (CPU,
    memory, open files, Python's garbage collector)."""

    UPLOAD_PATH = "/v1/batches"

    def __init__(self) -> None:
        prom = _prometheus()
        self.registry: Any = prom.CollectorRegistry()
        into = {"registry": self.registry}
        self.uploads = prom.Counter(
            "qrpay_service_uploads_total",
            "Batch uploads (POST /v1/batches) answered, by HTTP status: 201 applied, 200 "
            "already held, 409 conflict, 4xx refused, 503 store unavailable.",
            ["status"], **into)
        self.upload_seconds = prom.Histogram(
            "qrpay_service_upload_seconds",
            "Duration of a batch upload, from the request to the last byte of the answer.",
            buckets=UPLOAD_BUCKETS, **into)
        prom.ProcessCollector(registry=self.registry)
        prom.PlatformCollector(registry=self.registry)
        prom.GCCollector(registry=self.registry)

    def request(self, method: str, path: str, status: int, seconds: float) -> None:
        """One answered request (the service's access log calls this)."""
        if method == "POST" and path == self.UPLOAD_PATH:
            self.uploads.labels(str(status)).inc()
            self.upload_seconds.observe(seconds)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format the scraper's Accept header asks for
        (the Prometheus text format, or OpenMetrics), and its content type."""
        encoder, content_type = importlib.import_module(
            "prometheus_client.exposition").choose_encoder(accept)
        return bytes(encoder(self.registry)), str(content_type)


# -- the textfile collector -------------------------------------------------------------------

def status_exposition(gateway: str, values: Mapping[str, float]) -> bytes:
    """Gauges named in STATUS_GAUGES (each labelled gateway=`gateway`) in
    the Prometheus text format."""
    prom = _prometheus()
    registry = prom.CollectorRegistry()
    for name, value in values.items():
        if name not in STATUS_GAUGES:
            raise ValueError(f"{name} is not a status gauge")
        prom.Gauge(name, STATUS_GAUGES[name], ["gateway"], registry=registry
                   ).labels(gateway).set(value)
    return bytes(prom.generate_latest(registry))


def write_textfile(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` whole: into a temporary file in the same
    directory (named `.NAME.*`, which the textfile collector skips: it reads
    only `*.prom`), then renamed over `path`, so the collector reads the old
    file or the new one, never half of one. Readable by all (the node
    exporter runs as its own user); metrics hold nothing secret."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
