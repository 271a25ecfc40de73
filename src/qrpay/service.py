"""The settlement service: gateways upload their signed batches and fetch
the deny list over HTTP; operators register gateways, publish deny lists
and read closed periods. An ASGI application (Starlette), served by uvicorn
through `qrpay serve`; several replicas share one PostgreSQL store.
docs/SERVICE.md lists every endpoint and status.

Gateway endpoints need no credentials: what they send is signed (a batch by
its gateway's key) and what they fetch is signed (the deny list by an
issuer key). Operator endpoints need the bearer token of the server's
configuration. Nothing a request carries (tokens, the bearer token, batch
bytes) is logged: the access log has the method, path, status, sizes and
time of each request.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qrpay import clearing, metrics
from qrpay.denylist import DenyList, deny_list_etag
from qrpay.errors import (
    BadSignature, Conflict, InvalidArgument, MalformedMessage, PeriodClosed, QrPayError,
    StaleUpdate, StoreUnavailable, UnknownGateway, UnknownKeyId,
)
from qrpay.keys import GatewayPublicKey, IssuerKey, RootPublicKey, SettlementPublicKey
from qrpay.settlement import IngestResult, IngestStatus, Settlement
from qrpay.trustbundle import bundle_etag

MAX_BATCH_BODY = 16 << 20   # bytes: a batch of 100,000 records is about 12 MB
MAX_JSON_BODY = 64 << 10
RETRY_AFTER = 5             # seconds a gateway waits after a 503
ACCESS_LOG = logging.getLogger("qrpay.access")
MSGPACK = "application/msgpack"


@dataclass(frozen=True)
class ServiceConfig:
    """What `create_app` serves. `operator_token` guards the operator
    endpoints (never logged nor shown in a repr); `deny_list_key`, when
    given, lets operators publish deny lists through the service."""

    operator_token: str
    max_batch_body: int = MAX_BATCH_BODY
    deny_list_key: IssuerKey | None = None
    settlement_public: SettlementPublicKey | None = None   # for CSV statements
    root_public: RootPublicKey | None = None   # verifies trust bundles operators upload

    def __post_init__(self) -> None:
        if not isinstance(self.operator_token, str) or len(self.operator_token) < 16:
            raise InvalidArgument("the operator token is a string of 16 characters or more")
        if not isinstance(self.max_batch_body, int) or not 1024 <= self.max_batch_body <= 1 << 30:
            raise InvalidArgument("max_batch_body is from 1 KiB to 1 GiB")
        if self.deny_list_key is not None and not isinstance(self.deny_list_key, IssuerKey):
            raise InvalidArgument("deny_list_key is an IssuerKey")
        if self.settlement_public is not None and not isinstance(self.settlement_public,
                                                                 SettlementPublicKey):
            raise InvalidArgument("settlement_public is a SettlementPublicKey")
        if self.root_public is not None and not isinstance(self.root_public, RootPublicKey):
            raise InvalidArgument("root_public is a RootPublicKey")

    def __repr__(self) -> str:
        return (f"ServiceConfig(operator_token=***, max_batch_body={self.max_batch_body}, "
                f"deny_list_key={'***' if self.deny_list_key else None})")


class TooLarge(Exception):
    pass


def _error(status: int, exc_or_reason: QrPayError | str, message: str = "",
           headers: dict[str, str] | None = None) -> JSONResponse:
    """An error body a client can act on: `reason` (a qrpay Reason name, or
    one of the service's own in lower case) and a message."""
    if isinstance(exc_or_reason, QrPayError):
        reason, message = exc_or_reason.reason.name, str(exc_or_reason)
    else:
        reason = exc_or_reason
    return JSONResponse({"error": reason, "message": message}, status_code=status,
                        headers=headers)


_INGEST_STATUS = {IngestStatus.APPLIED: 201, IngestStatus.EXISTS: 200,
                  IngestStatus.CONFLICT: 409}


def _ingested(result: IngestResult) -> JSONResponse:
    # A gateway acks on applied or exists (the server holds the batch), and
    # keeps a conflicting batch: its content is not what the server holds.
    return JSONResponse({"status": result.status.value, "ack": result.status is not
                         IngestStatus.CONFLICT, "gateway": result.gateway, "seq": result.seq,
                         "records": result.records, "invalid": result.invalid},
                        status_code=_INGEST_STATUS[result.status])


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (TooLarge) once it passes `limit` bytes:
    by its Content-Length before any of it is read, or while it streams."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settlement: Settlement, config: ServiceConfig) -> Starlette:
    """The service over `settlement` (one store, opened by the caller, shared
    by the requests of this process: its calls take turns on its connection,
    and the token checks of an upload run in parallel outside it)."""

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.encode(), config.operator_token.encode())

    def operator(handler: Callable[[Request], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            if not authorized(request):
                return _error(401, "unauthorized", "operator endpoints need "
                              "'Authorization: Bearer TOKEN'",
                              headers={"WWW-Authenticate": "Bearer"})
            return await handler(request)
        return guarded

    # -- gateways ---------------------------------------------------------------------------

    async def upload_batch(request: Request) -> Response:
        try:
            body = await _body(request, config.max_batch_body)
        except TooLarge:
            return _error(413, "too_large", f"a batch body is at most {config.max_batch_body} "
                          "bytes: export smaller batches")
        except ClientDisconnect:
            return Response(status_code=400)
        try:
            result = await run_in_threadpool(settlement.ingest, body)
        except (MalformedMessage, InvalidArgument) as exc:
            return _error(400, exc)
        except (UnknownGateway, BadSignature) as exc:
            return _error(403, exc)
        except UnknownKeyId as exc:
            # Settlement lacks an issuer key: nothing stored, the gateway
            # keeps the batch and uploads it again later.
            return _error(422, exc)
        except StoreUnavailable as exc:
            return _unavailable(exc)
        return _ingested(result)

    # The latest deny list parsed (its signature checked, its serials read)
    # and its tag, kept while it is the latest: a version never changes, and
    # every gateway's sync asks for it.
    parsed: list[tuple[DenyList, str]] = []

    async def latest_deny_list() -> tuple[DenyList, str] | None:
        version = await run_in_threadpool(settlement.deny_list_version)
        if not version:
            return None
        if not parsed or parsed[0][0].version != version:
            current = await run_in_threadpool(settlement.deny_list)
            if current is None:   # not after a version was read: lists are never deleted
                return None
            parsed[:] = [(current, deny_list_etag(current))]
        return parsed[0]

    async def deny_list(request: Request) -> Response:
        try:
            latest = await latest_deny_list()
        except StoreUnavailable as exc:
            return _unavailable(exc)
        if latest is None:
            return _error(404, "no_deny_list", "no deny list is published yet")
        current, tag = latest
        headers = {"ETag": tag, "Cache-Control": "no-cache",
                   "X-Qrpay-Deny-List-Version": str(current.version)}
        if _held(request, tag):
            return Response(status_code=304, headers=headers)
        since = request.query_params.get("since")
        if since is not None:
            if not since.isdigit() or len(since) > 18:
                return _error(400, "INVALID_ARGUMENT", "since is a deny-list version")
            delta = (await run_in_threadpool(settlement.deny_list_delta, int(since))
                     if int(since) < current.version else None)
            if delta is not None:
                return Response(delta, media_type=MSGPACK,
                                headers={**headers, "X-Qrpay-Deny-List-Kind": "delta"})
        # Too far behind for a delta (or none asked for): the whole list.
        return Response(current.raw, media_type=MSGPACK,
                        headers={**headers, "X-Qrpay-Deny-List-Kind": "full"})

    async def trust(request: Request) -> Response:
        try:
            latest = await run_in_threadpool(settlement.trust_bundle)
        except StoreUnavailable as exc:
            return _unavailable(exc)
        if latest is None:
            return _error(404, "no_trust_bundle", "no trust bundle is stored yet")
        tag = bundle_etag(latest)
        headers = {"ETag": tag, "Cache-Control": "no-cache"}
        if _held(request, tag):
            return Response(status_code=304, headers=headers)
        return Response(latest, media_type=MSGPACK, headers=headers)

    # -- operators --------------------------------------------------------------------------

    async def store_trust(request: Request) -> Response:
        if config.root_public is None:
            return _error(501, "no_root_public", "this server cannot verify trust bundles: "
                          "start it with --root-public KEY")
        try:
            body = await _body(request, 1 << 20)
        except TooLarge:
            return _error(413, "too_large", "a trust bundle is at most 1 MiB")
        try:
            stored = await run_in_threadpool(settlement.store_trust_bundle, body,
                                             config.root_public)
        except BadSignature as exc:
            return _error(403, exc)
        return JSONResponse({"stored": stored}, status_code=201 if stored else 200)

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await _body(request, MAX_JSON_BODY))
        except (TooLarge, ValueError, ClientDisconnect):
            raise InvalidArgument("the body is one JSON object (at most 64 KiB)") from None
        if not isinstance(data, dict):
            raise InvalidArgument("the body is one JSON object")
        return data

    async def register_gateway(request: Request) -> Response:
        data = await json_body(request)
        public, op = data.get("public"), data.get("operator")
        if not isinstance(public, str):
            raise InvalidArgument('"public" is a gateway public key in text form')
        key = GatewayPublicKey.from_text(public)
        known = key.gateway_id in await run_in_threadpool(settlement.gateways)
        gateway_id = await run_in_threadpool(settlement.register_gateway, key, op)
        return JSONResponse({"gateway": gateway_id, "operator": op},
                            status_code=200 if known else 201)

    async def publish_deny_list(request: Request) -> Response:
        if config.deny_list_key is None:
            return _error(501, "no_deny_list_key", "this server holds no deny-list key: "
                          "start it with one (qrpay serve --deny-list-key FILE)")
        data = await json_body(request)
        issued_at = data.get("issued_at", int(time.time()))
        revoke = data.get("revoke", [])
        if not isinstance(revoke, list):
            raise InvalidArgument('"revoke" is a list of serials')
        document, added = await run_in_threadpool(
            settlement.publish_deny_list, config.deny_list_key, issued_at, revoke)
        # The version this call published (another replica may publish the next meanwhile).
        version = DenyList.reload(document, settlement.trust).version
        return JSONResponse({"version": version, "added": len(added)}, status_code=201)

    async def periods(request: Request) -> Response:
        closed = await run_in_threadpool(settlement.periods)
        return JSONResponse([{"period": p.number, "from": p.from_time, "until": p.until,
                              "closed_at": p.closed_at, "records": p.records,
                              "charged_total": p.charged_total,
                              "not_charged_total": p.rejected_total} for p in closed])

    async def period_report(request: Request) -> Response:
        number = _number(request.path_params["number"])
        report = await run_in_threadpool(settlement.period_report, number)
        return JSONResponse(report.as_dict())

    async def statement(request: Request) -> Response:
        number = _number(request.path_params["number"])
        signed = await run_in_threadpool(settlement.statement, number,
                                         request.path_params["operator"])
        if request.query_params.get("format", "msgpack") == "csv":
            if config.settlement_public is None:
                return _error(501, "no_settlement_public", "CSV statements are rendered from "
                              "the verified statement: start the server with "
                              "--settlement-public KEY")
            # From the statement as verified, never from unchecked bytes: the
            # operator checks the CSV against the signed msgpack offline.
            verified = clearing.verify_statement(signed, config.settlement_public)
            return Response(clearing.statement_csv(verified), media_type="text/csv")
        return Response(signed, media_type=MSGPACK)

    # -- health -----------------------------------------------------------------------------

    # Unauthenticated, like /healthz: Prometheus scrapes it without the
    # operator token, and it holds counts only (docs/OPERATIONS.md).
    service_metrics = metrics.ServiceMetrics() if metrics.available() else None

    async def metrics_page(request: Request) -> Response:
        if service_metrics is None:
            return _error(501, "no_metrics", "this server cannot serve metrics without "
                          f"prometheus_client: {metrics.INSTALL_HINT}")
        body, content_type = service_metrics.exposition(request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": content_type})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        try:
            await run_in_threadpool(settlement.batch_count)
        except StoreUnavailable as exc:
            return _error(503, exc)
        return JSONResponse({"status": "ready"})

    routes = [
        Route("/v1/batches", upload_batch, methods=["POST"]),
        Route("/v1/deny-list", deny_list, methods=["GET"]),
        Route("/v1/trust", trust, methods=["GET"]),
        Route("/v1/trust", operator(_typed(store_trust)), methods=["POST"]),
        Route("/v1/gateways", operator(_typed(register_gateway)), methods=["POST"]),
        Route("/v1/deny-list", operator(_typed(publish_deny_list)), methods=["POST"]),
        Route("/v1/periods", operator(_typed(periods)), methods=["GET"]),
        Route("/v1/periods/{number}/report", operator(_typed(period_report)), methods=["GET"]),
        Route("/v1/periods/{number}/statements/{operator}", operator(_typed(statement)),
              methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/readyz", ready, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(AccessLog, observer=service_metrics)])


def _held(request: Request, tag: str) -> bool:
    """Whether If-None-Match names `tag`: the client holds that version."""
    return tag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]


def _unavailable(exc: StoreUnavailable) -> JSONResponse:
    """503: the store did not answer (a write's outcome may be unknown:
    the same request again settles it)."""
    return _error(503, exc, headers={"Retry-After": str(RETRY_AFTER)})


def _number(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise InvalidArgument("a period number is a positive integer")
    return int(text)


# A typed error of an operator request, as its status.
_STATUS: list[tuple[type[QrPayError], int]] = [
    (StoreUnavailable, 503), (Conflict, 409), (PeriodClosed, 409), (StaleUpdate, 409),
    (QrPayError, 400),
]


def _typed(handler: Callable[[Request], Awaitable[Response]]
           ) -> Callable[[Request], Awaitable[Response]]:
    async def answered(request: Request) -> Response:
        try:
            return await handler(request)
        except QrPayError as exc:
            status = next(code for kind, code in _STATUS if isinstance(exc, kind))
            return _error(status, exc, headers={"Retry-After": str(RETRY_AFTER)}
                          if status == 503 else None)
    return answered


class AccessLog:
    """ASGI middleware: one JSON line per request on the qrpay.access logger
    (method, path, status, bytes in and out, milliseconds, client address).
    Headers, query strings and bodies are never logged: they may carry the
    operator token or token bytes. Each request is also told to `observer`
    (the app's metrics), if any."""

    def __init__(self, app: ASGIApp, observer: metrics.ServiceMetrics | None = None) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen = {"status": 500, "out": 0, "in": 0}

        async def counting_receive() -> Message:
            message = await receive()
            seen["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            seconds = time.perf_counter() - started
            client = scope.get("client")
            ACCESS_LOG.info(json.dumps({
                "method": scope["method"], "path": scope["path"], "status": seen["status"],
                "bytes_in": seen["in"], "bytes_out": seen["out"],
                "ms": round(seconds * 1000, 2),
                "client": client[0] if client else None}))
            if self.observer is not None:
                self.observer.request(scope["method"], scope["path"], seen["status"], seconds)
