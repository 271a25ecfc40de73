"""`qrpay trust-bundle sign|show`: make a trust bundle where the root key is
kept (offline), and read one back, verified (docs/SERVICE.md, Trust
bundles). Operators then store it in the service (POST /v1/trust)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from qrpay import cli
from qrpay.cli_output import emit, status
from qrpay.errors import InvalidArgument
from qrpay.format import U32_MAX
from qrpay.keys import IssuerPublicKey, RootKey, RootPublicKey
from qrpay.trust import TrustedKey
from qrpay.trustbundle import TrustBundle, sign_trust_bundle


def _entries(text: str, source: str) -> list[TrustedKey]:
    """The keys file: a JSON list of {"key", "roles", "not_before", "not_after"}."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{source} is not JSON: {exc}") from None
    if not isinstance(data, list):
        raise InvalidArgument(f"{source} is a JSON list of keys")
    out = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise InvalidArgument('each key is {"key": "qrpay:issuer-public:...", "roles": '
                                  '"credentials,deny-list", "not_before": 0, "not_after": T}')
        roles = cli._roles(str(item.get("roles", "credentials,deny-list")))
        out.append(TrustedKey(IssuerPublicKey.from_text(item["key"]),
                              int(item.get("not_before", 0)), int(item.get("not_after", U32_MAX)),
                              roles))
    return out


def _shown(bundle: TrustBundle) -> dict[str, Any]:
    return {"version": bundle.version, "issued_at": bundle.issued_at,
            "keys": [{"key": k.key.to_text(), "kid": k.kid.hex(),
                      "roles": ",".join(cli._role_names(k.roles)),
                      "not_before": k.not_before, "not_after": k.not_after}
                     for k in bundle.keys]}


def cmd_sign(args: argparse.Namespace) -> int:
    root = cli._key(args.root_key, RootKey)
    entries = _entries(cli._read_text(args.keys, "keys file"), args.keys)
    issued_at = int(time.time()) if args.now is None else args.now
    signed = sign_trust_bundle(root, args.version, entries, issued_at)
    cli._write_atomic(args.out, signed)
    emit(args, _shown(TrustBundle.load(signed, root.public)))
    status(args, f"trust bundle version {args.version} with {len(entries)} keys written to "
                 f"{args.out}")
    return cli.EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    root = RootPublicKey.from_text(cli._text_or_file(args.root_public, "root public key"))
    bundle = TrustBundle.load(cli._read_bytes(args.file, "trust bundle"), root)
    emit(args, _shown(bundle))
    return cli.EXIT_OK


def add_parsers(commands: argparse._SubParsersAction) -> None:   # type: ignore[type-arg]
    group = commands.add_parser(
        "trust-bundle", help="sign or show a trust bundle (issuer keys for gateways)"
    ).add_subparsers(dest="trust_bundle_command", required=True, metavar="ACTION")
    p = group.add_parser(
        "sign", help="sign a trust bundle with the root key (JSON of it on stdout)",
        description='The keys file is a JSON list: [{"key": "qrpay:issuer-public:...", '
                    '"roles": "credentials,deny-list", "not_before": 0, "not_after": '
                    '4294967295}, ...]. A key is rotated out by a later bundle that ends its '
                    "window. Store the bundle in the service with POST /v1/trust.")
    p.add_argument("--root-key", required=True, help="file with the root secret key "
                                                     "(qrpay keys new root)")
    p.add_argument("--keys", required=True, help="the keys file (JSON)")
    p.add_argument("--version", required=True, type=cli._int(1, 2**63 - 1),
                   help="the bundle's version: each one after the last")
    p.add_argument("--out", required=True, help="file for the signed bundle")
    p.add_argument("--now", type=cli._TIME, help="when it is issued (default: the clock)")
    p.set_defaults(run=cmd_sign)
    p = group.add_parser("show", help="verify a trust bundle and print it (JSON)")
    p.add_argument("--root-public", required=True, help="the root public key (text or file)")
    p.add_argument("--file", required=True, help="the signed bundle")
    p.set_defaults(run=cmd_show)
