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
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np

from qrpay import archive, clearing, qrimage, simulate, storedb
from qrpay._args import MAX_THREADS
from qrpay.anchor import ANCHOR_FILE
from qrpay.credential import Credential, Scene
from qrpay.denylist import DenyList
from qrpay.errors import (
    ArchiveUnavailable, BadSignature, ClockUntrusted, Conflict, InvalidArgument, InvalidKey,
    JournalUnavailable, MalformedCredential, MalformedMessage, MalformedToken, PeriodClosed,
    QrPayError, ScanRefused, StaleUpdate, StoreUnavailable, TokenRejected, UnknownGateway,
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
from qrpay.scoring import LimitPolicy, Scorecard
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
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise CliError(f"{what} file not found: {path}") from None
    except UnicodeDecodeError:
        raise CliError(f"cannot read {what} file {path}: it is not UTF-8 text") from None
    except OSError as exc:
        raise CliError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _read_bytes(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CliError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise CliError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _write_atomic(path: str, data: bytes, private: bool = False) -> None:
    """Write via a temporary file, fsync and rename: never a half-written file,
    and no temporary file left behind when any step fails (it may hold a
    secret key)."""
    target = Path(path)
    if target.is_dir():
        raise CliError(f"cannot write {path}: it is a directory")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".",
                                   prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as out:
            if private:
                os.fchmod(out.fileno(), 0o600)
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
_TIME = _int(0, U32_MAX, "Unix seconds end at 2**32-1, in 2106")
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


def _load_matrix(path: str, label: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Rows from a .npy (2-D float) or a CSV with a header row; empty cells are NaN."""
    if path.endswith(".npy"):
        try:
            X = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise CliError(f"data file not found: {path}") from None
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
                           ) from None
        if X.ndim != 2 or X.dtype.kind not in "iuf":
            raise CliError(f"{path} must hold a 2-D numeric array")
        names = [f"f{i}" for i in range(X.shape[1])]
        if label is not None:
            raise CliError("--label needs a CSV with a header (a .npy has no column names)")
        return X.astype(np.float64), None, names
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise CliError(f"data file not found: {path}") from None
    except UnicodeDecodeError:
        raise CliError(f"cannot read {path}: it is not UTF-8 text") from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(rows) < 2:
        raise CliError(f"{path} needs a header row and at least one data row")
    header = rows[0]
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise CliError(f"{path} line {line} has {len(row)} columns; the header has "
                           f"{len(header)}: every row needs one value (or an empty cell) per "
                           "column")
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for line, row in enumerate(rows[1:], start=2):
        for col, cell in enumerate(row):
            try:
                values[line - 2, col] = float(cell) if cell.strip() else np.nan
            except ValueError:
                raise CliError(f"{path} line {line}, column {header[col]!r}: {cell[:40]!r} is "
                               "not a number") from None
    if label is None:
        return values, None, header
    if label not in header:
        raise CliError(f"{path} has no column {label!r}")
    col = header.index(label)
    keep = [i for i in range(len(header)) if i != col]
    return values[:, keep], values[:, col], [header[i] for i in keep]


# -- commands -----------------------------------------------------------------------------

def cmd_keys_new(args: argparse.Namespace) -> int:
    key = ROLES[args.role].generate()
    if Path(args.out).exists() and not args.force:
        raise CliError(f"{args.out} exists; pass --force to replace it")
    _write_atomic(args.out, (key.secret_text() + "\n").encode(), private=True)
    print(key._public.to_text())
    return EXIT_OK


def cmd_keys_public(args: argparse.Namespace) -> int:
    text = _read_text(args.key, "key")
    for cls in ROLES.values():
        try:
            print(cls.from_secret_text(text)._public.to_text())
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
        try:
            features = [float(v) if v.strip() else float("nan")
                        for v in args.features.split(",")]
        except ValueError:
            raise CliError("--features is a comma-separated list of numbers") from None
        if len(features) != len(card.feature_names):
            raise CliError(f"--features has {len(features)} values; card {card.card_id} "
                           f"reads {len(card.feature_names)}: "
                           f"{','.join(card.feature_names)}")
        score = int(card.score(np.array([features]))[0])
        limit, scenes = policy.terms(score)
        if not scenes:
            print(f"score {score}: below the cut-off, no offline credit", file=sys.stderr)
            return EXIT_REFUSED
        print(f"score {score} with card {card.card_id}: limit {limit}", file=sys.stderr)
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
    print(text)
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
    if args.terminal:
        print(qrimage.render(token, "terminal"))
    print(encode_text(token))
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
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
    print(json.dumps({"gateway": receipt.gateway, "record": receipt.record,
                      "account": receipt.account, "serial": receipt.serial,
                      "counter": receipt.counter, "amount": receipt.amount,
                      "scene": receipt.scene.name.lower(), "time": receipt.gateway_time,
                      "duplicate": receipt.duplicate}))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    with _gateway(args) as gateway:
        batch = gateway.export_batch(args.max_records, args.now)
    if batch is None:
        print("nothing to upload", file=sys.stderr)
        return EXIT_OK
    _write_atomic(args.out, batch)
    print(f"wrote {args.out} ({len(batch)} bytes)", file=sys.stderr)
    return EXIT_OK


def cmd_ack(args: argparse.Namespace) -> int:
    with _gateway(args) as gateway:
        gateway.ack(args.seq)
    print(f"batch {args.seq} acknowledged", file=sys.stderr)
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
    print(json.dumps(done.as_dict(), indent=1))
    print(f"recovered: {done.kept_records} records kept, {done.lost_records} lost, "
          f"{done.lost_batches} upload batches lost; tokens issued at or before "
          f"{done.refused_through} are refused from now on", file=sys.stderr)
    return EXIT_OK


def cmd_deny_apply(args: argparse.Namespace) -> int:
    with _gateway(args, create=True) as gateway:
        before = gateway.deny_list.version
        applied = gateway.update_deny_list(_read_bytes(args.file, "deny list"), args.now)
    # The same version again is the list in force (other bytes under its
    # version are refused): a safe retry that changed nothing.
    if before and applied.version == before:
        print(f"deny list version {applied.version} is already in force", file=sys.stderr)
    else:
        print(f"deny list version {applied.version}: {len(applied)} credentials",
              file=sys.stderr)
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
    with _settlement(args, create=True) as settlement:
        _needs_issuer_keys(settlement)
        for path in args.batches:
            try:
                result = settlement.ingest(_read_bytes(path, "batch"))
                print(f"{path}: {result.status.value} (gateway {result.gateway}, batch "
                      f"{result.seq}, {result.records} records, {result.invalid} invalid)")
                if result.status is IngestStatus.CONFLICT:
                    worst = EXIT_REFUSED
            except _BAD_INPUT as exc:
                print(f"{path}: rejected: {exc} ({exc.reason.name})", file=sys.stderr)
                worst = max(worst, EXIT_USAGE)
            except _REFUSALS as exc:   # nothing stored: the gateway keeps the batch, retries
                print(f"{path}: refused: {exc} ({exc.reason.name})", file=sys.stderr)
                worst = max(worst, EXIT_REFUSED)
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
    with _open_store(args, create=True) as settlement:
        for key in keys:
            entry = settlement.trust_issuer(key, args.not_before, args.not_after, args.roles)
            print(f"settlement trusts issuer key {entry.kid.hex()} for "
                  f"{', '.join(_role_names(entry.roles))}, from {entry.not_before} to "
                  f"{entry.not_after}", file=sys.stderr)
    return EXIT_OK


def cmd_settlement_keys(args: argparse.Namespace) -> int:
    with _open_store(args) as settlement:
        stored = settlement.trusted_issuers()
    print(json.dumps([{"key": t.key.to_text(), "kid": t.kid.hex(), "roles": _role_names(t.roles),
                       "not_before": t.not_before, "not_after": t.not_after} for t in stored],
                     indent=1))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    with _settlement(args) as settlement:
        report = settlement.report()
    out = report.as_dict()
    del out["until"]   # the open period has none
    print(json.dumps(out, indent=2))
    return EXIT_OK


def cmd_settlement_operator(args: argparse.Namespace) -> int:
    keys = [GatewayPublicKey.from_text(_text_or_file(v, "gateway public key"))
            for v in args.gateway_public]
    with _open_store(args, create=True) as settlement:
        for key in keys:
            gateway_id = settlement.register_gateway(key, args.operator)
            print(f"gateway {gateway_id} clears to operator {args.operator}", file=sys.stderr)
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
            print(f"fee schedule version {schedule.version} "
                  f"{'stored' if stored else 'was stored already'}", file=sys.stderr)
        current = settlement.fee_schedule()
    print(json.dumps(current.to_dict() if current else None, indent=1))
    return EXIT_OK


def cmd_close(args: argparse.Namespace) -> int:
    key = _key(args.settlement_key, SettlementKey)
    with _settlement(args) as settlement:
        closed = settlement.close_period(args.until, key, now=args.now)
    out = {"period": closed.number, "from": closed.from_time, "until": closed.until,
           "closed_at": closed.closed_at, "records": closed.records,
           "charged_total": closed.charged_total, "not_charged_total": closed.rejected_total,
           "archive": str(closed.path),
           "operators": [{"operator": c.operator, "gross": c.gross, "fee": c.fee, "net": c.net,
                          "flagged_amount": c.flagged_amount} for c in closed.clearing]}
    print(json.dumps(out, indent=2))
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
    print(f"statement of {args.operator} for period {args.period} written to {args.out}",
          file=sys.stderr)
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
    print(json.dumps({
        "verified": True, "period": statement.period, "operator": statement.operator,
        "from": statement.from_time, "until": statement.until,
        "schedule_version": statement.schedule_version, "gross": statement.gross,
        "fee": statement.fee, "net": statement.net, "flagged_count": statement.flagged_count,
        "flagged_amount": statement.flagged_amount,
        "lines": [{"scene": line.scene.name, "count": line.count, "gross": line.gross,
                   "fee_bps": line.fee_bps, "fee": line.fee, "net": line.net}
                  for line in statement.lines]}, indent=2))
    return EXIT_OK


def cmd_archive_ls(args: argparse.Namespace) -> int:
    with _open_store(args) as settlement:
        closed = settlement.periods()
        on_disk = set(archive.list_periods(settlement.archive))
    rows = [{"period": p.number, "from": p.from_time, "until": p.until,
             "closed_at": p.closed_at, "records": p.records, "charged_total": p.charged_total,
             "not_charged_total": p.rejected_total, "path": str(p.path),
             "archived": p.number in on_disk} for p in closed]
    print(json.dumps(rows, indent=1))
    missing = [r["period"] for r in rows if not r["archived"]]
    if missing:
        print(f"closed periods missing from the archive: {missing}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def cmd_repay(args: argparse.Namespace) -> int:
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
        print(f"account {args.account}: repayment {args.reference} of {args.amount} at "
              f"{paid_at} {what}", file=sys.stderr)
        # Stored whatever it is (the money did arrive), but a payment for an
        # account never charged, or beyond what it owes, is said out loud.
        with contextlib.suppress(StoreUnavailable):   # stored: only the note is lost
            rows = settlement.credit_history(U32_MAX)    # every charge and repayment
            row = rows[rows["account"] == args.account]
            charged, repaid = (int(row["charged"][0]), int(row["repaid"][0])) if len(row) \
                else (0, 0)
            if repaid > charged:
                why = "it has no charges" if not charged else f"charged {charged} in all"
                print(f"account {args.account} is in credit by {repaid - charged}: repaid "
                      f"{repaid}, {why} (its balance in `qrpay history` is "
                      f"{charged - repaid})", file=sys.stderr)
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    now = _at(args.now)
    with _settlement(args) as settlement:
        rows = settlement.credit_history(now, due_after=args.due_days * 86_400)
    _write_rows(args.out, rows)
    print(f"wrote {args.out}: {len(rows):,} accounts at {now}", file=sys.stderr)
    credit = rows["balance"] < 0
    if credit.any():
        print(f"{int(credit.sum()):,} of them in credit (repaid more than charged, "
              f"{-int(rows['balance'][credit].sum()):,} in all): a negative balance",
              file=sys.stderr)
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
    print(f"deny list version {version}: {len(added)} added", file=sys.stderr)
    return EXIT_OK


def _clock() -> int:
    return int(time.time())


def _at(value: int | None) -> int:
    """A time option: as given, or the clock when left out."""
    return _clock() if value is None else value


def cmd_score_fit(args: argparse.Namespace) -> int:
    X, y, names = _load_matrix(args.data, args.label)
    assert y is not None
    empty = [name for name, column in zip(names, X.T) if np.isnan(column).all()]
    if empty:
        raise CliError(f"{args.data}: column {empty[0]!r} is empty in every row: there is "
                       "nothing to fit; drop the column or fill it in")
    card = Scorecard.fit(X, y, names, trend=args.trend)
    _write_atomic(args.out, card.to_json().encode())
    print(f"card {card.card_id}: {len(names)} features, written to {args.out}", file=sys.stderr)
    return EXIT_OK


def cmd_score_apply(args: argparse.Namespace) -> int:
    card = Scorecard.from_json(_read_text(args.card, "card"))
    X, _y, names = _load_matrix(args.data)
    if not args.data.endswith(".npy") and tuple(names) != card.feature_names:  # a CSV
        raise CliError(f"{args.data} columns {names} are not the card's {list(card.feature_names)}")
    scores, reasons = card.explain(X, k=min(args.reasons, len(card.features)),
                                   threads=args.threads)
    if args.out.endswith(".npy"):
        image = io.BytesIO()
        np.save(image, scores)
        _write_atomic(args.out, image.getvalue())
    else:
        lines = ["score," + ",".join(f"reason{i + 1}" for i in range(reasons.shape[1]))]
        named = card.reason_names(reasons)
        lines += [",".join([str(int(s)), *r, *[""] * (reasons.shape[1] - len(r))])
                  for s, r in zip(scores, named)]
        _write_atomic(args.out, ("\n".join(lines) + "\n").encode())
    print(f"scored {len(scores):,} rows with card {card.card_id}", file=sys.stderr)
    return EXIT_OK


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
    if args.json:
        _check_out(args.json, "--json")
    if args.workdir:
        try:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise CliError(f"--workdir {args.workdir} is not a directory") from None
        except OSError as exc:
            raise CliError(f"--workdir {args.workdir} cannot be made: "
                           f"{exc.strerror or exc}") from None
    report = simulate.run(args.citizens, args.trips, args.seed, args.threads, args.workdir,
                          days=args.days)
    print(simulate.format_report(report))
    if args.json:
        _write_atomic(args.json, json.dumps(report.as_dict(), indent=2).encode())
    return EXIT_OK if not report.failures else EXIT_REFUSED


# -- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrpay", description="Offline signed QR payment tokens: keys, credentials, "
        "tokens, gateways, settlement and credit scoring.",
        epilog="Exit codes: 0 done, 1 refused by a check, 2 bad input, 75 the journal or "
               "store is unavailable or busy (try again).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def trust_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--issuer-public", action="append", metavar="KEY",
                       help="a trusted issuer public key (text, or a file holding it); "
                            "repeat for several")

    def gateway_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gateway-dir", required=True, help="the gateway's journal directory")
        p.add_argument("--gateway-key", required=True, help="file with the gateway secret key")
        trust_args(p)
        p.add_argument("--now", type=_TIME, help="Unix time to use instead of the clock")

    keys = commands.add_parser("keys", help="make and show keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION")
    p = keys.add_parser("new", help="generate a key; the secret goes to a file (mode 600), "
                                    "the public key to stdout")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--out", required=True, help="file for the secret key")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(run=cmd_keys_new)
    p = keys.add_parser("public", help="print the public key of a secret key file")
    p.add_argument("key")
    p.set_defaults(run=cmd_keys_public)

    p = commands.add_parser("issue", help="issue a credential for a device",
                            description="Sign a credential with an issuer key, from a limit "
                            "and scenes, or from a scorecard, a limit policy and the "
                            "account's features.")
    p.add_argument("--issuer-key", required=True)
    p.add_argument("--device-public", required=True, help="device public key (text or file)")
    p.add_argument("--account", required=True, type=_U64)
    p.add_argument("--limit", type=_int(0, U32_MAX, "a limit is minor units below 2**32"),
                   help="offline credit limit, minor units")
    p.add_argument("--scenes", type=_scenes, help="comma-separated, e.g. bus,metro")
    p.add_argument("--card", help="scorecard JSON (with --policy and --features)")
    p.add_argument("--policy", help="limit policy JSON: {\"bands\": [...]}")
    p.add_argument("--features", help="the account's feature values, comma-separated")
    p.add_argument("--not-before", type=_TIME, default=None,
                   help="Unix time the credential starts (default: now)")
    p.add_argument("--days", type=_int(1, U32_MAX // DAY, "Unix seconds end in 2106"),
                   default=30, help="validity in days (default 30)")
    p.add_argument("--out", help="also write the credential text to this file")
    p.set_defaults(run=cmd_issue)

    p = commands.add_parser("token", help="make a token on the phone (text form, or a QR)")
    p.add_argument("--credential", required=True, help="credential text or file")
    p.add_argument("--device-key", required=True)
    p.add_argument("--scene", required=True, type=_scene)
    p.add_argument("--counter-file", help="keeps the counter between runs (it only goes up)")
    p.add_argument("--now", type=_TIME)
    p.add_argument("--png", help="also render the QR code to this PNG file")
    p.add_argument("--svg", help="also render the QR code to this SVG file")
    p.add_argument("--terminal", action="store_true", help="also draw the QR in the terminal")
    p.set_defaults(run=cmd_token)

    p = commands.add_parser("scan", help="scan a token into a gateway (prints the receipt)")
    gateway_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the token's text form (or a file holding it)")
    source.add_argument("--image", help="a QR image to decode (needs the qr extra)")
    p.add_argument("--amount", required=True, type=_AMOUNT, help="minor units")
    p.add_argument("--scene", required=True, type=_scene, help="this gateway's scene")
    p.set_defaults(run=cmd_scan)

    p = commands.add_parser("export", help="write the gateway's next signed upload batch")
    gateway_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--max-records", type=_int(1, MAX_RECORDS_PER_BATCH,
                                              "settlement takes no bigger batch"),
                   default=1000)
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("ack", help="record that settlement has a batch")
    gateway_args(p)
    p.add_argument("--seq", required=True, type=_int(1, 2**53 - 1, "batch numbers"))
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
    from qrpay import cli_online, cli_scale, cli_trust   # extras load when a command runs
    cli_online.add_parsers(commands, gateway, gateway_args)
    cli_trust.add_parsers(commands)
    cli_scale.add_parsers(commands)

    deny = commands.add_parser("deny-list", help="publish or apply deny lists").add_subparsers(
        dest="deny_command", required=True, metavar="ACTION")
    p = deny.add_parser("apply", help="apply a signed deny list to a gateway")
    gateway_args(p)
    p.add_argument("--file", required=True)
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
    p.add_argument("--issuer-key", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--revoke", type=_U64, action="append", help="also deny this serial")
    p.add_argument("--now", type=_TIME)
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
    p.add_argument("--not-before", type=_int(0, U32_MAX), default=0,
                   help="Unix time the key is trusted from (default: 0)")
    p.add_argument("--not-after", type=_int(0, U32_MAX), default=U32_MAX,
                   help="Unix time it is trusted to (default: 2**32-1)")
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
    p.add_argument("--until", required=True, type=_TIME, help="Unix time the period ends at")
    p.add_argument("--settlement-key", required=True,
                   help="file with the settlement secret key (qrpay keys new settlement)")
    p.add_argument("--now", type=_TIME, help="Unix time of the close (default: the clock)")
    p.set_defaults(run=cmd_close)

    statement = commands.add_parser(
        "statement", help="write or verify an operator's signed statement").add_subparsers(
        dest="statement_command", required=True, metavar="ACTION")
    p = statement.add_parser("write", help="write an operator's statement of a closed period")
    store_args(p)
    p.add_argument("--period", required=True, type=_int(1, 2**62))
    p.add_argument("--operator", required=True)
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
    p.add_argument("batches", nargs="+")
    p.set_defaults(run=cmd_ingest)

    p = commands.add_parser("report", help="print the open period's charges and findings "
                                           "(JSON; closed periods: qrpay archive ls)")
    settlement_args(p)
    p.set_defaults(run=cmd_report)

    p = commands.add_parser("repay", help="record a repayment an account made")
    settlement_args(p)
    p.add_argument("--account", required=True, type=_int(0, 2**63 - 1, "settlement's accounts"))
    p.add_argument("--amount", required=True, type=_int(1, 2**62, "all repayments add up "
                                                         "below 2**62"), help="minor units")
    p.add_argument("--reference", required=True,
                   help="the payment's own reference (the bank's): the same one again is "
                        "stored once, so a failed call can be retried")
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

    score = commands.add_parser("score", help="fit and apply scorecards").add_subparsers(
        dest="score_command", required=True, metavar="ACTION")
    p = score.add_parser("fit", help="fit a card from a CSV with a 0/1 label column")
    p.add_argument("--data", required=True)
    p.add_argument("--label", required=True, help="the column with 1 = defaulted")
    p.add_argument("--trend", default="auto", choices=["auto", "increasing", "decreasing"])
    p.add_argument("--out", required=True, help="card JSON")
    p.set_defaults(run=cmd_score_fit)
    p = score.add_parser("apply", help="score rows of a CSV or .npy with a card")
    p.add_argument("--card", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="CSV of score and reasons, or .npy of scores")
    p.add_argument("--reasons", type=_int(0), default=3)
    p.add_argument("--threads", type=_int(1, MAX_THREADS), default=1)
    p.set_defaults(run=cmd_score_apply)

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
    sim.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    sim.set_defaults(run=cmd_simulate)
    return parser


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
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        print("qrpay: interrupted (what was committed before stays committed)",
              file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        out.flush()
        err.flush()
        sys.stdout, sys.stderr = out.stream, err.stream
    return EXIT_BROKEN_PIPE if out.broken and code == EXIT_OK else code


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
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
