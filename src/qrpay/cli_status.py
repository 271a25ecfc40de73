"""`qrpay gateway status`: what a gateway directory holds, read from its
journal without opening the gateway (docs/OPERATIONS.md, Gateway status).

The journal is read through a read-only SQLite connection, in one read
transaction (one consistent snapshot), without the gateway's directory
lock and without its secret key. In WAL mode a reader neither blocks the
gateway's commits nor is blocked by them, so a status can run while the
gateway process is scanning. It changes nothing: no schema, no checkpoint,
no lock file; and when no gateway has the journal open, not even the -wal
and -shm files SQLite makes for a reader. The deny list is read as the
gateway stored it after verifying it, not verified again.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrpay import cli, cli_output, metrics, sqlitedb
from qrpay.anchor import ANCHOR_FILE
from qrpay.denylist import DenyList
from qrpay.errors import InvalidArgument, InvalidKey, JournalUnavailable
from qrpay.gateway import JOURNAL_FILE, LAST_SYNC_KEY
from qrpay.journal import Journal, from_sql
from qrpay.keys import GatewayKey, GatewayPublicKey
from qrpay.token import DEFAULT_SKEW
from qrpay.trust import TrustStore

DEFAULT_TOP = 10


@dataclass(frozen=True)
class AccountSpend:
    account: int
    amount: int     # minor units since the last ack
    uses: int


@dataclass(frozen=True)
class UnackedBatch:
    seq: int
    first: int      # its first and last record numbers
    last: int


@dataclass(frozen=True)
class GatewayStatus:
    """One snapshot of a gateway's journal (read_status). Times are Unix
    seconds; amounts minor units."""

    directory: str
    gateway: str | None           # the gateway id, from the public key in the journal
    gateway_key: bytes = field(repr=False)   # that public key (32 bytes; b"" if none)
    now: int
    journal_file_bytes: int
    wal_bytes: int
    last_record: int              # the latest record number journaled (0: none)
    records_since_ack: int        # records after the last acked batch (charged offline)
    records_not_exported: int     # records in no upload batch yet
    unacked_records: int          # as Gateway.unacked_records()
    last_batch: int               # the latest upload batch number (0: none)
    unacked_batches: tuple[UnackedBatch, ...]
    offline_accounts: int
    offline_amount: int
    offline_uses: int
    offline_max: int              # the largest spend of one account
    top_spend: tuple[AccountSpend, ...]
    deny_version: int             # 0: no deny list yet
    deny_serials: int
    deny_issued_at: int
    journal_time_floor: int       # the latest scan journaled (or the recovery time)
    time_floor: int               # the trusted floor, as a gateway with skew `skew` sees it
    last_sync: int | None         # the last sync without a problem (None: never recorded)

    @property
    def journal_bytes(self) -> int:
        return self.journal_file_bytes + self.wal_bytes

    @property
    def deny_age(self) -> int | None:
        return self.now - self.deny_issued_at if self.deny_version else None

    def as_dict(self) -> dict[str, Any]:
        """The `--json` document (docs/OPERATIONS.md lists its keys)."""
        return {
            "gateway": self.gateway,
            "directory": self.directory,
            "now": self.now,
            "journal": {"bytes": self.journal_bytes, "file_bytes": self.journal_file_bytes,
                        "wal_bytes": self.wal_bytes},
            "records": {"last": self.last_record, "since_ack": self.records_since_ack,
                        "not_exported": self.records_not_exported,
                        "unacked": self.unacked_records},
            "batches": {"last": self.last_batch,
                        "unacked": [{"seq": b.seq, "first": b.first, "last": b.last,
                                     "records": b.last - b.first + 1}
                                    for b in self.unacked_batches]},
            "offline_spend": {"accounts": self.offline_accounts, "amount": self.offline_amount,
                              "uses": self.offline_uses,
                              "top": [{"account": s.account, "amount": s.amount,
                                       "uses": s.uses} for s in self.top_spend]},
            "deny_list": {"version": self.deny_version, "serials": self.deny_serials,
                          "issued_at": self.deny_issued_at if self.deny_version else None,
                          "age_seconds": self.deny_age},
            "time_floor": self.time_floor,
            "journal_time_floor": self.journal_time_floor,
            "last_sync": self.last_sync,
            "last_sync_age_seconds": (None if self.last_sync is None
                                      else self.now - self.last_sync),
        }

    def gauges(self) -> dict[str, float]:
        """The figures as metrics.STATUS_GAUGES (no account numbers)."""
        return {
            "qrpay_gateway_unacked_records": self.unacked_records,
            "qrpay_gateway_records_since_ack": self.records_since_ack,
            "qrpay_gateway_records_not_exported": self.records_not_exported,
            "qrpay_gateway_unacked_batches": len(self.unacked_batches),
            "qrpay_gateway_last_record": self.last_record,
            "qrpay_gateway_offline_accounts": self.offline_accounts,
            "qrpay_gateway_offline_spend": self.offline_amount,
            "qrpay_gateway_offline_spend_max": self.offline_max,
            "qrpay_gateway_deny_list_version": self.deny_version,
            "qrpay_gateway_deny_list_serials": self.deny_serials,
            "qrpay_gateway_deny_list_age_seconds": self.now - self.deny_issued_at,
            "qrpay_gateway_deny_list_issued_timestamp_seconds": self.deny_issued_at,
            "qrpay_gateway_time_floor_timestamp_seconds": self.time_floor,
            "qrpay_gateway_journal_bytes": self.journal_bytes,
            "qrpay_gateway_last_sync_timestamp_seconds": self.last_sync or 0,
            "qrpay_gateway_status_timestamp_seconds": self.now,
        }


class _ReadOnlyJournal(Journal):
    """The journal's own queries (record and batch numbering across pruning
    and recovery, the time floor) on a read-only connection: opening it
    creates nothing, checks nothing at length and takes no write lock."""

    def __init__(self, path: Path, immutable: bool) -> None:   # not Journal's: it writes
        self.path = path
        if not path.is_file():
            raise JournalUnavailable(f"{path} is missing: the gateway has no journal to read")
        # immutable: no locks and no -wal or -shm file made (see read_status).
        mode = "?mode=ro&immutable=1" if immutable else "?mode=ro"
        try:
            self._db = sqlite3.connect(path.resolve().as_uri() + mode, uri=True,
                                       isolation_level=None, check_same_thread=False,
                                       timeout=sqlitedb.BUSY_TIMEOUT)
        except sqlite3.Error as exc:
            raise JournalUnavailable(f"{path}: {exc}") from exc
        try:
            self._query("PRAGMA query_only = 1")
            if not self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                               "AND name = 'meta'"):
                raise JournalUnavailable(f"{path} holds no journal")
        except BaseException:
            self._db.close()
            raise

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: every query inside sees the same commit."""
        self._query("BEGIN")   # deferred: a read lock on the first SELECT, never a write lock
        try:
            yield
        finally:
            self._query("ROLLBACK")

    def unacked_batches(self) -> list[UnackedBatch]:
        return [UnackedBatch(int(s), int(f), int(la)) for s, f, la in self._query(
            "SELECT seq, first, last FROM batches WHERE acked = 0 ORDER BY seq")]

    def spend(self, acked: int) -> tuple[int, int, int]:
        """(records, accounts, amount) after record `acked`: what counts
        against offline limits, as the gateway rebuilds it when it opens."""
        [(uses, accounts, amount)] = self._query(
            "SELECT COUNT(*), COUNT(DISTINCT account), COALESCE(SUM(amount), 0) FROM records "
            "WHERE seq > ?", (acked,))
        return int(uses), int(accounts), int(amount)

    def top_spend(self, acked: int, n: int) -> list[AccountSpend]:
        rows = self._query("SELECT account, SUM(amount) AS spent, COUNT(*) FROM records "
                           "WHERE seq > ? GROUP BY account ORDER BY spent DESC, MIN(seq) "
                           "LIMIT ?", (acked, n))
        return [AccountSpend(from_sql(int(a)), int(s), int(u)) for a, s, u in rows]

    def count_after(self, seq: int) -> int:
        [(count,)] = self._query("SELECT COUNT(*) FROM records WHERE seq > ?", (seq,))
        return int(count)


