"""A gateway's online sync with the settlement service (docs/SERVICE.md):
upload every waiting batch, ack only what the server says it holds, then
fetch the deny list. Offline, nothing is lost: the batches stay queued in
the journal (export_batch returns the same bytes until they are acked) and
the next sync sends them.

Needs httpx (`pip install 'qrpay[sync]'`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("gateway sync needs httpx: pip install 'qrpay[sync]'") from exc

from qrpay.denylist import deny_list_etag
from qrpay.errors import InvalidArgument, MalformedMessage, QrPayError, Reason, StaleUpdate
from qrpay.trustbundle import bundle_etag
from qrpay.wire import split_document, unpack_strict

if TYPE_CHECKING:
    from qrpay.gateway import Gateway

RETRIED_STATUSES = frozenset({502, 503, 504})   # the server or a proxy in between, for now


class ServiceUnavailable(QrPayError, OSError):
    """The service could not be reached (or kept failing) after every retry:
    the gateway stays offline and keeps its batches."""

    reason = Reason.STORE_UNAVAILABLE


@dataclass(frozen=True)
class Upload:
    """What became of one batch: `acked` only when the server said it holds
    exactly this batch (applied now, or stored before)."""

    seq: int
    status: str        # applied, exists, conflict, refused, unavailable
    acked: bool
    http_status: int = 0
    detail: str = ""


@dataclass
class SyncReport:
    uploads: list[Upload] = field(default_factory=list)
    waiting: int = 0                # records exported or not, still unacked after the sync
    deny_list_version: int = 0      # in force after the sync
    deny_list_updated: bool = False
    deny_list_delta: bool = False   # it came as a delta on top of the one held
    trust_version: int = 0          # of the trust bundle in force (0: none)
    trust_updated: bool = False
    online: bool = True             # False: the service was not reached; try again later
    problems: list[str] = field(default_factory=list)

    @property
    def acked(self) -> int:
        return sum(u.acked for u in self.uploads)


class SettlementClient:
    """HTTP to the settlement service: one base URL (a load balancer in
    front of the replicas), or several (the replicas themselves: a try that
    fails moves on to the next). Connection failures and 502/503/504
    answers are retried `retries` times with exponential backoff and jitter
    (`backoff` seconds, doubling); then ServiceUnavailable. Other answers
    are returned as they are."""

    def __init__(self, base_url: str | Sequence[str], *, timeout: float = 10.0,
                 retries: int = 4, backoff: float = 0.25,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                               for u in urls):
            raise InvalidArgument("the service URL is http://HOST:PORT or https://..., "
                                  "or a list of them")
        if not isinstance(retries, int) or not 0 <= retries <= 20:
            raise InvalidArgument("retries is from 0 to 20")
        if not 0 < timeout <= 600 or not 0 <= backoff <= 60:
            raise InvalidArgument("timeout is in (0, 600] seconds, backoff in [0, 60]")
        self.urls = [u.rstrip("/") for u in urls]
        self.base_url = self.urls[0]
        self.retries, self.backoff, self._sleep = retries, backoff, sleep
        self._next = 0
        self._http = httpx.Client(timeout=timeout, transport=transport,
                                  headers={"User-Agent": "qrpay-gateway"})

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                self._sleep(delay * (0.5 + random.random()))   # jitter: replicas not hit in step
            url = self.urls[self._next % len(self.urls)]
            try:
                response = self._http.request(method, url + path, **kwargs)
            except httpx.TransportError as exc:
                failure = f"{url}: {type(exc).__name__}: {exc}"
                self._next += 1   # the next try goes to the next replica
                continue
            if response.status_code not in RETRIED_STATUSES:
                return response
            failure = f"{url}: HTTP {response.status_code}"
            self._next += 1
        raise ServiceUnavailable(f"{method} {path}: {failure} (after {self.retries + 1} tries)")

    def upload(self, batch: bytes) -> httpx.Response:
        return self._request("POST", "/v1/batches", content=batch,
                             headers={"Content-Type": "application/msgpack"})

    def deny_list(self, etag: str | None = None, since: int | None = None) -> httpx.Response:
        """The latest deny list: 304 if `etag` names it, a signed delta
        (header X-Qrpay-Deny-List-Kind: delta) when `since` is a recent
        version, else the whole list."""
        headers = {"If-None-Match": etag} if etag else {}
        params = {"since": str(since)} if since else {}
        return self._request("GET", "/v1/deny-list", headers=headers, params=params)

    def trust(self, etag: str | None = None) -> httpx.Response:
        """The latest trust bundle (304 if `etag` names it)."""
        headers = {"If-None-Match": etag} if etag else {}
        return self._request("GET", "/v1/trust", headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SettlementClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _batch_seq(batch: bytes) -> int:
    """The number of a batch this gateway signed (export_batch's bytes)."""
    body, _signature = split_document(batch)
    doc = unpack_strict(body, max_array=10**6)
    if not isinstance(doc, dict) or not isinstance(doc.get("seq"), int):
        raise MalformedMessage("not an upload batch")
    return int(doc["seq"])


def _uploaded(seq: int, response: httpx.Response, gateway_id: str) -> Upload:
    """Read the server's answer to one upload; ack only on a well-formed
    applied/exists answer about this very batch."""
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return Upload(seq, "refused", False, response.status_code, "the answer is not JSON")
    status = answer.get("status")
    if (response.status_code in (200, 201) and status in ("applied", "exists")
            and answer.get("ack") is True and answer.get("seq") == seq
            and answer.get("gateway") == gateway_id):
        return Upload(seq, str(status), True, response.status_code)
    if response.status_code == 409 and status == "conflict":
        return Upload(seq, "conflict", False, 409,
                      "the server holds other content under this batch number: kept, "
                      "see docs/SERVICE.md (conflicts)")
    detail = f"{answer.get('error', status)}: {answer.get('message', '')}".strip(": ")
    return Upload(seq, "refused", False, response.status_code, detail)


def sync(gateway: Gateway, client: SettlementClient, *, now: float | None = None,
         max_records: int = 1000, max_batches: int | None = None) -> SyncReport:
    """Upload the gateway's waiting batches one by one and ack each the
    server holds; stop at the first that is not (it stays queued and is sent
    first next time); then fetch and apply the deny list if it changed.
    Never raises for the network: an unreachable service is `online=False`."""
    report = SyncReport()
    gateway_id = gateway.id
    sent = 0
    while max_batches is None or sent < max_batches:
        batch = gateway.export_batch(max_records=max_records, now=now)
        if batch is None:
            break
        seq = _batch_seq(batch)
        try:
            response = client.upload(batch)
        except ServiceUnavailable as exc:
            report.online = False
            report.uploads.append(Upload(seq, "unavailable", False, 0, str(exc)))
            break
        outcome = _uploaded(seq, response, gateway_id)
        report.uploads.append(outcome)
        sent += 1
        if not outcome.acked:
            report.problems.append(f"batch {seq}: {outcome.status} "
                                   f"(HTTP {outcome.http_status}) {outcome.detail}".rstrip())
            break
        gateway.ack(seq)
    if report.online and gateway.root is not None:
        _fetch_trust(gateway, client, report, now)
    if report.online:
        _fetch_deny_list(gateway, client, report, now)
    report.waiting = gateway.unacked_records()
    report.trust_version = gateway.trust_bundle.version if gateway.trust_bundle else 0
    report.deny_list_version = gateway.deny_list.version
    return report


def _fetched(report: SyncReport, what: str, fetch: Callable[[], httpx.Response]
             ) -> httpx.Response | None:
    """A 200 answer to `fetch`, or None: 304 (held) and 404 (none yet) say
    nothing is new; an unreachable service or another status goes in the
    report."""
    try:
        response = fetch()
    except ServiceUnavailable as exc:
        report.online = False
        report.problems.append(f"{what}: {exc}")
        return None
    if response.status_code not in (200, 304, 404):
        report.problems.append(f"{what}: HTTP {response.status_code}")
    return response if response.status_code == 200 else None


def _fetch_trust(gateway: Gateway, client: SettlementClient, report: SyncReport,
                 now: float | None) -> None:
    """The trust bundle, before the deny list (which a key only the new
    bundle trusts may sign)."""
    held = gateway.trust_bundle
    response = _fetched(report, "trust bundle",
                        lambda: client.trust(bundle_etag(held.raw) if held else None))
    if response is None:
        return
    try:
        applied = gateway.update_trust(response.content, now=now)
    except StaleUpdate:
        return   # an older replica's answer: never goes back
    except QrPayError as exc:
        report.problems.append(f"trust bundle refused: {exc} ({exc.reason.name})")
        return
    report.trust_updated = held is None or applied.version != held.version


def _fetch_deny_list(gateway: Gateway, client: SettlementClient, report: SyncReport,
                     now: float | None) -> None:
    """The deny list: a delta on top of the version held when the service
    has one, else the whole list; a delta that does not apply (a replica
    with an older view, a list held that the service does not know) falls
    back to the whole list."""
    held = gateway.deny_list
    etag = deny_list_etag(held) if held.version else None
    for since in ((held.version, None) if held.version else (None,)):
        response = _fetched(report, "deny list", lambda: client.deny_list(etag, since))
        if response is None:
            return
        delta = response.headers.get("x-qrpay-deny-list-kind") == "delta"
        try:
            applied = (gateway.apply_deny_delta(response.content, now=now) if delta
                       else gateway.update_deny_list(response.content, now=now))
        except StaleUpdate:
            if delta:
                continue   # fetch the whole list
            return   # an older replica's answer, or the list held: never goes back
        except QrPayError as exc:   # does not verify: refused, the old list stays in force
            report.problems.append(f"deny list refused: {exc} ({exc.reason.name})")
            if delta:
                continue
            return
        report.deny_list_updated = applied.version != held.version
        report.deny_list_delta = delta
        return
