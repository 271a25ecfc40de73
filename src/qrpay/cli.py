"""The `qrpay` command line (also `python -m qrpay`).

Exit codes: 0 done; 1 refused (a token, batch or update that failed a check:
the message names the reason); 2 bad input (usage, missing or unreadable
files, corrupt keys, malformed data); 75 (EX_TEMPFAIL) the gateway journal or
the settlement store is unavailable or busy (locked by another process,
unreadable, corrupt, on a failing disk): no check gave an answer; run the
same command again once the cause is fixed (a write whose commit failed has
an unknown outcome, which that repeat settles); 130 interrupted (Ctrl-C);
141 stdout was closed early (`| head -1`): the work was done, its output cut.
Bad numbers are argparse errors (2), never tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np

from qrpay import (
    archive, clearing, cli_config, cli_examples, logs, qrimage, simulate, storedb,
)
from qrpay._args import MAX_THREADS
from qrpay._version import __version__
from qrpay.anchor import ANCHOR_FILE
from qrpay.cli_output import emit, iso, parse_time, silent, status, wants_json
from qrpay.cli_progress import progress_bar
from qrpay.credential import Credential, Scene
from qrpay.denylist import DenyList
from qrpay.errors import (
    ArchiveUnavailable, BadSignature, ClockUntrusted, Conflict, InvalidArgument, InvalidKey,
    JournalUnavailable, MalformedCredential, MalformedMessage, MalformedToken, PeriodClosed,
    QrPayError, Reason, ScanRefused, StaleUpdate, StoreUnavailable, TokenRejected, UnknownGateway,
)
from qrpay.format import U32_MAX
from qrpay.gateway import JOURNAL_FILE, LOCK_FILE, Gateway
from qrpay.keys import (
    DeviceKey, DevicePublicKey, GatewayKey, GatewayPublicKey, IssuerKey, IssuerPublicKey,
    RootKey, SettlementKey, SettlementPublicKey,
    SigningKey,
)
from qrpay.qr import decode_text, encode_text
from qrpay.recovery import recover_gateway
from qrpay.scoring import CategoryBins, LimitPolicy, Scorecard
from qrpay.settlement import MAX_RECORDS_PER_BATCH, STORE_FILE, IngestStatus, Settlement
from qrpay.token import TokenGenerator
from qrpay.trust import Role, TrustStore

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75   # sysexits.h EX_TEMPFAIL: try again later
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE: the reader of stdout went away

ROLES: dict[str, type[SigningKey]] = {"issuer": IssuerKey, "device": DeviceKey,
                                      "gateway": GatewayKey, "settlement": SettlementKey,
                                      "root": RootKey}
# Bad input: it could not be read as what it claims to be.
_BAD_INPUT = (InvalidKey, InvalidArgument, MalformedCredential, MalformedMessage, MalformedToken)
# Refusals: the input was well-formed and a check said no.
_REFUSALS = (TokenRejected, ScanRefused, BadSignature, StaleUpdate, UnknownGateway, Conflict,
             ClockUntrusted, PeriodClosed)
# Faults: the journal or the store could not be used; nothing was decided.
_UNAVAILABLE = (JournalUnavailable, StoreUnavailable, ArchiveUnavailable)


class CliError(Exception):
    """A message for the user and an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# -- small helpers ------------------------------------------------------------------------