def read_status(directory: str | Path, now: int, top: int = DEFAULT_TOP,
                skew: int = DEFAULT_SKEW) -> GatewayStatus:
    """A snapshot of the gateway journal in `directory`, read-only and
    without the gateway's lock, so its process may keep running. `top`:
    how many accounts to list by offline spend (largest first). `skew`:
    the policy's clock skew, for the trusted time floor (the default
    policy's unless given). Raises JournalUnavailable when the journal is
    missing or cannot be read."""
    folder = Path(directory)
    path = folder / JOURNAL_FILE
    wal = path.with_name(path.name + "-wal")
    # With no -wal file, no gateway has the journal open and the database
    # file holds all of it: read it as immutable, which makes no -wal or
    # -shm file (one made by this reader's user could keep the gateway's
    # user from opening its journal). If the file changed meanwhile (a
    # gateway opened and checkpointed), read again the usual way.
    before = _stamp(path) if path.is_file() and not wal.exists() else None
    found = _snapshot(path, before is not None, top)
    if before is not None and (wal.exists() or _stamp(path) != before):
        found = _snapshot(path, False, top)
    key, last_batch, exported, acked, last_record, batches, uses, accounts, amount, ranked, \
        not_exported, floor, raw_deny, last_sync = found
    # Read as stored: the gateway verified it when it applied it.
    deny = (DenyList.reload(raw_deny, TrustStore()) if isinstance(raw_deny, bytes)
            else DenyList.empty())
    # As Gateway.unacked_records: records after the last ack, and any older
    # batch still waiting for one.
    behind = sum(b.last - b.first + 1 for b in batches if b.last <= acked)
    key = key if isinstance(key, bytes) else b""
    return GatewayStatus(
        directory=str(folder), gateway=_gateway_id(key), gateway_key=key, now=now,
        journal_file_bytes=_size(path), wal_bytes=_size(wal),
        last_record=last_record, records_since_ack=uses, records_not_exported=not_exported,
        unacked_records=max(0, last_record - acked) + behind, last_batch=last_batch,
        unacked_batches=tuple(batches), offline_accounts=accounts, offline_amount=amount,
        offline_uses=uses, offline_max=ranked[0].amount if ranked else 0,
        top_spend=tuple(ranked[:top]), deny_version=deny.version, deny_serials=len(deny),
        deny_issued_at=deny.issued_at if deny.version else 0, journal_time_floor=floor,
        time_floor=max(floor, deny.issued_at - skew) if deny.version else floor,
        last_sync=last_sync if isinstance(last_sync, int) else None)


