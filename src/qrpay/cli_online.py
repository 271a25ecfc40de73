"""The online commands: `qrpay serve` (the settlement service) and `qrpay
gateway sync` (a gateway's upload and deny-list fetch). Their libraries are
extras, imported only when these commands run: `pip install 'qrpay[server]'`
for serve, `'qrpay[sync]'` for sync."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from qrpay import cli, storedb
from qrpay.cli_output import emit
from qrpay.gateway import Gateway
from qrpay.keys import GatewayKey, IssuerKey, IssuerPublicKey, RootPublicKey, SettlementPublicKey
from qrpay.settlement import Settlement
from qrpay.trust import Role, TrustStore

TOKEN_ENV = "QRPAY_OPERATOR_TOKEN"


def _operator_token(args: argparse.Namespace) -> str:
    """From --operator-token-file, else $QRPAY_OPERATOR_TOKEN: never a
    command-line value, which every user of the machine can read in ps."""
    if args.operator_token_file:
        token = cli._read_text(args.operator_token_file, "operator token").strip()
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if len(token) < 16:
        raise cli.CliError(f"the operator endpoints need a token of 16 characters or more: "
                           f"--operator-token-file FILE or ${TOKEN_ENV}")
    return token


def _root(args: argparse.Namespace) -> RootPublicKey | None:
    if not args.root_public:
        return None
    return RootPublicKey.from_text(cli._text_or_file(args.root_public, "root public key"))


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from qrpay.service import ServiceConfig, create_app
    except ImportError as exc:
        raise cli.CliError(f"qrpay serve needs the server extra: pip install 'qrpay[server]' "
                           f"({exc})") from None
    token = _operator_token(args)
    if storedb.is_postgres(args.store) and not args.archive:
        raise cli.CliError("a postgresql:// store needs --archive DIR (a folder every replica "
                           "reads and the closing one writes)")
    trust = None
    if args.issuer_public:
        trust = TrustStore()
        for value in args.issuer_public:
            trust.add(IssuerPublicKey.from_text(cli._text_or_file(value, "issuer public key")),
                      roles=Role.CREDENTIALS | Role.DENY_LIST)
    config = ServiceConfig(
        operator_token=token, max_batch_body=args.max_batch_body,
        deny_list_key=cli._key(args.deny_list_key, IssuerKey) if args.deny_list_key else None,
        settlement_public=SettlementPublicKey.from_text(cli._text_or_file(
            args.settlement_public, "settlement public key")) if args.settlement_public else None,
        root_public=_root(args))
    with Settlement(args.store, trust, threads=args.threads, archive=args.archive) as settlement:
        app = create_app(settlement, config)
        print(json.dumps({"event": "serving", "store": storedb.redact(str(args.store)),
                          "host": args.host, "port": args.port}), file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False,
                    lifespan="off", timeout_graceful_shutdown=10)
    return cli.EXIT_OK


def cmd_gateway_sync(args: argparse.Namespace) -> int:
    try:
        from qrpay.sync import SettlementClient
    except ImportError as exc:
        raise cli.CliError(f"gateway sync needs httpx: pip install 'qrpay[sync]' ({exc})"
                           ) from None
    with Gateway(cli._gateway_dir(args), cli._key(args.gateway_key, GatewayKey),
                 cli._trust(args), root=_root(args)) as gateway, SettlementClient(
            args.server, timeout=args.timeout, retries=args.retries) as client:
        report = gateway.sync(client, now=args.now, max_batches=args.max_batches)
    emit(args, {"online": report.online, "acked": report.acked, "waiting": report.waiting,
                "deny_list_version": report.deny_list_version,
                "deny_list_updated": report.deny_list_updated,
                "uploads": [asdict(u) for u in report.uploads], "problems": report.problems})
    for problem in report.problems:
        print(f"qrpay: {problem}", file=sys.stderr)
    if not report.online:
        print(f"qrpay: the service was not reached: {report.waiting} records stay queued",
              file=sys.stderr)
        return cli.EXIT_TEMPFAIL
    return cli.EXIT_REFUSED if report.problems else cli.EXIT_OK


def add_parsers(commands: argparse._SubParsersAction,   # type: ignore[type-arg]
                gateway: argparse._SubParsersAction,    # type: ignore[type-arg]
                gateway_args: object) -> None:
    p = commands.add_parser(
        "serve", help="run the settlement service (HTTP) on a store",
        description="Serve gateway uploads and deny lists, and operator endpoints, over HTTP "
                    "(docs/SERVICE.md). Several replicas share a postgresql:// store. The "
                    f"operator token comes from --operator-token-file or ${TOKEN_ENV}.")
    p.add_argument("--store", required=True,
                   help="a settlement directory, sqlite:///DIR, or "
                        "postgresql://USER@HOST[:PORT]/DB[?schema=NAME]")
    p.add_argument("--archive", help="the folder of closed periods (default: DIR/archive; "
                                     "required with postgresql://)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                                                       "127.0.0.1)")
    p.add_argument("--port", type=cli._int(1, 65535), default=8080, help="default: 8080")
    p.add_argument("--operator-token-file", help="file holding the operator bearer token")
    p.add_argument("--issuer-public", action="append", metavar="KEY",
                   help="also trust this issuer public key for this run (text or file)")
    p.add_argument("--deny-list-key", metavar="FILE",
                   help="an issuer secret key file: lets operators publish deny lists "
                        "(POST /v1/deny-list)")
    p.add_argument("--settlement-public", metavar="KEY",
                   help="the settlement public key: lets operators fetch CSV statements")
    p.add_argument("--root-public", metavar="KEY",
                   help="the trust root's public key: lets operators store trust bundles "
                        "(POST /v1/trust) for gateways to fetch")
    p.add_argument("--max-batch-body", type=cli._int(1024, 1 << 30), default=16 << 20,
                   help="largest batch upload in bytes (default: 16 MiB)")
    p.add_argument("--threads", type=cli._int(1, 256), default=1,
                   help="threads verifying each upload's tokens (default: 1)")
    p.set_defaults(run=cmd_serve)

    p = gateway.add_parser(
        "sync", help="upload waiting batches to the settlement service and fetch its deny "
                     "list (JSON)",
        description="Export and upload every waiting batch, ack each the service holds "
                    "(applied or exists), keep one it refuses or answers conflict to, then "
                    "fetch and apply the deny list. Exit 0 when all went, 1 when a batch was "
                    "kept, 75 when the service was not reached (all stays queued).")
    gateway_args(p)   # type: ignore[operator]
    p.add_argument("--server", required=True, action="append",
                   help="the service's base URL, http://HOST:PORT; repeat for several replicas "
                        "(a failed try moves on to the next)")
    p.add_argument("--root-public", metavar="KEY",
                   help="the trust root this gateway was provisioned with: also fetch and "
                        "apply the service's trust bundle")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request "
                                                              "(default: 10)")
    p.add_argument("--retries", type=cli._int(0, 20), default=4,
                   help="tries again after a dropped connection or a 502/503/504 "
                        "(default: 4, with backoff)")
    p.add_argument("--max-batches", type=cli._int(1, 10**6),
                   help="upload at most this many batches in this sync")
    p.set_defaults(run=cmd_gateway_sync)