def _read_text(path: str, what: str) -> str:
    """A text file's content, stripped; `-` reads stdin."""
    if path == "-":
        try:
            return sys.stdin.read().strip()
        except UnicodeDecodeError:
            raise CliError(f"cannot read {what} from stdin: it is not UTF-8 text") from None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise CliError(f"{what} file not found: {path}") from None
    except UnicodeDecodeError:
        raise CliError(f"cannot read {what} file {path}: it is not UTF-8 text") from None
    except OSError as exc:
        raise CliError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _read_bytes(path: str, what: str) -> bytes:
    """A file's bytes; `-` reads stdin."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CliError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise CliError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _write_atomic(path: str, data: bytes, private: bool = False) -> None:
    """Write via a temporary file, fsync and rename: never a half-written file,
    and no temporary file left behind when any step fails (it may hold a
    secret key). `-` writes stdout (never a secret key)."""
    if path == "-":
        if private:
            raise CliError("a secret key is written to a file (mode 600), never to stdout")
        out = sys.stdout
        if isinstance(out, _Output):
            out.write_bytes(data)
        else:
            out.flush()
            out.buffer.write(data)
            out.buffer.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise CliError(f"cannot write {path}: it is a directory")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".",
                                   prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as out:
            # mkstemp makes 0600: a secret keeps it, anything else gets the
            # mode a plain open() would give it under the umask.
            os.fchmod(out.fileno(), 0o600 if private else 0o666 & ~_umask())
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:   # failed, or interrupted: the half-made file goes
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)   # read by setting it: put back at once
    os.umask(mask)
    return mask


def _key(path: str, cls: type[SigningKey]) -> Any:
    role = next(name for name, kind in ROLES.items() if kind is cls)
    return cls.from_secret_text(_read_text(path, f"{role} key"))


def _text_or_file(value: str, what: str) -> str:
    """A key, credential or token given inline (it starts with `qrpay:` or
    `QP:`), or the path of a file that holds it; anything else is a file
    that is not there, not text to parse."""
    text = value.strip()      # as a file's content is
    if text.startswith(("qrpay:", "QP:")):
        return text   # inline: a long token is no file name (ENAMETOOLONG)
    path = Path(value)
    try:
        if path.is_file():
            return _read_text(value, what)
        is_dir = path.is_dir()
    except OSError:
        is_dir = False
    if is_dir:
        raise CliError(f"{what}: {value} is a directory, not a file")
    shown = value if len(value) <= 80 else value[:77] + "..."
    raise CliError(f"no such file: {shown} (give the {what} inline, as text starting with "
                   f"{'QP:' if what == 'token' else 'qrpay:'}, or a file holding it)")


def _trust(args: argparse.Namespace) -> TrustStore:
    if not args.issuer_public:
        raise CliError("give at least one --issuer-public (text or file)")
    store = TrustStore()
    for value in args.issuer_public:
        store.add(IssuerPublicKey.from_text(_text_or_file(value, "issuer public key")),
                  roles=Role.CREDENTIALS | Role.DENY_LIST | Role.SCORECARD)
    return store


def _scene(text: str) -> Scene:
    try:
        return Scene[text.strip().upper()]
    except KeyError:
        names = ", ".join(s.name.lower() for s in Scene)
        raise argparse.ArgumentTypeError(f"unknown scene {text!r} (one of: {names})") from None


def _scenes(text: str) -> list[Scene]:
    return [_scene(part) for part in text.split(",") if part.strip()]


def _int(minimum: int, maximum: int | None = None, what: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number in [minimum, maximum]; `what` says
    what the bound is in the option's terms."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(
                f"{value} must be at most {maximum}{f' ({what})' if what else ''}")
        return value
    return parse


DAY = 86_400
# Every time on the wire is u32 Unix seconds: nothing after 2106-02-07.
# Read as Unix seconds or ISO 8601 (cli_output.parse_time).
_TIME = parse_time
_AMOUNT = _int(1, U32_MAX, "an amount is minor units below 2**32")
_U64 = _int(0, 2**64 - 1, "2**64-1")


def _is_store(directory: str, names: tuple[str, ...], what: str, creators: str) -> None:
    """Refuse a directory that holds none of `names`: a mistyped path must not
    become a new, empty gateway or settlement store that answers as if all
    were well. Only the commands named in `creators` make one."""
    if not any((Path(directory) / name).exists() for name in names):
        raise CliError(f"{directory} is not a {what} directory (it holds no "
                       f"{' or '.join(names)}); {creators} make one")


def _gateway_dir(args: argparse.Namespace, create: bool = False) -> str:
    """--gateway-dir; only `scan` and `deny-list apply` may create one."""
    if not create:
        _is_store(args.gateway_dir, (JOURNAL_FILE, ANCHOR_FILE), "gateway",
                  "`qrpay scan` and `qrpay deny-list apply`")
    return str(args.gateway_dir)


def _gateway(args: argparse.Namespace, create: bool = False) -> Gateway:
    """The gateway in --gateway-dir; only `scan` and `deny-list apply` may
    create one."""
    return Gateway(_gateway_dir(args, create), _key(args.gateway_key, GatewayKey), _trust(args))


# -- commands -----------------------------------------------------------------------------

def cmd_keys_new(args: argparse.Namespace) -> int:
    key = ROLES[args.role].generate()
    if Path(args.out).exists() and not args.force:
        raise CliError(f"{args.out} exists; pass --force to replace it")
    _write_atomic(args.out, (key.secret_text() + "\n").encode(), private=True)
    public = key._public.to_text()
    emit(args, {"role": args.role, "public": public, "secret_file": args.out}, public)
    return EXIT_OK


def cmd_keys_public(args: argparse.Namespace) -> int:
    text = _read_text(args.key, "key")
    for role, cls in ROLES.items():
        try:
            public = cls.from_secret_text(text)._public.to_text()
            emit(args, {"role": role, "public": public}, public)
            return EXIT_OK
        except InvalidKey:
            continue
    raise CliError(f"{args.key} does not hold a qrpay secret key")


def cmd_issue(args: argparse.Namespace) -> int:
    issuer = _key(args.issuer_key, IssuerKey)
    public = DevicePublicKey.from_text(_text_or_file(args.device_public, "device public key"))
    if args.card:
        if args.policy is None or args.features is None:
            raise CliError("--card needs --policy and --features too")
        card = Scorecard.from_json(_read_text(args.card, "card"))
        try:
            terms = json.loads(_read_text(args.policy, "policy"))
        except ValueError as exc:
            raise CliError(f"--policy {args.policy} is not JSON: {exc}") from None
        policy = LimitPolicy.from_dict(terms)
        cells = args.features.split(",")
        if len(cells) != len(card.feature_names):
            raise CliError(f"--features has {len(cells)} values; card {card.card_id} "
                           f"reads {len(card.feature_names)}: "
                           f"{','.join(card.feature_names)}")
        # A numeric feature's value is a number, a categorical one's a label;
        # an empty value is missing.
        row: dict[str, list[object]] = {}
        for feature, cell in zip(card.features, cells):
            if isinstance(feature, CategoryBins):
                row[feature.name] = [cell.strip() or None]
                continue
            try:
                row[feature.name] = [float(cell) if cell.strip() else float("nan")]
            except ValueError:
                raise CliError(f"--features: {feature.name} is a number, not {cell[:40]!r} "
                               "(values are comma-separated, in the card's order)") from None
        score = int(card.score(row)[0])
        limit, scenes = policy.terms(score)
        if not scenes:
            status(args, f"score {score}: below the cut-off, no offline credit")
            emit(args, {"issued": False, "score": score, "card": card.card_id},
                 lambda: None)
            return EXIT_REFUSED
        status(args, f"score {score} with card {card.card_id}: limit {limit}")
    else:
        if args.limit is None or not args.scenes:
            raise CliError("give --limit and --scenes, or --card, --policy and --features")
        limit, scenes = args.limit, frozenset(args.scenes)
    start = _at(args.not_before)
    if start + args.days * DAY > U32_MAX:
        raise CliError(f"--days {args.days} from {start} ends after 2**32-1 (Unix seconds end "
                       "in 2106)")
    credential = issuer.issue(args.account, public, limit, scenes, start,
                              start + args.days * DAY)
    text = credential.to_text()
    if args.out:
        _write_atomic(args.out, (text + "\n").encode())
    emit(args, {"issued": True, "credential": text, "account": args.account, "limit": limit,
                "scenes": sorted(s.name.lower() for s in scenes), "not_before": start,
                "not_after": start + args.days * DAY, "serial": credential.serial}, text)
    return EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    credential = Credential.from_text(_text_or_file(args.credential, "credential"))
    device = _key(args.device_key, DeviceKey)
    counter = 0
    if args.counter_file and Path(args.counter_file).exists():
        try:
            counter = int(_read_text(args.counter_file, "counter"))
        except ValueError:
            raise CliError(f"{args.counter_file} does not hold a counter") from None
    generator = TokenGenerator(credential, device, counter=counter)
    token = generator.make(args.scene, args.now)
    if args.counter_file:  # persisted before the token is shown: it never goes back
        _write_atomic(args.counter_file, f"{generator.counter}\n".encode())
    for kind, path in (("png", args.png), ("svg", args.svg)):   # either, or both
        if path:
            image = qrimage.render(token, kind)
            _write_atomic(path, image if isinstance(image, bytes) else image.encode())
    if args.terminal and not wants_json(args):
        print(qrimage.render(token, "terminal"))
    text = encode_text(token)
    emit(args, {"token": text, "counter": generator.counter}, text)
    return EXIT_OK


def _receipt(receipt: Any) -> dict[str, Any]:
    return {"gateway": receipt.gateway, "record": receipt.record, "account": receipt.account,
            "serial": receipt.serial, "counter": receipt.counter, "amount": receipt.amount,
            "scene": receipt.scene.name.lower(), "time": receipt.gateway_time,
            "duplicate": receipt.duplicate}


def _scan_file(args: argparse.Namespace) -> int:
    texts = [line.strip() for line in _read_text(args.file, "tokens").splitlines()
             if line.strip()]
    if not texts:
        raise CliError(f"{args.file} holds no token")
    tokens = []
    for line, text in enumerate(texts, 1):
        try:
            tokens.append(decode_text(text))
        except MalformedToken as exc:
            raise CliError(f"{args.file} token {line}: {exc}") from None
    with _gateway(args, create=True) as gateway:
        result = gateway.scan_batch(tokens, [args.amount] * len(tokens), args.scene, args.now)
    refused: dict[str, int] = {}
    for code in result.reasons[~result.ok].tolist():
        refused[Reason(code).name] = refused.get(Reason(code).name, 0) + 1
    accepted = [_receipt(r) for r in result.receipts if r is not None]
    status(args, f"{len(accepted):,} of {len(tokens):,} tokens accepted"
                 + (f"; refused: {refused}" if refused else ""))
    emit(args, {"tokens": len(tokens), "accepted": len(accepted), "refused": refused,
                "reasons": [Reason(c).name for c in result.reasons.tolist()],
                "receipts": accepted},
         lambda: print("\n".join(json.dumps(r) for r in accepted)))
    return EXIT_OK if not refused else EXIT_REFUSED


def cmd_scan(args: argparse.Namespace) -> int:
    if args.file:
        return _scan_file(args)
    if args.image:
        tokens = qrimage.decode_image(args.image)
        if not tokens:
            raise CliError(f"no QR code found in {args.image}")
        token: bytes | str = tokens[0]
    else:
        # Decoded here: a malformed text is bad input (exit 2), not a refusal.
        token = decode_text(_text_or_file(args.text, "token"))
    with _gateway(args, create=True) as gateway:
        receipt = gateway.scan(token, args.amount, args.scene, args.now)
    emit(args, _receipt(receipt), lambda: print(json.dumps(_receipt(receipt))))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    with _gateway(args) as gateway:
        batch = gateway.export_batch(args.max_records, args.now)
    if batch is None:
        status(args, "nothing to upload")
        emit(args, {"written": False}, lambda: None)
        return EXIT_OK
    _write_atomic(args.out, batch)
    status(args, f"wrote {'the batch to stdout' if args.out == '-' else args.out} "
                 f"({len(batch)} bytes)")
    emit(args, {"written": True, "out": args.out, "bytes": len(batch)}, lambda: None)
    return EXIT_OK


def cmd_ack(args: argparse.Namespace) -> int:
    with _gateway(args) as gateway:
        gateway.ack(args.seq)
    status(args, f"batch {args.seq} acknowledged")
    emit(args, {"acknowledged": args.seq}, lambda: None)
    return EXIT_OK


def cmd_gateway_recover(args: argparse.Namespace) -> int:
    # Recovery goes on from what is left of a gateway directory, or from an
    # empty one (all of it lost): never from a directory of something else.
    directory = Path(args.gateway_dir)
    if directory.is_dir() and any(directory.iterdir()):
        _is_store(args.gateway_dir, (JOURNAL_FILE, ANCHOR_FILE, LOCK_FILE), "gateway",
                  "`qrpay scan` and `qrpay deny-list apply`")
    done = recover_gateway(args.gateway_dir, _key(args.gateway_key, GatewayKey), _trust(args),
                           now=args.now)
    emit(args, done.as_dict())
    status(args, f"recovered: {done.kept_records} records kept, {done.lost_records} lost, "
          f"{done.lost_batches} upload batches lost; tokens issued at or before "
          f"{iso(done.refused_through)} are refused from now on")
    return EXIT_OK


def cmd_deny_apply(args: argparse.Namespace) -> int:
    with _gateway(args, create=True) as gateway:
        before = gateway.deny_list.version
        applied = gateway.update_deny_list(_read_bytes(args.file, "deny list"), args.now)
    # The same version again is the list in force (other bytes under its
    # version are refused): a safe retry that changed nothing.
    again = bool(before and applied.version == before)
    status(args, f"deny list version {applied.version} is already in force" if again
           else f"deny list version {applied.version}: {len(applied)} credentials")
    emit(args, {"version": applied.version, "credentials": len(applied),
                "already_in_force": again}, lambda: None)
    return EXIT_OK


def _settlement_dir(location: str, create: bool = False) -> str:
    """A settlement directory (or sqlite:///DIR); only `settlement trust`,
    `ingest` and `deny-list publish` may create one. A postgresql:// store
    is as given: its schema is made when missing."""
    if not create and not storedb.is_postgres(location):
        _is_store(str(storedb.sqlite_directory(location)), (STORE_FILE,), "settlement",
                  "`qrpay settlement trust`, `qrpay ingest` and `qrpay deny-list publish`")
    return location


def _open_store(args: argparse.Namespace, create: bool = False, trust: TrustStore | None = None,
                gateways: Sequence[GatewayPublicKey] = ()) -> Settlement:
    """The store --settlement-dir names, with --archive (required for a
    postgresql:// store)."""
    location = _settlement_dir(args.settlement_dir, create)
    if storedb.is_postgres(location) and not args.archive:
        raise CliError("a postgresql:// store needs --archive DIR (the folder of its closed "
                       "periods)")
    return Settlement(location, trust, gateways, archive=args.archive)


def _settlement(args: argparse.Namespace, create: bool = False) -> Settlement:
    """The store, trusting the issuer keys stored in it (`qrpay settlement
    trust`) and, for this command only, any --issuer-public."""
    gateways = [GatewayPublicKey.from_text(_text_or_file(v, "gateway public key"))
                for v in args.gateway_public or []]
    return _open_store(args, create, _trust(args) if args.issuer_public else None, gateways)


def _needs_issuer_keys(settlement: Settlement) -> None:
    if not len(settlement.trust):
        raise CliError("settlement trusts no issuer key: add one with `qrpay settlement trust "
                       "--settlement-dir DIR --issuer-public KEY` (or give --issuer-public)")


def cmd_ingest(args: argparse.Namespace) -> int:
    worst = EXIT_OK
    results: list[dict[str, Any]] = []
    with _settlement(args, create=True) as settlement, \
            progress_bar("ingesting", "batch", quiet=silent(args) or len(args.batches) < 2
                         ) as progress:
        _needs_issuer_keys(settlement)
        for done, path in enumerate(args.batches, 1):
            try:
                result = settlement.ingest(_read_bytes(path, "batch"))
                results.append({"file": path, "status": result.status.value,
                                "gateway": result.gateway, "seq": result.seq,
                                "records": result.records, "invalid": result.invalid})
                if result.status is IngestStatus.CONFLICT:
                    worst = EXIT_REFUSED
            except _BAD_INPUT as exc:
                status(args, f"{path}: rejected: {exc} ({exc.reason.name})")
                results.append({"file": path, "status": "rejected", "reason": exc.reason.name,
                                "message": str(exc)})
                worst = max(worst, EXIT_USAGE)
            except _REFUSALS as exc:   # nothing stored: the gateway keeps the batch, retries
                status(args, f"{path}: refused: {exc} ({exc.reason.name})")
                results.append({"file": path, "status": "refused", "reason": exc.reason.name,
                                "message": str(exc)})
                worst = max(worst, EXIT_REFUSED)
            if progress is not None:
                progress(done, len(args.batches))
    emit(args, {"batches": results}, lambda: print("\n".join(
        f"{r['file']}: {r['status']} (gateway {r['gateway']}, batch {r['seq']}, "
        f"{r['records']} records, {r['invalid']} invalid)" for r in results if "seq" in r)))
    return worst


_ROLE_NAMES = {"credentials": Role.CREDENTIALS, "deny-list": Role.DENY_LIST,
               "scorecard": Role.SCORECARD}


def _roles(text: str) -> Role:
    roles = Role(0)
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        if part not in _ROLE_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown role {part!r} (one or more of: {', '.join(_ROLE_NAMES)})")
        roles |= _ROLE_NAMES[part]
    if not roles:
        raise argparse.ArgumentTypeError("name at least one role: a key trusted for nothing "
                                         "is a mistake")
    return roles


def _role_names(roles: Role) -> list[str]:
    return [name for name, role in _ROLE_NAMES.items() if roles & role]


def cmd_settlement_trust(args: argparse.Namespace) -> int:
    keys = [IssuerPublicKey.from_text(_text_or_file(v, "issuer public key"))
            for v in args.issuer_public]
    trusted = []
    with _open_store(args, create=True) as settlement:
        for key in keys:
            entry = settlement.trust_issuer(key, args.not_before, args.not_after, args.roles)
            trusted.append(_trusted(entry))
            status(args, f"settlement trusts issuer key {entry.kid.hex()} for "
                         f"{', '.join(_role_names(entry.roles))}, from "
                         f"{iso(entry.not_before)} to {iso(entry.not_after)}")
    emit(args, {"trusted": trusted}, lambda: None)
    return EXIT_OK


def cmd_settlement_keys(args: argparse.Namespace) -> int:
    with _open_store(args) as settlement:
        stored = settlement.trusted_issuers()
    emit(args, {"keys": [_trusted(t) for t in stored]})
    return EXIT_OK


def _trusted(entry: Any) -> dict[str, Any]:
    return {"key": entry.key.to_text(), "kid": entry.kid.hex(),
            "roles": _role_names(entry.roles), "not_before": entry.not_before,
            "not_after": entry.not_after}


def cmd_report(args: argparse.Namespace) -> int:
    with _settlement(args) as settlement:
        report = settlement.report()
    out = report.as_dict()
    del out["until"]   # the open period has none
    emit(args, out)
    return EXIT_OK


def cmd_settlement_operator(args: argparse.Namespace) -> int:
    keys = [GatewayPublicKey.from_text(_text_or_file(v, "gateway public key"))
            for v in args.gateway_public]
    registered = []
    with _open_store(args, create=True) as settlement:
        for key in keys:
            gateway_id = settlement.register_gateway(key, args.operator)
            registered.append(gateway_id)
            status(args, f"gateway {gateway_id} clears to operator {args.operator}")
    emit(args, {"operator": args.operator, "gateways": registered}, lambda: None)
    return EXIT_OK


def cmd_settlement_fees(args: argparse.Namespace) -> int:
    with _open_store(args, create=True) as settlement:
        if args.schedule:
            try:
                data = json.loads(_read_text(args.schedule, "fee schedule"))
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"fee schedule {args.schedule} is not JSON: {exc}") from None
            if not isinstance(data, dict):
                raise InvalidArgument("a fee schedule is a JSON object")
            schedule = clearing.FeeSchedule.from_dict(data)
            stored = settlement.set_fee_schedule(schedule)
            status(args, f"fee schedule version {schedule.version} "
                         f"{'stored' if stored else 'was stored already'}")
        current = settlement.fee_schedule()
    emit(args, {"schedule": current.to_dict() if current else None})
    return EXIT_OK


def cmd_close(args: argparse.Namespace) -> int:
    key = _key(args.settlement_key, SettlementKey)
    with _settlement(args) as settlement, \
            progress_bar("closing", "step", quiet=silent(args)) as bar:
        if bar is None:
            status(args, f"closing the period at {iso(args.until)}")
        closed = settlement.close_period(args.until, key, now=args.now, progress=bar)
    out = {"period": closed.number, "from": closed.from_time, "until": closed.until,
           "closed_at": closed.closed_at, "records": closed.records,
           "charged_total": closed.charged_total, "not_charged_total": closed.rejected_total,
           "archive": str(closed.path),
           "operators": [{"operator": c.operator, "gross": c.gross, "fee": c.fee, "net": c.net,
                          "flagged_amount": c.flagged_amount} for c in closed.clearing]}
    emit(args, out)
    return EXIT_OK


def cmd_statement_write(args: argparse.Namespace) -> int:
    with _open_store(args) as settlement:
        signed = settlement.statement(args.period, args.operator)
    if args.csv:
        # Rendered from the statement as verified, never from unchecked bytes.
        if not args.settlement_public:
            raise InvalidArgument("--csv needs --settlement-public: the CSV is written from "
                                  "the verified statement")
        public = SettlementPublicKey.from_text(_text_or_file(args.settlement_public,
                                                             "settlement public key"))
        _write_atomic(args.csv, clearing.statement_csv(
            clearing.verify_statement(signed, public)).encode())
    _write_atomic(args.out, signed)
    status(args, f"statement of {args.operator} for period {args.period} written to {args.out}")
    emit(args, {"period": args.period, "operator": args.operator, "out": args.out,
                "csv": args.csv}, lambda: None)
    return EXIT_OK


def cmd_statement_verify(args: argparse.Namespace) -> int:
    public = SettlementPublicKey.from_text(_text_or_file(args.settlement_public,
                                                         "settlement public key"))
    signed = _read_bytes(args.statement, "statement")
    if args.csv:
        statement = clearing.verify_statement_csv(_read_text(args.csv, "statement CSV"), signed,
                                                  public)
    else:
        statement = clearing.verify_statement(signed, public)
    emit(args, {
        "verified": True, "period": statement.period, "operator": statement.operator,
        "from": statement.from_time, "until": statement.until,
        "schedule_version": statement.schedule_version, "gross": statement.gross,
        "fee": statement.fee, "net": statement.net, "flagged_count": statement.flagged_count,
        "flagged_amount": statement.flagged_amount,
        "lines": [{"scene": line.scene.name, "count": line.count, "gross": line.gross,
                   "fee_bps": line.fee_bps, "fee": line.fee, "net": line.net}
                  for line in statement.lines]})
    return EXIT_OK


def cmd_archive_ls(args: argparse.Namespace) -> int:
    with _open_store(args) as settlement:
        closed = settlement.periods()
        on_disk = set(archive.list_periods(settlement.archive))
    rows = [{"period": p.number, "from": p.from_time, "until": p.until,
             "closed_at": p.closed_at, "records": p.records, "charged_total": p.charged_total,
             "not_charged_total": p.rejected_total, "path": str(p.path),
             "archived": p.number in on_disk} for p in closed]
    emit(args, {"periods": rows})
    missing = [r["period"] for r in rows if not r["archived"]]
    if missing:
        status(args, f"closed periods missing from the archive: {missing}")
        return EXIT_REFUSED
    return EXIT_OK


def _bank_file(path: str, default_time: int) -> tuple[list[int], list[int], list[int],
                                                       list[str]]:
    """A bank's repayment CSV: a header naming account, amount, reference
    and, optionally, paid_at (ISO 8601 or Unix seconds; default --now). Every
    row is checked before any is stored."""
    rows = list(csv.reader(io.StringIO(_read_text(path, "repayments"))))
    if not rows:
        raise CliError(f"{path} is empty: it needs a header row (account,amount,reference)")
    header = [name.strip().lower() for name in rows[0]]
    missing = {"account", "amount", "reference"} - set(header)
    if missing:
        raise CliError(f"{path}: the header has no {', '.join(sorted(missing))} column "
                       f"(it reads account,amount,reference[,paid_at])")
    column = {name: header.index(name) for name in header}
    accounts, amounts, times, references = [], [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise CliError(f"{path} line {line}: {len(row)} cells, the header has {len(header)}")
        try:
            accounts.append(int(row[column["account"]]))
            amounts.append(int(row[column["amount"]]))
            when = row[column["paid_at"]].strip() if "paid_at" in column else ""
            times.append(parse_time(when) if when else default_time)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise CliError(f"{path} line {line}: {exc}") from None
        references.append(row[column["reference"]].strip())
    return accounts, amounts, times, references


def _repay_file(args: argparse.Namespace) -> int:
    if args.account is not None or args.amount is not None or args.reference is not None:
        raise CliError("--file takes the repayments from the file: leave out --account, "
                       "--amount and --reference")
    accounts, amounts, times, references = _bank_file(args.file, _at(args.now))
    with _settlement(args) as settlement:
        stored = settlement.record_repayments(np.array(accounts, dtype=np.int64),
                                              np.array(amounts, dtype=np.int64),
                                              np.array(times, dtype=np.int64), references)
    status(args, f"{args.file}: {len(accounts):,} repayments, {stored:,} stored now, "
                 f"{len(set(references)) - stored:,} stored before (nothing changed)")
    emit(args, {"file": args.file, "rows": len(accounts), "stored": stored,
                "stored_before": len(set(references)) - stored, "total": sum(amounts)},
         lambda: None)
    return EXIT_OK


def cmd_repay(args: argparse.Namespace) -> int:
    if args.file:
        return _repay_file(args)
    if args.account is None or args.amount is None or args.reference is None:
        raise CliError("give --account, --amount and --reference (or --file bank.csv)")
    paid_at = _at(args.now)
    with _settlement(args) as settlement:
        try:
            stored = settlement.record_repayment(args.account, args.amount, paid_at,
                                                 args.reference)
        except StoreUnavailable as exc:
            # The retry must repeat the time too: the clock will have moved on.
            raise CliError(f"{exc} (retry with --reference {args.reference} --now {paid_at})",
                           EXIT_TEMPFAIL) from None
        what = "recorded" if stored else "was recorded before (nothing changed)"
        status(args, f"account {args.account}: repayment {args.reference} of {args.amount} at "
                     f"{iso(paid_at)} {what}")
        emit(args, {"account": args.account, "amount": args.amount,
                    "reference": args.reference, "paid_at": paid_at, "stored": stored},
             lambda: None)
        # Stored whatever it is (the money did arrive), but a payment for an
        # account never charged, or beyond what it owes, is said out loud.
        with contextlib.suppress(StoreUnavailable):   # stored: only the note is lost
            rows = settlement.credit_history(U32_MAX)    # every charge and repayment
            row = rows[rows["account"] == args.account]
            charged, repaid = (int(row["charged"][0]), int(row["repaid"][0])) if len(row) \
                else (0, 0)
            if repaid > charged:
                why = "it has no charges" if not charged else f"charged {charged} in all"
                status(args, f"account {args.account} is in credit by {repaid - charged}: "
                             f"repaid {repaid}, {why} (its balance in `qrpay history` is "
                             f"{charged - repaid})")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    now = _at(args.now)
    with _settlement(args) as settlement:
        rows = settlement.credit_history(now, due_after=args.due_days * 86_400)
    _write_rows(args.out, rows)
    status(args, f"wrote {args.out}: {len(rows):,} accounts at {iso(now)}")
    credit = rows["balance"] < 0
    if credit.any():
        status(args, f"{int(credit.sum()):,} of them in credit (repaid more than charged, "
                     f"{-int(rows['balance'][credit].sum()):,} in all): a negative balance")
    emit(args, {"out": args.out, "accounts": len(rows), "at": now,
                "in_credit": int(credit.sum())}, lambda: None)
    return EXIT_OK


def _write_rows(path: str, rows: np.ndarray) -> None:
    """A structured array as CSV: a header of its fields, a line per row."""
    names = list(rows.dtype.names or ())
    lines = [",".join(names)]
    lines += [",".join(_cell(v) for v in row) for row in rows.tolist()]
    _write_atomic(path, ("\n".join(lines) + "\n").encode())


def _cell(value: object) -> str:
    """A CSV cell: NaN (nothing fell due yet) is empty, as `score apply` reads it."""
    if isinstance(value, float):
        return "" if value != value else repr(value)
    return str(value)


def cmd_deny_publish(args: argparse.Namespace) -> int:
    issuer = _key(args.issuer_key, IssuerKey)
    now = _at(args.now)
    _check_out(args.out, "--out")   # before a version is used up for a file never written
    with _settlement(args, create=True) as settlement:
        _needs_issuer_keys(settlement)
        document, added = settlement.publish_deny_list(issuer, now, revoke=args.revoke or ())
        version = DenyList.load(document, settlement.trust).version
        try:
            _write_atomic(args.out, document)
        except CliError as exc:
            raise CliError(f"{exc}; deny list version {version} is published in settlement but "
                           "was written nowhere: publish again and send that one (each version "
                           "holds every serial of the ones before)") from None
    status(args, f"deny list version {version}: {len(added)} added")
    emit(args, {"version": version, "added": len(added), "out": args.out}, lambda: None)
    return EXIT_OK


def _clock() -> int:
    return int(time.time())


def _at(value: int | None) -> int:
    """A time option: as given, or the clock when left out."""
    return _clock() if value is None else value


def _check_out(path: str, what: str) -> None:
    """Before the work that leads up to writing `path`: a file can be made in
    its directory (made and removed here), and it is not a directory."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise CliError(f"{what} {path} is a directory")
    if not parent.is_dir():
        raise CliError(f"{what} {path}: no such directory: {parent}")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CliError(f"{what} {path} cannot be written: {exc.strerror or exc}") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    # Checked before a city's day starts, not after it (simulate.run checks
    # the rest: an existing --workdir must be empty).
    to_file = args.json not in (None, "-")
    if to_file:
        _check_out(args.json, "--json")
    if args.workdir:
        try:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise CliError(f"--workdir {args.workdir} is not a directory") from None
        except OSError as exc:
            raise CliError(f"--workdir {args.workdir} cannot be made: "
                           f"{exc.strerror or exc}") from None
    with progress_bar("simulate", "stage", quiet=silent(args)) as bar:
        # On a terminal the bar stands in for the stage lines (the report
        # that follows lists every stage's time); in a pipe the lines stay.
        report = simulate.run(args.citizens, args.trips, args.seed, args.threads,
                              args.workdir, days=args.days,
                              progress=io.StringIO() if silent(args) or bar else None,
                              on_stage=bar)
    if args.json == "-":
        emit(args, report.as_dict())
    else:
        print(simulate.format_report(report))
    if to_file:
        _write_atomic(args.json, json.dumps(report.as_dict(), indent=2).encode())
    return EXIT_OK if not report.failures else EXIT_REFUSED


# -- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrpay", description="Offline signed QR payment tokens: keys, credentials, "
        "tokens, gateways, settlement and credit scoring.",
        epilog="Exit codes: 0 done, 1 refused by a check, 2 bad input, 75 the journal or "
               "store is unavailable or busy (try again).")
    parser.add_argument("--version", action="version", version=f"qrpay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def trust_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--issuer-public", action="append", metavar="KEY",
                       help="a trusted issuer public key (text, or a file holding it); "
                            "repeat for several")

    def gateway_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gateway-dir", required=True, help="the gateway's journal directory")
        p.add_argument("--gateway-key", required=True, help="file with the gateway secret key")
        trust_args(p)
        p.add_argument("--now", type=_TIME, help="the time to use instead of the clock")

    keys = commands.add_parser("keys", help="make and show keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION")
    p = keys.add_parser("new", help="generate a key; the secret goes to a file (mode 600), "
                                    "the public key to stdout")
    p.add_argument("role", choices=sorted(ROLES), help="what the key is for: "
                   + ", ".join(sorted(ROLES)))
    p.add_argument("--out", required=True, help="file for the secret key")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(run=cmd_keys_new)
    p = keys.add_parser("public", help="print the public key of a secret key file")
    p.add_argument("key", help="the secret key file (- for stdin)")
    p.set_defaults(run=cmd_keys_public)

    p = commands.add_parser("issue", help="issue a credential for a device",
                            description="Sign a credential with an issuer key, from a limit "
                            "and scenes, or from a scorecard, a limit policy and the "
                            "account's features.")
    p.add_argument("--issuer-key", required=True, help="file with the issuer secret key")
    p.add_argument("--device-public", required=True, help="device public key (text or file)")
    p.add_argument("--account", required=True, type=_U64,
                   help="the account the credential charges, 0 to 2**64-1")
    p.add_argument("--limit", type=_int(0, U32_MAX, "a limit is minor units below 2**32"),
                   help="offline credit limit, minor units")
    p.add_argument("--scenes", type=_scenes, help="comma-separated, e.g. bus,metro")
    p.add_argument("--card", help="scorecard JSON (with --policy and --features)")
    p.add_argument("--policy", help="limit policy JSON: {\"bands\": [...]}")
    p.add_argument("--features", help="the account's feature values, comma-separated, in the "
                                      "card's order (a categorical feature's value is its "
                                      "label; an empty value is missing)")
    p.add_argument("--not-before", type=_TIME, default=None,
                   help="when the credential starts (default: now)")
    p.add_argument("--days", type=_int(1, U32_MAX // DAY, "Unix seconds end in 2106"),
                   default=30, help="validity in days (default 30)")
    p.add_argument("--out", help="also write the credential text to this file")
    p.set_defaults(run=cmd_issue)

    p = commands.add_parser("token", help="make a token on the phone (text form, or a QR)")
    p.add_argument("--credential", required=True, help="credential text or file")
    p.add_argument("--device-key", required=True, help="file with the device secret key")
    p.add_argument("--scene", required=True, type=_scene, help="where the token is shown")
    p.add_argument("--counter-file", help="keeps the counter between runs (it only goes up)")
    p.add_argument("--now", type=_TIME, help="the token's time (default: the clock)")
    p.add_argument("--png", help="also render the QR code to this PNG file")
    p.add_argument("--svg", help="also render the QR code to this SVG file")
    p.add_argument("--terminal", action="store_true", help="also draw the QR in the terminal")
    p.set_defaults(run=cmd_token)

    p = commands.add_parser("scan", help="scan a token into a gateway (prints the receipt)")
    gateway_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the token's text form (or a file holding it)")
    source.add_argument("--image", help="a QR image to decode (needs the qr extra)")
    source.add_argument("--file", help="a file of token texts, one per line (- for stdin), "
                                       "scanned as one batch with one journal commit")
    p.add_argument("--amount", required=True, type=_AMOUNT, help="minor units")
    p.add_argument("--scene", required=True, type=_scene, help="this gateway's scene")
    p.set_defaults(run=cmd_scan)

    p = commands.add_parser("export", help="write the gateway's next signed upload batch")
    gateway_args(p)
    p.add_argument("--out", required=True, help="the batch file to write (- for stdout)")
    p.add_argument("--max-records", type=_int(1, MAX_RECORDS_PER_BATCH,
                                              "settlement takes no bigger batch"),
                   default=1000, help="records in the batch at most (default: 1000)")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("ack", help="record that settlement has a batch")
    gateway_args(p)
    p.add_argument("--seq", required=True, type=_int(1, 2**53 - 1, "batch numbers"),
                   help="the batch number settlement stored (it and every one before)")
    p.set_defaults(run=cmd_ack)

    gateway = commands.add_parser("gateway", help="look after a gateway directory"
                                  ).add_subparsers(dest="gateway_command", required=True,
                                                   metavar="ACTION")
    p = gateway.add_parser(
        "recover", help="open again a gateway whose journal is lost, damaged or behind its "
                        "anchor (prints what was kept and lost, JSON)",
        description="For when the gateway refuses to open (JournalUnavailable) and no backup "
                    "of its journal can be restored. Keeps every record still readable, moves "
                    "damaged files aside, carries record and batch numbers on, and refuses "
                    "every token made before now, so none the lost journal accepted can pass "
                    "again. See docs/GATEWAY.md, Failure modes.")
    gateway_args(p)
    p.set_defaults(run=cmd_gateway_recover)
    # extras load when a command runs
    from qrpay import cli_inspect, cli_online, cli_scale, cli_score, cli_status, cli_trust
    cli_online.add_parsers(commands, gateway, gateway_args)
    cli_trust.add_parsers(commands)
    cli_scale.add_parsers(commands)
    cli_score.add_parsers(commands)
    cli_inspect.add_parsers(commands)
    cli_status.add_parsers(gateway, gateway_args)

    deny = commands.add_parser("deny-list", help="publish or apply deny lists").add_subparsers(
        dest="deny_command", required=True, metavar="ACTION")
    p = deny.add_parser("apply", help="apply a signed deny list to a gateway")
    gateway_args(p)
    p.add_argument("--file", required=True, help="the signed deny list (- for stdin)")
    p.set_defaults(run=cmd_deny_apply)

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--settlement-dir", required=True, metavar="DIR|URL",
                       help="the settlement directory, or the store's URL: sqlite:///DIR or "
                            "postgresql://USER@HOST/DB[?schema=NAME] (docs/SERVICE.md)")
        p.add_argument("--archive", metavar="DIR",
                       help="the folder of closed periods (default: DIR/archive; required "
                            "with postgresql://)")

    def settlement_args(p: argparse.ArgumentParser) -> None:
        store_args(p)
        p.add_argument("--issuer-public", action="append", metavar="KEY",
                       help="also trust this issuer public key (text, or a file holding it), "
                            "for this command only; repeatable. The keys stored with "
                            "`qrpay settlement trust` are always trusted")
        p.add_argument("--gateway-public", action="append", metavar="KEY",
                       help="register a gateway public key (text or file); repeatable")

    p = deny.add_parser("publish", help="sign the next deny list from settlement's findings")
    settlement_args(p)
    p.add_argument("--issuer-key", required=True, help="file with the issuer secret key "
                                                       "that signs the list")
    p.add_argument("--out", required=True, help="the signed deny list to write (- for stdout)")
    p.add_argument("--revoke", type=_U64, action="append", help="also deny this serial")
    p.add_argument("--now", type=_TIME, help="the list's issue time (default: the clock)")
    p.set_defaults(run=cmd_deny_publish)

    settle = commands.add_parser("settlement", help="look after a settlement directory"
                                 ).add_subparsers(dest="settlement_command", required=True,
                                                  metavar="ACTION")
    p = settle.add_parser(
        "trust", help="trust issuer public keys in the settlement store, from now on",
        description="Store issuer public keys that settlement re-verifies tokens with and "
                    "reloads deny lists with. Every later command on the store trusts them; "
                    "a batch holding a token of a key it does not trust is refused (exit 1, "
                    "UNKNOWN_KID), not stored, so the gateway keeps it and can upload it again "
                    "once the key is trusted. The same key again replaces its window and roles.")
    store_args(p)
    p.add_argument("--issuer-public", required=True, action="append", metavar="KEY",
                   help="the issuer public key (text, or a file holding it); repeatable")
    p.add_argument("--roles", type=_roles, default=Role.CREDENTIALS | Role.DENY_LIST,
                   help="what the key may sign, comma-separated: credentials, deny-list, "
                        "scorecard (default: credentials,deny-list)")
    p.add_argument("--not-before", type=_TIME, default=0,
                   help="when the key is trusted from (default: 0, always)")
    p.add_argument("--not-after", type=_TIME, default=U32_MAX,
                   help="when it is trusted to (default: 2**32-1, in 2106)")
    p.set_defaults(run=cmd_settlement_trust)
    p = settle.add_parser("keys", help="print the issuer keys the settlement store trusts (JSON)")
    store_args(p)
    p.set_defaults(run=cmd_settlement_keys)

    p = settle.add_parser(
        "operator", help="register gateways with the operator their payments clear to",
        description="Register gateway public keys with an operator (a bus company, a clinic): "
                    "closing a period owes that operator the payments its gateways took. "
                    "Again with another operator, the gateway moves from the next close on.")
    store_args(p)
    p.add_argument("--gateway-public", required=True, action="append", metavar="KEY",
                   help="a gateway public key (text, or a file holding it); repeatable")
    p.add_argument("--operator", required=True,
                   help="the operator id: 1-64 ASCII letters, digits and ._:-")
    p.set_defaults(run=cmd_settlement_operator)
    p = settle.add_parser(
        "fees", help="store a fee schedule (JSON) and print the latest",
        description='A fee schedule is JSON: {"version": 1, "effective_from": UNIX_TIME, '
                    '"bps": {"BUS": 150, "FERRY": 200, ...}} with every scene listed, in '
                    "basis points (1/100 of a percent). A period clears under the latest "
                    "version in effect at its start.")
    store_args(p)
    p.add_argument("--schedule", help="the schedule's JSON file (without it: only print)")
    p.set_defaults(run=cmd_settlement_fees)

    p = commands.add_parser(
        "close", help="close a settlement period: archive, clear and sign statements (JSON)",
        description="Settle every record scanned before --until that has arrived, archive the "
                    "period (records, report, clearing, statements), carry forward what the "
                    "next period needs and remove it from the live store. Prints the period "
                    "and what each operator is owed.")
    settlement_args(p)
    p.add_argument("--until", required=True, type=_TIME, help="when the period ends")
    p.add_argument("--settlement-key", required=True,
                   help="file with the settlement secret key (qrpay keys new settlement)")
    p.add_argument("--now", type=_TIME, help="the time of the close (default: the clock)")
    p.set_defaults(run=cmd_close)

    statement = commands.add_parser(
        "statement", help="write or verify an operator's signed statement").add_subparsers(
        dest="statement_command", required=True, metavar="ACTION")
    p = statement.add_parser("write", help="write an operator's statement of a closed period")
    store_args(p)
    p.add_argument("--period", required=True, type=_int(1, 2**62),
                   help="the closed period's number (qrpay archive ls)")
    p.add_argument("--operator", required=True, help="the operator id (qrpay settlement "
                                                     "operator)")
    p.add_argument("--out", required=True, help="the signed statement (msgpack)")
    p.add_argument("--csv", help="also write it as CSV here, for the operator's accountant "
                                 "(needs --settlement-public)")
    p.add_argument("--settlement-public", metavar="KEY",
                   help="the settlement public key (text, or a file holding it), to verify "
                        "the statement before it is written as CSV")
    p.set_defaults(run=cmd_statement_write)
    p = statement.add_parser(
        "verify", help="verify a statement offline with the settlement public key (JSON)")
    p.add_argument("statement", help="the signed statement file")
    p.add_argument("--settlement-public", required=True, metavar="KEY",
                   help="the settlement public key (text, or a file holding it)")
    p.add_argument("--csv", help="also check that this CSV says what the statement says")
    p.set_defaults(run=cmd_statement_verify)

    arch = commands.add_parser("archive", help="look at the archive of closed periods"
                               ).add_subparsers(dest="archive_command", required=True,
                                                metavar="ACTION")
    p = arch.add_parser("ls", help="list the closed periods and their archive folders (JSON)")
    store_args(p)
    p.set_defaults(run=cmd_archive_ls)

    p = commands.add_parser("ingest", help="ingest upload batches into settlement")
    settlement_args(p)
    p.add_argument("batches", nargs="+", help="upload batch files (qrpay export); - for "
                                              "one from stdin")
    p.set_defaults(run=cmd_ingest)

    p = commands.add_parser("report", help="print the open period's charges and findings "
                                           "(JSON; closed periods: qrpay archive ls)")
    settlement_args(p)
    p.set_defaults(run=cmd_report)

    p = commands.add_parser("repay", help="record a repayment an account made")
    settlement_args(p)
    p.add_argument("--account", type=_int(0, 2**63 - 1, "settlement's accounts"),
                   help="the account that paid (with --amount and --reference)")
    p.add_argument("--amount", type=_int(1, 2**62, "all repayments add up below 2**62"),
                   help="minor units")
    p.add_argument("--reference",
                   help="the payment's own reference (the bank's): the same one again is "
                        "stored once, so a failed call can be retried")
    p.add_argument("--file", metavar="CSV",
                   help="a bank file of many repayments, stored in one transaction: a header "
                        "account,amount,reference[,paid_at] (- for stdin); a row without "
                        "paid_at takes --now. The same file again stores only what is "
                        "missing (give the same --now when some rows have no paid_at)")
    p.add_argument("--now", type=_TIME, help="when it was paid (default: the clock)")
    p.set_defaults(run=cmd_repay)

    p = commands.add_parser("history", help="write each account's repayment history (CSV)")
    settlement_args(p)
    p.add_argument("--now", type=_TIME, help="the moment to look from (default: the clock)")
    p.add_argument("--due-days", type=_int(0, U32_MAX // DAY, "Unix seconds end in 2106"),
                   default=7,
                   help="days after its scan a charge falls due (default 7)")
    p.add_argument("--out", required=True, help="CSV: one row per account")
    p.set_defaults(run=cmd_history)

    sim = commands.add_parser(
        "simulate", help="run a city's day end to end on embedded defaults",
        description="Score synthetic citizens, issue credentials, scan tokens at offline "
                    "gateways all day with planted fraud, upload, settle, and report. Exits 1 "
                    "if a planted attack is missed or the money does not add up.")
    sim.add_argument("--citizens", type=_int(simulate.MIN_CITIZENS), default=20_000,
                     help="number of citizens, at least %d (default: %%(default)s)"
                          % simulate.MIN_CITIZENS)
    sim.add_argument("--trips", type=_int(1), default=4,
                     help="rides per citizen in the day (default: %(default)s)")
    sim.add_argument("--days", type=_int(1, simulate.MAX_DAYS), default=1,
                     help="days to run, 1 to %d; a settlement period closes at the end of "
                          "each (default: %%(default)s)" % simulate.MAX_DAYS)
    sim.add_argument("--seed", type=_int(0, 2**63 - 1), default=1,
                     help="random seed, 0 to 2**63-1 (default: %(default)s)")
    sim.add_argument("--threads", type=_int(1, MAX_THREADS), default=2,
                     help="threads for signing, verifying and scoring (default: %(default)s)")
    sim.add_argument("--workdir", help="keep journals and the settlement store here "
                                       "(default: a temporary directory)")
    sim.add_argument("--json", metavar="PATH", nargs="?", const="-",
                     help="--json alone: print the report as one JSON document instead of "
                          "text; --json PATH: also write it to PATH")
    sim.set_defaults(run=cmd_simulate)
    for command, leaf in _leaves(parser):
        _common_args(leaf)
        _annotate(leaf, command)
        cli_config.mark(leaf, command)
        leaf.set_defaults(_leaf=leaf)
    return parser


class _Help(argparse.HelpFormatter):
    """argparse's formatter, but a text laid out in lines (an example)
    keeps them."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:   # laid out by hand (an example): kept as written
            return text
        return super()._fill_text(text, width, indent)


_SCENE_NAMES = ", ".join(s.name.lower() for s in Scene)


def _annotate(p: argparse.ArgumentParser, command: str) -> None:
    """What every command's help says alike: its example, the forms a time
    takes, the scenes there are."""
    p.formatter_class = _Help
    example = cli_examples.epilog(command)
    if example:
        p.epilog = f"{p.epilog}\n\n{example}" if p.epilog else example
    for action in p._actions:
        if action.type is parse_time:
            action.metavar = action.metavar or "TIME"
            action.help = (f"{action.help or 'a time'} (ISO 8601, 2027-01-15T08:30:00Z or "
                           f"2027-01-15T16:30+08:00, or Unix seconds)")
        elif action.type is _scene:
            action.help = f"{action.help or 'the scene'} (one of: {_SCENE_NAMES})"
        elif action.type is _scenes:
            action.help = f"{action.help} (any of: {_SCENE_NAMES})"


def _leaves(parser: argparse.ArgumentParser, path: str = ""
            ) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser that runs a command, with its name (`keys new`, `report`)."""
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.extend(_leaves(child, f"{path} {name}".strip()))
    return found if found or not path else [(path, parser)]


def _common_args(p: argparse.ArgumentParser) -> None:
    """The options every command takes, after its own."""
    common = p.add_argument_group("common options")
    common.add_argument("--config", metavar="FILE",
                        help=f"a TOML file of options this command would otherwise repeat "
                             f"(default: ${cli_config.CONFIG_ENV}; docs/CLI.md)")
    if "--json" not in p._option_string_actions:
        common.add_argument("--json", action="store_true",
                            help="print one JSON document on stdout (keys: docs/CLI.md), "
                                 "no progress bar")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no status lines or progress bars on stderr (errors still)")
    common.add_argument("--log-level", choices=logs.LEVELS,
                        help="log records at this level and above to stderr (default: info "
                             "for serve, warning for the rest)")
    common.add_argument("--log-format", choices=("text", "json"),
                        help="text lines, or one JSON object per line (docs/OPERATIONS.md); "
                             "never a secret or a token's bytes (default: json for serve, "
                             "text for the rest)")


class _Output(io.TextIOBase):
    """stdout or stderr while a command runs. A reader that goes away early
    (`qrpay report | head -1`) ends the output, not the command: what cannot
    be written is dropped, the work goes on, and `main` says so with its exit
    code (EXIT_BROKEN_PIPE for stdout) instead of a traceback."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._cut()
        return len(text)

    def write_bytes(self, data: bytes) -> None:
        """Bytes (a batch, a statement) on the stream, after its text."""
        if not self.broken:
            try:
                self.stream.flush()
                self.stream.buffer.write(data)
                self.stream.buffer.flush()
            except BrokenPipeError:
                self._cut()

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._cut()

    def _cut(self) -> None:
        self.broken = True
        # The stream may still buffer what failed, and Python flushes it again
        # at exit: point its file descriptor at /dev/null.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.stream.fileno())
            finally:
                os.close(devnull)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def main(argv: Sequence[str] | None = None) -> int:
    out, err = _Output(sys.stdout), _Output(sys.stderr)
    sys.stdout, sys.stderr = cast(TextIO, out), cast(TextIO, err)
    handler = signal.getsignal(signal.SIGINT)
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        # A second Ctrl-C while this one is handled would end the process by
        # the signal, with a traceback and no exit code of ours.
        with contextlib.suppress(ValueError):   # not the main thread
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("qrpay: interrupted (what was committed before stays committed)",
              file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        out.flush()
        err.flush()
        sys.stdout, sys.stderr = out.stream, err.stream
        if argv is not None:   # called from Python, which keeps its own Ctrl-C
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGINT, handler)
    return EXIT_BROKEN_PIPE if out.broken and code == EXIT_OK else code


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        config = cli_config.load(cli_config.config_path(argv))
    except cli_config.ConfigError as exc:
        print(f"qrpay: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    cli_config.fill(args._leaf, args, config)
    service = args.command == "serve"   # a service's log is read by machines
    logs.configure(args.log_level or ("info" if service else "warning"),
                   json_format=(args.log_format or ("json" if service else "text")) == "json")
    if wants_json(args) and "-" in (getattr(args, "out", None), getattr(args, "csv", None)):
        args._leaf.error("--json prints its document on stdout: write --out/--csv to a file")
    try:
        return int(args.run(args))
    except CliError as exc:
        print(f"qrpay: error: {exc}", file=sys.stderr)
        return exc.code
    except _BAD_INPUT as exc:
        print(f"qrpay: error: {exc} ({exc.reason.name})", file=sys.stderr)
        return EXIT_USAGE
    except _REFUSALS as exc:
        print(f"qrpay: refused: {exc} ({exc.reason.name})", file=sys.stderr)
        return EXIT_REFUSED
    except _UNAVAILABLE as exc:
        print(f"qrpay: unavailable: {exc} ({exc.reason.name})", file=sys.stderr)
        return EXIT_TEMPFAIL
    except QrPayError as exc:
        print(f"qrpay: error: {exc} ({exc.reason.name})", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