def _stamp(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


def _snapshot(path: Path, immutable: bool, top: int) -> tuple[Any, ...]:
    """Everything read_status reads, in one read transaction."""
    journal = _ReadOnlyJournal(path, immutable)
    try:
        with journal.snapshot():
            key = journal.get("gateway_key")
            last_batch, exported, acked = journal.batch_summary()
            last_record = journal.next_record_seq() - 1
            batches = journal.unacked_batches()
            uses, accounts, amount = journal.spend(acked)
            ranked = journal.top_spend(acked, max(top, 1))
            not_exported = journal.count_after(exported)
            floor = journal.time_floor()
            raw_deny = journal.get("deny_list")
            last_sync = journal.get(LAST_SYNC_KEY)
    finally:
        journal.close()
    return (key, last_batch, exported, acked, last_record, batches, uses, accounts, amount,
            ranked, not_exported, floor, raw_deny, last_sync)


def _gateway_id(key: bytes) -> str | None:
    try:
        return GatewayPublicKey.from_bytes(key).gateway_id
    except (InvalidKey, InvalidArgument):
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# -- the command ------------------------------------------------------------------------------

def cmd_gateway_status(args: argparse.Namespace) -> int:
    cli._is_store(args.gateway_dir, (JOURNAL_FILE, ANCHOR_FILE), "gateway",
                  "`qrpay scan` and `qrpay deny-list apply`")
    if args.metrics == "-" and cli_output.wants_json(args):
        raise cli.CliError("--metrics - prints the metrics on stdout: leave out --json")
    if args.metrics is not None and not metrics.available():
        raise cli.CliError(f"--metrics needs prometheus_client: {metrics.INSTALL_HINT}")
    now = args.now if args.now is not None else int(time.time())
    status = read_status(args.gateway_dir, now, args.top)
    if args.gateway_key:
        mine = cli._key(args.gateway_key, GatewayKey).public.to_bytes()
        if mine != status.gateway_key:
            raise InvalidArgument(f"{args.gateway_dir} belongs to another gateway key "
                                  f"(gateway {status.gateway})")
    if args.metrics is not None:
        data = metrics.status_exposition(status.gateway or "unknown", status.gauges())
        if args.metrics == "-":
            sys.stdout.write(data.decode())
            return cli.EXIT_OK
        _write_metrics(args.metrics, data)
        cli_output.status(args, f"metrics written to {args.metrics}")
    cli_output.emit(args, status.as_dict(), _human(status, args.top))
    return cli.EXIT_OK


def _write_metrics(path: str, data: bytes) -> None:
    target = Path(path)
    if target.is_dir():
        raise cli.CliError(f"--metrics {path} is a directory: name the .prom file to write")
    if not target.parent.is_dir():
        raise cli.CliError(f"--metrics {path}: no such directory: {target.parent}")
    try:
        metrics.write_textfile(target, data)
    except OSError as exc:
        raise cli.CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def _ago(seconds: int) -> str:
    if seconds < 0:
        return f"{_span(-seconds)} from now"
    return f"{_span(seconds)} ago"


def _span(seconds: int) -> str:
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _human(s: GatewayStatus, top: int) -> str:
    iso = cli_output.iso
    waiting = ", ".join(f"{b.seq} (records {b.first}-{b.last})" for b in s.unacked_batches)
    lines = [
        f"gateway        {s.gateway or 'unknown'} ({s.directory})",
        f"journal        {s.journal_bytes:,} bytes ({s.journal_file_bytes:,} database, "
        f"{s.wal_bytes:,} write-ahead log)",
        f"records        {s.records_since_ack:,} since the last ack, "
        f"{s.records_not_exported:,} not exported, {s.unacked_records:,} unacked "
        f"(last record {s.last_record:,})",
        f"batches        {len(s.unacked_batches)} unacked"
        + (f": {waiting}" if waiting else "") + f" (last batch {s.last_batch:,})",
        f"offline spend  {s.offline_amount:,} in {s.offline_uses:,} uses by "
        f"{s.offline_accounts:,} accounts",
    ]
    if s.top_spend:
        shown = f"top {min(top, s.offline_accounts)}"
        lines.append(f"  {shown:<9}{'account':>20}  {'amount':>10}  {'uses':>5}")
        lines += [f"  {'':<9}{t.account:>20}  {t.amount:>10,}  {t.uses:>5,}" for t in s.top_spend]
    if s.deny_version:
        lines.append(f"deny list      version {s.deny_version}, {s.deny_serials:,} serials, "
                     f"issued {iso(s.deny_issued_at)} ({_ago(s.now - s.deny_issued_at)})")
    else:
        lines.append("deny list      none yet (the gateway treats it as stale)")
    lines.append(f"time floor     {iso(s.time_floor)} (latest scan journaled "
                 f"{iso(s.journal_time_floor) if s.journal_time_floor else 'none'})")
    lines.append("last sync      " + (f"{iso(s.last_sync)} ({_ago(s.now - s.last_sync)})"
                                      if s.last_sync is not None else "none recorded"))
    return "\n".join(lines)


def add_parsers(gateway: argparse._SubParsersAction,   # type: ignore[type-arg]
                gateway_args: Callable[[argparse.ArgumentParser], None]) -> None:
    # Not gateway_args: reading a status needs neither the secret key nor
    # the issuer keys.
    p = gateway.add_parser(
        "status", help="what a gateway holds: unacked records and batches, offline spend, "
                       "deny list, time floor, journal size, last sync (read-only)",
        description="Read a gateway's journal without opening the gateway: safe while the "
                    "gateway process runs (a read-only snapshot; no lock taken, nothing "
                    "written). --metrics FILE also writes the figures for the Prometheus "
                    "node exporter's textfile collector. JSON keys: docs/OPERATIONS.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)   # the example: cli_examples
    p.add_argument("--gateway-dir", required=True, help="the gateway's journal directory")
    p.add_argument("--gateway-key", help="file with the gateway secret key: optional, to check "
                                         "that the directory is this gateway's")
    p.add_argument("--now", type=cli._TIME,
                   help="the time ages are measured at (default: the clock)")
    p.add_argument("--top", type=cli._int(0), default=DEFAULT_TOP, metavar="N",
                   help=f"list the N accounts with the most offline spend (default "
                        f"{DEFAULT_TOP}; 0 lists none, the count is always shown)")
    p.add_argument("--metrics", metavar="FILE",
                   help="also write the figures in the Prometheus text format to FILE "
                        "(written whole, then renamed into place); - prints them on stdout "
                        "instead of the status")
    p.set_defaults(run=cmd_gateway_status)
